"""The faiss backend ranks exactly like the torch path."""

from __future__ import annotations

import pytest
import torch

from cirbench.retrieval import rank

pytest.importorskip("faiss")


def _features(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)


@pytest.mark.parametrize("exclude", [False, True])
def test_faiss_equals_torch(exclude):
    queries, gallery = _features(300, 48, 0), _features(5000, 48, 1)
    ex = torch.randint(-1, 5000, (300,), generator=torch.Generator().manual_seed(2)) if exclude else None
    if exclude:  # make sure the excluded item would otherwise rank first for some queries
        ex[:20] = (queries[:20] @ gallery.T).argmax(dim=1)
    t_idx, t_scores = rank(queries, gallery, 50, exclude=ex, backend="torch", gallery_chunk=1000)
    f_idx, f_scores = rank(queries, gallery, 50, exclude=ex, backend="faiss")
    # random Gaussian features have no exact ties, so the orders must agree item for item
    assert torch.equal(t_idx, f_idx)
    assert torch.allclose(t_scores, f_scores, atol=1e-5)
    if exclude:
        assert not (f_idx == ex.view(-1, 1)).any()


def test_faiss_in_query_chunks_ranks_every_query():
    """Queries searched a few at a time (with their exclusions and the tie re-rank) rank as the torch path."""
    from cirbench.faiss_search import faiss_rank

    queries, gallery = _features(40, 16, 3), _features(300, 16, 4)
    gallery[7] = gallery[8]  # a tie at the k-th place for the queries that rank it there
    ex = torch.randint(-1, 300, (40,), generator=torch.Generator().manual_seed(5))
    t_idx, t_scores = rank(queries, gallery, 10, exclude=ex, backend="torch")
    f_idx, f_scores = faiss_rank(queries, gallery, 10, exclude=ex, query_chunk=7)
    assert torch.equal(t_idx, f_idx) and torch.allclose(t_scores, f_scores, atol=1e-5)


def test_faiss_breaks_ties_by_gallery_order():
    q = torch.tensor([[1.0, 0.0]])
    g = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    idx, _ = rank(q, g, 3, backend="faiss")
    assert idx.tolist() == [[1, 2, 3]]


def test_auto_backend_switches_past_the_threshold(monkeypatch):
    import cirbench.retrieval as retrieval

    calls = []
    monkeypatch.setattr(retrieval, "FAISS_CPU_MIN_WORK", 100)
    monkeypatch.setattr(retrieval, "FAISS_CPU_MIN_QUERIES", 2)
    import cirbench.faiss_search as fs

    original = fs.faiss_rank
    monkeypatch.setattr(fs, "faiss_rank", lambda *a, **k: calls.append(1) or original(*a, **k))
    rank(_features(3, 8, 0), _features(150, 8, 1), 5)
    assert calls == [1]
    rank(_features(3, 8, 0), _features(30, 8, 1), 5)  # enough queries, too little work: torch
    rank(_features(1, 8, 0), _features(150, 8, 1), 5)  # enough work, too few queries: torch
    assert calls == [1]


def test_faiss_ties_straddling_k_equal_the_stable_sort():
    gen = torch.Generator().manual_seed(5)
    base = torch.randint(-1, 2, (40, 8), generator=gen).float() * 0.25  # exact dot products: real ties
    gallery = torch.cat([base, base, base[:13]])
    queries = base[:15]
    for k in (1, 4, 9, 30):
        idx, _ = rank(queries, gallery, k, backend="faiss")
        expected = torch.sort(queries @ gallery.T, dim=1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(idx, expected), k


def test_faiss_ties_straddling_k_behind_an_excluded_reference():
    """The excluded reference (CIRR's) sits among equal scores at the top of every ranking: the rows faiss hands
    to the exact re-rank (ties at the k-th place) must keep their exclusion (no other test has an excluded item
    inside a tie)."""
    gen = torch.Generator().manual_seed(6)
    base = torch.randint(-1, 2, (5, 8), generator=gen).float() * 0.25
    gallery = base[torch.randint(0, 5, (60,), generator=gen)]  # every vector many times: ties at every place
    queries = torch.randint(-1, 2, (40, 8), generator=gen).float() * 0.25
    exclude = torch.argmax(queries @ gallery.T, dim=1)  # each query's first place
    for k in (1, 2, 3, 5):
        idx, _ = rank(queries, gallery, k, exclude=exclude, backend="faiss")
        expected, _ = rank(queries, gallery, k, exclude=exclude, backend="torch")
        assert torch.equal(idx, expected), k
