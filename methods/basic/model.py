"""The image-only and text-only baselines."""

from __future__ import annotations

import torch

from cirbench.method import Method, average_variants, caption_variants
from cirbench.types import Query


class ImageOnly(Method):
    """Query feature = reference image feature."""

    def compose(self, references: torch.Tensor, queries: list[Query]) -> torch.Tensor:
        return torch.nn.functional.normalize(references.float(), dim=-1)


class TextOnly(Method):
    """Query feature = text feature of the raw modification text (FashionIQ: both caption orders averaged)."""

    def compose(self, references: torch.Tensor, queries: list[Query]) -> torch.Tensor:
        variants = [caption_variants(q.texts) for q in queries]
        flat = [t for v in variants for t in v]
        return average_variants(self.backbone.encode_text(flat), [len(v) for v in variants])
