"""Bootstrap intervals and paired tests: properties that hold for any data."""

from __future__ import annotations

import numpy as np
import pytest

from cirbench.dataset import Dataset
from cirbench.stats import bootstrap_ci, paired_aggregate, paired_comparison


def test_constant_values_have_a_zero_width_interval():
    ci = bootstrap_ci({"all": {"R@1": np.full(50, 100.0)}}, Dataset(None).aggregate, 200)
    assert ci == {"R@1": [100.0, 100.0]}


def test_multi_set_average_gets_an_interval_and_nan_is_not_counted():
    rng = np.random.default_rng(0)
    per_set = {"dress": {"R@10": rng.choice([0.0, 100.0], 300)}, "shirt": {"R@10": rng.choice([0.0, 100.0], 200)},
               "toptee": {"R@10": np.where(np.arange(100) % 2 == 0, 100.0, np.nan)}}
    ci = bootstrap_ci(per_set, Dataset(None).aggregate, 500, seed=1)
    assert set(ci) == {"dress/R@10", "shirt/R@10", "toptee/R@10", "avg/R@10"}
    assert ci["toptee/R@10"] == [100.0, 100.0]  # the nan queries are not counted at all
    low, high = ci["avg/R@10"]
    point = np.mean([np.mean(per_set["dress"]["R@10"]), np.mean(per_set["shirt"]["R@10"]), 100.0])
    assert low < point < high and high - low < 15
    assert bootstrap_ci(per_set, Dataset(None).aggregate, 500, seed=1) == ci  # seeded


def test_metrics_of_one_query_are_resampled_together():
    """A replicate draws queries, not values: a combined metric (CIRR's ``(R@5 + R_s@1) / 2``) of two metrics
    that move together keeps their spread, where independent draws per metric would narrow its interval."""
    hits = np.random.default_rng(3).choice([0.0, 100.0], 400)

    def combined(sets):
        return {"R@5": sets["all"]["R@5"], "Avg": (sets["all"]["R@5"] + sets["all"]["Rs@1"]) / 2}

    ci = bootstrap_ci({"all": {"R@5": hits, "Rs@1": hits.copy()}}, combined, 500, seed=4)
    assert ci["Avg"] == ci["R@5"] and ci["R@5"][1] - ci["R@5"][0] > 5


def test_paired_comparison():
    rng = np.random.default_rng(2)
    a = rng.normal(50, 10, 400)
    same = paired_comparison(a, a, replicates=2000)
    assert same["difference"] == 0 and same["p_value"] == 1.0 and same["ties"] == 400
    assert same["a_wins"] == same["b_wins"] == 0  # a tie is nobody's win
    better = paired_comparison(a + 3 + rng.normal(0, 1, 400), a, replicates=2000)
    assert better["p_value"] < 0.01 and better["low"] > 2 and better["a_wins"] > 350
    # no sign pattern of 2,000 is as extreme: a sampled permutation test says p = 1 / (replicates + 1), never 0
    # (the observed pattern counts as one of the draws)
    assert better["p_value"] == 1 / 2001
    noise = paired_comparison(a + rng.normal(0, 1, 400), a, replicates=2000)
    assert noise["p_value"] > 0.01 and noise["low"] < 0 < noise["high"]
    assert paired_comparison([1.0, np.nan], [np.nan, 2.0])["queries"] == 0


@pytest.mark.parametrize("replicates", [0, -1])
def test_no_replicates_no_interval(replicates):
    assert bootstrap_ci({"all": {"R@1": np.ones(3)}}, Dataset(None).aggregate, replicates) == {}


def _exact_sign_flip_p(d: np.ndarray) -> float:
    """The permutation p-value by enumerating all 2^n sign patterns (the oracle of the sampled test)."""
    n = len(d)
    signs = ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1) * 2.0 - 1.0
    return float((np.abs((signs * d).mean(axis=1)) >= abs(d.mean()) - 1e-9).mean())


@pytest.mark.parametrize("kind", ["continuous", "recall"])
def test_sign_flip_p_value_matches_exact_enumeration(kind):
    """Recall differences (-100, 0, 100) tie with the observed mean under many flips: ties count as extreme."""
    rng = np.random.default_rng(5)
    if kind == "continuous":
        a, b = rng.normal(50, 10, 12) + 2, rng.normal(50, 10, 12)
    else:
        a = np.array([100.0] * 6 + [0.0] * 2 + [100.0, 0.0] * 3)  # 6 wins, 2 losses, 6 ties: exact p = 74/256
        b = np.array([0.0] * 6 + [100.0] * 2 + [100.0, 0.0] * 3)
    exact = _exact_sign_flip_p(a - b)
    sampled = paired_comparison(a, b, replicates=40000, seed=3)["p_value"]
    assert 0.02 < exact < 0.98 and abs(sampled - exact) < 0.015, (sampled, exact)


def test_paired_comparison_does_not_depend_on_the_block_size(monkeypatch):
    """Replicates are drawn in blocks (memory stays bounded for any number of queries); the numbers are the
    same whatever the block size, and the bootstrap interval is the mean's normal interval at this size."""
    import cirbench.stats as stats

    rng = np.random.default_rng(4)
    a, b = rng.normal(50, 10, 3001), rng.normal(49, 10, 3001)
    whole = paired_comparison(a, b, replicates=4000, seed=7)
    monkeypatch.setattr(stats, "BLOCK_VALUES", 3001 * 7 + 5)  # blocks of 7 replicates, the last one short
    assert stats._blocks(4000, 3001)[-1] == 4000 % 7
    assert paired_comparison(a, b, replicates=4000, seed=7) == whole
    d = a - b
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
    assert abs(whole["low"] - (d.mean() - half)) < 0.1 * half and abs(whole["high"] - (d.mean() + half)) < 0.1 * half


def test_bootstrap_ci_in_small_blocks_agrees_with_the_normal_interval(monkeypatch):
    import cirbench.stats as stats

    rng = np.random.default_rng(8)
    values = rng.choice([0.0, 100.0], 5000, p=[0.6, 0.4])
    monkeypatch.setattr(stats, "BLOCK_VALUES", 5000 * 3)
    ((low, high),) = bootstrap_ci({"all": {"R@1": values}}, Dataset(None).aggregate, 3000, seed=2).values()
    half = 1.96 * values.std(ddof=1) / np.sqrt(len(values))
    assert abs(low - (values.mean() - half)) < 0.1 * half and abs(high - (values.mean() + half)) < 0.1 * half


def test_the_combined_metric_of_several_sets_is_compared_within_each_set():
    """``avg/R@10`` of two categories: the difference is the mean of the categories' mean differences (not of the
    pooled queries), the queries and wins count both sets, a difference no flip reaches has p = 1 / (R + 1), and
    the p-value of a small split is the exact enumeration of sign flips within each set."""
    rng = np.random.default_rng(6)
    a1, a2 = rng.normal(60, 5, 30), rng.normal(40, 5, 10)
    per_set = {"dress": {"R@10": (a1 + 5, a1)}, "shirt": {"R@10": (a2 + 1, a2)}}
    (avg,) = paired_aggregate(per_set, Dataset(None).aggregate, ["avg/R@10"], replicates=999).values()
    assert avg["difference"] == pytest.approx((5 + 1) / 2) and avg["queries"] == 40
    assert (avg["a_wins"], avg["b_wins"], avg["ties"]) == (40, 0, 0)
    assert avg["p_value"] == 1 / 1000 and avg["low"] == pytest.approx(3) and avg["high"] == pytest.approx(3)

    d1, d2 = np.array([3.0, -1.0, 2.0, 0.5, -0.5, 1.0]), np.array([-2.0, 4.0, 1.0, -3.0])
    signs1 = ((np.arange(2 ** 6)[:, None] >> np.arange(6)) & 1) * 2.0 - 1.0
    signs2 = ((np.arange(2 ** 4)[:, None] >> np.arange(4)) & 1) * 2.0 - 1.0
    null = ((signs1 * d1).mean(axis=1)[:, None] + (signs2 * d2).mean(axis=1)[None, :]) / 2
    exact = float((np.abs(null) >= abs((d1.mean() + d2.mean()) / 2) - 1e-9).mean())
    small = {"dress": {"R@10": (d1, np.zeros(6))}, "shirt": {"R@10": (d2, np.zeros(4))}}
    (got,) = paired_aggregate(small, Dataset(None).aggregate, ["avg/R@10"], replicates=20000, seed=2).values()
    assert 0.05 < exact < 0.95 and abs(got["p_value"] - exact) < 0.015, (got["p_value"], exact)


def _means_of(values, idx):
    """Each row of ``idx`` a replicate: the mean of the queries it draws, nan not counted (0 for a draw of nan
    only, as a metric no query counts)."""
    return np.array([np.nanmean(row) if (~np.isnan(row)).any() else 0.0 for row in values[idx]])


def _resampled_means(rng, values, replicates):
    """``replicates`` means of ``len(values)`` queries drawn with replacement from ``rng``."""
    return _means_of(values, rng.integers(0, len(values), size=(replicates, len(values))))


def test_intervals_are_the_percentile_bootstrap_of_the_resampled_means():
    """The textbook percentile bootstrap, written out (one draw of queries per set and replicate, shared by the
    set's metrics; the sets combined by the dataset's aggregate; the (1 - level) / 2 tails), at a level other than
    95% and with a metric most draws of which hold no counted query: the same numbers to the last digit."""
    rng = np.random.default_rng(9)
    dress = {"R@10": rng.choice([0.0, 100.0], 40), "R@50": rng.normal(60, 20, 40)}
    shirt = {"R@10": np.where(np.arange(7) == 3, 100.0, np.nan), "R@50": rng.normal(50, 20, 7)}
    per_set = {"dress": dress, "shirt": shirt}
    ci = bootstrap_ci(per_set, Dataset(None).aggregate, 300, seed=11, level=0.8)

    oracle = np.random.default_rng(11)
    reps = {}
    for name, metrics in per_set.items():
        n = len(metrics["R@10"])
        idx = oracle.integers(0, n, size=(300, n))
        reps[name] = {m: _means_of(v, idx) for m, v in metrics.items()}
    combined = [Dataset(None).aggregate({s: {m: float(v[r]) for m, v in ms.items()} for s, ms in reps.items()})
                for r in range(300)]
    assert set(ci) == set(combined[0])
    for name, (low, high) in ci.items():
        values = [c[name] for c in combined]
        assert [low, high] == [round(float(np.percentile(values, 10)), 4), round(float(np.percentile(values, 90)), 4)]
    assert ci["shirt/R@10"][0] == 0.0 < ci["shirt/R@10"][1]  # draws without the one counted query score 0


def test_paired_intervals_and_wins_are_the_percentile_bootstrap_and_the_signs():
    """paired_comparison and paired_aggregate: the interval is the percentile bootstrap of the mean difference
    (its own random stream, at an 80% level here), queries with nan on either side are left out, and wins, losses
    and ties are the signs of the differences, however small."""
    rng = np.random.default_rng(12)
    a = rng.normal(50, 10, 60)
    b = a - rng.choice([0.25, 0.0, -0.5, 3.0], 60)
    a[5], b[9] = np.nan, np.nan
    keep = ~(np.isnan(a) | np.isnan(b))
    d = a[keep] - b[keep]
    got = paired_comparison(a, b, replicates=500, seed=4, level=0.8)
    boot_rng = np.random.default_rng(np.random.SeedSequence(4).spawn(2)[0])
    boot = _resampled_means(boot_rng, d, 500)
    assert [got["low"], got["high"]] == pytest.approx(np.percentile(boot, [10, 90]), rel=1e-12, abs=1e-12)
    assert (got["queries"], got["a_wins"], got["b_wins"], got["ties"]) == (
        58, int((d > 0).sum()), int((d < 0).sum()), int((d == 0).sum()))
    assert got["ties"] > 5 and got["a_wins"] > 5 and got["b_wins"] > 5

    second_a, second_b = rng.normal(40, 10, 9), rng.normal(40, 10, 9)
    per_set = {"dress": {"R@10": (a, b)}, "shirt": {"R@10": (second_a, second_b)}}
    (avg,) = paired_aggregate(per_set, Dataset(None).aggregate, ["avg/R@10"], replicates=500, seed=4,
                              level=0.8).values()
    boot_rng = np.random.default_rng(np.random.SeedSequence(4).spawn(2)[0])
    first = _resampled_means(boot_rng, d, 500)
    second = _resampled_means(boot_rng, second_a - second_b, 500)
    assert [avg["low"], avg["high"]] == pytest.approx(np.percentile((first + second) / 2, [10, 90]), rel=1e-12,
                                                      abs=1e-12)
    both = np.concatenate([d, second_a - second_b])
    assert (avg["queries"], avg["a_wins"], avg["b_wins"], avg["ties"]) == (
        67, int((both > 0).sum()), int((both < 0).sum()), int((both == 0).sum()))
    nothing = paired_comparison([1.0, np.nan], [np.nan, 2.0])
    assert nothing["queries"] == 0 and nothing["p_value"] == 1.0 and np.isnan(nothing["difference"])
