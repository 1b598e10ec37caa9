"""``cirbench report``: a self-contained HTML page per run (or per pair of runs) to look at what a method did.

The page holds the metrics with their 95% intervals (and, for two runs, the paired test per metric), the
run's provenance, plots (the split's leaderboard as bars, metric against any option swept in the same folder,
the training loss of a trained checkpoint), and a per-query view: reference image, modification text, the
top-K thumbnails with targets marked, the target's rank, and what the method recorded (e.g. an LLM's
rewrite). Filters: hits/misses, the evaluation set (FashionIQ category, GeneCIS task, ...) and CIRCO's
semantic aspects; for two runs, the queries where their target ranks differ most come first.

Everything is in one HTML file (inline CSS and script, no network) except the thumbnails and plots, written
once into ``thumbs/`` and ``plots/`` beside it (a second report reuses them).
"""

from __future__ import annotations

import hashlib
import html
import json
import os
from pathlib import Path
from typing import Any

from .errors import CirbenchError
from .results import main_metric_of, read_predictions_of, read_result
from .util import atomic_write_bytes, checkpoint_folder, is_number, one_line

THUMB = 112  # pixels, longest side


# -- data --------------------------------------------------------------------------------------------------
def _rank(row: dict[str, Any]) -> int | None:
    """1-based rank of the first target in the saved top list, None when no target is in it."""
    targets = set(row.get("targets") or ())
    return next((i + 1 for i, x in enumerate(row.get("top") or ()) if x in targets), None)


def _load_images(record: dict[str, Any]) -> tuple[dict[str, Any], dict[tuple[str, str], Any], str | None]:
    """``{image id: ImageRef}`` and ``{(set, query id): Query}`` from the run's dataset as recorded, or why not."""
    from .plugins import get_registry
    from .types import resolve_options

    ds = record["dataset"]
    try:
        spec = get_registry().dataset(ds["name"])
        # the recorded options the plugin still declares, checked as a run checks them (the file may be edited)
        known = {o.name for o in spec.options}
        recorded = {k: v for k, v in (ds.get("options") or {}).items() if k in known}
        (options,) = resolve_options(spec.options, recorded, spec.name, f"dataset {spec.name}")
        # a run that named no data root used the dataset's own default (shapes: its cache folder), so must this
        dataset = spec.create(ds.get("data_root") if ds.get("data_root_given", True) else None, options)
        sets = dataset.load(ds["split"])
    except CirbenchError as exc:
        return {}, {}, f"images unavailable ({one_line(exc)})"
    images: dict[str, Any] = {}
    queries: dict[tuple[str, str], Any] = {}
    for es in sets:
        images.update(es.images)
        for q in es.queries:
            queries[(es.name, q.id)] = q
    return images, queries, None


class Thumbnails:
    """Thumbnails made once into ``folder`` (named by file, size, mtime and view), relative paths out."""

    def __init__(self, folder: Path, images: dict[str, Any]):
        self.folder, self.images = folder, images
        self.made = self.reused = self.failed = 0

    def __call__(self, image_id: str) -> str | None:
        ref = self.images.get(image_id)
        if ref is None:
            return None
        try:
            st = os.stat(ref.path)
        except OSError:
            self.failed += 1
            return None
        key = f"{ref.path}|{st.st_size}|{st.st_mtime_ns}|{ref.view.key if ref.view else ''}|{THUMB}"
        name = hashlib.sha1(key.encode()).hexdigest()[:20] + ".jpg"
        path = self.folder / name
        if path.is_file():
            self.reused += 1
            return f"{self.folder.name}/{name}"
        try:
            import io

            from .images import load_image

            image = load_image(ref).convert("RGB")
            image.thumbnail((THUMB, THUMB))
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=82)
            atomic_write_bytes(path, buf.getvalue())
        except Exception:  # noqa: BLE001 - an unreadable image is a missing thumbnail, not a failed report
            self.failed += 1
            return None
        self.made += 1
        return f"{self.folder.name}/{name}"


def query_rows(runs: list[tuple[dict, list[dict]]], queries: dict, top: int, limit: int) -> list[dict[str, Any]]:
    """One entry per query shown: its text, reference, and each run's top ids, rank and method details. Two runs:
    the queries whose target ranks differ most come first."""
    first = runs[0][1]
    others = [{(r.get("set", ""), str(r["query"])): r for r in rows} for _, rows in runs[1:]]
    out = []
    for row in first:
        key = (row.get("set", ""), str(row["query"]))
        found = [o.get(key) for o in others]
        per_run = [row] + [r for r in found if r is not None]
        if len(per_run) != len(runs):  # a query some run did not answer
            continue
        q = queries.get(key)
        ranks = [_rank(r) for r in per_run]
        capped = [r if r is not None else len(r_row.get("top") or ()) + 1 for r, r_row in zip(ranks, per_run,
                                                                                                strict=True)]
        out.append({
            "set": key[0], "query": key[1], "reference": row.get("reference"),
            "texts": list(q.texts) if q is not None else [],
            "aspects": list((q.extra or {}).get("semantic_aspects", [])) if q is not None else [],
            "targets": list(row.get("targets") or ()),
            "runs": [{"top": list(r.get("top") or ())[:top], "rank": rk, "method": r.get("method")}
                     for r, rk in zip(per_run, ranks, strict=True)],
            "disagreement": max(capped) - min(capped),
        })
    if len(runs) > 1:
        out.sort(key=lambda e: -e["disagreement"])
    return out[:limit] if limit else out


# -- plots -------------------------------------------------------------------------------------------------
def make_plots(result_paths: list[Path], records: list[dict], out: Path) -> list[tuple[str, str]]:
    """``[(title, png relative path)]``: the split's leaderboard bars, sweeps of any numeric option among the
    runs of the same method in the folder, and the training loss of a checkpoint that kept its log."""
    from . import plots

    plots_dir = out / "plots"
    made: list[tuple[str, str]] = []
    metric = main_metric_of(records[0])
    if metric is None:
        return made
    folder_records = []
    for path in sorted(Path(result_paths[0]).parent.glob("*.json")):
        try:
            rec = read_result(path)
        except CirbenchError:
            continue
        if metric in (rec.get("metrics") or {}):
            folder_records.append(rec)
    shown = {r["method"].get("label") for r in records}
    bars = [(f"{r['method'].get('label')} ({r['backbone'].get('model', '?')})", r["metrics"][metric],
             tuple((r.get("metrics_ci") or {}).get(metric, ())) or None) for r in folder_records]
    bars = [(label, value, ci if ci and len(ci) == 2 else None) for label, value, ci in bars]
    if bars:
        highlight = {b[0] for b in bars if b[0].split(" (")[0] in shown}
        png = plots.bar_plot(bars, metric, plots_dir / "leaderboard", f"{records[0]['dataset']['name']}/"
                             f"{records[0]['dataset']['split']}: {metric}", highlight)
        made.append((f"All runs in this folder: {metric}", f"plots/{png.name}"))
    # sweeps: runs of one method and backbone that differ in exactly one numeric option
    groups: dict[tuple, list[dict]] = {}
    for rec in folder_records:
        groups.setdefault((rec["method"].get("name"), rec["backbone"].get("model")), []).append(rec)
    for (name, model), recs in groups.items():
        if len(recs) < 3:
            continue
        options = [r["method"].get("options") or {} for r in recs]
        varying = [k for k, v in options[0].items() if is_number(v) and len({o.get(k) for o in options}) > 2]
        for option in varying:
            rest = [{k: v for k, v in o.items() if k != option} for o in options]
            if any(r != rest[0] for r in rest):
                continue
            pts = {f"{name} ({model})": [(o[option], r["metrics"][metric]) for o, r in zip(options, recs, strict=True)]}
            png = plots.sweep_plot(pts, option, metric, plots_dir / f"sweep-{name}-{option}")
            made.append((f"{name}: {metric} against {option}", f"plots/{png.name}"))
    for rec in records:
        ckpt = (rec["method"].get("options") or {}).get("checkpoint")  # a checkpoint folder or its weights file
        train_log = checkpoint_folder(Path(str(ckpt)).expanduser()) / "train_log.jsonl" if ckpt else None
        if train_log is not None and train_log.is_file():
            loss_png = plots.loss_plot(train_log, plots_dir / f"loss-{rec['method'].get('label')}")
            if loss_png is not None:
                made.append((f"Training loss of {rec['method'].get('label')}", f"plots/{loss_png.name}"))
    return made


# -- page ----------------------------------------------------------------------------------------------------
CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse}td,th{padding:3px 8px;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}
.num{text-align:right;font-variant-numeric:tabular-nums}.prov td:first-child{color:#666;white-space:nowrap}
.q{border-bottom:1px solid #ccc;padding:8px 0}.q .meta{color:#555;font-size:12px}.strip{display:flex;gap:4px;
flex-wrap:wrap;align-items:flex-start}.strip figure{margin:0;text-align:center;font-size:11px;color:#555}
.strip img{display:block;max-width:112px;max-height:112px;border:3px solid transparent}
.strip .tgt img{border-color:#2a9d43}
.ref img{border-color:#999}.hit{color:#2a9d43;font-weight:600}.miss{color:#c0392b;font-weight:600}
.noimg{width:60px;height:60px;background:#eee;display:flex;align-items:center;justify-content:center}
.controls{position:sticky;top:0;background:#fff;padding:6px 0;border-bottom:2px solid #ddd}.plots img{max-width:48%}
.details{font-size:12px;color:#444;background:#f7f7f7;padding:2px 6px;margin:3px 0;white-space:pre-wrap}
"""

SCRIPT = """
const DATA = JSON.parse(document.getElementById('cirbench-data').textContent);
function apply() {
  const show = document.getElementById('show').value, set = document.getElementById('set').value,
        aspect = document.getElementById('aspect').value;
  let n = 0;
  for (const el of document.querySelectorAll('.q')) {
    const e = DATA.rows[+el.dataset.i];
    const hits = e.runs.map(r => r.rank !== null && r.rank <= DATA.k);
    let ok = show === 'all' || (show === 'hits' && hits[0]) || (show === 'misses' && !hits[0])
      || (show === 'a-only' && hits[0] && !hits[1]) || (show === 'b-only' && hits[1] && !hits[0])
      || (show === 'disagree' && e.disagreement > 0);
    ok = ok && (set === '' || e.set === set) && (aspect === '' || e.aspects.includes(aspect));
    el.style.display = ok ? '' : 'none';
    if (ok) n++;
  }
  document.getElementById('count').textContent = n + ' of ' + DATA.rows.length + ' queries';
}
for (const id of ['show', 'set', 'aspect']) document.getElementById(id).addEventListener('change', apply);
apply();
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v: Any) -> str:
    return f"{v:.2f}" if is_number(v) else _e(v)


def _figure(src: str | None, caption: str, cls: str = "") -> str:
    img = f'<img src="{_e(src)}" alt="{_e(caption)}" loading="lazy">' if src else '<div class="noimg">?</div>'
    return f'<figure class="{cls}">{img}<figcaption>{_e(caption)}</figcaption></figure>'


def _metrics_table(records: list[dict], comparison: dict[str, dict] | None) -> str:
    names = list(dict.fromkeys(m for r in records for m in (r.get("metrics") or {}) if "/" not in m or
                               m.startswith(("avg/",)) or len(records[0].get("metrics") or {}) < 30))
    head = "".join(f"<th>{_e(r['method'].get('label'))}</th>" for r in records)
    if comparison:
        head += "<th>A &minus; B [95% CI]</th><th>p</th>"
    body = []
    for m in names:
        cells = []
        for r in records:
            v, ci = (r.get("metrics") or {}).get(m), (r.get("metrics_ci") or {}).get(m)
            text = _fmt(v) if v is not None else ""
            if ci and len(ci) == 2:
                text += f' <small>[{ci[0]:.2f}, {ci[1]:.2f}]</small>'
            cells.append(f'<td class="num">{text}</td>')
        if comparison:
            c = comparison.get(m)
            cells.append(f'<td class="num">{c["difference"]:+.2f} [{c["low"]:.2f}, {c["high"]:.2f}]</td>'
                         f'<td class="num">{c["p_value"]:.4f}</td>' if c else "<td></td><td></td>")
        body.append(f"<tr><td>{_e(m)}</td>{''.join(cells)}</tr>")
    return f"<table><tr><th>metric</th>{head}</tr>{''.join(body)}</table>"


def _provenance(record: dict) -> str:
    from .plugins import describe_source

    env = record.get("environment") or {}
    counts = record.get("counts") or {}
    rows = [
        ("method", f"{record['method'].get('name')} {json.dumps(record['method'].get('options') or {})}"),
        ("dataset", f"{record['dataset'].get('name')}/{record['dataset'].get('split')} "
                    f"({record['dataset'].get('data_root')})"),
        ("annotations", ", ".join(f"{k} {v[:12]}" for k, v in (record["dataset"].get("annotations") or {}).items())),
        ("plugin code", " · ".join(f"{part} {describe_source(record[part].get('plugin_source'))}"
                                   for part in ("method", "dataset") if record[part].get("plugin_source"))),
        ("backbone", json.dumps(record.get("backbone") or {})),
        ("preprocessing", json.dumps(record.get("preprocess") or {})),
        ("precision / seed", f"{record.get('precision')} / {record.get('seed')}"),
        ("counts", f"{counts.get('queries')} queries, {counts.get('gallery')} gallery images"),
        ("versions", ", ".join(f"{k} {v}" for k, v in env.items() if v)),
        ("fingerprint", record.get("fingerprint", "")),
        ("created", record.get("created", "")),
    ]
    if record["method"].get("summary"):
        rows.append(("method summary", json.dumps(record["method"]["summary"])))
    return "<table class='prov'>" + "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows) + "</table>"


def _query_html(i: int, e: dict, labels: list[str], thumb, top: int) -> str:
    targets = set(e["targets"])
    status = []
    for label, run in zip(labels, e["runs"], strict=True):
        rank = run["rank"]
        cls = "hit" if rank is not None and rank <= top else "miss"
        shown = str(rank) if rank is not None else "not in the saved ranking"
        status.append(f'<span class="{cls}">{_e(label)}: target rank {_e(shown)}</span>')
    meta = f"set {_e(e['set'])} · query {_e(e['query'])}" + (f" · aspects: {_e(', '.join(e['aspects']))}"
                                                             if e["aspects"] else "")
    parts = [f'<div class="q" data-i="{i}"><div class="meta">{meta} · {" · ".join(status)}</div>',
             f"<div><b>{_e(' / '.join(e['texts']))}</b></div>"]
    for label, run in zip(labels, e["runs"], strict=True):
        if run.get("method"):
            parts.append(f'<div class="details">{_e(label)}: {_e(json.dumps(run["method"], ensure_ascii=False))}</div>')
        figs = [_figure(thumb(e["reference"]), "reference", "ref")]
        for rank, image_id in enumerate(run["top"], 1):
            figs.append(_figure(thumb(image_id), f"{rank}{' target' if image_id in targets else ''}",
                                "tgt" if image_id in targets else ""))
        if (run["rank"] is None or run["rank"] > top) and e["targets"]:
            figs.append(_figure(thumb(e["targets"][0]), f"target (rank {run['rank'] or '?'})", "tgt"))
        parts.append(f'<div class="strip" data-run="{_e(label)}">{"".join(figs)}</div>')
    parts.append("</div>")
    return "".join(parts)


def build_report(result_paths: list[Path], output: Path | None = None, top: int = 10, limit: int = 300,
                 thumbnails: bool = True) -> Path:
    """Write the report for one or two result files; returns the HTML path."""
    if not 1 <= len(result_paths) <= 2:
        raise CirbenchError("cirbench report takes one result file, or two runs on the same split to compare")
    records = [read_result(p) for p in result_paths]
    if len(records) == 2:
        a, b = (r["dataset"] for r in records)
        if (a.get("name"), a.get("split")) != (b.get("name"), b.get("split")):
            raise CirbenchError(f"{result_paths[0].name} is {a.get('name')}/{a.get('split')} but {result_paths[1].name}"
                                f" is {b.get('name')}/{b.get('split')}: a report compares runs on the same split")
    runs = [(r, read_predictions_of(p, r)) for p, r in zip(result_paths, records, strict=True)]
    other = "-vs-" + Path(result_paths[1]).stem if len(result_paths) == 2 else ""
    out = Path(output) if output else Path(result_paths[0]).with_suffix("").with_name(
        Path(result_paths[0]).stem + other + ".report")
    out.mkdir(parents=True, exist_ok=True)
    images, queries, why = _load_images(records[0]) if thumbnails else ({}, {}, "thumbnails switched off")
    labels = [r["method"].get("label") or "run" for r in records]
    if len(labels) == 2 and labels[0] == labels[1]:
        labels = [f"A: {labels[0]}", f"B: {labels[1]}"]
    rows = query_rows(runs, queries, top, limit)
    thumb = Thumbnails(out / "thumbs", images)
    query_html = "".join(_query_html(i, e, labels, thumb, top) for i, e in enumerate(rows))
    comparison = None
    if len(records) == 2:
        from .commands.compare import compare_runs

        try:
            comparison = compare_runs(Path(result_paths[0]), Path(result_paths[1]), replicates=2000)[2]
        except CirbenchError:
            comparison = None
    plot_list = make_plots(result_paths, records, out)
    sets = sorted({e["set"] for e in rows})
    aspects = sorted({a for e in rows for a in e["aspects"]})
    show = ["all", "hits", "misses"] + (["disagree", "a-only", "b-only"] if len(records) == 2 else [])
    show_labels = {"all": "all queries", "hits": f"hits (a target in the top {top})",
                   "misses": f"misses (no target in the top {top})", "disagree": "ranks differ",
                   "a-only": f"hit by {labels[0]} only", "b-only": f"hit by {labels[-1]} only"}
    controls = (
        '<div class="controls">show <select id="show">' +
        "".join(f'<option value="{s}">{_e(show_labels[s])}</option>' for s in show) + '</select> set <select id="set">'
        '<option value="">all</option>' + "".join(f'<option value="{_e(s)}">{_e(s)}</option>' for s in sets) +
        '</select> aspect <select id="aspect"><option value="">all</option>' +
        "".join(f'<option value="{_e(a)}">{_e(a)}</option>' for a in aspects) +
        '</select> <span id="count"></span></div>')
    data = json.dumps({"k": top, "rows": [{k: e[k] for k in ("set", "query", "aspects", "disagreement")} |
                                          {"runs": [{"rank": r["rank"]} for r in e["runs"]]} for e in rows]})
    data = data.replace("</", "<\\/")  # a '</script>' inside a set or query name cannot end the data island
    title = " vs ".join(labels) + f" on {records[0]['dataset']['name']}/{records[0]['dataset']['split']}"
    notes = []
    if why:
        notes.append(why)
    if thumb.failed:
        notes.append(f"{thumb.failed} thumbnails could not be made (missing or unreadable images)")
    paired_note = "; A &minus; B: paired bootstrap, p from a sign-flip permutation test" if comparison else ""
    figures = "".join(f'<figure><img src="{_e(src)}" alt="{_e(t)}"><figcaption>{_e(t)}</figcaption></figure>'
                      for t, src in plot_list)
    plots = f'<h2>Plots</h2><div class="plots">{figures}</div>' if plot_list else ""
    provenance = "".join(f"<h3>{_e(label)}</h3>" + _provenance(r) for label, r in zip(labels, records, strict=True))
    order = " (those whose target ranks differ most first)" if len(records) == 2 else ""
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title><style>{CSS}</style></head><body>
<h1>{_e(title)}</h1>
{''.join(f'<p class="meta">{_e(n)}</p>' for n in notes)}
<h2>Metrics</h2>{_metrics_table(records, comparison)}
<p class="meta">95% percentile-bootstrap intervals over queries{paired_note}.</p>
{plots}
<h2>Provenance</h2>{provenance}
<h2>Queries</h2>
<p class="meta">{len(rows)} queries shown{order}; top {top} per run; green frames mark targets.</p>
{controls}
<div id="queries">{query_html}</div>
<script type="application/json" id="cirbench-data">{data}</script>
<script>{SCRIPT}</script>
</body></html>
"""
    path = out / "report.html"
    atomic_write_bytes(path, page.encode("utf-8"))
    return path
