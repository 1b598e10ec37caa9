"""Vectorised retrieval metrics (torch), reported x100 as the official evaluators do.

Every metric here is a mean over queries of a per-query value, so the functions come in two forms: the
per-query tensors (``*_per_query``: one value per query, x100, ``nan`` for a query a metric does not count,
e.g. a CIRCO aspect the query lacks) and their means. Datasets return the per-query form from
``Dataset.per_query_metrics``; the loop averages them into the reported metrics and bootstraps confidence
intervals from them.

All functions take a boolean ``hits[q, r]`` matrix: whether the rank-``r`` item of query ``q`` is
relevant. Build it with :func:`hits_matrix` from ranked gallery indices and target indices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported when a metric is computed: dataset modules load without it
    import torch


HITS_BLOCK = 1 << 24  # ranked entries looked up at once


def hits_matrix(ranked: torch.Tensor, targets: Sequence[Sequence[int]]) -> torch.Tensor:
    """``hits[q, r] = ranked[q, r] in targets[q]`` for ranked gallery indices ``[Q, K]``; negative entries
    (empty slots of a short ranking) are never hits."""
    import torch

    n_q = ranked.shape[0]
    width = max((len(t) for t in targets), default=0)
    if width == 0:
        return torch.zeros_like(ranked, dtype=torch.bool)
    span = 1 + max(int(ranked.max()) if ranked.numel() else -1, max((max(t) for t in targets if t), default=-1))
    if ranked.shape[1] * 4 >= span:  # rankings of (most of) the gallery: each query's targets as a mask, gathered
        return _hits_by_mask(ranked, targets, span)
    # each query's targets sorted (padded past every index), each ranked index looked up by binary search, a
    # block of queries at a time: memory for [Q, K], however long the rankings and the target lists (a whole
    # ranking of a domain-conversion database, a hundred positives a query)
    padded = torch.full((n_q, width), torch.iinfo(torch.long).max, dtype=torch.long)
    for q, t in enumerate(targets):
        if t:
            padded[q, : len(t)] = torch.as_tensor(sorted(t), dtype=torch.long)
    ranked = ranked.long().contiguous()  # a column slice is a strided view: searchsorted wants rows
    padded = padded.to(ranked.device)
    out = torch.zeros(ranked.shape, dtype=torch.bool, device=ranked.device)
    step = max(1, HITS_BLOCK // max(1, ranked.shape[1]))
    for start in range(0, n_q, step):
        block, keys = ranked[start : start + step], padded[start : start + step]
        at = torch.searchsorted(keys, block).clamp(max=width - 1)
        out[start : start + step] = (keys.gather(1, at) == block) & (block >= 0)
    return out


def _hits_by_mask(ranked: torch.Tensor, targets: Sequence[Sequence[int]], span: int) -> torch.Tensor:
    """:func:`hits_matrix` for long rankings (AP over a whole gallery): a block of queries' targets marked in a
    ``[block, span + 1]`` mask (the last column: the empty slots' -1), then read at the ranked positions; memory
    for as many mask entries as hits (a ranking covers at least a quarter of the span), about 9x faster than the
    binary searches at 5,000 x 30,400."""
    import itertools

    import numpy as np
    import torch

    lengths = torch.as_tensor([len(t) for t in targets], dtype=torch.long)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    rows = torch.repeat_interleave(torch.arange(len(targets)), lengths)
    cols = torch.from_numpy(np.fromiter(itertools.chain.from_iterable(targets), dtype=np.int64,
                                        count=int(starts[-1])))
    out = torch.empty(ranked.shape, dtype=torch.bool, device=ranked.device)
    step = max(1, HITS_BLOCK // (span + 1))
    for start in range(0, len(targets), step):
        end = min(len(targets), start + step)
        first, last = int(starts[start]), int(starts[end])
        mask = torch.zeros(end - start, span + 1, dtype=torch.bool)
        mask[rows[first:last] - start, cols[first:last]] = True
        block = ranked[start:end].long()
        block = torch.where(block >= 0, block, torch.full_like(block, span))
        out[start:end] = mask.to(ranked.device).gather(1, block)
    return out


def recall_per_query(hits: torch.Tensor, ks: Sequence[int]) -> dict[int, torch.Tensor]:
    """100 if a relevant item is in the top ``k``, else 0, per query (float64)."""

    return {k: hits[:, :k].any(dim=1).double() * 100 for k in ks}


def hit_count_per_query(hits: torch.Tensor, ks: Sequence[int]) -> dict[int, torch.Tensor]:
    """100 x the number of relevant items in the top ``k`` (CIRCO's Recall@K counts the target's hits)."""

    return {k: hits[:, :k].double().sum(dim=1) * 100 for k in ks}


def ap_per_query(hits: torch.Tensor, n_relevant: torch.Tensor | Sequence[int],
                 ks: Sequence[int]) -> dict[int, torch.Tensor]:
    """Average precision at ``k`` per query (x100), CIRCO's definition:
    ``AP@k = sum_{i<=k} P(i) * rel(i) / min(n_relevant, k)``."""
    import torch

    n_rel = torch.as_tensor(n_relevant, dtype=torch.float64)
    h = hits.double()
    precision_at_i = h.cumsum(dim=1) / torch.arange(1, h.shape[1] + 1, dtype=torch.float64)
    out = {}
    for k in ks:
        denom = torch.clamp(torch.minimum(n_rel, torch.tensor(float(k))), min=1)
        out[k] = (precision_at_i[:, :k] * h[:, :k]).sum(dim=1) / denom * 100
    return out


def _positive_ranks(hits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every positive of ``hits``, row by row with ranks ascending: its row, its index among the row's positives
    (from 0) and its rank (from 0), both float64; and each row's positive count. Memory for the positives only,
    however long the rankings."""
    import torch

    hits = hits.bool()
    rows, ranks = hits.nonzero(as_tuple=True)
    counts = hits.sum(dim=1)
    first = counts.cumsum(0) - counts  # where each row's positives start among all of them
    j = (torch.arange(len(rows), device=hits.device) - first[rows]).double()
    return rows, j, ranks.double(), counts


def trapezoid_ap_per_query(hits: torch.Tensor, epsilon: float = 1e-5) -> torch.Tensor:
    """Average precision over each query's whole ranking (x100), the ``compute_ap`` of instance-level
    retrieval's evaluation (cnnimageretrieval-pytorch, which i-CIR and FREEDOM's domain conversion use): for the
    j-th positive (from 0) at rank r (from 0), the mean of the precision before it (j / r; 1 at rank 0) and
    after it ((j + 1) / (r + 1)), weighted by ``1 / (positives + epsilon)``; 0 for a query without positives.
    ``hits`` must cover the whole ranking: the positives it holds are all the query's positives."""
    import torch

    rows, j, r, counts = _positive_ranks(hits)
    before = torch.where(r > 0, j / r.clamp(min=1), torch.ones_like(r))
    after = (j + 1) / (r + 1)
    total = torch.zeros(hits.shape[0], dtype=torch.float64, device=hits.device).index_add_(0, rows,
                                                                                          (before + after) / 2)
    return total / (counts.double() + epsilon) * 100


def average_precision_per_query(hits: torch.Tensor) -> torch.Tensor:
    """Average precision over each query's whole ranking (x100), the textbook one: the mean of the precision at
    each positive's rank, ``(j + 1) / (r + 1)`` for the j-th positive at rank r (both from 0); 0 for a query
    without positives. ``hits`` must cover the whole ranking: the positives it holds are all the query's
    positives (:func:`ap_per_query` is the same sum cut at k, CIRCO's)."""
    import torch

    rows, j, r, counts = _positive_ranks(hits)
    total = torch.zeros(hits.shape[0], dtype=torch.float64, device=hits.device).index_add_(0, rows, (j + 1) / (r + 1))
    return total / counts.double().clamp(min=1) * 100


def mean(values: torch.Tensor) -> float:
    """The mean of a per-query tensor, ignoring ``nan`` (queries a metric does not count); 0 if empty."""
    import torch

    values = values.double()
    kept = values[~torch.isnan(values)]
    return float(kept.mean()) if kept.numel() else 0.0


def recall_at_k(hits: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Percentage of queries with at least one relevant item in the top ``k`` (x100)."""

    return {k: mean(v) for k, v in recall_per_query(hits, ks).items()}


def map_at_k(hits: torch.Tensor, n_relevant: torch.Tensor | Sequence[int], ks: Sequence[int]) -> dict[int, float]:
    """Mean average precision at ``k`` (x100), CIRCO's definition (see :func:`ap_per_query`)."""

    return {k: mean(v) for k, v in ap_per_query(hits, n_relevant, ks).items()}


def means(per_query: dict[str, torch.Tensor]) -> dict[str, float]:
    """``{metric: mean}`` of per-query metrics (the numbers a result file reports)."""

    return {name: mean(values) for name, values in per_query.items()}
