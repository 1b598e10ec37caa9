"""``cirbench compare A B``: are two runs on the same split really different? A paired test per metric."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..util import MAX_REPLICATES

EPILOG = """\b
Examples:
  cirbench compare results/circo/val/slerp@alpha=0.8__ViT-L-14-openai.json \\
                   results/circo/val/image-only__ViT-L-14-openai.json
  cirbench compare A.json B.json --metric mAP@10 --json
"""


def aligned_queries(paths: list[Path]) -> tuple[list[dict], list[tuple[tuple[str, str], list[dict]]]]:
    """The records of result files on one split and the queries every run scored: ``((set, query id), [each
    run's per-query metrics, in the order of paths])``."""
    from cirbench.errors import CirbenchError
    from cirbench.results import read_predictions_of, read_result

    records = [read_result(p) for p in paths]
    first = records[0]["dataset"]
    for path, record in zip(paths[1:], records[1:], strict=True):
        ds = record["dataset"]
        if (ds.get("name"), ds.get("split")) != (first.get("name"), first.get("split")):
            raise CirbenchError(f"{paths[0].name} is {first.get('name')}/{first.get('split')} but {path.name} is "
                                f"{ds.get('name')}/{ds.get('split')}: compare runs on the same split")
    rows = [read_predictions_of(p, r) for p, r in zip(paths, records, strict=True)]
    if not all(any("metrics" in r for r in run) for run in rows):
        raise CirbenchError("these results carry no per-query metrics (hidden-target split, or written by an older "
                            "cirbench): nothing to compare")
    others = [{(r.get("set", ""), str(r["query"])): r for r in run} for run in rows[1:]]
    aligned = []
    for row in rows[0]:
        key = (str(row.get("set", "")), str(row["query"]))
        matched = [m for by_key in others if (m := by_key.get(key)) is not None]
        if len(matched) == len(others):
            aligned.append((key, [r.get("metrics") or {} for r in (row, *matched)]))
    if not aligned:
        raise CirbenchError("the runs share no scored query (different query sets?)")
    return records, aligned


def set_columns(aligned: list[tuple[tuple[str, str], list[dict]]]) -> dict[str, dict[str, list[list]]]:
    """Per set, per metric, the values of the queries every run scored it for, one list per run."""
    out: dict[str, dict[str, list[list]]] = {}
    for (set_name, _), metrics in aligned:
        for metric in metrics[0]:
            values = [m.get(metric) for m in metrics]
            if any(v is None for v in values):
                continue
            columns = out.setdefault(set_name, {}).setdefault(metric, [[] for _ in metrics])
            for column, v in zip(columns, values, strict=True):
                column.append(v)
    return out


def split_aggregate(record: dict):
    """The recorded dataset's ``aggregate`` and detail-metric prefixes (None and () for a dataset whose plugin is
    not installed here, or that cannot be built without its data)."""
    from cirbench.errors import CirbenchError
    from cirbench.plugins import get_registry

    try:
        spec = get_registry().dataset(str(record["dataset"].get("name")))
        return spec.create(None, dict(record["dataset"].get("options") or {})).aggregate, tuple(spec.detail_metrics)
    except (CirbenchError, TypeError, ValueError, OSError):
        return None, ()


def compare_runs(path_a: Path, path_b: Path, replicates: int, metrics: tuple[str, ...] = (),
                 all_metrics: bool = False) -> tuple[dict, dict, dict[str, dict[str, float]]]:
    """Both records and the paired comparison of every metric both runs scored (``metrics``: only these, by full
    or bare name; breakdown metrics only with ``all_metrics``), and of the split's combined metrics when it has
    several sets (see :func:`cirbench.stats.paired_aggregate`)."""
    from cirbench.errors import CirbenchError
    from cirbench.stats import paired_aggregate, paired_comparison

    (rec_a, rec_b), aligned = aligned_queries([path_a, path_b])
    per_set = set_columns(aligned)
    several = len({key[0] for key, _ in aligned}) > 1
    paired = {f"{s}/{m}" if several else m: columns for s, ms in per_set.items() for m, columns in ms.items()}
    if not paired:
        raise CirbenchError("the two runs share no scored metric")
    aggregate, details = split_aggregate(rec_a)

    def wanted(name: str) -> bool:
        if metrics:
            return name in metrics or name.split("/")[-1] in metrics
        return all_metrics or not name.startswith(details)

    out = {name: paired_comparison(a, b, replicates=replicates) for name, (a, b) in paired.items() if wanted(name)}
    if aggregate is not None and len(per_set) > 1:
        try:  # a third-party aggregate that wants other metrics than both runs scored: no combined rows
            combined = [m for m in aggregate({s: {m: 0.0 for m in ms} for s, ms in per_set.items()})
                        if m not in paired and wanted(m)]
            out.update(paired_aggregate(per_set, aggregate, combined, replicates=replicates))
        except (KeyError, ValueError, ZeroDivisionError):
            pass
    return rec_a, rec_b, out


@click.command(name="compare", epilog=EPILOG)
@click.argument("result_a", type=click.Path(dir_okay=False, exists=True))
@click.argument("result_b", type=click.Path(dir_okay=False, exists=True))
@click.option("--metric", "metrics", multiple=True, help="Only these metrics (default: all shared ones).")
@click.option("--replicates", type=click.IntRange(100, MAX_REPLICATES), default=10000, show_default=True,
              help="Bootstrap and permutation samples.")
@click.option("--all-metrics", is_flag=True, help="Also the breakdown metrics a leaderboard keeps out (CIRCO's "
              "per-aspect mAP@10, each domain pair's numbers).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def command(result_a, result_b, metrics, replicates, all_metrics, as_json):
    """Paired comparison of two result files on the same split: per metric, the mean per-query difference A - B,
    its 95% paired-bootstrap interval, a sign-flip permutation p-value, and how many queries each run wins. A split
    of several sets (FashionIQ's categories, domain pairs) is compared on its combined metrics too (avg/...), the
    queries resampled within their set."""
    rec_a, rec_b, out = compare_runs(Path(result_a), Path(result_b), replicates, metrics, all_metrics)
    if as_json:
        click.echo(json.dumps({"a": rec_a["method"].get("label"), "b": rec_b["method"].get("label"),
                               "dataset": rec_a["dataset"].get("name"), "split": rec_a["dataset"].get("split"),
                               "comparisons": out}))
        return
    click.echo(f"A = {rec_a['method'].get('label')}  B = {rec_b['method'].get('label')}  "
               f"({rec_a['dataset'].get('name')}/{rec_a['dataset'].get('split')}, paired over queries)")
    click.echo(f"{'metric':<28} {'A-B':>8} {'95% CI':>20} {'p':>8} {'A wins':>7} {'B wins':>7}")
    for name, r in out.items():
        ci = f"[{r['low']:.2f}, {r['high']:.2f}]"
        click.echo(f"{name:<28} {r['difference']:8.2f} {ci:>20} {r['p_value']:8.4f} {r['a_wins']:7d} {r['b_wins']:7d}")
