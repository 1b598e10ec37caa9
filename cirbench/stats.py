"""Uncertainty of benchmark numbers: bootstrap confidence intervals over queries, and paired tests.

**Intervals.** Every metric a dataset reports is a mean of per-query values (``Dataset.per_query_metrics``).
A percentile bootstrap resamples the queries of each evaluation set with replacement (``replicates`` times,
seeded), recomputes each set's means, combines the sets with the dataset's own ``aggregate`` (so FashionIQ's
average over categories gets an interval too), and reports the 2.5th and 97.5th percentiles.

**Paired comparison** of two runs on the same queries (``cirbench compare A B``): the per-query differences
``d`` of a metric; the mean difference, its paired-bootstrap interval, and a two-sided p-value from a
sign-flip permutation test (under "no difference" each ``d`` is equally likely to have either sign). A split of
several sets (FashionIQ's categories, PatternCom's attributes, domain pairs) is compared on its combined metrics
too (``avg/mAP``): the sets' mean differences combined by the dataset's ``aggregate``, the queries resampled
(and their signs flipped) within their own set.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

DEFAULT_REPLICATES = 1000
BLOCK_VALUES = 1 << 22  # resampled values held at once (32 MiB of float64), whatever the number of queries


def _blocks(replicates: int, n: int) -> list[int]:
    """Replicates per block, so that a block draws at most :data:`BLOCK_VALUES` values of ``n`` queries (a
    paired test of 40,000 queries x 10,000 replicates drew 3.2 GB per array at once)."""
    step = max(1, BLOCK_VALUES // max(n, 1))
    return [min(step, replicates - start) for start in range(0, replicates, step)]


def _as_array(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


def bootstrap_ci(per_set: dict[str, dict[str, Any]],
                 aggregate: Callable[[dict[str, dict[str, float]]], dict[str, float]],
                 replicates: int = DEFAULT_REPLICATES, seed: int = 0, level: float = 0.95) -> dict[str, list[float]]:
    """``{metric: [low, high]}`` for every metric ``aggregate`` reports (see the module docstring)."""
    if replicates <= 0 or not per_set:
        return {}
    rng = np.random.default_rng(seed)
    reps: dict[str, dict[str, np.ndarray]] = {}
    for set_name, metrics in per_set.items():
        arrays = {m: _as_array(v) for m, v in metrics.items()}
        n = len(next(iter(arrays.values()))) if arrays else 0
        if n == 0:
            continue
        blocks: dict[str, list[np.ndarray]] = {m: [] for m in arrays}
        for size in _blocks(replicates, n):
            idx = rng.integers(0, n, size=(size, n))  # one draw for all metrics: replicates stay paired
            for metric, values in arrays.items():
                sampled = values[idx]
                with np.errstate(invalid="ignore"):
                    counted = (~np.isnan(sampled)).sum(axis=1)
                    blocks[metric].append(np.where(counted > 0, np.nansum(sampled, axis=1) / np.maximum(counted, 1),
                                                   0.0))
        reps[set_name] = {m: np.concatenate(b) for m, b in blocks.items()}
    if not reps:
        return {}
    samples: dict[str, list[float]] = {}
    for b in range(replicates):
        combined = aggregate({s: {m: float(v[b]) for m, v in metrics.items()} for s, metrics in reps.items()})
        for metric, value in combined.items():
            samples.setdefault(metric, []).append(value)
    tail = (1 - level) / 2 * 100
    return {m: [round(float(np.percentile(v, tail)), 4), round(float(np.percentile(v, 100 - tail)), 4)]
            for m, v in samples.items()}


def paired_comparison(a: Any, b: Any, replicates: int = 10000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Mean difference ``a - b`` of paired per-query values, its bootstrap interval and a sign-flip p-value."""
    a, b = _as_array(a), _as_array(b)
    keep = ~(np.isnan(a) | np.isnan(b))
    d = a[keep] - b[keep]
    n = len(d)
    if n == 0:
        return {"queries": 0, "difference": float("nan"), "low": float("nan"), "high": float("nan"), "p_value": 1.0}
    # two streams, so that neither depends on how the other is drawn, nor either on the block size
    boot_rng, flip_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    observed = float(d.mean())
    blocks = _blocks(replicates, n)
    boot = np.concatenate([d[boot_rng.integers(0, n, size=(size, n))].mean(axis=1) for size in blocks])
    # a sign flip s = 2 * bit - 1 gives mean(s * d) = (2 * bits @ d - sum(d)) / n: one product per block
    total, tolerance = float(d.sum()), 1e-9 * max(1.0, float(np.abs(d).max()))
    extreme = 0
    for size in blocks:
        bits = np.unpackbits(flip_rng.integers(0, 256, size=(size, (n + 7) // 8), dtype=np.uint8), axis=1, count=n)
        null = np.abs(2.0 * (bits @ d) - total) / n
        extreme += int((null >= abs(observed) - tolerance).sum())
    p = (1 + extreme) / (replicates + 1)
    tail = (1 - level) / 2 * 100
    return {"queries": n, "difference": observed, "low": float(np.percentile(boot, tail)),
            "high": float(np.percentile(boot, 100 - tail)), "p_value": float(min(1.0, p)),
            "a_wins": int((d > 0).sum()), "b_wins": int((d < 0).sum()), "ties": int((d == 0).sum())}


def paired_aggregate(per_set: Mapping[str, Mapping[str, Sequence[Any]]],
                     aggregate: Callable[[dict[str, dict[str, float]]], dict[str, float]], names: list[str],
                     replicates: int = 10000, seed: int = 0, level: float = 0.95) -> dict[str, dict[str, float]]:
    """:func:`paired_comparison` of the split-level metrics ``names`` that ``aggregate`` combines from the sets'
    means (``avg/mAP``): ``per_set[set][metric]`` holds both runs' paired per-query values (a, b); the difference is the
    aggregate of the sets' mean differences (the aggregates here are linear: the difference of the runs'
    numbers), its interval resamples each set's queries, its p-value flips each query's sign; wins count the
    queries of every set on the named metric."""
    diffs: dict[str, dict[str, np.ndarray]] = {}
    for set_name, metrics in per_set.items():
        for metric, (a, b) in metrics.items():
            a, b = _as_array(a), _as_array(b)
            keep = ~(np.isnan(a) | np.isnan(b))
            if keep.any():
                diffs.setdefault(set_name, {})[metric] = a[keep] - b[keep]
    if not diffs:
        return {}
    observed = {k: v for k, v in aggregate({s: {m: float(d.mean()) for m, d in ms.items()}
                                            for s, ms in diffs.items()}).items() if k in names}
    boot_rng, flip_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    boot: dict[str, list[float]] = {k: [] for k in observed}
    extreme = dict.fromkeys(observed, 0)
    largest = max(len(d) for ms in diffs.values() for d in ms.values())
    for size in _blocks(replicates, largest):
        # each set's values of each metric drawn on their own (an aggregate reads one metric of every set)
        resampled = {s: {m: d[boot_rng.integers(0, len(d), size=(size, len(d)))].mean(axis=1) for m, d in ms.items()}
                     for s, ms in diffs.items()}
        flipped = {s: {m: (2.0 * np.unpackbits(flip_rng.integers(0, 256, size=(size, (len(d) + 7) // 8),
                                                                   dtype=np.uint8), axis=1, count=len(d)) - 1.0) @ d
                       / len(d) for m, d in ms.items()} for s, ms in diffs.items()}
        for r in range(size):
            again = aggregate({s: {m: float(v[r]) for m, v in ms.items()} for s, ms in resampled.items()})
            null = aggregate({s: {m: float(v[r]) for m, v in ms.items()} for s, ms in flipped.items()})
            for name, value in observed.items():
                boot[name].append(again[name])
                extreme[name] += abs(null[name]) >= abs(value) - 1e-9 * max(1.0, abs(value))
    tail = (1 - level) / 2 * 100
    out = {}
    for name, value in observed.items():
        base = name.rsplit("/", 1)[-1]
        d = [ms[base] for ms in diffs.values() if base in ms]
        low, high = np.percentile(boot[name], [tail, 100 - tail])
        out[name] = {"queries": int(sum(len(x) for x in d)), "difference": float(value), "low": float(low),
                     "high": float(high),
                     "p_value": float(min(1.0, (1 + extreme[name]) / (replicates + 1))),
                     "a_wins": int(sum((x > 0).sum() for x in d)), "b_wins": int(sum((x < 0).sum() for x in d)),
                     "ties": int(sum((x == 0).sum() for x in d))}
    return out
