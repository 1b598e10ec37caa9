"""What the feature cache holds, and removing what is no longer wanted (``cirbench cache``), without torch.

Each folder ``features/<key hash>/`` is one :class:`Entry`: its ``key.json`` says which backbone, weights,
preprocessing, precision and feature kind made the rows, the shards' headers say how many rows it holds. A run
that reads an entry marks it used (the modification time of ``key.json``), so ``--unused-for 30`` finds what no
run has needed for a month. Entries are removed under the lock that encoding takes, so a run writing one finishes
its shard first. The other folders of the cache (generated benchmarks, LLM generations, SEARLE-OTI's inversions)
are listed with their sizes and left alone: an LLM's outputs may have cost money to make.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .util import json_object_file, making, matches_any


@dataclass
class Entry:
    """One key's folder of cached features."""

    folder: Path
    key: dict[str, Any] | None  # None: key.json missing or unreadable (such a folder is rebuilt when next used)
    rows: int
    shards: int
    size: int
    used: float  # when a run last read or wrote it (seconds since the epoch)
    unreadable_shards: list[str] = field(default_factory=list)

    @property
    def backbone(self) -> str:
        bb = (self.key or {}).get("backbone", {})
        return f"{bb.get('model', '?')}/{bb.get('pretrained', '?')}" if self.key else "?"

    @property
    def preprocess(self) -> str:
        if self.key is not None and "preprocess" not in self.key:  # text features: no pixels
            return "-"
        pre = (self.key or {}).get("preprocess", {})
        text = f"{pre.get('kind', '?')} {pre.get('size', '?')}px"
        return text + (f", {pre['jpeg_decoder']}" if pre.get("jpeg_decoder") else "")

    @property
    def feature(self) -> str:
        feat = dict((self.key or {}).get("feature", {}))
        kind = str(feat.pop("kind", "?"))
        extra = ", ".join(f"{k} {str(v)[:12]}" for k, v in sorted(feat.items()))
        return f"{kind} ({extra})" if extra else kind

    def row(self) -> dict[str, Any]:
        """The entry as ``cirbench cache list`` shows it (and ``--json`` prints it)."""
        return {"entry": self.folder.name, "backbone": self.backbone,
                "precision": (self.key or {}).get("precision", "?"), "preprocess": self.preprocess,
                "feature": self.feature, "rows": self.rows, "shards": self.shards, "size": self.size,
                "last used": time.strftime("%Y-%m-%d %H:%M", time.localtime(self.used))}


def _shard_rows(path: Path) -> int:
    """The rows a shard's header declares (nothing is read beyond the header)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as fh:
        return int((fh.metadata() or {})["rows"])


def feature_entries(root: Path) -> list[Entry]:
    """Every folder under ``root/features``, most recently used first."""
    entries = []
    for folder in sorted((root / "features").glob("*")):
        if not folder.is_dir():
            continue
        manifest = folder / "key.json"
        key = json_object_file(manifest)
        rows, shards, size, bad = 0, 0, 0, []
        for item in folder.iterdir():
            try:
                size += item.stat().st_size
            except OSError:
                continue
            if item.name.startswith("shard-") and item.suffix == ".safetensors":
                shards += 1
                try:
                    rows += _shard_rows(item)
                except Exception:  # noqa: BLE001 - a damaged shard is reported, and dropped by the next run reading it
                    bad.append(item.name)
        try:
            used = (manifest if manifest.exists() else folder).stat().st_mtime
        except OSError:
            used = 0.0
        entries.append(Entry(folder, key, rows, shards, size, used, bad))
    return sorted(entries, key=lambda e: -e.used)


def other_folders(root: Path) -> dict[str, int]:
    """The cache's other top-level folders and their sizes in bytes."""
    return {p.name: folder_size(p) for p in sorted(root.glob("*")) if p.is_dir() and p.name != "features"}


def folder_size(path: Path) -> int:
    total = 0
    for item in path.rglob("*"):
        try:
            if item.is_file():
                total += item.stat().st_size
        except OSError:
            continue
    return total


def select(entries: list[Entry], backbones: tuple[str, ...] = (), unused_for_days: float | None = None,
           now: float | None = None) -> list[Entry]:
    """The entries whose backbone (``model/pretrained``) matches one of ``backbones`` (a glob, or a substring)
    and that no run has used for ``unused_for_days``; no criterion selects every entry."""
    now = time.time() if now is None else now

    def matches(entry: Entry) -> bool:
        unused = unused_for_days is None or now - entry.used >= unused_for_days * 86400
        return unused and matches_any(entry.backbone, backbones)

    return [e for e in entries if matches(e)]


def remove(entry: Entry) -> str | None:
    """Delete ``entry``'s folder, after any run that is encoding into it has written its shard; why it could not
    be deleted (all of it), or None."""
    with making(entry.folder, waiting=f"waiting for a run that is encoding into {entry.folder}"):
        try:
            shutil.rmtree(entry.folder)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return f"{type(exc).__name__}: {exc.strerror or exc}"
    return None


def human_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def as_json(entries: list[Entry], others: dict[str, int]) -> str:
    return json.dumps({"features": [e.row() | {"folder": str(e.folder), "unreadable_shards": e.unreadable_shards}
                                    for e in entries], "other_folders": others}, indent=1)
