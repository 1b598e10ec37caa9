"""The on-disk feature cache that makes encoding happen once.

Layout (``--cache-dir``, default ``$CIRBENCH_CACHE`` or ``~/.cache/cirbench``)::

    features/<key hash>/key.json                 the full key of every feature in the folder
    features/<key hash>/shard-<id>.safetensors   rows: "features" [n, ...] float32 and "identities" (UTF-8 lines)

**The key** covers everything that changes a feature: backbone name, architecture-config hash, activation
and weights identity, preprocessing recipe, precision, and the feature kind (gallery feature, a method's own
reference feature with its checkpoint hash, ...). A folder whose ``key.json`` does not match is rebuilt.

**A row's identity** is the image file's absolute path, size, modification time, inode and status-change
time (one ``stat``): an in-place rewrite changes mtime and ctime (ctime cannot be set back by tools such as
``touch -d`` or ``rsync -t``), a rename-over changes the inode. The trade-off: ``chmod``/``chown``, copying the
data to another disk or restoring a backup also change inode/ctime and cost a re-encode, never a wrong row.
With ``identity="content"`` (``--cache-identity content``) a row is keyed by the sha256 of the file's bytes
instead: robust to anything, and features survive moving the data, but every file is read and hashed on
every run (about 10 s per 10 GB from the page cache, disk speed otherwise). Text rows (:meth:`FeatureCache.
text_rows`: a gallery's captions, a method's vocabulary) are keyed by the sha256 of the text.

**Integrity**: each shard records the sha256 of its payload; a shard whose payload, key or shape does not
match is deleted and its rows recomputed, never served. Shards are written (temporary file, then rename) as
encoding proceeds, so a killed run resumes where it stopped. If the cache cannot be written (read-only
folder, full disk), the run goes on with a warning and still produces its result.

**Parallel jobs** on one cache (a sweep run as a job array) take turns per key through a lock file beside the
folder (``features/.lock-<key hash>``, ``flock``): the first encodes what is missing, the others wait, with a
line saying so, and read its shards instead of encoding the same images again. Under torchrun the ranks do not
take turns (rank 0 alone writes, and every rank must see the same missing rows).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import uuid
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from . import distributed
from .errors import CirbenchWarning
from .types import ImageRef
from .util import (
    _UMASK,
    atomic_write_bytes,
    default_cache_dir,
    file_sha256,
    json_hash,
    json_object_file,
    making,
    sha256_bytes,
    tensor_bytes,
)

CACHE_FORMAT = 2
IDENTITIES = ("stat", "content")
COMPACT_ABOVE = 64  # shards in one folder before they are merged into one on the next load


class CacheWarning(CirbenchWarning):
    """The feature cache could not be read or written; the run goes on without it."""


def image_identity(ref: ImageRef, mode: str = "stat") -> str:
    """What identifies an image file's content (see the module docstring)."""
    path = ref.path if isinstance(ref.path, str) else str(ref.path)
    if not path.startswith(os.sep):  # dataset paths are absolute already: no normalisation for 100k+ images
        path = os.path.abspath(path)
    view = "" if ref.view is None else f"|view:{ref.view.key}"
    if mode == "content":
        try:
            return "sha256:" + file_sha256(path) + view
        except OSError:
            return f"{path}|missing"
    try:
        st = os.stat(path)
    except OSError:
        return f"{path}|missing"
    return f"{path}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_ctime_ns}{view}"


def key_hash(key: dict) -> str:
    return json_hash(key)


class _Folder:
    """The rows of one key, in memory: shard tensors and ``identity -> shard << 32 | row``."""

    def __init__(self) -> None:
        self.shards: list[torch.Tensor] = []
        self.where: dict[str, int] = {}
        self.files: set[str] = set()  # the shard files read or written: a later look reads only new ones

    def add(self, identities: Sequence[str], feats: torch.Tensor) -> None:
        base = len(self.shards) << 32
        self.shards.append(feats)
        self.where.update(zip(identities, range(base, base + len(identities)), strict=True))

    def gather(self, identities: Sequence[str]) -> torch.Tensor:
        if not identities:
            return torch.empty(0)
        codes = np.fromiter(map(self.where.__getitem__, identities), dtype=np.int64, count=len(identities))
        shard_of, row_of = codes >> 32, codes & 0xFFFFFFFF
        sample = self.shards[int(shard_of[0])]
        if (shard_of[0] == shard_of).all() and len(codes) == len(sample) and (row_of == np.arange(len(codes))).all():
            return sample.clone()  # one shard, in order (a warm rerun of the same list): a plain copy
        out = torch.empty((len(identities), *sample.shape[1:]), dtype=sample.dtype)
        for s in np.unique(shard_of):
            sel = np.nonzero(shard_of == s)[0]
            out[torch.from_numpy(sel)] = self.shards[int(s)][torch.from_numpy(row_of[sel])]
        return out


class FeatureCache:
    """Identity-keyed feature store on disk (see the module docstring)."""

    def __init__(self, root: Path | None = None, enabled: bool = True, writer: bool = True, identity: str = "stat"):
        if identity not in IDENTITIES:
            raise ValueError(f"unknown cache identity {identity!r}; valid: {', '.join(IDENTITIES)}")
        self.root = Path(root) if root is not None else default_cache_dir()
        self.enabled = enabled
        self.writer = writer  # under torchrun only rank 0 writes; every rank reads
        self.identity = identity
        self._memory: dict[str, _Folder] = {}
        self._lock = threading.Lock()
        self.stats = {"hits": 0, "misses": 0}  # text_hits and text_misses join them once texts are served
        self.write_error: str | None = None

    # -- folders and shards ---------------------------------------------------------------------------------
    def _folder(self, key: dict) -> Path:
        return self.root / "features" / key_hash(key)[:24]

    def _warn_write(self, exc: BaseException) -> None:
        if self.write_error is None:
            self.write_error = f"{type(exc).__name__}: {getattr(exc, 'strerror', None) or exc}"
            warnings.warn(f"the feature cache in {self.root} cannot be written ({self.write_error}); this run goes "
                          "on without caching", CacheWarning, stacklevel=3)

    def _load(self, key: dict) -> _Folder:
        h = key_hash(key)
        if h in self._memory:
            return self._memory[h]
        rows = self._memory[h] = _Folder()
        if not self.enabled:
            return rows
        folder = self._folder(key)
        if not folder.is_dir():
            return rows
        stored = json_object_file(folder / "key.json")
        if stored != json.loads(json.dumps(key, sort_keys=True, default=str)):
            if self.writer:
                warnings.warn(f"feature cache {folder} does not match its key; rebuilding it", CacheWarning,
                              stacklevel=3)
                shutil.rmtree(folder, ignore_errors=True)
            return rows
        good = self._read_new_shards(folder, h, rows)
        if self.writer:  # marks the entry used (`cirbench cache clear --unused-for` leaves it)
            with contextlib.suppress(OSError):
                os.utime(folder / "key.json")
        if self.writer and len(good) > COMPACT_ABOVE:
            self._compact(key, rows, good)
        return rows

    def _read_new_shards(self, folder: Path, h: str, rows: _Folder) -> list[Path]:
        """Add the rows of the shards in ``folder`` that ``rows`` has not read yet; return those shards."""
        good: list[Path] = []
        for shard in sorted(folder.glob("shard-*.safetensors")):
            if shard.name in rows.files:
                continue
            loaded = self._read_shard(shard, h)
            if loaded is None:
                continue
            rows.add(*loaded)
            rows.files.add(shard.name)
            good.append(shard)
        return good

    @contextlib.contextmanager
    def _encoding_turn(self, key: dict, rows: _Folder, identities: Sequence[str]):
        """Held while this process finds and encodes what the cache lacks: another process encoding the same
        key (a parallel job on this cache) finishes first, and the rows it stored are read instead of encoded
        again. Only a lone writer takes turns: torchrun ranks must all see the same missing rows."""
        if (not self.enabled or not self.writer or self.write_error is not None or distributed.is_distributed()
                or all(i in rows.where for i in identities)):
            yield
            return
        folder = self._folder(key)
        with making(folder, waiting=(
                f"waiting for another process that is encoding these features ({folder}); its rows will be used")):
            if folder.is_dir():
                self._read_new_shards(folder, key_hash(key), rows)
            yield

    def _read_shard(self, shard: Path, h: str) -> tuple[list[str], torch.Tensor] | None:
        from safetensors import safe_open

        try:
            with safe_open(str(shard), framework="pt") as fh:
                meta = fh.metadata() or {}
                if meta.get("format") != str(CACHE_FORMAT) or meta.get("key_hash") != h:
                    raise ValueError("shard key or format does not match")
                feats = fh.get_tensor("features")
                names = fh.get_tensor("identities")
            if sha256_bytes(tensor_bytes(feats), tensor_bytes(names)) != meta.get("sha256"):
                raise ValueError("payload checksum mismatch")
            identities = names.numpy().tobytes().decode("utf-8").split("\n") if names.numel() else []
            if feats.shape[0] != len(identities) or str(feats.shape[0]) != meta.get("rows"):
                raise ValueError("row count does not match")
            if feats.dtype != torch.float32:
                raise ValueError(f"unexpected dtype {feats.dtype}")
        except Exception as exc:  # noqa: BLE001 - a bad shard is dropped and recomputed, never served
            warnings.warn(f"dropping feature-cache shard {shard.name} ({exc}); its rows will be recomputed",
                          CacheWarning, stacklevel=4)
            if self.writer:
                with contextlib.suppress(OSError):  # not removable (a folder under that name): passed over each time
                    shard.unlink(missing_ok=True)
            return None
        return identities, feats

    def _write_shard(self, key: dict, identities: list[str], feats: torch.Tensor) -> Path | None:
        if not self.enabled or not self.writer or not identities or self.write_error is not None:
            return None
        from safetensors.torch import save_file

        folder = self._folder(key)
        feats = feats.detach().to(torch.float32).contiguous().cpu()
        names = torch.frombuffer(bytearray("\n".join(identities).encode("utf-8")), dtype=torch.uint8)
        meta = {"format": str(CACHE_FORMAT), "key_hash": key_hash(key), "rows": str(feats.shape[0]),
                "sha256": sha256_bytes(tensor_bytes(feats), tensor_bytes(names))}
        try:
            folder.mkdir(parents=True, exist_ok=True)
            manifest = folder / "key.json"
            if not manifest.exists():
                atomic_write_bytes(manifest, json.dumps(key, sort_keys=True, default=str, indent=1).encode())
            path = folder / f"shard-{uuid.uuid4().hex[:16]}.safetensors"
            tmp = folder / f".{path.name}.tmp"
            try:  # written straight to a file (serialising to bytes first costs another copy), then renamed
                save_file({"features": feats, "identities": names}, str(tmp), metadata=meta)
                os.chmod(tmp, 0o666 & ~_UMASK)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            return path
        except (OSError, RuntimeError) as exc:
            self._warn_write(exc)
            return None

    def _compact(self, key: dict, rows: _Folder, shards: list[Path]) -> None:
        identities = list(rows.where)
        merged = self._write_shard(key, identities, rows.gather(identities))
        if merged is not None:
            rows.files.add(merged.name)
            for shard in shards:
                shard.unlink(missing_ok=True)

    # -- the API ----------------------------------------------------------------------------------------
    def get_or_compute(
        self,
        key: dict,
        images: Sequence[ImageRef],
        compute: Callable[..., torch.Tensor],
    ) -> torch.Tensor:
        """Features for ``images`` (in order): cached rows where the key and identity match, and
        ``compute(missing_images, on_chunk)`` for the rest. ``compute`` may call ``on_chunk(positions,
        features)`` as rows finish (they are stored at once); rows it returns without reporting are stored
        when it returns."""
        return self._rows(key, [image_identity(im, self.identity) for im in images], images, compute)

    def text_rows(self, key: dict, texts: Sequence[str], compute: Callable[..., torch.Tensor]) -> torch.Tensor:
        """Features for ``texts`` (in order), as :meth:`get_or_compute` serves images: a row's identity is the
        sha256 of its text (``compute(missing_texts, on_chunk)`` encodes the rest). For texts met again across
        runs: a gallery's captions, a method's vocabulary."""
        return self._rows(key, ["text:" + sha256_bytes(t.encode("utf-8")) for t in texts], texts, compute, "text_")

    def _rows(self, key: dict, identities: list[str], items: Sequence, compute: Callable[..., torch.Tensor],
              counted: str = ""):
        rows = self._load(key)
        with self._encoding_turn(key, rows, identities):
            self._fill(key, rows, items, identities, compute, counted)
        return rows.gather(identities)

    def _fill(self, key: dict, rows: _Folder, items: Sequence, identities: list[str],
              compute: Callable[..., torch.Tensor], counted: str = "") -> None:
        """Compute and store the rows of ``items`` (images, texts) that ``rows`` lacks; count them in ``stats``
        (``hits``/``misses`` for images, ``text_hits``/``text_misses`` for texts)."""
        first = dict(zip(reversed(identities), reversed(items), strict=True))
        where = rows.where
        todo_ids = [i for i in dict.fromkeys(identities) if i not in where]
        self.stats[counted + "hits"] = self.stats.get(counted + "hits", 0) + len(first) - len(todo_ids)
        self.stats[counted + "misses"] = self.stats.get(counted + "misses", 0) + len(todo_ids)
        if todo_ids:
            todo = [first[i] for i in todo_ids]
            stored = np.zeros(len(todo), dtype=bool)

            def on_chunk(positions: torch.Tensor, feats: torch.Tensor) -> None:
                pos = positions.tolist()
                names = [todo_ids[p] for p in pos]
                with self._lock:
                    written = self._write_shard(key, names, feats)
                    rows.add(names, feats.detach().to(torch.float32).cpu())
                    if written is not None:
                        rows.files.add(written.name)
                    stored[pos] = True

            new = compute(todo, on_chunk)
            if not stored.all():
                left = np.nonzero(~stored)[0]
                if new is None or new.shape[0] != len(todo):
                    raise RuntimeError("compute returned a wrong number of rows")
                on_chunk(torch.from_numpy(left), new[torch.from_numpy(left)])
