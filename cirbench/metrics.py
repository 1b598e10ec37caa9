"""Vectorised retrieval metrics (torch), reported x100 as the official evaluators do.

All functions take a boolean ``hits[q, r]`` matrix: whether the rank-``r`` item of query ``q`` is
relevant. Build it with :func:`hits_matrix` from ranked gallery indices and target indices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def hits_matrix(ranked: torch.Tensor, targets: Sequence[Sequence[int]]) -> torch.Tensor:
    """``hits[q, r] = ranked[q, r] in targets[q]`` for ranked gallery indices ``[Q, K]``; negative entries
    (empty slots of a short ranking) are never hits."""
    n_q = ranked.shape[0]
    width = max((len(t) for t in targets), default=0)
    if width == 0:
        return torch.zeros_like(ranked, dtype=torch.bool)
    padded = torch.full((n_q, width), -1, dtype=torch.long)
    for q, t in enumerate(targets):
        if t:
            padded[q, : len(t)] = torch.as_tensor(list(t), dtype=torch.long)
    return (ranked.unsqueeze(-1) == padded.unsqueeze(1)).any(-1) & (ranked >= 0)


def recall_at_k(hits: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Percentage of queries with at least one relevant item in the top ``k`` (x100)."""
    out = {}
    for k in ks:
        found = hits[:, :k].any(dim=1).double()
        out[k] = float(found.mean() * 100) if found.numel() else 0.0
    return out


def map_at_k(hits: torch.Tensor, n_relevant: torch.Tensor | Sequence[int], ks: Sequence[int]) -> dict[int, float]:
    """Mean average precision at ``k`` (x100), CIRCO's definition:

    ``AP@k = sum_{i<=k} P(i) * rel(i) / min(n_relevant, k)``.
    """
    n_rel = torch.as_tensor(n_relevant, dtype=torch.float64)
    h = hits.double()
    cum = h.cumsum(dim=1)
    ranks = torch.arange(1, h.shape[1] + 1, dtype=torch.float64)
    precision_at_i = cum / ranks
    out = {}
    for k in ks:
        ap = (precision_at_i[:, :k] * h[:, :k]).sum(dim=1) / torch.clamp(torch.minimum(n_rel, torch.tensor(float(k))), min=1)
        out[k] = float(ap.mean() * 100) if ap.numel() else 0.0
    return out
