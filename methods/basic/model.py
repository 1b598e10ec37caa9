"""The image-only and text-only baselines and their late fusions (sum and product of the similarities)."""

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


class ImageTextSum(TextOnly):
    """Query feature = the normalised sum of the normalised image and text features: its cosine ranks as the
    sum of the two similarities does (FREEDOM's and i-CIR's "Text + Image")."""

    def compose(self, references: torch.Tensor, queries: list[Query]) -> torch.Tensor:
        image = torch.nn.functional.normalize(references.float(), dim=-1)
        return torch.nn.functional.normalize(image + super().compose(references, queries).to(image.device), dim=-1)


class ImageTextProduct(TextOnly):
    """Two vectors per query, the image's and the text's; a gallery image scores the product of their cosine
    similarities (``--clamp``: each clipped at 0 first, as i-CIR's baseline; FREEDOM's multiplies them as they
    are)."""

    query_vectors = 2

    def compose(self, references: torch.Tensor, queries: list[Query]) -> torch.Tensor:
        image = torch.nn.functional.normalize(references.float(), dim=-1)
        return torch.stack([image, super().compose(references, queries).to(image.device)], dim=1)

    def combine_scores(self, sims: torch.Tensor) -> torch.Tensor:
        image, text = sims[..., 0, :], sims[..., 1, :]
        if self.options.get("clamp"):
            image, text = image.clamp(min=0), text.clamp(min=0)
        return image * text

    def label_tag(self) -> str | None:
        return "clamped" if self.options.get("clamp") else None
