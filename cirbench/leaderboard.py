"""Leaderboards: pandas tables of result files, one per dataset/split, with published numbers beside ours.

Rows are runs (``label`` + backbone), columns are metrics; the best value of each column among our rows
and the paper rows is marked. Paper rows carry ``source = "paper"`` (and the split the paper reports,
when it differs from the table's split, e.g. CIRR test1 numbers beside our CIRR val runs).
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .errors import CirbenchError
from .published import PUBLISHED
from .results import find_results, read_result


@dataclass
class Table:
    dataset: str
    split: str
    frame: pd.DataFrame  # index: row name; columns: "source", "backbone", then metrics

    @property
    def title(self) -> str:
        return f"{self.dataset} / {self.split}"

    @property
    def metric_columns(self) -> list[str]:
        return [c for c in self.frame.columns if c not in ("source", "backbone", "precision", "queries")]


def _metric_sort_key(name: str) -> tuple:
    prefix, _, metric = name.rpartition("/")
    kind, _, k = metric.partition("@")
    order = {"R": 0, "Rs": 1, "mAP": 2}.get(kind, 3)
    try:
        kval = int(k)
    except ValueError:
        kval = 0
    return (prefix == "avg", prefix, order, kval, metric)


DETAIL_PREFIXES = ("aspect/",)  # per-aspect breakdowns (CIRCO): in result files, in tables only on request


def build_tables(root: Path, include_paper: bool = True,
                 datasets: list[tuple[str, str | None]] | None = None, all_metrics: bool = False) -> list[Table]:
    """Read every result under ``root`` and build one :class:`Table` per dataset/split.

    Unreadable result files are skipped with a warning line on stderr, never fatal. Breakdown metrics
    (``aspect/...``) are left out unless ``all_metrics``.
    """
    import sys

    groups: dict[tuple[str, str], list[dict]] = {}
    for path in find_results(Path(root)):
        try:
            rec = read_result(path)
        except CirbenchError as exc:
            print(f"warning: skipping {exc}", file=sys.stderr)
            continue
        key = (rec["dataset"]["name"], rec["dataset"]["split"])
        groups.setdefault(key, []).append(rec)

    def wanted(ds: str, sp: str) -> bool:
        return datasets is None or any(ds == d and (s is None or s == sp) for d, s in datasets)

    tables = []
    for (ds, sp), recs in sorted(groups.items()):
        if not wanted(ds, sp):
            continue
        rows = {}
        for rec in sorted(recs, key=lambda r: r["created"]):
            backbone = rec["backbone"]["model"] + "/" + str(rec["backbone"]["pretrained"])
            name = f"{rec['method']['label']} · {backbone}"
            rows[name] = {"source": "cirbench", "backbone": backbone, "precision": rec.get("precision"),
                          "queries": rec.get("counts", {}).get("queries"), **rec.get("metrics", {})}
        if include_paper:
            paper = [r for r in PUBLISHED if r["dataset"] == ds and r["split"] == sp]
            if not paper:  # show the numbers papers report on the other split, labelled as such
                paper = [r for r in PUBLISHED if r["dataset"] == ds]
            for r in paper:
                tag = "paper" if r["split"] == sp else f"paper ({r['split']})"
                rows[f"{r['method']} · {r['backbone']} [{tag}]"] = {"source": tag, "backbone": r["backbone"],
                                                                     **r["metrics"]}
        frame = pd.DataFrame.from_dict(rows, orient="index")
        ours = {m for rec in recs for m in rec.get("metrics", {})
                if all_metrics or not m.startswith(DETAIL_PREFIXES)}
        metric_cols = sorted((c for c in frame.columns if c in ours), key=_metric_sort_key)
        if not metric_cols:  # hidden-target split: nothing to compare
            metric_cols = sorted((c for c in frame.columns if c not in ("source", "backbone", "precision", "queries")),
                                 key=_metric_sort_key)
        frame = frame[["source", "backbone", "precision", "queries"] + metric_cols]
        tables.append(Table(ds, sp, frame))
    return tables


def _best(frame: pd.DataFrame, col: str) -> float | None:
    values = pd.to_numeric(frame[col], errors="coerce")
    return None if values.isna().all() else float(values.max())


def _formatted(table: Table, mark) -> pd.DataFrame:
    frame = table.frame.copy()
    for col in table.metric_columns:
        best = _best(table.frame, col)
        frame[col] = [
            "—" if pd.isna(v) else (mark(f"{v:.2f}") if best is not None and abs(float(v) - best) < 5e-3 else f"{v:.2f}")
            for v in table.frame[col]
        ]
    frame["queries"] = ["" if pd.isna(v) else str(int(v)) for v in table.frame["queries"]]
    frame["precision"] = ["" if pd.isna(v) else str(v) for v in table.frame["precision"]]
    return frame


def render_markdown(tables: list[Table]) -> str:
    parts = []
    for t in tables:
        parts.append(f"### {t.title}\n\n" + _formatted(t, lambda s: f"**{s}**").to_markdown() + "\n")
    return "\n".join(parts)


def render_csv(tables: list[Table]) -> str:
    parts = []
    for t in tables:
        frame = t.frame.copy()
        frame.insert(0, "split", t.split)
        frame.insert(0, "dataset", t.dataset)
        parts.append(frame.to_csv(index_label="run"))
    return "\n".join(parts)


def render_html(tables: list[Table]) -> str:
    body = []
    for t in tables:
        frame = _formatted(t, lambda s: f"<b>{s}</b>")
        body.append(f"<h2>{html.escape(t.title)}</h2>\n" + frame.to_html(escape=False, border=0, classes="leaderboard"))
    style = ("<style>body{font-family:sans-serif}table.leaderboard{border-collapse:collapse}"
             "table.leaderboard td,table.leaderboard th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}"
             "</style>")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>cirbench leaderboard</title>{style}</head>" \
           f"<body><h1>cirbench leaderboard</h1>\n" + "\n".join(body) + "</body></html>\n"


def write_tables(tables: list[Table], out_dir: Path) -> list[Path]:
    """Write ``leaderboard.md``, ``leaderboard.html`` and one CSV per table (atomically)."""
    from .util import atomic_write_bytes

    out_dir = Path(out_dir)
    written = []
    for name, text in (("leaderboard.md", render_markdown(tables)), ("leaderboard.html", render_html(tables))):
        atomic_write_bytes(out_dir / name, text.encode())
        written.append(out_dir / name)
    for t in tables:
        path = out_dir / f"{t.dataset}_{t.split}.csv"
        atomic_write_bytes(path, render_csv([t]).encode())
        written.append(path)
    return written
