"""Ranking a query set against a gallery by cosine similarity, in bounded memory.

``rank`` works in blocks of queries x gallery items and keeps a running top-k, so memory stays at
``query_chunk x gallery_chunk`` scores however large the gallery is. Features must be L2-normalised.
For galleries too large even for that, ``backend="faiss"`` uses an exact inner-product index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FAISS_AUTO_THRESHOLD = 2_000_000  # gallery size from which backend="auto" chooses faiss


@dataclass
class Ranking:
    """Top-k gallery items per query.

    ``indices[q, r]`` is the gallery position of query ``q``'s rank-``r`` item (best first), ``scores``
    its similarity. ``candidate_order[q]`` ranks query ``q``'s candidate subset (ids, best first) when
    the queries carry candidate subsets (CIRR ``img_set``), else ``None``.
    """

    query_ids: list[str]
    gallery_ids: list[str]
    indices: torch.Tensor
    scores: torch.Tensor
    candidate_order: list[list[str]] | None = None

    def target_positions(self, targets: list[tuple[str, ...]] | list[list[str]]) -> list[list[int]]:
        """Gallery positions of each query's targets (targets absent from the gallery, e.g. skipped
        with --allow-missing, are left out: they can never be retrieved)."""
        if not hasattr(self, "_gindex"):
            self._gindex = {g: i for i, g in enumerate(self.gallery_ids)}
        return [[self._gindex[t] for t in ts if t in self._gindex] for ts in targets]

    def top_ids(self, q: int, k: int | None = None) -> list[str]:
        row = self.indices[q] if k is None else self.indices[q, :k]
        return [self.gallery_ids[i] for i in row.tolist()]


def rank(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    exclude: torch.Tensor | None = None,
    query_chunk: int = 1024,
    gallery_chunk: int = 65536,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` gallery indices and scores for each query (cosine similarity of normalised features).

    ``exclude[q]`` is a gallery index to remove from query ``q``'s ranking (or -1 for none): CIRR removes
    the reference image. Ties are broken by the lower gallery index, as a stable sort would.
    """
    n_gallery = gallery.shape[0]
    k = min(k, n_gallery - (1 if exclude is not None else 0)) if n_gallery else 0
    if backend == "auto":
        backend = "faiss" if n_gallery >= FAISS_AUTO_THRESHOLD else "torch"
    if backend == "faiss":
        from .faiss_search import faiss_rank

        return faiss_rank(queries, gallery, k, exclude)
    if backend != "torch":
        raise ValueError(f"unknown retrieval backend {backend!r}")
    device = queries.device
    gallery = gallery.to(device)
    all_idx, all_scores = [], []
    for qs in range(0, queries.shape[0], query_chunk):
        q = queries[qs : qs + query_chunk].float()
        best_s = torch.full((q.shape[0], 0), float("-inf"), device=device)
        best_i = torch.zeros((q.shape[0], 0), dtype=torch.long, device=device)
        ex = exclude[qs : qs + query_chunk].to(device) if exclude is not None else None
        for gs in range(0, n_gallery, gallery_chunk):
            g = gallery[gs : gs + gallery_chunk].float()
            sims = q @ g.T
            if ex is not None:
                local = ex - gs
                hit = (local >= 0) & (local < g.shape[0])
                rows = torch.nonzero(hit).squeeze(1)
                sims[rows, local[rows]] = float("-inf")
            idx = torch.arange(gs, gs + g.shape[0], device=device).expand(q.shape[0], -1)
            cat_s = torch.cat([best_s, sims], dim=1)
            cat_i = torch.cat([best_i, idx], dim=1)
            # stable descending order: sort by score, ties keep gallery order (lower index first)
            order = torch.sort(cat_s, dim=1, descending=True, stable=True).indices[:, :k]
            best_s = torch.gather(cat_s, 1, order)
            best_i = torch.gather(cat_i, 1, order)
        all_idx.append(best_i.cpu())
        all_scores.append(best_s.cpu())
    if not all_idx:
        return torch.empty(0, k, dtype=torch.long), torch.empty(0, k)
    return torch.cat(all_idx), torch.cat(all_scores)


def rank_candidates(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    candidate_indices: list[list[int]],
) -> list[list[int]]:
    """For each query, its candidate gallery indices sorted by similarity (best first, stable), in one
    batched gather and product over a padded ``[Q, C]`` candidate matrix."""
    width = max((len(c) for c in candidate_indices), default=0)
    if width == 0:
        return [[] for _ in candidate_indices]
    device = gallery.device
    cands = torch.full((len(candidate_indices), width), -1, dtype=torch.long)
    for qi, row in enumerate(candidate_indices):
        cands[qi, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    cands = cands.to(device)
    valid = cands >= 0
    feats = gallery[cands.clamp(min=0)].float()  # [Q, C, D]
    scores = torch.einsum("qcd,qd->qc", feats, queries.float().to(device)).masked_fill(~valid, float("-inf"))
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    ranked = torch.gather(cands, 1, order).cpu()
    counts = valid.sum(dim=1).tolist()
    return [ranked[qi, :n].tolist() for qi, n in enumerate(counts)]
