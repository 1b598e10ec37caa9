"""Exact inner-product search with faiss (``IndexFlatIP``), for large galleries on the CPU, or on the GPU when
the installed faiss has GPU support and the gallery lives on CUDA.

:func:`faiss_rank` mirrors :func:`cirbench.retrieval.rank`: top-``k`` per query, ``exclude`` (a gallery
position per query, or -1) removed from that query's ranking, equal scores ordered by gallery position. faiss
does not promise an order among equal scores, so it is asked for two extra places: rows whose k-th place is
tied with the next one are re-ranked exactly by the torch backend.
"""

from __future__ import annotations

import numpy as np
import torch


def _index(dim: int, on_gpu: bool):
    import faiss

    index = faiss.IndexFlatIP(dim)
    if on_gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        res = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(res, torch.cuda.current_device(), index), res
    return index, None


def gpu_faiss_available() -> bool:
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def faiss_rank(queries: torch.Tensor, gallery: torch.Tensor, k: int, exclude: torch.Tensor | None = None,
               query_chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` gallery positions and scores per query by exact inner product (features L2-normalised)."""
    from .retrieval import _lexicographic, rank

    n_queries, n_gallery = queries.shape[0], gallery.shape[0]
    if n_queries == 0 or n_gallery == 0 or k == 0:
        return torch.empty(n_queries, 0, dtype=torch.long), torch.empty(n_queries, 0)
    index, _resources = _index(gallery.shape[1], gallery.is_cuda)
    index.add(np.ascontiguousarray(gallery.float().cpu().numpy()))
    extra = 1 if exclude is not None else 0
    depth = min(n_gallery, k + extra + 1)
    out_idx, out_scores = [], []
    for start in range(0, n_queries, query_chunk):
        q = np.ascontiguousarray(queries[start : start + query_chunk].float().cpu().numpy())
        scores, idx = index.search(q, depth)
        s, i = torch.from_numpy(scores), torch.from_numpy(idx).long()
        if exclude is not None:
            ex = exclude[start : start + query_chunk].view(-1, 1).cpu()
            s = s.masked_fill(i == ex, float("-inf"))
        s, i = _lexicographic(s, i, depth)
        tied = torch.zeros(s.shape[0], dtype=torch.bool)
        if depth > k:
            tied = s[:, k - 1] == s[:, k]
        s, i = s[:, :k].clone(), i[:, :k].clone()
        rows = torch.nonzero(tied).squeeze(1)
        if rows.numel():  # re-rank exactly where faiss's choice among equal scores decides the k-th place
            sub_ex = exclude[start : start + query_chunk][rows] if exclude is not None else None
            ei, es = rank(queries[start : start + query_chunk][rows].cpu(), gallery.cpu(), k, exclude=sub_ex,
                          backend="torch")
            i[rows], s[rows] = ei, es
        out_idx.append(i)
        out_scores.append(s)
    return torch.cat(out_idx), torch.cat(out_scores)
