"""Result files: one JSON per (dataset, split, run, backbone), plus per-query predictions (JSON Lines).

Layout: ``<output>/<dataset>/<split>/<run label>__<backbone slug>.json`` and ``...predictions.jsonl``.
Every file carries ``schema_version``; readers refuse versions they do not know. Files are written
through a temporary file and a rename, so an interrupted run never corrupts a result already written.
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
from .features import atomic_write_bytes

SCHEMA_VERSION = 1
RESULT_SUFFIX = ".json"
PREDICTIONS_SUFFIX = ".predictions.jsonl"
SUBMISSIONS_DIR = "submissions"  # test-server files live in <output>/<dataset>/<split>/submissions/


def safe_name(text: str) -> str:
    """A file-name-safe version of ``text`` (letters, digits, ``.=,+-_@`` kept)."""
    return re.sub(r"[^A-Za-z0-9.=,+@_-]+", "_", text).strip("_") or "run"


def git_revision() -> dict[str, Any] | None:
    """The git revision of the cirbench source tree, if it is a checkout (with a dirty flag)."""
    here = Path(__file__).resolve().parent.parent
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
    import torch

    try:
        import open_clip

        oc_version = getattr(open_clip, "__version__", "unknown")
    except ImportError:  # pragma: no cover
        oc_version = None
    info = {
        "cirbench": __version__,
        "git": git_revision(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": oc_version,
        "platform": platform.platform(),
        "device": device,
    }
    if device and device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def ensure_writable(directory: Path) -> Path:
    """Create ``directory`` and check that it is writable; CirbenchError (exit 2) otherwise."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CirbenchError(f"results directory {directory} is not writable: {exc.strerror or exc}") from None
    return directory


def result_stem(run_label: str, backbone_slug: str) -> str:
    return f"{safe_name(run_label)}__{safe_name(backbone_slug)}"


def write_result(path: Path, record: dict[str, Any]) -> Path:
    record = {"schema_version": SCHEMA_VERSION, **record}
    atomic_write_bytes(Path(path), (json.dumps(record, indent=2, sort_keys=False, default=str) + "\n").encode())
    return Path(path)


def write_predictions(path: Path, rows: list[dict[str, Any]]) -> Path:
    data = "".join(json.dumps(r, default=str) + "\n" for r in rows).encode()
    atomic_write_bytes(Path(path), data)
    return Path(path)


def read_result(path: Path) -> dict[str, Any]:
    """Read one result file; CirbenchError if it is malformed or of an unknown schema version."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CirbenchError(f"result file {path} is unreadable: {exc}") from None
    if not isinstance(record, dict) or record.get("schema_version") != SCHEMA_VERSION:
        raise CirbenchError(f"result file {path} has schema_version {record.get('schema_version')!r} "
                            f"(this cirbench reads {SCHEMA_VERSION})")
    return record


def find_results(root: Path) -> list[Path]:
    """All result JSON files under ``root`` (predictions and submissions excluded)."""
    root = Path(root)
    return sorted(p for p in root.rglob("*" + RESULT_SUFFIX)
                  if "__" in p.name and SUBMISSIONS_DIR not in p.relative_to(root).parts)


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
