"""Leaderboards: tables per dataset/split, best marked, paper rows beside ours, CSV/HTML written."""

from __future__ import annotations

import json

from click.testing import CliRunner

from cirbench import plugins
from cirbench.cli import cli
from cirbench.leaderboard import build_tables, render_csv, render_markdown
from cirbench.results import write_result


def _result(root, dataset, split, label, metrics, backbone="ViT-B-32", created="2026-01-01T00:00:00"):
    path = root / dataset / split / f"{label}__{backbone}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_result(path, {"created": created, "method": {"name": label, "label": label, "options": {}},
                        "dataset": {"name": dataset, "split": split}, "backbone": {"model": backbone,
                        "pretrained": "openai"}, "precision": "fp32", "counts": {"queries": 220, "gallery": 9},
                        "metrics": metrics})
    return path


def test_tables_mark_the_best_and_show_paper_rows(tmp_path):
    _result(tmp_path, "circo", "val", "slerp", {"mAP@5": 30.0, "mAP@10": 31.0, "mAP@25": 33.0, "mAP@50": 34.0,
                                               "aspect/negation/mAP@10": 12.0})
    _result(tmp_path, "circo", "val", "image-only", {"mAP@5": 3.0, "mAP@10": 40.0, "mAP@25": 4.0, "mAP@50": 4.5})
    (table,) = build_tables(tmp_path)
    assert (table.dataset, table.split) == ("circo", "val")
    assert table.metric_columns == ["mAP@5", "mAP@10", "mAP@25", "mAP@50"]
    frame = table.frame
    paper = frame[frame["source"].str.startswith("paper")]
    published = plugins.get_registry().dataset("circo").paper_rows
    assert len(paper) == len(published) > 5 and set(paper["source"]) == {"paper (test)"}  # CIRCO papers report test
    (detailed,) = build_tables(tmp_path, all_metrics=True)
    assert "aspect/negation/mAP@10" in detailed.metric_columns
    assert frame.loc["fti4cir · ViT-L/14 [paper (test)]", "mAP@5"] == 15.05
    md = render_markdown([table])
    # best per column among rows of this split (ours here: the papers report test, so they are never marked)
    assert "**30.00**" in md and "**40.00**" in md and "**15.05**" not in md
    assert "**3.00**" not in md
    assert list(frame.index[:2]) == ["slerp · ViT-B-32/openai", "image-only · ViT-B-32/openai"]  # by mAP@5
    csv = render_csv([table])
    assert csv.splitlines()[0].startswith("dataset,split,run,source,backbone") or "run" in csv.splitlines()[0]
    assert ",30.00*," in csv and ",3.00*," not in csv and ",3.00," in csv


def test_published_rows_of_another_split_are_never_the_best(tmp_path):
    """Ours on CIRCO val below every published test number: the mark goes to ours, the only val row."""
    _result(tmp_path, "circo", "val", "weak", {"mAP@5": 1.0, "mAP@10": 1.5, "mAP@25": 2.0, "mAP@50": 2.5})
    (table,) = build_tables(tmp_path)
    assert table.best("mAP@5") == 1.0
    md = render_markdown([table])
    assert "**1.00**" in md and md.count("**") == 2 * 4  # one mark a column, all ours


def test_only_a_tie_at_the_shown_precision_shares_the_mark(tmp_path):
    """Ours equal to a published test number on val: ours is marked, the other split's row is not, even tied; a run
    0.04 below the best is not marked (it shows another number)."""
    _result(tmp_path, "circo", "val", "tied", {"mAP@5": 15.05, "mAP@10": 1.5, "mAP@25": 2.0, "mAP@50": 2.5})
    _result(tmp_path, "circo", "val", "close", {"mAP@5": 15.01, "mAP@10": 1.0, "mAP@25": 1.0, "mAP@50": 1.0})
    _result(tmp_path, "circo", "val", "same", {"mAP@5": 15.0501, "mAP@10": 1.0, "mAP@25": 1.0, "mAP@50": 1.0})
    (table,) = build_tables(tmp_path)
    assert table.frame.loc["fti4cir · ViT-L/14 [paper (test)]", "mAP@5"] == 15.05
    rows = {line.split("|")[1].strip(): line for line in render_markdown([table]).splitlines() if line.startswith("|")}
    assert "**15.05**" in rows["tied · ViT-B-32/openai"] and "**15.05**" in rows["same · ViT-B-32/openai"]
    assert "**" not in rows["close · ViT-B-32/openai"] and "**" not in rows["fti4cir · ViT-L/14 [paper (test)]"]


def test_a_table_shows_the_published_rows_of_its_own_split(tmp_path):
    """A benchmark with published numbers for two splits: each table shows its split's (and marks the best among
    them and ours); a split without any shows the others, labelled with their split."""
    from cirbench.hookspecs import hookimpl
    from cirbench.testing import ToyDataset, registered
    from cirbench.types import DatasetSpec, PaperRow

    class TwoSplits:
        @hookimpl
        def register_datasets(self, register):
            register(DatasetSpec(name="toy2", description="two splits with paper rows", factory=ToyDataset,
                                 splits=("val", "test", "extra"), main_metric="R@1", paper_rows=(
                                     PaperRow("m", "ViT-B/32", "val", {"R@1": 50.0}),
                                     PaperRow("m", "ViT-B/32", "test", {"R@1": 60.0}))))

    with registered(TwoSplits(), "two-splits"):
        for split in ("val", "test", "extra"):
            _result(tmp_path, "toy2", split, "ours", {"R@1": 55.0})
        tables = {t.split: t for t in build_tables(tmp_path)}
    sources = {split: sorted(set(t.frame["source"])) for split, t in tables.items()}
    assert sources == {"val": ["cirbench", "paper"], "test": ["cirbench", "paper"],
                       "extra": ["cirbench", "paper (test)", "paper (val)"]}
    assert (tables["val"].best("R@1"), tables["test"].best("R@1"), tables["extra"].best("R@1")) == (55.0, 60.0, 55.0)


def test_hidden_split_and_no_paper(tmp_path):
    _result(tmp_path, "cirr", "val", "slerp", {"R@1": 20.0, "R@5": 50.0, "R@10": 60.0, "R@50": 80.0,
                                              "Rs@1": 50.0, "Rs@2": 70.0, "Rs@3": 85.0})
    (table,) = build_tables(tmp_path, include_paper=False)
    assert list(table.frame.index) == ["slerp · ViT-B-32/openai"]
    assert table.metric_columns == ["R@1", "R@5", "R@10", "R@50", "Rs@1", "Rs@2", "Rs@3"]


def test_cli_leaderboard_writes_files_and_skips_bad_results(tmp_path):
    _result(tmp_path, "fashioniq", "val", "slerp", {"dress/R@10": 10.0, "dress/R@50": 20.0, "avg/R@10": 12.0,
                                                   "avg/R@50": 22.0})
    bad = tmp_path / "fashioniq" / "val" / "broken__x.json"
    bad.write_text("{not json")
    old = tmp_path / "fashioniq" / "val" / "old__x.json"
    old.write_text(json.dumps({"schema_version": 999}))
    res = CliRunner().invoke(cli, ["leaderboard", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "fashioniq / val" in res.output and "avg/R@10" in res.output
    assert f"warning: result file {bad} is unreadable: " in res.output
    assert f"warning: result file {old} has schema_version 999 (this cirbench reads 1, 2); skipped" in res.output
    assert "searle · ViT-B/32 [paper]" in res.output  # FashionIQ papers report val: same split
    out = tmp_path / "leaderboard"
    assert (out / "leaderboard.md").exists() and (out / "fashioniq_val.csv").exists()
    assert "<b>" in (out / "leaderboard.html").read_text()


def test_cli_leaderboard_errors(tmp_path):
    res = CliRunner().invoke(cli, ["leaderboard", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "does not exist" in res.output
    res = CliRunner().invoke(cli, ["leaderboard", str(tmp_path)])
    assert res.exit_code == 2 and "no result files" in res.output


def test_labels_are_escaped_and_latex_is_valid(tmp_path):
    _result(tmp_path, "circo", "val", "<script>alert(1)</script>_50%", {"mAP@5": 12.345, "mAP@10": 1.0})
    _result(tmp_path, "circo", "val", "slerp@alpha=0.8", {"mAP@5": 20.0, "mAP@10": 2.0})
    tables = build_tables(tmp_path, include_paper=False)
    from cirbench.leaderboard import render_html, render_latex

    page = render_html(tables)
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<b>20.00</b>" in page and "12.35" in page  # values rounded to 2 decimals
    tex = render_latex(tables)
    assert r"\_50\%" in tex and r"\textbf{20.00}" in tex and r"\begin{tabular}{lrr}" in tex
    _result(tmp_path, "circo", "val", "a|b", {"mAP@5": 3.0, "mAP@10": 3.0})  # a pipe split the markdown row
    _result(tmp_path, "circo", "val", "x\ny", {"mAP@5": 3.0, "mAP@10": 3.0})  # a line break, edited into the file
    lines = render_markdown(build_tables(tmp_path, include_paper=False)).splitlines()
    rows = [line for line in lines if line.startswith("| a")]
    assert len(rows) == 1 and rows[0].startswith(r"| a\|b · ViT-B-32/openai ")
    assert [line for line in lines if line.startswith(("| x", "y"))] == [
        next(line for line in lines if line.startswith("| x y · ViT-B-32/openai "))]
    _result(tmp_path, "circo", "val", "p\n\nq", {"mAP@5": 3.0, "mAP@10": 3.0})  # a blank line ends LaTeX's tabular
    assert "p  q $\\cdot$ ViT-B-32/openai &" in render_latex(build_tables(tmp_path, include_paper=False))
    assert len(rows[0].replace(r"\|", "").split("|")) == len(tables[0].frame.columns) + 3  # index and both edges


def test_filters_and_sorting_by_the_main_metric(tmp_path):
    for label, v in (("a-low", 1.0), ("b-high", 9.0), ("c-mid", 5.0)):
        _result(tmp_path, "circo", "val", label, {"mAP@5": v, "mAP@10": 10 - v})
    (table,) = build_tables(tmp_path, include_paper=False)
    assert table.main_metric == "mAP@5"
    assert [r.split(" ")[0] for r in table.frame.index] == ["b-high", "c-mid", "a-low"]
    (only,) = build_tables(tmp_path, include_paper=False, methods=["c-*"])
    assert list(only.frame.index) == ["c-mid · ViT-B-32/openai"]
    assert build_tables(tmp_path, methods=["nothing-matches"]) == []
    # published rows are filtered too, by method and by backbone
    (both,) = build_tables(tmp_path, methods=["c-*", "searle*"])
    assert list(both.frame.index) == ["c-mid · ViT-B-32/openai", "searle-xl · ViT-L/14 [paper (test)]",
                                      "searle · ViT-B/32 [paper (test)]"]
    # one spelling of a backbone finds both ours (open_clip's ViT-B-32) and the papers' (ViT-B/32), in any case
    for pattern in ("*B-32*", "vit-b/32", "ViT-B-32"):
        (small,) = build_tables(tmp_path, backbones=[pattern])
        assert {r.split(" · ")[0] for r in small.frame.index if "paper" in r} == {"searle", "slerp-tat"}, pattern
        assert "c-mid · ViT-B-32/openai" in small.frame.index


def test_confidence_intervals_are_shown_when_recorded(tmp_path):
    path = _result(tmp_path, "circo", "val", "slerp", {"mAP@5": 20.0})
    rec = json.loads(path.read_text())
    rec["metrics_ci"] = {"mAP@5": [18.5, 21.25]}
    path.write_text(json.dumps(rec))
    (table,) = build_tables(tmp_path, include_paper=False)
    assert "[18.50, 21.25]" in render_markdown([table], ci=True)
    assert "[18.50" not in render_markdown([table])


def test_one_label_run_in_several_configurations_shows_each(tmp_path):
    """A re-run of one configuration replaces its row (the newest wins); the same label run in another
    configuration (here bf16, a GPU-decoded run would be the same) is a row of its own, never hidden."""
    def run(name, fingerprint, precision, map5, created):
        path = _result(tmp_path, "circo", "val", "slerp", {"mAP@5": map5}, created=created)
        rec = json.loads(path.read_text())
        rec.update(fingerprint=fingerprint, precision=precision)
        path.with_name(name).write_text(json.dumps(rec))
        path.unlink()

    run("slerp__a.json", "aaaa", "fp32", 20.0, "2026-01-01T00:00:00")
    run("slerp__a2.json", "aaaa", "fp32", 21.0, "2026-01-02T00:00:00")  # the same configuration, run again
    (table,) = build_tables(tmp_path, include_paper=False)
    assert list(table.frame.index) == ["slerp · ViT-B-32/openai"] and table.frame.iloc[0]["mAP@5"] == 21.0
    run("slerp__b.json", "bbbb", "bf16", 19.0, "2026-01-03T00:00:00")
    (table,) = build_tables(tmp_path, include_paper=False)
    frame = table.frame
    assert list(frame.index) == ["slerp · ViT-B-32/openai ~aaaa", "slerp · ViT-B-32/openai ~bbbb"]
    assert list(frame["precision"]) == ["fp32", "bf16"] and list(frame["mAP@5"]) == [21.0, 19.0]


def test_a_run_on_part_of_a_benchmark_says_which_part(tmp_path):
    """Dataset options set to other than their defaults (one FashionIQ category, another coco-object query
    file) are named in the row, so a one-category R@10 is not read as the benchmark's."""
    def run(name, options, metrics):
        path = _result(tmp_path, "fashioniq", "val", "searle", metrics)
        rec = json.loads(path.read_text())
        rec["dataset"]["options"] = options
        rec["fingerprint"] = name
        path.with_name(f"searle__{name}.json").write_text(json.dumps(rec))
        path.unlink()

    run("all", {"category": "all"}, {"avg/R@10": 22.9, "dress/R@10": 18.5})
    run("dress", {"category": "dress"}, {"R@10": 18.5})
    (table,) = build_tables(tmp_path, include_paper=False)
    assert sorted(table.frame.index) == ["searle (category=dress) · ViT-B-32/openai", "searle · ViT-B-32/openai"]
    _result(tmp_path, "coco-object", "val", "slerp", {"R@1": 9.0})
    rec_path = tmp_path / "coco-object" / "val" / "slerp__ViT-B-32.json"
    rec = json.loads(rec_path.read_text())
    rec["dataset"]["options"] = {"queries": "/data/lists/my_eval.csv"}
    rec_path.write_text(json.dumps(rec))
    tables = {t.dataset: t for t in build_tables(tmp_path, include_paper=False)}
    assert list(tables["coco-object"].frame.index) == ["slerp (queries=my_eval.csv) · ViT-B-32/openai"]


def test_summary_puts_each_benchmarks_published_metrics_side_by_side(tmp_path):
    """`cirbench leaderboard --summary`: one row per run across benchmarks, each benchmark's published metrics as
    `dataset/split metric` columns, published rows merged across benchmarks, the best of each column marked as in
    the benchmark's own table; written as summary.md/.html/.tex/.csv."""
    from cirbench.leaderboard import summary_table

    _result(tmp_path, "circo", "test", "slerp", {"mAP@5": 45.0, "mAP@10": 31.0, "mAP@25": 33.0, "mAP@50": 34.0,
                                                "R@5": 1.0}, backbone="ViT-L-14")
    _result(tmp_path, "circo", "test", "image-only", {"mAP@5": 3.0, "mAP@10": 4.0, "mAP@25": 4.0, "mAP@50": 4.5},
            backbone="ViT-L-14")
    _result(tmp_path, "cirr", "test1", "slerp", {"R@1": 20.0, "R@5": 50.0, "R@10": 60.0, "R@50": 80.0, "Rs@1": 50.0,
                                                "Rs@2": 70.0, "Rs@3": 85.0}, backbone="ViT-L-14")
    _result(tmp_path, "cirr", "test1", "text-only", {"R@1": 2.0, "R@5": 5.0, "R@10": 6.0, "R@50": 8.0},
            backbone="ViT-L-14")
    table = summary_table(build_tables(tmp_path))
    frame = table.frame
    # our runs first, a run of the second benchmark alone too, then the published rows
    assert list(frame["source"]).index("paper") == 3 and "text-only · ViT-L-14/openai" in frame.index[:3]
    assert table.metric_columns[:5] == ["circo/test mAP@5", "circo/test mAP@10", "circo/test mAP@25",
                                        "circo/test mAP@50", "cirr/test1 R@1"]
    assert "circo/test R@5" not in frame.columns  # no paper reports it: not a column of the paper's table
    assert list(frame.index[:2]) == ["slerp · ViT-L-14/openai", "image-only · ViT-L-14/openai"]
    slerp, fti = frame.loc["slerp · ViT-L-14/openai"], frame.loc["fti4cir · ViT-L/14 [paper]"]
    assert slerp["circo/test mAP@5"] == 45.0 and slerp["cirr/test1 Rs@3"] == 85.0 and slerp["precision"] == "fp32"
    assert fti["circo/test mAP@5"] == 15.05 and fti["cirr/test1 R@1"] == 25.90 and fti["source"] == "paper"
    assert frame.loc["image-only · ViT-L-14/openai"].isna()["cirr/test1 R@1"]
    # a published row of the second benchmark alone keeps its source and backbone
    weimocir = frame.loc["weimocir · ViT-L/14 (LAION-2B) [paper]"]
    assert (weimocir["source"], weimocir["backbone"], weimocir["cirr/test1 R@1"]) == ("paper", "ViT-L/14 (LAION-2B)",
                                                                                      30.94)
    assert weimocir.isna()["circo/test mAP@5"]
    md = render_markdown([table])
    assert md.startswith("### summary") and "**45.00**" in md and "**38.00**" in md and "| 20.00 " in md
    res = CliRunner().invoke(cli, ["leaderboard", str(tmp_path), "--summary", "--format", "latex"])
    assert res.exit_code == 0 and r"\textbf{45.00}" in res.output
    # LaTeX groups each benchmark's columns under its name, as a paper's table does
    assert r"& \multicolumn{4}{c}{circo/test} & \multicolumn{7}{c}{cirr/test1} \\" in res.output
    assert r"\cmidrule(lr){2-5} \cmidrule(lr){6-12}" in res.output and "\nMethod & mAP@5 & mAP@10" in res.output
    assert {p.name for p in (tmp_path / "leaderboard").iterdir()} == {"summary.md", "summary.html", "summary.tex",
                                                                      "summary_all.csv"}


def test_seeds_makes_one_row_of_a_recipes_runs_with_mean_and_spread(tmp_path):
    """Runs of one label that differ only in seed and trained weights (each training seed's checkpoint) are one
    row with --seeds: mean ± sample sd, n in the name; a run of another configuration (bf16) under the same
    label stays a row of its own; without --seeds each run is shown."""
    from cirbench.leaderboard import recipe_key, render_latex
    from cirbench.results import run_fingerprint

    def run(seed, sha, map5, r1, precision="fp32"):
        path = _result(tmp_path, "circo", "val", "pic2word", {"mAP@5": map5, "R@1": r1})
        rec = json.loads(path.read_text())
        rec.update(seed=seed, precision=precision)
        rec["method"].update(options={"checkpoint": f"runs/p2w-s{seed}", "alpha": 0.5}, files={"checkpoint": sha},
                             info={"checkpoint": f"runs/p2w-s{seed}", "sha256": sha})
        rec["fingerprint"] = run_fingerprint(rec)
        path.with_name(f"pic2word__{seed}{precision}.json").write_text(json.dumps(rec))
        path.unlink()
        return rec

    recs = [run(0, "a" * 64, 20.0, 10.0), run(1, "b" * 64, 22.0, 12.0), run(2, "c" * 64, 24.0, 11.0)]
    assert len({r["fingerprint"] for r in recs}) == 3 and len({recipe_key(r) for r in recs}) == 1
    other = json.loads(json.dumps(recs[0]))
    other["method"]["options"]["alpha"] = 0.8  # another option value is another recipe, not a seed
    assert recipe_key(other) != recipe_key(recs[0])
    (table,) = build_tables(tmp_path, include_paper=False)
    assert len(table.frame) == 3 and all("~" in name for name in table.frame.index)

    (table,) = build_tables(tmp_path, include_paper=False, seeds=True)
    (name,) = table.frame.index
    assert name == "pic2word · ViT-B-32/openai (n=3)"
    assert table.frame.at[name, "mAP@5"] == 22.0 and table.frame.at[name, "R@1"] == 11.0
    assert table.spread[(name, "mAP@5")] == 2.0 and table.spread[(name, "R@1")] == 1.0
    assert "**22.00** ± 2.00" in render_markdown([table]) and "$\\pm$" in render_latex([table])
    assert "22.00* ± 2.00" in render_csv([table])

    bf16 = run(3, "d" * 64, 30.0, 15.0, precision="bf16")
    (table,) = build_tables(tmp_path, include_paper=False, seeds=True)
    assert list(table.frame.index) == [f"pic2word · ViT-B-32/openai ~{bf16['fingerprint']}",
                                       f"pic2word · ViT-B-32/openai ~recipe-{recipe_key(recs[0])} (n=3)"]
    res = CliRunner().invoke(cli, ["leaderboard", str(tmp_path), "--seeds", "--no-write", "--no-paper",
                                   "--summary"])
    assert res.exit_code == 0 and "22.00 ± 2.00" in res.output, res.output


# REFERENCE.md section 3, transcribed here a second time and on its own, so that a typo in a plugin's table of
# published numbers (the rows every leaderboard prints beside ours) cannot pass unnoticed
_CIRR = ("R@1", "R@5", "R@10", "R@50", "Rs@1", "Rs@2", "Rs@3")
_CIRCO = ("mAP@5", "mAP@10", "mAP@25", "mAP@50")
_FIQ = tuple(f"{c}/R@{k}" for c in ("dress", "shirt", "toptee", "avg") for k in (10, 50))
REFERENCE_TABLES = {
    ("cirr", "test1", _CIRR): {
        ("pic2word", "ViT-L/14"): (23.90, 51.70, 65.30, 87.80),
        ("searle", "ViT-B/32"): (24.00, 53.42, 66.82, 89.78, 54.89, 76.60, 88.19),
        ("searle-xl", "ViT-L/14"): (24.24, 52.48, 66.29, 88.84, 53.76, 75.01, 88.19),
        ("fti4cir", "ViT-L/14"): (25.90, 55.61, 67.66, 89.66, 55.21, 75.88, 87.98),
        ("slerp-tat", "ViT-B/32"): (28.19, 55.88, 68.77, 88.51, 61.13, 80.63, 90.68),
        ("slerp-tat", "ViT-L/14"): (30.94, 59.40, 70.94, 89.18, 64.70, 82.92, 92.31),
    },
    ("circo", "test", _CIRCO): {
        ("pic2word", "ViT-L/14"): (8.72, 9.51, 10.64, 11.29),
        ("searle", "ViT-B/32"): (9.35, 9.94, 11.13, 11.84),
        ("searle-xl", "ViT-L/14"): (11.68, 12.73, 14.33, 15.12),
        ("fti4cir", "ViT-L/14"): (15.05, 16.32, 18.06, 19.05),
        ("slerp-tat", "ViT-B/32"): (9.34, 10.26, 11.65, 12.33),
        ("slerp-tat", "ViT-L/14"): (18.46, 19.41, 21.43, 22.41),
    },
    ("fashioniq", "val", _FIQ): {
        ("pic2word", "ViT-L/14"): (20.00, 40.20, 26.20, 43.60, 27.90, 47.40, 24.70, 43.70),
        ("searle", "ViT-B/32"): (18.54, 39.51, 24.44, 41.61, 25.70, 46.46, 22.89, 42.53),
        ("searle-xl", "ViT-L/14"): (20.48, 43.13, 26.89, 45.58, 29.32, 49.97, 25.56, 46.23),
        ("fti4cir", "ViT-L/14"): (24.39, 47.84, 31.35, 50.59, 32.43, 54.21, 29.39, 50.88),
        ("slerp-tat", "ViT-B/32"): (19.24, 42.14, 23.06, 41.95, 26.57, 47.78, 22.96, 43.96),
    },
}


def test_published_rows_are_the_reference_numbers():
    registry = plugins.get_registry()
    for (dataset, split, metrics), table in REFERENCE_TABLES.items():
        rows = {(r.method, r.backbone): r for r in registry.dataset(dataset).paper_rows}
        for (method, backbone), numbers in table.items():
            row = rows[(method, backbone)]
            assert row.split == split, (dataset, method, backbone)
            assert row.metrics == dict(zip(metrics, numbers, strict=False)), (dataset, method, backbone)
    fiq = {(r.method, r.backbone): r for r in registry.dataset("fashioniq").paper_rows}
    assert fiq[("slerp-tat", "ViT-L/14")].metrics == {"avg/R@10": 28.32, "avg/R@50": 47.60}


def test_published_fashioniq_averages_are_the_mean_of_their_categories():
    """Where a source gives all three categories, its average is their mean, rounded as the source rounds (two
    decimals; one in Pic2Word's paper, whose 43.7 is the mean 43.73): a check of every FashionIQ row, the ones
    REFERENCE.md does not list too."""
    for row in plugins.get_registry().dataset("fashioniq").paper_rows:
        tenths = all(abs(v * 10 - round(v * 10)) < 1e-6 for v in row.metrics.values())
        for k in (10, 50):
            parts = [row.metrics.get(f"{c}/R@{k}") for c in ("dress", "shirt", "toptee")]
            if None not in parts and f"avg/R@{k}" in row.metrics:
                error = abs(sum(parts) / 3 - row.metrics[f"avg/R@{k}"])
                assert error <= (0.05 if tenths else 0.005) + 1e-9, (row.method, row.backbone, k, error)


def test_tables_are_chosen_by_dataset_and_split(tmp_path):
    """``datasets`` keeps the named benchmarks: a name alone keeps each of its splits, a split the one table."""
    for dataset, split in (("circo", "val"), ("circo", "test"), ("cirr", "val")):
        _result(tmp_path, dataset, split, "slerp", {"R@1": 10.0} if dataset == "cirr" else {"mAP@5": 10.0})

    def chosen(datasets):
        return [(t.dataset, t.split) for t in build_tables(tmp_path, include_paper=False, datasets=datasets)]

    assert chosen(None) == [("circo", "test"), ("circo", "val"), ("cirr", "val")]
    assert chosen([("circo", None)]) == [("circo", "test"), ("circo", "val")]
    assert chosen([("circo", "val"), ("cirr", None)]) == [("circo", "val"), ("cirr", "val")]
    assert chosen([("cirr", "test1")]) == [] and chosen([]) == []
