"""GeneCIS: the official template format, its crops, per-template galleries and Recall@K against
transcriptions of the official code (facebookresearch/genecis datasets/vaw_dataset.py, utils/metric_utils.py,
eval/eval_functions.py)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cirbench.cli import cli
from cirbench.errors import AnnotationError
from cirbench.evaluate import RunConfig, evaluate
from cirbench.images import load_image
from cirbench.plugins import get_registry
from cirbench.retrieval import rank_candidates

TASKS = ("focus_attribute", "change_attribute", "focus_object", "change_object")


def write_genecis(root, templates=6, gallery=14, seed=0, vg_split=True):
    """GeneCIS-format template files and images: VG images split over VG_100K and VG_100K_2 as VG 1.2 unpacks,
    COCO val2017 images, one change_object template listing its target among its distractors (as the real
    file's template 19 does)."""
    rng = random.Random(seed)

    def image(path, size, mode="RGB"):
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = bytes(rng.randrange(256) for _ in range(size[0] * size[1] * len(mode)))
        Image.frombytes(mode, size, pixels).save(path)

    (root / "genecis").mkdir(parents=True)
    vg_ids = list(range(1, 41))
    for i in vg_ids:
        folder = "VG_100K_2" if vg_split and i % 2 else "VG_100K"
        image(root / "visual_genome" / folder / f"{i}.jpg", (rng.randrange(40, 90), rng.randrange(40, 90)),
              "L" if i % 7 == 0 else "RGB")
    coco_ids = [rng.randrange(10**5, 6 * 10**5) for _ in range(40)]
    for i in coco_ids:
        image(root / "coco" / "val2017" / f"{i:012d}.jpg", (rng.randrange(30, 70), rng.randrange(30, 70)))

    def vg():
        x, y = rng.randrange(0, 30), rng.randrange(0, 30)
        return {"image_id": rng.choice(vg_ids), "instance_bbox": [x, y, rng.randrange(3, 25), rng.randrange(3, 25)],
                "object_name": "thing"}

    def coco():
        return {"val_image_id": rng.choice(coco_ids)}

    for task in TASKS:
        make = vg if task.endswith("attribute") else coco
        rows = []
        for _ in range(templates):
            target = make()
            distractors = []
            while len(distractors) < gallery:
                d = make()
                if d != target and d not in distractors:
                    distractors.append(d)
            rows.append({"reference": make(), "target": target, "condition": rng.choice(["red", "wall", "dog"]),
                         "gallery": distractors})
        if task == "change_object":
            rows[1]["gallery"][5] = dict(rows[1]["target"])
        (root / "genecis" / f"{task}.json").write_text(json.dumps(rows))
    return root


def dataset(root, **options):
    spec = get_registry().dataset("genecis")
    opts = {o.name: o.default for o in spec.options}
    opts.update(options)
    return spec.create(root, opts)


# -- transcriptions of the official code ----------------------------------------------------------------
def official_crop(path, bbox, dilate=0.7):
    """VAWDataset.load_cropped_image (official), minus the model transform."""
    im = Image.open(path)
    im_width, im_height = im.size
    width, height = bbox[2], bbox[3]
    orig_left, orig_top = bbox[0], bbox[1]
    left, top = max(0, orig_left - dilate * width), max(0, orig_top - dilate * height)
    right, bottom = min(im_width, left + (1 + dilate) * width), min(im_height, top + (1 + dilate) * height)
    im = im.crop((left, top, right, bottom))
    bg_color = (0,) if im.mode == "L" else (0, 0, 0)
    width, height = im.size
    if width == height:
        return im
    if width > height:
        result = Image.new(im.mode, (width, width), bg_color)
        result.paste(im, (0, (width - height) // 2))
        return result
    result = Image.new(im.mode, (height, height), bg_color)
    result.paste(im, ((height - width) // 2, 0))
    return result


def official_recall(sort_idxs, k):
    """metric_utils.get_recall, one-hot branch, with target rank 0 as validate() passes it."""
    targets = torch.zeros(sort_idxs.shape[0], dtype=torch.long)
    indices = sort_idxs[:, :k]
    targets = targets.view(-1, 1).expand_as(indices)
    hits = (targets == indices).nonzero()
    if len(hits) == 0:
        return 0
    return float((targets == indices).nonzero()[:, :-1].size(0)) / targets.size(0)


# -- tests ------------------------------------------------------------------------------------------------
def test_templates_load_with_per_template_galleries(tmp_path):
    root = write_genecis(tmp_path / "GeneCIS")
    sets = {es.name: es for es in dataset(root).load("test")}
    assert list(sets) == list(TASKS)
    for es in sets.values():
        assert len(es.queries) == 6 and es.query_galleries
        assert all(len(q.candidates) == 15 and q.candidates[0] == q.targets[0] for q in es.queries)
        assert not any(im.id for im in es.gallery if not im.path.is_file())  # every image found in its folder
    dup = sets["change_object"].queries[1]
    assert dup.candidates[6] == dup.targets[0] + "#distractor"  # kept as a separate, non-target entry
    crop = sets["focus_attribute"].images[sets["focus_attribute"].queries[0].reference]
    assert crop.view is not None and "@" in crop.id and crop.path.parent.name in ("VG_100K", "VG_100K_2")
    assert [es.name for es in dataset(root, task="focus_object").load("test")] == ["focus_object"]
    # two crops of one file never share cached features
    from cirbench.feature_cache import image_identity

    by_file = {}
    for im in sets["change_attribute"].gallery:
        by_file.setdefault(im.path, []).append(im)
    a, b = next(v for v in by_file.values() if len(v) > 1)[:2]
    assert a.id != b.id and image_identity(a) != image_identity(b)
    assert image_identity(a, "content") != image_identity(b, "content")


def test_crops_equal_the_official_crop(tmp_path):
    root = write_genecis(tmp_path / "GeneCIS")
    checked = 0
    for es in dataset(root, task="change_attribute").load("test"):
        for im in list(es.images.values())[:40]:
            box = [float(v) for v in im.id.split("@")[1].split(",")]
            ours, theirs = load_image(im), official_crop(im.path, box)
            assert ours.mode == theirs.mode and ours.size == theirs.size and ours.tobytes() == theirs.tobytes()
            checked += 1
    assert checked == 40
    # a box at the right and bottom edges (clipped) and a grey image
    Image.new("L", (50, 30), 200).save(tmp_path / "g.jpg")
    from cirbench.datasets.genecis.dataset import dilated_square_crop

    for box in ([45, 25, 10, 10], [0, 0, 50, 30], [10.5, 3.25, 7.75, 20.5]):
        ours = dilated_square_crop(Image.open(tmp_path / "g.jpg"), tuple(box))
        assert ours.tobytes() == official_crop(tmp_path / "g.jpg", box).tobytes()
    # a box outside the image (an annotation of another image): said in words, not as PIL's coordinate error
    with pytest.raises(ValueError, match=r"the box \(x, y, w, h\) = \(80, 3, 5, 5\) lies outside the image \(50x30\)"):
        dilated_square_crop(Image.open(tmp_path / "g.jpg"), (80, 3, 5, 5))
    # dilated, a box may start exactly at the right or bottom edge: no pixel of the image is left to crop
    for box in ((53.5, 3, 5, 5), (3, 33.5, 5, 5)):
        with pytest.raises(ValueError, match="lies outside the image"):
            dilated_square_crop(Image.open(tmp_path / "g.jpg"), box)


def test_recall_matches_the_official_get_recall():
    gen = torch.Generator().manual_seed(0)
    q, n, d = 300, 15, 32
    queries = torch.nn.functional.normalize(torch.randn(q, d, generator=gen), dim=-1)
    gallery = torch.nn.functional.normalize(torch.randn(q * n, d, generator=gen), dim=-1)
    per_query = [list(range(i * n, (i + 1) * n)) for i in range(q)]  # position 0 of each is the target
    # official: similarities over [target] + gallery, sorted descending, recall of index 0
    sims = torch.einsum("qd,qnd->qn", queries, gallery.view(q, n, d))
    sort_idxs = sims.sort(dim=-1, descending=True).indices
    from cirbench.datasets.genecis.dataset import GeneCIS
    from cirbench.retrieval import Ranking
    from cirbench.types import EvalSet, ImageRef, Query

    ids = [str(i) for i in range(q * n)]
    es = EvalSet("t", [ImageRef(i, None) for i in ids],
                 [Query(str(i), "r", ("x",), (ids[i * n],), tuple(ids[i * n : (i + 1) * n])) for i in range(q)], {},
                 query_galleries=True)
    _, idx, scores = rank_candidates(queries, gallery, per_query, with_scores=True)
    ours = GeneCIS(None).per_query_metrics(es, Ranking([x.id for x in es.queries], ids, idx, scores))
    for k in (1, 2, 3):
        assert float(ours[f"R@{k}"].mean()) / 100 == pytest.approx(official_recall(sort_idxs, k), abs=1e-12)
    assert 0 < float(ours["R@1"].mean()) < float(ours["R@3"].mean()) < 100


def test_full_run_all_tasks_averages_them_and_scores_its_own_predictions(tmp_path, tiny_config):
    root = write_genecis(tmp_path / "GeneCIS")
    cfg = RunConfig(method="slerp", dataset="genecis", split="test", backbone=str(tiny_config), pretrained="none",
                    data_root=root, output=tmp_path / "results", cache_dir=tmp_path / "cache", workers=0,
                    progress=False, bootstrap=0)
    (out,) = evaluate(cfg)
    metrics = out.record["metrics"]
    for k in (1, 2, 3):
        assert metrics[f"avg/R@{k}"] == pytest.approx(sum(metrics[f"{t}/R@{k}"] for t in TASKS) / 4)
    rows = [json.loads(line) for line in out.predictions_path.read_text().splitlines()]
    assert len(rows) == 24 and all(len(r["top"]) == 15 for r in rows)
    # each ranking holds exactly the template's own gallery
    sets = {es.name: es for es in dataset(root).load("test")}
    for r in rows:
        assert sorted(r["top"]) == sorted(sets[r["set"]].queries[int(r["query"])].candidates)
    res = CliRunner().invoke(cli, ["score", "-d", "genecis", "-s", "test", "--data-root", str(root), "--json",
                                   str(out.predictions_path)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == pytest.approx(metrics)
    other = next(r for r in rows if r["set"] != rows[0]["set"] or r["query"] != rows[0]["query"])
    stray = next(g for g in other["top"] if g not in rows[0]["top"])  # an image of another template's gallery
    bad = [{**rows[0], "top": [stray, *rows[0]["top"][1:]]}, *rows[1:]]
    (tmp_path / "bad.predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    res = CliRunner().invoke(cli, ["score", "-d", "genecis", "-s", "test", "--data-root", str(root),
                                   str(tmp_path / "bad.predictions.jsonl")])
    assert res.exit_code == 2 and f"'{stray}' in the ranking is not in the template's gallery" in res.output
    # R@3 needs three ranked images of each template's gallery
    short = [{**rows[0], "top": rows[0]["top"][:2]}, *rows[1:]]
    (tmp_path / "short.predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in short))
    res = CliRunner().invoke(cli, ["score", "-d", "genecis", "-s", "test", "--data-root", str(root),
                                   str(tmp_path / "short.predictions.jsonl")])
    assert res.exit_code == 2 and "at least 3 are needed" in res.output, res.output
    # the crops are cached per view: a second run encodes nothing and ranks identically
    (again,) = evaluate(cfg)
    assert again.record["metrics"] == metrics


def test_bad_template_files_are_one_line_errors(tmp_path):
    root = write_genecis(tmp_path / "GeneCIS")
    path = root / "genecis" / "focus_attribute.json"
    rows = json.loads(path.read_text())
    for box in ([1, 2, 5, 0], [1, 2, -3, 5], [1, 2, 4, -0.5], [1, 2, 0, 5]):  # no width or no height
        rows[2]["target"]["instance_bbox"] = box
        path.write_text(json.dumps(rows))
        with pytest.raises(AnnotationError, match="record 2: a box .* has no area"):
            dataset(root, task="focus_attribute").load("test")
    for bad in ("NaN", "Infinity"):  # JSON as Python writes it: NaN would crop the whole image, quietly
        path.write_text(json.dumps(rows).replace("[1, 2, 0, 5]", f"[1, 2, {bad}, 5]"))
        with pytest.raises(AnnotationError, match=r"record 2: field 'target.instance_bbox.2': .* finite number"):
            dataset(root, task="focus_attribute").load("test")
    del rows[3]["gallery"]
    path.write_text(json.dumps(rows))
    with pytest.raises(AnnotationError, match="record 3: field 'gallery'"):
        dataset(root, task="focus_attribute").load("test")
    path.write_text("[{")
    with pytest.raises(AnnotationError, match="malformed"):
        dataset(root, task="focus_attribute").load("test")
    (root / "genecis" / "focus_object.json").unlink()
    res = CliRunner().invoke(cli, ["run", "-m", "image-only", "-d", "genecis", "--task", "focus_object",
                                   "--data-root", str(root), "-q", "--no-leaderboard"])
    assert res.exit_code == 2 and "focus_object.json is missing" in res.output and "Traceback" not in res.output
