"""PatternCom: the official evaluation (github.com/billpsomas/rscir, evaluate.py and utils.py, commit 1560858)
transcribed below as the oracle, run on a generated PatternNet folder laid out as the official README says."""

from __future__ import annotations

import csv
import json
import os
import re
from collections import defaultdict

import numpy as np
import pytest
import torch
from PIL import Image

from cirbench.backbones import load_backbone
from cirbench.encode import encode_images
from cirbench.errors import AnnotationError, CirbenchError
from cirbench.evaluate import RunConfig, evaluate
from cirbench.plugins import get_registry
from cirbench.types import ImageRef

# -- the official evaluation, transcribed (the main loop of evaluate.py for one attribute, after the features) ----
CLASS_MAPPING = {
    'denseresidential': 'residential', 'sparseresidential': 'residential', 'closedroad': 'road',
    'intersection': 'road', 'bridge': 'roadpass', 'overpass': 'roadpass', 'ferryterminal': 'pier',
    'harbor': 'pier', 'parkingspace': 'parking', 'parkinglot': 'parking'}


def apply_class_mapping(label, class_mapping):
    return class_mapping.get(label, label)


def fix_query_attributelabels(attribute, query_attributelabels):
    labels = query_attributelabels  # the official name, shortened for the line length
    if attribute == 'density':
        labels = [x.replace('densitydenseresidential', 'densityresidential') for x in labels]
        query_attributelabels = [x.replace('densitysparseresidential', 'densityresidential') for x in labels]
    elif attribute == 'shape':
        query_attributelabels = [x.replace('shapeclosedroad', 'shaperoad') for x in query_attributelabels]
        query_attributelabels = [x.replace('shapeintersection', 'shaperoad') for x in query_attributelabels]
    elif attribute == 'context':
        query_attributelabels = [x.replace('contextbridge', 'contextroadpass') for x in query_attributelabels]
        query_attributelabels = [x.replace('contextoverpass', 'contextroadpass') for x in query_attributelabels]
    elif attribute == 'existence':
        query_attributelabels = [x.replace('existenceferryterminal', 'existencepier') for x in query_attributelabels]
        query_attributelabels = [x.replace('existenceharbor', 'existencepier') for x in query_attributelabels]
        query_attributelabels = [x.replace('existenceparkingspace', 'existenceparking') for x in query_attributelabels]
        query_attributelabels = [x.replace('existenceparkinglot', 'existenceparking') for x in query_attributelabels]
    return query_attributelabels


def norm_cdf(matrix, dim=0):
    row_means = matrix.mean(dim=dim, keepdim=True)
    row_stds = matrix.std(dim=dim, keepdim=True)
    return 0.5 * (1 + torch.erf((matrix - row_means) / (row_stds * torch.sqrt(torch.tensor(2.0)))))


def read_csv(file_path):
    image_filenames, attributes, attribute_values = [], [], []
    with open(file_path, newline='') as csvfile:
        for row in csv.reader(csvfile):
            image_filenames.append(row[0])
            attributes.append(row[1])
            attribute_values.append(row[2])
    return image_filenames, attributes, attribute_values


def find_relative_indices(query_paths, paths):
    path_index_map = {os.path.basename(path): i for i, path in enumerate(paths)}
    return [path_index_map[q] for q in query_paths if q in path_index_map]


def create_prompts(paired):
    category_to_attributes = defaultdict(set)
    for category, attribute in paired:
        category_to_attributes[category].add(attribute)
    return [list(category_to_attributes[category] - {attribute}) for category, attribute in paired]


def metrics_calc(rankings, prompt, paths, filename_to_index_map, attribute_values, at, query_class, query_labels,
                 digits):
    metrics = {}
    retrieved_filenames = [os.path.basename(paths[idx]) for idx in rankings]
    retrieved_indices = [filename_to_index_map.get(filename, -1) for filename in retrieved_filenames]
    query_class_mapped = apply_class_mapping(query_class, CLASS_MAPPING)
    is_relevant = [attribute_values[idx] == prompt and apply_class_mapping(query_labels[idx], CLASS_MAPPING)
                   == query_class_mapped if idx != -1 else False for idx in retrieved_indices]
    precisions = []
    relevant_count = 0
    for k, rel in enumerate(is_relevant, start=1):
        if rel:
            relevant_count += 1
            precisions.append(relevant_count / k)
    ap = sum(precisions) / len(precisions) if precisions else 0
    rnd = (lambda x: round(x, digits)) if digits is not None else (lambda x: x)  # the official rounds to 2 digits
    metrics["AP"] = rnd(ap * 100)
    total_relevant = sum(is_relevant)
    for k in at:
        relevant_at_k = sum(is_relevant[:k])
        metrics[f"P@{k}"] = rnd(relevant_at_k / k * 100)
        metrics[f"R@{k}"] = rnd((relevant_at_k / total_relevant if total_relevant else 0) * 100)
    return metrics


def calculate_rankings(method, query_features, text_features, database_features, lam=0.5):
    sim_img = query_features @ database_features.t()
    sim_text = text_features @ database_features.t()
    if "norm" in method.lower():
        sim_img, sim_text = norm_cdf(sim_img), norm_cdf(sim_text)
    if method == "Image only":
        return torch.argsort(sim_img, descending=True)
    if method == "Text only":
        return torch.argsort(sim_text, descending=True)
    if method == "Average Similarities":
        return torch.argsort((sim_img + sim_text) / 2, descending=True)
    return torch.argsort((1 - lam) * sim_img + lam * sim_text, descending=True)  # Weighted Similarities Norm


def official_attribute(method, features, paths, csv_path, attribute, encode_text, lam=0.5, digits=None):
    at = [5, 10, 15, 20]
    final = {f"R@{k}": [] for k in at} | {f"P@{k}": [] for k in at} | {"AP": []}
    query_filenames, attributes, attribute_values = read_csv(csv_path)
    query_labels = [re.split(r'\d', path)[0] for path in query_filenames]
    query_attributelabels = [x + query_labels[ii] for ii, x in enumerate(attributes)]
    query_attributelabels = fix_query_attributelabels(attribute, query_attributelabels)
    prompts = create_prompts(list(zip(query_attributelabels, attribute_values, strict=True)))
    relative_indices = find_relative_indices(query_filenames, paths)
    filename_to_index_map = {filename: i for i, filename in enumerate(query_filenames)}
    for i, idx in enumerate(relative_indices):
        for prompt in prompts[i]:
            text_feature = encode_text(prompt)
            rankings = calculate_rankings(method, features[idx], text_feature, features, lam)
            temp = metrics_calc(rankings, prompt, paths, filename_to_index_map, attribute_values, at,
                                query_labels[i], query_labels, digits)
            for key in final:
                final[key].append(temp[key])
    return {k: sum(v) / len(v) for k, v in final.items()}


# -- a generated PatternNet folder -------------------------------------------------------------------------------
CLASSES = {  # file-name class: PatternNet's class name (patternnet.csv's third column)
    "tenniscourt": "tennis_court", "harbor": "harbor", "ferryterminal": "ferry_terminal",
    "denseresidential": "dense_residential", "sparseresidential": "sparse_residential", "bridge": "bridge",
    "overpass": "overpass", "storagetank": "storage_tank", "swimmingpool": "swimming_pool",
    "parkinglot": "parking_lot", "parkingspace": "parking_space", "airplane": "airplane"}
ANNOTATIONS = {  # attribute: (image, value) rows; an image named twice keeps its last value as a positive
    "color": [("tenniscourt001.jpg", "green"), ("tenniscourt002.jpg", "green"), ("tenniscourt003.jpg", "blue"),
              ("tenniscourt004.jpg", "blue"), ("tenniscourt005.jpg", "red"), ("tenniscourt001.jpg", "blue"),
              # colour keeps harbours and ferry terminals in groups of their own; their positives merge (pier)
              ("harbor001.jpg", "blue"), ("harbor002.jpg", "white"), ("ferryterminal001.jpg", "white"),
              ("ferryterminal002.jpg", "gray")],
    "context": [("bridge001.jpg", "water"), ("bridge002.jpg", "water"), ("overpass001.jpg", "concrete"),
                ("overpass002.jpg", "concrete")],
    "density": [("denseresidential001.jpg", "dense"), ("denseresidential002.jpg", "dense"),
                ("sparseresidential001.jpg", "sparse"), ("sparseresidential002.jpg", "sparse"),
                ("parkinglot001.jpg", "full"), ("parkinglot002.jpg", "empty"), ("parkingspace001.jpg", "empty")],
    "existence": [("harbor001.jpg", "full"), ("ferryterminal001.jpg", "empty"), ("parkinglot001.jpg", "full"),
                  ("parkingspace001.jpg", "empty"), ("parkingspace002.jpg", "full")],
    "quantity": [("storagetank001.jpg", "one"), ("storagetank002.jpg", "two"), ("storagetank003.jpg", "three"),
                 ("storagetank004.jpg", "two"), ("swimmingpool001.jpg", "one")],
    "shape": [("swimmingpool001.jpg", "round"), ("swimmingpool002.jpg", "rectangular"),
              ("swimmingpool003.jpg", "kidney-shaped"), ("swimmingpool004.jpg", "round")],
}
PER_CLASS = 5


def write_patternnet(root):
    rng = np.random.default_rng(0)
    lines = []
    for n, (prefix, label) in enumerate(CLASSES.items()):
        (root / "images" / label).mkdir(parents=True)
        for i in range(1, PER_CLASS + 1):
            path = f"images/{label}/{prefix}{i:03d}.jpg"
            pixels = rng.integers(0, 255, (16 + n % 4, 16 + i % 3, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / path)
            lines.append(f"{path} {n} {label}")
    (root / "patternnet.csv").write_text("\n".join(lines) + "\n")
    (root / "PatternCom").mkdir()
    for attribute, rows in ANNOTATIONS.items():
        (root / "PatternCom" / f"{attribute}.csv").write_text("".join(f"{name},{attribute},{value}\n"
                                                                      for name, value in rows))
    return root


def _dataset(root, **options):
    return get_registry().dataset("patterncom").create(root, options)


def _cfg(tmp_path, tiny_config, root, method, **kw):
    return RunConfig(method=method, dataset="patterncom", split="test", backbone=str(tiny_config),
                     pretrained="none", data_root=root, output=tmp_path / "results", cache_dir=tmp_path / "cache",
                     workers=0, progress=False, bootstrap=0, **kw)


def test_the_files_become_one_set_per_attribute(tmp_path):
    root = write_patternnet(tmp_path / "PatternNet")
    sets = _dataset(root).load("test")
    assert [s.name for s in sets] == ["color", "context", "density", "existence", "quantity", "shape"]
    color = sets[0]
    assert len(color.gallery) == PER_CLASS * len(CLASSES) and color.topk == len(color.gallery)
    assert not color.exclude_reference  # the query image stays in its ranking, as officially
    assert color.images["tenniscourt001.jpg"].path == root / "images/tennis_court/tenniscourt001.jpg"
    by_id = {q.id: q for q in color.queries}
    # every row queries the other values of its group: the tennis courts' group has green, blue and red
    assert sorted(q.texts[0] for q in color.queries if q.id.startswith("0:")) == ["blue", "red"]
    # tenniscourt001 is named twice: its last value (blue) makes it a positive of blue, never of green
    assert by_id["4:green"].targets == ("tenniscourt002.jpg",)
    assert set(by_id["4:blue"].targets) == {"tenniscourt001.jpg", "tenniscourt003.jpg", "tenniscourt004.jpg"}
    # harbours and ferry terminals: groups apart (a harbour asks for white only), positives merged (pier)
    assert [q.texts for q in color.queries if q.reference == "harbor001.jpg"] == [("white",)]
    assert set(by_id["6:white"].targets) == {"harbor002.jpg", "ferryterminal001.jpg"}
    assert "8:gray" in by_id and "8:blue" not in by_id
    density = sets[2]
    # density merges dense and sparse residential into one group: each asks for the other's value
    assert set(next(q for q in density.queries if q.id == "0:sparse").targets) == {
        "sparseresidential001.jpg", "sparseresidential002.jpg"}
    # ... but not the parking lots and spaces (their groups stay apart; positives merge)
    assert [q.id for q in density.queries if q.reference == "parkingspace001.jpg"] == []
    assert set(next(q for q in density.queries if q.id == "4:empty").targets) == {
        "parkinglot002.jpg", "parkingspace001.jpg"}
    quantity = sets[4]
    assert quantity.info["annotated_without_other_value"] == 1  # the one swimming pool
    assert [s.name for s in _dataset(root, attribute="shape,color").load("test")] == ["shape", "color"]


@pytest.mark.parametrize(("method", "official", "lam"), [
    ("image-only", "Image only", None), ("text-only", "Text only", None),
    ("image-text-sum", "Average Similarities", None), ("weicom", "Weighted Similarities Norm", 0.5),
    ("weicom", "Weighted Similarities Norm", 0.3)])
def test_a_run_scores_as_the_official_evaluation(tmp_path, tiny_config, method, official, lam):
    """Each attribute's mAP, P@K and R@K, and their mean over the attributes, equal the official evaluation of
    the same features; the official rounds each query's values to two digits first (within 0.005 of ours)."""
    root = write_patternnet(tmp_path / "PatternNet")
    options = {"lam": lam} if lam is not None else {}
    (out,) = evaluate(_cfg(tmp_path, tiny_config, root, method, method_options=options))
    bb = load_backbone(str(tiny_config), "none", device="cpu", precision="fp32")
    paths = [line.split(" ")[0] for line in (root / "patternnet.csv").read_text().splitlines()]
    with torch.no_grad():
        feats = encode_images([ImageRef(os.path.basename(p), root / p, root=root) for p in paths], bb.encode_image,
                              bb.preprocessor(out.record["preprocess"]["kind"]), workers=0, progress=False).float()
        feats = torch.nn.functional.normalize(feats, dim=-1)

        def encode_text(prompt):
            return torch.nn.functional.normalize(bb.encode_text([prompt]).float(), dim=-1)[0]

        expected = {}
        for attribute in ANNOTATIONS:
            args = (official, feats, paths, root / "PatternCom" / f"{attribute}.csv", attribute, encode_text,
                    lam or 0.5)
            exact, rounded = official_attribute(*args), official_attribute(*args, digits=2)
            for metric, value in exact.items():
                name = f"{attribute}/{'mAP' if metric == 'AP' else metric}"
                expected[name] = value
                assert abs(rounded[metric] - value) <= 0.005 + 1e-9
    for metric in ("mAP", "R@5", "R@20", "P@5", "P@10", "P@15"):
        expected[f"avg/{metric}"] = np.mean([expected[f"{a}/{metric}"] for a in ANNOTATIONS])
    assert {k: out.metrics[k] for k in expected} == pytest.approx(expected, abs=1e-9)
    assert len(out.record["per_set_metrics"]) == 6


def test_rankings_made_elsewhere_are_scored_compared_and_shown_beside_the_papers(tmp_path, tiny_config):
    """`cirbench score` on a run's whole rankings gives its numbers (AP reads every positive: a ranking cut short
    is refused); the leaderboard puts each attribute's mAP beside the published tables, the R@K and P@K kept as
    detail."""
    from click.testing import CliRunner

    from cirbench.cli import cli

    root = write_patternnet(tmp_path / "PatternNet")
    (out,) = evaluate(_cfg(tmp_path, tiny_config, root, "weicom", save_topk=None))
    base = ["score", "-d", "patterncom", "-s", "test", "--data-root", str(root)]
    res = CliRunner().invoke(cli, [*base, str(out.predictions_path), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == pytest.approx(out.metrics, abs=1e-9)
    rows = [json.loads(line) for line in out.predictions_path.read_text().splitlines()]
    short = tmp_path / "short.predictions.jsonl"
    short.write_text("".join(json.dumps(dict(r, top=r["top"][:50])) + "\n" for r in rows))
    res = CliRunner().invoke(cli, [*base, str(short)])
    assert res.exit_code == 2 and f"at least {PER_CLASS * len(CLASSES)} are needed (`cirbench run` keeps each " \
        "query's top 50 in its predictions: run it with --save-top all)" in res.output
    # compare: each attribute's mAP and the split's combined numbers (avg/, the queries resampled within their
    # attribute); the attributes' R@K and P@K only with --all-metrics, as in the leaderboard
    (other,) = evaluate(_cfg(tmp_path, tiny_config, root, "image-only"))
    res = CliRunner().invoke(cli, ["compare", str(out.result_path), str(other.result_path), "--json",
                                   "--replicates", "500"])
    assert res.exit_code == 0, res.output
    compared = json.loads(res.output)["comparisons"]
    assert "color/mAP" in compared and "color/R@5" not in compared and "avg/P@20" in compared
    for name in ("avg/mAP", "avg/R@10", "shape/mAP"):
        r = compared[name]
        assert r["difference"] == pytest.approx(out.metrics[name] - other.metrics[name], abs=1e-4)  # rounded rows
        assert r["low"] <= r["difference"] <= r["high"] and 0 < r["p_value"] <= 1
    assert compared["avg/mAP"]["queries"] == len(rows)
    full = CliRunner().invoke(cli, ["compare", str(out.result_path), str(other.result_path), "--json",
                                    "--replicates", "200", "--all-metrics"])
    assert "color/R@5" in json.loads(full.output)["comparisons"]
    itself = CliRunner().invoke(cli, ["compare", str(out.result_path), str(out.result_path), "--json",
                                      "--replicates", "200"])
    assert json.loads(itself.output)["comparisons"]["avg/mAP"]["p_value"] == 1.0
    res = CliRunner().invoke(cli, ["leaderboard", str(tmp_path / "results"), "--dataset", "patterncom"])
    assert res.exit_code == 0, res.output
    header = next(line for line in res.output.splitlines() if line.startswith("|") and "avg/mAP" in line)
    assert "color/mAP" in header and "shape/mAP" in header and "color/R@5" not in header
    assert "weicom@lam=0.3 · ViT-L/14 [paper]" in res.output and "ViT-L/14 (RemoteCLIP)" in res.output


def test_bad_files_and_options_are_one_line_errors(tmp_path):
    root = write_patternnet(tmp_path / "PatternNet")
    with pytest.raises(CirbenchError, match="--attribute: patterncom has no attribute 'colour'; valid: color, "):
        _dataset(root, attribute="colour").load("test")
    (root / "PatternCom" / "shape.csv").write_text("swimmingpool001.jpg,shape,round\nswimmingpool009.jpg,shape,oval\n")
    with pytest.raises(AnnotationError, match=r"shape.csv, line 2: image swimmingpool009.jpg is not in patternnet"):
        _dataset(root, attribute="shape").load("test")
    (root / "PatternCom" / "shape.csv").write_text("image,attribute,value\nswimmingpool001.jpg,shape,round\n")
    with pytest.raises(AnnotationError, match=r"line 1: image image is not in patternnet.csv \(a header row\?"):
        _dataset(root, attribute="shape").load("test")
    (root / "PatternCom" / "shape.csv").write_text("swimmingpool001.jpg,shape,round\nswimmingpool002.jpg,shape\n")
    with pytest.raises(AnnotationError, match="shape.csv, line 2: expected 'image,attribute,value'"):
        _dataset(root, attribute="shape").load("test")
    (root / "PatternCom" / "shape.csv").write_text("swimmingpool001.jpg,shape,round\nswimmingpool002.jpg,shape,round\n")
    with pytest.raises(AnnotationError, match="no image has a value of its attribute to be changed to"):
        _dataset(root, attribute="shape").load("test")
    (root / "PatternCom" / "shape.csv").unlink()
    with pytest.raises(AnnotationError, match=r"shape.csv is missing \(PatternCom's files go in PatternNet/Pattern"):
        _dataset(root, attribute="shape").load("test")
    listing = root / "patternnet.csv"
    lines = listing.read_text().splitlines()
    listing.write_text("\n".join(["", *lines, "", lines[0].replace("images/tennis_court", "images/other")]) + "\n")
    twice = rf"names image tenniscourt001.jpg twice \(lines 2 and {len(lines) + 3}\): images are matched by file name"
    with pytest.raises(AnnotationError, match=twice):
        _dataset(root, attribute="color").load("test")
    listing.write_text("images/tennis_court/tenniscourt001.jpg\n")
    with pytest.raises(AnnotationError, match=r"patternnet.csv, line 1: expected '<path> <n> <class> \.\.\.'"):
        _dataset(root, attribute="color").load("test")


def test_precision_and_recall_of_queries_with_one_positive_or_none():
    """Recall@K divides by the query's own positives (one here: found or not), and is 0 for a query without any;
    Precision@K divides by K."""
    from cirbench.datasets.patterncom.dataset import PatternCom
    from cirbench.retrieval import Ranking
    from cirbench.types import EvalSet, Query

    ids = [f"g{i}" for i in range(25)]
    queries = [Query("one", "r", ("x",), ("g3",)), Query("late", "r", ("x",), ("g12",)),
               Query("none", "r", ("x",), ()), Query("three", "r", ("x",), ("g0", "g6", "g24"))]
    es = EvalSet("color", [ImageRef(i, None) for i in ids], queries, {})
    order = torch.arange(25).repeat(4, 1)
    got = PatternCom(None).per_query_metrics(es, Ranking([q.id for q in queries], ids, order, -order.double()))
    assert got["R@5"].tolist() == [100.0, 0.0, 0.0, pytest.approx(100 / 3)]
    assert got["R@15"].tolist() == [100.0, 100.0, 0.0, pytest.approx(200 / 3)]
    assert got["P@5"].tolist() == [20.0, 0.0, 0.0, 20.0] and got["P@20"].tolist() == [5.0, 5.0, 0.0, 10.0]
    assert got["mAP"].tolist() == pytest.approx([25.0, 100 / 13, 0.0, (1 + 2 / 7 + 3 / 25) / 3 * 100])


def test_attribute_rows_need_an_image_and_a_value_not_an_attribute_column(tmp_path):
    """The official reader indexes the image (column 0) and the value (column 2): an empty middle column is a row
    like any other, an empty image or value is refused with its line, and a row of empty cells is skipped."""
    root = write_patternnet(tmp_path / "PatternNet")
    shape = root / "PatternCom" / "shape.csv"
    shape.write_text("swimmingpool001.jpg,,round\n,,\nswimmingpool002.jpg,,oval\n")
    (es,) = _dataset(root, attribute="shape").load("test")
    assert {q.reference for q in es.queries} == {"swimmingpool001.jpg", "swimmingpool002.jpg"}
    for bad in (",shape,round", "swimmingpool003.jpg,shape, "):
        shape.write_text(f"swimmingpool001.jpg,shape,round\n\n{bad}\n")
        with pytest.raises(AnnotationError, match="shape.csv, line 3: expected 'image,attribute,value'"):
            _dataset(root, attribute="shape").load("test")
