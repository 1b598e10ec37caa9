"""CIRR, CIRCO and FashionIQ on the real official annotation files: sets, metrics, server files, scoring."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from annotations import ANNOTATIONS, copy_tree, needs_annotations, write_placeholder
from click.testing import CliRunner

from cirbench.cli import cli
from cirbench.errors import AnnotationError, CirbenchError, ImageError
from cirbench.plugins import get_registry
from cirbench.results import find_results
from cirbench.retrieval import Ranking

pytestmark = needs_annotations


def dataset(name, root, **options):
    spec = get_registry().dataset(name)
    opts = {o.name: o.default for o in spec.options}
    opts.update(options)
    return spec.create(root, opts)


# -- the official query and gallery sets ---------------------------------------------------------------
def test_cirr_sets():
    d = dataset("cirr", ANNOTATIONS / "cirr")
    (val,), (test,) = d.load("val"), d.load("test1")
    assert (len(val.queries), len(val.gallery)) == (4181, 2297)
    assert (len(test.queries), len(test.gallery)) == (4148, 2315)
    assert val.exclude_reference and test.hidden_targets and not test.queries[0].targets
    assert all(len(q.candidates) == 6 and q.reference in q.candidates for q in val.queries)
    assert any(q.text == " " for q in test.queries)  # the single-space caption is kept as is


def test_circo_and_fashioniq_sets(tmp_path):
    root = tmp_path / "circo"
    copy_tree(ANNOTATIONS / "circo", root)
    (root / "COCO2017_unlabeled" / "unlabeled2017").mkdir(parents=True)
    d = dataset("circo", root)
    (val,), (test,) = d.load("val"), d.load("test")
    assert (len(val.queries), len(test.queries)) == (220, 800)
    assert not val.exclude_reference and test.hidden_targets
    fiq = dataset("fashioniq", ANNOTATIONS / "fashioniq")
    sets = {es.name: es for es in fiq.load("val")}
    assert {n: (len(s.queries), len(s.gallery)) for n, s in sets.items()} == {
        "dress": (2017, 3817), "shirt": (2038, 6346), "toptee": (1961, 5373)}
    assert not any(s.exclude_reference or s.hidden_targets for s in sets.values())  # the reference stays ranked
    assert all(es.hidden_targets and not es.queries[0].targets for es in fiq.load("test"))
    shirts = dataset("fashioniq", ANNOTATIONS / "fashioniq", category="shirt").load("val")
    assert [es.name for es in shirts] == ["shirt"]
    assert any(not t.strip() for es in sets.values() for q in es.queries for t in q.texts)  # empty captions kept


def test_fashioniq_finds_images_in_each_official_layout_in_the_documented_order(tmp_path):
    root = copy_tree(ANNOTATIONS / "fashioniq", tmp_path / "FashionIQ")
    split = root / "image_splits" / "split.dress.val.json"
    names = json.loads(split.read_text())
    a, b, c, d, e = names[:5]
    split.write_text(json.dumps(names + [a]))  # a name listed twice is one gallery image
    write_placeholder(root / "images" / f"{a}.jpg", 1)  # SEARLE's flat folder, first
    write_placeholder(root / "dress" / f"{a}.png", 2)
    write_placeholder(root / "dress" / f"{b}.png", 3)  # FTI4CIR's per-category folder
    write_placeholder(root / "resized_images" / "dress" / f"{c}.jpeg", 4)  # the starter kit's
    write_placeholder(root / "images" / "dress" / f"{d}.png", 5)
    write_placeholder(root / "image_data" / "dress" / f"{e}.jpg", 6)  # CoSMo's and PLI's
    (es,) = dataset("fashioniq", root, category="dress").load("val")
    assert len(es.gallery) == len(names) and len(set(es.gallery_ids)) == len(names)
    where = {g.id: g.path.relative_to(root).as_posix() for g in es.gallery}
    assert [where[n] for n in (a, b, c, d, e)] == [f"images/{a}.jpg", f"dress/{b}.png",
                                                   f"resized_images/dress/{c}.jpeg", f"images/dress/{d}.png",
                                                   f"image_data/dress/{e}.jpg"]
    assert where[names[5]] == f"images/{names[5]}.png"  # not found anywhere: reported missing there


# -- metrics -------------------------------------------------------------------------------------------
def _random_ranking(evalset, seed=0, k=50):
    rng = random.Random(seed)
    ids = evalset.gallery_ids
    rows, subsets = [], []
    for q in evalset.queries:
        pool = [g for g in ids if not (evalset.exclude_reference and g == q.reference)]
        # put the target near the top half of the time so that metrics are not all zero
        top = rng.sample(pool, k)
        if q.targets and rng.random() < 0.5 and q.targets[0] not in top:
            top[rng.randrange(10)] = q.targets[0]
        rows.append(top)
        if q.candidates:
            members = [m for m in q.candidates if m != q.reference]
            rng.shuffle(members)
            subsets.append(members)
    pos = {g: i for i, g in enumerate(ids)}
    idx = torch.tensor([[pos[x] for x in r] for r in rows])
    return Ranking([q.id for q in evalset.queries], ids, idx, torch.zeros(idx.shape), subsets or None)


def test_cirr_metrics_hand_worked():
    d = dataset("cirr", ANNOTATIONS / "cirr")
    (val,) = d.load("val")
    val.queries = val.queries[:2]
    q0, q1 = val.queries
    gallery = val.gallery_ids
    pos = {g: i for i, g in enumerate(gallery)}
    others = [g for g in gallery if g not in (q0.targets[0], q1.targets[0], q0.reference, q1.reference)]
    row0 = [q0.targets[0]] + others[:49]             # hit at rank 1
    row1 = others[:7] + [q1.targets[0]] + others[7:49]  # hit at rank 8
    ranking = Ranking([q0.id, q1.id], gallery, torch.tensor([[pos[x] for x in row0], [pos[x] for x in row1]]),
                      torch.zeros(2, 50), [
                          [q0.targets[0]] + [m for m in q0.candidates if m not in (q0.targets[0], q0.reference)],
                          [m for m in q1.candidates if m not in (q1.targets[0], q1.reference)][:2] + [q1.targets[0]]])
    m = d.metrics(val, ranking)
    assert (m["R@1"], m["R@5"], m["R@10"], m["R@50"]) == (50.0, 50.0, 100.0, 100.0)
    assert (m["Rs@1"], m["Rs@2"], m["Rs@3"]) == (50.0, 50.0, 100.0)


def test_recall_matches_ranx_oracle():
    ranx = pytest.importorskip("ranx")
    d = dataset("fashioniq", ANNOTATIONS / "fashioniq", category="dress")
    (es,) = d.load("val")
    ranking = _random_ranking(es, seed=1)
    ours = d.metrics(es, ranking)
    qrels = ranx.Qrels({q.id: {q.targets[0]: 1} for q in es.queries})
    run = ranx.Run({q.id: {g: 100.0 - r for r, g in enumerate(ranking.top_ids(i))} for i, q in enumerate(es.queries)})
    theirs = ranx.evaluate(qrels, run, ["recall@10", "recall@50"])
    assert ours["R@10"] == pytest.approx(theirs["recall@10"] * 100)
    assert ours["R@50"] == pytest.approx(theirs["recall@50"] * 100)


def _official_circo(ann, sub, rank):
    """The official CIRCO evaluator's formulas (miccunifi/CIRCO src/evaluation.py), in numpy."""
    aps, recalls = [], []
    for q in ann:
        pred = np.array(sub[str(q["id"])], dtype=int)
        labels = np.isin(pred, q["gt_img_ids"])
        precisions = np.cumsum(labels) * labels / np.arange(1, len(pred) + 1)
        aps.append(precisions[:rank].sum() / min(len(q["gt_img_ids"]), rank))
        recalls.append((pred == q["target_img_id"])[:rank].sum())
    return np.mean(aps) * 100, np.mean(recalls) * 100


def test_official_circo_example_scores_like_the_official_evaluator():
    sub_path = ANNOTATIONS / "circo" / "submission_examples" / "submission_val.json"
    res = CliRunner().invoke(cli, ["score", "--dataset", "circo", "--split", "val", "--data-root",
                                   str(ANNOTATIONS / "circo"), "--json", str(sub_path)])
    assert res.exit_code == 0, res.output
    ours = json.loads(res.output)
    ann = json.loads((ANNOTATIONS / "circo" / "annotations" / "val.json").read_text())
    sub = json.loads(sub_path.read_text())
    # the official evaluator prints these for the shipped example (mAP@5/10/25/50 = 0.49/0.52/0.54/0.60)
    assert [round(ours[f"mAP@{k}"], 4) for k in (5, 10, 25, 50)] == [0.4861, 0.5178, 0.54, 0.602]
    for k in (5, 10, 25, 50):
        official_map, official_recall = _official_circo(ann, sub, k)
        assert ours[f"mAP@{k}"] == pytest.approx(official_map, abs=5e-5)
        assert ours[f"R@{k}"] == pytest.approx(official_recall, abs=5e-5)


def test_circo_map_matches_ranx_where_definitions_agree():
    """ranx divides AP by the number of relevant items; CIRCO by min(#GT, K). They agree at K=50, because no
    CIRCO val query has more than 50 ground truths."""
    ranx = pytest.importorskip("ranx")
    ann = json.loads((ANNOTATIONS / "circo" / "annotations" / "val.json").read_text())
    assert max(len(q["gt_img_ids"]) for q in ann) <= 50
    sub = json.loads((ANNOTATIONS / "circo" / "submission_examples" / "submission_val.json").read_text())
    ours = dataset("circo", ANNOTATIONS / "circo").score_file(
        "val", ANNOTATIONS / "circo" / "submission_examples" / "submission_val.json")
    qrels = ranx.Qrels({str(q["id"]): {str(g): 1 for g in q["gt_img_ids"]} for q in ann})
    run = ranx.Run({k: {str(x): 100.0 - r for r, x in enumerate(dict.fromkeys(v))} for k, v in sub.items()})
    assert ours["mAP@50"] == pytest.approx(ranx.evaluate(qrels, run, "map@50") * 100, abs=1e-6)


# -- server files: validated, and round-trip through `cirbench score` -------------------------------------
def test_cirr_server_files_round_trip(tmp_path):
    d = dataset("cirr", ANNOTATIONS / "cirr")
    (val,) = d.load("val")
    ranking = _random_ranking(val, seed=2)
    direct = d.metrics(val, ranking)
    recall, subset = d.submission_dicts(val, ranking)
    (tmp_path / "recall.json").write_text(json.dumps(recall))
    (tmp_path / "subset.json").write_text(json.dumps(subset))
    res = CliRunner().invoke(cli, ["score", "-d", "cirr", "-s", "val", "--data-root", str(ANNOTATIONS / "cirr"),
                                   "--input", f"subset={tmp_path / 'subset.json'}",
                                   "--json", str(tmp_path / "recall.json")])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == pytest.approx(direct)
    assert 0 < direct["R@1"] < 100 and 0 < direct["Rs@1"] < 100


def test_official_cirr_demo_files_pass_validation():
    d = dataset("cirr", ANNOTATIONS / "cirr")
    (test,) = d.load("test1")
    demo = ANNOTATIONS / "cirr" / "_main_branch" / "demo_files"
    recall = json.loads((demo / "test1_pred_ranks_recall.json").read_text())
    subset = json.loads((demo / "test1_pred_ranks_recall_subset.json").read_text())
    d.validate_submission(test, recall, subset)
    bad = dict(recall)
    bad[test.queries[0].id] = [test.queries[0].reference] + recall[test.queries[0].id][1:]
    with pytest.raises(CirbenchError, match="contains the reference image"):
        d.validate_submission(test, bad, subset)


def test_circo_submission_validation_and_official_example(tmp_path):
    root = copy_tree(ANNOTATIONS / "circo", tmp_path / "circo")
    (root / "COCO2017_unlabeled" / "unlabeled2017").mkdir(parents=True)
    d = dataset("circo", root)
    (test,) = d.load("test")
    example = json.loads((root / "submission_examples" / "submission_test.json").read_text())
    d.validate_submission(test, {str(k): v for k, v in example.items()})
    example.pop("0")
    with pytest.raises(CirbenchError, match=r"1 of 800 queries have no ranking in CIRCO submission \(first: \['0'\]\)"):
        d.validate_submission(test, example)


# -- bad input -----------------------------------------------------------------------------------------
def test_bad_annotation_files_are_one_line_errors(tmp_path):
    root = copy_tree(ANNOTATIONS / "cirr", tmp_path / "cirr")
    cap = root / "captions" / "cap.rc2.val.json"
    cap.write_text(cap.read_text()[:1000])  # truncated
    res = CliRunner().invoke(cli, ["run", "-m", "image-only", "-d", "cirr", "--data-root", str(root), "-q",
                                   "--output", str(tmp_path / "out")])
    assert res.exit_code == 2 and "cap.rc2.val.json is malformed or truncated" in res.output
    assert "Traceback" not in res.output
    cap.unlink()
    with pytest.raises(AnnotationError, match="cap.rc2.val.json is missing"):
        dataset("cirr", root).load("val")


def test_escaping_image_paths_are_refused(tmp_path):
    root = copy_tree(ANNOTATIONS / "cirr", tmp_path / "cirr")
    split = root / "image_splits" / "split.rc2.val.json"
    names = json.loads(split.read_text())
    names["dev-244-0-img0"] = "../../../etc/passwd"
    split.write_text(json.dumps(names))
    with pytest.raises(ImageError, match="escapes the data root"):
        dataset("cirr", root).load("val")


# -- full runs with placeholder images ------------------------------------------------------------------
def _run(args, tmp_path, tiny_config):
    return CliRunner().invoke(cli, ["run", *args, "--backbone", str(tiny_config), "--pretrained", "none",
                                    "--output", str(tmp_path / "results"), "--cache-dir", str(tmp_path / "cache"),
                                    "--workers", "0", "--batch-size", "256", "--quiet", "--no-leaderboard"])


def test_full_run_cirr_val_and_test1(tmp_path, tiny_config):
    root = copy_tree(ANNOTATIONS / "cirr", tmp_path / "CIRR")
    for split in ("val", "test1"):
        names = json.loads((root / "image_splits" / f"split.rc2.{split}.json").read_text())
        for i, rel in enumerate(names.values()):
            write_placeholder(root / rel, i)
    res = _run(["-m", "slerp", "-d", "cirr", "-s", "val", "--data-root", str(root)], tmp_path, tiny_config)
    assert res.exit_code == 0, res.output
    rec = json.loads(next((tmp_path / "results" / "cirr" / "val").glob("slerp@alpha=0.9__*.json")).read_text())
    assert rec["counts"]["queries"] == 4181 and rec["counts"]["gallery"] == 2297
    assert set(rec["metrics"]) == {"R@1", "R@5", "R@10", "R@50", "Rs@1", "Rs@2", "Rs@3"}
    res = _run(["-m", "slerp,image-only", "-d", "cirr", "-s", "test1", "--data-root", str(root)], tmp_path,
               tiny_config)  # two runs: the second writes into the submissions folder the first made
    assert res.exit_code == 0, res.output
    subs = sorted((tmp_path / "results" / "cirr" / "test1" / "submissions").glob("slerp*.json"))
    assert [p.name.split(".cirr-")[1] for p in subs] == ["test1-recall.json", "test1-recall_subset.json"]
    assert len(list(subs[0].parent.glob("image-only*.json"))) == 2
    # submission files are for the test server: no command reads them as results
    assert [p.relative_to(tmp_path / "results").parts[:2] for p in find_results(tmp_path / "results")] == [
        ("cirr", "test1")] * 2 + [("cirr", "val")]
    recall = json.loads(subs[0].read_text())
    assert recall["version"] == "rc2" and recall["metric"] == "recall" and len(recall) == 4148 + 2
    # the predictions written by the val run score identically through `cirbench score`
    preds = next((tmp_path / "results" / "cirr" / "val").glob("slerp@alpha=0.9__*.predictions.jsonl"))
    res = CliRunner().invoke(cli, ["score", "-d", "cirr", "-s", "val", "--data-root", str(root), "--json", str(preds)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == pytest.approx(rec["metrics"])


def test_full_run_circo_val_from_image_folder(tmp_path, tiny_config):
    root = copy_tree(ANNOTATIONS / "circo", tmp_path / "CIRCO")
    ann = json.loads((root / "annotations" / "val.json").read_text())
    ids = {q["reference_img_id"] for q in ann} | {g for q in ann for g in q["gt_img_ids"]}
    ids |= set(range(1, 300))  # distractors
    folder = root / "COCO2017_unlabeled" / "unlabeled2017"
    for i in sorted(ids):
        write_placeholder(folder / f"{i:012d}.jpg", i)
    for stray in ("000000999999.png", "thumbs.jpg"):  # not gallery images (a partial download neither): left out
        write_placeholder(folder / stray, 0)
    (folder / "000000999998.jpg.part").write_bytes(b"\xff\xd8")
    res = _run(["-m", "image-only", "-d", "circo", "-s", "val", "--data-root", str(root)], tmp_path, tiny_config)
    assert res.exit_code == 0, res.output
    rec = json.loads(next((tmp_path / "results" / "circo" / "val").glob("*.json")).read_text())
    assert rec["counts"]["queries"] == 220 and rec["counts"]["gallery"] == len(ids)
    assert {"mAP@5", "mAP@50", "R@50"} <= set(rec["metrics"])


def test_full_run_fashioniq_one_category_with_missing_images(tmp_path, tiny_config):
    root = copy_tree(ANNOTATIONS / "fashioniq", tmp_path / "FashionIQ")
    names = json.loads((root / "image_splits" / "split.dress.val.json").read_text())
    for i, n in enumerate(names[:-10]):  # the last 10 gallery images are missing, as in real copies
        write_placeholder(root / "images" / f"{n}.png", i)
    args = ["-m", "text-only,image-only", "-d", "fashioniq", "-s", "val", "--data-root", str(root), "--category",
            "dress"]
    res = _run(args, tmp_path, tiny_config)
    assert res.exit_code == 2 and "10 of" in res.output and "--allow-missing" in res.output
    res = _run([*args, "--allow-missing"], tmp_path, tiny_config)
    assert res.exit_code == 0, res.output
    out = tmp_path / "results" / "fashioniq" / "val"
    rec = json.loads(next(out.glob("text-only__*.json")).read_text())
    sets = rec["counts"]["sets"]["dress"]
    assert sets["missing_images"] >= 10 and sets["gallery"] == 3807
    assert set(rec["metrics"]) == {"R@10", "R@50"}
    # the reference stays in the gallery (as in the official evaluators, unlike CIRR): ranking by the reference
    # image alone retrieves it among the first (only its duplicates, placeholders of the same colour, tie with it)
    rows = [json.loads(line) for line in next(out.glob("image-only__*.predictions.jsonl")).read_text().splitlines()]
    assert rows and all(r["reference"] in r["top"][:20] for r in rows)


def test_circo_gallery_from_coco_image_info(tmp_path):
    root = copy_tree(ANNOTATIONS / "circo", tmp_path / "circo")
    info = root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json"
    info.parent.mkdir(parents=True)
    info.write_text(json.dumps({"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in (5, 7, 11)]}))
    (es,) = dataset("circo", root).load("val")
    assert es.gallery_ids == ["5", "7", "11"]
    assert es.gallery[0].path == root / "COCO2017_unlabeled" / "unlabeled2017" / "000000000005.jpg"
    info.write_text('{"images": [{"id": 1}]}')
    with pytest.raises(AnnotationError, match="image_info_unlabeled2017.json"):
        dataset("circo", root).load("val")


def test_fashioniq_aggregates_categories_by_their_mean():
    d = dataset("fashioniq", ANNOTATIONS / "fashioniq")
    per_set = {es.name: d.metrics(es, _random_ranking(es, seed=i)) for i, es in enumerate(d.load("val"))}
    agg = d.aggregate(per_set)
    assert set(agg) == {f"{c}/R@{k}" for c in ("dress", "shirt", "toptee", "avg") for k in (10, 50)}
    for k in (10, 50):
        assert agg[f"avg/R@{k}"] == pytest.approx(np.mean([per_set[c][f"R@{k}"] for c in per_set]))
        assert agg[f"dress/R@{k}"] == per_set["dress"][f"R@{k}"]


def test_circo_aspect_map_is_over_the_queries_with_the_aspect(tmp_path):
    root = copy_tree(ANNOTATIONS / "circo", tmp_path / "circo")
    (root / "COCO2017_unlabeled" / "unlabeled2017").mkdir(parents=True)
    d = dataset("circo", root)
    (es,) = d.load("val")
    ann = {q["id"]: q for q in json.loads((ANNOTATIONS / "circo" / "annotations" / "val.json").read_text())}
    gallery = sorted({str(g) for q in ann.values() for g in q["gt_img_ids"]} | {str(i) for i in range(1, 200)})
    pos = {g: i for i, g in enumerate(gallery)}
    rows = []
    for q in es.queries:  # a perfect ranking for queries with "negation", none of the targets otherwise
        if "negation" in q.extra["semantic_aspects"]:
            row = list(q.targets)[:50]
        else:
            row = []
        row += [g for g in gallery if g not in q.targets][: 50 - len(row)]
        rows.append([pos[g] for g in row])
    ranking = Ranking([q.id for q in es.queries], gallery, torch.tensor(rows), torch.zeros(len(rows), 50))
    m = d.metrics(es, ranking)
    assert m["aspect/negation/mAP@10"] == pytest.approx(100.0)
    n_neg = sum("negation" in q.extra["semantic_aspects"] for q in es.queries)
    assert 0 < n_neg < len(es.queries)
    assert m["mAP@10"] == pytest.approx(100.0 * n_neg / len(es.queries))
    others = [a for a in m if a.startswith("aspect/") and "negation" not in a]
    assert all(m[a] < 100 for a in others)


def test_circo_submission_files_are_what_the_server_takes(tmp_path):
    root = copy_tree(ANNOTATIONS / "circo", tmp_path / "circo")
    (root / "COCO2017_unlabeled" / "unlabeled2017").mkdir(parents=True)
    d = dataset("circo", root)
    (test,) = d.load("test")
    gallery = [str(i) for i in range(1, 400)]
    idx = torch.stack([torch.randperm(len(gallery), generator=torch.Generator().manual_seed(i))[:50]
                       for i in range(len(test.queries))])
    ranking = Ranking([q.id for q in test.queries], gallery, idx, torch.zeros(idx.shape))
    (path,) = d.write_submission(test, ranking, tmp_path, "run")
    sub = json.loads(path.read_text())
    assert set(sub) == {q.id for q in test.queries} and len(sub) == 800
    assert all(len(v) == 50 == len(set(v)) and all(isinstance(x, int) for x in v) for v in sub.values())
    assert sub[test.queries[3].id] == [int(gallery[i]) for i in idx[3].tolist()]
