"""``cirbench shortcuts RESULT --image I --text T``: how much of a run's score needs composition at all?

A query that the image alone or the text alone already solves (its reference looks like the target, or its text
names it) tells nothing about composing the two. Given the runs of both unimodal baselines on the same split,
each query is classed as solved by the image, by the text, by both, or by neither ("composition required"), and
the run's metrics are reported on each class: its score where composing is needed, beside its score overall.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

EPILOG = """\b
Examples:
  cirbench shortcuts results/cirr/val/slerp@alpha=0.8__ViT-L-14-openai.json \\
      --image results/cirr/val/image-only__ViT-L-14-openai.json \\
      --text results/cirr/val/text-only__ViT-L-14-openai.json
  cirbench shortcuts A.json --image I.json --text T.json --metric R@1 --json
"""

GROUPS = ("all", "shortcut-solvable", "image solves", "text solves", "both solve", "composition required")


def classify(image: float, text: float) -> tuple[str, ...]:
    """The groups of a query whose probes scored ``image`` and ``text`` (solved: above 0)."""
    by_image, by_text = image > 0, text > 0
    groups = ["all"]
    if by_image or by_text:
        groups.append("shortcut-solvable")
        groups.append("both solve" if by_image and by_text else "image solves" if by_image else "text solves")
    else:
        groups.append("composition required")
    return tuple(groups)


def shortcut_table(paths: list[Path], metric: str | None) -> dict:
    """The run (``paths[0]``) on the queries each group holds, the probes being ``paths[1]`` (image) and
    ``paths[2]`` (text); ``metric`` decides what solved means (default: R@10 where the split has it, else the
    dataset's main metric, else the first per-query metric the runs record)."""
    from cirbench.errors import CirbenchError
    from cirbench.results import main_metric_of

    from .compare import aligned_queries

    records, aligned = aligned_queries(paths)
    names = list(dict.fromkeys(m for _, (run, *_) in aligned for m in run))
    if metric is None:
        metric = "R@10" if "R@10" in names else main_metric_of(records[0], names)
    if metric not in names:
        raise CirbenchError(f"the runs record no per-query {metric!r}; they have: {', '.join(sorted(names))}")
    members: dict[str, list[dict]] = {g: [] for g in GROUPS}
    unclassified = 0
    for _, (run, image, text) in aligned:
        if metric not in image or metric not in text:  # a query the metric does not count (nan)
            unclassified += 1
            continue
        for group in classify(float(image[metric]), float(text[metric])):
            members[group].append(run)
    total = len(members["all"])
    if not total:
        raise CirbenchError(f"no query is scored on {metric} by all three runs")
    order = [metric, *(m for m in dict.fromkeys(m for r in members["all"] for m in r) if m != metric)]
    groups = {}
    for group, rows in members.items():
        means = {}
        for name in (m for m in order if any(m in r for r in rows)):  # the chosen metric, then the run's order
            values = [float(r[name]) for r in rows if name in r]
            means[name] = sum(values) / len(values)
        groups[group] = {"queries": len(rows), "share": 100.0 * len(rows) / total, "metrics": means}
    label = [r["method"].get("label") for r in records]
    return {"run": label[0], "image": label[1], "text": label[2], "dataset": records[0]["dataset"].get("name"),
            "split": records[0]["dataset"].get("split"), "solved_by": f"{metric} > 0", "metric": metric,
            "unclassified": unclassified, "groups": groups}


@click.command(name="shortcuts", epilog=EPILOG)
@click.argument("result", type=click.Path(dir_okay=False, exists=True))
@click.option("--image", "image", required=True, type=click.Path(dir_okay=False, exists=True),
              help="The image-only run on the same split (the image probe).")
@click.option("--text", "text", required=True, type=click.Path(dir_okay=False, exists=True),
              help="The text-only run on the same split (the text probe).")
@click.option("--metric", default=None,
              help="Per-query metric that says a probe solved a query (above 0) and is reported first (default: "
                   "R@10 where the split has it, else the dataset's main metric, else the first the runs record).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def command(result, image, text, metric, as_json):
    """How a run scores where composition is needed: the split's queries classed by whether the image alone or
    the text alone already solves them (their unimodal runs, --image and --text), and the run's mean per-query
    metrics on each class ("composition required": neither probe solves it)."""
    table = shortcut_table([Path(result), Path(image), Path(text)], metric)
    if as_json:
        click.echo(json.dumps(table))
        return
    click.echo(f"{table['run']} on {table['dataset']}/{table['split']}; probes: image = {table['image']}, "
               f"text = {table['text']}; solved: {table['solved_by']}")
    if table["unclassified"]:
        click.echo(f"({table['unclassified']} queries the metric does not count are left out)")
    shown = list(table["groups"]["all"]["metrics"])[:6]
    click.echo(f"{'queries':<22} {'n':>7} {'share':>7} " + " ".join(f"{m:>10}" for m in shown))
    for group, row in table["groups"].items():
        values = " ".join(f"{row['metrics'][m]:10.2f}" if m in row["metrics"] else f"{'-':>10}" for m in shown)
        click.echo(f"{group:<22} {row['queries']:7d} {row['share']:6.1f}% {values}")
