"""Typed objects the evaluation loop passes between plugins.

These are plain dataclasses with no torch dependency, so that listing plugins stays fast.

* :class:`OptionSpec` describes one option of a method or dataset (name, type, default, help).
* :class:`MethodSpec` / :class:`DatasetSpec` are what plugins register. Their ``factory`` is a lazy
  ``"module:attribute"`` string (or a callable), so that ``cirbench methods`` never imports torch.
* :class:`ImageRef`, :class:`Query` and :class:`EvalSet` are what a dataset's ``load`` returns.
"""

from __future__ import annotations

import collections
import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CirbenchError, PluginError, UnknownNameError

if TYPE_CHECKING:  # torch stays out of `cirbench --help`
    from .training import TrainableMethod

# image preprocessing recipes (cirbench.preprocess reproduces each one): named here, without torch, for the CLI
PREPROCESS_KINDS = ("targetpad", "clip", "hf-clip", "magiclens")
SAVED_TOP = 50  # ranked ids a run keeps per query in its predictions unless told otherwise (`run --save-top`)


def option_flag(name: str) -> str:
    """How an option named ``name`` (``lora_rank``) is spelled on the command line (``--lora-rank``)."""
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class OptionSpec:
    """One option of a method or a dataset.

    ``type`` is one of ``str``, ``int``, ``float``, ``bool`` or ``path``. ``per_dataset`` gives the
    default for a given dataset name (e.g. Slerp's alpha: 0.9 on CIRR, 0.8 on CIRCO). A ``sweepable``
    float option also accepts ``start:stop:step`` or ``a,b,c``; the run then writes one result per value
    while encoding every image and text only once.
    """

    name: str
    help: str
    type: str = "str"
    default: Any = None
    choices: tuple[str, ...] | None = None
    per_dataset: dict[str, Any] = field(default_factory=dict)
    sweepable: bool = False
    minimum: float | None = None
    maximum: float | None = None

    def check(self, value: Any) -> Any:
        """``value`` if it is within this option's bounds (and finite, for numbers); CirbenchError otherwise."""
        if self.type in ("int", "float") and value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise CirbenchError(f"option {option_flag(self.name)}: {value!r} is not a finite {self.type}")
            if self.minimum is not None and value < self.minimum:
                raise CirbenchError(f"option {option_flag(self.name)}: {value} is below its minimum {self.minimum}")
            if self.maximum is not None and value > self.maximum:
                raise CirbenchError(f"option {option_flag(self.name)}: {value} is above its maximum {self.maximum}")
        return value

    def default_for(self, dataset: str | None) -> Any:
        """The default value of this option when evaluating on ``dataset``."""
        if dataset is not None and dataset in self.per_dataset:
            return self.per_dataset[dataset]
        return self.default

    def describe_default(self) -> str:
        """A short human description of the default(s), for listings."""
        text = repr(self.default)
        if self.per_dataset:
            text += " (" + ", ".join(f"{k}: {v!r}" for k, v in sorted(self.per_dataset.items())) + ")"
        return text


# Options of `cirbench run` itself, and cirbench's own `--plugin` (taken wherever it is written): a plugin option of
# the same name would be hidden by them.
RESERVED_OPTION_NAMES = frozenset({
    "method", "dataset", "split", "backbone", "pretrained", "preprocess", "precision", "device", "data_root",
    "output", "cache_dir", "no_cache", "cache_identity", "label", "seed", "batch_size", "workers",
    "max_image_pixels", "allow_missing", "retrieval", "encode_path", "bootstrap", "save_top", "no_leaderboard", "quiet",
    "help", "method_option", "dataset_option", "checkpoint_dir", "plugin", "dry_run", "download_only",
})
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_.")


def _resolve_factory(factory: str | Callable[..., Any], plugin: str = "") -> Callable[..., Any]:
    if callable(factory):
        return factory
    module_name, _, attr = factory.partition(":")
    who = f"plugin '{plugin}': " if plugin else ""
    if not module_name or not attr:
        raise PluginError(f"{who}bad factory string {factory!r}: expected 'module:attribute'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - a plugin's missing dependency is the plugin's error, one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise PluginError(f"{who}cannot import {module_name} ({type(exc).__name__}: {first})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise PluginError(f"{who}factory {factory!r}: module has no attribute {attr!r}") from None


def _check_made(made: Any, base: type, kind: str, name: str, factory: Any, plugin: str) -> None:
    """A factory's product must be what the loop drives (else the loop fails later on a missing attribute, in
    cirbench's code, and the error could not say whose it is)."""
    if not isinstance(made, base):
        where = factory if isinstance(factory, str) else getattr(factory, "__qualname__", repr(factory))
        raise PluginError(f"plugin '{plugin}': the factory of {kind} '{name}' ({where}) made a "
                          f"{type(made).__name__}, not a {base.__module__}.{base.__name__} (subclass it)")


def _validate_common(kind: str, name: Any, options: Any, plugin: str) -> None:
    if not isinstance(name, str) or not name or not set(name.lower()) <= _NAME_CHARS:
        raise PluginError(f"plugin '{plugin}' registers a {kind} with an invalid name {name!r} (letters, digits, "
                          "'-', '_', '.')")
    names = [o.name for o in options]
    if len(set(names)) != len(names):
        raise PluginError(f"plugin '{plugin}': {kind} '{name}' declares an option twice")
    clash = sorted(set(names) & RESERVED_OPTION_NAMES)
    if clash:
        raise PluginError(f"plugin '{plugin}': {kind} '{name}' option {option_flag(clash[0])} is an option of "
                          "`cirbench run` itself and would be hidden; rename it")


@dataclass(frozen=True)
class MethodSpec:
    """A registered ZS-CIR method.

    ``factory`` builds a :class:`cirbench.method.Method` with ``factory(backbone, options, dataset)``.
    ``default_backbone`` is an ``(open_clip model name, pretrained tag)`` pair used when neither the run
    nor the dataset names one. ``default_preprocess`` is the method's official image preprocessing (one of
    ``PREPROCESS_KINDS``: ``"targetpad"``, ``"clip"``, ``"hf-clip"``, ``"magiclens"``). ``trainer``, when set, is a
    lazy factory of the method's trainer, which ``cirbench train --method NAME`` runs through the shared training loop.
    ``downloads``, when set, is a lazy factory of ``downloads(options, model, pretrained) -> [(what, source)]``:
    the files the method would fetch with these options on this backbone (``source`` a URL,
    ``hf-hub:REPO/FILE``, a transformers model ``hf-model:PATH_OR_REPO`` or a chat endpoint
    ``openai-endpoint:URL``), or a CirbenchError when it cannot run there without one that is given; ``cirbench
    run --dry-run`` says where each would come from. It must agree with what the method fetches: built-in
    methods compute both from one function.
    """

    name: str
    description: str
    factory: str | Callable[..., Any]
    options: tuple[OptionSpec, ...] = ()
    default_backbone: tuple[str, str] | None = None
    default_preprocess: str = "clip"
    trainer: str | Callable[..., Any] | None = None
    train_options: tuple[OptionSpec, ...] = ()
    plugin: str = ""
    downloads: str | Callable[..., Any] | None = None

    def validate(self, plugin: str = "") -> None:
        """Refuse a malformed spec (bad name, duplicate or reserved option names) with a PluginError."""
        _validate_common("method", self.name, self.options, plugin)
        if self.default_preprocess not in PREPROCESS_KINDS:
            raise PluginError(f"plugin '{plugin}': method '{self.name}' has an unknown default_preprocess "
                              f"{self.default_preprocess!r}")

    def load(self) -> Callable[..., Any]:
        """Import and return the method's factory (this may import torch)."""
        return _resolve_factory(self.factory, self.plugin)

    def create(self, backbone: Any, options: dict[str, Any], dataset: str | None) -> Any:
        """Build the method and bind this spec to it (the spec is the one source of its name)."""
        from .method import Method

        method = self.load()(backbone, options, dataset)
        _check_made(method, Method, "method", self.name, self.factory, self.plugin)
        method.bind_spec(self)
        return method

    def download_plan(self, options: dict[str, Any], model: str, pretrained: str) -> list[tuple[str, str]]:
        """The files the method would fetch (see ``downloads``); none when it declares none."""
        if self.downloads is None:
            return []
        return list(_resolve_factory(self.downloads, self.plugin)(options, model, pretrained))

    def load_trainer(self) -> type[TrainableMethod]:
        """Import and return the method's trainer factory."""
        if self.trainer is None:
            raise CirbenchError(f"method '{self.name}' needs no training (it has no trainer)")
        trainer: type[TrainableMethod] = _resolve_factory(self.trainer, self.plugin)  # type: ignore[assignment]
        return trainer


@dataclass(frozen=True)
class PaperRow:
    """Numbers a paper published for a method on a benchmark split, shown as a "paper" row in leaderboards.

    ``metrics`` use the dataset plugin's metric names; ``source`` says where the numbers come from.
    """

    method: str
    backbone: str
    split: str
    metrics: dict[str, float]
    source: str = ""


@dataclass(frozen=True)
class DatasetSpec:
    """A registered CIR benchmark.

    ``factory`` builds a :class:`cirbench.dataset.Dataset` with ``factory(data_root, options)``.
    ``splits`` lists the split names; ``hidden_splits`` those whose targets are hidden (the run writes
    test-server submission files instead of metrics). ``default_data_root`` is where the data is looked
    for when ``--data-root`` is not given (relative to the working directory, or absolute).
    ``default_backbone`` overrides the method's default backbone (used by the embedded ``shapes``
    benchmark, which ships its own small CLIP).

    What leaderboards and ``cirbench score`` need to know about the benchmark is declared here too:
    ``main_metric`` (leaderboards sort by it), ``metric_order`` (column order; other metrics follow),
    ``detail_metrics`` (name prefixes of breakdown metrics kept out of tables unless asked, e.g. CIRCO's
    ``aspect/``), ``paper_rows`` (published numbers, :class:`PaperRow`) and ``score_inputs`` (extra files
    ``cirbench score`` accepts as ``--input NAME=PATH``, e.g. CIRR's ``subset`` file).
    """

    name: str
    description: str
    factory: str | Callable[..., Any]
    splits: tuple[str, ...]
    hidden_splits: tuple[str, ...] = ()
    default_split: str | None = None
    options: tuple[OptionSpec, ...] = ()
    default_data_root: str | None = None
    default_backbone: tuple[str, str] | None = None
    main_metric: str | None = None
    metric_order: tuple[str, ...] = ()
    detail_metrics: tuple[str, ...] = ()
    paper_rows: tuple[PaperRow, ...] = ()
    score_inputs: tuple[OptionSpec, ...] = ()
    plugin: str = ""

    def validate(self, plugin: str = "") -> None:
        """Refuse a malformed spec (bad name or splits, duplicate or reserved option names) with a PluginError."""
        if not all(isinstance(r, PaperRow) and r.split in self.splits for r in self.paper_rows):
            raise PluginError(f"plugin '{plugin}': dataset '{self.name}' has paper rows that are not PaperRow "
                              "objects for one of its splits")
        _validate_common("dataset", self.name, self.options, plugin)
        if not self.splits or not all(isinstance(x, str) and x for x in self.splits):
            raise PluginError(f"plugin '{plugin}': dataset '{self.name}' declares no splits")
        if self.default_split is not None and self.default_split not in self.splits:
            raise PluginError(f"plugin '{plugin}': dataset '{self.name}' default split {self.default_split!r} is "
                              "not one of its splits")
        if not set(self.hidden_splits) <= set(self.splits):
            raise PluginError(f"plugin '{plugin}': dataset '{self.name}' hides splits it does not have")

    def resolve_split(self, split: str | None) -> str:
        """``split``, or the dataset's default split when it is ``None``; UnknownNameError for one it lacks."""
        split = split or self.default_split or self.splits[0]
        if split not in self.splits:
            raise UnknownNameError(f"split of {self.name}", split, self.splits)
        return split

    def load(self) -> Callable[..., Any]:
        """Import and return the dataset's factory."""
        return _resolve_factory(self.factory, self.plugin)

    def create(self, data_root: Path | str | None, options: dict[str, Any]) -> Any:
        """Build the dataset from ``data_root`` (none given: ``default_data_root``, or None) and bind this spec to it
        (the spec is the one source of its name and splits)."""
        from .dataset import Dataset

        root = data_root or self.default_data_root
        dataset = self.load()(Path(root) if root else None, options)
        _check_made(dataset, Dataset, "dataset", self.name, self.factory, self.plugin)
        dataset.bind_spec(self)
        return dataset


def benchmark_split(text: str) -> tuple[str, str | None]:
    """``cirr:test1`` -> ``("cirr", "test1")``; ``circo`` -> ``("circo", None)`` (the dataset's default split), as
    ``cirbench run --dataset`` and ``cirbench train --validate`` name a benchmark."""
    dataset, _, split = text.strip().partition(":")
    return dataset.strip(), split.strip() or None


@dataclass(frozen=True)
class ImageView:
    """A region of an image file that a benchmark evaluates instead of the whole file (GeneCIS's dilated,
    square-padded Visual Genome crops).

    ``apply`` takes the decoded PIL image and returns the view (it must be picklable, e.g. a module-level
    function or a ``functools.partial`` of one, since reader workers call it); ``key`` says what the view is
    and enters the feature-cache identity of the image, so two views of one file never share features.
    ``resize="squash"`` resizes the view to the square input without keeping its aspect ratio and without a
    crop, whatever the run's preprocessing (Pic2Word's object-composition queries); put it in ``key`` too.
    """

    key: str
    apply: Callable[[Any], Any] = field(compare=False)
    resize: str | None = None


@dataclass(frozen=True)
class ImageRef:
    """One image: a dataset-unique ``id`` (e.g. CIRR name, CIRCO/COCO id, FashionIQ asin) and its file.

    ``root`` is the data root the file must stay inside (a link leading elsewhere is refused when the file is
    read); datasets set it, generated or ad-hoc images may leave it ``None``. ``view``, when set, is the part
    of the file the benchmark uses (read through the official PIL path, never the batched decoder).
    """

    id: str
    path: Path
    root: Path | None = field(default=None, compare=False)
    view: ImageView | None = None


@dataclass(frozen=True)
class Query:
    """One composed-retrieval query.

    ``reference`` is the id of the reference image; ``texts`` one or more modification texts (FashionIQ
    has two); ``targets`` the ids of the ground-truth images, empty on hidden-target splits (CIRCO has
    several); ``candidates`` an optional candidate subset for subset metrics (CIRR ``img_set``);
    ``category`` a sub-domain tag (FashionIQ dress/shirt/toptee); ``extra`` anything else a dataset
    wants to keep (e.g. CIRCO's shared concept). ``prompt``, when a benchmark's protocol fixes one, is its
    sentence with ``*`` where the reference image goes (Pic2Word's domain conversion: "a cartoon of *"):
    methods that write the image as pseudo-words put them there instead of building their own prompt around
    ``texts``; every other method reads ``texts`` (there the protocol's text-only sentence).
    """

    id: str
    reference: str
    texts: tuple[str, ...]
    targets: tuple[str, ...] = ()
    candidates: tuple[str, ...] | None = None
    category: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    prompt: str | None = None

    @property
    def text(self) -> str:
        """The first modification text (the only one on most datasets)."""
        return self.texts[0]


@dataclass
class EvalSet:
    """A query set ranked against one gallery.

    Most splits are one ``EvalSet``; FashionIQ is one per category (each with its own gallery), and the
    dataset's ``aggregate`` combines their metrics. ``exclude_reference`` removes each query's reference
    image from its ranking (CIRR's protocol). ``images`` holds every image needed, gallery and references
    alike, by id. ``topk`` is how many ranked gallery items the metrics and predictions need.
    ``query_galleries`` makes each query's ``candidates`` its whole gallery (GeneCIS: the target and 14
    distractors): the loop ranks each query among its own candidates only, and ``gallery`` is their union
    (every image is encoded once).
    """

    name: str
    gallery: list[ImageRef]
    queries: list[Query]
    images: dict[str, ImageRef]
    exclude_reference: bool = False
    hidden_targets: bool = False
    topk: int = 50
    info: dict[str, Any] = field(default_factory=dict)
    query_galleries: bool = False

    def __post_init__(self) -> None:
        for ref in self.gallery:
            self.images.setdefault(ref.id, ref)

    @property
    def gallery_ids(self) -> list[str]:
        return [g.id for g in self.gallery]

    def inconsistency(self) -> str | None:
        """What makes this set unscorable as built, or None: an image listed twice in the gallery, two queries of
        one id (their predictions and per-query rows would merge), a reference that is no image, a candidate
        outside the gallery."""
        gallery = self.gallery_ids
        known = set(gallery)
        if len(known) != len(gallery):
            twice = next(g for g, n in collections.Counter(gallery).items() if n > 1)
            return f"the gallery lists image {twice} twice"
        ids = collections.Counter(q.id for q in self.queries)
        if len(ids) != len(self.queries):
            return f"two queries share the id {next(i for i, n in ids.items() if n > 1)!r}"
        for q in self.queries:
            if q.reference not in self.images:
                return f"query {q.id}: its reference {q.reference} is no image of the set"
            strays = [c for c in q.candidates or () if c not in known]
            if strays:
                return f"query {q.id}: its candidate {strays[0]} is not in the gallery"
        return None

    def reference_images(self) -> list[ImageRef]:
        """The distinct reference images of the queries, in first-use order."""
        seen: dict[str, ImageRef] = {}
        for q in self.queries:
            if q.reference not in seen:
                seen[q.reference] = self.images[q.reference]
        return list(seen.values())


TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
BOOL_WORDS = TRUE_WORDS | {"0", "false", "no", "off"}  # what a bool option's value may be


def parse_option_value(spec: OptionSpec, raw: Any) -> Any:
    """Convert a raw (string) value to the option's type; raise CirbenchError on a bad value. A value that is
    already typed (a result file's recorded options, the Python API) is checked, not converted."""
    if raw is None:
        return raw
    if not isinstance(raw, str):
        if spec.type == "bool" and not isinstance(raw, bool):
            raise CirbenchError(f"option {option_flag(spec.name)}: {raw!r} is not a bool")
        return spec.check(raw)
    try:
        if spec.type == "int":
            value: Any = int(raw)
        elif spec.type == "float":
            value = float(raw)
        elif spec.type == "bool":
            low = raw.strip().lower()
            if low not in BOOL_WORDS:
                raise ValueError(raw)
            value = low in TRUE_WORDS
        elif spec.type == "path":
            value = Path(raw).expanduser()
        else:
            value = raw
    except ValueError:
        raise CirbenchError(f"option {option_flag(spec.name)}: {raw!r} is not a valid {spec.type}") from None
    if spec.choices and value not in spec.choices:
        raise CirbenchError(f"option {option_flag(spec.name)}: {raw!r} is not one of {', '.join(spec.choices)}")
    return spec.check(value)


def expand_sweep(spec: OptionSpec, raw: str) -> list[Any]:
    """Expand ``start:stop:step`` (inclusive) or ``a,b,c`` for a sweepable float option."""
    text = raw.strip()
    if ":" in text:
        parts = text.split(":")
        if len(parts) != 3:
            raise CirbenchError(f"option {option_flag(spec.name)}: sweep {raw!r} must be start:stop:step")
        try:
            start, stop, step = (float(p) for p in parts)
        except ValueError:
            raise CirbenchError(f"option {option_flag(spec.name)}: sweep {raw!r} must be numbers "
                                "start:stop:step") from None
        if not all(math.isfinite(x) for x in (start, stop, step)):
            raise CirbenchError(f"option {option_flag(spec.name)}: sweep {raw!r} must be finite numbers")
        if step <= 0 or stop < start:
            raise CirbenchError(f"option {option_flag(spec.name)}: sweep {raw!r} needs step > 0 and stop >= start")
        n = int(round((stop - start) / step))
        if n > 10_000:
            raise CirbenchError(f"option {option_flag(spec.name)}: sweep {raw!r} has {n + 1} values (at most 10,001)")
        values = [round(start + i * step, 10) for i in range(n + 1)]
        return [spec.check(v) for v in values if v <= stop + 1e-9]
    if "," in text:  # a value given twice is run once
        return list(dict.fromkeys(parse_option_value(spec, p) for p in text.split(",") if p.strip()))
    return [parse_option_value(spec, text)]


def switch_off(given: Mapping[str, str | None], specs: Sequence[OptionSpec]) -> dict[str, str | None]:
    """``given`` with each bare ``--no-name`` of a bool option among ``specs`` turned into ``name=false``; a
    value after it, or ``--name`` beside it, is a one-line error."""
    names = {s.name for s in specs}
    switches = {s.name for s in specs if s.type == "bool"}
    out: dict[str, str | None] = {}
    for key, raw in given.items():
        on = key[3:] if key.startswith("no_") and key not in names else None
        if on is None or on not in switches:
            out[key] = raw
            continue
        if raw is not None:
            raise CirbenchError(f"option {option_flag(key)} takes no value (it turns {option_flag(on)} off)")
        if on in given:
            raise CirbenchError(f"options {option_flag(on)} and {option_flag(key)} contradict each other")
        out[on] = "false"
    return out


def resolve_options(
    specs: Sequence[OptionSpec], given: Mapping[str, str | None], dataset: str | None, what: str,
    command_options: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Validate ``given`` raw options against ``specs``, fill defaults, expand sweeps.

    Returns one options dict per sweep point (a single dict when nothing is swept). ``command_options``
    (the command's own option names) only feed the "did you mean" hint of an unknown option. A bool option is
    switched on by a bare ``--name`` and off by a bare ``--no-name``.
    """
    by_name = {s.name: s for s in specs}
    given = switch_off(given, specs)
    for key in given:
        if key not in by_name:
            valid = [option_flag(n) for n in by_name] or ["(this " + what + " takes no options)"]
            import difflib

            close = difflib.get_close_matches(key, [*by_name, *command_options], n=1, cutoff=0.6)
            hint = f" (did you mean {option_flag(close[0])}?)" if close else ""
            raise CirbenchError(f"unknown option {option_flag(key)} for {what}{hint}; valid: {', '.join(valid)}")
    base: dict[str, Any] = {}
    sweeps: list[tuple[str, list[Any]]] = []
    for spec in specs:
        if spec.name in given:
            raw = given[spec.name]
            if raw is None:  # a bare --name: a switch for a bool option
                if spec.type != "bool":
                    raise CirbenchError(f"option {option_flag(spec.name)} needs a value")
                raw = "true"
            if spec.sweepable and isinstance(raw, str) and (":" in raw or "," in raw):
                sweeps.append((spec.name, expand_sweep(spec, raw)))
                continue
            base[spec.name] = parse_option_value(spec, raw)
        else:
            base[spec.name] = spec.default_for(dataset)
    combos = [dict(base)]
    for name, values in sweeps:
        combos = [{**c, name: v} for c in combos for v in values]
    return combos


def split_plugin_options(extra: dict[str, Any], method_spec: MethodSpec,
                         dataset_spec: DatasetSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """Route extra options to the method or the dataset by name (unknown ones go to the method, which
    then reports them with the list of valid options)."""
    dataset_names = {o.name for o in dataset_spec.options}
    method_names = {o.name for o in method_spec.options}
    m_opts: dict[str, Any] = {}
    d_opts: dict[str, Any] = {}
    for key, value in extra.items():
        if key in dataset_names and key not in method_names:
            d_opts[key] = value
        else:
            m_opts[key] = value
    return m_opts, d_opts
