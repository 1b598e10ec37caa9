"""MA-CIR: the official meta files, Recall@1 by composition type (and condition) on the whole gallery, and the
restricted level among a reference's edits, as the official ``macir_compute_test_metrics`` computes them
(github.com/jaeseokbyun/MACIR, eval.py; transcribed below as the oracle)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cirbench.backbones import load_backbone
from cirbench.encode import encode_images
from cirbench.errors import AnnotationError
from cirbench.evaluate import RunConfig, evaluate
from cirbench.plugins import get_registry

UNIQUE_COMPOSITION_TYPES = ['left_right', 'top_bottom', 'spatial_reasoning', 'size', 'action', 'color',
                            'object_reasoning', 'naive_object']
UNIQUE_CONDITION_TYPES = ['remove', 'replace', 'add']


# -- the official evaluation, transcribed (eval.py, macir_compute_test_metrics, after the features) -------------
def official_metrics(predicted_features, index_features, index_names, reference_names, target_names,
                     composition_types, condition_types, eval_level, split):
    index_features = torch.nn.functional.normalize(index_features, dim=-1).float()
    predicted_features = predicted_features.float()
    distances = 1 - predicted_features @ index_features.T
    sorted_indices = torch.argsort(distances, dim=-1).cpu()
    sorted_index_names_matrix = np.array(index_names)[sorted_indices]
    reference_prefixes = [ref.split("_edit_")[0] if "_edit_" in ref else ref.split(".")[0]
                          for ref in reference_names]
    reference_mask = torch.tensor(sorted_index_names_matrix != np.repeat(
        np.array(reference_names), len(index_names)).reshape(len(target_names), -1))
    sorted_index_names_matrix = sorted_index_names_matrix[reference_mask].reshape(
        sorted_index_names_matrix.shape[0], sorted_index_names_matrix.shape[1] - 1)
    metrics = {}
    if eval_level == "full":
        for comp_type in UNIQUE_COMPOSITION_TYPES:
            type_indices = [i for i, ct in enumerate(composition_types) if ct == comp_type]
            if not type_indices:
                continue
            filtered = sorted_index_names_matrix[type_indices]
            filtered_target_names = [target_names[i] for i in type_indices]
            labels = torch.tensor(filtered == np.repeat(np.array(filtered_target_names), len(index_names) - 1)
                                  .reshape(len(filtered_target_names), -1))
            assert torch.equal(torch.sum(labels, dim=-1).int(), torch.ones(len(filtered_target_names)).int())
            metrics[f"{comp_type}"] = {"recall_at1": (torch.sum(labels[:, :1]) / len(labels)).item() * 100.0}
        return metrics
    if eval_level == "full_splits":
        for comp_type in UNIQUE_COMPOSITION_TYPES:
            for cond_type in UNIQUE_CONDITION_TYPES:
                type_indices = [i for i, (ct, cd) in enumerate(zip(composition_types, condition_types, strict=True))
                                if ct == comp_type and cd == cond_type]
                if not type_indices:
                    metrics[f"{comp_type}_{cond_type}"] = {"recall_at1": 0.0}
                    continue
                filtered = sorted_index_names_matrix[type_indices]
                filtered_target_names = [target_names[i] for i in type_indices]
                labels = torch.tensor(filtered == np.repeat(np.array(filtered_target_names), len(index_names) - 1)
                                      .reshape(len(filtered_target_names), -1))
                metrics[f"{comp_type}_{cond_type}"] = {
                    "recall_at1": (torch.sum(labels[:, :1]) / len(labels)).item() * 100.0}
        return metrics
    cond_type = split
    reference_mask_split = torch.tensor([[name.startswith(prefix) for name in row] for row, prefix in
                                         zip(sorted_index_names_matrix, reference_prefixes, strict=True)],
                                        dtype=torch.bool)
    filtered_rows = [np.array(row)[mask].tolist() for row, mask in zip(sorted_index_names_matrix,
                                                                       reference_mask_split, strict=True)]
    for comp_type in UNIQUE_COMPOSITION_TYPES:
        type_indices = [i for i, ct in enumerate(composition_types) if ct == comp_type]
        if not type_indices:
            continue
        cur_rows = [filtered_rows[i] for i in type_indices]
        cur_targets = [target_names[i] for i in type_indices]
        rows_targets = [(row, tgt) for row, tgt in zip(cur_rows, cur_targets, strict=True) if len(row) > 1]
        if not rows_targets:
            continue
        cur_rows, cur_targets = zip(*rows_targets, strict=True)
        labels = [[int(name == target) for name in row] for row, target in zip(cur_rows, cur_targets, strict=True)]
        metrics[f"{comp_type}_{cond_type}"] = {"recall_at1": sum(1 for row in labels if row[0] == 1)
                                               / len(labels) * 100.0}
    return metrics


# -- a generated MA-CIR folder ----------------------------------------------------------------------------------
SOURCES = {"img_1": 3, "img_10": 1, "img_2": 2, "img_3": 1}  # source: its edits (img_1's prefix also keeps img_10)
DISTRACTORS = 5
TRIPLETS = [  # reference, target, caption, composition type, condition
    ("img_1.jpg", "img_1_edit_0.jpg", "remove the cat on the left", "left_right", "remove"),
    ("img_1.jpg", "img_1_edit_1.jpg", "replace the dog with a horse", "object_reasoning", "replace"),
    ("img_1_edit_0.jpg", "img_1_edit_2.jpg", "add a red ball", "color", "add"),
    ("img_10.jpg", "img_10_edit_0.jpg", "remove the top lamp", "top_bottom", "remove"),
    ("img_2.jpg", "img_2_edit_0.jpg", "remove the smaller box", "size", "remove"),
    ("img_2_edit_0.jpg", "img_2_edit_1.jpg", "replace the runner with a walker", "action", "replace"),
    ("img_2.jpg", "img_2_edit_1.jpg", "add a person behind the car", "spatial_reasoning", "add"),
    ("img_3.jpg", "img_3_edit_0.jpg", "remove the tree", "naive_object", "remove"),
    ("img_3.jpg", "img_3_edit_0.jpg", "replace the blue sky", "color", "replace"),
    ("img_2.jpg", "other_1.jpg", "remove the cup on the right", "left_right", "remove"),
]


def write_macir(root):
    """Images in ``images/``, the full meta file and gallery, and the restricted files of each condition (its
    triplets, and the gallery less one distractor)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "meta_data").mkdir()
    names = []
    for source, edits in SOURCES.items():
        names += [f"{source}.jpg", *(f"{source}_edit_{i}.jpg" for i in range(edits))]
    names += [f"other_{i}.jpg" for i in range(DISTRACTORS)]
    for k, name in enumerate(names):
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        Image.new("RGB", (20 + k % 5, 18 + k % 3), colour).save(root / "images" / name)
    records = [{"reference_image": r, "target_image": t, "relative_caption": c, "composition_type": ct,
                "condition_type": cd} for r, t, c, ct, cd in TRIPLETS]
    (root / "meta_data" / "macir_meta_full.json").write_text(json.dumps(records))
    (root / "meta_data" / "image_ids.json").write_text(json.dumps(names))
    for condition in ("add", "remove", "replace"):
        (root / "meta_data" / f"macir_meta_{condition}.json").write_text(
            json.dumps([r for r in records if r["condition_type"] == condition]))
        (root / "meta_data" / f"image_ids_{condition}.json").write_text(json.dumps(names[:-1]))
    return root


def _dataset(root):
    return get_registry().dataset("macir").create(root, {})


def test_the_files_become_one_set_per_split(tmp_path):
    root = write_macir(tmp_path / "macir")
    (es,) = _dataset(root).load("full")
    assert es.exclude_reference and not es.query_galleries and len(es.queries) == len(TRIPLETS)
    assert len(es.gallery) == sum(1 + e for e in SOURCES.values()) + DISTRACTORS
    first = es.queries[0]
    assert first.texts == ("remove the cat on the left",) and first.targets == ("img_1_edit_0.jpg",)
    assert first.prompt == "a photo of * that remove the cat on the left" and first.category == "left_right"
    assert es.images[first.reference].path == root / "images" / "img_1.jpg"
    (remove,) = _dataset(root).load("remove")
    assert remove.query_galleries and not remove.exclude_reference
    by_ref = {q.reference: q.candidates for q in remove.queries}
    # img_1's prefix keeps img_10's images too, as the official prefix test does
    assert by_ref["img_1.jpg"] == ("img_1_edit_0.jpg", "img_1_edit_1.jpg", "img_1_edit_2.jpg", "img_10.jpg",
                                   "img_10_edit_0.jpg")
    # img_3 and img_10 have one edit each: their queries are not counted (fewer than two images to rank)
    assert set(by_ref) == {"img_1.jpg", "img_2.jpg"} and len(remove.queries) == 3
    assert remove.info == {"queries_with_fewer_than_two_candidates": 2}


@pytest.mark.parametrize("split", ["full", "remove", "replace"])
def test_a_run_scores_as_the_official_evaluation(tmp_path, tiny_config, split):
    """image-only on a generated MA-CIR: Recall@1 by composition type (and, on full, by type and condition)
    equals the official evaluation of the same features."""
    root = write_macir(tmp_path / "macir")
    cfg = RunConfig(method="image-only", dataset="macir", split=split, backbone=str(tiny_config),
                    pretrained="none", data_root=root, output=tmp_path / "results", cache_dir=tmp_path / "cache",
                    workers=0, progress=False, bootstrap=0)
    (out,) = evaluate(cfg)
    bb = load_backbone(str(tiny_config), "none", device="cpu", precision="fp32")
    meta = json.loads((root / "meta_data" / ("macir_meta_full.json" if split == "full" else
                                             f"macir_meta_{split}.json")).read_text())
    names = json.loads((root / "meta_data" / ("image_ids.json" if split == "full" else
                                              f"image_ids_{split}.json")).read_text())
    (es,) = _dataset(root).load(split)
    with torch.no_grad():
        feats = encode_images([es.images[n] for n in names], bb.encode_image,
                              bb.preprocessor(out.record["preprocess"]["kind"]), workers=0, progress=False).float()
    position = {n: i for i, n in enumerate(names)}
    predicted = feats[[position[m["reference_image"]] for m in meta]]
    args = (predicted, feats, names, [m["reference_image"] for m in meta], [m["target_image"] for m in meta],
            [m["composition_type"] for m in meta], [m["condition_type"] for m in meta])
    if split == "full":
        expected = {f"R@1/{k}": v["recall_at1"] for k, v in official_metrics(*args, "full", split).items()}
        splits = official_metrics(*args, "full_splits", split)
        expected.update({f"by-condition/{k}": v["recall_at1"] for k, v in splits.items()
                         if any((m["composition_type"], m["condition_type"]) == tuple(k.rsplit("_", 1))
                                for m in meta)})  # the official 0.0 for a pair no query has is not reported
    else:
        expected = {f"R@1/{k.removesuffix('_' + split)}": v["recall_at1"]
                    for k, v in official_metrics(*args, "restricted", split).items()}
    got = {k: v for k, v in out.metrics.items() if k != "R@1"}
    assert got == pytest.approx(expected, abs=1e-9)
    assert out.metrics["R@1"] == pytest.approx(np.mean([r["metrics"]["R@1"] for r in map(
        json.loads, out.predictions_path.read_text().splitlines())]))
    assert list(got)[: len([k for k in got if k.startswith("R@1/")])] == [
        f"R@1/{t}" for t in UNIQUE_COMPOSITION_TYPES if f"R@1/{t}" in got]  # the official order


def test_rankings_made_elsewhere_are_scored_as_the_run(tmp_path, tiny_config):
    """`cirbench score` on a run's own predictions gives its numbers; a ranking holding the reference, or an image
    of another source on a restricted split, is a one-line error."""
    from click.testing import CliRunner

    from cirbench.cli import cli

    root = write_macir(tmp_path / "macir")
    for split in ("full", "add"):
        cfg = RunConfig(method="image-only", dataset="macir", split=split, backbone=str(tiny_config),
                        pretrained="none", data_root=root, output=tmp_path / "results",
                        cache_dir=tmp_path / "cache", workers=0, progress=False, bootstrap=0)
        (out,) = evaluate(cfg)
        res = CliRunner().invoke(cli, ["score", "--dataset", "macir", "--split", split, "--data-root", str(root),
                                       str(out.predictions_path), "--json"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.output) == pytest.approx(out.metrics)
        rows = [json.loads(line) for line in out.predictions_path.read_text().splitlines()]
        bad = tmp_path / f"{split}.predictions.jsonl"
        first = rows[0]
        wrong = [first["reference"], *first["top"]] if split == "full" else ["other_0.jpg", *first["top"]]
        bad.write_text("".join(json.dumps(dict(r, top=wrong) if r is first else r) + "\n" for r in rows))
        res = CliRunner().invoke(cli, ["score", "--dataset", "macir", "--split", split, "--data-root", str(root),
                                       str(bad)])
        assert res.exit_code == 2, res.output
        assert ("contains the reference image" if split == "full" else "is not an image of the query's source") \
            in res.output


@pytest.mark.parametrize("edit, message", [
    (lambda m, ids: (m[:1] + [{k: v for k, v in m[1].items() if k != "relative_caption"}], ids),
     "record 1.*relative_caption"),
    (lambda m, ids: (m, ids + ids[:1]), "image 'img_1.jpg' is listed twice"),
    (lambda m, ids: (m, [n for n in ids if n != "img_2.jpg"]), "record 4: reference image 'img_2.jpg' is not in"),
    (lambda m, ids: ([dict(m[0], target_image="img_1.jpg")] + m[1:], ids),
     "record 0: target image 'img_1.jpg' is not a gallery image other than the reference"),
    (lambda m, ids: (m, {"images": ids}), "expected a list of image names"),
])
def test_malformed_files_are_one_line_errors(tmp_path, edit, message):
    root = write_macir(tmp_path / "macir")
    meta_path, ids_path = root / "meta_data" / "macir_meta_full.json", root / "meta_data" / "image_ids.json"
    meta, ids = edit(json.loads(meta_path.read_text()), json.loads(ids_path.read_text()))
    meta_path.write_text(json.dumps(meta))
    ids_path.write_text(json.dumps(ids))
    with pytest.raises(AnnotationError, match=message):
        _dataset(root).load("full")


def test_missing_files_say_where_they_were_looked_for(tmp_path):
    root = write_macir(tmp_path / "macir")
    (root / "meta_data" / "macir_meta_replace.json").unlink()
    with pytest.raises(AnnotationError, match=r"macir_meta_replace.json is missing .*is --data-root .* right"):
        _dataset(root).load("replace")


def test_names_of_a_source_are_found_to_the_end_of_the_sorted_list():
    """The bisection stops at the list's end (a source whose images sort last) and at the first other name."""
    from cirbench.datasets.macir.dataset import starting_with

    ordered = sorted(["img_1.jpg", "img_10_edit_0.jpg", "img_2.jpg", "img_2_edit_0.jpg", "img_2_edit_1.jpg"])
    assert starting_with(ordered, "img_2") == ["img_2.jpg", "img_2_edit_0.jpg", "img_2_edit_1.jpg"]
    assert starting_with(ordered, "img_1") == ["img_1.jpg", "img_10_edit_0.jpg"]
    assert starting_with(ordered, "img_3") == [] and starting_with([], "img_1") == []


def test_conditions_print_in_the_official_order_then_any_other_by_name():
    from cirbench.datasets.macir import CONDITIONS
    from cirbench.datasets.macir.dataset import _condition_order

    shuffled = ["zeta", *reversed(CONDITIONS), "alpha"]
    assert sorted(shuffled, key=_condition_order) == [*CONDITIONS, "alpha", "zeta"]
