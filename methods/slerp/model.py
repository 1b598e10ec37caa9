"""The Slerp and Slerp+TAT methods."""

from __future__ import annotations

import torch

from cirbench.method import Method, average_variants, caption_variants
from cirbench.types import Query

from .compose import slerp


class Slerp(Method):
    """Query = slerp(reference image feature, raw modification-text feature, alpha).

    FashionIQ's two captions follow the SEARLE convention: the forward ("c1 and c2") and reverse
    ("c2 and c1") texts are each composed with the image, and the two query features averaged and
    renormalised.
    """

    def compose(self, references: torch.Tensor, queries: list[Query]) -> torch.Tensor:
        variants = [caption_variants(q.texts) for q in queries]
        counts = [len(v) for v in variants]
        text = self.encode_texts([t for v in variants for t in v])
        image = references.float().repeat_interleave(torch.tensor(counts, device=references.device), dim=0)
        return average_variants(slerp(image, text, float(self.options["alpha"])), counts)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return self.backbone.encode_text(texts)


class SlerpTAT(Slerp):
    """Slerp with the image tower adapted by a TAT LoRA checkpoint; texts use the frozen text tower."""

    def __init__(self, backbone, options, dataset=None):
        super().__init__(backbone, options, dataset)
        from .tat import load_tat_image_encoder

        self.image_encoder, self.checkpoint_info = load_tat_image_encoder(backbone, options.get("checkpoint"))

    def gallery_feature_kind(self) -> dict:
        return {"kind": "image-global", "tat_lora_sha256": self.checkpoint_info["sha256"]}

    @torch.no_grad()
    def encode_gallery(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.backbone.device, non_blocking=True)
        with self.backbone.autocast():
            feats = self.image_encoder(pixels)
        return torch.nn.functional.normalize(feats.float(), dim=-1)

    def info(self) -> dict:
        return {"checkpoint": self.checkpoint_info}
