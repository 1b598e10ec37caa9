"""Leaderboards: pandas tables of result files, one per dataset/split, with published numbers beside ours.

Rows are runs (``label · backbone``; the label shows swept options, e.g. ``slerp@alpha=0.8``, and dataset
options set to other than their defaults, e.g. ``searle (category=dress)``), columns are
metrics in the dataset's declared order, rows sorted by the dataset's main metric. What a dataset declares
(main metric, metric order, breakdown metrics, paper rows) comes from its plugin's
:class:`~cirbench.types.DatasetSpec`; the leaderboard itself knows no dataset.

The best value of each column among the rows of the table's own split (ours and papers') is marked: bold in
markdown, HTML and LaTeX, a trailing ``*`` in CSV. Paper rows for another split (CIRR/CIRCO papers report
test, runs are usually on val) are shown, labelled with their split, and never marked best.

With ``seeds=True`` the runs of one row name (one ``--label``, benchmark options and backbone) whose
configurations differ only in their seed and in the trained weights they evaluate (the same method, options,
annotations, preprocessing and precision) become one row ``name (n=K)``: each metric's mean, ± the sample
standard deviation over the runs, as papers report a trained method over training seeds. Which checkpoints are
seeds of one recipe is the label's to say: a result records a checkpoint's sha256, not how it was trained.
"""

from __future__ import annotations

import html
import math
import statistics
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import CirbenchError
from .results import find_results, read_result
from .util import matches_any

INFO_COLUMNS = ("source", "backbone", "precision", "queries")


@dataclass
class Table:
    dataset: str
    split: str
    frame: pd.DataFrame  # index: row label; columns: INFO_COLUMNS, then metrics
    main_metric: str | None = None
    ci: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)  # (row, metric) -> (low, high)
    heading: str | None = None  # the title, where it is not "dataset / split" (the summary)
    # the summary's benchmarks over their metric columns, in order: (``dataset/split``, how many columns)
    column_groups: list[tuple[str, int]] | None = None
    spread: dict[tuple[str, str], float] = field(default_factory=dict)  # (row, metric) -> sd over seeds

    @property
    def title(self) -> str:
        return self.heading or f"{self.dataset} / {self.split}"

    @property
    def metric_columns(self) -> list[str]:
        return [c for c in self.frame.columns if c not in INFO_COLUMNS]

    @property
    def info_columns(self) -> list[str]:
        return [c for c in INFO_COLUMNS if c in self.frame.columns]

    def best(self, column: str) -> float | None:
        """The best value of a column among the rows of this table's split."""
        same_split = self.frame[self.frame["source"].isin(["cirbench", "paper"])]
        values = pd.to_numeric(same_split[column], errors="coerce")
        return None if values.isna().all() else float(values.max())


def _dataset_spec(name: str):
    from .plugins import get_registry

    try:
        return get_registry().dataset(name)
    except CirbenchError:
        return None


def _ordered(columns: set[str], order: tuple[str, ...]) -> list[str]:
    first = [c for c in order if c in columns]
    return first + sorted(columns - set(first))


def _dataset_tag(spec, options: Any) -> str:
    """`` (category=dress)``: the dataset options a run set to other than their defaults (a subset of the
    benchmark, another query file), so that its row says what it was scored on; "" for the defaults."""
    if spec is None or not isinstance(options, dict):
        return ""
    shown = []
    for o in spec.options:
        value = options.get(o.name)
        if value is not None and value != o.default:
            shown.append(f"{o.name}={Path(str(value)).name if o.type == 'path' else value}")
    return f" ({', '.join(shown)})" if shown else ""


def build_tables(root: Path, include_paper: bool = True, datasets: list[tuple[str, str | None]] | None = None,
                 all_metrics: bool = False, methods: list[str] | None = None,
                 backbones: list[str] | None = None, seeds: bool = False) -> list[Table]:
    """Read every result under ``root`` and build one :class:`Table` per dataset/split.

    Unreadable result files are skipped with a warning line on stderr, never fatal. ``methods`` and
    ``backbones`` filter rows (glob patterns or substrings of the label / backbone; a backbone pattern matches
    whatever the case and however the model is spelled: ``ViT-B/32``, the papers', is ``ViT-B-32``, open_clip's).
    ``seeds``: one row (mean ± sd) per training recipe run with several seeds (see the module docstring).
    """
    groups: dict[tuple[str, str], list[tuple[Path, dict]]] = {}
    for path in find_results(Path(root)):
        try:
            rec = read_result(path)
        except CirbenchError as exc:
            print(f"warning: {exc}; skipped", file=sys.stderr)
            continue
        key = (str(rec["dataset"].get("name")), str(rec["dataset"].get("split")))
        groups.setdefault(key, []).append((path, rec))
    tables = []
    for (ds, sp), recs in sorted(groups.items()):
        if datasets is not None and not any(ds == d and (s is None or s == sp) for d, s in datasets):
            continue
        table = _table(ds, sp, recs, include_paper, all_metrics, methods, backbones, seeds)
        if table is not None:
            tables.append(table)
    return tables


def backbone_matches(backbone: str, patterns: list[str] | tuple[str, ...] | None) -> bool:
    """:func:`matches_any` for backbones, spelled as our rows (``ViT-L-14/openai``, open_clip's name and the
    weights) and the published ones (``ViT-L/14 (RemoteCLIP)``) spell them: both sides lower-cased, every ``/``
    a ``-``."""
    def norm(text: str) -> str:
        return text.lower().replace("/", "-")

    return not patterns or matches_any(norm(backbone), [norm(p) for p in patterns])


def recipe_key(rec: dict[str, Any]) -> str:
    """What a run's configuration is apart from its seed and the trained weights it evaluates (the method's path
    options, whose contents its ``files`` and ``info`` record: a checkpoint): runs with one key are one recipe's
    seeds."""
    from .results import run_fingerprint

    return run_fingerprint(rec, recipe=True)


def _over_seeds(latest: dict[tuple[str, Any], tuple[str, dict]]) -> dict[tuple[str, Any], tuple[str, list[dict]]]:
    """``latest``'s runs, those of one name and one recipe (:func:`recipe_key`) together."""
    grouped: dict[tuple[str, Any], tuple[str, list[dict]]] = {}
    for (name, _fingerprint), (backbone, rec) in latest.items():
        grouped.setdefault((name, recipe_key(rec)), (backbone, []))[1].append(rec)
    return grouped


def _table(ds, sp, recs, include_paper, all_metrics, methods, backbones, seeds=False) -> Table | None:
    spec = _dataset_spec(ds)
    details = tuple(spec.detail_metrics) if spec else ()
    rows: dict[str, dict[str, Any]] = {}
    ci: dict[tuple[str, str], tuple[float, float]] = {}
    ours: set[str] = set()
    latest: dict[tuple[str, Any], tuple[str, dict]] = {}
    for _path, rec in sorted(recs, key=lambda pr: str(pr[1].get("created", ""))):
        backbone = f"{rec['backbone'].get('model')}/{rec['backbone'].get('pretrained')}"
        label = str(rec["method"].get("label") or rec["method"].get("name"))
        if matches_any(label, methods) and backbone_matches(backbone, backbones):  # a rerun: its newest result
            name = f"{label}{_dataset_tag(spec, rec['dataset'].get('options'))} · {backbone}"
            latest[(name, rec.get("fingerprint"))] = (backbone, rec)
    spread: dict[tuple[str, str], float] = {}
    runs = _over_seeds(latest) if seeds else {key: (b, [rec]) for key, (b, rec) in latest.items()}
    configurations = Counter(name for name, _ in runs)
    for (name, key), (backbone, group) in runs.items():
        rec = group[0]
        if configurations[name] > 1:  # one label, several configurations (e.g. fp32 and bf16): each shown, told
            name = f"{name} ~{rec.get('fingerprint') if len(group) == 1 else 'recipe-' + key}"  # as their files are
        if len(group) > 1:
            name = f"{name} (n={len(group)})"
        values = [{k: v for k, v in (r.get("metrics") or {}).items() if isinstance(v, (int, float))} for r in group]
        common = [m for m in values[0] if all(m in v for v in values)]
        metrics = {m: sum(v[m] for v in values) / len(values) for m in common}
        rows[name] = {"source": "cirbench", "backbone": backbone, "precision": rec.get("precision"),
                      "queries": (rec.get("counts") or {}).get("queries"), **metrics}
        ours |= {m for m in metrics if all_metrics or not m.startswith(details)}
        if len(group) > 1:  # the spread over seeds, in place of one run's bootstrap interval
            spread.update({(name, m): statistics.stdev(v[m] for v in values) for m in common})
            continue
        for metric, interval in (rec.get("metrics_ci") or {}).items():
            if isinstance(interval, (list, tuple)) and len(interval) == 2:
                ci[(name, metric)] = (float(interval[0]), float(interval[1]))
    if not rows:
        return None
    if include_paper and spec is not None:
        paper = [r for r in spec.paper_rows if r.split == sp] or list(spec.paper_rows)
        for r in paper:
            if not matches_any(r.method, methods) or not backbone_matches(r.backbone, backbones):
                continue
            tag = "paper" if r.split == sp else f"paper ({r.split})"
            rows[f"{r.method} · {r.backbone} [{tag}]"] = {"source": tag, "backbone": r.backbone, **r.metrics}
    frame = pd.DataFrame.from_dict(rows, orient="index")
    metric_cols = _ordered(ours or {c for c in frame.columns if c not in INFO_COLUMNS},
                           tuple(spec.metric_order) if spec else ())
    frame = frame.reindex(columns=[*INFO_COLUMNS, *metric_cols])
    main = spec.main_metric if spec and spec.main_metric in metric_cols else (metric_cols[0] if metric_cols else None)
    if main is not None:
        frame["_ours"] = frame["source"] == "cirbench"
        frame["_main"] = pd.to_numeric(frame[main], errors="coerce").fillna(-math.inf)
        frame = frame.sort_values(["_ours", "_main"], ascending=[False, False], kind="stable")
        frame = frame.drop(columns=["_ours", "_main"])
    return Table(ds, sp, frame, main, ci, spread=spread)


def summary_table(tables: list[Table]) -> Table:
    """One table across benchmarks, as a paper's main table: a row per run (or published row), for each benchmark
    the metrics its published rows report (its main metric where it has none), headed ``dataset/split metric``.
    Rows keep their per-benchmark names, so a published row of another split stays a row of its own; the best of
    each column is marked as in the benchmark's own table."""
    frames, ci, spread, groups = [], {}, {}, []
    for t in tables:
        spec = _dataset_spec(t.dataset)
        published = {m for r in (spec.paper_rows if spec else ()) for m in r.metrics}
        metrics = [m for m in t.metric_columns if m in published] or ([t.main_metric] if t.main_metric else [])
        columns = {m: f"{t.dataset}/{t.split} {m}" for m in metrics}
        groups.append((f"{t.dataset}/{t.split}", len(metrics)))
        part = t.frame[["source", "backbone", "precision", *metrics]].rename(columns=columns)
        frames.append(part)
        ci.update({(row, columns[m]): v for (row, m), v in t.ci.items() if m in columns})
        spread.update({(row, columns[m]): v for (row, m), v in t.spread.items() if m in columns})
    if not frames:
        raise CirbenchError("no table to summarise")
    frame = frames[0]
    for part in frames[1:]:
        frame = _outer(frame, part)
    ours = frame["source"] == "cirbench"
    frame = pd.concat([frame[ours], frame[~ours]])
    return Table("summary", "all", frame, None, ci, heading="summary: each benchmark's published metrics",
                 column_groups=[g for g in groups if g[1]], spread=spread)


def _outer(left: pd.DataFrame, right: pd.DataFrame) -> pd.DataFrame:
    """Rows of both, in order of first appearance; a row's source, backbone and precision from whichever has
    them."""
    shared = ["source", "backbone", "precision"]
    order = list(dict.fromkeys([*left.index, *right.index]))
    joined = left.join(right.drop(columns=shared), how="outer", sort=False).reindex(order)
    for col in shared:
        joined[col] = joined[col].fillna(right[col].reindex(order))
    return joined


# -- rendering -------------------------------------------------------------------------------------------------
def _cell(table: Table, row: str, col: str, value: Any, mark, ci: bool, sep: str = " ") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    text = f"{float(value):.2f}"
    best = table.best(col)
    if best is not None and table.frame.at[row, "source"] in ("cirbench", "paper") and abs(float(value) - best) < 5e-3:
        text = mark(text)
    if (row, col) in table.spread:  # a mean over seeds: always with its spread
        text += f" ± {table.spread[(row, col)]:.2f}"
    if ci and (row, col) in table.ci:
        lo, hi = table.ci[(row, col)]
        text += f"{sep}[{lo:.2f}, {hi:.2f}]"
    return text


def _info(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _formatted(table: Table, mark, ci: bool = False) -> pd.DataFrame:
    frame = table.frame.copy().astype(object)
    for row in frame.index:
        for col in table.metric_columns:
            frame.at[row, col] = _cell(table, row, col, table.frame.at[row, col], mark, ci)
        for col in table.info_columns:
            frame.at[row, col] = _info(table.frame.at[row, col])
    return frame


def _markdown_cell(value: Any) -> Any:
    """A cell's text on one line, its pipes escaped: a label such as ``a|b`` (or one with a line break, edited into a
    result file) would otherwise split the table's row."""
    return " ".join(value.splitlines()).replace("|", r"\|") if isinstance(value, str) else value


def render_markdown(tables: list[Table], ci: bool = False) -> str:
    parts = []
    for t in tables:
        main = f" (sorted by {t.main_metric})" if t.main_metric else ""
        frame = _formatted(t, lambda s: f"**{s}**", ci).apply(lambda column: column.map(_markdown_cell))
        frame.index = frame.index.map(_markdown_cell)
        parts.append(f"### {t.title}{main}\n\n" + frame.to_markdown() + "\n")
    return "\n".join(parts)


def render_csv(tables: list[Table], ci: bool = False) -> str:
    parts = []
    for t in tables:
        frame = t.frame.copy().astype(object)
        for row in frame.index:
            for col in t.metric_columns:
                v = t.frame.at[row, col]
                frame.at[row, col] = "" if pd.isna(v) else _cell(t, row, col, v, lambda s: s + "*", ci, sep=" ")
            for col in t.info_columns:
                frame.at[row, col] = _info(t.frame.at[row, col])
        frame.insert(0, "split", t.split)
        frame.insert(0, "dataset", t.dataset)
        parts.append(frame.to_csv(index_label="run"))
    return "\n".join(parts)


def render_html(tables: list[Table], ci: bool = False) -> str:
    body = []
    for t in tables:
        frame = _formatted(t, lambda s: f"\x00b{s}\x00/b", ci)
        cells = ["<tr><th>run</th>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns) + "</tr>"]
        for row in frame.index:
            tds = "".join(f"<td>{html.escape(str(v)).replace(chr(0) + 'b', '<b>').replace(chr(0) + '/b', '</b>')}</td>"
                          for v in frame.loc[row])
            cells.append(f"<tr><th>{html.escape(str(row))}</th>{tds}</tr>")
        body.append(f"<h2>{html.escape(t.title)}</h2>\n<table class='leaderboard'>\n" + "\n".join(cells) + "\n</table>")
    style = ("<style>body{font-family:sans-serif}table.leaderboard{border-collapse:collapse}"
             "table.leaderboard td,table.leaderboard th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}"
             "</style>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>cirbench leaderboard</title>{style}</head>"
            "<body><h1>cirbench leaderboard</h1>\n" + "\n".join(body) + "</body></html>\n")


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
          "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "·": r"$\cdot$",
          "±": r"$\pm$"}


def latex_escape(text: str) -> str:
    """``text`` on one line (a blank line would end the tabular's paragraph), LaTeX's special characters escaped."""
    return "".join(_LATEX.get(ch, ch) for ch in " ".join(str(text).splitlines()))


def render_latex(tables: list[Table], ci: bool = False) -> str:
    """One ``booktabs`` tabular per table (``\\usepackage{booktabs}``), best values in bold."""
    parts = []
    for t in tables:
        metrics = t.metric_columns
        frame = _formatted(t, lambda s: f"\x00bf{s}\x00", ci)
        lines = [f"% {t.title}", r"\begin{tabular}{l" + "r" * len(metrics) + "}", r"\toprule"]
        groups = t.column_groups or []
        shown = list(metrics)
        if groups:  # the summary: a header row of benchmarks over their metrics, as papers set them
            lines.append(" & ".join([""] + [rf"\multicolumn{{{n}}}{{c}}{{{latex_escape(g)}}}" for g, n in groups])
                         + r" \\")
            first, rules, shown = 2, [], []
            for g, n in groups:
                rules.append(rf"\cmidrule(lr){{{first}-{first + n - 1}}}")
                shown += [m[len(g) + 1:] for m in metrics[first - 2: first - 2 + n]]
                first += n
            lines.append(" ".join(rules))
        lines += [" & ".join(["Method"] + [latex_escape(m) for m in shown]) + r" \\", r"\midrule"]
        for row in frame.index:
            cells = [latex_escape(row)]
            for m in metrics:
                value = str(frame.at[row, m])
                bold = value.startswith("\x00bf")
                value = latex_escape(value.replace("\x00bf", "").replace("\x00", "")).replace("—", "--")
                cells.append(r"\textbf{" + value + "}" if bold else value)
            lines.append(" & ".join(cells) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


RENDERERS = {"markdown": render_markdown, "csv": render_csv, "html": render_html, "latex": render_latex}


def write_tables(tables: list[Table], out_dir: Path, ci: bool = False, stem: str = "leaderboard") -> list[Path]:
    """Write ``<stem>.md``, ``.html``, ``.tex`` and one CSV per table (atomically)."""
    from .util import atomic_write_bytes

    out_dir = Path(out_dir)
    written = []
    for suffix, fmt in ((".md", "markdown"), (".html", "html"), (".tex", "latex")):
        atomic_write_bytes(out_dir / f"{stem}{suffix}", RENDERERS[fmt](tables, ci).encode())
        written.append(out_dir / f"{stem}{suffix}")
    for t in tables:
        path = out_dir / f"{t.dataset}_{t.split}.csv"
        atomic_write_bytes(path, render_csv([t], ci).encode())
        written.append(path)
    return written
