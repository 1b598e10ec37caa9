"""Testing helpers for plugin authors (and cirbench's own tests).

Installed as a pytest plugin (entry point ``pytest11``), so a plugin's test suite gets these fixtures with no
set-up:

* ``cirbench_tiny_config``: path to a tiny open_clip model config (``--backbone PATH --pretrained none``
  builds a random, fast model; no download);
* ``cirbench_toy_root``: a tiny composed-retrieval dataset on disk (coloured squares, "make it <colour>");
* ``cirbench_register``: ``cirbench_register(plugin, name)`` registers an in-process plugin for the current
  test only (the registry is reset afterwards);
* ``cirbench_toy``: registers the toy dataset plugin (dataset ``toy``) for the test and returns the registry.

Outside pytest: :func:`write_tiny_config`, :func:`write_toy_dataset`, :func:`registered` and
:class:`ToyDatasetPlugin`. :func:`check_method` checks a method plugin against what the loop asks of one, in a
single call; :func:`train_for_check` first trains a trainable one briefly (on :func:`write_toy_corpus`), for the
checkpoint to check it with. Importing this module does not import torch.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

try:
    import pytest
except ImportError:  # `cirbench check` runs check_method without a test environment: no fixtures then
    pytest = None  # type: ignore[assignment]

from .dataset import Dataset
from .hookspecs import hookimpl
from .types import DatasetSpec, EvalSet, OptionSpec, Query

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TOY_COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}


def write_tiny_config(folder: Path, name: str = "cirbench-tiny-test") -> Path:
    """Write the tiny open_clip config as ``<folder>/<name>.json`` (the model is registered under ``name``)."""
    path = Path(folder) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(TINY_CLIP))
    return path


def write_toy_dataset(root: Path) -> Path:
    """Twelve coloured images (three per colour, slightly different sizes) and twelve queries "make it <next
    colour>" whose targets are the three images of that colour; returns ``root``."""
    from PIL import Image

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    items = []
    for i, (cname, rgb) in enumerate(TOY_COLOURS.items()):
        for j in range(3):
            name = f"img_{cname}_{j}.png"
            Image.new("RGB", (36 + 4 * j, 28 + 2 * i), rgb).save(root / "images" / name)
            items.append((name, cname))
    colours = list(TOY_COLOURS)
    queries = []
    for qi, (name, cname) in enumerate(items):
        target = colours[(colours.index(cname) + 1) % len(colours)]
        queries.append({"id": str(qi), "reference": name, "text": f"make it {target}",
                        "targets": [n for n, c in items if c == target]})
    (root / "queries.json").write_text(json.dumps({"gallery": [n for n, _ in items], "queries": queries}))
    return root


class ToyDataset(Dataset):
    """The toy dataset: one evaluation set, reference excluded (CIRR-style), R@1/5 and mAP@5."""

    def load(self, split: str) -> list[EvalSet]:
        self.check_split(split)
        data = self.read_json(self.data_root / "queries.json")
        images = {n: self.image(n, Path("images") / n) for n in data["gallery"]}
        hidden = split in self.hidden_splits
        queries = [Query(q["id"], q["reference"], (q["text"],), () if hidden else tuple(q["targets"]))
                   for q in data["queries"]]
        return [EvalSet("all", list(images.values()), queries, dict(images), exclude_reference=True,
                        hidden_targets=hidden, topk=10)]

    def annotation_files(self, split: str) -> list[Path]:
        return [self.data_root / "queries.json"]

    def per_query_metrics(self, evalset: EvalSet, ranking: Any) -> dict[str, Any]:
        from .metrics import ap_per_query, hits_matrix, recall_per_query

        hits = hits_matrix(ranking.indices, ranking.target_positions([q.targets for q in evalset.queries]))
        out = {f"R@{k}": v for k, v in recall_per_query(hits, (1, 5)).items()}
        relevant = [len(q.targets) for q in evalset.queries]
        out.update({f"mAP@{k}": v for k, v in ap_per_query(hits, relevant, (5,)).items()})
        return out


class ToyDatasetPlugin:
    """A plugin registering the toy dataset as ``toy`` (splits ``val`` and hidden ``test``)."""

    @hookimpl
    def register_datasets(self, register):
        register(DatasetSpec(name="toy", description="tiny test dataset (cirbench.testing)", factory=ToyDataset,
                             splits=("val", "test"), hidden_splits=("test",), main_metric="R@1",
                             options=(OptionSpec("unused", "an option for tests", "int", 0),)))


@contextlib.contextmanager
def registered(plugin: Any, name: str) -> Iterator[Any]:
    """Register ``plugin`` in the process-wide registry for the duration of the block; yields the registry."""
    from . import plugins

    reg = plugins.get_registry()
    reg.register_plugin(plugin, name=name)
    try:
        yield reg
    finally:
        plugins.reset_registry()


# what train_for_check checks (``cirbench check --train`` prints it before CONTRACT_CHECKS)
TRAINING_CHECK = "trains: two steps on a toy corpus with the tiny CLIP write a checkpoint"
# the corpus columns cirbench's built-in trainers read besides image and caption (write_toy_corpus fills them)
TOY_CORPUS_COLUMNS = ("masked_caption", "subject", "attribute", "reference_caption", "conditioning_caption",
                      "target_caption", "relative_caption", "target")


def write_toy_corpus(root: Path, columns: tuple[str, ...] = ()) -> Path:
    """A tiny training corpus, ``<root>/pairs.csv``: the toy dataset's twelve images captioned "a <colour> square",
    with the columns of :data:`TOY_CORPUS_COLUMNS` (the caption with its object masked, its subject and attribute,
    a text triplet "a <colour> square" / "make it <next colour>" / "a <next colour> square", an image triplet: the
    image, "make it <next colour>" and an image of that colour as ``target``) and each other of ``columns`` (a
    plugin's own, holding the caption); returns the CSV's path."""
    import csv

    root = Path(root)
    write_toy_dataset(root)
    colours = list(TOY_COLOURS)
    rows = []
    for i, colour in enumerate(colours):
        after = colours[(i + 1) % len(colours)]
        for j in range(3):
            caption = f"a {colour} square"
            rows.append({"image": f"images/img_{colour}_{j}.png", "caption": caption,
                         "masked_caption": f"a {colour} <|replace|>", "subject": "square", "attribute": colour,
                         "reference_caption": caption, "conditioning_caption": f"make it {after}",
                         "target_caption": f"a {after} square", "relative_caption": f"make it {after}",
                         "target": f"images/img_{after}_{j}.png", **{c: caption for c in columns
                                                                   if c not in TOY_CORPUS_COLUMNS}})
    path = root / "pairs.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def train_for_check(method: str, folder: Path, options: dict[str, Any] | None = None,
                    registry: Any = None) -> Path:
    """Train a trainable method for two steps of four samples on :func:`write_toy_corpus` with the tiny CLIP (the
    backbone :func:`check_method` uses in the same ``folder``), on the CPU in fp32, its other training settings its
    own defaults (warm-ups off); returns the checkpoint folder, for ``check_method(..., {"checkpoint": it})``.
    ``options`` are the method's training options as the command line gives them (``{"lora_rank": "4"}``)."""
    from . import plugins
    from .backbones import load_backbone
    from .corpora import open_corpus
    from .errors import CirbenchError
    from .training import TrainConfig, train
    from .types import resolve_options

    reg = registry or plugins.get_registry()
    spec = reg.method(method)
    if not spec.trainer:
        raise CirbenchError(f"method '{method}' is not trainable: --train has nothing to train")
    if "checkpoint" not in {o.name for o in spec.options}:
        raise CirbenchError(f"method '{method}' has no 'checkpoint' option to evaluate trained weights with")
    trainer_cls = spec.load_trainer()
    (opts,) = resolve_options(spec.train_options, dict(options or {}), None, f"training of {method}")
    folder = Path(folder)
    columns = (*trainer_cls.caption_columns[:1], *trainer_cls.required_columns)
    corpus = open_corpus(write_toy_corpus(folder / "corpus", columns), images=trainer_cls.needs_images,
                         captions=trainer_cls.needs_captions, caption_columns=trainer_cls.caption_columns,
                         required_columns=trainer_cls.required_columns, image_columns=trainer_cls.image_columns)
    backbone = load_backbone(str(write_tiny_config(folder / "cfg")), "none", device="cpu", precision="fp32", seed=0,
                             training=True)
    trainable = trainer_cls(backbone, opts)
    trainable.name = spec.name
    own = {k: v for k, v in trainer_cls.defaults.items()
           if k not in ("epochs", "max_steps", "batch_size", "train_num_samples", "warmup_steps", "warmup_epochs")}
    cfg = TrainConfig(output=folder / "trained", max_steps=2, batch_size=4, workers=0, progress=False, device="cpu",
                      precision="fp32", save_every=2, resume=False, **own)
    return train(trainable, corpus, cfg)


# what check_method checks, in order (``cirbench check`` prints each as it holds)
CONTRACT_CHECKS = (
    "runs through the loop: valid query features (shape, finite, unit norm), the shared backbone unchanged",
    "deterministic: a second run gives the same metrics and rankings",
    "shares a command: beside another method, each gives what it gives alone",
    "batch-independent: composed four queries at a time (--batch-size 1), it scores as in one batch",
)


def check_method(method: str, folder: Path, options: dict[str, Any] | None = None, registry: Any = None,
                 report: Callable[[str], None] | None = None) -> list:
    """What cirbench asks of a method plugin, checked on the toy dataset with the tiny backbone (in ``folder``):

    * it runs through the loop, which checks what it returns (shapes, finite and L2-normalised features) and
      that it leaves the shared backbone as it found it;
    * it is deterministic: a second run gives the same metrics and the same rankings;
    * it shares well: run after and before another method in one command (one backbone, features kept in
      memory), it gives what it gives alone, and the other method gives what it gives alone;
    * it is batch-independent: composed four queries at a time (``--batch-size 1``), it scores as in one batch.

    ``options`` are the method's options (a checkpoint, say), as in ``RunConfig.method_options``; ``report`` is
    called with each of :data:`CONTRACT_CHECKS` as it holds. Returns the first run's outcomes; raises
    AssertionError saying what does not hold (or the loop's CirbenchError, or the method's own exception)."""
    import dataclasses

    from . import plugins
    from .evaluate import Evaluator, Loaded, RunConfig
    from .results import read_predictions_of

    reg = registry or plugins.get_registry()
    if "toy" not in reg.datasets:
        reg.register_plugin(ToyDatasetPlugin(), name="toy")
    folder = Path(folder)
    cfg = RunConfig(method=method, dataset="toy", split="val", backbone=str(write_tiny_config(folder / "cfg")),
                    pretrained="none", data_root=write_toy_dataset(folder / "toy"), output=folder / "alone",
                    use_cache=False, method_options=dict(options or {}), workers=0, bootstrap=0, progress=False)
    other = dataclasses.replace(cfg, method="text-only" if method != "text-only" else "image-only",
                                method_options={})  # text-only reads the backbone's texts and the gallery

    def seen(outcomes) -> list[tuple[str, dict, list]]:
        return [(o.label, o.metrics, [r.get("top") for r in read_predictions_of(o.result_path)]) for o in outcomes]

    def held(number: int) -> None:
        if report is not None:
            report(CONTRACT_CHECKS[number])

    alone = Evaluator(cfg, reg).run()
    expected = seen(alone)
    held(0)
    again = Evaluator(dataclasses.replace(cfg, output=folder / "again"), reg).run()
    if seen(again) != expected:
        raise AssertionError(f"method '{method}' is not deterministic: a second run ranks differently")
    held(1)
    other_alone = seen(Evaluator(dataclasses.replace(other, output=folder / "other"), reg).run())
    loaded = Loaded()
    runs = [dataclasses.replace(c, output=folder / "together" / str(i)) for i, c in enumerate((other, cfg, other))]
    before, mine, after = (seen(Evaluator(c, reg, loaded=loaded).run()) for c in runs)
    if mine != expected:
        raise AssertionError(f"method '{method}' gives other numbers when it follows method '{other.method}' in one "
                             "command (sharing the backbone and features)")
    if not before == after == other_alone:
        raise AssertionError(f"method '{other.method}' gives other numbers after method '{method}' ran in the same "
                             "command: it changed something they share")
    held(2)
    # a query's features must depend on it alone, not on the queries composed with it (a batch statistic, a
    # chunk's first row): the loop composes --batch-size x 4 queries at a time, so the batch size must not matter.
    # Compared by each query's ranked scores (sorted, so that near-ties between look-alike images may swap)
    small = Evaluator(dataclasses.replace(cfg, output=folder / "small-batches", batch_size=1), reg).run()

    def scores(outcome) -> list[list[float]]:
        return [r.get("scores") or [] for r in read_predictions_of(outcome.result_path)]

    for one, few in zip(alone, small, strict=True):
        worst = max((abs(a - b) for x, y in zip(scores(one), scores(few), strict=True)
                     for a, b in zip(x, y, strict=True)), default=0.0)
        if worst >= 1e-4:
            raise AssertionError(f"method '{method}' ({one.label}) ranks with other scores when its queries are "
                                 f"composed four at a time (a score moved by {worst:.4f}): a query's features depend "
                                 "on the others composed with it")
    held(3)
    return alone


# what check_dataset checks, in order (``cirbench check --dataset`` prints each as it holds)
DATASET_CHECKS = (
    "loads: unique query and gallery ids; every reference, target and candidate an image the set knows; no "
    "extra a method sees names a target",
    "a perfect ranking (each query's targets first) scores 100 on the main metric",
    "a ranking with the targets last scores lower: the metrics read the ranking",
    "per-query metrics: one value per query, and their means are the set's metrics (where the dataset says its "
    "queries score apart, each query's values the same when a part of the queries is scored alone)",
)


def _extra_naming_a_target(query: Any, declared: set[str]) -> str | None:
    """The first key of ``query.extra`` not in ``declared`` whose value (an id, or a list of ids) is one of the
    query's targets: what a method would read the answer from."""
    targets = set(query.targets)
    for key, value in (query.extra or {}).items():
        if key in declared:
            continue
        values = value if isinstance(value, (list, tuple, set)) else [value]
        if any(isinstance(v, (str, int)) and str(v) in targets for v in values):
            return str(key)
    return None


def _values(per_query: Any) -> list[float]:
    """One metric's per-query values (a tensor or a sequence) as a list."""
    return list(per_query.tolist() if hasattr(per_query, "tolist") else per_query)


def _even_from(start: int, qi: int) -> bool:
    """Whether query ``qi`` of a part starting at ``start`` is an even query of its set (its targets first)."""
    return (qi + start) % 2 == 0


def _oracle(es: EvalSet, targets_first: Callable[[int], bool]) -> Any:
    """The ranking a perfect method would return for ``es`` (its targets first, the rest in gallery order), or for
    the queries where ``targets_first(index)`` is false the worst one (targets last), laid out as the loop lays
    out its rankings: the set's top-k over the gallery less an excluded reference, each query's own gallery
    ranked whole, and CIRR-style candidate subsets ranked whole."""
    import torch

    from .retrieval import Ranking

    gindex = {g.id: i for i, g in enumerate(es.gallery)}
    size = len(es.gallery)

    def order(pool: torch.Tensor, targets: list[int], first: bool) -> torch.Tensor:
        """``pool`` (gallery positions, ascending) with ``targets`` first (or last), each part in gallery order."""
        hit = torch.zeros(size, dtype=torch.bool)
        hit[targets] = True
        hits, rest = pool[hit[pool]], pool[~hit[pool]]
        return torch.cat([hits, rest] if first else [rest, hits])

    rows: list[torch.Tensor] = []
    subsets: list[list[str]] | None = [] if any(q.candidates for q in es.queries) and not es.query_galleries else None
    everything = torch.arange(size)
    for qi, q in enumerate(es.queries):
        first = targets_first(qi)
        targets = [gindex[t] for t in q.targets if t in gindex]
        skip = gindex.get(q.reference, -1) if es.exclude_reference else -1
        if es.query_galleries:
            pool = torch.tensor(sorted({gindex[c] for c in q.candidates or () if c in gindex}), dtype=torch.long)
            rows.append(order(pool, targets, first))
            continue
        rows.append(order(everything[everything != skip], targets, first)[:es.topk])
        if subsets is not None:
            pool = torch.tensor(sorted({gindex[c] for c in q.candidates or () if c in gindex and gindex[c] != skip}),
                                dtype=torch.long)
            subsets.append([es.gallery[i].id for i in order(pool, targets, first).tolist()])
    width = max((len(r) for r in rows), default=0)
    indices = torch.full((len(rows), width), -1, dtype=torch.long)
    scores = torch.full((len(rows), width), float("-inf"))
    for qi, row in enumerate(rows):
        indices[qi, :len(row)] = row
        scores[qi, :len(row)] = torch.arange(len(row), 0, -1, dtype=torch.float32)
    return Ranking([q.id for q in es.queries], [g.id for g in es.gallery], indices, scores, subsets)


def check_dataset(name: str, split: str | None = None, data_root: Any = None, options: dict[str, Any] | None = None,
                  registry: Any = None, report: Callable[[str], None] | None = None,
                  note: Callable[[str], None] | None = None) -> dict[str, float]:
    """What cirbench asks of a dataset plugin, checked on its data (no model: the rankings are made from the
    annotations): :data:`DATASET_CHECKS`, in order. A split whose targets are hidden is checked for its
    structure alone. ``report`` is called with each check as it holds, ``note`` with what is worth knowing but
    breaks nothing (targets no ranking can reach). Returns the perfect ranking's metrics; raises AssertionError
    saying what does not hold (or the dataset's CirbenchError)."""
    import math

    from . import plugins
    from .evaluate import _score_set, load_eval_sets
    from .types import resolve_options

    reg = registry or plugins.get_registry()
    spec = reg.dataset(name)
    split = spec.resolve_split(split)
    (resolved,) = resolve_options(spec.options, dict(options or {}), spec.name, f"dataset {spec.name}")
    dataset, evalsets, _ = load_eval_sets(spec, split, data_root, resolved, consistent=False)  # checked here

    def held(number: int) -> None:
        if report is not None:
            report(DATASET_CHECKS[number])

    unreachable = 0
    answer_keys = set(getattr(dataset, "target_extras", ()))
    for es in evalsets:
        problem = es.inconsistency()
        if problem is not None:
            raise AssertionError(f"set '{es.name}': {problem}")
        known = set(es.gallery_ids)
        for q in es.queries:
            told = _extra_naming_a_target(q, answer_keys)
            if told is not None:
                raise AssertionError(f"set '{es.name}', query {q.id}: its extra '{told}' names its target, and methods "
                                     "see the extras: list the key in the dataset's target_extras")
            pool = set(q.candidates or ()) if es.query_galleries else known
            excluded = q.reference if es.exclude_reference else None
            unreachable += not es.hidden_targets and (
                not q.targets or any(t not in pool or t == excluded for t in q.targets))
    held(0)
    if unreachable and note is not None:
        note(f"{unreachable} queries have no target, or one outside the gallery they rank (or their excluded "
             "reference): no ranking scores them fully, and a perfect one scores below 100")
    if split in spec.hidden_splits or all(es.hidden_targets for es in evalsets):
        if note is not None:
            note(f"the targets of '{split}' are hidden: its metrics are the test server's to check")
        return {}

    def scored(targets_first: Callable[[int], bool]) -> tuple[dict[str, float], dict[str, dict[str, float]],
                                                             dict[str, Any]]:
        per_set, per_query = {}, {}
        for es in evalsets:
            if es.hidden_targets:
                continue
            per_set[es.name], per_query[es.name] = _score_set(dataset, es, _oracle(es, targets_first))
        return dataset.aggregate(per_set), per_set, per_query

    perfect, _, _ = scored(lambda qi: True)
    # the main metric as the benchmark names it, or as its one set names it when the options choose a part of it
    # (one FashionIQ category: R@10; one GeneCIS task: change_object/R@1, where the whole benchmark has avg/R@1)
    declared = spec.main_metric or next(iter(perfect), "")
    tail = declared.rsplit("/", 1)[-1]
    scored_sets = [es.name for es in evalsets if not es.hidden_targets]
    set_named = [f"{scored_sets[0]}/{tail}"] if len(scored_sets) == 1 else []
    main = next((m for m in (declared, tail, *set_named) if m in perfect), None)
    if main is None:
        raise AssertionError(f"the metrics lack the main metric {declared!r}: {sorted(perfect)[:8]}")
    if not unreachable:  # (the trapezoid AP of instance retrieval is 100 less 1e-5 relative: shown as 100.00)
        if abs(perfect[main] - 100.0) >= 5e-3:
            raise AssertionError(f"a perfect ranking scores {main} {perfect[main]:.4f}, not 100: the metric or the "
                                 "ids it compares are off")
    held(1)
    worst, _, _ = scored(lambda qi: False)
    if worst[main] >= perfect[main]:
        raise AssertionError(f"{main} is {worst[main]:.4f} with the targets last, as with them first: the metric "
                             "does not read the ranking")
    held(2)
    # every other query's targets first: queries that score apart, whose mean is checked
    _, set_metrics, per_query = scored(functools.partial(_even_from, 0))
    sets = {es.name: es for es in evalsets}
    for set_name, metrics in per_query.items():
        if metrics is None:
            continue
        for metric, values in metrics.items():
            values = _values(values)
            if len(values) != len(sets[set_name].queries):
                raise AssertionError(f"set '{set_name}': per-query {metric} has {len(values)} values for "
                                     f"{len(sets[set_name].queries)} queries")
            counted = [v for v in values if not math.isnan(v)]
            reported = set_metrics[set_name].get(metric)
            if counted and reported is not None:
                mean = sum(counted) / len(counted)
                if abs(mean - reported) >= 1e-4 * max(1.0, abs(mean)):
                    raise AssertionError(
                        f"set '{set_name}': {metric} is {reported:.4f}, its per-query values average "
                        f"{mean:.4f}: the bootstrap intervals and paired tests, made from the per-query values, would "
                        "not be of the reported metric")
    if getattr(dataset, "queries_score_apart", False):  # the loop may score a large set in parts of its queries
        import dataclasses

        for es in evalsets:
            whole = per_query.get(es.name)
            if es.hidden_targets or whole is None or len(es.queries) < 2:
                continue
            for start, stop in ((0, 1), (1, len(es.queries))):  # a query alone, and the rest
                part = dataclasses.replace(es, queries=es.queries[start:stop])
                alone = dataset.per_query_metrics(part, _oracle(part, functools.partial(_even_from, start)))
                for metric, values in whole.items():
                    mine, got = _values(values)[start:stop], _values(alone[metric])
                    same = all((math.isnan(a) and math.isnan(b)) or abs(a - b) < 1e-9
                               for a, b in zip(mine, got, strict=True))
                    if not same:
                        raise AssertionError(
                            f"set '{es.name}': {metric} of queries {start}-{stop - 1} scored alone differs from their "
                            "values scored with the whole set, yet the dataset says its queries score apart "
                            "(queries_score_apart)")
    held(3)
    return perfect


# -- pytest fixtures (defined where pytest is installed) -----------------------------------------------------
if pytest is not None:
    @pytest.fixture(scope="session")
    def cirbench_tiny_config(tmp_path_factory) -> Path:
        """Path to a tiny open_clip model config (random weights with ``--pretrained none``)."""
        return write_tiny_config(tmp_path_factory.mktemp("cirbench-cfg"))

    @pytest.fixture
    def cirbench_toy_root(tmp_path) -> Path:
        """A tiny composed-retrieval dataset on disk (see :func:`write_toy_dataset`)."""
        return write_toy_dataset(tmp_path / "toy")

    @pytest.fixture
    def cirbench_register():
        """``cirbench_register(plugin, name)``: register an in-process plugin for this test only, in a registry of its
        own (an earlier test's command may have loaded the installed plugins, the one under test among them)."""
        from . import plugins

        plugins.reset_registry()

        def register(plugin: Any, name: str):
            reg = plugins.get_registry()
            reg.register_plugin(plugin, name=name)
            return reg

        yield register
        plugins.reset_registry()

    @pytest.fixture
    def cirbench_toy(cirbench_register):
        """The toy dataset plugin registered for this test; returns the registry."""
        return cirbench_register(ToyDatasetPlugin(), "toy")
