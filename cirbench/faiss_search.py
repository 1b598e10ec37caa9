"""Exact inner-product search with faiss, for galleries too large for one similarity matrix.

``faiss_rank`` mirrors :func:`cirbench.retrieval.rank`: an ``IndexFlatIP`` (exact; on the GPU when the
installed faiss has GPU support and the features live on CUDA), top-``k`` per query, and ``exclude`` (a
gallery index per query, or -1) removed from that query's ranking by searching one item deeper. Ties are
broken by the lower gallery index, as in the torch path.
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


def faiss_rank(queries: torch.Tensor, gallery: torch.Tensor, k: int, exclude: torch.Tensor | None = None,
               query_chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` gallery indices and scores per query by exact inner product (features L2-normalised)."""
    n_queries, n_gallery = queries.shape[0], gallery.shape[0]
    if n_queries == 0 or n_gallery == 0 or k == 0:
        return torch.empty(n_queries, 0, dtype=torch.long), torch.empty(n_queries, 0)
    index, _resources = _index(gallery.shape[1], gallery.is_cuda)
    index.add(np.ascontiguousarray(gallery.float().cpu().numpy()))
    depth = min(n_gallery, k + (1 if exclude is not None else 0))
    all_idx, all_scores = [], []
    for start in range(0, n_queries, query_chunk):
        q = np.ascontiguousarray(queries[start : start + query_chunk].float().cpu().numpy())
        scores, idx = index.search(q, depth)
        scores_t, idx_t = torch.from_numpy(scores), torch.from_numpy(idx).long()
        if exclude is not None:
            ex = exclude[start : start + query_chunk].view(-1, 1).cpu()
            keep = idx_t != ex
            # drop the excluded item (or the last one when it was not retrieved), keeping order
            drop_last = keep.all(dim=1, keepdim=True)
            keep = keep & ~(drop_last & (torch.arange(depth) == depth - 1))
            idx_t = idx_t[keep].view(-1, depth - 1)[:, :k]
            scores_t = scores_t[keep].view(-1, depth - 1)[:, :k]
        # stable order among equal scores: lower gallery index first (faiss does not promise it)
        order = torch.from_numpy(np.lexsort((idx_t.numpy(), -scores_t.numpy()), axis=1))
        all_idx.append(torch.gather(idx_t, 1, order))
        all_scores.append(torch.gather(scores_t, 1, order))
    return torch.cat(all_idx), torch.cat(all_scores)
