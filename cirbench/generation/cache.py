"""A content-addressed record of every text a model generated, so that runs can be replayed offline exactly.

A *request* is a JSON object saying everything that determines a generation: the task (``caption`` or
``rewrite``), the model id, the sha256 of the prompt template, the sampling parameters (temperature, number
of outputs, seed, ...) and the input (an image's sha256, or the caption and instruction). Its key is the
sha256 of its canonical JSON. Entries live in ``<cache>/generations/generations.jsonl``, one JSON object per
line: ``{"key", "request", "outputs": [...], "source", "created"}``; ``source`` says whether the outputs were
generated live (and by which endpoint) or imported from a published file. Lines are appended as
generations come back, so an interrupted run keeps what it paid for; a truncated last line is skipped.

Modes: ``auto`` uses a cached generation and generates what is missing; ``replay`` never calls a model, and a
request without a cached generation is an error naming the query; ``refresh`` generates everything again
(the new outputs replace the old ones for later runs).
"""

from __future__ import annotations

import json
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from ..errors import CirbenchError, CirbenchWarning
from ..util import default_cache_dir, json_hash, json_loads

GENERATION_MODES = ("auto", "replay", "refresh")
IMPORTED = "import:"  # the source of texts read from a published file: "import:<file name>"
FILE = "generations.jsonl"


class ReplayMiss(CirbenchError):
    """A replay run met a request that was never generated."""


def request_key(request: dict[str, Any]) -> str:
    return json_hash(request)


class GenerationCache:
    """The generations on disk, loaded once; thread-safe appends."""

    def __init__(self, folder: Path | None = None, mode: str = "auto"):
        if mode not in GENERATION_MODES:
            raise CirbenchError(f"unknown generation mode {mode!r}; valid: {', '.join(GENERATION_MODES)}")
        self.folder = Path(folder) if folder is not None else default_cache_dir() / "generations"
        self.path = self.folder / FILE
        self.mode = mode
        self.entries: dict[str, dict[str, Any]] = {}
        self.stats = {"cached": 0, "generated": 0, "imported": 0}
        self._lock = threading.Lock()
        self._torn = False  # the file ends inside a line (a run killed mid-write): the next append starts anew
        self._load()

    def _load(self) -> None:
        if not self.path.is_file():
            return
        bad = 0
        line = "\n"
        with open(self.path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    entry = json_loads(line)
                    key, outputs = entry["key"], entry["outputs"]
                    if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
                        raise ValueError
                except (ValueError, KeyError, TypeError):
                    bad += 1
                    continue
                self.entries[key] = entry  # later lines win (refresh, re-import)
        self._torn = not line.endswith("\n")
        if bad:
            warnings.warn(f"{self.path}: skipped {bad} unreadable line(s)", CirbenchWarning, stacklevel=2)

    def reload(self) -> None:
        self.entries.clear()
        self._load()

    def lookup(self, request: dict[str, Any], source_prefix: str = "") -> list[str] | None:
        """The cached outputs of ``request`` (``None`` in refresh mode or when absent, or when their ``source``
        does not start with ``source_prefix``: ``IMPORTED`` asks for published texts only)."""
        if self.mode == "refresh":
            return None
        entry = self.entries.get(request_key(request))
        if entry is not None and str(entry.get("source", "")).startswith(source_prefix):
            self.stats["cached"] += 1
            return list(entry["outputs"])
        return None

    def put(self, request: dict[str, Any], outputs: list[str], source: str, count_as: str = "generated") -> None:
        """Record outputs (appended to the file at once)."""
        self.put_many([(request, outputs)], source, count_as)

    def put_many(self, items: list[tuple[dict[str, Any], list[str]]], source: str,
                 count_as: str = "generated") -> None:
        """Record the outputs of several requests (a captioner's batch) with one write and one ``fsync``: on a
        network file system a sync per text would cost as much as generating it."""
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        entries: list[dict[str, Any]] = [{"key": request_key(request), "request": request, "outputs": list(outputs),
                                          "source": source, "created": created} for request, outputs in items]
        if not entries:
            return
        text = "".join(json.dumps(entry, ensure_ascii=False) + "\n" for entry in entries)
        with self._lock:
            for entry in entries:
                self.entries[entry["key"]] = entry
            self.stats[count_as] = self.stats.get(count_as, 0) + len(entries)
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as fh:
                    fh.write("\n" + text if self._torn else text)  # never glued to a torn last line
                    self._torn = False
                    fh.flush()
                    os.fsync(fh.fileno())
            except OSError as exc:
                raise CirbenchError(f"cannot record generations in {self.path}: {exc.strerror or exc}") from None

    def require_live(self, what: str) -> None:
        """Raise :class:`ReplayMiss` in replay mode (``what`` names the query and the missing generation)."""
        if self.mode == "replay":
            raise ReplayMiss(f"replay: no cached generation for {what} in {self.path}; run once with "
                             "--generation auto (live models), or import published generations")
