"""Image preprocessing on tensors: ``targetpad`` (SEARLE, FTI4CIR) and ``clip`` (the backbone's own).

Both work on uint8 ``[3, H, W]`` tensors (one image, CPU workers) or on a list of them (a batch, on any
device, e.g. straight after GPU JPEG decoding). The steps follow the official PIL pipelines:

* ``targetpad``: if ``max(w, h) / min(w, h) >= ratio`` (1.25), zero-pad the short side symmetrically until
  the ratio is exactly ``ratio``; then resize the short side to ``size`` (bicubic), center-crop, normalise.
* ``clip``: resize the short side to ``size`` (bicubic), center-crop, normalise (open_clip's default).

Resizing uses torchvision's antialiased bicubic, which follows PIL's filter; values differ from PIL by
rounding only (PIL rounds to uint8 after resizing, this keeps float).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from .errors import UnknownNameError

PREPROCESS_KINDS = ("targetpad", "clip")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def targetpad_amounts(width: int, height: int, ratio: float) -> tuple[int, int, int, int]:
    """Padding (left, top, right, bottom) that brings an image to aspect ratio ``ratio`` (or none)."""
    long_side, short_side = max(width, height), min(width, height)
    if short_side == 0 or long_side / short_side < ratio:
        return (0, 0, 0, 0)
    # the official TargetPad: each side gets int((long / ratio - short) / 2), the same on both sides
    half = max(int((long_side / ratio - short_side) / 2), 0)
    if width < height:
        return (half, 0, half, 0)
    return (0, half, 0, half)


@dataclass(frozen=True)
class Preprocessor:
    """A preprocessing recipe; its :meth:`identity` goes into every feature-cache key."""

    kind: str = "clip"
    size: int = 224
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    ratio: float = 1.25

    def __post_init__(self) -> None:
        if self.kind not in PREPROCESS_KINDS:
            raise UnknownNameError("preprocessing", self.kind, PREPROCESS_KINDS)

    def identity(self) -> dict:
        ident = {"kind": self.kind, "size": self.size, "mean": list(self.mean), "std": list(self.std),
                 "interpolation": "bicubic-antialias", "crop": "center"}
        if self.kind == "targetpad":
            ident["ratio"] = self.ratio
        return ident

    def geometry(self, image: torch.Tensor) -> torch.Tensor:
        """Pad (targetpad), resize short side to ``size`` and center-crop one uint8 ``[C,H,W]`` image.

        Returns float32 in [0, 255] (not yet normalised).
        """
        if image.ndim != 3:
            raise ValueError(f"expected a [C,H,W] image, got shape {tuple(image.shape)}")
        return self._geometry_batch(image.unsqueeze(0)).squeeze(0)

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """Scale [0,255] floats to [0,1] and apply mean/std (works on ``[C,H,W]`` or ``[B,C,H,W]``)."""
        mean = torch.tensor(self.mean, device=batch.device, dtype=batch.dtype).view(-1, 1, 1)
        std = torch.tensor(self.std, device=batch.device, dtype=batch.dtype).view(-1, 1, 1)
        return (batch / 255.0 - mean) / std

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Preprocess one uint8 ``[C,H,W]`` image to a normalised float32 ``[3,size,size]`` tensor."""
        return self.normalize(self.geometry(image))

    def batch(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """Preprocess a list of uint8 images (any device) to one normalised ``[B,3,size,size]`` batch.

        Images of the same size are padded, resized and cropped together (one kernel launch per size group
        instead of one per image: COCO-like galleries have few distinct sizes).
        """
        if not images:
            return torch.empty(0, 3, self.size, self.size)
        out: list[torch.Tensor | None] = [None] * len(images)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault(tuple(im.shape), []).append(i)
        for idx in groups.values():
            stacked = torch.stack([images[i] for i in idx])
            for i, geo in zip(idx, self._geometry_batch(stacked), strict=True):
                out[i] = geo
        return self.normalize(torch.stack(out))  # type: ignore[arg-type]

    def _geometry_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """:meth:`geometry` for a ``[B,C,H,W]`` batch of same-size images."""
        if batch.shape[1] == 1:
            batch = batch.expand(-1, 3, -1, -1)
        elif batch.shape[1] == 4:
            batch = batch[:, :3]
        height, width = batch.shape[-2:]
        if self.kind == "targetpad":
            left, top, right, bottom = targetpad_amounts(width, height, self.ratio)
            if left or top or right or bottom:
                batch = F.pad(batch, (left, right, top, bottom), value=0)
                height, width = batch.shape[-2:]
        scale = self.size / min(height, width)
        new_h, new_w = max(self.size, round(height * scale)), max(self.size, round(width * scale))
        img = TF.resize(batch.float(), [new_h, new_w], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        return TF.center_crop(img, [self.size, self.size]).clamp_(0, 255)
