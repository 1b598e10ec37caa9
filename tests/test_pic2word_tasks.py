"""Pic2Word's domain conversion (imagenet-r) and object composition (coco-object): the official lists and
query file, the query images, and the metrics against transcriptions of the official code
(google-research/composed_image_retrieval src/eval_utils.py, src/data.py, src/eval_retrieval.py,
data/coco/prepare_data.py)."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from cirbench.cli import cli
from cirbench.errors import AnnotationError, CirbenchError
from cirbench.evaluate import RunConfig, evaluate
from cirbench.plugins import get_registry
from cirbench.retrieval import Ranking, rank
from cirbench.testing import DATASET_CHECKS, check_dataset


def dataset(name, root, **options):
    spec = get_registry().dataset(name)
    opts = {o.name: o.default for o in spec.options}
    opts.update(options)
    return spec.create(root, opts)


def noise_image(path, size, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


# -- transcriptions of the official metrics ----------------------------------------------------------------
def official_imgnet_recall(query_features, image_features, query_labels, target_labels, ks=(10, 50)):
    """get_metrics_imgnet (official), recall part."""
    num_classes = 7000
    query_onehot = F.one_hot(query_labels, num_classes=num_classes).float()
    target_onehot = F.one_hot(target_labels, num_classes=num_classes).float()
    batches = [(query_features[x:x + 100], query_onehot[x:x + 100]) for x in range(0, len(query_features), 100)]
    metrics = {k: 0 for k in ks}
    for feats, labels in batches:
        logits_per_query = feats @ image_features.t()
        label_matrix = labels @ target_onehot.t()
        ranking = torch.argsort(logits_per_query, descending=True)
        for k in ks:
            matrix_k = torch.zeros_like(label_matrix)
            matrix_k[torch.arange(matrix_k.size(0)).unsqueeze(1), ranking[:, :k]] = 1
            num_correct = torch.sum(matrix_k * label_matrix, dim=1)
            num_total = torch.sum(label_matrix, dim=1)
            metrics[k] += torch.mean(num_correct / (num_total + 1e-5)) * len(feats)
    return {k: float(v) / len(query_features) for k, v in metrics.items()}


def official_coco_recall(image_features, ref_features, ks=(1, 5, 10, 50, 100)):
    """get_metrics_coco (official), the ref_to_image direction."""
    logits = (image_features @ ref_features.t()).t()
    ground_truth = torch.arange(len(ref_features)).view(-1, 1)
    preds = torch.where(torch.argsort(logits, descending=True) == ground_truth)[1].numpy()
    return {k: float(np.mean(preds < k)) for k in ks}


# -- imagenet-r -------------------------------------------------------------------------------------------------
def test_imagenet_r_lists_are_the_official_ones():
    from cirbench.datasets.imagenet_r import dataset as imr
    from cirbench.util import file_sha256

    for name, (lines, sha) in imr.OFFICIAL.items():
        assert file_sha256(imr.LISTS / name) == sha and len(imr.read_list(imr.LISTS / name)) == lines
    sets = {es.name: es for es in dataset("imagenet-r", "/nonexistent").load("test")}
    assert list(sets) == ["cartoon", "origami", "toy", "sculpture"]
    for es in sets.values():
        assert (len(es.queries), len(es.gallery)) == (10_000, 16_983) and not es.exclude_reference
    # every query image is in the gallery too (as a never-relevant distractor), as in the official lists
    assert {q.reference for q in sets["toy"].queries} <= set(sets["toy"].gallery_ids)
    no_target = {d: sum(not q.targets for q in es.queries) for d, es in sets.items()}
    assert no_target == {"cartoon": 2350, "origami": 4700, "toy": 2800, "sculpture": 2900}
    q = sets["origami"].queries[0]
    assert q.prompt == "a origami of *" and q.texts == ("a origami of ",)
    assert all("/origami_" in t for t in q.targets)


def test_imagenet_r_recall_matches_the_official_formula():
    sets = {es.name: es for es in dataset("imagenet-r", "/nonexistent").load("test")}
    from cirbench.datasets.imagenet_r import dataset as imr

    targets = imr.read_list(imr.LISTS / imr.TARGET_LIST)
    queries = imr.read_list(imr.LISTS / imr.QUERY_LIST)
    gen = torch.Generator().manual_seed(0)
    n_q = 400
    # features that make class-mates likelier neighbours, so recall is not ~0
    centres = F.normalize(torch.randn(7000, 64, generator=gen), dim=-1)
    t_labels = torch.tensor([lab for _, lab in targets])
    gallery = F.normalize(centres[t_labels % 1000] + 0.3 * torch.randn(len(targets), 64, generator=gen), dim=-1)
    q_labels = torch.tensor([lab for _, lab in queries[:n_q]])
    feats = F.normalize(centres[q_labels] + 0.3 * torch.randn(n_q, 64, generator=gen), dim=-1)
    for domain in ("cartoon", "sculpture"):
        es = sets[domain]
        es.queries = es.queries[:n_q]
        idx, scores = rank(feats, gallery, 50)
        ranking = Ranking([q.id for q in es.queries], es.gallery_ids, idx, scores)
        ours = imr.ImageNetR(None).per_query_metrics(es, ranking)
        theirs = official_imgnet_recall(feats, gallery, q_labels + 1000 * imr.DOMAINS.index(domain), t_labels)
        for k in (10, 50):
            assert float(ours[f"R@{k}"].mean()) / 100 == pytest.approx(theirs[k], abs=1e-6)
        assert float(ours["R@50"].mean()) > 1


def test_imagenet_r_full_run_with_small_lists(tmp_path, tiny_config, monkeypatch):
    from cirbench.datasets.imagenet_r import dataset as imr

    rng = random.Random(0)
    lists = tmp_path / "lists"
    lists.mkdir()
    root = tmp_path / "data"
    q_lines, t_lines = [], []
    for c, wnid in enumerate(("n01443537", "n01484850", "n01494475")):
        for i in range(3):
            rel = f"imgnet/real/{wnid}/ILSVRC2012_val_{c * 10 + i:08d}.JPEG"
            q_lines.append(f"{rel} {c} ")
            t_lines.append(f"{rel} {6000 + c} ")
        for d, domain in enumerate(imr.DOMAINS):
            for i in range(rng.randrange(0, 3)):
                t_lines.append(f"imgnet/imagenet-r/{wnid}/{domain}_{i}.jpg {c + 1000 * d} ")
    (lists / imr.QUERY_LIST).write_text("\n".join(q_lines) + "\n")
    (lists / imr.TARGET_LIST).write_text("\n".join(t_lines) + "\n")
    for n, line in enumerate(q_lines + t_lines):
        noise_image(root / line.split()[0], (20, 16), n)
    monkeypatch.setattr(imr, "LISTS", lists)
    cfg = RunConfig(method="pic2word", dataset="imagenet-r", split="test", backbone=str(tiny_config),
                    pretrained="none", data_root=root, output=tmp_path / "results", cache_dir=tmp_path / "cache",
                    workers=0, progress=False, bootstrap=0)
    with pytest.raises(CirbenchError, match="pic2word"):  # pic2word needs its trained mapping network
        evaluate(cfg)
    for method in ("image-only", "text-only", "slerp"):
        (out,) = evaluate(RunConfig(**{**cfg.__dict__, "method": method}))
        m = out.record["metrics"]
        assert m["avg/R@10"] == pytest.approx(sum(m[f"{d}/R@10"] for d in imr.DOMAINS) / 4)
        assert set(out.record["dataset"]["annotations"].values()) == {
            imr.file_sha256(lists / imr.QUERY_LIST), imr.file_sha256(lists / imr.TARGET_LIST)}
    # the data root may also be the imgnet folder itself
    (again,) = evaluate(RunConfig(**{**cfg.__dict__, "method": "slerp", "data_root": root / "imgnet"}))
    assert again.record["metrics"] == out.record["metrics"]
    # `cirbench score` on the run's own predictions (one set per domain; the default per-query scoring)
    res = CliRunner().invoke(cli, ["score", "-d", "imagenet-r", "-s", "test", "--data-root", str(root),
                                   str(again.predictions_path), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == pytest.approx(again.metrics)
    res = CliRunner().invoke(cli, ["score", "-d", "imagenet-r", "-s", "test", "--data-root", str(root), "--domain",
                                   "cartoon", str(again.predictions_path), "--json"])
    assert res.exit_code == 0, res.output  # --domain as on run: that domain's set alone, read from its rows
    assert json.loads(res.output) == pytest.approx({k: again.metrics[f"cartoon/{k}"] for k in ("R@10", "R@50")})
    held, notes = [], []  # the dataset contract (cirbench check --dataset) holds on these lists
    check_dataset("imagenet-r", "test", root, report=held.append, note=notes.append)
    assert held == list(DATASET_CHECKS)
    # a class without an image in a domain leaves its 3 queries there without a target: no ranking scores them
    empty = 3 * sum(1 for wnid in ("n01443537", "n01484850", "n01494475") for domain in imr.DOMAINS
                    if not any(f"/{wnid}/{domain}_" in line for line in t_lines))
    assert empty and [n.split(" queries")[0] for n in notes] == [str(empty)], notes


# -- coco-object ------------------------------------------------------------------------------------------------
def write_coco(root, n=12, seed=0):
    """COCO-style val2017 images, instances_val2017.json with polygon objects, and a query CSV in the
    official format (as prepare_data.py writes it, including the trailing space after the region)."""
    rng = random.Random(seed)
    cats = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}]
    images, anns, rows = [], [], ["id,query_regions,query_class,classes"]
    for i in range(n):
        image_id = 100 + 7 * i
        w, h = rng.randrange(60, 100), rng.randrange(60, 100)
        noise_image(root / "val2017" / f"{image_id:012d}.jpg", (w, h), i, "L" if i == 3 else "RGB")
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": w, "height": h})
        objs = []
        for j, cat in enumerate(rng.sample(cats, rng.randrange(1, 4))):
            x, y = rng.uniform(0, w / 2), rng.uniform(0, h / 2)
            bw, bh = rng.uniform(8, w / 2 - 1), rng.uniform(8, h / 2 - 1)
            poly = [x, y, x + bw, y, x + bw * 0.7, y + bh, x, y + bh * 0.8]
            ann = {"id": image_id * 10 + j, "image_id": image_id, "category_id": cat["id"], "iscrowd": 0,
                   "bbox": [x, y, bw, bh], "area": bw * bh, "segmentation": [poly]}
            anns.append(ann)
            objs.append((ann, cat["name"]))
        ann, name = objs[0]
        x, y, bw, bh = ann["bbox"]
        others = ";".join(dict.fromkeys(nm for _, nm in objs[1:]))
        rows.append(f"{image_id:012d}.jpg,{x};{y};{x + bw};{y + bh} ,{name},{others}")
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "instances_val2017.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats}))
    (root / "coco_eval.csv").write_text("\n".join(rows) + "\n")
    return root / "coco_eval.csv"


def official_masked(root, row_file, ann_path):
    """prepare_data.py's masking of one image (official), returning the saved JPEG's bytes."""
    import io

    from pycocotools.coco import COCO

    coco = COCO(str(ann_path))
    image_id = int(row_file[:-4])
    ann_region = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))[0]
    image = np.array(Image.open(root / "val2017" / row_file))
    mask = coco.annToMask(ann_region)
    width, height = mask.shape
    mask = mask.reshape(width, height, 1)
    if len(image.shape) == 2:
        image = image.reshape(width, height, 1)
    image_masked = image * mask + (1 - mask) * 255
    try:
        im = Image.fromarray(image_masked)
    except TypeError:
        im = Image.fromarray(np.squeeze(image_masked, axis=2))
    buf = io.BytesIO()
    im.save(buf, format="JPEG")
    return buf.getvalue()


def test_coco_object_frozen_query_file():
    from cirbench.datasets.coco_object import dataset as co

    (es,) = dataset("coco-object", "/nonexistent").load("val")
    assert (len(es.queries), len(es.gallery)) == (co.FROZEN_QUERIES, co.FROZEN_QUERIES)
    q = es.queries[0]
    assert q.prompt == ("a photo of * and chair and potted plant and tv and person and microwave and refrigerator "
                        "and book and clock and vase and dining table")
    assert q.texts[0] == q.prompt.replace("* and ", "") and q.targets == ("000000000139",)
    ref = es.images[q.reference]
    assert ref.path.parent.name == "val2017_masked" and ref.view.resize == "squash"
    assert ref.view.key == "coco-object-region:317,219,338,230:resize=squash"  # int(float(x)), as officially
    empty = [x for x in es.queries if x.prompt.endswith(" and ")]
    assert empty  # an image with no other class keeps the official trailing " and " (pandas NaN -> [""])


def test_coco_object_query_file_errors(tmp_path):
    bad = tmp_path / "q.csv"
    for text, message in (("id,regions\n", "expected the header"),
                          ("id,query_regions,query_class,classes\n000000000001.jpg,1;2;3 ,dog,\n", "x1;y1;x2;y2"),
                          ("id,query_regions,query_class,classes\n000000000001.jpg,5;2;3;4 ,dog,\n", "x2 > x1"),
                          ("id,query_regions,query_class,classes\n", "holds no queries"),
                          ("id,query_regions,query_class,classes\n000000000001.jpg,1;2;3;4,dog\n",
                           "line 2: expected 4 fields, found 3"),
                          ("id,query_regions,query_class,classes\n000000000001.jpg,1;2;3;4,dog,\n"
                           "000000000001.jpg,1;2;3;4,cat,\n", "line 3: bad or repeated image '000000000001.jpg'"),
                          ("id,query_regions,query_class,classes\nimg/1.jpg,1;2;3;4,dog,\n", "bad or repeated image"),
                          ("id,query_regions,query_class,classes\n000000000001.jpg,1;2;3;4,,\n", "empty class")):
        bad.write_text(text)
        with pytest.raises(AnnotationError, match=message):
            dataset("coco-object", tmp_path, queries=bad).load("val")
    bad.write_bytes(bytes(range(0x80, 0xFF)))
    with pytest.raises(AnnotationError, match="cannot read query file"):
        dataset("coco-object", tmp_path, queries=bad).load("val")


@pytest.mark.parametrize("text, message", [
    ("a/1.jpg 0\na/2.jpg\n", "line 2: expected '<path> <label>', found 'a/2.jpg'"),
    ("a/1.jpg x\n", "line 1: expected '<path> <label>'"),
    ("a/1.jpg -3\n", "line 1: expected '<path> <label>'"),
    ("a/1 b.jpg 3\n", "line 1: expected '<path> <label>'"),
    ("\n\n", "is empty"),
])
def test_imagenet_r_image_lists_that_are_not_the_official_format_are_refused(tmp_path, text, message):
    from cirbench.datasets.imagenet_r import dataset as imr

    path = tmp_path / "list.txt"
    path.write_text(text)
    with pytest.raises(AnnotationError, match=f"image list {path}"):
        imr.read_list(path)
    with pytest.raises(AnnotationError, match=message.replace("(", "\\(").replace(")", "\\)")):
        imr.read_list(path)
    (tmp_path / "ok.txt").write_text(" a/1.jpg  7 \n\n")  # spaces around and blank lines are fine
    assert imr.read_list(tmp_path / "ok.txt") == [("a/1.jpg", 7)]


def test_coco_object_prepare_matches_the_official_masking_and_runs(tmp_path, tiny_config):
    from cirbench.preprocess import Preprocessor

    root = tmp_path / "coco"
    queries = write_coco(root)
    res = CliRunner().invoke(cli, ["data", "prepare", "coco-object", "--data-root", str(root), "--queries",
                                   str(queries), "-q"])
    assert res.exit_code == 0, res.output
    assert "wrote 12 masked" in res.output
    rows = [line.split(",")[0] for line in queries.read_text().splitlines()[1:]]
    for f in rows[:5]:
        assert (root / "val2017_masked" / f).read_bytes() == official_masked(
            root, f, root / "annotations" / "instances_val2017.json")
    # the query image: the masked file cropped to the integer box, squashed to the input size (official
    # transforms_region = Resize((n, n)) + RGB + ToTensor + Normalize)
    (es,) = dataset("coco-object", root, queries=queries).load("val")
    from cirbench.encode import BatchFiles

    pre = Preprocessor(kind="targetpad", size=32)  # whatever the run's preprocessing, the region is squashed
    refs = [es.images[q.reference] for q in es.queries]
    ours = BatchFiles(refs, pre, len(refs), batched=True)[0]["done"]
    import torchvision.transforms as T

    for i, ref in enumerate(refs):
        box = tuple(int(float(x)) for x in queries.read_text().splitlines()[i + 1].split(",")[1].split(";"))
        region = Image.open(ref.path).crop(box)
        official = np.asarray(T.Resize((32, 32), interpolation=T.InterpolationMode.BICUBIC)(region).convert("RGB"))
        assert torch.equal(ours[i], torch.from_numpy(official.copy()).permute(2, 0, 1))
    held = []  # the dataset contract (cirbench check --dataset) holds on the prepared queries
    check_dataset("coco-object", "val", root, {"queries": str(queries)}, report=held.append)
    assert held == list(DATASET_CHECKS)
    cfg = RunConfig(method="slerp", dataset="coco-object", split="val", backbone=str(tiny_config), pretrained="none",
                    data_root=root, output=tmp_path / "results", cache_dir=tmp_path / "cache", workers=0,
                    progress=False, bootstrap=0, dataset_options={"queries": str(queries)})
    (out,) = evaluate(cfg)
    assert set(out.record["metrics"]) == {"R@1", "R@5", "R@10", "R@50", "R@100"}
    assert out.record["counts"]["queries"] == 12
    # rerunning prepare keeps what is there
    res = CliRunner().invoke(cli, ["data", "prepare", "coco-object", "--data-root", str(root), "--queries",
                                   str(queries), "-q"])
    assert "wrote 0 masked" in res.output and "12 already there" in res.output


def test_coco_object_masked_images_follow_the_query_file(tmp_path):
    """A query file that picks another object of an image: the masked image made for the first file is refused
    by name, and preparing again remakes exactly that image."""
    root = tmp_path / "coco"
    queries = write_coco(root)
    prepare = ["data", "prepare", "coco-object", "--data-root", str(root), "-q", "--queries"]
    assert CliRunner().invoke(cli, [*prepare, str(queries)]).exit_code == 0
    data = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    by_image = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    image_id, anns = next((i, a) for i, a in by_image.items() if len(a) >= 2)
    x, y, w, h = anns[1]["bbox"]
    file = f"{image_id:012d}.jpg"
    lines = [f"{file},{x};{y};{x + w};{y + h} ,{names[anns[1]['category_id']]},{names[anns[0]['category_id']]}"
             if line.startswith(file) else line for line in queries.read_text().splitlines()]
    other = tmp_path / "other.csv"
    other.write_text("\n".join(lines) + "\n")
    before = (root / "val2017_masked" / file).read_bytes()
    with pytest.raises(AnnotationError, match=f"1 masked query images .* show another object .*first: {file}"):
        dataset("coco-object", root, queries=other).load("val")
    res = CliRunner().invoke(cli, [*prepare, str(other)])
    assert res.exit_code == 0 and "wrote 1 masked" in res.output and "11 already there" in res.output, res.output
    assert (root / "val2017_masked" / file).read_bytes() != before
    assert len(dataset("coco-object", root, queries=other).load("val")[0].queries) == 12
    with pytest.raises(AnnotationError, match="show another object"):  # and now the first file is the stale one
        dataset("coco-object", root, queries=queries).load("val")


def _prepare(root, queries):
    return CliRunner().invoke(cli, ["data", "prepare", "coco-object", "--data-root", str(root), "-q", "--queries",
                                    str(queries)])


def _edit_instances(root, edit):
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _set(obj, key, value):
    obj[key] = value


def _rle_taller(image, rows):
    """An uncompressed RLE mask (all background) ``rows`` taller than ``image``."""
    size = [image["height"] + rows, image["width"]]
    return {"counts": [size[0] * size[1]], "size": size}


@pytest.mark.parametrize("edit, said", [
    (lambda d: d.pop("categories"), r"has no 'categories' list \(is it COCO's instances_val2017.json\?\)"),
    (lambda d: _set(d["annotations"][2], "bbox", 7.5), r"\('annotations'\), record 2 \(id \d+\): field 'bbox'"),
    (lambda d: _set(d["annotations"][0], "segmentation", [[1.0, 2.0, 3.0]]),
     r"record 0 .*field 'segmentation.*a polygon is x, y pairs, at least three of them: found 3 numbers"),
    (lambda d: _set(d["images"][1], "width", 0), r"\('images'\), record 1 \(id \d+\): field 'width'"),
    (lambda d: _set(d["categories"][0], "name", None), r"\('categories'\), record 0 \(id 1\): field 'name'"),
    (lambda d: d["images"].pop(0), r"query image 000000000100.jpg: image id 100 is not among the annotation "
                                   r"file's images"),
    (lambda d: _set(d, "annotations", {}), r"\('annotations'\): expected a list of records, found dict"),
    (lambda d: _set(d["annotations"][0], "segmentation", {"counts": "!!garbage", "size": [9, 9]}),
     r"the segmentation of annotation 1000 in \S+instances_val2017.json is no mask: Invalid RLE"),
    (lambda d: _set(d["annotations"][0], "segmentation", _rle_taller(d["images"][0], 5)),
     r"the segmentation of annotation 1000 in \S+ is (\d+)x\d+, its image 000000000100.jpg \1x\d+"),
])
def test_coco_object_preparation_refuses_a_malformed_instances_file_in_one_line(tmp_path, edit, said):
    """Each field pycocotools and the masking read is checked before pycocotools sees the file (a bbox, polygon,
    size or name of the wrong type or shape stopped the preparation on an internal error)."""
    root = tmp_path / "coco"
    queries = write_coco(root)
    _edit_instances(root, edit)
    res = _prepare(root, queries)
    assert res.exit_code == 2 and "internal error" not in res.output, res.output
    assert re.search(said, res.output) and len(res.output.strip().splitlines()) == 1, res.output


@pytest.mark.parametrize("image, said", [
    (lambda size: Image.new("RGB", (size[0] + 1, size[1])), r"is \d+x\d+, the annotation file's image 100 \d+x\d+: "
                                                            r"is it COCO 2017's\?"),
    (lambda size: Image.new("CMYK", size), r"is CMYK: COCO 2017's images are RGB or greyscale"),
    (lambda size: Image.new("I;16", size), r"is I;16: COCO 2017's images are RGB or greyscale"),
])
def test_coco_object_preparation_refuses_an_image_the_annotations_do_not_describe(tmp_path, image, said):
    """An image of another size than the annotation file's (the mask could not cover it) or of a mode the masking
    does not make a JPEG of: one line naming the image, and no masked image written for it."""
    root = tmp_path / "coco"
    queries = write_coco(root)
    path = root / "val2017" / "000000000100.jpg"
    image(Image.open(path).size).save(path, format="TIFF")
    res = _prepare(root, queries)
    assert res.exit_code != 0 and "internal error" not in res.output, res.output
    assert re.search(said, res.output) and "000000000100.jpg" in res.output, res.output
    assert not (root / "val2017_masked" / "000000000100.jpg").exists()


@pytest.mark.parametrize("row, said", [
    ("000000000100.jpg,1;2;inf;4 ,person,dog", r"query_regions '1;2;inf;4 ' is not x1;y1;x2;y2"),
    ("000000000100.jpg,1;2;1e400;4 ,person,dog", r"query_regions '1;2;1e400;4 ' is not x1;y1;x2;y2"),
    ("000000000100.jpg,-1;2;3;4 ,person,dog", r"query_regions '-1;2;3;4 ' is not x1;y1;x2;y2 \(pixel coordinates\)"),
])
def test_coco_object_query_regions_are_pixel_coordinates(tmp_path, row, said):
    queries = tmp_path / "q.csv"
    queries.write_text("id,query_regions,query_class,classes\n" + row + "\n")
    with pytest.raises(AnnotationError, match=said):
        dataset("coco-object", tmp_path, queries=queries).load("val")


def test_coco_object_preparation_needs_images_named_by_their_coco_id(tmp_path):
    root = tmp_path / "coco"
    write_coco(root)
    queries = tmp_path / "q.csv"
    queries.write_text("id,query_regions,query_class,classes\nkitchen.jpg,1;2;3;4 ,person,dog\n")
    res = _prepare(root, queries)
    assert res.exit_code == 2 and "query image kitchen.jpg is not named by its COCO image id" in res.output


def test_coco_object_recall_matches_the_official_formula():
    from cirbench.datasets.coco_object.dataset import CocoObject

    (es,) = dataset("coco-object", "/nonexistent").load("val")
    gen = torch.Generator().manual_seed(1)
    n = len(es.queries)
    images = F.normalize(torch.randn(n, 32, generator=gen), dim=-1)
    refs = F.normalize(images + 1.2 * torch.randn(n, 32, generator=gen), dim=-1)
    idx, scores = rank(refs, images, 100)
    ours = CocoObject(None).per_query_metrics(es, Ranking([q.id for q in es.queries], es.gallery_ids, idx, scores))
    theirs = official_coco_recall(images, refs)
    for k, v in theirs.items():
        assert float(ours[f"R@{k}"].mean()) / 100 == pytest.approx(v, abs=1e-9)
    assert 0 < theirs[1] < theirs[100] < 1


def test_benchmark_prompts_reach_textual_inversion_methods():
    from cirbench.methods._shared.textinv import benchmark_prompt
    from cirbench.methods.pic2word.model import prompt as pic2word_prompt
    from cirbench.types import Query

    q = Query("0", "r", ("a toy of ",), prompt="a toy of *")
    assert pic2word_prompt(q, "imagenet-r") == "a toy of *"
    assert benchmark_prompt(q, "$") == "a toy of $"
    assert pic2word_prompt(Query("1", "r", ("is red",)), "cirr") == "a photo of * , is red"
    with pytest.raises(ValueError, match="no"):
        benchmark_prompt(Query("2", "r", ("x",), prompt="no image"), "$")


