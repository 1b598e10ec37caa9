"""cirbench agree: two rankings of the same queries, set side by side (a run against an official test-server file)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from helpers import registered
from toy_plugin import ToyPlugin

from cirbench.cli import cli


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def agree(*args):
    return CliRunner().invoke(cli, ["agree", *map(str, args)])


def test_a_run_against_its_own_submission_and_another_run(tmp_path, tiny_config, toy_root):
    """A result file read through its predictions; the same rankings as a CIRCO-style submission (integer-like ids as
    numbers) agree fully; another method's run agrees less, and the queries that differ most are named."""
    common = ["--dataset", "toy", "--data-root", str(toy_root), "--backbone", str(tiny_config), "--pretrained", "none",
              "--no-cache", "--quiet", "--output", str(tmp_path / "res")]
    with registered(ToyPlugin(), "toy"):
        for method in ("image-only", "text-only"):
            res = CliRunner().invoke(cli, ["run", "--method", method, *common])
            assert res.exit_code == 0, res.output
    image, text = (next((tmp_path / "res").rglob(f"{m}__*.json")) for m in ("image-only", "text-only"))
    from cirbench.results import read_predictions_of

    rows = read_predictions_of(image)
    submission = {r["query"]: r["top"] for r in rows}
    (tmp_path / "submission.json").write_text(json.dumps(submission))
    res = agree(image, tmp_path / "submission.json", "--k", "1,5,10", "--json")
    assert res.exit_code == 0, res.output
    table = json.loads(res.output)
    assert table["queries"] == 12 and table["overlap"] == {"1": 100.0, "5": 100.0, "10": 100.0}
    assert table["identical"]["10"] == 100.0 and table["least_agreeing"] == []
    res = agree(image, text, "--k", "1,10", "--json")
    table = json.loads(res.output)
    assert table["overlap"]["10"] < 100.0 and table["least_agreeing"]
    worst = table["least_agreeing"][0]
    own = {r["query"]: r["top"] for r in rows}
    theirs = {r["query"]: r["top"] for r in read_predictions_of(text)}
    assert worst["overlap@10"] == pytest.approx(100 * len(set(own[worst["query"]][:10]) & set(
        theirs[worst["query"]][:10])) / 10)
    res = agree(image, text, "--k", "10", "--fail-below", "100")
    assert res.exit_code == 1 and "is below --fail-below 100%" in res.output
    assert "queries ranked by both" in agree(image, text).output


def test_sets_numbers_and_the_cirr_header(tmp_path):
    """Sets match sets; a file without sets matches by query id; integer ids compare as their digits; CIRR's
    version and metric entries are skipped; overlap and identical lists are counted per depth."""
    a = write_jsonl(tmp_path / "a.predictions.jsonl", [
        {"set": "dress", "query": "1", "top": ["10", "11", "12", "13"]},
        {"set": "shirt", "query": "2", "top": ["20", "21", "22", "23"]},
    ])
    b = tmp_path / "b.json"
    b.write_text(json.dumps({"version": "rc2", "metric": "recall", "1": [10, 11, 13, 12], "2": [21, 20, 99, 98],
                             "3": [1, 2, 3, 4]}))
    table = json.loads(agree(a, b, "--k", "1,2,4", "--json").output)
    assert (table["queries"], table["only_in_a"], table["only_in_b"]) == (2, 0, 1)
    assert table["overlap"] == {"1": 50.0, "2": 100.0, "4": 75.0}
    assert table["identical"] == {"1": 50.0, "2": 50.0, "4": 0.0}
    assert [r["query"] for r in table["least_agreeing"]] == ["2"]  # query 1 holds the same 4, reordered
    c = write_jsonl(tmp_path / "c.predictions.jsonl", [
        {"set": "dress", "query": "1", "top": ["10", "11", "12", "13"]},
        {"set": "shirt", "query": "2", "top": ["23", "22", "21", "20"]},
    ])
    table = json.loads(agree(a, c, "--k", "4", "--json").output)  # both name sets: matched set by set
    assert table["overlap"]["4"] == 100.0 and table["identical"]["4"] == 50.0


def test_what_cannot_be_compared_is_one_line(tmp_path):
    a = write_jsonl(tmp_path / "a.predictions.jsonl", [{"set": "dress", "query": "1", "top": ["1", "2"]},
                                                        {"set": "shirt", "query": "1", "top": ["3", "4"]}])
    b = tmp_path / "b.json"
    b.write_text(json.dumps({"1": ["1", "2"]}))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"7": ["1", "2"]}))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    scalar = tmp_path / "scalar.json"
    scalar.write_text(json.dumps({"1": "a"}))
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    one = write_jsonl(tmp_path / "one.predictions.jsonl", [{"query": "1", "top": ["1", "2"]}])
    for args, message in (((a, b), "ranks query 1 in several sets"),
                          ((one, other), "rank no query in common"),
                          ((one, bad), "not a readable JSON file"),
                          ((one, scalar), "query 1's ranking is a str"),
                          ((one, listed), "neither a cirbench result nor a submission file"),
                          ((one, b, "--k", "5"), "shortest ranking both files give has 2 ids"),
                          ((one, b, "--k", "x"), "not a comma-separated list")):
        res = agree(*args)
        assert res.exit_code == 2 and message in res.output, (args, res.output)
        assert len(res.output.strip().splitlines()) == 1, res.output


def test_depths_stop_at_the_shortest_ranking_and_the_least_agreeing_come_first(tmp_path):
    """Depths beyond the shortest ranking either file gives are dropped (not compared on a cut list); the least
    agreeing queries are listed worst first; --fail-below passes at exactly the threshold; CIRR's subset rankings
    in a predictions file are not queries of their own."""
    a = write_jsonl(tmp_path / "a.predictions.jsonl", [
        {"query": "1", "top": ["a", "b", "c", "d"]},
        {"query": "2", "top": ["a", "b", "c", "d"], "subset": ["b", "a"]},
        {"query": "3", "top": ["a", "b", "c", "d"]},
    ])
    b = tmp_path / "b.json"
    b.write_text(json.dumps({"1": ["a", "b", "x", "y"], "2": ["x", "y", "z"], "3": ["a", "b", "c", "y"]}))
    table = json.loads(agree(a, b, "--k", "1,3,4", "--json").output)
    assert table["k"] == [1, 3] and table["queries"] == 3 and table["only_in_a"] == 0
    assert table["overlap"]["3"] == pytest.approx(100 * (2 / 3 + 0 + 1) / 3)
    assert [r["query"] for r in table["least_agreeing"]] == ["2", "1"]  # 0 of 3, then 2 of 3; query 3 agrees
    assert agree(a, b, "--k", "1", "--fail-below", f"{200 / 3}").exit_code == 0  # 2 of 3 top-1s agree: 66.67%
    res = agree(a, b, "--k", "1", "--fail-below", "67")
    assert res.exit_code == 1 and "overlap@1 66.67% is below --fail-below 67%" in res.output
