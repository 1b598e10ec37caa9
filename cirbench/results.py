"""Result files: one JSON per (dataset, split, run, backbone), plus per-query predictions (JSON Lines).

Layout: ``<output>/<dataset>/<split>/<run label>__<backbone slug>.json`` and ``...predictions.jsonl``.
Every file carries ``schema_version``; readers refuse versions they do not know. Files are written
through a temporary file and a rename, so an interrupted run never corrupts a result already written.

A result and its predictions are one unit: the predictions are written first, and the result records their
file name, row count and sha256; :func:`read_predictions_of` refuses predictions that do not match. A run's
**fingerprint** hashes what determines its numbers (method, options and checkpoint, dataset, split, options
and annotation checksums, backbone identity, preprocessing, precision, seed; files that options name by their
contents, not where they lie): a rerun of the same configuration replaces its own files, a different
configuration (annotation files edited or updated included) never does; it is written beside them under
``<stem>~<fingerprint>``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from . import __version__
from .errors import CirbenchError
from .util import (
    TEXT_ENCODING,
    atomic_write_bytes,
    atomic_write_files,
    content_digest,
    json_hash,
    json_loads,
    json_object_file,
    sha256_bytes,
)

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
RESULT_SUFFIX = ".json"
PREDICTIONS_SUFFIX = ".predictions.jsonl"
SUBMISSIONS_DIR = "submissions"  # test-server files live in <output>/<dataset>/<split>/submissions/


def safe_name(text: str) -> str:
    """A file-name-safe version of ``text`` (letters, digits, ``.=,+-_@`` kept)."""
    return re.sub(r"[^A-Za-z0-9.=,+@_-]+", "_", text).strip("_") or "run"


def git_revision(root: Path | None = None) -> dict[str, Any] | None:
    """The git revision of the cirbench source tree (or of ``root``), if it is a checkout, with a dirty flag:
    tracked files changed since that commit (untracked files do not change cirbench's code)."""
    here = Path(root) if root is not None else Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip() != ""
        return {"commit": rev, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return None


def environment_info(device: str | None = None) -> dict[str, Any]:
    """Versions of everything that changes a number, and the machine."""
    import PIL
    import torch
    import torchvision

    info = {
        "cirbench": __version__,
        "git": git_revision(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,  # decodes and resizes on the official path: its version can move pixels
        "open_clip": installed_version("open_clip_torch"),  # its metadata: open_clip < 2.25 has no __version__
        "platform": platform.platform(),
        "device": device,
    }
    info.update(_optional_versions())
    if device and device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


# installed packages that change numbers when a run uses them: decoding, generation (LLM methods), LoRA, faiss
OPTIONAL_PACKAGES = ("numpy", "torchcodec", "transformers", "peft", "safetensors", "faiss-cpu", "faiss-gpu",
                     "faiss-gpu-cu12")


def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution`` (a pip name), from its metadata; None if it is not installed."""
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _optional_versions() -> dict[str, str]:
    """Versions of the :data:`OPTIONAL_PACKAGES` installed here (read from their metadata, nothing imported)."""
    return {name: v for name in OPTIONAL_PACKAGES if (v := installed_version(name)) is not None}


def ensure_writable(directory: Path) -> Path:
    """Check, before any work, that ``directory`` can be created and written; CirbenchError (exit 2) otherwise.

    Nothing is created: the probe goes into the deepest folder that exists already, so a run that fails later
    leaves no empty results folders behind. ``ResultWriter`` creates the folder when it writes."""
    directory = Path(directory)
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CirbenchError(f"results directory {directory} is not writable: {existing} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CirbenchError(f"results directory {directory} is not writable: {exc.strerror or exc}") from None
    return directory


def result_stem(run_label: str, backbone_slug: str) -> str:
    return f"{safe_name(run_label)}__{safe_name(backbone_slug)}"


FINGERPRINT_FIELDS = ("method", "dataset", "backbone", "preprocess", "precision", "seed")


def path_option_digests(specs: Any, options: dict[str, Any]) -> dict[str, str]:
    """``{option: content digest}`` of the path options set in ``options`` (``specs``: their OptionSpecs): what
    the files are, which the fingerprint counts in place of where they lie."""
    return {o.name: content_digest(options[o.name]) for o in specs
            if o.type == "path" and options.get(o.name) not in (None, "")}


def drop_file_paths(value: Any) -> Any:
    """``value`` (a method's info) without where the files it names lie: a file is recorded as ``{"path": ...,
    "sha256": ...}`` (or ``"checkpoint"`` for the path), and only its sha256 says what it is."""
    if isinstance(value, dict):
        named = "sha256" in value
        return {k: drop_file_paths(v) for k, v in value.items() if not (named and k in ("path", "checkpoint"))}
    if isinstance(value, list):
        return [drop_file_paths(v) for v in value]
    return value


def without_paths(part: dict[str, Any]) -> dict[str, Any]:
    """A method or dataset record as far as its numbers go: its path options' values replaced by their contents
    (``files``; a record written before those were recorded keeps its paths) and its info without file paths
    (:func:`drop_file_paths`)."""
    options = part.get("options")
    files = part.get("files")
    options, files = (x if isinstance(x, dict) else {} for x in (options, files))
    return {**part, "options": {k: files.get(k, v) for k, v in options.items()},
            "info": drop_file_paths(part.get("info"))}


def run_fingerprint(record: dict[str, Any], recipe: bool = False) -> str:
    """A short hash of what determines a run's numbers (see the module docstring). ``recipe``: of what does
    apart from the seed and the files the method reads (its path options: a checkpoint), so that the runs of one
    training recipe with several seeds share it (``cirbench leaderboard --seeds``)."""
    method, dataset = (without_paths(part) if isinstance(part := record.get(k), dict) else {}
                       for k in ("method", "dataset"))
    if recipe:
        files = raw.get("files") if isinstance(raw := record.get("method"), dict) else None
        named = set(files) if isinstance(files, dict) else set()
        method = {"name": method.get("name"),
                  "options": {k: v for k, v in (method.get("options") or {}).items() if k not in named}}
    annotations = dataset.get("annotations")
    core = {"method": {k: method.get(k) for k in ("name", "options", "info")},
            "dataset": {**{k: dataset.get(k) for k in ("name", "split", "options")},
                        # their contents, wherever the files lie (a name is absolute outside the data root)
                        "annotations": sorted(map(str, annotations.values())) if isinstance(annotations, dict)
                        else annotations},
            **{k: record.get(k) for k in FINGERPRINT_FIELDS[2:] if not (recipe and k == "seed")}}
    return json_hash(core)[:12]


def comparable(a: dict[str, Any], b: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two result records as far as they can be compared: when either recorded no annotation checksums (an older
    cirbench's shapes result), neither's are compared."""
    def dataset(record: dict[str, Any]) -> dict[str, Any]:
        return part if isinstance(part := record.get("dataset"), dict) else {}

    for part in ("method", "dataset"):  # one written before path options were counted by content: by path
        if any(not isinstance((r.get(part) or {}).get("files"), dict) for r in (a, b)):
            a, b = ({**r, part: {k: v for k, v in (r.get(part) or {}).items() if k != "files"}} for r in (a, b))
    if dataset(a).get("annotations") and dataset(b).get("annotations"):
        return a, b
    return {**a, "dataset": {**dataset(a), "annotations": None}}, {**b, "dataset": {**dataset(b), "annotations": None}}


def same_configuration(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two result records are of one configuration: their fingerprints, computed again from the records
    (so a result written before the fingerprint covered what it covers now still matches), on what both record
    (see :func:`comparable`)."""
    a, b = comparable(a, b)
    return run_fingerprint(a) == run_fingerprint(b)


def result_bytes(record: dict[str, Any]) -> bytes:
    record = {"schema_version": SCHEMA_VERSION, **record}
    return (json.dumps(record, indent=2, sort_keys=False, default=str) + "\n").encode()


def predictions_bytes(rows: list[dict[str, Any]]) -> bytes:
    """The rows as JSON Lines."""
    return "".join(json.dumps(r, default=str) + "\n" for r in rows).encode()


def write_result(path: Path, record: dict[str, Any]) -> Path:
    return atomic_write_bytes(Path(path), result_bytes(record))


class ResultWriter:
    """Writes one split's results into ``directory`` (see the module docstring for names and units)."""

    def __init__(self, directory: Path, enabled: bool = True):
        self.directory = Path(directory)
        self.enabled = enabled
        if enabled:
            ensure_writable(self.directory)

    def stem(self, label: str, slug: str, record: dict[str, Any] | None = None) -> str:
        """``<label>__<slug>``, or ``<label>__<slug>~<fingerprint>`` when a result of another configuration than
        ``record``'s already holds the plain name (see :func:`same_configuration`)."""
        base = result_stem(label, slug)
        if record is None:
            return base
        existing = self.directory / (base + RESULT_SUFFIX)
        if existing.exists():
            old = json_object_file(existing)  # a damaged file may be the only copy of a number: never replaced
            if old is None or not same_configuration(old, record):
                return f"{base}~{record['fingerprint'][:8]}"
        return base

    def submissions_dir(self) -> Path:
        path = self.directory / SUBMISSIONS_DIR
        path.mkdir(parents=True, exist_ok=True)
        return path

    def write(self, stem: str, record: dict[str, Any], predictions: list[dict[str, Any]]) -> tuple[Path, Path]:
        result_path = self.directory / (stem + RESULT_SUFFIX)
        pred_path = self.directory / (stem + PREDICTIONS_SUFFIX)
        if self.enabled:
            self.directory.mkdir(parents=True, exist_ok=True)
            data = predictions_bytes(predictions)
            record["predictions"] = {**(record.get("predictions") or {}), "file": pred_path.name,
                                     "rows": len(predictions), "sha256": sha256_bytes(data)}
            # one pair: both staged before either replaces the earlier run's (a full disk leaves that one whole)
            atomic_write_files([(pred_path, data), (result_path, result_bytes(record))])
        return result_path, pred_path


def read_result(path: Path) -> dict[str, Any]:
    """Read one result file; CirbenchError if it is malformed or of an unknown schema version."""
    try:
        record = json_loads(Path(path).read_bytes())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CirbenchError(f"result file {path} is unreadable: {exc}") from None
    return checked_result(record, path)


def checked_result(record: Any, path: Path) -> dict[str, Any]:
    """``record`` (the JSON of result file ``path``) if it is one this cirbench reads; CirbenchError naming what is
    wrong otherwise (the schema version, a missing section, a field of another type)."""
    version = record.get("schema_version") if isinstance(record, dict) else None
    if version is None:
        raise CirbenchError(f"{path} is not a cirbench result file (it records no schema_version)")
    if version not in READABLE_VERSIONS:
        raise CirbenchError(f"result file {path} has schema_version {version!r} "
                            f"(this cirbench reads {', '.join(map(str, READABLE_VERSIONS))})")
    for name in ("method", "dataset", "backbone"):
        if not isinstance(record.get(name), dict):
            raise CirbenchError(f"result file {path} lacks its '{name}' section")
    if not isinstance(record.get("metrics", {}), dict):
        raise CirbenchError(f"result file {path}: 'metrics' is not an object")
    from .schema import result_record_problem

    problem = result_record_problem(record)
    if problem is not None:
        raise CirbenchError(f"result file {path} is malformed: {problem}")
    return record


def main_metric_of(record: dict[str, Any], available: list[str] | None = None) -> str | None:
    """The metric a record's numbers are judged by: its dataset's main metric where that is among ``available``
    (default: the record's metrics), else the first of them (a dataset whose plugin is not installed here, or
    that declares none); None when there is none."""
    from .plugins import get_registry

    names = list(record.get("metrics") or {}) if available is None else list(available)
    try:
        main = get_registry().dataset(str((record.get("dataset") or {}).get("name"))).main_metric
    except CirbenchError:  # a dataset plugin not installed here: its results still read
        main = None
    return main if main in names else next(iter(names), None)


def predictions_path_of(result_path: Path) -> Path:
    name = Path(result_path).name
    return Path(result_path).with_name(name[: -len(RESULT_SUFFIX)] + PREDICTIONS_SUFFIX)


def read_predictions_of(result_path: Path, record: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The predictions that belong to a result file; CirbenchError if they are missing or belong to another run
    (their sha256 differs from the one the result recorded)."""
    record = record if record is not None else read_result(result_path)
    link = record.get("predictions") or {}
    path = Path(result_path).with_name(link["file"]) if link.get("file") else predictions_path_of(result_path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CirbenchError(f"predictions of {result_path} are unreadable: {path}: {exc.strerror or exc} (a result "
                            "file reads its per-query rankings from the file beside it)") from None
    if link.get("sha256") and sha256_bytes(data) != link["sha256"]:
        raise CirbenchError(f"predictions file {path} does not belong to {Path(result_path).name} (its checksum "
                            "differs from the one the result recorded: another run overwrote it, or it was edited or "
                            "truncated)")
    rows = []
    for n, line in enumerate(data.decode(TEXT_ENCODING, errors="replace").splitlines(), 1):
        if line.strip():
            try:
                row = json_loads(line)
            except ValueError:
                raise CirbenchError(f"predictions file {path}, line {n}: not JSON") from None
            if not isinstance(row, dict) or "query" not in row:
                raise CirbenchError(f"predictions file {path}, line {n}: not a ranking row (an object with 'query')")
            rows.append(row)
    return rows


def find_results(root: Path) -> list[Path]:
    """All result JSON files under ``root`` (predictions and submissions excluded)."""
    root = Path(root)
    return sorted(p for p in root.rglob("*" + RESULT_SUFFIX)
                  if "__" in p.name and SUBMISSIONS_DIR not in p.relative_to(root).parts)


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
