"""fashioniq-pairs: FashionIQ under the caption-pairs protocol (VAL's, CoSMo's, PLI's), against a transcription of
PLI's official evaluation (data/fashionIQ.py, evaluators/metric_calculators.py)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cirbench.cli import cli
from cirbench.errors import AnnotationError
from cirbench.plugins import get_registry
from cirbench.testing import check_dataset

CATEGORY = "dress"


def write_pairs(root, pairs=35, seed=0):
    """A caption-pairs file (two lines per reference-target pair, captions with the official trailing space) and
    the images it names under image_data/<category>/ (CoSMo's and PLI's layout): some references shared, over
    50 images in all (the protocol's R@50 needs them)."""
    rng = random.Random(seed)
    names = [f"B{n:09d}" for n in range(2 * pairs)]
    lines = []
    for p in range(pairs):
        ref, target = names[2 * p], names[2 * p + 1]
        if p % 7 == 6:  # a reference another pair has too
            ref = names[2 * rng.randrange(p)]
        for c in range(2):
            lines.append(f"{CATEGORY}/{ref}.jpg;{CATEGORY}/{target}.jpg;caption {p}.{c} is red. ")
    folder = root / "captions_pairs"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"fashion_iq-val-cap-{CATEGORY}.txt").write_text("\n".join(lines) + "\n")
    used = {f.split("/")[-1].split(".")[0] for line in lines for f in line.split(";")[:2]}
    (root / "image_data" / CATEGORY).mkdir(parents=True, exist_ok=True)
    for n in used:
        Image.new("RGB", (8, 8), (len(n) * 9 % 255, 40, 90)).save(root / "image_data" / CATEGORY / f"{n}.jpg")
    return lines


def _load(root):
    return get_registry().dataset("fashioniq-pairs").create(root, {"category": CATEGORY}).load("val")


# -- the official evaluation, transcribed --------------------------------------------------------------------------
def official_queries(lines):
    """FashionIQTestQueryDataset: each line a query; _cat_captions pairs line 2k with 2k+1 and 2k+1 with 2k."""
    ref = [ff.strip().split(";")[0] for ff in lines]
    targ = [ff.strip().split(";")[1] for ff in lines]
    caps = [ff.strip("\n").split(";")[-1] for ff in lines]
    cat = [caps[i] + " and " + caps[i + 1] if i % 2 == 0 else caps[i] + " and " + caps[i - 1]
           for i in range(len(caps))]
    return ([r.split("/")[-1].split(".")[0] for r in ref], [t.split("/")[-1].split(".")[0] for t in targ], cat)


def official_gallery(lines):
    """FashionIQTestDataset's 'VAL Evaluation method': the images the lines name."""
    img_list = []
    for d in lines:
        img_list.append(d.split(";")[0].split("/")[-1].split(".")[0])
        img_list.append(d.split(";")[1].split("/")[-1].split(".")[0])
    return list(set(img_list))


def official_recalls(similarity, gallery, refs, targets, top_k=(10, 50)):
    """ValidationMetricsCalculator: the reference's similarity set to the minimum, then recall@k over queries."""
    sim = similarity.clone()
    ref_match = torch.tensor(np.array(gallery).reshape(1, -1) == np.array(refs).reshape(-1, 1))
    match = torch.tensor(np.array(gallery).reshape(1, -1) == np.array(targets).reshape(-1, 1))
    sim[ref_match] = sim.min()
    _, idx = sim.topk(max(top_k))
    hit = np.take_along_axis(match.numpy(), idx.numpy(), axis=1)
    return {k: 100.0 * hit[:, :k].sum(axis=1).astype(bool).mean() for k in top_k}


def test_the_files_become_the_officials_queries_and_gallery(tmp_path):
    lines = write_pairs(tmp_path)
    (es,) = _load(tmp_path)
    refs, targets, cat = official_queries(lines)
    assert [q.reference for q in es.queries] == refs and [q.targets for q in es.queries] == [(t,) for t in targets]
    # the methods' join of a query's texts is the official concatenation (whitespace aside: CLIP's tokenizer folds it)
    assert [" ".join(" and ".join(q.texts).split()) for q in es.queries] == [" ".join(c.split()) for c in cat]
    assert sorted(es.gallery_ids) == sorted(official_gallery(lines)) and es.exclude_reference
    assert all(g.path.parent.name == CATEGORY and g.path.parent.parent.name == "image_data" for g in es.gallery)


def test_scores_are_the_official_evaluations(tmp_path):
    """Rankings from the same similarities: cirbench's score of the top 50 (reference removed) against the
    transcribed official recall."""
    lines = write_pairs(tmp_path)
    (es,) = _load(tmp_path)
    gallery = es.gallery_ids
    refs, targets, _ = official_queries(lines)
    sim = torch.randn(len(refs), len(gallery), generator=torch.Generator().manual_seed(4))
    sim[torch.arange(len(refs)), torch.tensor([gallery.index(t) for t in targets])] += 1.5  # some hits
    want = official_recalls(sim, gallery, refs, targets)
    rows = []
    for q, scores in zip(es.queries, sim, strict=True):
        order = [gallery[i] for i in scores.argsort(descending=True).tolist() if gallery[i] != q.reference]
        rows.append({"set": CATEGORY, "query": q.id, "top": order[:50]})
    path = tmp_path / "run.predictions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = CliRunner().invoke(cli, ["score", "--dataset", "fashioniq-pairs", "--split", "val", "--data-root",
                                   str(tmp_path), "--category", CATEGORY, str(path), "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output.strip().splitlines()[-1])
    metrics = got.get("metrics", got)
    assert metrics["R@10"] == pytest.approx(want[10]) and metrics["R@50"] == pytest.approx(want[50])  # one category
    assert 0 < want[10] < want[50] < 100
    check_dataset("fashioniq-pairs", "val", tmp_path, {"category": CATEGORY})  # the contract on these files


@pytest.mark.parametrize("edit,said", [
    (lambda lines: lines[:-1], "holds 69 lines: the protocol pairs them"),
    (lambda lines: [lines[1], lines[0].replace(";", ",")] + lines[2:],
     r"line 2: expected 'reference;target;caption;\.\.\.'"),
    (lambda lines: [lines[0], lines[2]] + lines[1:2] + lines[3:], "lines 1 and 2 are not one pair's captions"),
    (lambda lines: [";" + lines[0].split(";", 1)[1]] + lines[1:], "line 1: expected 'reference;target;caption"),
    (lambda lines: ["dress/.jpg;" + lines[0].split(";", 1)[1]] + lines[1:], r"line 1 names no image \('dress/\.jpg'\)"),
    # lines are counted as in the file, blank ones too
    (lambda lines: ["", lines[0], "", lines[2]] + lines[1:2] + lines[3:], "lines 2 and 4 are not one pair's captions"),
    (lambda lines: ["", "", "dress/.jpg;" + lines[0].split(";", 1)[1]] + lines[1:], r"line 3 names no image"),
])
def test_malformed_files_are_one_line_errors(tmp_path, edit, said):
    lines = write_pairs(tmp_path)
    (tmp_path / "captions_pairs" / f"fashion_iq-val-cap-{CATEGORY}.txt").write_text("\n".join(edit(lines)) + "\n")
    with pytest.raises(AnnotationError, match=said):
        _load(tmp_path)


def test_a_file_in_another_encoding_is_a_one_line_error(tmp_path):
    write_pairs(tmp_path)
    (tmp_path / "captions_pairs" / f"fashion_iq-val-cap-{CATEGORY}.txt").write_bytes(b"B00;B01;caf\xe9\n" * 2)
    with pytest.raises(AnnotationError, match="cannot read annotation file .*'utf-8' codec can't decode"):
        _load(tmp_path)


def test_a_missing_file_says_how_to_fetch_it(tmp_path):
    with pytest.raises(AnnotationError, match="cirbench data fetch fashioniq-pairs"):
        _load(tmp_path)
