"""``cirbench agree A B``: do two rankings of the same queries agree, query by query?

Parity with an official implementation is shown best by its rankings, not by its metrics: two runs can score alike
and rank differently, and on a hidden-target split (CIRCO test, CIRR test1) there are no metrics to compare at
all. Many official repositories publish the test-server files their method produced (BGE-VL's CIRCO rankings,
for one): ``agree`` sets a cirbench run's rankings beside such a file, or beside another run's, and reports how many
queries rank the same top-1, how much of each top-K the two share, and how many top-K lists are identical, with
the queries that differ most.

Each side is a cirbench result file (its predictions), a ``*.predictions.jsonl`` file, or a JSON file mapping query
ids to ranked image ids (CIRCO's and CIRR's test-server formats; CIRR's ``version`` and ``metric`` entries are
skipped). Ids are compared as text (CIRCO's integer ids as their digits).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

EPILOG = """\b
Examples:
  cirbench agree results/circo/test/bge-vl__ViT-B-16-BGE-VL-base.json mmret_base_circo.json
  cirbench agree A.json B.json --k 1,10 --json
  cirbench agree mine.predictions.jsonl official.json --fail-below 99   # exit 1 when the top-K overlap is lower
"""

DEFAULT_KS = (1, 5, 10, 25, 50)
Key = tuple[str, str]  # (set name or "", query id)


def read_rankings(path: Path) -> dict[Key, list[str]]:
    """Ranked ids per (set, query) from a result file, a predictions JSONL file or a submission JSON file."""
    from cirbench.dataset import Dataset
    from cirbench.errors import CirbenchError
    from cirbench.results import checked_result, read_predictions_of
    from cirbench.util import json_loads

    if path.suffix == ".jsonl":
        by_set = Dataset.read_predictions(path)
        return {(name, query): [str(x) for x in ids] for name, rows in by_set.items()
                if not name.startswith("subset:") for query, ids in rows.items()}
    try:
        data = json_loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise CirbenchError(f"{path} is not a readable JSON file: {exc}") from None
    if isinstance(data, dict) and "schema_version" in data:  # a cirbench result: its predictions
        out: dict[Key, list[str]] = {}
        for row in read_predictions_of(path, checked_result(data, path)):
            out[(str(row.get("set", "")), str(row["query"]))] = [str(x) for x in row.get("top") or []]
        return out
    if not isinstance(data, dict):
        raise CirbenchError(f"{path} is neither a cirbench result nor a submission file ({{query id: [image ids]}})")
    rankings = {}
    for query, ids in data.items():
        if query in ("version", "metric"):  # CIRR's test-server file names its format
            continue
        if not isinstance(ids, list):
            raise CirbenchError(f"{path}: query {query}'s ranking is a {type(ids).__name__}, not a list of ids")
        rankings[("", str(query))] = [str(x) for x in ids]
    return rankings


def _by_query(rankings: dict[Key, list[str]], path: Path) -> dict[Key, list[str]]:
    """The rankings keyed by query id alone (set ""), for matching with a file that names no sets."""
    from cirbench.errors import CirbenchError

    out: dict[Key, list[str]] = {}
    for (_, query), ids in rankings.items():
        if ("", query) in out:
            raise CirbenchError(f"{path} ranks query {query} in several sets, and the other file names no sets: "
                                "compare the set's own rankings")
        out[("", query)] = ids
    return out


def agreement(a: Path, b: Path, ks: tuple[int, ...] = DEFAULT_KS, worst: int = 5) -> dict:
    """How the rankings of ``a`` and ``b`` agree on the queries both rank (see the module docstring)."""
    from cirbench.errors import CirbenchError

    left, right = read_rankings(a), read_rankings(b)
    if all(name == "" for name, _ in left) != all(name == "" for name, _ in right):
        left, right = _by_query(left, a), _by_query(right, b)
    shared = [key for key in left if key in right]
    if not shared:
        raise CirbenchError(f"{a} and {b} rank no query in common (are they of the same split?)")
    depth = min(min(len(left[k]), len(right[k])) for k in shared)
    cuts = sorted({k for k in ks if k <= depth})
    if not cuts:
        raise CirbenchError(f"the shortest ranking both files give has {depth} ids; ask for --k {depth} or less")
    overlap = {k: 0.0 for k in cuts}
    identical = {k: 0 for k in cuts}
    per_query = []
    for key in shared:
        x, y = left[key], right[key]
        shares = {k: len(set(x[:k]) & set(y[:k])) / k for k in cuts}
        for k in cuts:
            overlap[k] += shares[k]
            identical[k] += x[:k] == y[:k]
        per_query.append((shares[cuts[-1]], key))
    n = len(shared)
    per_query.sort()
    return {
        "a": str(a), "b": str(b), "queries": n, "only_in_a": len(left) - n, "only_in_b": len(right) - n,
        "k": cuts,
        "overlap": {str(k): 100.0 * overlap[k] / n for k in cuts},
        "identical": {str(k): 100.0 * identical[k] / n for k in cuts},
        "least_agreeing": [{"set": key[0], "query": key[1], f"overlap@{cuts[-1]}": 100.0 * share}
                           for share, key in per_query[:worst] if share < 1.0],
    }


def _parse_ks(value: str) -> tuple[int, ...]:
    try:
        ks = tuple(sorted({int(v) for v in value.split(",") if v.strip()}))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of depths") from None
    if not ks or ks[0] < 1 or ks[-1] > 100_000:
        raise click.BadParameter("depths must be between 1 and 100000")
    return ks


@click.command(name="agree", epilog=EPILOG)
@click.argument("a", type=click.Path(dir_okay=False, exists=True))
@click.argument("b", type=click.Path(dir_okay=False, exists=True))
@click.option("--k", "depths", default=",".join(map(str, DEFAULT_KS)), show_default=True,
              help="Depths to compare the rankings at (comma-separated; those deeper than the shorter ranking are "
                   "dropped).")
@click.option("--fail-below", type=click.FloatRange(0, 100), default=None,
              help="Exit with 1 when the mean top-K overlap at the deepest K is below this percentage.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def command(a, b, depths, fail_below, as_json):
    """How two rankings of the same queries agree: a cirbench run and an official implementation's test-server
    file, say, or two runs. Per depth K: the mean share of each query's top K both rank (overlap), and the share
    of queries whose top K are the same list in the same order (identical); then the queries that agree least."""
    table = agreement(Path(a), Path(b), _parse_ks(depths))
    if as_json:
        click.echo(json.dumps(table))
    else:
        click.echo(f"{table['queries']} queries ranked by both (only in A: {table['only_in_a']}, only in B: "
                   f"{table['only_in_b']})")
        click.echo(f"{'K':>6} {'overlap':>9} {'identical':>10}")
        for k in table["k"]:
            click.echo(f"{k:>6} {table['overlap'][str(k)]:8.2f}% {table['identical'][str(k)]:9.2f}%")
        if table["least_agreeing"]:
            top = table["k"][-1]
            click.echo("least agreeing: " + ", ".join(
                f"{row['query']}{' (' + row['set'] + ')' if row['set'] else ''} {row[f'overlap@{top}']:.0f}%"
                for row in table["least_agreeing"]))
    deepest = str(table["k"][-1])
    if fail_below is not None and table["overlap"][deepest] < fail_below:
        click.echo(f"overlap@{deepest} {table['overlap'][deepest]:.2f}% is below --fail-below {fail_below:g}%",
                   err=True)
        raise click.exceptions.Exit(1)
