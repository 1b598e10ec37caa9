"""The one evaluation loop: every method on every dataset goes through :func:`evaluate`.

load split -> drop missing images (official rule) -> build backbone -> encode gallery (cached) -> encode
references (cached) -> compose queries (validated) -> rank -> dataset metrics / submission files -> result
file + predictions.

The loop knows no method or dataset by name: it talks to them only through
:class:`cirbench.method.Method` and :class:`cirbench.dataset.Dataset`, and checks what they return.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import distributed
from .backbones import Backbone, load_backbone
from .dataset import Dataset, annotation_checksums
from .encode import encode_images, image_library, jpeg_decoder, pixels_identity, resolve_path
from .errors import CirbenchError, ImageError, UnknownNameError
from .feature_cache import FeatureCache
from .images import describe_missing, find_missing, tensor_decoder
from .method import QuerySet
from .metrics import means
from .plugins import Registry, get_registry
from .preprocess import DEFAULT_MAX_PIXELS, PREPROCESS_KINDS, Preprocessor
from .results import ResultWriter, environment_info, path_option_digests, run_fingerprint, utc_now
from .retrieval import RANK_QUERY_CHUNK, Ranking, choose_backend, rank, rank_candidates
from .stats import DEFAULT_REPLICATES, bootstrap_ci
from .types import SAVED_TOP, EvalSet, MethodSpec, Query, resolve_options
from .util import json_hash

DEFAULT_BACKBONE = ("ViT-L-14", "openai")
# ranked entries (queries x ranking width) held at once: a set whose ranking would hold more is ranked and scored in
# parts of its queries, where its dataset allows it (Dataset.queries_score_apart); about 0.8 GB of indices and scores
STREAM_ENTRIES = 1 << 26


def stream_step(queries: int, width: int) -> int:
    """How many of ``queries`` rankings of ``width`` entries are made and scored at a time: all of them, or as many
    as hold ``STREAM_ENTRIES`` entries, in whole blocks of the ranking's own query chunks where they fit (the same
    products, bit for bit, as at once)."""
    if queries * width <= STREAM_ENTRIES:
        return max(queries, 1)
    step = max(1, STREAM_ENTRIES // max(width, 1))
    return step - step % RANK_QUERY_CHUNK if step >= RANK_QUERY_CHUNK else step


@dataclass
class RunConfig:
    """Everything ``cirbench run`` is asked to do. ``None`` means "the plugin's (or the device's) default"."""

    method: str
    dataset: str
    split: str | None = None
    backbone: str | None = None
    pretrained: str | None = None
    preprocess: str | None = None
    precision: str = "fp32"
    device: str = "auto"
    data_root: str | Path | None = None
    output: str | Path = "results"
    cache_dir: str | Path | None = None
    use_cache: bool = True
    cache_identity: str = "stat"
    # as given on the command line (a string, or None for a bare flag) or from code (a value of the option's type)
    method_options: dict[str, Any] = field(default_factory=dict)
    dataset_options: dict[str, Any] = field(default_factory=dict)
    label: str | None = None
    seed: int = 0
    batch_size: int | None = None
    workers: int | None = None
    allow_missing: bool = False
    retrieval_backend: str = "auto"
    save_topk: int | None = SAVED_TOP  # ranked ids kept per query in the predictions file (None: all that were ranked)
    encode_path: str = "auto"  # auto | workers | batched (see cirbench.encode)
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    bootstrap: int = DEFAULT_REPLICATES  # bootstrap replicates for confidence intervals (0: none)
    progress: bool = True


@dataclass
class RunOutcome:
    """What one (method options, dataset split) evaluation produced."""

    label: str
    result_path: Path
    predictions_path: Path
    metrics: dict[str, float]
    submissions: list[Path]
    record: dict[str, Any]
    note: str | None = None


def choose_backbone(cfg: RunConfig, mspec: MethodSpec, dspec) -> tuple[str, str]:
    """The run's backbone wins, then the dataset's (embedded benchmarks), then the method's, then ViT-L-14."""
    if cfg.backbone:
        return cfg.backbone, cfg.pretrained or ("none" if cfg.backbone.endswith(".json") else "openai")
    default = dspec.default_backbone or mspec.default_backbone or DEFAULT_BACKBONE
    return default[0], cfg.pretrained or default[1]


def run_label(cfg: RunConfig, mspec: MethodSpec, opts: dict, tag: str | None = None) -> str:
    """The method name (with the method's tag: ``lincir+demo-weights``) plus the values of its sweepable options
    (``slerp@alpha=0.8``), or ``--label``."""
    if cfg.label:
        base = cfg.label
    else:
        base = mspec.name + (f"+{tag}" if tag else "")
    shown = [o.name for o in mspec.options if o.sweepable]
    if shown:
        base += "@" + ",".join(f"{k}={opts[k]}" for k in shown)
    return base


def drop_missing(es: EvalSet, allow_missing: bool, root_hint: str | None = None) -> dict[str, int]:
    """Check image files; stop with the list of missing ones, or (``--allow-missing``) drop them as the
    official loaders do: a query goes when its reference *or* one of its targets is missing, a gallery image
    when its file is. Returns the counts the result file records."""
    missing = find_missing(es.images.values())
    counts = {"missing_images": len(missing), "queries_dropped": 0, "queries_dropped_missing_reference": 0,
              "queries_dropped_missing_target": 0, "gallery_dropped": 0}
    if not missing:
        return counts
    if len(missing) == len(es.images):  # nothing to skip: the images are elsewhere
        root = missing[0].root
        where = root_hint or (f"is --data-root {root} right?" if root is not None
                              else "are the images where they should be?")
        raise ImageError(f"{es.name}: none of its {len(es.images)} images exist (the first: {missing[0].path}); "
                         f"{where}")
    if not allow_missing:
        raise ImageError(f"{es.name}: {describe_missing(missing, len(es.images))}; pass --allow-missing to skip them "
                         "as the official loaders do")
    gone = {m.id for m in missing}
    kept: list[Query] = []
    for q in es.queries:
        if q.reference in gone:
            counts["queries_dropped_missing_reference"] += 1
        elif any(t in gone for t in q.targets):
            counts["queries_dropped_missing_target"] += 1
        else:
            kept.append(q)
    counts["queries_dropped"] = len(es.queries) - len(kept)
    n_gallery = len(es.gallery)
    es.queries = kept
    es.gallery = [g for g in es.gallery if g.id not in gone]
    for image_id in gone:
        es.images.pop(image_id, None)
    counts["gallery_dropped"] = n_gallery - len(es.gallery)
    return counts


def check_composed(features: Any, n: int, dim: int, mspec: MethodSpec, vectors: int = 1,
                   hook: str = "compose", unit: bool = True) -> torch.Tensor:
    """What ``compose`` (or ``hook``) returned must be ``[n, dim]`` (``[n, vectors, dim]`` for a method with
    several vectors per query), finite and (``unit``) L2-normalised; a CirbenchError names the method and its
    plugin otherwise."""
    who = f"method '{mspec.name}' (plugin {mspec.plugin or '?'})"
    if not isinstance(features, torch.Tensor):
        raise CirbenchError(f"{who}: {hook} returned {type(features).__name__}, not a tensor")
    expected = (n, dim) if vectors == 1 else (n, vectors, dim)
    if tuple(features.shape) != expected:
        meant = "one row per gallery image" if hook == "prepare_gallery" else "to match the gallery features"
        raise CirbenchError(f"{who}: {hook} returned shape {tuple(features.shape)}, expected {expected} ({meant})")
    features = features.float()
    if not bool(torch.isfinite(features).all()):
        raise CirbenchError(f"{who}: {hook} returned non-finite values (NaN or Inf)")
    norms = features.norm(dim=-1)
    if unit and n and not bool(((norms - 1).abs() < 1e-3).all()):
        raise CirbenchError(f"{who}: {hook} returned features that are not L2-normalised (norms "
                            f"{float(norms.min()):.4g}..{float(norms.max()):.4g}); ranking would be by dot product")
    return features


@dataclass
class _Checked:
    """A run's names, options and benchmark data, checked before any model is loaded."""

    mspec: MethodSpec
    dspec: Any
    split: str
    option_sets: list[dict[str, Any]]
    dataset_options: dict[str, Any]
    dataset: Any
    evalsets: list[EvalSet]
    set_counts: dict[str, dict[str, int]]
    preprocess_kind: str


@dataclass
class _Context(_Checked):
    """What every option value of one run shares."""

    backbone: Backbone
    preprocessor: Preprocessor
    cache: FeatureCache
    writer: ResultWriter


def backbone_key(model_name: str, pretrained: str, precision: str, device: str, seed: int) -> tuple:
    """What a loaded backbone is found again by in :class:`Loaded` (the names as given: ``auto`` stays ``auto``)."""
    return (model_name, pretrained, precision, device, seed)


@dataclass
class Loaded:
    """What the runs of one command load once and share: ``cirbench run`` with several methods, a training's
    validations. The backbone (frozen: a method never changes one; the last one loaded), benchmark data (a
    method sees copies of the queries), and feature caches with the features they hold in memory
    (``keep_features``), so the methods of a ``--no-cache`` run encode a gallery once too."""

    keep_features: bool = True
    backbones: dict[tuple, Backbone] = field(default_factory=dict)
    data: dict[tuple, tuple[Dataset, list[EvalSet], dict[str, dict[str, int]]]] = field(default_factory=dict)
    caches: dict[tuple, FeatureCache] = field(default_factory=dict)


class Evaluator:
    """Runs a :class:`RunConfig`; holds the backbone and feature cache so sweeps encode only once (and, given a
    :class:`Loaded`, so the runs of one command load each only once)."""

    def __init__(self, cfg: RunConfig, registry: Registry | None = None, log: Callable[[str], None] = print,
                 loaded: Loaded | None = None):
        self.cfg = cfg
        self.registry = registry or get_registry()
        self.loaded = loaded if loaded is not None else Loaded()
        self._checked: _Checked | None = None
        self.log = log if distributed.speaks() else (lambda _message: None)  # rank 0 says it for all

    # -- features ---------------------------------------------------------------------------------------
    def _feature_key(self, backbone: Backbone, preprocessor: Preprocessor, kind: dict) -> dict:
        return {"format": 2, "backbone": backbone.identity(),
                "preprocess": pixels_identity(preprocessor, self.cfg.encode_path, backbone.device),
                "precision": backbone.precision, "feature": kind}

    def _features(self, cache: FeatureCache, key: dict, images, encode, preprocessor, desc: str) -> torch.Tensor:
        cfg = self.cfg

        def compute(todo, on_chunk=None):
            if distributed.world_size() == 1:
                return encode_images(todo, encode, preprocessor, batch_size=cfg.batch_size, workers=cfg.workers,
                                     desc=desc, progress=cfg.progress, path=cfg.encode_path, device=self.device,
                                     dtype=self.backbone.input_dtype, on_chunk=on_chunk)
            # under torchrun every rank encodes a strided shard; the rows are gathered back in order
            mine = distributed.shard(list(todo))
            local = encode_images(mine, encode, preprocessor, batch_size=cfg.batch_size, workers=cfg.workers,
                                  desc=desc, progress=cfg.progress and distributed.is_main(), path=cfg.encode_path,
                                  device=self.device, dtype=self.backbone.input_dtype) if mine else None
            return distributed.gather_sharded_rows(local, len(todo))

        return cache.get_or_compute(key, images, compute)

    # -- the run ----------------------------------------------------------------------------------------
    def run(self) -> list[RunOutcome]:
        """Prepare once (specs, data, backbone, cache), then evaluate every swept option value."""
        start = time.perf_counter()
        ctx = self._prepare()
        outcomes: list[RunOutcome] = []
        for opts in ctx.option_sets:
            t0 = time.perf_counter()
            outcomes.append(self._evaluate(ctx, opts, time_origin=start if not outcomes else t0))
        return outcomes

    def method_plan(self) -> tuple[MethodSpec, Any, list[dict[str, Any]]]:
        """The method's and the dataset's specs and the method's option sets (one per value of a sweep), from
        names and options alone: what ``--download-only`` reads, and where :meth:`check` starts."""
        mspec = self.registry.method(self.cfg.method)
        dspec = self.registry.dataset(self.cfg.dataset)
        return mspec, dspec, resolve_options(mspec.options, self.cfg.method_options, dspec.name,
                                             f"method {mspec.name}")

    def check(self) -> _Checked:
        """Everything but the model: names, options, plugins that import, the benchmark's data read (once per
        :class:`Loaded`). ``cirbench run`` checks every run of a command this way before the first one starts."""
        if self._checked is not None:
            return self._checked
        cfg = self.cfg
        mspec, dspec, option_sets = self.method_plan()
        split = dspec.resolve_split(cfg.split)
        dataset_options = resolve_options(dspec.options, cfg.dataset_options, dspec.name, f"dataset {dspec.name}")
        if len(dataset_options) != 1:
            raise CirbenchError("dataset options cannot be swept")
        mspec.load()  # a plugin that cannot be imported fails here, before any data or model is loaded
        dspec.load()
        preprocess_kind = cfg.preprocess or mspec.default_preprocess
        if preprocess_kind not in PREPROCESS_KINDS:
            raise UnknownNameError("preprocessing", preprocess_kind, PREPROCESS_KINDS)
        loaded = self.loaded
        data_key = (dspec.name, split, str(cfg.data_root), json_hash(dataset_options[0]), cfg.allow_missing)
        if data_key not in loaded.data:
            loaded.data[data_key] = load_eval_sets(dspec, split, cfg.data_root, dataset_options[0],
                                                   cfg.allow_missing)
        dataset, evalsets, set_counts = loaded.data[data_key]
        self._checked = _Checked(mspec, dspec, split, option_sets, dataset_options[0], dataset, evalsets, set_counts,
                                 preprocess_kind)
        return self._checked

    def _prepare(self) -> _Context:
        cfg, loaded = self.cfg, self.loaded
        ctx = self.check()
        mspec, dspec = ctx.mspec, ctx.dspec
        writer = ResultWriter(Path(cfg.output) / dspec.name / ctx.split, enabled=distributed.is_main())
        model_name, pretrained = choose_backbone(cfg, mspec, dspec)
        tensor_decoder()  # a bad CIRBENCH_IMAGE_DECODER fails here, not in a reader process
        device = str(distributed.init_from_env(cfg.device)) if distributed.launched_by_torchrun() else cfg.device
        bkey = backbone_key(model_name, pretrained, cfg.precision, device, cfg.seed)
        if bkey not in loaded.backbones:
            loaded.backbones.clear()  # one at a time on the device: methods with other backbones follow each other
            loaded.backbones[bkey] = load_backbone(model_name, pretrained, device=device, precision=cfg.precision,
                                                   seed=cfg.seed)
        backbone = loaded.backbones[bkey]
        self.backbone, self.device = backbone, backbone.device
        ckey = (str(cfg.cache_dir), cfg.use_cache, cfg.cache_identity)
        cache = loaded.caches.get(ckey) if loaded.keep_features else None
        if cache is None:
            cache = FeatureCache(Path(cfg.cache_dir) if cfg.cache_dir else None, enabled=cfg.use_cache,
                                 writer=distributed.is_main(), identity=cfg.cache_identity)
            if loaded.keep_features:
                loaded.caches[ckey] = cache
        backbone.feature_store = cache  # text rows methods keep (Backbone.encode_text_rows) follow --no-cache too
        return _Context(**vars(ctx), backbone=backbone, cache=cache, writer=writer,
                        preprocessor=backbone.preprocessor(ctx.preprocess_kind, cfg.max_image_pixels))

    def _evaluate(self, ctx: _Context, opts: dict[str, Any], time_origin: float) -> RunOutcome:
        """One option value: compose, rank, score every set; write the result and its predictions."""
        cfg = self.cfg
        stats_before = dict(ctx.cache.stats)  # the cache may serve earlier runs too: this run's hits and misses
        backbone_before = ctx.backbone.state_token()
        # each option value, and each method of a command, meets the same random state, whatever ran or loaded
        # before it: a value of a sweep gives what it gives run alone
        torch.manual_seed(cfg.seed)
        method = ctx.mspec.create(ctx.backbone, opts, ctx.dspec.name)
        label = run_label(cfg, ctx.mspec, opts, method.label_tag() if hasattr(method, "label_tag") else None)
        record = self._record(cfg, ctx.mspec, ctx.dspec, ctx.dataset, ctx.split, method, label, opts,
                              ctx.dataset_options, ctx.backbone, ctx.preprocessor)
        stem = ctx.writer.stem(label, ctx.backbone.slug, record)
        per_set, per_query, submissions, predictions = {}, {}, [], []
        counts: dict[str, Any] = {"queries": 0, "gallery": 0, "sets": {}}
        galleries: set[str] = set()
        for es in ctx.evalsets:
            counts["queries"] += len(es.queries)
            galleries.update(g.id for g in es.gallery)  # sets that share a gallery (domain pairs) count it once
            counts["sets"][es.name] = {"queries": len(es.queries), "gallery": len(es.gallery),
                                       **ctx.set_counts[es.name], **({"info": es.info} if es.info else {})}
            parts = []  # a set ranked in parts (a whole-gallery ranking too large at once): their per-query values
            for part, ranking in self._ranked_parts(ctx, es, method):
                query_metrics = None
                if es.hidden_targets:
                    if distributed.is_main():
                        submissions += ctx.dataset.write_submission(es, ranking, ctx.writer.submissions_dir(), stem)
                        dropped = ctx.set_counts[es.name]["queries_dropped"]
                        if dropped:
                            self.log(f"warning: {es.name}: the test-server files lack the {dropped} queries dropped "
                                     "for missing images (--allow-missing); the server expects every query")
                elif part is es:
                    per_set[es.name], query_metrics = _score_set(ctx.dataset, es, ranking)
                    if query_metrics is not None:
                        per_query[es.name] = query_metrics
                else:
                    query_metrics = ctx.dataset.per_query_metrics(part, ranking)
                    parts.append(query_metrics)
                predictions += _prediction_rows(part, ranking, cfg.save_topk, query_metrics, method.query_details)
                del ranking  # a part's ranking goes before the next one is made
            if parts:
                per_query[es.name] = joined = {m: torch.cat([torch.as_tensor(p[m]) for p in parts]) for m in parts[0]}
                per_set[es.name] = means(joined)
        counts["gallery"] = len(galleries)
        metrics = ctx.dataset.aggregate(per_set) if per_set else {}
        summary = method.summary() if hasattr(method, "summary") else {}
        if summary:
            record["method"]["summary"] = summary
        record.update({
            "counts": counts, "metrics": metrics, "per_set_metrics": per_set,
            "metrics_ci": bootstrap_ci(per_query, ctx.dataset.aggregate, cfg.bootstrap, seed=cfg.seed),
            "ci": {"method": "percentile bootstrap over queries", "replicates": cfg.bootstrap, "level": 0.95},
            "submissions": [str(p) for p in submissions],
            "wall_time_s": round(time.perf_counter() - time_origin, 3),
            "cache": {"enabled": ctx.cache.enabled, "identity": ctx.cache.identity,
                      **{k: v - stats_before.get(k, 0) for k, v in ctx.cache.stats.items()},
                      **({"write_error": ctx.cache.write_error} if ctx.cache.write_error else {})},
            "environment": environment_info(str(ctx.backbone.device)),
        })
        if ctx.backbone.state_token() != backbone_before:
            self.loaded.backbones.clear()  # no later run may use it
            raise CirbenchError(f"method '{ctx.mspec.name}' (plugin {ctx.mspec.plugin or '?'}) changed the backbone "
                                "in place (its weights, or hooks left on it), which the run's other methods and "
                                "benchmarks share: it must copy what it adapts; its result was not written")
        result_path, pred_path = ctx.writer.write(stem, record, predictions)
        note = None
        plain = ctx.writer.stem(label, ctx.backbone.slug)
        if stem != plain:
            note = (f"note: {ctx.writer.directory / plain}.json holds a result of another configuration and is kept; "
                    f"this run wrote {result_path}")
            self.log(note)
        return RunOutcome(label, result_path, pred_path, metrics, submissions, record, note)

    def _record(self, cfg, mspec, dspec, dataset, split, method, label, opts, dataset_opts, backbone,
                preprocessor) -> dict[str, Any]:
        """What determines this run's numbers (its fingerprint is computed from it) and how it ran."""
        from .plugins import get_registry

        sources = get_registry().source  # where the plugins' code came from: built-in, a version, a file's sha256
        record = {
            "created": utc_now(),
            "method": {"name": mspec.name, "plugin": mspec.plugin, "plugin_source": sources(mspec.plugin),
                       "label": label, "options": opts,
                       "files": path_option_digests(mspec.options, opts), "info": method.info()},
            "dataset": {"name": dspec.name, "plugin": dspec.plugin, "plugin_source": sources(dspec.plugin),
                        "split": split, "options": dataset_opts,
                        "files": path_option_digests(dspec.options, dataset_opts),
                        "data_root": str(dataset.data_root.resolve()), "data_root_given": dataset.data_root_given,
                        "annotations": annotation_checksums(dataset, split)},
            "backbone": backbone.identity(),
            "preprocess": pixels_identity(preprocessor, cfg.encode_path, backbone.device),
            "precision": backbone.precision,
            "seed": cfg.seed,
            "device": str(backbone.device),
            "world_size": distributed.world_size(),
            "retrieval": {"backend": cfg.retrieval_backend, "ties": "equal scores ordered by gallery position"},
            "predictions": {"top": "all" if cfg.save_topk is None else cfg.save_topk},
            "encode": {"path": resolve_path(cfg.encode_path, backbone.device), "requested_path": cfg.encode_path,
                       "jpeg_decoder": jpeg_decoder(cfg.encode_path, backbone.device),
                       "image_library": image_library(),
                       "batch_size": cfg.batch_size, "workers": cfg.workers,
                       "max_image_pixels": cfg.max_image_pixels},
        }
        record["fingerprint"] = run_fingerprint(record)
        return record

    def _stream_step(self, ctx: _Context, es: EvalSet) -> int:
        """How many queries of ``es`` are ranked and scored at a time: all of them, or, when their ranking would hold
        more than ``STREAM_ENTRIES`` entries (a whole-gallery ranking: domain conversion, PatternCom), as many as
        fit, where the dataset scores each query on its own ranking alone (``queries_score_apart``) and reports
        the means of those values. The rankings are the set's at once (a part of fewer queries than the ranking's
        own query chunk may round a score's last bit otherwise)."""
        n, width = len(es.queries), min(es.topk, len(es.gallery))
        if (es.hidden_targets or es.query_galleries or not getattr(ctx.dataset, "queries_score_apart", False)
                or type(ctx.dataset).metrics is not Dataset.metrics or any(q.candidates for q in es.queries)):
            return max(n, 1)
        return stream_step(n, width)

    def _ranked_parts(self, ctx: _Context, es: EvalSet, method) -> Iterator[tuple[EvalSet, Ranking]]:
        """The set's ranking: ``(es, ranking)``, or ``(part, its ranking)`` for consecutive parts of its queries
        (see :meth:`_stream_step`); the queries are composed once, before the first."""
        cfg, mspec, backbone, preprocessor, cache = self.cfg, ctx.mspec, ctx.backbone, ctx.preprocessor, ctx.cache
        refs = es.reference_images()
        # what a method sees: no targets nor extras that tell them; a query's own gallery (sorted: GeneCIS lists the
        # target first), no subset
        answers = set(getattr(ctx.dataset, "target_extras", ()))
        blind = [dataclasses.replace(q, targets=(), candidates=tuple(sorted(q.candidates or ()))
                                     if es.query_galleries else None,
                                     extra={k: v for k, v in q.extra.items() if k not in answers}) for q in es.queries]
        unit = getattr(method, "unit_features", True)
        # before any encoding: what a method fetches or generates per query set (captions, rewrites) fails fast
        method.prepare(QuerySet(ctx.dspec.name, ctx.split, es.name, blind, {r.id: r for r in refs},
                                Path(cfg.cache_dir) if cfg.cache_dir else None, cfg.progress,
                                {g.id: g for g in es.gallery}))
        gkey = self._feature_key(backbone, preprocessor, method.gallery_feature_kind())
        gallery = self._features(cache, gkey, es.gallery, method.encode_gallery, preprocessor, f"{es.name}: gallery")
        prepared_gallery = method.prepare_gallery([g.id for g in es.gallery], gallery)
        if prepared_gallery is not gallery:
            width = prepared_gallery.shape[-1] if isinstance(prepared_gallery, torch.Tensor) else 0
            gallery = check_composed(prepared_gallery, len(es.gallery), width, mspec, hook="prepare_gallery",
                                     unit=unit)
        rkind = method.reference_feature_kind()
        if rkind is None:  # the method reads its references itself (in prepare)
            ref_feats = torch.empty(len(refs), 0)
        else:
            rkey = self._feature_key(backbone, preprocessor, rkind)
            ref_feats = self._features(cache, rkey, refs, method.encode_references, preprocessor,
                                       f"{es.name}: references")
        with torch.enable_grad():  # a method may optimise something per reference (SEARLE-OTI)
            prepared = method.prepare_references([r.id for r in refs], ref_feats)
        if not isinstance(prepared, torch.Tensor) or prepared.shape[:1] != (len(refs),):
            got = tuple(prepared.shape) if isinstance(prepared, torch.Tensor) else type(prepared).__name__
            raise CirbenchError(f"method '{mspec.name}' (plugin {mspec.plugin or '?'}): prepare_references returned "
                                f"{got}, not one row for each of the {len(refs)} reference images")
        ref_feats = prepared.detach()
        dim = gallery.shape[-1] if gallery.ndim == 2 else 0
        queries = self._compose(es.name, blind, method, mspec, backbone, refs, ref_feats, dim, unit)
        gallery_dev = gallery.to(backbone.device)  # once: every ranking below reuses it
        with torch.no_grad():
            final = method.finalize_queries(blind, queries, gallery_dev)
        if final is not queries:  # a method that adjusts its queries against the gallery (LDRE on CIRCO)
            queries = check_composed(final, len(blind), dim, mspec, getattr(method, "query_vectors", 1),
                                     "finalize_queries", unit=unit)
        combine = method.combine_scores if queries.ndim == 3 else None
        gindex = {g.id: i for i, g in enumerate(es.gallery)}
        exclude = None
        if es.exclude_reference:
            exclude = torch.tensor([gindex.get(q.reference, -1) for q in es.queries], dtype=torch.long)
        backend = cfg.retrieval_backend
        if combine is not None and backend == "faiss":
            raise CirbenchError(f"method '{mspec.name}' scores {queries.shape[1]} vectors per query, which only the "
                                "torch backend ranks: use --retrieval torch (or auto)")
        ids = [q.id for q in es.queries]
        if es.query_galleries:  # each query ranks its own small gallery (GeneCIS)
            cand_idx = [[gindex[c] for c in dict.fromkeys(q.candidates or ()) if c in gindex] for q in es.queries]
            _, idx, scores = rank_candidates(queries, gallery_dev, cand_idx, combine=combine, with_scores=True)
            yield es, Ranking(ids, [g.id for g in es.gallery], idx, scores)
            return
        step = self._stream_step(ctx, es)
        if step < len(es.queries):  # one backend for every part, as for the whole set at once
            backend = choose_backend(backend, len(es.queries), gallery_dev)
        for s in range(0, max(len(es.queries), 1), step):  # a set without queries is still ranked (empty), once
            part = es if step >= len(es.queries) else dataclasses.replace(es, queries=es.queries[s : s + step])
            idx, scores = rank(queries[s : s + step], gallery_dev, es.topk, backend=backend, combine=combine,
                               exclude=None if exclude is None else exclude[s : s + step])
            candidate_order = None
            if any(q.candidates for q in part.queries):  # never ranked in parts
                cand_idx = [[gindex[c] for c in dict.fromkeys(q.candidates or ()) if c in gindex
                             and not (es.exclude_reference and c == q.reference)] for q in es.queries]
                ordered = rank_candidates(queries, gallery_dev, cand_idx, combine=combine)
                candidate_order = [[es.gallery[i].id for i in row] for row in ordered]
            yield part, Ranking(ids[s : s + step], [g.id for g in es.gallery], idx, scores, candidate_order)
            del idx, scores  # one part's ranking alive at a time

    def _compose(self, name: str, blind: list[Query], method, mspec, backbone, refs, ref_feats, dim,
                 unit: bool) -> torch.Tensor:
        """The query features of the set's queries as the method sees them (``blind``: no targets)."""
        ref_pos = {r.id: i for i, r in enumerate(refs)}
        out = []
        batch = max(1, (self.cfg.batch_size or 64) * 4)
        with tqdm(total=len(blind), desc=f"{name}: queries", unit="q", disable=not self.cfg.progress,
                  leave=False) as bar:
            for s in range(0, len(blind), batch):
                chunk: list[Query] = blind[s : s + batch]
                r = ref_feats[[ref_pos[q.reference] for q in chunk]].to(backbone.device)
                with torch.no_grad():
                    out.append(check_composed(method.compose(r, chunk), len(chunk), dim, mspec,
                                              getattr(method, "query_vectors", 1), unit=unit))
                bar.update(len(chunk))
        return torch.cat(out) if out else torch.empty(0, dim)


def _score_set(dataset, es: EvalSet, ranking: Ranking) -> tuple[dict[str, float], dict[str, Any] | None]:
    """The set's metrics, and its per-query metrics when the dataset provides them."""
    try:
        per_query = dataset.per_query_metrics(es, ranking)
    except NotImplementedError:
        return dataset.metrics(es, ranking), None
    metrics = dataset.metrics(es, ranking) if type(dataset).metrics is not Dataset.metrics else means(per_query)
    return metrics, per_query


def _prediction_rows(es: EvalSet, ranking: Ranking, save_topk: int | None, per_query: dict[str, Any] | None = None,
                     details: Callable[[Query], dict[str, Any] | None] | None = None) -> list[dict[str, Any]]:
    width = ranking.indices.shape[1]
    k = width if save_topk is None else min(save_topk, width)
    table = {m: (v.tolist() if hasattr(v, "tolist") else list(v)) for m, v in (per_query or {}).items()}
    rows = []
    for qi, q in enumerate(es.queries):
        top = ranking.top_ids(qi, k)
        row: dict[str, Any] = {"set": es.name, "query": q.id, "reference": q.reference, "top": top,
                               "scores": [round(s, 6) for s in ranking.scores[qi, : len(top)].tolist()]}
        if q.targets:
            row["targets"] = list(q.targets)
        if ranking.candidate_order is not None:
            row["subset"] = ranking.candidate_order[qi]
        if table:
            row["metrics"] = {m: round(v[qi], 4) for m, v in table.items() if v[qi] == v[qi]}  # nan: not counted
        extra = details(q) if details is not None else None
        if extra:
            row["method"] = extra
        rows.append(row)
    return rows


def load_eval_sets(dspec, split: str, data_root, options: dict[str, Any], allow_missing: bool = False,
                   consistent: bool = True):
    """The dataset, its evaluation sets of ``split`` read from ``data_root`` (default: the dataset's), and what
    each set dropped for missing images; CirbenchError for bad annotations, sets that cannot be scored as built
    (:meth:`EvalSet.inconsistency`; ``consistent=False`` leaves that to the caller), missing images (unless
    ``allow_missing``) or no query left."""
    dataset = dspec.create(data_root, options)
    evalsets = dataset.load(split)
    if consistent:
        dataset.refuse_inconsistent(split, evalsets)
    hint = dataset.root_hint() if hasattr(dataset, "root_hint") else None
    set_counts = {es.name: drop_missing(es, allow_missing, hint) for es in evalsets}
    if not any(es.queries for es in evalsets):
        dropped = sum(c["queries_dropped"] for c in set_counts.values())
        raise CirbenchError(f"{dspec.name}/{split}: no query is left to score ({dropped} dropped because their "
                            "reference or target image is missing)")
    return dataset, evalsets, set_counts


def evaluate(cfg: RunConfig, registry: Registry | None = None, loaded: Loaded | None = None) -> list[RunOutcome]:
    """Run one ``cirbench run`` configuration; returns one outcome per swept option value. ``loaded``: what
    earlier runs of the same command loaded (see :class:`Loaded`)."""
    return Evaluator(cfg, registry, loaded=loaded).run()
