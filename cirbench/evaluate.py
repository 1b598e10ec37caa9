"""The one evaluation loop: every method on every dataset goes through :func:`evaluate`.

load split -> build backbone -> encode gallery (cached) -> encode references (cached) -> compose
queries -> rank (chunked) -> dataset metrics / submission files -> result file + predictions.

The loop knows no method or dataset by name: it talks to them only through
:class:`cirbench.method.Method` and :class:`cirbench.dataset.Dataset`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import distributed
from .backbones import Backbone, load_backbone
from .errors import CirbenchError, ImageError, UnknownNameError
from .features import FeatureCache, encode_images
from .images import describe_missing, find_missing
from .plugins import Registry, get_registry
from .preprocess import PREPROCESS_KINDS, Preprocessor
from .results import (
    PREDICTIONS_SUFFIX,
    RESULT_SUFFIX,
    SUBMISSIONS_DIR,
    ensure_writable,
    environment_info,
    result_stem,
    utc_now,
    write_predictions,
    write_result,
)
from .retrieval import Ranking, rank, rank_candidates
from .types import EvalSet, MethodSpec, Query, resolve_options

DEFAULT_BACKBONE = ("ViT-L-14", "openai")


@dataclass
class RunConfig:
    """Everything ``cirbench run`` is asked to do. ``None`` means "the plugin's default"."""

    method: str
    dataset: str
    split: str | None = None
    backbone: str | None = None
    pretrained: str | None = None
    preprocess: str | None = None
    precision: str = "auto"
    device: str = "auto"
    data_root: str | Path | None = None
    output: str | Path = "results"
    cache_dir: str | Path | None = None
    use_cache: bool = True
    method_options: dict[str, str] = field(default_factory=dict)
    dataset_options: dict[str, str] = field(default_factory=dict)
    label: str | None = None
    seed: int = 0
    batch_size: int = 64
    workers: int | None = None
    allow_missing: bool = False
    retrieval_backend: str = "auto"
    save_topk: int = 50
    encode_path: str = "auto"  # auto | workers | batched (see cirbench.features.encode_images)
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


def _default_workers() -> int:
    return min(8, os.cpu_count() or 1)


def choose_backbone(cfg: RunConfig, mspec: MethodSpec, dspec) -> tuple[str, str]:
    """The run's backbone wins, then the dataset's (embedded benchmarks), then the method's, then ViT-L-14."""
    if cfg.backbone:
        return cfg.backbone, cfg.pretrained or ("none" if cfg.backbone.endswith(".json") else "openai")
    default = dspec.default_backbone or mspec.default_backbone or DEFAULT_BACKBONE
    return default[0], cfg.pretrained or default[1]


def _run_label(cfg: RunConfig, mspec: MethodSpec, opts: dict, swept: list[str]) -> str:
    base = cfg.label or mspec.name
    if swept:
        base += "@" + ",".join(f"{k}={opts[k]}" for k in swept)
    return base


def _drop_missing(es: EvalSet, allow_missing: bool) -> dict[str, int]:
    """Check image files; stop with the list of missing ones, or drop them with --allow-missing."""
    missing = find_missing(es.images.values())
    counts = {"missing_images": len(missing), "queries_dropped": 0, "gallery_dropped": 0}
    if not missing:
        return counts
    if not allow_missing:
        raise ImageError(f"{es.name}: " + describe_missing(missing, len(es.images))
                         + " (pass --allow-missing to skip them)")
    gone = {m.id for m in missing}
    n_q, n_g = len(es.queries), len(es.gallery)
    es.gallery = [g for g in es.gallery if g.id not in gone]
    es.queries = [q for q in es.queries if q.reference not in gone]
    for image_id in gone:
        es.images.pop(image_id, None)
    counts["queries_dropped"] = n_q - len(es.queries)
    counts["gallery_dropped"] = n_g - len(es.gallery)
    return counts


class Evaluator:
    """Runs :class:`RunConfig` s; holds the backbone and feature cache so sweeps encode only once."""

    def __init__(self, cfg: RunConfig, registry: Registry | None = None, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.registry = registry or get_registry()
        self.log = log

    def _feature_key(self, backbone: Backbone, preprocessor: Preprocessor, kind: dict) -> dict:
        return {"format": 1, "backbone": backbone.identity(), "preprocess": preprocessor.identity(),
                "precision": backbone.precision, "feature": kind}

    def _features(self, cache: FeatureCache, key: dict, images, encode, preprocessor, desc: str) -> torch.Tensor:
        cfg = self.cfg
        workers = cfg.workers if cfg.workers is not None else _default_workers()

        def compute(todo):
            # under torchrun every rank encodes a strided shard; the rows are gathered back in order
            mine = distributed.shard(list(todo))
            local = encode_images(mine, encode, preprocessor, batch_size=cfg.batch_size, workers=workers,
                                  desc=desc, progress=cfg.progress and distributed.is_main(),
                                  pin_memory=self.device.type == "cuda", path=cfg.encode_path, device=self.device)
            if not mine:
                local = torch.empty(0)
            return distributed.gather_sharded_rows(local, len(todo))

        return cache.get_or_compute(key, images, compute)

    def run(self) -> list[RunOutcome]:
        cfg = self.cfg
        start = time.perf_counter()
        mspec = self.registry.method(cfg.method)
        dspec = self.registry.dataset(cfg.dataset)
        split = cfg.split or dspec.default_split or dspec.splits[0]
        if split not in dspec.splits:
            raise UnknownNameError(f"split of {dspec.name}", split, dspec.splits)
        option_sets = resolve_options(mspec.options, cfg.method_options, dspec.name, f"method {mspec.name}")
        swept = [k for k in (option_sets[0] if option_sets else {}) if len({str(o[k]) for o in option_sets}) > 1]
        dataset_options = resolve_options(dspec.options, cfg.dataset_options, dspec.name, f"dataset {dspec.name}")
        if len(dataset_options) != 1:
            raise CirbenchError("dataset options cannot be swept")
        preprocess_kind = cfg.preprocess or mspec.default_preprocess
        if preprocess_kind not in PREPROCESS_KINDS:
            raise UnknownNameError("preprocessing", preprocess_kind, PREPROCESS_KINDS)

        out_dir = ensure_writable(Path(cfg.output) / dspec.name / split)

        data_root = cfg.data_root or dspec.default_data_root
        dataset = dspec.load()(Path(data_root) if data_root else None, dataset_options[0])
        evalsets = dataset.load(split)
        set_counts = {es.name: _drop_missing(es, cfg.allow_missing) for es in evalsets}

        model_name, pretrained = choose_backbone(cfg, mspec, dspec)
        torch.manual_seed(cfg.seed)
        device = str(distributed.init_from_env(cfg.device)) if distributed.launched_by_torchrun() else cfg.device
        backbone = load_backbone(model_name, pretrained, device=device, precision=cfg.precision, seed=cfg.seed)
        self.device = backbone.device
        preprocessor = backbone.preprocessor(preprocess_kind)
        cache = FeatureCache(Path(cfg.cache_dir) if cfg.cache_dir else None, enabled=cfg.use_cache,
                             writer=distributed.is_main())
        main = distributed.is_main()  # under torchrun only rank 0 writes cache, results and submissions
        factory = mspec.load()

        outcomes = []
        for opts in option_sets:
            t0 = time.perf_counter()
            method = factory(backbone, opts, dspec.name)
            label = _run_label(cfg, mspec, opts, swept)
            stem = result_stem(label, backbone.slug)
            per_set: dict[str, dict[str, float]] = {}
            submissions: list[Path] = []
            predictions: list[dict[str, Any]] = []
            counts: dict[str, Any] = {"queries": 0, "gallery": 0, "sets": {}}
            for es in evalsets:
                ranking = self._rank_set(es, method, backbone, preprocessor, cache)
                n_gallery = len(es.gallery)
                counts["queries"] += len(es.queries)
                counts["gallery"] += n_gallery
                counts["sets"][es.name] = {"queries": len(es.queries), "gallery": n_gallery, **set_counts[es.name]}
                if es.hidden_targets:
                    if main:
                        sub_dir = out_dir / SUBMISSIONS_DIR
                        sub_dir.mkdir(parents=True, exist_ok=True)
                        submissions += dataset.write_submission(es, ranking, sub_dir, stem)
                else:
                    per_set[es.name] = dataset.metrics(es, ranking)
                k = min(cfg.save_topk, ranking.indices.shape[1])
                for qi, q in enumerate(es.queries):
                    row = {"set": es.name, "query": q.id, "reference": q.reference,
                           "top": ranking.top_ids(qi, k), "scores": [round(s, 6) for s in ranking.scores[qi, :k].tolist()]}
                    if q.targets:
                        row["targets"] = list(q.targets)
                    if ranking.candidate_order is not None:
                        row["subset"] = ranking.candidate_order[qi]
                    predictions.append(row)
            metrics = dataset.aggregate(per_set) if per_set else {}
            record = {
                "created": utc_now(),
                "method": {"name": mspec.name, "plugin": mspec.plugin, "label": label, "options": opts,
                           "info": method.info()},
                "dataset": {"name": dspec.name, "plugin": dspec.plugin, "split": split,
                            "options": dataset_options[0], "data_root": str(dataset.data_root.resolve())},
                "backbone": backbone.identity(),
                "preprocess": preprocessor.identity(),
                "precision": backbone.precision,
                "seed": cfg.seed,
                "device": str(backbone.device),
                "world_size": distributed.world_size(),
                "counts": counts,
                "metrics": metrics,
                "per_set_metrics": per_set,
                "submissions": [str(p) for p in submissions],
                "wall_time_s": round(time.perf_counter() - (start if not outcomes else t0), 3),
                "cache": {"enabled": cache.enabled, **cache.stats},
                "environment": environment_info(str(backbone.device)),
            }
            result_path = out_dir / (stem + RESULT_SUFFIX)
            pred_path = out_dir / (stem + PREDICTIONS_SUFFIX)
            if main:
                write_predictions(pred_path, predictions)
                write_result(result_path, record)
            outcomes.append(RunOutcome(label, result_path, pred_path, metrics, submissions, record))
        return outcomes

    def _rank_set(self, es: EvalSet, method, backbone: Backbone, preprocessor: Preprocessor,
                  cache: FeatureCache) -> Ranking:
        cfg = self.cfg
        gkey = self._feature_key(backbone, preprocessor, method.gallery_feature_kind())
        gallery = self._features(cache, gkey, es.gallery, method.encode_gallery, preprocessor,
                                 f"{es.name}: gallery")
        refs = es.reference_images()
        rkey = self._feature_key(backbone, preprocessor, method.reference_feature_kind())
        ref_feats = self._features(cache, rkey, refs, method.encode_references, preprocessor,
                                   f"{es.name}: references")
        ref_pos = {r.id: i for i, r in enumerate(refs)}
        query_feats = []
        batch = max(1, cfg.batch_size * 4)
        with tqdm(total=len(es.queries), desc=f"{es.name}: queries", unit="q", disable=not cfg.progress,
                  leave=False) as bar:
            for s in range(0, len(es.queries), batch):
                chunk: list[Query] = es.queries[s : s + batch]
                r = ref_feats[[ref_pos[q.reference] for q in chunk]].to(backbone.device)
                with torch.no_grad():
                    query_feats.append(method.compose(r, chunk).float())
                bar.update(len(chunk))
        queries = torch.cat(query_feats) if query_feats else torch.empty(0, gallery.shape[-1])
        gallery_dev = gallery.to(backbone.device)
        gindex = {g.id: i for i, g in enumerate(es.gallery)}
        exclude = None
        if es.exclude_reference:
            exclude = torch.tensor([gindex.get(q.reference, -1) for q in es.queries], dtype=torch.long)
        idx, scores = rank(queries, gallery_dev, es.topk, exclude=exclude, backend=cfg.retrieval_backend)
        candidate_order = None
        if any(q.candidates for q in es.queries):
            cand_idx = [[gindex[c] for c in (q.candidates or ()) if c in gindex
                         and not (es.exclude_reference and c == q.reference)] for q in es.queries]
            ordered = rank_candidates(queries, gallery_dev, cand_idx)
            candidate_order = [[es.gallery[i].id for i in row] for row in ordered]
        return Ranking([q.id for q in es.queries], [g.id for g in es.gallery], idx, scores, candidate_order)


def evaluate(cfg: RunConfig, registry: Registry | None = None) -> list[RunOutcome]:
    """Run one ``cirbench run`` configuration; returns one outcome per swept option value."""
    return Evaluator(cfg, registry).run()
