"""Ranking: equal to a full stable sort, whatever the chunking; ties by gallery position; bf16 galleries."""

from __future__ import annotations

import pytest
import torch

from cirbench.retrieval import rank, rank_candidates


def _unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)


def _oracle(q, g, k, exclude=None):
    """A full stable descending sort: ties keep gallery order (lower position first)."""
    sims = q @ g.T
    if exclude is not None:
        rows = torch.nonzero(exclude >= 0).squeeze(1)
        sims[rows, exclude[rows]] = float("-inf")
    order = torch.sort(sims, dim=1, descending=True, stable=True)
    return order.indices[:, :k], order.values[:, :k]


def _exact(n, d, seed):
    """Vectors of 0 and +-1/4: every dot product is exact in float32 whatever the summation order, so ties
    are ties for any kernel (BLAS rounds products of different shapes differently otherwise)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, (n, d), generator=g).float() * 0.25


@pytest.mark.parametrize("gallery_chunk", [7, 50, None])
@pytest.mark.parametrize("query_chunk", [3, 64])
def test_rank_equals_a_full_stable_sort_with_duplicates(gallery_chunk, query_chunk):
    """Duplicate gallery rows and coarse values give many exact ties, some straddling the k-th place and
    chunk borders."""
    base = _exact(60, 8, 0)
    gallery = torch.cat([base, base[:30], base[5:25], base[:10]])  # 120 rows, many exact duplicates
    queries = torch.cat([_exact(20, 8, 1), base[:10]])
    exclude = torch.randint(-1, 120, (30,), generator=torch.Generator().manual_seed(3))
    for k in (1, 5, 17, 50, 120):  # 120: the whole gallery, as whole-ranking metrics (AP) rank it
        for ex in (None, exclude):
            idx, scores = rank(queries, gallery, k, exclude=ex, backend="torch", gallery_chunk=gallery_chunk,
                               query_chunk=query_chunk)
            o_idx, o_scores = _oracle(queries, gallery, min(k, len(gallery) - (ex is not None)), ex)
            assert torch.equal(idx, o_idx), (k, ex is None)
            assert torch.allclose(scores, o_scores)


@pytest.mark.parametrize("gallery_chunk", [13, 400, None])
def test_rank_equals_a_full_stable_sort_on_random_features(gallery_chunk):
    q, g = _unit(50, 24, 7), _unit(1000, 24, 8)
    idx, _ = rank(q, g, 30, backend="torch", gallery_chunk=gallery_chunk)
    assert torch.equal(idx, _oracle(q, g, 30)[0])


def test_ties_at_the_kth_place_keep_the_lowest_positions():
    q = torch.tensor([[1.0, 0.0]])
    g = torch.tensor([[0.6, 0.8]] + [[1.0, 0.0]] * 6 + [[0.0, 1.0]])
    for chunk in (2, 3, 100):
        idx, _ = rank(q, g, 3, backend="torch", gallery_chunk=chunk)
        assert idx.tolist() == [[1, 2, 3]]


def test_bf16_gallery_is_ranked_from_its_own_values():
    q, g = _unit(40, 32, 4), _unit(3000, 32, 5)
    gb = g.to(torch.bfloat16)
    idx, scores = rank(q, gb, 20, backend="torch", gallery_chunk=500)
    o_idx, o_scores = _oracle(q, gb.float(), 20)
    assert torch.equal(idx, o_idx) and torch.allclose(scores, o_scores)


def test_empty_and_small_inputs():
    idx, scores = rank(torch.empty(0, 4), _unit(10, 4, 0), 5)
    assert idx.shape == (0, 5)
    idx, _ = rank(_unit(2, 4, 0), _unit(3, 4, 1), 50)
    assert idx.shape == (2, 3)
    idx, _ = rank(_unit(2, 4, 0), _unit(3, 4, 1), 50, exclude=torch.tensor([0, -1]))
    assert idx.shape == (2, 2) and 0 not in idx[0].tolist()
    idx, scores = rank(_unit(2, 4, 0), _unit(1, 4, 1), 5, exclude=torch.tensor([0, 0]))  # nothing left to rank
    assert idx.shape == scores.shape == (2, 0)
    with pytest.raises(ValueError, match="several vectors each need a combine rule"):
        rank(_unit(2, 4, 0).reshape(1, 2, 4), _unit(3, 4, 1), 2)
    with pytest.raises(ValueError, match="the faiss backend ranks one vector per query"):
        rank(_unit(2, 4, 0).reshape(1, 2, 4), _unit(3, 4, 1), 2, backend="faiss", combine=lambda s: s.sum(-2))


def test_candidates_ties_by_gallery_position():
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    q = torch.tensor([[1.0, 0.0]])
    assert rank_candidates(q, g, [[3, 2, 0, 1]]) == [[0, 2, 3, 1]]
    assert rank_candidates(q, g, [[]]) == [[]]
    with pytest.raises(ValueError, match=r"several vectors \(\[Q, K, D\]\) need a combine function"):
        rank_candidates(q.reshape(1, 1, 2), g, [[0, 1]])
    # a hundred candidates in two tied groups (duplicate images), listed backwards: each group by position
    many = torch.tensor([[1.0, 0.0] if i % 7 == 0 else [0.6, 0.8] for i in range(100)])
    best = [i for i in range(100) if i % 7 == 0]
    expected = best + [i for i in range(100) if i % 7]
    assert rank_candidates(q.repeat(2, 1), many, [list(range(99, -1, -1)), list(range(100))]) == [expected] * 2


@pytest.mark.parametrize("vectors", [1, 2])
def test_candidates_shared_and_alone_rank_as_one_query_at_a_time(vectors, monkeypatch):
    """Queries sharing one candidate list (scored with one product per list) and queries with lists of their
    own (gathered in chunks, a tiny budget here) rank exactly as each query scored on its own would."""
    from cirbench import retrieval

    gen = torch.Generator().manual_seed(0)
    g = torch.nn.functional.normalize(torch.randn(40, 8, generator=gen), dim=-1)
    shape = (9, vectors, 8) if vectors > 1 else (9, 8)
    q = torch.nn.functional.normalize(torch.randn(*shape, generator=gen), dim=-1)
    shared_a, shared_b = list(range(0, 40, 3)), [5, 1, 17, 33, 2]
    cands = [shared_a, shared_b, shared_a, [7, 8, 9], shared_b, [], shared_a, [39, 0], list(range(20))]

    def combine(s):  # a nonlinear fusion, as BASIC's
        return s[..., 0, :] * s[..., 1, :].clamp(min=0) - 0.1 * s.sum(-2) ** 2

    fuse = combine if vectors > 1 else None
    monkeypatch.setattr(retrieval, "CANDIDATE_BUDGET", 8 * 20 * 2)  # two gathered queries at a time
    rows, idx, scores = rank_candidates(q, g, cands, combine=fuse, with_scores=True)
    for qi, row in enumerate(cands):
        mine = sorted(row)
        sims = (g[mine] @ q[qi].T).T if vectors > 1 else g[mine] @ q[qi]
        own = fuse(sims) if fuse else sims
        order = torch.sort(own, descending=True, stable=True).indices.tolist()
        assert rows[qi] == [mine[i] for i in order]
        assert torch.allclose(scores[qi, : len(row)], own[order], atol=1e-6)
        assert (idx[qi, len(row):] == -1).all() and torch.isinf(scores[qi, len(row):]).all()
