"""`cirbench reproduce`: a result file run again from what it records, and compared."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from click.testing import CliRunner
from helpers import registered
from toy_plugin import ToyPlugin

from cirbench.cli import cli


def test_reproduce_runs_a_result_again_and_says_what_differs(tmp_path, tiny_config, toy_root):
    """The same configuration gives identical metrics and rankings (exit 0), wherever the data now lies; another
    option value is named as a configuration difference, a metric that moved beyond --tolerance is named with
    its difference (exit 1); --json and --output keep what they promise; a file that is no result is a one-line
    error."""
    def invoke(*args):
        with registered(ToyPlugin(), "toy"):
            return CliRunner().invoke(cli, list(args))

    res = invoke("run", "--method", "slerp", "--alpha", "0.8", "--dataset", "toy", "--data-root", str(toy_root),
                 "--backbone", str(tiny_config), "--pretrained", "none", "--output", str(tmp_path / "out"),
                 "--workers", "0", "--quiet", "--bootstrap", "0", "--no-leaderboard")
    assert res.exit_code == 0, res.output
    (result,) = (tmp_path / "out" / "toy" / "val").glob("*.json")
    again = ("reproduce", str(result), "--backbone", str(tiny_config), "--quiet")

    res = invoke(*again)
    assert res.exit_code == 0, res.output
    assert "reproduced: same configuration, every metric within 0 (identical)" in res.output
    assert "100.00% of 12 queries have identical saved top lists" in res.output
    moved = shutil.copytree(toy_root, tmp_path / "moved")
    shutil.rmtree(toy_root)
    res = invoke(*again, "--data-root", str(moved))
    assert res.exit_code == 0 and "(identical)" in res.output, res.output

    # made on a GPU's batched path: the decoder is the device's, said, and --tolerance decides
    original_text = result.read_text()
    record = json.loads(original_text)
    record["preprocess"]["jpeg_decoder"] = "nvjpeg"
    result.write_text(json.dumps(record))
    res = invoke(*again, "--data-root", str(moved))
    assert res.exit_code == 0 and "environment: jpeg decoder nvjpeg -> libjpeg-turbo" in res.output, res.output
    result.write_text(original_text)

    res = invoke(*again, "--data-root", str(moved), "--alpha", "0.5")
    assert res.exit_code == 1, res.output
    assert "configuration differs: method.options.alpha: recorded 0.8, now 0.5" in res.output
    assert "not reproduced: the configuration differs" in res.output

    record = json.loads(result.read_text())
    record["metrics"]["R@1"] += 1.5
    result.write_text(json.dumps(record))
    res = invoke(*again, "--data-root", str(moved))
    assert res.exit_code == 1 and "not reproduced: a metric differs by 1.5000 (tolerance 0)" in res.output
    res = invoke(*again, "--data-root", str(moved), "--tolerance", "2", "--json", "--output", str(tmp_path / "re"))
    assert res.exit_code == 0, res.output
    (report,) = json.loads(res.output)
    assert report["reproduced"] and report["rankings"]["identical"] == 1.0
    assert (tmp_path / "re" / "toy" / "val").is_dir() and report["result"].startswith(str(tmp_path / "re"))

    # several results at once: each compared, one verdict each, the exit says whether all held
    res = invoke("run", "--method", "image-only", "--dataset", "toy", "--data-root", str(moved), "--backbone",
                 str(tiny_config), "--pretrained", "none", "--output", str(tmp_path / "out"), "--workers", "0",
                 "--quiet", "--bootstrap", "0", "--no-leaderboard")
    assert res.exit_code == 0, res.output
    both = sorted(str(p) for p in (tmp_path / "out" / "toy" / "val").glob("*.json"))
    res = invoke("reproduce", *both, "--backbone", str(tiny_config), "--quiet", "--data-root", str(moved))
    assert res.exit_code == 1 and "1 of 2 reproduced" in res.output  # the tampered R@1 is still there
    res = invoke("reproduce", *both, "--backbone", str(tiny_config), "--quiet", "--data-root", str(moved),
                 "--tolerance", "2")
    assert res.exit_code == 0 and "2 of 2 reproduced" in res.output

    not_a_result = tmp_path / "x.json"
    not_a_result.write_text("[1, 2]")
    res = invoke("reproduce", str(not_a_result))
    assert res.exit_code == 2 and "schema_version" in res.output and "Traceback" not in res.output
    record["method"]["name"] = "nosuch"
    result.write_text(json.dumps(record))
    res = invoke(*again)
    assert res.exit_code == 2 and "unknown method 'nosuch'" in res.output and "Traceback" not in res.output


def test_reproduce_holds_the_data_and_the_rankings_to_the_record(tmp_path, tiny_config, toy_root):
    """Other annotation files or another gallery size are configuration differences, whatever the metrics; a
    result without metrics (a hidden split: rankings only) is reproduced when its rankings are, and not otherwise."""
    from cirbench.util import sha256_bytes

    def invoke(*args):
        with registered(ToyPlugin(), "toy"):
            return CliRunner().invoke(cli, list(args))

    common = ("--dataset", "toy", "--data-root", str(toy_root), "--backbone", str(tiny_config), "--pretrained",
              "none", "--workers", "0", "--quiet", "--bootstrap", "0", "--no-leaderboard")
    for split in ("val", "test"):
        res = invoke("run", "--method", "slerp", "--split", split, "--output", str(tmp_path / "out"), *common)
        assert res.exit_code == 0, res.output
    (val,) = (tmp_path / "out" / "toy" / "val").glob("*.json")
    (test,) = (tmp_path / "out" / "toy" / "test").glob("*.json")
    again = ("--backbone", str(tiny_config), "--quiet", "--output", str(tmp_path / "again"))
    record = json.loads(val.read_text())
    assert record["counts"]["gallery"]
    for tamper, said in ((lambda r: r["dataset"].update(annotations={"queries.json": "0" * 64}),
                          "dataset.annotations.queries.json"),
                         (lambda r: r["counts"].update(gallery=r["counts"]["gallery"] + 1), "counts.gallery")):
        changed = json.loads(json.dumps(record))
        tamper(changed)
        val.write_text(json.dumps(changed))
        res = invoke("reproduce", str(val), *again)
        assert res.exit_code == 1 and f"configuration differs: {said}" in res.output, res.output
    # a result that recorded no annotation checksums (an older cirbench's) is not refused for it, and told so
    val.write_text(json.dumps({**record, "dataset": {**record["dataset"], "annotations": {}}}))
    res = invoke("reproduce", str(val), *again)
    assert res.exit_code == 0 and "environment: annotation checksums not recorded -> 1 file(s)" in res.output, \
        res.output
    val.write_text(json.dumps(record))

    hidden = json.loads(test.read_text())
    assert not hidden.get("metrics")
    res = invoke("reproduce", str(test), *again)
    assert res.exit_code == 0 and "100.00% of" in res.output, res.output
    predictions = test.with_name(hidden["predictions"]["file"])
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    rows[0]["top"] = rows[0]["top"][::-1]  # one query ranked otherwise
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    predictions.write_bytes(data)
    hidden["predictions"]["sha256"] = sha256_bytes(data)
    test.write_text(json.dumps(hidden))
    res = invoke("reproduce", str(test), *again)
    assert res.exit_code == 1 and "not reproduced" in res.output, res.output


def test_reproduce_runs_the_way_the_record_says_it_ran(tmp_path, tiny_config, toy_root):
    """A run that dropped the queries of a missing image is rerun with --allow-missing, with the bootstrap's
    replicates and the saved ranking depth it recorded; weights the record names by checksum (method info) that
    the rerun does not have are a configuration difference."""
    def invoke(*args):
        with registered(ToyPlugin(), "toy"):
            return CliRunner().invoke(cli, list(args))

    (toy_root / "images" / "img_red_0.png").unlink()
    res = invoke("run", "--method", "slerp", "--dataset", "toy", "--data-root", str(toy_root), "--backbone",
                 str(tiny_config), "--pretrained", "none", "--output", str(tmp_path / "out"), "--workers", "0",
                 "--quiet", "--allow-missing", "--bootstrap", "40", "--save-top", "all", "--no-leaderboard")
    assert res.exit_code == 0, res.output
    (result,) = (tmp_path / "out" / "toy" / "val").glob("*.json")
    record = json.loads(result.read_text())
    assert record["counts"]["sets"]["all"]["queries_dropped"] and record["ci"]["replicates"] == 40
    again = ("reproduce", str(result), "--backbone", str(tiny_config), "--quiet", "--json", "--output",
             str(tmp_path / "again"))
    res = invoke(*again)
    assert res.exit_code == 0, res.output
    (report,) = json.loads(res.output)
    assert report["reproduced"] and report["rankings"]["identical"] == 1.0
    rerun = json.loads(open(report["result"]).read())
    assert rerun["ci"]["replicates"] == 40 and rerun["predictions"]["top"] == "all"
    assert rerun["counts"] == record["counts"]

    result.write_text(json.dumps({**record, "method": {**record["method"], "info": {"weights_sha256": "0" * 64}}}))
    res = invoke(*again)
    assert res.exit_code == 1 and json.loads(res.output)[0]["configuration"] == [
        ["method.info.weights_sha256", "0" * 64, None]], res.output


def test_a_record_written_before_path_options_had_checksums_compares_without_its_paths():
    """A result that records no ``files`` (written before path options were recorded by their contents) is not
    told apart from its reproduction by where its checkpoint lay, only by what else differs; for a method no
    longer installed nothing says which options are paths, and every one counts."""
    from cirbench.reproduce import compare

    def record(name, checkpoint, files=None, **options):
        method = {"name": name, "options": {"checkpoint": checkpoint, **options}, "info": {}}
        return {"method": {**method, **({"files": files} if files else {})}, "metrics": {"R@1": 1.0}}

    old, new = record("pic2word", "/old/p2w.pt"), record("pic2word", "/new/p2w.pt", {"checkpoint": "ab12"})
    assert compare(old, Path("a.json"), new, Path("b.json"), 0.0).configuration == []
    moved = compare(record("pic2word", "/old/p2w.pt", prompt="x"), Path("a.json"),
                    record("pic2word", "/new/p2w.pt", {"checkpoint": "ab12"}, prompt="y"), Path("b.json"), 0.0)
    assert moved.configuration == [("method.options.prompt", "x", "y")]
    gone = compare(record("gone", "/old/p2w.pt"), Path("a.json"), record("gone", "/new/p2w.pt", {"checkpoint": "ab"}),
                   Path("b.json"), 0.0)
    assert gone.configuration == [("method.options.checkpoint", "/old/p2w.pt", "/new/p2w.pt")]


def test_a_result_file_with_sections_of_the_wrong_type_is_one_line(tmp_path, tiny_config, toy_root):
    """A result file edited by hand (or by other code) whose sections have other types than cirbench writes is
    named, field by field, before anything reads it: ``reproduce`` stopped on 'internal error: AttributeError'."""

    with registered(ToyPlugin(), "toy"):
        res = CliRunner().invoke(cli, ["run", "--method", "slerp", "--dataset", "toy", "--data-root", str(toy_root),
                                       "--backbone", str(tiny_config), "--pretrained", "none", "--output",
                                       str(tmp_path / "out"), "--workers", "0", "--quiet", "--bootstrap", "0",
                                       "--no-leaderboard"])
    assert res.exit_code == 0, res.output
    (result,) = (tmp_path / "out" / "toy" / "val").glob("*.json")
    record = json.loads(result.read_text())
    edits = [
        (("encode",), 7, "field 'encode': Input should be a valid dictionary"),
        (("encode", "max_image_pixels"), "lots", "field 'encode.max_image_pixels'"),
        (("retrieval",), "faiss", "field 'retrieval'"),
        (("counts", "sets"), "val", "field 'counts.sets'"),
        (("counts", "sets", "val"), 3, "field 'counts.sets.val'"),
        (("dataset", "options"), ["a"], "field 'dataset.options'"),
        (("method", "name"), 5, "field 'method.name'"),
        (("seed",), "0", "field 'seed'"),
        (("ci", "replicates"), True, "field 'ci.replicates'"),
        (("metrics", "R@1"), "high", "field 'metrics.R@1"),
        (("metrics_ci",), {"R@1": [1.0, "x"]}, "field 'metrics_ci.R@1.1'"),
        (("metrics", "R@1"), 10**30, "field 'metrics.R@1': 1e+30 is no metric value"),  # the report's plot overflowed
        (("predictions", "file"), 3, "field 'predictions.file'"),
        (("predictions", "top"), "most", "field 'predictions.top"),
        (("predictions", "file"), "../other.jsonl",
         "field 'predictions.file': '../other.jsonl' is not a file name beside the result"),
    ]
    for keys, value, said in edits:
        broken = json.loads(json.dumps(record))
        node = broken
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
        path = tmp_path / "broken" / result.name
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(broken))
        for args in (["reproduce", str(path)], ["compare", str(path), str(result)], ["report", str(path)],
                     ["agree", str(path), str(result)]):
            with registered(ToyPlugin(), "toy"):
                out = CliRunner().invoke(cli, args)
            assert out.exit_code == 2, (args, out.output)
            assert f"result file {path} is malformed: {said}" in out.output, (args, out.output)
            assert len(out.output.strip().splitlines()) == 1 and "instance of" not in out.output, out.output
