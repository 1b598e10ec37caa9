"""Reading images: bytes from disk, decoded with torchvision.io (PIL as a fallback for odd files).

Errors are :class:`~cirbench.errors.ImageError` naming the file, raised in the main process (workers
return the error text rather than crashing deep inside a DataLoader).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image

from .errors import ImageError
from .types import ImageRef


def decode_bytes(data: bytes | torch.Tensor, name: str = "<bytes>") -> torch.Tensor:
    """Decode encoded image bytes to a uint8 RGB ``[3,H,W]`` tensor; ImageError if they are not an image."""
    buf = data if isinstance(data, torch.Tensor) else torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if buf.numel() == 0:
        raise ImageError(f"image {name} is empty (0 bytes)")
    try:
        return decode_image(buf, mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        pass
    try:
        from PIL import Image

        with Image.open(io.BytesIO(buf.numpy().tobytes())) as im:
            rgb = im.convert("RGB")
            rgb.load()
        return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).contiguous()
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt files
        raise ImageError(f"corrupt or unreadable image {name}: {type(exc).__name__}: {exc}") from None


def read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ImageError(f"missing image {path}") from None
    except OSError as exc:
        raise ImageError(f"cannot read image {path}: {exc}") from None


def find_missing(images: Iterable[ImageRef]) -> list[ImageRef]:
    """The images whose files do not exist."""
    return [im for im in images if not os.path.isfile(im.path)]


def describe_missing(missing: Sequence[ImageRef], total: int, first: int = 5) -> str:
    names = ", ".join(str(m.path) for m in missing[:first])
    more = f" (and {len(missing) - first} more)" if len(missing) > first else ""
    return f"{len(missing)} of {total} images are missing: {names}{more}"


def check_inside(root: Path, path: Path, what: str = "image") -> Path:
    """Resolve ``path`` and make sure it stays inside ``root`` (no ``..`` or absolute escapes)."""
    root_resolved = Path(root).resolve()
    resolved = (root_resolved / path).resolve()
    if resolved != root_resolved and root_resolved not in resolved.parents:
        raise ImageError(f"{what} path {path} escapes the data root {root}")
    return resolved
