"""The evaluation loop end to end on a tiny generated dataset and a tiny random open_clip model."""

from __future__ import annotations

import json
from importlib import metadata

import pytest
from click.testing import CliRunner
from helpers import registered
from toy_plugin import ToyPlugin

from cirbench import hookimpl
from cirbench.cli import cli
from cirbench.errors import CirbenchError
from cirbench.evaluate import Evaluator, RunConfig, evaluate
from cirbench.results import SCHEMA_VERSION, git_revision
from cirbench.util import file_sha256


def _cfg(tmp_path, tiny_config, toy_root, **kw):
    base = dict(method="image-only", dataset="toy", split="val", backbone=str(tiny_config), pretrained="none",
                data_root=toy_root, output=tmp_path / "results", cache_dir=tmp_path / "cache", workers=0,
                progress=False)
    base.update(kw)
    return RunConfig(**base)


def test_open_clip_version_is_recorded_from_its_metadata(monkeypatch):
    """open_clip before 2.25 has no __version__: the result must still name the installed release."""
    import open_clip

    from cirbench.results import environment_info

    monkeypatch.delattr(open_clip, "__version__", raising=False)
    assert environment_info("cpu")["open_clip"] == metadata.version("open_clip_torch")


def test_run_writes_result_with_provenance(tmp_path, tiny_config, toy_root):
    with registered(ToyPlugin(), "toy") as reg:
        (out,) = evaluate(_cfg(tmp_path, tiny_config, toy_root), reg)
    rec = json.loads(out.result_path.read_text())
    assert rec["schema_version"] == SCHEMA_VERSION
    assert out.result_path.parent == tmp_path / "results" / "toy" / "val"
    assert out.result_path.name == "image-only__cirbench-tiny-test-none.json"
    for field in ("backbone", "preprocess", "precision", "seed", "device", "counts", "environment", "wall_time_s"):
        assert field in rec
    assert rec["counts"]["queries"] == 12 and rec["counts"]["gallery"] == 12
    assert rec["environment"]["torch"] and rec["environment"]["open_clip"] == metadata.version("open_clip_torch")
    assert rec["environment"]["torchvision"] and rec["environment"]["pillow"] and rec["environment"]["numpy"]
    assert rec["environment"]["git"] == git_revision()  # this checkout's commit (None outside a checkout)
    # where the plugins' code came from: cirbench's own (its version and git say which), the test's in-process one
    assert rec["method"]["plugin_source"] == {"kind": "built-in"}
    assert rec["dataset"]["plugin_source"] == {"kind": "in-process"}
    assert rec["encode"]["image_library"].split()[0] in ("torchcodec", "torchvision", "pil")
    assert rec["encode"]["path"] == "workers" and rec["encode"]["requested_path"] == "auto"
    assert rec["encode"]["jpeg_decoder"] == "libjpeg-turbo" and "jpeg_decoder" not in rec["preprocess"]
    assert set(rec["metrics"]) == {"R@1", "R@5", "mAP@5"}
    preds = [json.loads(line) for line in out.predictions_path.read_text().splitlines()]
    assert len(preds) == 12
    # CIRR-style protocol: the reference never appears in its own ranking
    assert all(p["reference"] not in p["top"] for p in preds)
    assert all(len(p["top"]) == 10 for p in preds)


def test_image_only_ranks_same_colour_first(tmp_path, tiny_config, toy_root):
    """With the reference excluded, image-only's top hit is an image of the same colour (near-identical
    pixels), which a random-weights encoder still maps close together."""
    with registered(ToyPlugin(), "toy") as reg:
        (out,) = evaluate(_cfg(tmp_path, tiny_config, toy_root), reg)
    preds = [json.loads(line) for line in out.predictions_path.read_text().splitlines()]
    same = sum(p["top"][0].split("_")[1] == p["reference"].split("_")[1] for p in preds)
    assert same >= 10


def test_cache_is_reused_and_keyed_by_identity(tmp_path, tiny_config, toy_root):
    with registered(ToyPlugin(), "toy") as reg:
        (first,) = evaluate(_cfg(tmp_path, tiny_config, toy_root), reg)
        assert first.record["cache"]["misses"] == 12
        (second,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, method="text-only"), reg)
        assert second.record["cache"]["misses"] == 0  # gallery reused by another method
        (third,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, preprocess="targetpad"), reg)
        assert third.record["cache"]["misses"] == 12  # other preprocessing: never the stale features
        (fourth,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, seed=1), reg)
        assert fourth.record["cache"]["misses"] == 12  # other (random) weights: never the stale features
        (fifth,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, method="text-only", encode_path="batched"), reg)
        assert fifth.record["cache"]["misses"] == 0  # on the CPU both paths decode with libjpeg-turbo: same pixels
        (sixth,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, precision="bf16"), reg)
        assert sixth.record["cache"]["misses"] == 12  # bf16 features are not the fp32 ones
    # each configuration of image-only keeps a result file of its own: none overwrote another
    paths = {out.result_path for out in (first, third, fourth, sixth)}
    assert len(paths) == 4 and all(p.is_file() for p in paths)


def test_the_methods_of_one_run_load_once_and_encode_once(tmp_path, tiny_config, toy_root, monkeypatch):
    """`cirbench run --method a,b,c` loads the backbone and the benchmark data once, and encodes each image once
    even with --no-cache (the features stay in memory between the methods); the numbers are those of separate
    runs, and each result counts its own cache hits and misses."""
    from cirbench import evaluate as loop

    calls = {"backbones": 0, "data": 0, "images": 0}

    def counting(name, real):
        def wrapper(*args, **kwargs):
            calls[name] += len(args[0]) if name == "images" else 1
            return real(*args, **kwargs)
        return wrapper

    for attr, name in (("load_backbone", "backbones"), ("load_eval_sets", "data"), ("encode_images", "images")):
        monkeypatch.setattr(loop, attr, counting(name, getattr(loop, attr)))

    def run(methods, out):
        with registered(ToyPlugin(), "toy"):
            res = CliRunner().invoke(cli, ["run", "--method", methods, "--dataset", "toy", "--split", "val",
                                           "--backbone", str(tiny_config), "--pretrained", "none", "--data-root",
                                           str(toy_root), "--output", str(tmp_path / out), "--no-cache",
                                           "--workers", "0", "--quiet", "--bootstrap", "0", "--no-leaderboard"])
        assert res.exit_code == 0, res.output
        return {p.name: json.loads(p.read_text()) for p in (tmp_path / out / "toy" / "val").glob("*.json")}

    alone = {}
    for method in ("image-only", "text-only", "slerp"):
        alone.update(run(method, "alone"))
    separate = dict(calls)
    assert separate["backbones"] == separate["data"] == 3 and separate["images"] > 0
    calls.update({"backbones": 0, "data": 0, "images": 0})
    together = run("image-only,text-only,slerp", "together")
    assert calls["backbones"] == calls["data"] == 1
    assert calls["images"] == 12 and separate["images"] == 3 * 12  # the toy gallery holds the references
    assert together.keys() == alone.keys() and len(together) == 3
    for name, record in together.items():
        assert record["metrics"] == alone[name]["metrics"], name
    misses = {r["method"]["name"]: r["cache"]["misses"] for r in together.values()}
    assert misses == {"image-only": 12, "text-only": 0, "slerp": 0}


def test_one_run_covers_several_benchmarks(tmp_path, tiny_config, monkeypatch):
    """`--dataset toy,toy2:val` runs every method on each benchmark with one backbone load; each dataset gets its
    --data-root NAME=DIR and the options it declares; a leaderboard per benchmark; bad names, splits and roots
    are one-line errors before anything runs."""
    from cirbench import evaluate as loop
    from cirbench.testing import ToyDataset, write_toy_dataset
    from cirbench.types import DatasetSpec, OptionSpec

    class Toy2:
        @hookimpl
        def register_datasets(self, register):
            register(DatasetSpec(name="toy2", description="the toy data again", factory=ToyDataset,
                                 splits=("val",), main_metric="R@1",
                                 options=(OptionSpec("level", "an option of toy2 alone", "int", 0),)))

    loads = []
    real_load = loop.load_backbone
    monkeypatch.setattr(loop, "load_backbone", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    first, second = write_toy_dataset(tmp_path / "a"), write_toy_dataset(tmp_path / "b")
    common = ["--backbone", str(tiny_config), "--pretrained", "none", "--output", str(tmp_path / "out"),
              "--no-cache", "--workers", "0", "--quiet", "--bootstrap", "0"]

    def run(*args, quiet=True):
        with registered(ToyPlugin(), "toy") as reg:
            reg.register_plugin(Toy2(), name="toy2")
            return CliRunner().invoke(cli, ["run", "--method", "image-only,slerp", *args,
                                            *[a for a in common if quiet or a != "--quiet"]])

    for args, message in (
            (["--dataset", "toy,nosuch"], "unknown dataset 'nosuch'"),
            (["--dataset", "toy:train,toy2"], "unknown split of toy 'train'"),
            (["--dataset", "toy,toy2", "--data-root", str(first)], "give each its folder as --data-root NAME=DIR"),
            (["--dataset", "toy,toy2", "--data-root", f"toy3={first}"], "'toy3' is not one of the datasets run"),
            (["--dataset", "toy,toy2", "--data-root", f"toy={first / 'queries.json'}"], "is a file"),
            (["--dataset", "toy", "--data-root", str(first), "--level", "3"], "--level"),
            # the second benchmark's data is checked before the first is run
            (["--dataset", "toy,toy2", "--data-root", f"toy={first}", "--data-root", f"toy2={tmp_path / 'none'}"],
             "annotation file")):
        res = run(*args)
        assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, (args, res.output)
    assert not (tmp_path / "out").exists() and not loads
    res = run("--dataset", "toy,toy2:val", "--data-root", f"toy={first}", "--data-root", f"toy2={second}",
              "--level", "3", quiet=False)
    assert res.exit_code == 0, res.output
    assert "[1/4] image-only on toy/val" in res.output and "[4/4] slerp on toy2/val" in res.output
    assert len(loads) == 1
    assert "### toy / val" in res.output and "### toy2 / val" in res.output
    summary = res.output[res.output.index("### summary"):]  # the table across them: each main metric
    assert "toy/val R@1" in summary and "toy2/val R@1" in summary and "image-only · cirbench-tiny-test/none" in summary
    (report,) = [line for line in res.output.splitlines() if line.startswith("look at the queries")]
    assert report.count(str(tmp_path / "out" / "toy" / "val")) == 2  # two runs of one benchmark
    records = {(p.parent.parent.name, p.name): json.loads(p.read_text())
               for p in (tmp_path / "out").glob("*/val/*.json")}
    assert len(records) == 4
    for (dataset, _), record in records.items():
        assert record["dataset"]["options"] == ({"level": 3} if dataset == "toy2" else {"unused": 0})
        assert record["dataset"]["data_root"] == str((first if dataset == "toy" else second).resolve())
    for name in {name for _, name in records}:  # the same data in both folders: the same numbers
        assert records["toy", name]["metrics"] == records["toy2", name]["metrics"]


def test_data_check_takes_several_benchmarks_as_run_does(tmp_path):
    """`cirbench data check --dataset toy,toy2 --data-root NAME=DIR ...`: a report for each, exit 1 when one of them
    lacks an image, a JSON list with --json; the names and roots are checked as `run` checks them."""
    from cirbench.testing import ToyDataset, write_toy_dataset
    from cirbench.types import DatasetSpec

    class Toy2:
        @hookimpl
        def register_datasets(self, register):
            register(DatasetSpec(name="toy2", description="the toy data again", factory=ToyDataset, splits=("val",)))

    first, second = write_toy_dataset(tmp_path / "a"), write_toy_dataset(tmp_path / "b")

    def check(*args):
        with registered(ToyPlugin(), "toy") as reg:
            reg.register_plugin(Toy2(), name="toy2")
            return CliRunner().invoke(cli, ["data", "check", "--dataset", "toy,toy2", "--data-root", f"toy={first}",
                                            "--data-root", f"toy2={second}", *args])

    res = check()
    assert res.exit_code == 0, res.output
    assert f"toy/val under {first}" in res.output and f"toy2/val under {second}" in res.output
    (second / "images" / "img_red_0.png").unlink()
    res = check("--json")
    assert res.exit_code == 1, res.output
    reports = json.loads(res.output)
    assert [(r["dataset"], r["images"]["missing"]) for r in reports] == [("toy", 0), ("toy2", 1)]
    res = check("--unused", "1", "--bogus", "2")
    assert res.exit_code == 2 and "unknown option --bogus" in res.output and "Traceback" not in res.output


def test_gpu_decoded_features_have_a_key_and_fingerprint_of_their_own(tiny_config, monkeypatch):
    """nvJPEG may move pixels: on CUDA the batched path's features and results carry the decoder, so a run that
    asks for the official pipeline (workers) is never served them, and its results are told apart. The official
    decoder adds nothing: keys and fingerprints made before stay valid. TorchCodec (which may use the GPU's
    hardware JPEG engine) is told apart from torchvision's nvJPEG; with neither, PIL decodes on the CPU."""
    from types import SimpleNamespace

    import torch

    from cirbench import images
    from cirbench.encode import pixels_identity
    from cirbench.evaluate import Evaluator
    from cirbench.preprocess import Preprocessor

    pre = Preprocessor("targetpad", 224)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert pixels_identity(pre, "auto", cpu) == pixels_identity(pre, "batched", cpu) == pre.identity()
    assert pixels_identity(pre, "workers", cuda) == pre.identity()
    expected = {"torchvision": {"jpeg_decoder": "nvjpeg"}, "torchcodec": {"jpeg_decoder": "nvjpeg/torchcodec"},
                "pil": {}}
    for library, extra in expected.items():
        if library == "torchcodec":
            try:
                images._torchcodec()
            except Exception:  # noqa: BLE001 - not installed, or built for another torch
                continue
        monkeypatch.setenv("CIRBENCH_IMAGE_DECODER", library)
        images.tensor_decoder.cache_clear()
        assert pixels_identity(pre, "auto", cuda) == {**pre.identity(), **extra}, library
    monkeypatch.setenv("CIRBENCH_IMAGE_DECODER", "torchvision")
    images.tensor_decoder.cache_clear()

    def key(path, device):
        fake = SimpleNamespace(identity=lambda: {"model": "m"}, precision="bf16", device=device)
        return Evaluator(RunConfig("m", "d", encode_path=path))._feature_key(fake, pre, {"kind": "image"})

    assert key("auto", cuda) != key("workers", cuda) == key("auto", cpu)
    images.tensor_decoder.cache_clear()  # the next test decodes with this process's default again


def test_changed_backbone_config_never_reuses_cache(tmp_path, tiny_config, toy_root):
    other = tmp_path / "cirbench-tiny-test.json"
    cfg = json.loads(tiny_config.read_text())
    cfg["embed_dim"] = 16
    other.write_text(json.dumps(cfg))
    with registered(ToyPlugin(), "toy") as reg:
        evaluate(_cfg(tmp_path, tiny_config, toy_root), reg)
        # same model *name*, different architecture (and weights): a cache hit would be wrong
        (out,) = evaluate(_cfg(tmp_path, other, toy_root), reg)
    assert out.record["cache"]["misses"] == 12


def test_corrupt_cache_shard_is_rebuilt(tmp_path, tiny_config, toy_root):
    with registered(ToyPlugin(), "toy") as reg:
        (first,) = evaluate(_cfg(tmp_path, tiny_config, toy_root), reg)
        shards = list((tmp_path / "cache").rglob("shard-*.safetensors"))
        assert shards
        shards[0].write_bytes(shards[0].read_bytes()[:50])  # truncated
        with pytest.warns(UserWarning, match="dropping feature-cache shard"):
            (second,) = evaluate(_cfg(tmp_path, tiny_config, toy_root), reg)
    assert second.record["cache"]["misses"] == 12
    assert second.metrics == first.metrics


def test_hidden_split_has_no_metrics(tmp_path, tiny_config, toy_root):
    with registered(ToyPlugin(), "toy") as reg:
        (out,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, split="test"), reg)
    assert out.metrics == {}


def test_a_server_file_short_of_queries_is_announced(tmp_path, tiny_config, toy_root):
    (toy_root / "images" / "img_red_0.png").unlink()
    said = []
    with registered(ToyPlugin(), "toy") as reg:
        (out,) = Evaluator(_cfg(tmp_path, tiny_config, toy_root, split="test", allow_missing=True), reg,
                           log=said.append).run()
    assert out.record["counts"]["sets"]["all"]["queries_dropped"] == 1
    assert any("lack the 1 queries dropped for missing images" in line for line in said), said


def test_missing_images_stop_or_are_counted(tmp_path, tiny_config, toy_root):
    (toy_root / "images" / "img_red_0.png").unlink()
    with registered(ToyPlugin(), "toy") as reg:
        with pytest.raises(CirbenchError, match="1 of 12 images are missing.*img_red_0.png"):
            evaluate(_cfg(tmp_path, tiny_config, toy_root), reg)
        (out,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, allow_missing=True), reg)
    # the official rule: a query goes when its reference (1 query) or one of its targets (the 3 "make it
    # red" queries) is missing; never scored as a miss
    sets = out.record["counts"]["sets"]["all"]
    assert sets["missing_images"] == 1 and sets["gallery_dropped"] == 1
    assert sets["queries_dropped_missing_reference"] == 1 and sets["queries_dropped_missing_target"] == 3
    assert out.record["counts"]["queries"] == 8 and out.record["counts"]["gallery"] == 11
    preds = [json.loads(line) for line in out.predictions_path.read_text().splitlines()]
    assert all("img_red_0.png" not in p["targets"] and p["reference"] != "img_red_0.png" for p in preds)


def test_nothing_left_to_score_is_refused(tmp_path, tiny_config, toy_root):
    for p in (toy_root / "images").glob("img_red_*.png"):
        p.unlink()
    for p in (toy_root / "images").glob("img_blue_*.png"):
        p.unlink()
    for p in (toy_root / "images").glob("img_green_*.png"):
        p.unlink()
    with registered(ToyPlugin(), "toy") as reg:
        with pytest.raises(CirbenchError, match="no query is left to score"):
            evaluate(_cfg(tmp_path, tiny_config, toy_root, allow_missing=True), reg)


def test_no_image_found_points_at_the_data_root(tmp_path, tiny_config, toy_root):
    for p in (toy_root / "images").glob("*.png"):
        p.unlink()
    with registered(ToyPlugin(), "toy") as reg:
        for allow in (False, True):  # nothing to skip: --allow-missing is no advice here
            with pytest.raises(CirbenchError) as info:
                evaluate(_cfg(tmp_path, tiny_config, toy_root, allow_missing=allow), reg)
            assert "none of its 12 images exist" in str(info.value) and f"is --data-root {toy_root} right?" in str(
                info.value) and "--allow-missing" not in str(info.value)


def test_data_not_found_without_a_data_root_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    said = f"(no --data-root was given, so it was looked for in {tmp_path.resolve()}: pass the dataset's folder)"
    for args in (["run", "--method", "image-only", "--dataset", "cirr"], ["data", "check", "--dataset", "circo"]):
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 2 and said in res.output and "is --data-root" not in res.output, res.output


def test_corrupt_image_is_named(tmp_path, tiny_config, toy_root):
    (toy_root / "images" / "img_blue_1.png").write_bytes(b"not an image at all")
    with registered(ToyPlugin(), "toy") as reg:
        with pytest.raises(CirbenchError, match="img_blue_1.png"):
            evaluate(_cfg(tmp_path, tiny_config, toy_root), reg)


def test_cli_run_and_bad_input(tmp_path, tiny_config, toy_root):
    runner = CliRunner()
    common = ["--dataset", "toy", "--split", "val", "--backbone", str(tiny_config), "--pretrained", "none",
              "--data-root", str(toy_root), "--output", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c"),
              "--workers", "0", "--quiet"]
    with registered(ToyPlugin(), "toy"):
        res = runner.invoke(cli, ["run", "--method", "text-only", *common])
        assert res.exit_code == 0, res.output
        assert "R@1" in res.output
        res = runner.invoke(cli, ["run", "--method", "nope", *common])
        assert res.exit_code == 2
        assert "unknown method 'nope'" in res.output and "image-only" in res.output
        assert "Traceback" not in res.output
        res = runner.invoke(cli, ["run", "--method", "text-only", *common, "--bogus", "1"])
        assert res.exit_code == 2 and "unknown option --bogus" in res.output
        res = runner.invoke(cli, ["run", "--method", "text-only", *common[:2], "--split", "train", *common[4:]])
        assert res.exit_code == 2 and "unknown split of toy 'train'" in res.output
        ranking = tmp_path / "ranking.json"
        ranking.write_text("{}")
        for args in (["score", "--dataset", "toy", "--split", "train", str(ranking)],  # one message everywhere
                     ["data", "check", "--dataset", "toy", "--split", "train", "--data-root", str(toy_root)]):
            res = runner.invoke(cli, args)
            assert res.exit_code == 2 and "unknown split of toy 'train'; valid: test, val" \
                in res.output.strip().splitlines()[-1], res.output


def test_unwritable_results_dir_fails_before_encoding(tmp_path, tiny_config, toy_root):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with registered(ToyPlugin(), "toy") as reg:
        with pytest.raises(CirbenchError, match="not writable"):
            evaluate(_cfg(tmp_path, tiny_config, toy_root, output=blocker / "results"), reg)
    assert not (tmp_path / "cache").exists()  # nothing was encoded


def test_failed_run_leaves_no_empty_results_folder(tmp_path, tiny_config, toy_root):
    (toy_root / "images" / "img_blue_1.png").write_bytes(b"broken")
    with registered(ToyPlugin(), "toy") as reg:
        with pytest.raises(CirbenchError):
            evaluate(_cfg(tmp_path, tiny_config, toy_root, output=tmp_path / "fresh" / "results"), reg)
    assert not (tmp_path / "fresh").exists()


def test_results_survive_a_failed_rerun(tmp_path, tiny_config, toy_root):
    with registered(ToyPlugin(), "toy") as reg:
        (out,) = evaluate(_cfg(tmp_path, tiny_config, toy_root), reg)
        before = out.result_path.read_bytes()
        (toy_root / "images" / "img_blue_1.png").write_bytes(b"broken")
        with pytest.raises(CirbenchError):
            evaluate(_cfg(tmp_path, tiny_config, toy_root, use_cache=False), reg)
    assert out.result_path.read_bytes() == before


def test_a_disk_that_fills_while_a_rerun_writes_keeps_the_earlier_result_whole(tmp_path, tiny_config, toy_root,
                                                                               monkeypatch):
    """The result file and its predictions are one pair: a rerun whose rankings differ (an image changed) and
    that runs out of space on its result file after its predictions are written must leave the earlier pair as
    it was (not new predictions beside an old result whose checksum no longer matches them), fail with one
    line, and leave no temporary files."""
    import os

    from PIL import Image

    from cirbench.results import read_predictions_of

    args = ["run", "-m", "image-only", "-d", "toy", "--split", "val", "--backbone", str(tiny_config), "--pretrained",
            "none", "--data-root", str(toy_root), "--output", str(tmp_path / "results"), "--no-cache", "--workers",
            "0", "--quiet"]
    fsync = os.fsync

    def full_on_results(fd):  # the disk fills on the result file's own bytes (staged as ".<name>.json.*.tmp")
        if ".json." in os.path.basename(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(28, "No space left on device")
        return fsync(fd)

    with registered(ToyPlugin(), "toy"):
        assert CliRunner().invoke(cli, args).exit_code == 0
        folder = tmp_path / "results" / "toy" / "val"
        (result,) = folder.glob("*[!s].json")
        before = {p.name: p.read_bytes() for p in folder.iterdir()}
        image = toy_root / "images" / "img_blue_1.png"
        size = Image.open(image).size
        Image.new("RGB", size, (250, 20, 200)).save(image)  # the rankings of this rerun differ
        with monkeypatch.context() as patch:
            patch.setattr(os, "fsync", full_on_results)
            res = CliRunner().invoke(cli, args)
        assert res.exit_code != 0 and res.output.strip() == "error: No space left on device", res.output
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
        assert read_predictions_of(result)  # still the pair it was
        assert CliRunner().invoke(cli, args).exit_code == 0  # with space, the rerun replaces the pair: it differs
    assert {p.name: p.read_bytes() for p in folder.iterdir()} != before and read_predictions_of(result)


def test_a_damaged_result_under_the_runs_name_is_kept_and_the_new_one_written_beside_it(tmp_path, tiny_config,
                                                                                       toy_root):
    """A file at the result's name that does not parse (cut short, or edited by hand) may be the only copy of a
    number: the run cannot tell it is its own configuration's, so it writes under its fingerprinted name."""
    with registered(ToyPlugin(), "toy") as reg:
        (first,) = evaluate(_cfg(tmp_path, tiny_config, toy_root), reg)
        damaged = first.result_path.read_bytes()[:200]
        first.result_path.write_bytes(damaged)
        (again,) = evaluate(_cfg(tmp_path, tiny_config, toy_root), reg)
    assert first.result_path.read_bytes() == damaged
    assert again.result_path.name == first.result_path.name.replace(
        ".json", f"~{again.record['fingerprint'][:8]}.json")


def test_a_rerun_replaces_its_own_result_and_never_one_of_other_annotations(tmp_path, tiny_config, toy_root):
    """The fingerprint covers the annotation files' checksums: a rerun on edited annotations writes beside the
    result of the old ones; a rerun of the same configuration replaces its own file, also one an older cirbench
    wrote (another fingerprint recorded, no annotation checksums)."""
    results = tmp_path / "results" / "toy" / "val"
    with registered(ToyPlugin(), "toy") as reg:
        (first,) = evaluate(_cfg(tmp_path, tiny_config, toy_root), reg)
        rec = json.loads(first.result_path.read_text())
        assert rec["dataset"]["annotations"] == {"queries.json": file_sha256(toy_root / "queries.json")}
        # as an older cirbench recorded it: another fingerprint formula, no annotation checksums
        rec["fingerprint"], rec["dataset"]["annotations"] = "0123456789ab", {}
        first.result_path.write_text(json.dumps(rec))
        (again,) = evaluate(_cfg(tmp_path, tiny_config, toy_root), reg)
        assert again.result_path == first.result_path and sorted(p.name for p in results.glob("*.json")) == [
            first.result_path.name]
        kept = first.result_path.read_bytes()
        data = json.loads((toy_root / "queries.json").read_text())
        data["queries"] = data["queries"][:6]
        (toy_root / "queries.json").write_text(json.dumps(data))
        (edited,) = evaluate(_cfg(tmp_path, tiny_config, toy_root), reg)
        fingerprint = json.loads(edited.result_path.read_text())["fingerprint"]
        assert edited.result_path.name == first.result_path.name.replace(".json", f"~{fingerprint[:8]}.json")
        assert first.result_path.read_bytes() == kept and edited.record["counts"]["queries"] == 6
        evaluate(_cfg(tmp_path, tiny_config, toy_root), reg)
    assert len(list(results.glob("*.json"))) == 2 and first.result_path.read_bytes() == kept


def test_annotation_files_are_named_inside_the_data_root_and_fingerprinted_by_content(tmp_path, tiny_config,
                                                                                     toy_root):
    from cirbench.results import run_fingerprint

    # an annotation file linked into the data root from elsewhere is named as the dataset reads it
    elsewhere = tmp_path / "downloads" / "queries.json"
    elsewhere.parent.mkdir()
    (toy_root / "queries.json").rename(elsewhere)
    (toy_root / "queries.json").symlink_to(elsewhere)
    with registered(ToyPlugin(), "toy") as reg:
        (out,) = evaluate(_cfg(tmp_path, tiny_config, toy_root), reg)
    record = out.record
    assert record["dataset"]["annotations"] == {"queries.json": file_sha256(elsewhere)}
    # the fingerprint takes the files' contents, wherever they lie (a name is absolute outside the data root)
    moved = json.loads(json.dumps(record))
    moved["dataset"]["annotations"] = {str(elsewhere): file_sha256(elsewhere)}
    assert run_fingerprint(moved) == record["fingerprint"]
    moved["dataset"]["annotations"] = {"queries.json": "0" * 64}
    assert run_fingerprint(moved) != record["fingerprint"]


def test_a_methods_weights_are_fingerprinted_by_content_not_by_where_they_lie(tmp_path, tiny_config, toy_root):
    """A method's ``info`` names the weights it ran (official weights fetched by tag have no path option): other
    weights are another configuration, whose result never replaces this one's; the same weights moved elsewhere
    are the same configuration."""
    from cirbench.results import run_fingerprint, same_configuration

    with registered(ToyPlugin(), "toy") as reg:
        (out,) = evaluate(_cfg(tmp_path, tiny_config, toy_root), reg)
    record = json.loads(json.dumps(out.record))
    record["method"]["info"] = {"checkpoint": "/data/ckpt/phi.pt", "sha256": "a" * 64, "nested": [
        {"path": "/data/ckpt/extra.bin", "sha256": "b" * 64}]}
    moved = json.loads(json.dumps(record))
    moved["method"]["info"]["checkpoint"] = "/elsewhere/phi.pt"
    moved["method"]["info"]["nested"][0]["path"] = "/elsewhere/extra.bin"
    assert run_fingerprint(moved) == run_fingerprint(record) and same_configuration(moved, record)
    other = json.loads(json.dumps(record))
    other["method"]["info"]["nested"][0]["sha256"] = "c" * 64
    assert run_fingerprint(other) != run_fingerprint(record) and not same_configuration(other, record)


def test_the_fingerprint_moves_with_everything_that_decides_the_numbers(tmp_path, tiny_config, toy_root):
    """Each field a run's numbers depend on (method, its options and weights, dataset, split, options and
    annotations, backbone, preprocessing, precision, seed) changes the fingerprint, so a result of another
    configuration never replaces this one's; the recipe key (``leaderboard --seeds``) ignores only the seed and the
    trained weights evaluated."""
    from cirbench.results import run_fingerprint

    with registered(ToyPlugin(), "toy") as reg:
        (out,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, bootstrap=0), reg)
    record = json.loads(json.dumps(out.record))
    base = run_fingerprint(record)
    assert base == record["fingerprint"]
    changes = {"method.name": lambda r: r["method"].update(name="other"),
               "method.options": lambda r: r["method"].update(options={"alpha": 0.5}),
               "method.info": lambda r: r["method"].update(info={"sha256": "a" * 64}),
               "dataset.name": lambda r: r["dataset"].update(name="other"),
               "dataset.split": lambda r: r["dataset"].update(split="test"),
               "dataset.options": lambda r: r["dataset"].update(options={"category": "dress"}),
               "dataset.annotations": lambda r: r["dataset"].update(annotations={"queries.json": "0" * 64}),
               "backbone": lambda r: r["backbone"].update(pretrained="openai"),
               "preprocess": lambda r: r["preprocess"].update(kind="targetpad"),
               "precision": lambda r: r.update(precision="bf16"),
               "seed": lambda r: r.update(seed=7)}
    for what, change in changes.items():
        changed = json.loads(json.dumps(record))
        change(changed)
        assert run_fingerprint(changed) != base, what
        same_recipe = run_fingerprint(changed, recipe=True) == run_fingerprint(record, recipe=True)
        assert same_recipe == (what in ("seed", "method.info")), what  # a recipe's seeds: other seeds and weights
    unchanged = json.loads(json.dumps(record))
    unchanged.update(created="2030-01-01", metrics={}, environment={"torch": "9"})  # how and when, not what
    assert run_fingerprint(unchanged) == base


def test_a_set_ranked_in_parts_removes_each_querys_own_reference(tmp_path, tiny_config, toy_root, monkeypatch):
    """A dataset that scores its queries apart may be ranked a part of its queries at a time (no built-in one
    that does also removes the reference, but a plugin may): each part must remove its own queries' references,
    so the parts rank as the whole set does."""
    from cirbench import evaluate as loop
    from cirbench.testing import ToyDataset

    monkeypatch.setattr(ToyDataset, "queries_score_apart", True, raising=False)
    with registered(ToyPlugin(), "toy") as reg:
        (whole,) = evaluate(_cfg(tmp_path / "whole", tiny_config, toy_root), reg)
        monkeypatch.setattr(loop, "STREAM_ENTRIES", 2 * 10)  # parts of 2 queries (top 10 each)
        (parts,) = evaluate(_cfg(tmp_path / "parts", tiny_config, toy_root), reg)
    rows = [[json.loads(line) for line in o.predictions_path.read_text().splitlines()] for o in (whole, parts)]
    assert len(rows[0]) > 2 and [r["top"] for r in rows[0]] == [r["top"] for r in rows[1]]
    assert all(r["reference"] not in r["top"] for r in rows[1]) and parts.metrics == whole.metrics


def test_results_carry_confidence_intervals_and_per_query_metrics(tmp_path, tiny_config, toy_root):
    with registered(ToyPlugin(), "toy") as reg:
        (out,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, bootstrap=300), reg)
    ci = out.record["metrics_ci"]
    assert set(ci) == set(out.metrics)
    for metric, value in out.metrics.items():
        low, high = ci[metric]
        assert low <= value <= high and 0 <= low and high <= 100
    rows = [json.loads(line) for line in out.predictions_path.read_text().splitlines()]
    per_query = [r["metrics"]["R@1"] for r in rows]
    assert sum(per_query) / len(per_query) == pytest.approx(out.metrics["R@1"])


def test_compare_two_runs(tmp_path, tiny_config, toy_root):
    with registered(ToyPlugin(), "toy") as reg:
        (img,) = evaluate(_cfg(tmp_path, tiny_config, toy_root), reg)
        (txt,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, method="text-only"), reg)
    res = CliRunner().invoke(cli, ["compare", str(img.result_path), str(txt.result_path), "--json",
                                   "--replicates", "500"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    r1 = out["comparisons"]["R@1"]
    assert r1["difference"] == pytest.approx(img.metrics["R@1"] - txt.metrics["R@1"])
    assert r1["low"] <= r1["difference"] <= r1["high"] and 0 < r1["p_value"] <= 1 and r1["queries"] == 12
    same = CliRunner().invoke(cli, ["compare", str(img.result_path), str(img.result_path), "--json"])
    assert json.loads(same.output)["comparisons"]["R@1"]["p_value"] == 1.0  # a run never differs from itself
    preds = img.predictions_path
    preds.write_text(preds.read_text().replace('"query": "0"', '"query": "zero"', 1))
    res = CliRunner().invoke(cli, ["compare", str(img.result_path), str(txt.result_path)])
    assert res.exit_code == 2 and "does not belong" in res.output  # predictions no longer match their result


def test_predictions_are_read_beside_their_result_and_each_row_checked(tmp_path, tiny_config, toy_root):
    """A result's rankings come from the file its record names (else, as older results have it, the file of the
    same stem); a file whose checksum is the recorded one but whose lines are no ranking rows is refused naming
    the line."""
    import hashlib

    from cirbench.results import read_predictions_of, read_result

    with registered(ToyPlugin(), "toy") as reg:
        (run,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, bootstrap=0), reg)
    record = read_result(run.result_path)
    rows = read_predictions_of(run.result_path, record)
    assert [r["query"] for r in rows] == [str(i) for i in range(12)]
    unlinked = {k: v for k, v in record.items() if k != "predictions"}
    assert read_predictions_of(run.result_path, unlinked) == rows  # <stem>.predictions.jsonl
    for text, said in (("[1, 2]", "line 2: not a ranking row (an object with 'query')"),
                       ('{"top": ["1"]}', "line 2: not a ranking row (an object with 'query')"),
                       ("{oops", "line 2: not JSON")):
        data = ('{"query": "0", "top": []}\n' + text + "\n").encode()
        run.predictions_path.write_bytes(data)
        linked = {**record, "predictions": {**record["predictions"], "sha256": hashlib.sha256(data).hexdigest()}}
        with pytest.raises(CirbenchError) as info:
            read_predictions_of(run.result_path, linked)
        assert str(info.value) == f"predictions file {run.predictions_path}, {said}"


def test_compare_shortcuts_and_agree_refuse_what_they_cannot_pair_in_one_line(tmp_path, tiny_config, toy_root):
    """Runs of different splits, a hidden-target split (no per-query metrics) and a JSON file that is no result are
    each a one-line error (exit 2); the text tables print every metric the JSON gives."""
    with registered(ToyPlugin(), "toy") as reg:
        runs = [evaluate(_cfg(tmp_path, tiny_config, toy_root, method=m, bootstrap=0), reg)[0]
                for m in ("image-text-sum", "image-only", "text-only")]
        (hidden,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, split="test"), reg)
    run, image, text = (str(r.result_path) for r in runs)
    not_a_result = tmp_path / "list.json"
    not_a_result.write_text("[1, 2]")
    for args, said in ((["compare", run, str(hidden.result_path)], "toy/val but"),
                       (["shortcuts", str(hidden.result_path), "--image", str(hidden.result_path), "--text",
                         str(hidden.result_path)], "carry no per-query metrics"),
                       (["compare", run, str(not_a_result)], "is not a cirbench result file"),
                       (["shortcuts", run, "--image", str(not_a_result), "--text", text],
                        "is not a cirbench result file")):
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 2 and said in res.output, (args, res.output)
        assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
    res = CliRunner().invoke(cli, ["shortcuts", run, "--image", image, "--text", text])
    assert res.exit_code == 0, res.output
    table = json.loads(CliRunner().invoke(cli, ["shortcuts", run, "--image", image, "--text", text,
                                                "--json"]).output)
    # no R@10 here, and the toy dataset is not installed where the CLI looks: the first per-query metric decides
    first_row = json.loads(runs[0].predictions_path.read_text().splitlines()[0])
    assert "R@10" not in first_row["metrics"] and table["metric"] == next(iter(first_row["metrics"]))
    lines = res.output.splitlines()
    for group, row in table["groups"].items():
        line = next(x for x in lines if x.startswith(group + " "))
        assert f"{row['queries']:7d}" in line and f"{row['share']:6.1f}%" in line
        assert row["share"] == pytest.approx(100 * row["queries"] / table["groups"]["all"]["queries"])
        for name, value in list(row["metrics"].items())[:6]:
            assert f"{value:10.2f}" in line, (group, name, line)
    res = CliRunner().invoke(cli, ["compare", run, image, "--replicates", "200"])
    table = json.loads(CliRunner().invoke(cli, ["compare", run, image, "--replicates", "200", "--json"]).output)
    assert res.exit_code == 0, res.output
    for name, row in table["comparisons"].items():
        line = next(x for x in res.output.splitlines() if x.startswith(name + " "))
        assert f"{row['difference']:8.2f}" in line and f"{row['a_wins']:7d}" in line


def test_shortcuts_leave_out_the_queries_a_probe_did_not_rank(tmp_path, tiny_config, toy_root):
    """A probe run that dropped queries (a missing image, --allow-missing) classes only the queries all three runs
    scored; the others are in no group, not an error."""
    with registered(ToyPlugin(), "toy") as reg:
        run, image = (evaluate(_cfg(tmp_path, tiny_config, toy_root, method=m, bootstrap=0), reg)[0]
                      for m in ("image-text-sum", "image-only"))
        (toy_root / "images" / "img_red_0.png").unlink()
        (text,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, method="text-only", bootstrap=0,
                                allow_missing=True, output=tmp_path / "probe"), reg)
    kept = text.record["counts"]["queries"]
    assert kept < run.record["counts"]["queries"]
    res = CliRunner().invoke(cli, ["shortcuts", str(run.result_path), "--image", str(image.result_path), "--text",
                                   str(text.result_path), "--metric", "R@5", "--json"])
    assert res.exit_code == 0, res.output
    groups = json.loads(res.output)["groups"]
    assert groups["all"]["queries"] == kept
    assert groups["shortcut-solvable"]["queries"] + groups["composition required"]["queries"] == kept


def test_a_predictions_row_that_is_no_object_is_refused_by_line(tmp_path, tiny_config, toy_root):
    """A result written before predictions carried a checksum reads its rows unchecked: a row that is JSON but no
    ranking object is a one-line error naming its line, in every command that reads rankings."""
    with registered(ToyPlugin(), "toy") as reg:
        (out,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, bootstrap=0), reg)
    record = json.loads(out.result_path.read_text())
    del record["predictions"]["sha256"]
    out.result_path.write_text(json.dumps(record))
    lines = out.predictions_path.read_text().splitlines()
    out.predictions_path.write_text("\n".join([lines[0], "[1, 2]", *lines[2:]]) + "\n")
    for args in (["compare", str(out.result_path), str(out.result_path)], ["agree", str(out.result_path),
                                                                            str(out.result_path)]):
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 2 and res.output.strip() == (
            f"error: predictions file {out.predictions_path}, line 2: not a ranking row (an object with 'query')"), \
            res.output


def test_a_method_that_changes_the_shared_backbone_is_stopped(tmp_path, tiny_config, toy_root):
    """The backbone is shared by a run's methods and benchmarks (and by training in --validate): a method that
    changes it in place (an edit through .data as an adapter merge does, a replaced parameter, an in-place write,
    a hook left on it) is a one-line error naming it, its result unwritten; a method that copies what it adapts
    runs."""
    import copy

    import torch

    from cirbench import Method, MethodSpec, OptionSpec, hookimpl

    class Adapting(Method):
        def __init__(self, backbone, options, dataset=None):
            super().__init__(backbone, options, dataset)
            visual, mode = backbone.model.visual, options["mode"]
            if mode == "merge":
                visual.proj.data += 0.01
            elif mode == "replace":
                visual.proj = torch.nn.Parameter(visual.proj.detach().clone())
            elif mode == "write":
                with torch.no_grad():
                    backbone.model.logit_scale.mul_(1.0)
            elif mode == "hook":
                visual.register_forward_hook(lambda _module, _inputs, output: output)
            elif mode == "copy":
                self.visual = copy.deepcopy(visual)
                self.visual.proj.data += 0.01

        def compose(self, references, queries):
            return references

    class AdaptingPlugin:
        @hookimpl
        def register_methods(self, register):
            register(MethodSpec(name="adapting", description="changes the backbone as told", factory=Adapting,
                                options=(OptionSpec("mode", "how", "str", "copy"),)))

    with registered(ToyPlugin(), "toy") as reg:
        reg.register_plugin(AdaptingPlugin(), name="adapting-plugin")
        for mode in ("merge", "replace", "write", "hook"):
            out = tmp_path / mode
            with pytest.raises(CirbenchError, match=r"method 'adapting' \(plugin adapting-plugin\) changed the "
                                                    "backbone in place"):
                evaluate(_cfg(tmp_path, tiny_config, toy_root, method="adapting", method_options={"mode": mode},
                              output=out, bootstrap=0), reg)
            assert not list(out.rglob("*.json")), mode
        (ok,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, method="adapting", bootstrap=0), reg)
    assert ok.result_path.is_file()


def test_what_a_method_returns_is_checked_and_the_plugin_named(tmp_path, tiny_config, toy_root):
    """compose and finalize_queries must return [Q, D] finite, L2-normalised tensors; anything else is a
    one-line error naming the method, its plugin and the hook, never a ranking by garbage."""
    import torch

    from cirbench import Method, MethodSpec, OptionSpec, hookimpl

    class Broken(Method):
        def compose(self, references, queries):
            if self.options["mode"] == "prepared":  # compose gets what prepare_references made, row for row
                ids = [self.prepared_ids.index(q.reference) for q in queries]
                assert references.shape[1] == 2 and references[:, 0].tolist() == ids, references
            feats = torch.nn.functional.normalize(torch.ones(len(queries), self.backbone.embed_dim), dim=-1)
            return {"shape": feats[:, :-1], "nan": feats * float("nan"), "scale": feats * 2,
                    "type": feats.tolist()}.get(self.options["mode"], feats)

        def finalize_queries(self, queries, features, gallery):
            return features * 3 if self.options["mode"] == "finalize" else features

        def prepare_references(self, ids, features):
            self.prepared_ids = ids
            if self.options["mode"] == "prepared":
                assert torch.is_grad_enabled()
                return torch.stack([torch.arange(len(ids)), torch.zeros(len(ids), dtype=torch.long)], dim=1).float()
            return features[1:] if self.options["mode"] == "references" else features

    class BrokenPlugin:
        @hookimpl
        def register_methods(self, register):
            register(MethodSpec(name="broken", description="returns what it is told", factory=Broken,
                                options=(OptionSpec("mode", "what to get wrong", "str", "ok"),)))

    cases = {"shape": "compose returned shape (12, 31), expected (12, 32)", "nan": "compose returned non-finite",
             "scale": "compose returned features that are not L2-normalised", "type": "compose returned list",
             "finalize": "finalize_queries returned features that are not L2-normalised (norms 3..3)",
             "references": "prepare_references returned (11, 32), not one row for each of the 12 reference images"}
    with registered(ToyPlugin(), "toy") as reg:
        reg.register_plugin(BrokenPlugin(), name="broken-plugin")
        (ok,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, method="broken", bootstrap=0), reg)
        assert ok.metrics
        evaluate(_cfg(tmp_path, tiny_config, toy_root, method="broken", method_options={"mode": "prepared"}), reg)
        for mode, message in cases.items():
            with pytest.raises(CirbenchError, match=r"method 'broken' \(plugin broken-plugin\): ") as err:
                evaluate(_cfg(tmp_path, tiny_config, toy_root, method="broken", method_options={"mode": mode}), reg)
            assert message in str(err.value), str(err.value)


def test_a_method_never_sees_a_subset_nor_the_order_its_candidates_were_listed_in(tmp_path, tiny_config, toy_root):
    """A CIRR-like subset (candidates that hold the target, the whole gallery ranked) is hidden from the method; a
    per-query gallery (GeneCIS lists the target first) reaches it sorted, so that its order says nothing; an extra
    that tells the answer (``target_extras``) is dropped."""
    import dataclasses

    import torch

    from cirbench import DatasetSpec, Method, MethodSpec, hookimpl
    from cirbench.testing import ToyDataset

    def listed(es, q):  # the target first, as GeneCIS's files list it, then the rest of the gallery
        others = [g.id for g in es.gallery if g.id not in q.targets and g.id != q.reference][:5]
        return (q.targets[0], *others)

    class Subsets(ToyDataset):
        target_extras = ("target_img_id",)

        def load(self, split):
            (es,) = super().load(split)
            return [dataclasses.replace(es, queries=[dataclasses.replace(
                q, candidates=listed(es, q), extra={"target_img_id": q.targets[0], "shared_concept": "a dog"})
                for q in es.queries])]

    class OwnGalleries(Subsets):
        def load(self, split):
            (es,) = super().load(split)
            return [dataclasses.replace(es, query_galleries=True, exclude_reference=False)]

    seen: list = []
    extras: list = []

    class FirstCandidate(Method):
        def prepare(self, query_set):
            seen.extend(q.candidates for q in query_set.queries)

        def compose(self, references, queries):
            seen.extend(q.candidates for q in queries)
            extras.extend(q.extra for q in queries)
            return torch.nn.functional.normalize(references.float(), dim=-1)

    class Plugin:
        @hookimpl
        def register_methods(self, register):
            register(MethodSpec(name="first-candidate", description="peeks", factory=FirstCandidate))

        @hookimpl
        def register_datasets(self, register):
            for name, cls in (("subsets", Subsets), ("own-galleries", OwnGalleries)):
                register(DatasetSpec(name=name, description="d", factory=cls, splits=("val",), main_metric="R@1"))

    with registered(Plugin(), "peek") as reg:
        evaluate(_cfg(tmp_path, tiny_config, toy_root, method="first-candidate", dataset="subsets", bootstrap=0), reg)
        assert seen and all(c is None for c in seen)
        seen.clear()
        evaluate(_cfg(tmp_path, tiny_config, toy_root, method="first-candidate", dataset="own-galleries",
                      bootstrap=0), reg)
    assert seen and all(c is not None and list(c) == sorted(c) for c in seen)
    # an extra the dataset declares an answer (CIRCO's target_img_id) is dropped; the others reach the method
    assert extras and all(e == {"shared_concept": "a dog"} for e in extras)


def test_a_method_never_sees_targets_and_may_declare_unnormalised_features(tmp_path, tiny_config, toy_root):
    """compose, prepare and finalize_queries get the queries without their targets (nor CIRR-like subsets);
    a method with ``unit_features = False`` is ranked by the inner products of what it returns, unnormalised."""
    import torch

    from cirbench import Method, MethodSpec, OptionSpec, hookimpl

    seen = []

    class Peeking(Method):
        def prepare(self, query_set):
            seen.extend(q.targets for q in query_set.queries)

        def compose(self, references, queries):
            seen.extend(q.targets for q in queries)
            scale = 5.0 if self.options["scale"] else 1.0
            return torch.nn.functional.normalize(references.float(), dim=-1) * scale

        def finalize_queries(self, queries, features, gallery):
            seen.extend(q.targets or q.candidates for q in queries)
            return features

    class Scaled(Peeking):
        unit_features = False

    class PeekingPlugin:
        @hookimpl
        def register_methods(self, register):
            for name, factory in (("peeking", Peeking), ("scaled", Scaled)):
                register(MethodSpec(name=name, description="looks for targets", factory=factory,
                                    options=(OptionSpec("scale", "unnormalised output", "bool", False),)))

    with registered(ToyPlugin(), "toy") as reg:
        reg.register_plugin(PeekingPlugin(), name="peeking-plugin")
        (plain,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, method="peeking", bootstrap=0), reg)
        assert seen and not any(seen)
        with pytest.raises(CirbenchError, match="not L2-normalised"):
            evaluate(_cfg(tmp_path, tiny_config, toy_root, method="peeking", method_options={"scale": True}), reg)
        (scaled,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, method="scaled", method_options={"scale": True},
                                  bootstrap=0), reg)
    assert scaled.metrics == plain.metrics  # one positive scale per query: the same ranking


def test_shortcuts_class_queries_by_what_the_unimodal_runs_solve(tmp_path, tiny_config, toy_root):
    """`cirbench shortcuts`: each query classed by whether the image-only and the text-only run solve it (the
    metric above 0), the run's means on each class equal to those computed from the three prediction files."""
    from cirbench.commands.shortcuts import classify

    assert classify(100.0, 0.0) == ("all", "shortcut-solvable", "image solves")
    assert classify(0.0, 0.0) == ("all", "composition required")
    assert classify(50.0, 10.0) == ("all", "shortcut-solvable", "both solve")
    with registered(ToyPlugin(), "toy") as reg:
        runs = [evaluate(_cfg(tmp_path, tiny_config, toy_root, method=m), reg)[0]
                for m in ("image-text-sum", "image-only", "text-only")]
    res = CliRunner().invoke(cli, ["shortcuts", str(runs[0].result_path), "--image", str(runs[1].result_path),
                                   "--text", str(runs[2].result_path), "--metric", "R@5", "--json"])
    assert res.exit_code == 0, res.output
    table = json.loads(res.output)
    rows = [{r["query"]: r["metrics"] for r in map(json.loads, run.predictions_path.read_text().splitlines())}
            for run in runs]
    expected: dict[str, list[float]] = {}
    for query, metrics in rows[0].items():
        image, text = rows[1][query]["R@5"] > 0, rows[2][query]["R@5"] > 0
        group = "composition required" if not (image or text) else "both solve" if image and text else \
            "image solves" if image else "text solves"
        for name in ("all", group, *(["shortcut-solvable"] if image or text else [])):
            expected.setdefault(name, []).append(metrics["R@1"])
    assert {g: row["queries"] for g, row in table["groups"].items()} == {
        g: len(expected.get(g, [])) for g in table["groups"]}
    for group, values in expected.items():
        assert table["groups"][group]["metrics"]["R@1"] == pytest.approx(sum(values) / len(values))
    assert list(table["groups"]["all"]["metrics"])[0] == "R@5" and table["solved_by"] == "R@5 > 0"
    assert table["groups"]["all"]["metrics"]["R@1"] == pytest.approx(runs[0].metrics["R@1"])
    res = CliRunner().invoke(cli, ["shortcuts", str(runs[0].result_path), "--image", str(runs[1].result_path),
                                   "--text", str(runs[2].result_path), "--metric", "mAP@3"])
    assert res.exit_code == 2 and "record no per-query 'mAP@3'" in res.output


def test_batch_sizes_do_not_change_the_numbers(tmp_path, tiny_config, toy_root):
    """Images encoded and queries composed a few at a time (--batch-size 1: queries 4 at a time) rank exactly as
    in one batch: every query is composed once, in order."""
    with registered(ToyPlugin(), "toy") as reg:
        (whole,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, method="slerp", bootstrap=0, use_cache=False), reg)
        (small,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, method="slerp", bootstrap=0, use_cache=False,
                                 batch_size=1, output=tmp_path / "small"), reg)
    assert small.metrics == whole.metrics
    tops = [[json.loads(line)["top"] for line in run.predictions_path.read_text().splitlines()]
            for run in (whole, small)]
    assert tops[0] == tops[1] and len(tops[0]) == whole.record["counts"]["queries"] > 4


def test_composed_features_must_be_unit_vectors_to_a_thousandth():
    """A query vector off unit length by a percent ranks by its length too: refused; float32 round-off is not."""
    import torch

    from cirbench.evaluate import check_composed
    from cirbench.types import MethodSpec

    spec = MethodSpec(name="m", description="d", factory=lambda *a: None, plugin="p")
    unit = torch.nn.functional.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert torch.equal(check_composed(unit * 1.0004, 4, 8, spec), unit * 1.0004)
    with pytest.raises(CirbenchError, match=r"method 'm' \(plugin p\): compose returned features that are not "
                                            r"L2-normalised \(norms 1\.01\.\.1\.01\)"):
        check_composed(unit * 1.01, 4, 8, spec)
    assert torch.equal(check_composed(unit * 1.01, 4, 8, spec, unit=False), unit * 1.01)  # unit_features = False


def test_the_git_revision_says_whether_tracked_files_changed(tmp_path):
    """Result files record cirbench's commit and whether its tracked files differ from it (a run of edited code is
    not that commit's number); an untracked file (a result, a notebook) leaves the checkout clean."""
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("git is not installed")

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("commit", "-q", "-m", "one")
    commit = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert git_revision(tmp_path) == {"commit": commit, "dirty": False}
    (tmp_path / "notes.txt").write_text("untracked")
    assert git_revision(tmp_path) == {"commit": commit, "dirty": False}
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_revision(tmp_path) == {"commit": commit, "dirty": True}
