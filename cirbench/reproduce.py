"""``cirbench reproduce RESULT.json``: run again what a result file records, and say whether the numbers hold.

A result file records everything that determines its numbers (method, its options and checkpoint checksum,
dataset, split, options and annotation checksums, backbone identity, preprocessing, precision, seed) and how it
ran (encode path, retrieval backend, missing-image handling, bootstrap replicates). :func:`config_of` turns it
back into a :class:`~cirbench.evaluate.RunConfig` (what this machine names differently, such as the data root,
the device or a weights file's path, can be given instead); :func:`compare` sets the two records side by side:
the configuration (what differs, by name), the annotations and counts, every metric, and the rankings query by
query (identical top-k lists, same first hit), so that a difference is found, not only noticed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CirbenchError
from .results import FINGERPRINT_FIELDS, comparable, read_predictions_of, without_paths
from .types import DatasetSpec, MethodSpec


def config_of(record: dict[str, Any], *, output: Path, data_root: str | None = None, backbone: str | None = None,
              pretrained: str | None = None, device: str = "auto", use_cache: bool = True,
              cache_dir: str | None = None, options: dict[str, Any] | None = None, progress: bool = True):
    """The run that ``record`` describes, with this machine's ``data_root``/``backbone``/``pretrained``/``device``
    where given and ``options`` (as on the command line) over the recorded method and dataset options."""
    from .evaluate import RunConfig
    from .plugins import get_registry
    from .preprocess import DEFAULT_MAX_PIXELS
    from .types import split_plugin_options

    method, dataset = record["method"], record["dataset"]
    name = method.get("name")
    if not name or not dataset.get("name"):
        raise CirbenchError("the result file names no method or dataset")
    reg = get_registry()
    mspec, dspec = _spec(reg.method, method), _spec(reg.dataset, dataset)
    given_method, given_dataset = split_plugin_options(options or {}, mspec, dspec)
    # given on the command line: they win over the recorded values
    method_options = {**(method.get("options") or {}), **given_method}
    dataset_options = {**(dataset.get("options") or {}), **given_dataset}
    sets = ((record.get("counts") or {}).get("sets") or {}).values()
    dropped = any(s.get("queries_dropped") or s.get("gallery_dropped") for s in sets if isinstance(s, dict))
    encode = record.get("encode") or {}
    recorded = record["backbone"]
    return RunConfig(
        method=str(name), dataset=str(dataset["name"]), split=dataset.get("split"),
        backbone=backbone or recorded.get("model"), pretrained=pretrained or recorded.get("pretrained"),
        preprocess=(record.get("preprocess") or {}).get("kind"), precision=str(record.get("precision") or "fp32"),
        device=device, data_root=data_root or (dataset.get("data_root") if dataset.get("data_root_given") else None),
        output=output, cache_dir=cache_dir, use_cache=use_cache, method_options=method_options,
        dataset_options=dataset_options, seed=int(record.get("seed") or 0), allow_missing=dropped,
        retrieval_backend=str((record.get("retrieval") or {}).get("backend") or "auto"),
        encode_path=str(encode.get("requested_path") or "auto"),
        max_image_pixels=int(encode.get("max_image_pixels") or DEFAULT_MAX_PIXELS),
        bootstrap=int((record.get("ci") or {}).get("replicates") or 0), save_topk=_saved_top(record),
        progress=progress)


def _spec(lookup, section: dict[str, Any]):
    """The registered spec of a record's method or dataset section; when it is not registered and came from a
    plugin that is not installed (``--plugin``), the error says which file to load (it is never loaded from
    what a result file says: that would run code a shared file names)."""
    from .errors import UnknownNameError

    try:
        return lookup(str(section["name"]))
    except UnknownNameError as exc:
        source = section.get("plugin_source") or {}
        if source.get("kind") in ("file", "module"):
            where = source.get("module") or source.get("path")
            raise CirbenchError(f"{exc.kind} '{exc.name}' is not registered: the result was run with the plugin "
                                f"{where} (sha256 {str(source.get('sha256'))[:12]}); load it with "
                                f"`cirbench --plugin {where} reproduce ...`") from None
        if source.get("kind") == "distribution":
            raise CirbenchError(f"{exc.kind} '{exc.name}' is not registered: the result was run with the plugin "
                                f"distribution {source.get('distribution')} {source.get('version')}; install it"
                                ) from None
        raise


def _plugin_sources(original: dict[str, Any], again: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """Where a plugin's code differs between the two runs (a version, a file's sha256): told as the environment,
    since the configuration (method, options, weights) is the same."""
    from .plugins import describe_source

    def code(source: Any) -> Any:  # the same code wherever its file lies (a colleague's copy, another clone)
        return source.get("sha256") or source if isinstance(source, dict) else source

    out = []
    for section in ("method", "dataset"):
        a, b = ((record.get(section) or {}).get("plugin_source") for record in (original, again))
        if a is not None and code(a) != code(b):  # a record from before plugin sources were recorded says nothing
            out.append((f"{section} plugin", describe_source(a), describe_source(b)))
    return out


def _saved_top(record: dict[str, Any]) -> int | None:
    """How many ranked ids the run wrote per query (a record from before this was recorded: 50)."""
    top = (record.get("predictions") or {}).get("top", 50)
    if top == "all":
        return None
    if not isinstance(top, int) or isinstance(top, bool) or top < 1:
        raise CirbenchError(f"the result file's predictions.top is {top!r}, neither a count nor 'all'")
    return top


@dataclass
class Comparison:
    """How a reproduction compares with the result it reproduces."""

    configuration: list[tuple[str, Any, Any]] = field(default_factory=list)  # (what, recorded, now) that differ
    environment: list[tuple[str, Any, Any]] = field(default_factory=list)
    metrics: list[tuple[str, float | None, float | None]] = field(default_factory=list)
    rankings: dict[str, Any] = field(default_factory=dict)
    tolerance: float = 0.0

    @property
    def worst(self) -> float:
        """The largest metric difference (inf when a metric is missing on one side)."""
        diffs = [abs(a - b) if a is not None and b is not None else float("inf") for _, a, b in self.metrics]
        return max(diffs, default=0.0)

    @property
    def reproduced(self) -> bool:
        identical_rankings = self.rankings.get("identical", 1.0) == 1.0
        return not self.configuration and self.worst <= self.tolerance and (bool(self.metrics) or identical_rankings)


def _differences(prefix: str, a: Any, b: Any) -> list[tuple[str, Any, Any]]:
    """Where two JSON values differ, by dotted path."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in list(dict.fromkeys([*a, *b])):
            out += _differences(f"{prefix}.{key}" if prefix else str(key), a.get(key), b.get(key))
        return out
    return [] if a == b else [(prefix, a, b)]


def compare(original: dict[str, Any], original_path: Path, again: dict[str, Any], again_path: Path,
            tolerance: float) -> Comparison:
    """``original`` (read from ``original_path``) against its reproduction ``again``."""
    out = Comparison(tolerance=tolerance)
    recorded, reproduced = comparable(original, again)
    if recorded is not original and (files := (again.get("dataset") or {}).get("annotations")):
        # the result cannot say whether the files are the same: told, not counted as a difference
        out.environment.append(("annotation checksums", "not recorded", f"{len(files)} file(s)"))
    for section in FINGERPRINT_FIELDS:
        a, b = (_what_counts(section, record) for record in (recorded, reproduced))
        out.configuration += _differences(section, a, b)
    for key in ("queries", "gallery"):
        a, b = ((record.get("counts") or {}).get(key) for record in (original, again))
        if a != b:
            out.configuration.append((f"counts.{key}", a, b))
    before, now = ((record.get("preprocess") or {}).get("jpeg_decoder") or "libjpeg-turbo"
                   for record in (original, again))
    if before != now:  # the GPU's decoder may move a pixel by a grey level: --tolerance decides
        out.environment.append(("jpeg decoder", before, now))
    out.environment += _plugin_sources(original, again)
    env_a, env_b = original.get("environment") or {}, again.get("environment") or {}
    for name in ("cirbench", "git", "torch", "torchvision", "open_clip", "pillow", "numpy", "device"):
        if env_a.get(name) != env_b.get(name):
            out.environment.append((name, env_a.get(name), env_b.get(name)))
    metrics_a, metrics_b = original.get("metrics") or {}, again.get("metrics") or {}
    for name in dict.fromkeys([*metrics_a, *metrics_b]):
        a, b = metrics_a.get(name), metrics_b.get(name)
        out.metrics.append((name, float(a) if a is not None else None, float(b) if b is not None else None))
    out.rankings = _rankings(original_path, original, again_path, again)
    return out


def _what_counts(section: str, record: dict[str, Any]) -> Any:
    """A record's ``section`` as far as it decides the numbers: not a method's label or plugin module, nor where
    files lie (path options, a checkpoint's path, the data root): their checksums (the checkpoint's, the
    annotations') say whether the content is the same."""
    from .plugins import get_registry

    value = record.get(section)
    if section == "preprocess" and isinstance(value, dict):  # the JPEG decoder comes with the device: see compare
        return {k: v for k, v in value.items() if k != "jpeg_decoder"}
    if section not in ("method", "dataset") or not isinstance(value, dict):
        return value
    keep = ("name", "options", "info") if section == "method" else ("name", "split", "options", "annotations")
    out: dict[str, Any] = {k: v for k, v in without_paths(value).items() if k in keep}
    if not isinstance(value.get("files"), dict):  # written before path options were recorded by their contents
        reg, name = get_registry(), str(value.get("name"))
        try:
            spec: MethodSpec | DatasetSpec = reg.method(name) if section == "method" else reg.dataset(name)
            paths = {o.name for o in spec.options if o.type == "path"}
        except CirbenchError:
            paths = set()
        out["options"] = {k: v for k, v in (out.get("options") or {}).items() if k not in paths}
    return out


def _rankings(path_a: Path, rec_a: dict, path_b: Path, rec_b: dict) -> dict[str, Any]:
    """The share of queries whose saved top-k lists are identical, and whose first hit is the same."""
    try:
        rows_a, rows_b = read_predictions_of(path_a, rec_a), read_predictions_of(path_b, rec_b)
    except CirbenchError as exc:
        return {"unavailable": str(exc)}

    def key(row: dict[str, Any]) -> tuple[str, str]:
        return row.get("set", ""), str(row.get("query"))

    by_b = {key(r): r.get("top") or [] for r in rows_b}
    pairs = [(r.get("top") or [], by_b[key(r)]) for r in rows_a if key(r) in by_b]
    if not pairs:
        return {"unavailable": "the two runs share no query"}
    return {"queries": len(pairs), "identical": sum(a == b for a, b in pairs) / len(pairs),
            "same_first": sum(bool(a) and bool(b) and a[0] == b[0] for a, b in pairs) / len(pairs)}


def render(comparison: Comparison, original_path: Path) -> str:
    """The comparison in lines, ending with the verdict."""
    c = comparison
    lines = [f"reproducing {original_path}"]
    for what, a, b in c.configuration:
        lines.append(f"  configuration differs: {what}: recorded {_short(a)}, now {_short(b)}")
    for what, a, b in c.environment:
        lines.append(f"  environment: {what} {_short(a)} -> {_short(b)}")
    for name, a, b in c.metrics:
        diff = "missing" if a is None or b is None else f"{b - a:+.4f}"
        lines.append(f"  {name:>24}  recorded {_number(a)}  now {_number(b)}  ({diff})")
    r = c.rankings
    if "unavailable" in r:
        lines.append(f"  rankings: not compared ({r['unavailable']})")
    else:
        lines.append(f"  rankings: {r['identical']:.2%} of {r['queries']:,} queries have identical saved top lists, "
                     f"{r['same_first']:.2%} the same first hit")
    if c.reproduced:
        lines.append("reproduced: same configuration, every metric within "
                     f"{c.tolerance:g}" + (" (identical)" if c.worst == 0 else f" (largest difference {c.worst:.4f})"))
    elif c.configuration:
        lines.append("not reproduced: the configuration differs (above)")
    else:
        lines.append(f"not reproduced: a metric differs by {c.worst:.4f} (tolerance {c.tolerance:g})"
                     if c.metrics else "not reproduced: the rankings differ")
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:8.4f}"


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."
