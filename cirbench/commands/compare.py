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


def paired_rows(path_a: Path, path_b: Path) -> tuple[dict, dict, dict[str, tuple[list, list]]]:
    """Both records and, per metric (prefixed by the set when a split has several), the paired per-query
    values of the queries both runs scored."""
    from cirbench.errors import CirbenchError
    from cirbench.results import read_predictions_of, read_result

    rec_a, rec_b = read_result(path_a), read_result(path_b)
    ds_a, ds_b = rec_a["dataset"], rec_b["dataset"]
    if (ds_a.get("name"), ds_a.get("split")) != (ds_b.get("name"), ds_b.get("split")):
        raise CirbenchError(f"{path_a.name} is {ds_a.get('name')}/{ds_a.get('split')} but {path_b.name} is "
                            f"{ds_b.get('name')}/{ds_b.get('split')}: compare runs on the same split")
    rows_a, rows_b = read_predictions_of(path_a, rec_a), read_predictions_of(path_b, rec_b)
    if not any("metrics" in r for r in rows_a) or not any("metrics" in r for r in rows_b):
        raise CirbenchError("these results carry no per-query metrics (hidden-target split, or written by an older "
                            "cirbench): nothing to compare")
    by_b = {(r.get("set", ""), str(r["query"])): r for r in rows_b}
    sets = {r.get("set", "") for r in rows_a}
    paired: dict[str, tuple[list, list]] = {}
    for row in rows_a:
        other = by_b.get((row.get("set", ""), str(row["query"])))
        if other is None:
            continue
        for metric, value in (row.get("metrics") or {}).items():
            if metric in (other.get("metrics") or {}):
                name = f"{row.get('set', '')}/{metric}" if len(sets) > 1 else metric
                a, b = paired.setdefault(name, ([], []))
                a.append(value)
                b.append(other["metrics"][metric])
    if not paired:
        raise CirbenchError("the two runs share no scored query (different query sets?)")
    return rec_a, rec_b, paired


@click.command(name="compare", epilog=EPILOG)
@click.argument("result_a", type=click.Path(dir_okay=False, exists=True))
@click.argument("result_b", type=click.Path(dir_okay=False, exists=True))
@click.option("--metric", "metrics", multiple=True, help="Only these metrics (default: all shared ones).")
@click.option("--replicates", type=click.IntRange(100, MAX_REPLICATES), default=10000, show_default=True,
              help="Bootstrap and permutation samples.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def command(result_a, result_b, metrics, replicates, as_json):
    """Paired comparison of two result files on the same split: per metric, the mean per-query difference A - B,
    its 95% paired-bootstrap interval, a sign-flip permutation p-value, and how many queries each run wins."""
    from cirbench.stats import paired_comparison

    rec_a, rec_b, paired = paired_rows(Path(result_a), Path(result_b))
    names = [m for m in paired if not metrics or m in metrics or m.split("/")[-1] in metrics]
    out = {name: paired_comparison(*paired[name], replicates=replicates) for name in names}
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
