"""Reading images safely: bytes from disk inside the data root, headers probed before anything is decoded,
decoding with PIL (the official pipelines' decoder) or a tensor decoder (batched, GPU JPEG): torchvision.io
while it has its decoders (deprecated since torchvision 0.29), else TorchCodec, their successor, where it is
installed and loads; both decode JPEGs with libjpeg-turbo on the CPU and nvJPEG on CUDA (:func:`tensor_decoder`).

Errors are :class:`~cirbench.errors.ImageError` naming the file. Reader workers return the error text rather
than crashing deep inside a DataLoader; the main process raises it.
"""

from __future__ import annotations

import errno
import functools
import io
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ImageError
from .types import ImageRef

if TYPE_CHECKING:
    import torch

JPEG_MODES = ("RGB", "L")  # JPEGs the batched decoder turns into the same RGB pixels as PIL's convert("RGB")


def tensor_decodable(fmt: str, mode: str) -> bool:
    """Whether a file of this PIL format and mode decodes through the tensor decoder to the pixels PIL's
    ``convert("RGB")`` gives: JPEGs in :data:`JPEG_MODES`. Not other formats: on 16-bit PNGs torchvision returns
    uint16 and TorchCodec scales by 1/257 where PIL clips at 255, on animated GIFs both return every frame where
    PIL reads the first."""
    return fmt == "JPEG" and mode in JPEG_MODES


@functools.lru_cache(maxsize=4096)
def _real_dir(path: str) -> str:
    return os.path.realpath(path)


def _inside(root: str, real: str) -> bool:
    if os.environ.get("CIRBENCH_ALLOW_OUTSIDE_ROOT", "").strip() in ("1", "true", "yes"):
        return True
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


OUTSIDE_HINT = ("point --data-root at the real folder, or set CIRBENCH_ALLOW_OUTSIDE_ROOT=1 to follow links "
                "you trust")


def read_image_bytes(ref: ImageRef) -> bytes:
    """The file's bytes; ImageError if it is missing, unreadable, empty, or (when ``ref.root`` is set) if it
    or its folder is a link that leads outside the data root."""
    path = os.fspath(ref.path)
    root = os.fspath(ref.root) if ref.root is not None else None
    if root is not None:
        real_root = _real_dir(root)
        if not _inside(real_root, _real_dir(os.path.dirname(os.path.abspath(path)))):
            raise ImageError(f"image {path} is in a folder that links outside the data root {root}; {OUTSIDE_HINT}")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise ImageError(f"missing image {path}") from None
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise ImageError(f"cannot read image {path}: {exc.strerror or exc}") from None
        # the file itself is a symbolic link: allowed only if it stays inside the data root
        real = os.path.realpath(path)
        if root is not None and not _inside(_real_dir(root), real):
            raise ImageError(f"image {path} is a link that leads outside the data root {root}; "
                             f"{OUTSIDE_HINT}") from None
        try:
            fd = os.open(real, os.O_RDONLY)
        except OSError as exc2:
            raise ImageError(f"cannot read image {path}: {exc2.strerror or exc2}") from None
    try:
        with os.fdopen(fd, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ImageError(f"cannot read image {path}: {exc.strerror or exc}") from None
    if not data:
        raise ImageError(f"image {path} is empty (0 bytes)")
    return data


def probe(data: bytes, name: str) -> tuple[str, str, int, int]:
    """(format, mode, width, height) from the header alone, nothing decoded; ImageError if not an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return str(im.format), str(im.mode), int(im.size[0]), int(im.size[1])
    except Image.DecompressionBombError as exc:  # PIL's own check (twice its MAX_IMAGE_PIXELS) fired first
        raise ImageError(f"image {name} exceeds the pixel limit: {exc}") from None
    except UnidentifiedImageError:  # PIL's message names its BytesIO object, not the file
        raise ImageError(f"corrupt or unreadable image {name}: not an image format PIL reads (it starts with "
                         f"{data[:8]!r}, {len(data):,} bytes)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"corrupt or unreadable image {name}: {type(exc).__name__}: {exc}") from None


def refuse_over_limit(data: bytes, name: str, max_pixels: int) -> tuple[str, str, int, int]:
    """:func:`probe`'s header of ``data``; ImageError if it declares more than ``max_pixels`` pixels (nothing
    is decoded)."""
    header = probe(data, name)
    if header[2] * header[3] > max_pixels:
        raise ImageError(f"image {name} declares {header[2]}x{header[3]} pixels, over the pixel limit of "
                         f"{max_pixels:,} (--max-image-pixels)")
    return header


def open_pil(data: bytes, name: str, max_pixels: int):
    """A fully loaded PIL image, refused before decoding if its header declares more than ``max_pixels``."""
    from PIL import Image

    refuse_over_limit(data, name, max_pixels)
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
        return im
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt files
        raise ImageError(f"corrupt or unreadable image {name}: {type(exc).__name__}: {exc}") from None


IMAGE_DECODERS = ("auto", "torchcodec", "torchvision", "pil")


@dataclass(frozen=True)
class TensorDecoder:
    """A library that decodes JPEG bytes (1-D uint8 CPU tensors) into uint8 RGB ``[3, H, W]`` tensors:
    ``jpeg(data_or_list, device)`` decodes one JPEG or a list (one batched nvJPEG call on CUDA), and raises
    RuntimeError or ValueError on bytes it cannot decode. Other formats are PIL's (:func:`tensor_decodable`)."""

    name: str
    version: str
    jpeg: Callable[[Any, Any], Any]


def _torchcodec() -> TensorDecoder:
    import torchcodec
    from torchcodec.decoders import decode_jpeg

    def jpeg(data, device):
        return decode_jpeg(data, mode="RGB", device=device)

    return TensorDecoder("torchcodec", torchcodec.__version__, jpeg)


def _torchvision() -> TensorDecoder:
    import warnings

    import torchvision

    with warnings.catch_warnings():  # deprecated since 0.29 (see the module docstring), yet what 0.19-0.28 have
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg
    rgb = ImageReadMode.RGB
    return TensorDecoder("torchvision", torchvision.__version__,
                         lambda d, device: decode_jpeg(d, mode=rgb, device=device))


@functools.cache
def tensor_decoder() -> TensorDecoder | None:
    """The tensor decoder this process uses: ``$CIRBENCH_IMAGE_DECODER`` (``torchcodec``, ``torchvision`` or
    ``pil``: none) or, by default, torchvision.io while it has its decoders (the path whose GPU behaviour
    cirbench's stream handling was written for), else TorchCodec when it imports and decodes (its wheels are
    built for one torch release), else none (every image through PIL)."""
    import torch

    from .errors import CirbenchError, UnknownNameError
    from .util import one_line

    wanted = os.environ.get("CIRBENCH_IMAGE_DECODER", "").strip().lower() or "auto"
    if wanted not in IMAGE_DECODERS:
        raise UnknownNameError("image decoder (CIRBENCH_IMAGE_DECODER)", wanted, IMAGE_DECODERS)
    if wanted == "pil":
        return None
    makers = {"torchcodec": _torchcodec, "torchvision": _torchvision}
    tiny_jpeg = torch.frombuffer(bytearray(_tiny_jpeg()), dtype=torch.uint8)
    failures = []
    for name in (wanted,) if wanted != "auto" else ("torchvision", "torchcodec"):
        try:
            decoder = makers[name]()
            if tuple(decoder.jpeg(tiny_jpeg, "cpu").shape) != (3, 1, 2):
                raise RuntimeError("decoded a 2x1 JPEG to the wrong shape")
            return decoder
        except Exception as exc:  # noqa: BLE001 - missing, built for another torch, decoders removed: all the same
            failures.append(f"{name}: {type(exc).__name__}: {one_line(exc)[:120]}")
    if wanted != "auto":
        raise CirbenchError(f"CIRBENCH_IMAGE_DECODER={wanted} cannot decode here ({failures[0]})")
    return None


def _tiny_jpeg() -> bytes:
    """A 2x1 JPEG: what :func:`tensor_decoder` decodes to check that a library works in this process."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (2, 1), (200, 30, 60)).save(buf, "JPEG")
    return buf.getvalue()


def decode_bytes(data: bytes | torch.Tensor, name: str = "<bytes>", max_pixels: int | None = None) -> torch.Tensor:
    """Decode encoded image bytes to a uint8 RGB ``[3, H, W]`` tensor on the CPU, PIL's pixels: the tensor
    decoder for the files it decodes as PIL does (:func:`tensor_decodable`), PIL for the rest; ImageError if they
    are not an image or exceed ``max_pixels``."""
    import torch

    buf = data if isinstance(data, torch.Tensor) else torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if buf.numel() == 0:
        raise ImageError(f"image {name} is empty (0 bytes)")
    raw = buf.numpy().tobytes()
    fmt, mode, _, _ = probe(raw, name) if max_pixels is None else refuse_over_limit(raw, name, max_pixels)
    decoder = tensor_decoder() if tensor_decodable(fmt, mode) else None
    if decoder is not None:
        try:
            return decoder.jpeg(buf, "cpu")
        except (RuntimeError, ValueError):
            pass
    return rgb_tensor(open_pil(raw, name, max_pixels or (1 << 62)))


def rgb_tensor(image) -> torch.Tensor:
    """A PIL image as a uint8 RGB ``[3, H, W]`` tensor (``convert("RGB")``, then channels first)."""
    import numpy as np
    import torch

    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()


def load_image(ref: ImageRef, max_pixels: int = 1 << 28):
    """The PIL image a benchmark means by ``ref``: the file read safely and decoded, then its ``view``
    applied when it has one (mode as the file has it: callers convert)."""
    name = str(ref.path)
    image = open_pil(read_image_bytes(ref), name, max_pixels)
    if ref.view is None:
        return image
    try:
        return ref.view.apply(image)
    except Exception as exc:  # noqa: BLE001 - a bad box is the image's error, named
        raise ImageError(f"cannot take the view {ref.view.key} of image {name}: {type(exc).__name__}: {exc}") from None


def find_missing(images: Iterable[ImageRef]) -> list[ImageRef]:
    """The images whose files do not exist."""
    return [im for im in images if not os.path.isfile(im.path)]


def describe_missing(missing: Sequence[ImageRef], total: int, first: int = 5) -> str:
    """``"3 of 100 images are missing: /full/path/first.jpg, second.jpg, third.jpg"``."""
    if not missing:
        return f"0 of {total} images are missing"
    names = ", ".join([str(missing[0].path)] + [Path(m.path).name for m in missing[1:first]])
    more = f" (and {len(missing) - first} more)" if len(missing) > first else ""
    return f"{len(missing)} of {total} images are missing: {names}{more}"


def check_inside(root: Path, path: Path | str, what: str = "image") -> Path:
    """``root / path`` (absolute, normalised), refusing names that leave ``root`` (``..``, absolute paths) and
    folders that are links leading outside it. Files that are links are checked when they are read."""
    root_abs = os.path.abspath(root)
    text = os.fspath(path)
    if "\x00" in text:
        raise ImageError(f"{what} path {text!r} contains a NUL character")
    joined = os.path.normpath(os.path.join(root_abs, text))
    if not (joined == root_abs or joined.startswith(root_abs.rstrip(os.sep) + os.sep)):
        raise ImageError(f"{what} path {text} escapes the data root {root}")
    if not _inside(_real_dir(root_abs), _real_dir(os.path.dirname(joined))):
        raise ImageError(f"{what} path {text} is in a folder that links outside the data root {root}; "
                         f"{OUTSIDE_HINT}")
    return Path(joined)
