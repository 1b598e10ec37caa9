"""Encoding image sets in batches, and the on-disk feature cache that makes encoding happen once.

Cache layout (``--cache-dir``, default ``$CIRBENCH_CACHE`` or ``~/.cache/cirbench``)::

    features/<key hash>/key.json                   the full key (manifest) of every feature in the folder
    features/<key hash>/shard-<id>.safetensors     rows of features + metadata: key hash, image identities

The key covers everything that changes a feature: backbone name, weights identity (hash or tag),
preprocessing recipe, precision, and the feature kind (gallery global feature, a method's own reference
feature with its checkpoint hash, ...). Each row is keyed by its image identity (resolved path, size,
mtime), so a changed image file is a miss. A folder whose ``key.json`` does not match, or a shard whose
metadata does not, is rebuilt, never served. Writes go to a temporary file first and are renamed into
place, so an interrupted run never leaves a shard that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .errors import ImageError
from .images import decode_bytes, read_bytes
from .preprocess import Preprocessor
from .types import ImageRef

CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("CIRBENCH_CACHE", Path.home() / ".cache" / "cirbench"))


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def image_identity(ref: ImageRef) -> str:
    """What identifies an image file's content cheaply: resolved path, size and mtime."""
    path = Path(ref.path)
    try:
        st = path.stat()
    except OSError:
        return f"{path.resolve()}|missing"
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class FeatureCache:
    """Identity-keyed feature store on disk (see the module docstring)."""

    def __init__(self, root: Path | None = None, enabled: bool = True, writer: bool = True):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.enabled = enabled
        self.writer = writer  # under torchrun only rank 0 writes; every rank reads
        self._memory: dict[str, dict[str, torch.Tensor]] = {}
        self.stats = {"hits": 0, "misses": 0}

    def _folder(self, key: dict) -> Path:
        return self.root / "features" / key_hash(key)[:24]

    def _load_folder(self, key: dict) -> dict[str, torch.Tensor]:
        h = key_hash(key)
        if h in self._memory:
            return self._memory[h]
        rows: dict[str, torch.Tensor] = {}
        self._memory[h] = rows
        if not self.enabled:
            return rows
        folder = self._folder(key)
        manifest = folder / "key.json"
        if folder.exists():
            try:
                stored = json.loads(manifest.read_text())
            except (OSError, json.JSONDecodeError):
                stored = None
            if stored != json.loads(json.dumps(key, sort_keys=True, default=str)) and self.writer:
                warnings.warn(f"feature cache {folder} does not match its key; rebuilding it", stacklevel=2)
                shutil.rmtree(folder, ignore_errors=True)
        for shard in sorted(folder.glob("shard-*.safetensors")) if folder.exists() else []:
            try:
                with safe_open(str(shard), framework="pt") as fh:
                    meta = fh.metadata() or {}
                    if meta.get("key_hash") != h:
                        raise ValueError("shard key does not match")
                    names = json.loads(meta["images"])
                    feats = fh.get_tensor("features")
                if feats.shape[0] != len(names):
                    raise ValueError("row count does not match")
            except Exception as exc:  # noqa: BLE001 - a bad shard is dropped, never served
                warnings.warn(f"dropping unreadable feature-cache shard {shard.name}: {exc}", stacklevel=2)
                shard.unlink(missing_ok=True)
                continue
            for name, row in zip(names, feats, strict=True):
                rows[name] = row
        return rows

    def _write_shard(self, key: dict, names: list[str], feats: torch.Tensor) -> None:
        if not self.enabled or not self.writer or not names:
            return
        folder = self._folder(key)
        folder.mkdir(parents=True, exist_ok=True)
        manifest = folder / "key.json"
        if not manifest.exists():
            atomic_write_bytes(manifest, json.dumps(key, sort_keys=True, default=str, indent=1).encode())
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".shard-", suffix=".tmp")
        os.close(fd)
        try:
            save_file({"features": feats.contiguous().cpu()}, tmp,
                      metadata={"key_hash": key_hash(key), "images": json.dumps(names)})
            os.replace(tmp, folder / f"shard-{uuid.uuid4().hex[:12]}.safetensors")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get_or_compute(
        self,
        key: dict,
        images: Sequence[ImageRef],
        compute: Callable[[list[ImageRef]], torch.Tensor],
    ) -> torch.Tensor:
        """Features for ``images`` (in order): cached rows where the key and image identity match,
        ``compute(missing_images)`` for the rest (then stored)."""
        rows = self._load_folder(key)
        names = [image_identity(im) for im in images]
        first = dict(zip(reversed(names), reversed(images), strict=True))  # identity -> its first image
        new_names = [n for n in dict.fromkeys(names) if n not in rows]
        todo = [first[n] for n in new_names]
        self.stats["hits"] += len(first) - len(todo)
        self.stats["misses"] += len(todo)
        if todo:
            new = compute(todo).float().cpu()
            self._write_shard(key, new_names, new)
            for n, row in zip(new_names, new, strict=True):
                rows[n] = row
        if not names:
            return torch.empty(0)
        return torch.stack([rows[n] for n in names])


class _ImageFiles(torch.utils.data.Dataset):
    """Reads, decodes and preprocesses images in DataLoader workers; errors come back as text."""

    def __init__(self, images: Sequence[ImageRef], preprocessor: Preprocessor):
        self.images = list(images)
        self.preprocessor = preprocessor

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        ref = self.images[index]
        try:
            return index, self.preprocessor(decode_bytes(read_bytes(ref.path), str(ref.path)))
        except ImageError as exc:
            return index, str(exc)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is reported with the file name
            return index, f"corrupt or unreadable image {ref.path}: {type(exc).__name__}: {exc}"


def _batch_error(errors: list[str]) -> ImageError:
    """One error for a batch with unreadable images: the first by name, and how many more."""
    more = f" (and {len(errors) - 1} more in this batch)" if len(errors) > 1 else ""
    return ImageError(errors[0] + more)


def _collate(batch: list[tuple[int, Any]]) -> tuple[list[int], Any]:
    indices = [i for i, _ in batch]
    errors = [x for _, x in batch if isinstance(x, str)]
    if errors:
        return indices, errors
    return indices, torch.stack([x for _, x in batch])


class _ImageBytes(torch.utils.data.Dataset):
    """Workers only read file bytes (the decode and preprocessing happen batched, on the device)."""

    def __init__(self, images: Sequence[ImageRef]):
        self.images = list(images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        ref = self.images[index]
        try:
            data = Path(ref.path).read_bytes()
        except OSError as exc:
            return index, f"cannot read image {ref.path}: {exc.strerror or exc}"
        return index, torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else f"image {ref.path} is empty"


def _collate_bytes(batch: list[tuple[int, Any]]) -> tuple[list[int], list[Any]]:
    return [i for i, _ in batch], [x for _, x in batch]


def decode_batch(datas: list[torch.Tensor], names: list[str], device: torch.device) -> list[torch.Tensor]:
    """Decode a batch of encoded images to uint8 RGB tensors on ``device``: JPEGs together through
    ``torchvision.io.decode_jpeg`` (on the GPU when ``device`` is CUDA), anything else, or a JPEG the
    batched decoder rejects, one by one on the CPU; a corrupt file raises ImageError naming it."""
    from torchvision.io import ImageReadMode, decode_jpeg

    out: list[torch.Tensor | None] = [None] * len(datas)
    jpeg = [i for i, d in enumerate(datas) if d.numel() > 3 and d[0] == 0xFF and d[1] == 0xD8]
    if jpeg:
        try:
            decoded = decode_jpeg([datas[i] for i in jpeg], mode=ImageReadMode.RGB, device=device)
            for i, img in zip(jpeg, decoded, strict=True):
                out[i] = img
        except RuntimeError:
            pass  # one bad file fails the whole batch: fall back to one by one, which names it
    for i, d in enumerate(datas):
        if out[i] is None:
            out[i] = decode_bytes(d, names[i]).to(device, non_blocking=True)
    return out  # type: ignore[return-value]


def _encode_batched(images, encode, preprocessor, batch_size, workers, desc, progress, device) -> torch.Tensor:
    loader = torch.utils.data.DataLoader(_ImageBytes(images), batch_size=batch_size, num_workers=workers,
                                         collate_fn=_collate_bytes, prefetch_factor=4 if workers else None,
                                         persistent_workers=False)
    outputs: list[torch.Tensor] = []
    with tqdm(total=len(images), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for indices, datas in loader:
            errors = [x for x in datas if isinstance(x, str)]
            if errors:
                raise _batch_error(errors)
            names = [str(images[i].path) for i in indices]
            pixels = preprocessor.batch(decode_batch(datas, names, device))
            with torch.no_grad():
                outputs.append(encode(pixels).float().cpu())
            bar.update(len(indices))
    return torch.cat(outputs)


def encode_images(
    images: Sequence[ImageRef],
    encode: Callable[[torch.Tensor], torch.Tensor],
    preprocessor: Preprocessor,
    batch_size: int = 64,
    workers: int = 2,
    desc: str = "encoding images",
    progress: bool = True,
    pin_memory: bool = False,
    path: str = "auto",
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Encode ``images`` in order with ``encode(pixels)``; a corrupt image raises ImageError naming it.

    ``path="workers"``: DataLoader workers read, decode and preprocess each image on the CPU (the official
    scripts' way). ``path="batched"``: workers only read bytes; JPEG decoding and preprocessing run on whole
    batches on ``device`` (the GPU path). ``"auto"`` picks ``batched`` on CUDA, ``workers`` otherwise.
    """
    if not images:
        return torch.empty(0)
    device = torch.device(device)
    if path == "auto":
        path = "batched" if device.type == "cuda" else "workers"
    if path == "batched":
        return _encode_batched(images, encode, preprocessor, batch_size, workers, desc, progress, device)
    if path != "workers":
        raise ValueError(f"unknown encode path {path!r}")
    loader = torch.utils.data.DataLoader(
        _ImageFiles(images, preprocessor),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
    outputs: list[torch.Tensor] = []
    with tqdm(total=len(images), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for _indices, batch in loader:
            if isinstance(batch, list):
                raise _batch_error(batch)
            with torch.no_grad():
                outputs.append(encode(batch).float().cpu())
            bar.update(len(_indices))
    return torch.cat(outputs)
