"""The image-only and text-only baselines, their late fusions (sum and product of the similarities) and WeiCom's
weighted fusion of standardised similarities."""

from __future__ import annotations

import math

import torch

from cirbench.method import (
    Method,
    affine_queries,
    average_variants,
    caption_variants,
    gallery_groups,
    query_chunks,
    with_constant,
)
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


class WeiCom(TextOnly):
    """WeiCom (Psomas et al., "Composed image retrieval for remote sensing", IGARSS 2024; the official
    ``evaluate.py`` of github.com/billpsomas/rscir, method "Weighted Similarities Norm"): each query's image and
    text similarities are standardised over the gallery it ranks (mean and unbiased standard deviation, as
    ``norm_cdf``), mapped through the normal CDF and mixed ``(1 - lam) image + lam text``.

    The standardisation is affine in each similarity, so it travels with the query (:meth:`finalize_queries`):
    the gallery is its unit features with a 1 appended and ``(v . g - v . m) / s`` is ``[v / s, -v . m / s] .
    [g, 1]``, ``m`` and ``s`` taken over the query's own gallery (an i-CIR instance's database) or the whole one.
    """

    query_vectors = 2
    unit_features = False  # standardised similarities: the fusion reads their sizes

    def prepare_gallery(self, ids: list[str], features: torch.Tensor) -> torch.Tensor:
        self.rows = {image: i for i, image in enumerate(ids)}
        return with_constant(torch.nn.functional.normalize(features.float(), dim=-1), 1.0)

    def compose(self, references: torch.Tensor, queries: list[Query]) -> torch.Tensor:
        image = torch.nn.functional.normalize(references.float(), dim=-1)
        return with_constant(torch.stack([image, super().compose(references, queries).to(image.device)], dim=1), 0.0)

    def finalize_queries(self, queries: list[Query], features: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
        dim = features.shape[-1] - 1
        out = torch.empty_like(features)
        for members, own in gallery_groups(queries, gallery, self.rows):
            own = own[:, :dim].float()
            mean = own.mean(0)
            centred = own - mean
            for chosen in query_chunks(members, features.device):
                vectors = features[chosen, :, :dim]  # [n, 2, D]
                spread = centred @ vectors.reshape(-1, dim).T  # [G, n * 2]: each similarity less its mean
                std = (spread.square().sum(0) / max(1, len(own) - 1)).sqrt().clamp(min=1e-12).reshape(-1, 2)
                out[chosen] = affine_queries(vectors, mean, 1.0 / std)
        return out

    def combine_scores(self, sims: torch.Tensor) -> torch.Tensor:
        """The normal CDF of both standardised similarities, mixed ``(1 - lam) image + lam text``."""
        cdf = 0.5 * (1 + torch.erf(sims / math.sqrt(2.0)))
        lam = float(self.options.get("lam", 0.5))
        return (1 - lam) * cdf[..., 0, :] + lam * cdf[..., 1, :]
