"""Image preprocessing equal to the official pipelines: ``targetpad`` (SEARLE, FTI4CIR), ``clip`` (the
backbone's own, as CLIP's ``_transform`` and open_clip's ``image_transform`` compose it) and ``hf-clip``
(transformers' ``CLIPImageProcessor``, which LinCIR's evaluation uses).

The official pipelines are PIL pipelines composed with torchvision transforms, or transformers' own::

    targetpad:  TargetPad(1.25) -> Resize(224, BICUBIC) -> CenterCrop(224) -> convert("RGB") -> ToTensor -> Normalize
    clip:                          Resize(224, BICUBIC) -> CenterCrop(224) -> convert("RGB") -> ToTensor -> Normalize
    hf-clip:    convert("RGB") ->  resize(224, BICUBIC) -> center_crop(224) -> rescale(1/255)  -> normalize

``hf-clip`` differs from ``clip`` in two places only: the RGB conversion comes first (a palette image is then
resized bicubically, not with the nearest neighbour PIL forces on palette images), and the crop offsets are
floored, ``(side - size) // 2``, where torchvision rounds them (one pixel apart for a 640x427 COCO image). Its
resize is PIL's very resize, and its rescale and normalisation give torchvision's float32 values. It follows
the ``CLIPImageProcessor`` of LinCIR's time (transformers 4.36: a plain ``convert("RGB")``); transformers 5
composites transparent images onto white before converting.

cirbench reproduces them in two ways that give the same bytes:

* :meth:`Preprocessor.pil_uint8` runs that very composition on a PIL image (torchvision's functional ops on
  PIL, RGB conversion *after* pad/resize/crop, so palette and RGBA images are handled as officially). The
  per-image CPU path uses it.
* :meth:`Preprocessor.batch` reproduces PIL's 8-bit resampling exactly on whole batches of decoded RGB images
  on any device. PIL resizes in two passes (horizontal, then vertical; Pillow 13 vertical first where the
  height shrinks by more than twice as many pixels as the width, :data:`PASS_ORDER`), each a sum of
  pixels times fixed-point coefficients (22 fractional bits) rounded to uint8. Both passes are integer matrix
  products here, in the order the installed Pillow runs them: the coefficients of every output pixel are
  computed exactly as PIL computes them (:func:`axis_taps`), padding (targetpad) and the centre crop are folded
  into the matrices, and the products are exact: float64 on the
  CPU; on a GPU, three products of the coefficients' signed 8-bit digits (:func:`_digits`) accumulated in
  float32: on bf16 tensor cores with float32 output where that kernel exists and a probe finds it exact, else
  in float32. Both are exact because every operand has at most 8 significant bits (bf16, TF32 and float32 hold
  it whole) and every partial sum is an integer below 2**24 (checked on the host for each batch,
  :func:`digit_sum_bound`; only an extreme downscale, a side of tens of thousands of pixels, exceeds it, and
  that batch takes float64). (bf16 products with bf16 output, as a plain ``torch.bmm`` of bf16 tensors
  returns, round sums to 8 significant bits and are never exact here.) One pair of batched products serves a
  chunk of images of any mix of sizes, each padded to the chunk's largest; a batch larger than one chunk is
  split into chunks of like sizes.

Given the same decoded pixels, both produce identical uint8 values, and :meth:`Preprocessor.normalize` then
applies ``ToTensor`` and ``Normalize`` with the same float32 operations as torchvision.

Resize geometry follows torchvision: the short side becomes ``size`` and the long side
``int(size * long / short)`` (floored); the crop offsets are ``int(round((side - size) / 2))`` (``hf-clip``:
``(side - size) // 2``).

One kind is computed in floating point instead, as its official code (JAX) computes it:

    magiclens:  convert("RGB") -> / max pixel value -> jax.image.resize(size x size, bilinear, antialias) -> normalize

MagicLens's ``process_img`` divides each image by its own largest pixel value (not by 255) and squashes it to a
square without keeping its aspect ratio; ``jax.image.resize`` weighs the input pixels with a triangle kernel
widened by the downscale factor (:func:`jax_linear_weights`, its ``compute_weight_mat``), in float32. Its pixels
are handed over as float32 (:meth:`Preprocessor.pil_float`), never as uint8, and take no batched JPEG path.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from .errors import ImageError, UnknownNameError
from .images import rgb_tensor
from .types import PREPROCESS_KINDS

INTERPOLATIONS = ("bicubic", "bilinear")
RESIZE_MODES = ("shortest", "squash")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold (Image.MAX_IMAGE_PIXELS)

PRECISION_BITS = 22  # PIL: 32 - 8 - 2
FLOAT_KINDS = ("magiclens",)  # resized in floating point (see the module docstring), handed over as float32


def targetpad_amounts(width: int, height: int, ratio: float) -> tuple[int, int, int, int]:
    """Padding (left, top, right, bottom) of SEARLE's ``TargetPad``: if ``max/min >= ratio``, each side of the
    short dimension gets ``int((max / ratio - short) / 2)``; otherwise nothing."""
    long_side, short_side = max(width, height), min(width, height)
    if short_side == 0 or long_side / short_side < ratio:
        return (0, 0, 0, 0)
    scaled = long_side / ratio
    hp = max(int((scaled - width) / 2), 0)
    vp = max(int((scaled - height) / 2), 0)
    return (hp, vp, hp, vp)


@lru_cache(maxsize=1024)
def jax_linear_weights(in_size: int, out_size: int) -> np.ndarray:
    """``[in_size, out_size]`` float32 weights of ``jax.image.resize(..., "bilinear", antialias=True)`` along one
    axis, as its ``compute_weight_mat`` makes them (scale ``out/in``, no translation): the triangle kernel,
    widened by the downscale factor, at half-pixel-centred sample positions, each column normalised to sum 1, and
    zero where the sample falls outside the input. Computed in float32, as JAX computes it (read-only: cached)."""
    f32 = np.float32
    inv_scale = f32(1.0 / (out_size / in_size))
    kernel_scale = max(inv_scale, f32(1.0))
    sample = (np.arange(out_size, dtype=np.int32) + f32(0.5)).astype(f32) * inv_scale - f32(0.5)
    x = np.abs(sample[np.newaxis, :] - np.arange(in_size, dtype=f32)[:, np.newaxis]) / kernel_scale
    weights = np.maximum(f32(0.0), f32(1.0) - np.abs(x)).astype(f32)
    total = weights.sum(axis=0, keepdims=True, dtype=f32)
    safe = np.where(total != 0, total, f32(1.0))
    weights = np.where(np.abs(total) > f32(1000.0) * np.finfo(np.float32).eps, weights / safe, f32(0.0))
    inside = (sample >= -0.5) & (sample <= in_size - 0.5)
    out = np.where(inside[np.newaxis, :], weights, f32(0.0)).astype(f32)
    out.setflags(write=False)
    return out


def jax_resize(pixels: np.ndarray, size: int) -> np.ndarray:
    """A float ``[C, H, W]`` image resized to ``[C, size, size]`` as ``jax.image.resize`` (bilinear, antialias)
    does, in float32: an axis whose length does not change is left as it is (JAX skips it). numpy's products, not
    torch's: reader workers run it, and torch's thread pool does not survive the fork that made them."""
    out = np.asarray(pixels, dtype=np.float32)
    h, w = out.shape[-2:]
    if h != size:
        out = np.matmul(jax_linear_weights(h, size).T, out)  # [size, H] @ [C, H, W] -> [C, size, W]
    if w != size:
        out = np.matmul(out, jax_linear_weights(w, size))  # [C, size, W] @ [W, size]
    return np.ascontiguousarray(out, dtype=np.float32)


@dataclass(frozen=True)
class Plan:
    """Where one image's pixels go: padding (left, top, right, bottom), size after resizing ``(w, h)``, and
    the top-left corner of the centre crop in the resized image."""

    width: int
    height: int
    pad: tuple[int, int, int, int]
    resized: tuple[int, int]
    crop: tuple[int, int]

    @property
    def padded(self) -> tuple[int, int]:
        left, top, right, bottom = self.pad
        return self.width + left + right, self.height + top + bottom

    @property
    def vertical_first(self) -> bool:
        """Whether the installed Pillow resizes this image's rows before its columns (:func:`pil_vertical_first`)."""
        return pil_vertical_first(*self.padded, *self.resized)


def _pass_order() -> str:
    import PIL

    version = tuple(int(part) for part in PIL.__version__.split(".")[:2] if part.isdigit())
    return "pillow-13" if version >= (13,) else "pillow-12.2" if version >= (12, 2) else "horizontal-first"


#: How the installed Pillow orders the two passes of a resize. Each pass rounds to uint8, so the order moves pixels
#: by a few grey levels, and the batched path follows the installed Pillow. Before 12.2: the horizontal pass first,
#: always. 12.2 and 12.3 (``Image.resize``): the vertical pass first for an image over 100 times taller than wide
#: whose height shrinks. 13 (``ImagingResampleInner``'s ``horizontal_first``): the vertical pass first where the
#: height shrinks by more than twice as many pixels as the width.
PASS_ORDER = _pass_order()


def pil_vertical_first(in_w: int, in_h: int, out_w: int, out_h: int, rule: str | None = None) -> bool:
    """Whether Pillow's ``resize`` of an ``in_w`` x ``in_h`` image to ``out_w`` x ``out_h`` runs the vertical pass
    first, under ``rule`` (a :data:`PASS_ORDER`; default: the installed Pillow's)."""
    rule = rule or PASS_ORDER
    if rule == "pillow-13":
        return in_h - out_h > 0 and in_h - out_h > 2 * (in_w - out_w)
    if rule == "pillow-12.2":
        return in_h > in_w * 100 and out_h < in_h
    return False


# -- PIL's resampling coefficients ----------------------------------------------------------------------
def _bicubic(x: np.ndarray) -> np.ndarray:
    # PIL's bicubic_filter with a = -0.5, evaluated in the same order (float64, no fused multiply-add)
    x = np.abs(x)
    near = ((1.5 * x - 2.5) * x) * x + 1.0
    far = ((((x - 5.0) * x) + 8.0) * x - 4.0) * -0.5
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


_FILTERS = {"bicubic": (_bicubic, 2.0), "bilinear": (_bilinear, 1.0)}


@lru_cache(maxsize=8192)
def axis_taps(real_len: int, pad_before: int, pad_after: int, out_len: int, start: int, count: int,
              interpolation: str = "bicubic") -> tuple[np.ndarray, np.ndarray]:
    """PIL's fixed-point resampling taps for one axis, with padding and crop folded in.

    The axis is ``real_len`` pixels, padded with ``pad_before``/``pad_after`` zeros, resized to ``out_len``;
    output pixels ``start .. start + count - 1`` are kept (the crop). Returns ``first[count]`` (the real-image
    index of each output's first tap, possibly negative) and ``coef[count, K]`` (int64 coefficients scaled by
    2**22, zero for taps that fall on padding or past the filter's window), exactly as Pillow's
    ``precompute_coeffs`` and ``normalize_coeffs_8bpc`` compute them.
    """
    filt, base_support = _FILTERS[interpolation]
    in_len = real_len + pad_before + pad_after
    scale = in_len / out_len
    filterscale = max(scale, 1.0)
    support = base_support * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    xx = np.arange(start, start + count, dtype=np.float64)
    center = (xx + 0.5) * scale
    ss = 1.0 / filterscale
    xmin = np.trunc(center - support + 0.5).astype(np.int64)
    xmin = np.maximum(xmin, 0)
    xmax = np.trunc(center + support + 0.5).astype(np.int64)
    xmax = np.minimum(xmax, in_len) - xmin
    taps = np.arange(ksize, dtype=np.int64)
    inside = taps[None, :] < xmax[:, None]
    w = filt(((taps[None, :] + xmin[:, None]).astype(np.float64) - center[:, None] + 0.5) * ss)
    w = np.where(inside, w, 0.0)
    ww = np.zeros(count, dtype=np.float64)
    for t in range(ksize):  # PIL sums the weights one tap after another: keep that order
        ww = ww + w[:, t]
    w = np.where(ww[:, None] != 0.0, w / np.where(ww == 0.0, 1.0, ww)[:, None], w)
    scaled = w * float(1 << PRECISION_BITS)
    coef = np.where(w < 0, np.trunc(-0.5 + scaled), np.trunc(0.5 + scaled)).astype(np.int64)
    first = xmin - pad_before
    real_index = first[:, None] + taps[None, :]
    coef = np.where(inside & (real_index >= 0) & (real_index < real_len), coef, 0)
    return first, coef


def resample_matrix(real_len: int, pad_before: int, pad_after: int, out_len: int, start: int, count: int,
                    interpolation: str = "bicubic") -> np.ndarray:
    """The dense ``[count, real_len]`` int64 matrix of :func:`axis_taps` (for tests and small images)."""
    first, coef = axis_taps(real_len, pad_before, pad_after, out_len, start, count, interpolation)
    dense = np.zeros((count, real_len), dtype=np.int64)
    for t in range(coef.shape[1]):
        idx = first + t
        ok = (idx >= 0) & (idx < real_len) & (coef[:, t] != 0)
        dense[np.nonzero(ok)[0], idx[ok]] = coef[ok, t]
    return dense


def _digits(coef: torch.Tensor) -> torch.Tensor:
    """Split int64 coefficients into three signed base-256 digits (each in [-128, 127], exact in bf16, TF32 and
    float32), stacked on a new leading axis: ``coef = d0 * 65536 + d1 * 256 + d2``."""
    d2 = torch.remainder(coef + 128, 256) - 128
    rest = torch.div(coef - d2, 256, rounding_mode="floor")
    d1 = torch.remainder(rest + 128, 256) - 128
    d0 = torch.div(rest - d1, 256, rounding_mode="floor")
    return torch.stack([d0, d1, d2])


def _combine_round(parts: torch.Tensor, axis: int, n: int) -> torch.Tensor:
    """PIL's ``clip8`` of the sums in ``parts``: ``(sum + 2**21) >> 22`` clamped to 0..255, as float64 (which
    holds every sum exactly). ``parts`` holds the whole sums (``n`` wide along ``axis``) or the three digit
    products side by side (``3 * n`` wide), recombined as ``a * 65536 + b * 256 + c``. One float64 tensor,
    updated in place: the digit products are read where they lie, never widened into copies of their own."""
    if parts.shape[axis] == n:
        total = parts.double()  # a product's own output: updated in place when it is float64 already
    else:
        a, b, c = (parts.narrow(axis, i * n, n) for i in range(3))
        total = c.to(torch.float64, copy=True).add_(b, alpha=256.0).add_(a, alpha=65536.0)
    return total.add_(float(1 << (PRECISION_BITS - 1))).div_(float(1 << PRECISION_BITS), rounding_mode="floor"
                                                             ).clamp_(0, 255)


PRODUCTS = ("auto", "float64", "digits-float32", "digits-bf16", "digits-float64")
FLOAT32_EXACT = 1 << 24  # every integer up to here is exact in float32, and so in a float32 accumulator
_OPERANDS = {"float64": torch.float64, "digits-float32": torch.float32, "digits-bf16": torch.bfloat16,
             "digits-float64": torch.float64}


def digit_sum_bound(coef: torch.Tensor) -> int:
    """The largest magnitude a partial sum of the digit products can reach for these taps (``coef[..., K]``,
    int64): 255 (the largest pixel) times the largest sum of digit magnitudes over one output's taps. The
    float32-accumulated digit products are exact while it stays below 2**24 (about 2**20 for a 4,000-pixel
    side)."""
    return _digits_bound(_digits(coef))


def _digits_bound(digits: torch.Tensor) -> int:
    """:func:`digit_sum_bound` of taps already split into digits (``[3, ..., K]``)."""
    return 255 * int(digits.abs().sum(dim=-1).max()) if digits.numel() else 0


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A batched product; bf16 operands are accumulated into and returned as float32 (``out_dtype``)."""
    if a.dtype == torch.bfloat16:
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a, b)


_BF16_EXACT: dict[str, bool] = {}
_PROBE_LOCK = threading.Lock()


def bf16_digit_products_are_exact(device: torch.device) -> bool:
    """Whether bf16 products with float32 output (``torch.bmm(..., out_dtype=torch.float32)``, bf16 tensor
    cores) run on ``device`` and sum the digit products exactly: checked once per device on the batched path's
    own shapes and worst-case values against float64 products, then on a real mixed-size chunk (its operands'
    layouts) against the float64 pixels. The CPU has no such kernel."""
    device = torch.device(device)
    if device.type == "cpu":
        return False
    key = str(device)
    with _PROBE_LOCK:
        if key not in _BF16_EXACT:
            _BF16_EXACT[key] = _probe_bf16_digits(device)
        return _BF16_EXACT[key]


def _probe_bf16_digits(device: torch.device) -> bool:
    gen = torch.Generator().manual_seed(1234)
    x = torch.randint(0, 256, (4, 1920, 640), generator=gen)
    w = torch.randint(-128, 128, (4, 640, 672), generator=gen)
    w[:, 13:, :] = 0  # one output's taps are a window (13 of them here), as in the real matrices
    w[:, :13, ::5] = -128  # the largest magnitudes: sums reach 255 * 128 * 13, about 2**19
    x, w = x.to(device), w.to(device)
    try:
        got = _bmm(x.to(torch.bfloat16), w.to(torch.bfloat16))
    except (RuntimeError, TypeError, NotImplementedError):  # no out_dtype kernel in this torch or on this device
        return False
    if got.dtype != torch.float32 or not bool(torch.equal(got.double(), torch.bmm(x.double(), w.double()))):
        return False
    # and on the real operands (transposed, sliced matrices of mixed-size chunks) through the real code: the same
    # pixels as float64 products, which a kernel that mishandled those strides would not give
    images = [torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8).to(device)
              for h, w in ((480, 640), (640, 427), (375, 500))]
    pre = Preprocessor("targetpad", 224)
    plans = [pre.plan(int(im.shape[-1]), int(im.shape[-2])) for im in images]
    return all(torch.equal(pre._resample(images, plans, "digits-bf16", rows_first),
                           pre._resample(images, plans, "float64", rows_first))
               for rows_first in (False, True))  # both pass orders' operands


def auto_products(device: torch.device) -> str:
    """float64 on the CPU (as fast as the digits there, which triple the work); on a GPU, the bf16 digits where
    they are exact (:func:`bf16_digit_products_are_exact`), else the float32 digits (exact on any GPU)."""
    if torch.device(device).type == "cpu":
        return "float64"
    return "digits-bf16" if bf16_digit_products_are_exact(device) else "digits-float32"


@dataclass(frozen=True)
class Preprocessor:
    """A preprocessing recipe (see the module docstring); :meth:`identity` goes into every feature-cache key.

    ``max_pixels`` bounds what one image may cost: an image whose declared size, or whose size after padding
    and resizing, exceeds it is refused with an :class:`~cirbench.errors.ImageError` before anything is
    decoded or allocated (a 30000x1 image would otherwise be resized to 6,720,000x224).
    """

    kind: str = "clip"
    size: int = 224
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    ratio: float = 1.25
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.kind not in PREPROCESS_KINDS:
            raise UnknownNameError("preprocessing", self.kind, PREPROCESS_KINDS)
        if self.interpolation not in INTERPOLATIONS:
            raise UnknownNameError("interpolation", self.interpolation, INTERPOLATIONS)
        if self.resize_mode not in RESIZE_MODES:
            raise UnknownNameError("resize mode", self.resize_mode, RESIZE_MODES)

    @property
    def floating(self) -> bool:
        """Whether this kind resizes in floating point and hands its pixels over as float32 (``magiclens``)."""
        return self.kind in FLOAT_KINDS

    def identity(self) -> dict:
        if self.floating:
            return {"kind": self.kind, "size": self.size, "mean": list(self.mean), "std": list(self.std),
                    "scale": "per-image-max", "interpolation": "jax-bilinear-antialias", "resize": "squash",
                    "rgb": "first"}
        hf = self.kind == "hf-clip"
        ident = {"kind": self.kind, "size": self.size, "mean": list(self.mean), "std": list(self.std),
                 "interpolation": f"pil-{self.interpolation}", "resize": self.resize_mode,
                 "long_side": "floor", "crop": "center-floor" if hf else "center",
                 "rgb": "first" if hf else "after-crop"}
        if self.kind == "targetpad":
            ident["ratio"] = self.ratio
        elif PASS_ORDER != "horizontal-first":  # other pixels for some shapes (targetpad's never qualify)
            ident["pass_order"] = PASS_ORDER
        return ident

    # -- geometry --------------------------------------------------------------------------------------
    def plan(self, width: int, height: int) -> Plan:
        """The official geometry for a ``width`` x ``height`` image; ImageError if it exceeds ``max_pixels``."""
        if width <= 0 or height <= 0:
            raise ImageError(f"image has no pixels ({width}x{height})")
        if width * height > self.max_pixels:
            raise ImageError(f"image of {width}x{height} pixels exceeds the pixel limit of {self.max_pixels:,} "
                             "(--max-image-pixels)")
        pad = targetpad_amounts(width, height, self.ratio) if self.kind == "targetpad" else (0, 0, 0, 0)
        pw, ph = width + pad[0] + pad[2], height + pad[1] + pad[3]
        if self.resize_mode == "squash" or self.floating:
            rw, rh = self.size, self.size
        else:
            short, long = (pw, ph) if pw <= ph else (ph, pw)
            new_long = int(self.size * long / short)
            rw, rh = (self.size, new_long) if pw <= ph else (new_long, self.size)
        if rw * rh > self.max_pixels:
            raise ImageError(f"image of {width}x{height} pixels would be resized to {rw}x{rh}, over the pixel "
                             f"limit of {self.max_pixels:,} (--max-image-pixels)")
        if self.kind == "hf-clip":  # transformers' center_crop floors the offsets
            crop = ((rw - self.size) // 2, (rh - self.size) // 2)
        else:  # torchvision's CenterCrop rounds them
            crop = (int(round((rw - self.size) / 2.0)), int(round((rh - self.size) / 2.0)))
        return Plan(width, height, pad, (rw, rh), crop)

    # -- the official per-image path (PIL) ---------------------------------------------------------------
    def pil_uint8(self, image) -> torch.Tensor:
        """The official composition on a PIL image: uint8 ``[3, size, size]`` (before ToTensor/Normalize)."""
        import torchvision.transforms.functional as TF
        from torchvision.transforms import InterpolationMode

        if self.floating:
            raise ValueError(f"preprocessing '{self.kind}' works in floating point: use pil_float")
        plan = self.plan(*image.size)
        if self.kind == "hf-clip":
            image = image.convert("RGB")
        if any(plan.pad):
            image = TF.pad(image, list(plan.pad), 0, "constant")
        mode = InterpolationMode.BICUBIC if self.interpolation == "bicubic" else InterpolationMode.BILINEAR
        target = [self.size, self.size] if self.resize_mode == "squash" else self.size
        image = TF.resize(image, target, interpolation=mode)
        return rgb_tensor(TF.crop(image, plan.crop[1], plan.crop[0], self.size, self.size))

    def pil_float(self, image) -> torch.Tensor:
        """A floating kind's official composition on a PIL image (or a uint8 ``[3, H, W]`` RGB tensor): float32
        ``[3, size, size]`` before normalisation (``magiclens``: divided by its largest pixel value, then
        :func:`jax_resize`d)."""
        if not self.floating:
            raise ValueError(f"preprocessing '{self.kind}' is computed on uint8 pixels: use pil_uint8")
        rgb = image.cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image.convert("RGB")).transpose(
            2, 0, 1)
        self.plan(int(rgb.shape[-1]), int(rgb.shape[-2]))  # the pixel limit
        pixels = rgb.astype(np.float32)
        pixels = pixels / (pixels.max() + np.float32(1e-12))  # MagicLens's process_img: ima / (ima.max() + 1e-12)
        return torch.from_numpy(jax_resize(pixels, self.size))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """``ToTensor`` then ``Normalize``, in float32, on uint8-valued ``[..., 3, H, W]`` pixels (a floating
        kind's pixels, already in [0, 1]: ``Normalize`` alone)."""
        mean, std = _per_channel(self.mean, pixels.device), _per_channel(self.std, pixels.device)
        if self.floating:
            return pixels.to(torch.float32).sub(mean).div_(std)
        return pixels.to(torch.float32).div(255).sub_(mean).div_(std)  # torchvision's operations, in its order

    def from_pil(self, image) -> torch.Tensor:
        """A normalised float32 ``[3, size, size]`` tensor from a PIL image (the official pipeline; a floating kind
        takes a uint8 ``[3, H, W]`` RGB tensor too, as :meth:`pil_float` does)."""
        if self.floating:
            return self.normalize(self.pil_float(image))
        return self.normalize(self.pil_uint8(image))

    def from_bytes(self, data: bytes, name: str, key: str = "") -> torch.Tensor:
        """The normalised float32 tensor of one encoded image (``key``, a random augmentation's draw, is unused
        here), the pixels of :meth:`from_pil` on the file: JPEGs the tensor decoder reads as PIL does go through
        it and the batched resize, other files through PIL, resized in their own mode as the official transforms
        do (converted to RGB after the crop). ImageError if it is not an image or exceeds ``max_pixels``."""
        from .images import decode_bytes, open_pil, refuse_over_limit, tensor_decodable

        fmt, mode, _, _ = refuse_over_limit(data, name, self.max_pixels)
        if tensor_decodable(fmt, mode):
            return self(decode_bytes(data, name))
        return self.from_pil(open_pil(data, name, self.max_pixels))

    def __call__(self, image) -> torch.Tensor:
        """Preprocess one image (a PIL image, or a uint8 ``[C, H, W]`` RGB tensor) to normalised float32."""
        if isinstance(image, torch.Tensor) and not self.floating:
            return self.normalize(self.batch_uint8([image])[0])
        return self.from_pil(image)

    # -- the batched path (any device) --------------------------------------------------------------------
    def batch_uint8(self, images: Sequence[torch.Tensor], chunk: int = 64, products: str = "auto") -> torch.Tensor:
        """Resize and crop a list of uint8 RGB ``[3, H, W]`` tensors (any sizes, one device) exactly as PIL
        would: a uint8-valued float32 ``[B, 3, size, size]`` batch on the images' device.

        ``products``: ``"float64"`` (one exact float64 product per pass); ``"digits-float32"`` (three float32
        products of 8-bit coefficient digits per pass, exact on any device, see the module docstring);
        ``"digits-bf16"`` (the same digits on bf16 tensor cores with float32 output, where
        :func:`bf16_digit_products_are_exact`); ``"digits-float64"`` (the digit layout in float64, for tests);
        ``"auto"``: :func:`auto_products`. A batch whose float32 sums could exceed 2**24 (an extreme downscale)
        takes float64 whatever was asked.
        """
        if self.floating:
            raise ValueError(f"preprocessing '{self.kind}' works in floating point: use pil_float")
        if not images:
            return torch.empty(0, 3, self.size, self.size)
        if products not in PRODUCTS:
            raise ValueError(f"unknown products {products!r}; valid: {', '.join(PRODUCTS)}")
        plans = [self.plan(int(im.shape[-1]), int(im.shape[-2])) for im in images]
        if len(images) <= chunk and len({p.vertical_first for p in plans}) == 1:  # the usual batch: one product pair
            return self._resample(list(images), plans, products, plans[0].vertical_first)
        # chunks of one pass order and like sizes: each chunk's products run over its largest image, so a mixed
        # chunk pays for every image as if it were the tallest and widest (and for each order apart)
        keys = [(p.vertical_first, p.height, p.width) for p in plans]
        order = sorted(range(len(images)), key=keys.__getitem__)
        chunks: list[list[int]] = []
        for i in order:
            if not chunks or len(chunks[-1]) == chunk or keys[chunks[-1][0]][0] != keys[i][0]:
                chunks.append([])
            chunks[-1].append(i)
        by_size = torch.cat([self._resample([images[i] for i in part], [plans[i] for i in part], products,
                                            keys[part[0]][0]) for part in chunks])
        result = torch.empty_like(by_size)
        result[host_to_device(torch.tensor(order), by_size.device)] = by_size
        return result

    def batch(self, images: Sequence[torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """:meth:`batch_uint8` then :meth:`normalize`, cast to ``dtype``."""
        return self.normalize(self.batch_uint8(images)).to(dtype)

    def _resample(self, images: list[torch.Tensor], plans: list[Plan], products: str, vertical_first: bool
                  ) -> torch.Tensor:
        """Both passes over images of one pass order (their ``plans``), as two batched products."""
        images = [im if im.shape[0] == 3 else im[:1].expand(3, -1, -1) for im in images]
        device = images[0].device
        s = self.size
        hmax = max(int(im.shape[-2]) for im in images)
        wmax = max(int(im.shape[-1]) for im in images)
        h_first, h_coef = self._taps(plans, horizontal=True)
        v_first, v_coef = self._taps(plans, horizontal=False)
        if products == "auto":
            products = auto_products(device)
        if products.startswith("digits-"):  # the coefficients' digits, planes stacked along the rows
            h_digits, v_digits = _digits(h_coef), _digits(v_coef)
            if max(_digits_bound(h_digits), _digits_bound(v_digits)) >= FLOAT32_EXACT:
                products = "float64"  # an extreme downscale: float32 sums could round, float64 cannot
            else:
                h_coef, v_coef = h_digits, v_digits
        compute = _OPERANDS[products]
        wh = _dense(h_first, h_coef, wmax, device, compute)  # [B, P*S, Wmax], P = 1 or 3 planes
        wv = _dense(v_first, v_coef, hmax, device, compute)  # [B, P*S, Hmax]
        if all(im.shape[-2:] == images[0].shape[-2:] for im in images):  # one size (the usual chunk): one copy
            x = torch.stack(images).permute(0, 2, 1, 3).to(compute, memory_format=torch.contiguous_format)
        else:
            x = self._canvas(images, hmax, wmax, compute)
        b = len(images)
        if vertical_first:
            cols = _combine_round(_bmm(wv, x.view(b, hmax, 3 * wmax)), 1, s)  # [B, S, 3*Wmax]
            cols = cols.reshape(b, s * 3, wmax).to(compute)
            out = _combine_round(_bmm(cols, wh.transpose(1, 2)), 2, s)  # [B, 3*S, S]
        else:
            rows = _combine_round(_bmm(x.view(b, hmax * 3, wmax), wh.transpose(1, 2)), 2, s)  # [B, 3*Hmax, S]
            rows = rows.reshape(b, hmax, 3 * s).to(compute)
            out = _combine_round(_bmm(wv, rows), 1, s)  # [B, S, 3*S]
        return out.reshape(b, s, 3, s).permute(0, 2, 1, 3).to(torch.float32, memory_format=torch.contiguous_format)

    @staticmethod
    def _canvas(images: list[torch.Tensor], hmax: int, wmax: int, dtype: torch.dtype) -> torch.Tensor:
        """Images of several sizes on one ``[B, Hmax, 3, Wmax]`` canvas, top-left aligned, margins zero."""
        x = torch.empty(len(images), hmax, 3, wmax, dtype=dtype, device=images[0].device)
        for b, im in enumerate(images):
            h, w = int(im.shape[-2]), int(im.shape[-1])
            x[b, :h, :, :w] = im.permute(1, 0, 2)
            if h < hmax:  # the margins of a smaller image: their coefficients are 0, and 0 * NaN is not
                x[b, h:] = 0
            if w < wmax:
                x[b, :h, :, w:] = 0
        return x

    def _taps(self, plans: list[Plan], horizontal: bool) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for p in plans:
            if horizontal:
                rows.append(axis_taps(p.width, p.pad[0], p.pad[2], p.resized[0], p.crop[0], self.size,
                                      self.interpolation))
            else:
                rows.append(axis_taps(p.height, p.pad[1], p.pad[3], p.resized[1], p.crop[1], self.size,
                                      self.interpolation))
        k = max(c.shape[1] for _, c in rows)
        first = np.stack([f for f, _ in rows])
        coef = np.zeros((len(rows), self.size, k), dtype=np.int64)
        for i, (_, c) in enumerate(rows):
            coef[i, :, : c.shape[1]] = c
        return torch.from_numpy(first), torch.from_numpy(coef)


@dataclass(frozen=True)
class RandomResizedCrop:
    """The training-time transform of CLIP-style training code (Pic2Word's ``_transform(is_train=True)``, as
    open_clip's): torchvision's ``RandomResizedCrop(size, scale, ratio=(3/4, 4/3), BICUBIC)`` on the PIL image,
    then ``convert("RGB")``, ``ToTensor`` and ``Normalize`` with ``base``'s size, mean and std.

    Where the official code draws each crop from the DataLoader worker's global random state, each sample's crop
    here comes from that same torchvision code run under a seed made from ``seed`` and the sample's ``key`` (its
    epoch and place in the corpus): the crops then depend neither on the number of readers or ranks nor on
    whether the run was stopped and resumed, while every epoch and every sample draws its own."""

    base: Preprocessor
    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    seed: int = 0

    @property
    def max_pixels(self) -> int:
        return self.base.max_pixels

    def identity(self) -> dict:
        return {"kind": "random-resized-crop", "size": self.base.size, "scale": list(self.scale),
                "ratio": list(self.ratio), "mean": list(self.base.mean), "std": list(self.base.std),
                "interpolation": "pil-bicubic", "rgb": "after-crop", "seed": self.seed}

    def sample_seed(self, key: str) -> int:
        from .util import keyed_seed

        return keyed_seed(self.seed, key)

    def from_bytes(self, data: bytes, name: str, key: str) -> torch.Tensor:
        """:meth:`__call__` on one encoded image, decoded with PIL as the official training transform reads it;
        ImageError if it is not an image or exceeds ``max_pixels``."""
        from .images import open_pil

        return self(open_pil(data, name, self.max_pixels), key)

    def __call__(self, image, key: str) -> torch.Tensor:
        """The normalised float32 ``[3, size, size]`` tensor of a PIL ``image``, cropped as ``key`` draws."""
        import torchvision.transforms.functional as TF
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import RandomResizedCrop as Crop

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.sample_seed(key))
            top, left, height, width = Crop.get_params(image, list(self.scale), list(self.ratio))
        size = self.base.size
        image = TF.resized_crop(image, top, left, height, width, [size, size], InterpolationMode.BICUBIC)
        return self.base.normalize(rgb_tensor(image))


@lru_cache(maxsize=64)
def _per_channel(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """``values`` as a float32 ``[C, 1, 1]`` tensor on ``device``, made once: building it from a list for every
    batch is a copy from pageable memory, which waits for everything queued on the stream."""
    return torch.tensor(values, dtype=torch.float32, device=device).view(-1, 1, 1)


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A (small) host tensor on ``device``; on CUDA through pinned memory, without waiting for the device."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _dense(first: torch.Tensor, coef: torch.Tensor, length: int, device: torch.device, dtype: torch.dtype
           ) -> torch.Tensor:
    """Scatter compact taps ``first[B, S]`` and ``coef[B, S, K]`` (or ``coef[P, B, S, K]``: ``P`` digit planes)
    into dense ``[B, P*S, length]`` matrices of ``dtype`` on ``device``, the planes stacked along the rows
    (invalid taps go to a dummy column that is dropped). The values are exact in ``dtype``: whole coefficients in
    float64, digits in any of the operand types."""
    if coef.dim() == 3:
        coef = coef.unsqueeze(0)
    planes, batch, rows, k = coef.shape
    coef = coef.permute(1, 0, 2, 3).reshape(batch, planes * rows, k)
    first = host_to_device(first.repeat(1, planes), device)
    coef = host_to_device(coef.to(dtype), device)
    idx = first.unsqueeze(-1) + torch.arange(k, device=device)
    valid = (idx >= 0) & (idx < length) & (coef != 0)
    idx = torch.where(valid, idx, torch.full_like(idx, length))
    dense = torch.zeros(batch, planes * rows, length + 1, dtype=dtype, device=device)
    dense.scatter_(2, idx, torch.where(valid, coef, torch.zeros_like(coef)))
    return dense[..., :length]
