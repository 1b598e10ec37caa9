"""Bootstrap intervals and paired tests: properties that hold for any data."""

from __future__ import annotations

import numpy as np
import pytest

from cirbench.dataset import Dataset
from cirbench.stats import bootstrap_ci, paired_comparison


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


def test_paired_comparison():
    rng = np.random.default_rng(2)
    a = rng.normal(50, 10, 400)
    same = paired_comparison(a, a, replicates=2000)
    assert same["difference"] == 0 and same["p_value"] == 1.0 and same["ties"] == 400
    better = paired_comparison(a + 3 + rng.normal(0, 1, 400), a, replicates=2000)
    assert better["p_value"] < 0.01 and better["low"] > 2 and better["a_wins"] > 350
    noise = paired_comparison(a + rng.normal(0, 1, 400), a, replicates=2000)
    assert noise["p_value"] > 0.01 and noise["low"] < 0 < noise["high"]
    assert paired_comparison([1.0, np.nan], [np.nan, 2.0])["queries"] == 0


@pytest.mark.parametrize("replicates", [0, -1])
def test_no_replicates_no_interval(replicates):
    assert bootstrap_ci({"all": {"R@1": np.ones(3)}}, Dataset(None).aggregate, replicates) == {}
