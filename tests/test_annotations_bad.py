"""Malformed annotations are one-line errors naming file, record and field; never internal errors, never
silently scored. Includes property-based tests over records and ranking files (hypothesis)."""

from __future__ import annotations

import json

import pytest
from annotations import ANNOTATIONS, copy_tree, needs_annotations
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cirbench.cli import cli
from cirbench.errors import AnnotationError, CirbenchError
from cirbench.plugins import get_registry

pytestmark = needs_annotations


def _load(name, root, split, **opts):
    spec = get_registry().dataset(name)
    options = {o.name: o.default for o in spec.options}
    options.update(opts)
    return spec.create(root, options).load(split)


@pytest.fixture(scope="module")
def cirr_val_records():
    return json.loads((ANNOTATIONS / "cirr" / "captions" / "cap.rc2.val.json").read_text())


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r[3].__setitem__("reference", 123), "record 3 (pairid"),
    (lambda r: r[3].__setitem__("reference", 123), "field 'reference'"),
    (lambda r: r[5].__setitem__("target_hard", None), "field 'target_hard' is missing or null"),
    (lambda r: r[7]["img_set"].__setitem__("members", ["a", 5]), "field 'img_set.members.1'"),
    (lambda r: r[7]["img_set"].__setitem__("members", ["../../etc/passwd"]), "is not an image name"),
    (lambda r: r[9].__setitem__("pairid", r[8]["pairid"]), "duplicate pairid"),
    (lambda r: r[2].__setitem__("caption", ["not", "text"]), "field 'caption'"),
    (lambda r: r[2].__setitem__("pairid", "12"), "field 'pairid'"),
    (lambda r: r[2].pop("pairid"), "record 2: field 'pairid': Field required"),  # no id to name the record by
    (lambda r: r.__setitem__(4, "just a string"), "record 4: not an object"),
    # names that are valid but not in the split file: the target and the img_set, not only the reference
    (lambda r: r[6].__setitem__("target_hard", "dev-0-0-img9"), "image 'dev-0-0-img9' is not in split.rc2.val.json"),
    (lambda r: r[6]["img_set"]["members"].append("dev-0-0-img9"), "record 6 (pairid"),
])
def test_cirr_bad_records(tmp_path, cirr_val_records, mutate, message):
    root = copy_tree(ANNOTATIONS / "cirr", tmp_path / "cirr")
    records = json.loads(json.dumps(cirr_val_records))
    mutate(records)
    (root / "captions" / "cap.rc2.val.json").write_text(json.dumps(records))
    with pytest.raises(AnnotationError, match=message.replace("(", r"\(").replace(".", r"\.")) as err:
        _load("cirr", root, "val")
    assert "cap.rc2.val.json" in str(err.value) and "\n" not in str(err.value)


def test_circo_bad_records(tmp_path):
    root = copy_tree(ANNOTATIONS / "circo", tmp_path / "circo")
    (root / "COCO2017_unlabeled" / "unlabeled2017").mkdir(parents=True)
    path = root / "annotations" / "val.json"
    good = json.loads(path.read_text())
    cases = [
        (lambda r: r[10].__setitem__("gt_img_ids", []), "field 'gt_img_ids'"),
        (lambda r: r[10].__setitem__("gt_img_ids", ["12"]), "field 'gt_img_ids.0'"),
        (lambda r: r[11].__setitem__("target_img_id", None), "field 'target_img_id' is missing or null"),
        (lambda r: r[12].__setitem__("id", 13), "duplicate id"),
        (lambda r: r.reverse(), "ids index the list"),
        (lambda r: r[0].__setitem__("reference_img_id", 1.5), "field 'reference_img_id'"),
    ]
    for mutate, message in cases:
        records = json.loads(json.dumps(good))
        mutate(records)
        path.write_text(json.dumps(records))
        with pytest.raises(AnnotationError, match=message):
            _load("circo", root, "val")


def test_fashioniq_bad_records(tmp_path):
    root = copy_tree(ANNOTATIONS / "fashioniq", tmp_path / "fiq")
    path = root / "captions" / "cap.dress.val.json"
    good = json.loads(path.read_text())
    for mutate, message in [
        (lambda r: r[0].__setitem__("captions", ["only one"]), "field 'captions'"),
        (lambda r: r[1].__setitem__("candidate", None), "field 'candidate'"),
        (lambda r: r[2].__setitem__("target", 17), "field 'target'"),
        (lambda r: r[3].__setitem__("captions", ["a", 2]), "field 'captions.1'"),
    ]:
        records = json.loads(json.dumps(good))
        mutate(records)
        path.write_text(json.dumps(records))
        with pytest.raises(AnnotationError, match=message):
            _load("fashioniq", root, "val", category="dress")
    (root / "image_splits" / "split.dress.val.json").write_text(json.dumps(["ok", {"a": 1}]))
    path.write_text(json.dumps(good))
    with pytest.raises(AnnotationError, match="split.dress.val.json"):
        _load("fashioniq", root, "val", category="dress")


def test_cli_reports_bad_annotations_on_one_line(tmp_path, cirr_val_records):
    root = copy_tree(ANNOTATIONS / "cirr", tmp_path / "cirr")
    records = json.loads(json.dumps(cirr_val_records))
    records[0]["img_set"] = "oops"
    (root / "captions" / "cap.rc2.val.json").write_text(json.dumps(records))
    res = CliRunner().invoke(cli, ["run", "-m", "image-only", "-d", "cirr", "--data-root", str(root), "-q",
                                   "--output", str(tmp_path / "o")])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1
    assert "record 0" in res.output and "img_set" in res.output and "internal error" not in res.output


def test_linked_image_folders_leaving_the_root_are_refused(tmp_path, monkeypatch):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    root = copy_tree(ANNOTATIONS / "circo", tmp_path / "circo")
    (root / "COCO2017_unlabeled").mkdir()
    (root / "COCO2017_unlabeled" / "unlabeled2017").symlink_to(outside)
    with pytest.raises(CirbenchError, match="links outside the data root"):
        _load("circo", root, "val")
    monkeypatch.setenv("CIRBENCH_ALLOW_OUTSIDE_ROOT", "1")
    assert _load("circo", root, "val")  # the user's explicit choice
    monkeypatch.delenv("CIRBENCH_ALLOW_OUTSIDE_ROOT")
    fiq = copy_tree(ANNOTATIONS / "fashioniq", tmp_path / "fiq")
    (fiq / "images").symlink_to(outside)
    with pytest.raises(CirbenchError, match="links outside the data root"):
        _load("fashioniq", fiq, "val", category="dress")


# -- properties ------------------------------------------------------------------------------------------
JSON = st.recursive(st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=True)
                    | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(["pairid", "reference", "caption", "img_set", "target_hard", "target_soft"]),
       value=JSON, index=st.integers(0, 30))
def test_any_mutated_cirr_record_loads_or_is_a_clean_error(tmp_path_factory, cirr_val_records, field, value, index):
    root = tmp_path_factory.mktemp("prop") / "cirr"
    copy_tree(ANNOTATIONS / "cirr", root)
    records = json.loads(json.dumps(cirr_val_records[:40]))
    records[index][field] = value
    (root / "captions" / "cap.rc2.val.json").write_text(json.dumps(records))
    try:
        (es,) = _load("cirr", root, "val")
    except AnnotationError as exc:
        assert "\n" not in str(exc) and "cap.rc2.val.json" in str(exc)
    else:
        q = es.queries[index]
        assert isinstance(q.reference, str) and all(isinstance(t, str) for t in q.targets)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.dictionaries(st.text(max_size=4) | st.integers(0, 300).map(str),
                            st.lists(st.integers(-3, 600000) | st.text(max_size=5), max_size=60), max_size=8))
def test_any_circo_ranking_file_scores_within_0_100_or_is_refused(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("sub") / "sub.json"
    path.write_text(json.dumps(data))
    res = CliRunner().invoke(cli, ["score", "-d", "circo", "-s", "val", "--data-root", str(ANNOTATIONS / "circo"),
                                   "--json", str(path)])
    if res.exit_code == 0:
        assert all(0 <= v <= 100 for v in json.loads(res.output).values())
    else:
        assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1 and "internal" not in res.output


@pytest.mark.parametrize("name, content, message", [
    ("deep.json", b"[" * 100_000, "ranking file {path} is malformed or truncated: nested too deeply"),
    ("binary.json", bytes(range(0x80, 0xFF)), "cannot read ranking file {path}"),
    ("deep.jsonl", b'{"query": ' + b"[" * 100_000 + b"\n", "ranking file {path}, line 1: not JSON (nested too deeply)"),
    ("binary.jsonl", bytes(range(0x80, 0xFF)), "cannot read ranking file {path}"),
])
def test_unparseable_ranking_files_are_one_line_errors(tmp_path, name, content, message):
    """Files no JSON parser reads (nested past the parser's recursion limit, not text) are refused by name."""
    path = tmp_path / name
    path.write_bytes(content)
    for dataset in ("circo", "cirr"):
        res = CliRunner().invoke(cli, ["score", "-d", dataset, "-s", "val", "--data-root", str(ANNOTATIONS / dataset),
                                       str(path)])
        assert res.exit_code == 2 and res.output.startswith("error: " + message.format(path=path)), res.output
        assert len(res.output.strip().splitlines()) == 1


@pytest.mark.parametrize("rows, message", [
    (['{"query": "0", "top": ["1"]}', "{not json"], "line 2: not JSON"),
    (["[1, 2]"], "line 1: not a ranking row (needs 'query' and 'top')"),
    (['{"query": "0"}'], "line 1: not a ranking row (needs 'query' and 'top')"),
    (['{"query": "0", "top": "12"}'], "line 1: 'top' and 'subset' must be lists of ids"),
    (['{"query": "0", "top": ["1"], "subset": "12"}'], "line 1: 'top' and 'subset' must be lists of ids"),
    (['{"query": "0", "top": ["1"]}', "", '{"query": 0, "top": ["2"]}'], "line 3: query 0 is ranked twice"),
])
def test_malformed_ranking_rows_are_refused_by_line(tmp_path, rows, message):
    """A per-query ranking file (``*.predictions.jsonl`` rows from any code) is refused at its first bad line: not
    JSON, not a row, a ranking that is no list, a query ranked twice (as text: 0 and "0" are one query)."""
    path = tmp_path / "rankings.jsonl"
    path.write_text("\n".join(rows) + "\n")
    res = CliRunner().invoke(cli, ["score", "-d", "circo", "-s", "val", "--data-root", str(ANNOTATIONS / "circo"),
                                   str(path)])
    assert res.exit_code == 2 and res.output.startswith(f"error: ranking file {path}, {message}"), res.output
    assert len(res.output.strip().splitlines()) == 1


def test_an_annotation_file_nested_too_deeply_is_malformed(tmp_path):
    root = copy_tree(ANNOTATIONS / "circo", tmp_path / "circo")
    (root / "COCO2017_unlabeled" / "unlabeled2017").mkdir(parents=True)
    (root / "annotations" / "val.json").write_bytes(b"[" * 100_000)
    with pytest.raises(AnnotationError, match="val.json is malformed or truncated: nested too deeply"):
        _load("circo", root, "val")


def test_a_submission_whose_ranking_is_no_list_and_a_hidden_split_are_refused(tmp_path):
    """A submission mapping a query to a string (not a list of ids) is refused by query; a per-query ranking file
    cannot be scored on a split whose targets are hidden."""
    from cirbench.testing import ToyDatasetPlugin, registered, write_toy_dataset

    for dataset, content, said in (
            ("cirr", {"version": "rc2", "metric": "recall", "12060": "dev-190-0-img0"},
             "query 12060: the ranking is a str, not a list of ids"),
            ("circo", {"0": "000000123456"}, "query 0: expected a list of image ids")):
        path = tmp_path / f"{dataset}.json"
        path.write_text(json.dumps(content))
        res = CliRunner().invoke(cli, ["score", "-d", dataset, "-s", "val", "--data-root", str(ANNOTATIONS / dataset),
                                       str(path)])
        assert res.exit_code == 2 and res.output.strip() == f"error: {path}, {said}", res.output
    root = write_toy_dataset(tmp_path / "toy")
    ranking = tmp_path / "run.predictions.jsonl"
    ranking.write_text('{"query": "0", "top": ["img_red_1.png"]}\n')
    with registered(ToyDatasetPlugin(), "toy"):
        res = CliRunner().invoke(cli, ["score", "-d", "toy", "-s", "test", "--data-root", str(root), str(ranking)])
    assert res.exit_code == 2 and res.output.strip() == (
        "error: toy/test has hidden targets: there is nothing to score a file against"), res.output
