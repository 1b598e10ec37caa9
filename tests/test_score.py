"""`cirbench score` behaves as the official scorers, or refuses with a one-line reason (exit 2).

Oracles: transcriptions of miccunifi/CIRCO ``src/evaluation.py`` (compute_metrics) and of SEARLE's
``validate.py`` (cirr_compute_val_metrics, fiq_compute_val_metrics), in numpy, on full rankings.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from annotations import ANNOTATIONS, needs_annotations
from click.testing import CliRunner

from cirbench.cli import cli

pytestmark = needs_annotations
CIRCO_VAL = ANNOTATIONS / "circo" / "annotations" / "val.json"


def _score(args):
    return CliRunner().invoke(cli, ["score", *args, "--json"])


# -- oracles --------------------------------------------------------------------------------------------
def official_circo(annotations, predictions_dict, ranks=(5, 10, 25, 50)):
    aps, recalls = {r: [] for r in ranks}, {r: [] for r in ranks}
    assert np.all(np.sort(np.array(list(predictions_dict.keys()), dtype=int)) == np.arange(len(predictions_dict)))
    for query_id, predictions in predictions_dict.items():
        ann = annotations[int(query_id)]
        gt_img_ids, target_img_id = ann["gt_img_ids"], ann["target_img_id"]
        if len(set(predictions)) != len(predictions):
            raise ValueError("duplicate predictions")
        predictions = np.array(predictions, dtype=int)
        ap_labels = np.isin(predictions, gt_img_ids)
        precisions = np.cumsum(ap_labels, axis=0) * ap_labels
        precisions = precisions / np.arange(1, ap_labels.shape[0] + 1)
        for rank in ranks:
            aps[rank].append(float(np.sum(precisions[:rank]) / min(len(gt_img_ids), rank)))
        recall_labels = predictions == target_img_id
        for rank in ranks:
            recalls[rank].append(float(np.sum(recall_labels[:rank])))
    return ({r: float(np.mean(v)) * 100 for r, v in aps.items()},
            {r: float(np.mean(v)) * 100 for r, v in recalls.items()})


def official_cirr(sorted_index_names, reference_names, target_names, group_members):
    n_index = sorted_index_names.shape[1]
    reference_mask = sorted_index_names != np.repeat(np.array(reference_names), n_index).reshape(len(target_names), -1)
    sorted_index_names = sorted_index_names[reference_mask].reshape(sorted_index_names.shape[0], n_index - 1)
    labels = sorted_index_names == np.repeat(np.array(target_names), n_index - 1).reshape(len(target_names), -1)
    group_members = np.array(group_members)
    group_mask = (sorted_index_names[..., None] == group_members[:, None, :]).sum(-1).astype(bool)
    group_labels = labels[group_mask].reshape(labels.shape[0], -1)
    out = {f"R@{k}": labels[:, :k].sum() / len(labels) * 100 for k in (1, 5, 10, 50)}
    out.update({f"Rs@{k}": group_labels[:, :k].sum() / len(group_labels) * 100 for k in (1, 2, 3)})
    return out


def official_fiq(sorted_index_names, target_names):
    n_index = sorted_index_names.shape[1]
    labels = sorted_index_names == np.repeat(np.array(target_names), n_index).reshape(len(target_names), -1)
    assert (labels.sum(-1) == 1).all()
    return {"R@10": labels[:, :10].sum() / len(labels) * 100, "R@50": labels[:, :50].sum() / len(labels) * 100}


# -- CIRCO ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def circo_ann():
    return json.loads(CIRCO_VAL.read_text())


def _circo_run(tmp_path, sub):
    path = tmp_path / "sub.json"
    path.write_text(json.dumps(sub))
    return _score(["-d", "circo", "-s", "val", "--data-root", str(ANNOTATIONS / "circo"), str(path)])


def _random_circo(ann, length, seed):
    rng = random.Random(seed)
    sub = {}
    for q in ann:
        pool = rng.sample(range(1, 500000), length)
        for g in q["gt_img_ids"][: rng.randrange(0, 4)]:
            pool[rng.randrange(length)] = g
        sub[str(q["id"])] = list(dict.fromkeys(pool))
    return sub


@pytest.mark.parametrize("length", [50, 12, 3, 80])
def test_circo_scores_any_length_as_the_official_evaluator(tmp_path, circo_ann, length):
    """Short lists are scored as a prefix (ranks they lack are misses); never padded into hits."""
    sub = _random_circo(circo_ann, length, seed=length)
    res = _circo_run(tmp_path, sub)
    assert res.exit_code == 0, res.output
    ours = json.loads(res.output)
    maps, recalls = official_circo(circo_ann, sub)
    for k in (5, 10, 25, 50):
        assert ours[f"mAP@{k}"] == pytest.approx(maps[k], abs=1e-6)
        assert ours[f"R@{k}"] == pytest.approx(recalls[k], abs=1e-6)
        assert 0 <= ours[f"mAP@{k}"] <= 100


def test_circo_ids_are_integers(tmp_path, circo_ann):
    sub = _random_circo(circo_ann, 50, seed=1)
    padded = {f"{int(k):03d}": [f"{x:012d}" for x in v] for k, v in sub.items()}  # "007" is query 7
    res = _circo_run(tmp_path, padded)
    assert res.exit_code == 0, res.output
    maps, _ = official_circo(circo_ann, sub)
    assert json.loads(res.output)["mAP@10"] == pytest.approx(maps[10], abs=1e-6)


@pytest.mark.parametrize("damage, reason", [
    (lambda s: s["3"].append(s["3"][0]), "appears twice"),
    (lambda s: s.pop("7"), "have no ranking"),
    (lambda s: s.__setitem__("220", [1, 2, 3]), "does not have"),
    (lambda s: s.__setitem__("x", [1]), "not a query id"),
    (lambda s: s["4"].__setitem__(0, "abc"), "not an image id"),
    (lambda s: s.__setitem__("5", 17), "expected a list"),
])
def test_circo_refuses_what_the_official_evaluator_refuses(tmp_path, circo_ann, damage, reason):
    sub = _random_circo(circo_ann, 50, seed=2)
    damage(sub)
    res = _circo_run(tmp_path, sub)
    assert res.exit_code == 2 and reason in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


# -- CIRR -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cirr_val():
    from cirbench.plugins import get_registry

    ds = get_registry().dataset("cirr").create(ANNOTATIONS / "cirr", {})
    (es,) = ds.load("val")
    return es


def _full_rankings(es, rng, moved=0.6, within=60):
    """A full permutation of the gallery per query, the target moved into the first ``within`` places for a
    ``moved`` share of the queries."""
    gallery = np.array(es.gallery_ids)
    rows = []
    for q in es.queries:
        perm = list(gallery[rng.permutation(len(gallery))])
        if rng.random() < moved:
            perm.remove(q.targets[0])
            perm.insert(int(rng.integers(0, within)), q.targets[0])
        rows.append(perm)
    return np.array(rows)


def test_cirr_scores_as_the_official_val_evaluator(tmp_path, cirr_val):
    es = cirr_val
    full = _full_rankings(es, np.random.default_rng(3))
    expected = official_cirr(full, [q.reference for q in es.queries], [q.targets[0] for q in es.queries],
                             [list(q.candidates) for q in es.queries])
    lines = []
    for q, row in zip(es.queries, full, strict=True):
        ranked = [x for x in row if x != q.reference]
        members = set(q.candidates) - {q.reference}
        lines.append(json.dumps({"query": q.id, "top": ranked[:50], "subset": [x for x in ranked if x in members]}))
    path = tmp_path / "cirr.predictions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    res = _score(["-d", "cirr", "-s", "val", "--data-root", str(ANNOTATIONS / "cirr"), str(path)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == pytest.approx(expected, abs=1e-6)


def test_score_prints_a_table_and_refuses_its_arguments_in_one_line(tmp_path, cirr_val):
    """Without --json, one aligned line per metric, the values the JSON gives; a missing or second FILE and a
    malformed, unknown or missing --input are one-line errors."""
    es = cirr_val
    full = _full_rankings(es, np.random.default_rng(4))
    path = tmp_path / "cirr.predictions.jsonl"
    path.write_text("".join(json.dumps({"query": q.id, "top": [x for x in row if x != q.reference][:50]}) + "\n"
                            for q, row in zip(es.queries, full, strict=True)))
    common = ["score", "-d", "cirr", "-s", "val", "--data-root", str(ANNOTATIONS / "cirr")]
    as_json = json.loads(CliRunner().invoke(cli, [*common, str(path), "--json"]).output)
    res = CliRunner().invoke(cli, [*common, str(path)])
    assert res.exit_code == 0, res.output
    width = max(map(len, as_json))
    assert res.output.splitlines() == [f"{k:<{width}}  {v:8.4f}" for k, v in as_json.items()]
    for args, said in (
            ([str(path), str(path)], f"unexpected argument {str(path)!r}: score takes one ranking FILE"),
            ([str(path), "--input", "subset"], "--input 'subset': expected NAME=PATH"),
            ([str(path), "--input", f"relevance={path}"], "--input relevance: dataset cirr takes subset"),
            ([str(path), "--input", f"subset={tmp_path / 'none.json'}"],
             f"--input subset: file {tmp_path / 'none.json'} does not exist")):
        res = CliRunner().invoke(cli, [*common, *args])
        assert res.exit_code == 2 and res.output.strip() == f"error: {said}", (args, res.output)
    # a dataset option's value is not taken for FILE
    res = CliRunner().invoke(cli, ["score", "-d", "fashioniq", "-s", "val", "--category", "dress"])
    assert res.exit_code == 2 and res.output.strip() == "error: no ranking FILE given (see 'cirbench score --help')"


@pytest.mark.parametrize("damage, reason", [
    ("reference", "contains the reference image"),
    ("short", "at least 50 are needed"),
    ("duplicate", "appears twice"),
    ("unknown", "in the ranking is not an image of the split's gallery"),
    ("subset-outsider", "in the subset ranking is not in the query's img_set"),
])
def test_cirr_refuses_lists_the_protocol_cannot_score(tmp_path, cirr_val, damage, reason):
    es = cirr_val
    pool = es.gallery_ids
    recall = {"version": "rc2", "metric": "recall"}
    subset = {"version": "rc2", "metric": "recall_subset"}
    for q in es.queries:
        recall[q.id] = [g for g in pool[:60] if g != q.reference][:50]
        subset[q.id] = [m for m in q.candidates if m != q.reference][:3]
    q0 = es.queries[0]
    if damage == "reference":
        recall[q0.id][5] = q0.reference
    elif damage == "short":
        recall[q0.id] = recall[q0.id][:20]
    elif damage == "duplicate":
        recall[q0.id][7] = recall[q0.id][8]
    elif damage == "unknown":
        recall[q0.id][0] = recall[q0.id][0] + ".png"
    else:
        subset[q0.id][0] = next(g for g in pool if g not in q0.candidates)
    (tmp_path / "r.json").write_text(json.dumps(recall))
    (tmp_path / "s.json").write_text(json.dumps(subset))
    res = _score(["-d", "cirr", "-s", "val", "--data-root", str(ANNOTATIONS / "cirr"), "--input",
                  f"subset={tmp_path / 's.json'}", str(tmp_path / "r.json")])
    assert res.exit_code == 2 and reason in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1


# -- hidden-target splits: the file is checked as the test server takes it ---------------------------------
CIRCO_TEST_EXAMPLE = ANNOTATIONS / "circo" / "submission_examples" / "submission_test.json"
CIRR_DEMO = ANNOTATIONS / "cirr" / "_main_branch" / "demo_files"


def _check_hidden(args):
    return CliRunner().invoke(cli, ["score", *args])


def test_official_server_examples_are_well_formed():
    res = _check_hidden(["-d", "circo", "-s", "test", "--data-root", str(ANNOTATIONS / "circo"),
                         str(CIRCO_TEST_EXAMPLE)])
    assert res.exit_code == 0 and "well-formed for the circo test server" in res.output, res.output
    res = _check_hidden(["-d", "cirr", "-s", "test1", "--data-root", str(ANNOTATIONS / "cirr"), "--input",
                         f"subset={CIRR_DEMO / 'test1_pred_ranks_recall_subset.json'}",
                         str(CIRR_DEMO / "test1_pred_ranks_recall.json")])
    assert res.exit_code == 0 and "well-formed for the cirr test server" in res.output, res.output
    assert "test1_pred_ranks_recall_subset.json" in res.output and "not checked" not in res.output  # both checked
    res = _check_hidden(["-d", "cirr", "-s", "test1", "--data-root", str(ANNOTATIONS / "cirr"),
                         str(CIRR_DEMO / "test1_pred_ranks_recall.json")])
    assert res.exit_code == 0 and res.output.rstrip().endswith("not checked: --input subset=PATH"), res.output
    assert json.loads(_score(["-d", "circo", "-s", "test", "--data-root", str(ANNOTATIONS / "circo"),
                              str(CIRCO_TEST_EXAMPLE)]).output) == {}


@pytest.mark.parametrize("damage, reason", [
    ("short", "query 5: the prediction list has 49 ids, the test server takes exactly 50"),
    ("long", "query 5: the prediction list has 51 ids, the test server takes exactly 50"),
    ("missing", "1 of 800 queries have no ranking"),
    ("duplicate", "appears twice in the prediction list"),
    ("extra", "are for queries this split does not have"),
])
def test_circo_test_files_the_server_would_refuse(tmp_path, damage, reason):
    sub = json.loads(CIRCO_TEST_EXAMPLE.read_text())
    if damage == "short":
        sub["5"] = sub["5"][:49]
    elif damage == "long":
        sub["5"] = sub["5"] + [max(sub["5"]) + 1]
    elif damage == "missing":
        del sub["7"]
    elif damage == "duplicate":
        sub["5"][3] = sub["5"][4]
    else:
        sub["800"] = sub["5"]
    (tmp_path / "sub.json").write_text(json.dumps(sub))
    res = _check_hidden(["-d", "circo", "-s", "test", "--data-root", str(ANNOTATIONS / "circo"),
                         str(tmp_path / "sub.json")])
    assert res.exit_code == 2 and reason in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1


@pytest.mark.parametrize("damage, reason", [
    ("no-version", "lacks 'version': the test server needs"),
    ("other-version", "is for CIRR version 'rc1', not rc2"),
    ("swapped-metric", "is not a CIRR 'recall' file (its metric is 'recall_subset')"),
    ("reference", "contains the reference image"),
    ("not-in-test1", "'dev-0-0-img0' in the ranking is not an image of the split's gallery"),
    ("subset-long", "the subset ranking has 4 ids, the test server takes exactly 3"),
    ("subset-outsider", "in the subset ranking is not in the query's img_set"),
    ("predictions", "check the two server files"),
])
def test_cirr_test1_files_the_server_would_refuse(tmp_path, damage, reason):
    recall = json.loads((CIRR_DEMO / "test1_pred_ranks_recall.json").read_text())
    subset = json.loads((CIRR_DEMO / "test1_pred_ranks_recall_subset.json").read_text())
    first = next(k for k in recall if k not in ("version", "metric"))
    if damage == "no-version":
        del recall["version"]
    elif damage == "other-version":
        recall["version"] = "rc1"
    elif damage == "swapped-metric":
        recall["metric"] = "recall_subset"
    elif damage == "reference":  # the demo file's first query: its reference, from the official annotations
        cap = json.loads((ANNOTATIONS / "cirr" / "captions" / "cap.rc2.test1.json").read_text())
        recall[first][0] = next(r["reference"] for r in cap if str(r["pairid"]) == first)
    elif damage == "not-in-test1":
        recall[first][0] = "dev-0-0-img0"
    elif damage == "subset-long":
        subset[first] = subset[first] + ["x"]
    elif damage == "subset-outsider":
        subset[first][0] = recall[first][-1] if recall[first][-1] not in subset[first] else recall[first][-2]
    (tmp_path / "r.json").write_text(json.dumps(recall))
    (tmp_path / "s.json").write_text(json.dumps(subset))
    main = tmp_path / ("r.predictions.jsonl" if damage == "predictions" else "r.json")
    if damage == "predictions":
        main.write_text("")
    res = _check_hidden(["-d", "cirr", "-s", "test1", "--data-root", str(ANNOTATIONS / "cirr"), "--input",
                         f"subset={tmp_path / 's.json'}", str(main)])
    assert res.exit_code == 2 and reason in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1


# -- FashionIQ ---------------------------------------------------------------------------------------------
def test_fashioniq_scores_as_the_official_val_evaluator(tmp_path):
    from cirbench.plugins import get_registry

    ds = get_registry().dataset("fashioniq").create(ANNOTATIONS / "fashioniq", {"category": "all"})
    lines, expected = [], {}
    rng = np.random.default_rng(4)
    for es in ds.load("val"):  # every val target is in its category's gallery (the official code asserts it)
        full = _full_rankings(es, rng, moved=0.5, within=70)
        lines += [json.dumps({"set": es.name, "query": q.id, "top": list(row[:50])})
                  for q, row in zip(es.queries, full, strict=True)]
        expected[es.name] = official_fiq(full, [q.targets[0] for q in es.queries])
    path = tmp_path / "fiq.predictions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    res = _score(["-d", "fashioniq", "-s", "val", "--data-root", str(ANNOTATIONS / "fashioniq"), str(path)])
    assert res.exit_code == 0, res.output
    ours = json.loads(res.output)
    for cat, exp in expected.items():
        assert ours[f"{cat}/R@10"] == pytest.approx(exp["R@10"], abs=1e-6)
        assert ours[f"{cat}/R@50"] == pytest.approx(exp["R@50"], abs=1e-6)
    assert ours["avg/R@10"] == pytest.approx(np.mean([e["R@10"] for e in expected.values()]), abs=1e-6)
    first = json.loads(lines[0])
    first["top"] = [first["top"][0], *first["top"]]
    path.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    res = _score(["-d", "fashioniq", "-s", "val", "--data-root", str(ANNOTATIONS / "fashioniq"), str(path)])
    assert res.exit_code == 2 and "appears twice" in res.output
    first["top"] = ["B00NOTANASIN", *json.loads(lines[0])["top"][1:]]  # an image of no category's gallery
    path.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    res = _score(["-d", "fashioniq", "-s", "val", "--data-root", str(ANNOTATIONS / "fashioniq"), str(path)])
    assert res.exit_code == 2
    assert "'B00NOTANASIN' in the ranking is not an image of its category's gallery" in res.output


def test_no_file_ever_scores_above_100(tmp_path, circo_ann):
    """The bug the audit found: short lists padded with -1 matched targets padded with -1 (572 % mAP@50). The
    lists differ in length (one correct id, then 0 to 49 ids of no gallery image), so the shorter ones are padded."""
    sub = {str(q["id"]): [q["gt_img_ids"][0], *range(900_000_000, 900_000_000 + i % 50)]
           for i, q in enumerate(circo_ann)}
    res = _circo_run(tmp_path, sub)
    assert res.exit_code == 0
    out = json.loads(res.output)
    assert all(0 <= v <= 100 for k, v in out.items() if not k.startswith("aspect/"))
    maps, _ = official_circo(circo_ann, sub)
    assert out["mAP@50"] == pytest.approx(maps[50], abs=1e-6)
