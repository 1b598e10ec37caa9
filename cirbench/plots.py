"""Plots (matplotlib, headless): a metric against a swept option, a leaderboard bar chart, a training loss curve.
Each is written as PNG and SVG; the functions return the PNG path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .util import is_number, train_log_entries


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)
    fig.savefig(path.with_suffix(".svg"))
    _pyplot().close(fig)
    return path.with_suffix(".png")


def sweep_plot(points: dict[str, list[tuple[float, float]]], option: str, metric: str, path: Path,
               title: str = "") -> Path:
    """``points[label] = [(option value, metric value), ...]``: one line per method/backbone."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for label, pts in sorted(points.items()):
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xlabel(option)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.set_title(title or f"{metric} against {option}")
    if len(points) > 1:
        ax.legend(fontsize=8)
    return _save(fig, path)


def bar_plot(rows: list[tuple[str, float, tuple[float, float] | None]], metric: str, path: Path,
             title: str = "", highlight: set[str] | None = None) -> Path:
    """Horizontal bars, best at the top; ``rows = [(label, value, (low, high) or None)]`` (error bars from the
    95% bootstrap intervals where known)."""
    plt = _pyplot()
    rows = sorted(rows, key=lambda r: r[1])
    fig, ax = plt.subplots(figsize=(6.5, 0.35 * len(rows) + 1.2))
    values = [r[1] for r in rows]
    err = [[max(0.0, r[1] - r[2][0]) if r[2] else 0.0 for r in rows],
           [max(0.0, r[2][1] - r[1]) if r[2] else 0.0 for r in rows]]
    colours = ["#d9822b" if highlight and r[0] in highlight else "#4c72b0" for r in rows]
    ax.barh(range(len(rows)), values, xerr=err if any(r[2] for r in rows) else None, color=colours, capsize=2)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax.set_xlabel(metric)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title or metric)
    return _save(fig, path)


def _log_entries(path: Path) -> list[dict[str, Any]]:
    return [entry for _, entry in train_log_entries(path)]


def read_validation(path: Path) -> dict[str, list[tuple[int, float]]]:
    """``{"cirr:val R@1": [(step, value), ...]}``: each validated benchmark's main metric (its first metric when
    the benchmark is not registered here) against the step, from the validation entries of ``train_log.jsonl``
    (``{"validation": {benchmark: {run label: {metric: value}}}}``)."""
    return _validation_series(_log_entries(path))


def _main_metric(benchmark: str) -> str | None:
    from .errors import CirbenchError
    from .plugins import get_registry
    from .types import benchmark_split

    try:
        return get_registry().dataset(benchmark_split(benchmark)[0]).main_metric
    except CirbenchError:  # a plugin no longer installed: plot what the log holds
        return None


def _validation_series(entries: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    mains: dict[str, str | None] = {}  # benchmark -> main metric, looked up once
    for row in entries:
        validation = row.get("validation")
        for benchmark, runs in validation.items() if isinstance(validation, dict) else ():
            if not isinstance(runs, dict) or not runs:
                continue
            metrics = next(iter(runs.values()))
            if not isinstance(metrics, dict) or not metrics:
                continue
            if benchmark not in mains:
                mains[benchmark] = _main_metric(benchmark)
            metric = mains[benchmark] if mains[benchmark] in metrics else next(iter(metrics))
            if is_number(metrics.get(metric)):
                series.setdefault(f"{benchmark} {metric}", []).append((row["step"], float(metrics[metric])))
    return series


def loss_plot(log: Path, path: Path, title: str = "training loss") -> Path | None:
    """The loss and, on a second axis, each validated benchmark's main metric against the step, from
    ``train_log.jsonl``."""
    entries = _log_entries(log)  # read once: the loss and the validation entries
    rows = [row for row in entries if is_number(row.get("loss"))]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    validation = _validation_series(entries)
    if validation:
        twin = ax.twinx()
        colours = ["#d9822b", "#55a868", "#c44e52", "#8172b2"]
        for i, (name, points) in enumerate(validation.items()):
            twin.plot([s for s, _ in points], [v for _, v in points], color=colours[i % len(colours)], marker="o",
                      label=name)
        twin.set_ylabel("validation")
        twin.legend(fontsize=7, loc="upper right")
    ax.set_title(title)
    return _save(fig, path)
