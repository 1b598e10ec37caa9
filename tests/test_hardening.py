"""Hostile checkpoints and bad values: nothing executed, nothing silently wrong, bounded cost, one-line errors.

One regression test per class found by the attack run (issue: "Nothing executed, nothing silent, nothing
lost").
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile

import pytest
import torch
from click.testing import CliRunner

import cirbench.safe_unpickle as su
from cirbench.cli import cli
from cirbench.errors import CheckpointError, CirbenchError
from cirbench.safe_unpickle import (
    RefusedPickle,
    load_pickled_module_tensors,
    load_state_dict,
    load_torch_file,
)


def _torch_zip(path, pickle_bytes: bytes, storages: dict[str, bytes] | None = None, compress=None,
               byteorder=b"little"):
    """A zip laid out as torch.save lays it out, with the given data.pkl and storages."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle_bytes)
        zf.writestr("archive/byteorder", byteorder)
        for key, raw in (storages or {}).items():
            zf.writestr(f"archive/data/{key}", raw, compress_type=compress or zipfile.ZIP_STORED)
    return path


def _rewrite(src, dst, change):
    """Copy a torch zip, passing every entry through ``change(name, bytes) -> (bytes, compress_type)``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data, compress = change(info.filename, zin.read(info.filename))
            zout.writestr(info.filename, data, compress_type=compress)
    return dst


def test_reduce_is_never_called(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"Phi": {"w": torch.zeros(2)}, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(RefusedPickle, match=r"calls _?io\.open"):  # _io.open from Python 3.12 on
        load_torch_file(tmp_path / "evil.pt")
    assert not marker.exists()


def test_build_on_an_allow_listed_function_is_refused(tmp_path):
    """GLOBAL torch._utils._rebuild_tensor_v2, then BUILD {'pwned': 1}: would set an attribute on a function."""
    payload = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}X\x05\x00\x00\x00pwnedK\x01sb.")
    path = _torch_zip(tmp_path / "build.pt", payload)
    with pytest.raises(RefusedPickle, match="sets attributes"):
        load_torch_file(path)
    assert not hasattr(su._rebuild_tensor, "pwned") and not hasattr(torch._utils._rebuild_tensor_v2, "pwned")
    payload = b"\x80\x02ctorch\nSize\n}X\x05\x00\x00\x00pwnedK\x01sb."  # a class, this time
    with pytest.raises(RefusedPickle):
        load_torch_file(_torch_zip(tmp_path / "build2.pt", payload))
    assert not hasattr(torch.Size, "pwned")


def test_deep_nesting_is_bounded(tmp_path):
    deep: dict = {"w": torch.ones(1)}
    for _ in range(150):
        deep = {"x": deep}
    torch.save(deep, tmp_path / "deep.pt")
    with pytest.raises(CheckpointError, match="deeper than"):
        load_pickled_module_tensors(tmp_path / "deep.pt")


def test_tied_and_shared_tensors_keep_every_name(tmp_path):
    """A tensor under two names (tied weights) or a submodule shared by two parents is in ``torch.load``'s
    result under each name: so in cirbench's. (The reader once kept only the first name it met.)"""
    t = torch.arange(3.0)
    torch.save({"a": t, "b": {"c": t}, "d": t[:2]}, tmp_path / "tied.pt")
    state = load_state_dict(tmp_path / "tied.pt")
    assert sorted(state) == ["a", "b.c", "d"] and torch.equal(state["b.c"], t) and torch.equal(state["d"], t[:2])
    assert state["a"] is state["b.c"]  # tied, as torch.load returns it, and cloned once
    shared = torch.nn.Linear(2, 2)
    module = torch.nn.Sequential(shared, torch.nn.ReLU(), shared)
    torch.save(module, tmp_path / "module.pt")
    tensors = load_pickled_module_tensors(tmp_path / "module.pt")
    assert sorted(tensors) == sorted(module.state_dict()) == ["0.bias", "0.weight", "2.bias", "2.weight"]


def test_containers_inside_themselves_or_shared_at_every_level_are_bounded(tmp_path):
    """A dict holding itself ends the walk; dicts shared at every level (2**60 paths) are refused, not walked."""
    loop: dict = {"w": torch.ones(1)}
    loop["again"] = loop
    torch.save(loop, tmp_path / "loop.pt")
    assert sorted(load_state_dict(tmp_path / "loop.pt")) == ["w"]
    level: dict = {}
    for _ in range(60):
        level = {"a": level, "b": level}
    level["w"] = torch.ones(1)
    torch.save(level, tmp_path / "shared.pt")
    assert (tmp_path / "shared.pt").stat().st_size < 10_000
    with pytest.raises(CheckpointError, match="more than 1,000,000 tensors and containers"):
        load_state_dict(tmp_path / "shared.pt")


class _Call:
    """Pickles as a call of ``func`` on ``args`` (the ``__reduce__`` a tensor uses), whatever the arguments."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize(("value", "message"), [
    (lambda ref: _Call(torch._utils._rebuild_tensor_v2, ref, 0, "abc", (1,), False, {}), "not a short tuple"),
    (lambda ref: _Call(torch._utils._rebuild_tensor_v2, ref, 0, (-1,), (1,), False, {}), "negative or non-integer"),
    (lambda ref: _Call(torch._utils._rebuild_tensor_v2, ref, 0, (2.5,), (1,), False, {}), "negative or non-integer"),
    (lambda ref: _Call(torch._utils._rebuild_tensor_v2, 7, 0, (1,), (1,), False, {}), "storage is not a storage"),
    (lambda ref: _Call(torch._utils._rebuild_tensor_v2, ref, -1, (1,), (1,), False, {}), "offset -1 is not"),
    (lambda ref: _Call(torch._utils._rebuild_tensor_v2, ref, 0, (2, 2), (1,), False, {}), "differ in length"),
    (lambda ref: _Call(torch._utils._rebuild_parameter, "weights", False, {}), "data is not a tensor"),
    (lambda ref: _Call(torch._tensor._rebuild_from_type_v2, torch.Size, torch.Tensor, ((1,),), {}),
     "outside the allow-list"),
])
def test_malformed_tensor_records_are_refused(tmp_path, value, message):
    storage = {"0": torch.zeros(4).numpy().tobytes()}
    path = _torch_zip(tmp_path / "bad.pt", _dumps_with_storage({"w": value(_PersistentRef())}), storage)
    with pytest.raises(CheckpointError, match=message):
        load_state_dict(path)


@pytest.mark.parametrize(("pid", "message"), [
    (("storage", torch.FloatStorage, "0", "cpu"), "unsupported persistent id"),
    (("module", torch.FloatStorage, "0", "cpu", 4), "unsupported persistent id"),
    (("storage", "FloatStorage", "0", "cpu", 4), "unsupported storage type"),
    (("storage", torch.FloatStorage, 0, "cpu", 4), "malformed storage reference"),
    (("storage", torch.FloatStorage, "0", "cpu", -4), "malformed storage reference"),
    (("storage", torch.FloatStorage, "9", "cpu", 4), "lacks storage 9: it is truncated"),
])
def test_malformed_storage_references_are_refused(tmp_path, pid, message):
    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol=2)
    pickler.persistent_id = lambda obj: pid if isinstance(obj, _PersistentRef) else None
    pickler.dump({"w": _FakeTensor((4,), (1,))})
    path = _torch_zip(tmp_path / "bad.pt", buf.getvalue(), {"0": torch.zeros(4).numpy().tobytes()})
    with pytest.raises(CheckpointError, match=message):
        load_state_dict(path)


def test_files_that_are_no_torch_checkpoint_say_what_they_are(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_torch_file(tmp_path / "absent.pt")
    (tmp_path / "legacy.pt").write_bytes(pickle.dumps({"w": 1}, protocol=2))  # pre-1.6 files start with a pickle
    with pytest.raises(CheckpointError, match="legacy .pre-1.6. format"):
        load_torch_file(tmp_path / "legacy.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="is not a torch checkpoint"):
        load_torch_file(tmp_path / "text.pt")
    with zipfile.ZipFile(tmp_path / "script.pt", "w") as zf:  # what torch.jit.save lays out
        zf.writestr("model/constants.pkl", b"")
        zf.writestr("model/code/__torch__.py", b"")
    with pytest.raises(CheckpointError, match="no data.pkl .a TorchScript archive"):
        load_torch_file(tmp_path / "script.pt")
    with zipfile.ZipFile(tmp_path / "deflated.pt", "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"w": 1}), compress_type=zipfile.ZIP_DEFLATED)
    with pytest.raises(CheckpointError, match="data.pkl is .* bytes and compressed; refused"):
        load_torch_file(tmp_path / "deflated.pt")
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        load_state_dict(tmp_path / "list.pt")
    torch.save({"step": 3}, tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match="holds no tensors"):
        load_state_dict(tmp_path / "empty.pt")


def test_a_storage_shorter_than_its_header_is_refused(tmp_path):
    torch.save({"w": torch.arange(1000, dtype=torch.float32)}, tmp_path / "ok.pt")
    assert torch.equal(load_state_dict(tmp_path / "ok.pt")["w"], torch.arange(1000, dtype=torch.float32))
    cut = _rewrite(tmp_path / "ok.pt", tmp_path / "cut.pt",
                   lambda n, d: (d[:100] if "/data/" in n else d, zipfile.ZIP_STORED))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_state_dict(cut)


def test_compressed_storages_are_refused_before_inflating(tmp_path):
    """A small file whose deflated storage would inflate to hundreds of MB: refused from the zip directory."""
    torch.save({"w": torch.zeros(50_000_000, dtype=torch.uint8)}, tmp_path / "big.pt")
    bomb = _rewrite(tmp_path / "big.pt", tmp_path / "bomb.pt",
                    lambda n, d: (d, zipfile.ZIP_DEFLATED if "/data/" in n else zipfile.ZIP_STORED))
    (tmp_path / "big.pt").unlink()
    assert bomb.stat().st_size < 1_000_000
    with pytest.raises(CheckpointError, match="compressed"):
        load_state_dict(bomb)


def test_stride_zero_views_are_refused(tmp_path):
    """torch.save of an expanded tensor: 4 bytes of storage, a billion elements once cloned."""
    torch.save({"w": torch.zeros(1).expand(1_000_000_000)}, tmp_path / "expand.pt")
    assert (tmp_path / "expand.pt").stat().st_size < 10_000
    with pytest.raises(CheckpointError, match="stride-0"):
        load_state_dict(tmp_path / "expand.pt")


@pytest.mark.parametrize(("offset", "size", "stride", "fits"), [
    (0, (4,), (1,), True), (0, (10,), (1,), False), (1, (3,), (1,), True), (1, (4,), (1,), False),
    (0, (2, 2), (2, 1), True), (0, (2, 2), (3, 1), False), (3, (1,), (1,), True), (4, (1,), (1,), False),
    (0, (0,), (1,), True), (9, (0, 3), (3, 1), True)])  # an empty view reaches nothing
def test_views_past_their_storage_are_refused(tmp_path, offset, size, stride, fits):
    """A view may reach the last element of its storage of 4 and no further."""
    storage = {"0": torch.arange(4.0).numpy().tobytes()}
    payload = _dumps_with_storage({"w": _FakeTensor(size, stride, offset)})
    path = _torch_zip(tmp_path / "past.pt", payload, storage)
    if fits:
        assert torch.equal(load_state_dict(path)["w"], torch.arange(4.0).as_strided(size, stride, offset))
    else:
        with pytest.raises(CheckpointError, match="reaches element"):
            load_state_dict(path)


def test_tensors_torch_saves_as_a_subclass_or_with_attributes_load(tmp_path):
    """torch.save writes a tensor that carries Python attributes through ``_rebuild_from_type_v2`` and a
    parameter through ``_rebuild_parameter``: both come back as their plain tensors (the attributes dropped)."""
    tagged = torch.arange(3.0)
    tagged.note = "kept by torch.save"
    torch.save({"w": tagged, "p": torch.nn.Parameter(torch.ones(2))}, tmp_path / "sub.pt")
    state = load_state_dict(tmp_path / "sub.pt")
    assert torch.equal(state["w"], torch.arange(3.0)) and torch.equal(state["p"], torch.ones(2))
    assert type(state["w"]) is torch.Tensor and type(state["p"]) is torch.Tensor


def test_a_state_dict_under_a_key_the_file_lacks_is_named(tmp_path):
    """SEARLE keeps its weights under "Phi": a file holding them under another key, or a list, says so."""
    torch.save({"phi": {"w": torch.zeros(2)}}, tmp_path / "other.pt")
    torch.save([{"w": torch.zeros(2)}], tmp_path / "list.pt")
    for name in ("other.pt", "list.pt"):
        with pytest.raises(CheckpointError, match=f"checkpoint .*{name} has no 'Phi' entry"):
            load_state_dict(tmp_path / name, key="Phi")
    assert torch.equal(load_state_dict(tmp_path / "other.pt", key="phi")["w"], torch.zeros(2))
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        load_state_dict(tmp_path / "list.pt")


class _FakeTensor:
    def __init__(self, size, stride, offset=0):
        self.size, self.stride, self.offset = size, stride, offset

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, (_PersistentRef(), self.offset, self.size, self.stride, False, {}))


class _PersistentRef:
    """Pickles as torch's persistent storage reference (FloatStorage, key "0", 4 elements)."""


def _persistent_id(obj):
    if isinstance(obj, _PersistentRef):
        return ("storage", torch.FloatStorage, "0", "cpu", 4)
    return None


def _dumps_with_storage(obj) -> bytes:
    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol=2)
    pickler.persistent_id = _persistent_id
    pickler.dump(obj)
    return buf.getvalue()


def test_big_endian_checkpoints_are_refused(tmp_path):
    torch.save({"w": torch.ones(3)}, tmp_path / "le.pt")
    be = _rewrite(tmp_path / "le.pt", tmp_path / "be.pt",
                  lambda n, d: (b"big" if n.endswith("byteorder") else d, zipfile.ZIP_STORED))
    with pytest.raises(CheckpointError, match="big-endian"):
        load_state_dict(be)


def test_non_finite_weights_are_refused(tmp_path, tiny_config):
    torch.save({"Phi": {"layers.0.weight": torch.tensor([[float("nan")]])}}, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match="non-finite"):
        load_state_dict(tmp_path / "nan.pt", "Phi")
    from cirbench.backbones import load_backbone

    bb = load_backbone(str(tiny_config), "none", device="cpu")
    state = {k: v.clone() for k, v in bb.model.state_dict().items()}
    state["logit_scale"] = torch.tensor(float("inf"))
    torch.save(state, tmp_path / "inf.pt")
    with pytest.raises(CirbenchError, match="non-finite"):
        load_backbone(str(tiny_config), str(tmp_path / "inf.pt"), device="cpu")


def test_nan_in_a_cirbench_checkpoint_is_refused(tmp_path):
    from cirbench.checkpoints import load_checkpoint, save_checkpoint

    save_checkpoint(tmp_path / "ck", {"w": torch.tensor([1.0, float("nan")])}, {"method": "m", "backbone": {}})
    with pytest.raises(CheckpointError, match="non-finite"):
        load_checkpoint(tmp_path / "ck", "m")


@pytest.mark.parametrize("change, said", [
    (lambda s: s.pop("1.bias"), "0 mismatched, 1 missing, 0 unexpected tensors (first: missing 1.bias)"),
    (lambda s: s.update(extra=torch.zeros(1)), "0 mismatched, 0 missing, 1 unexpected tensors (first: unexpected "
                                               "extra)"),
    (lambda s: s.update({"0.weight": torch.zeros(3, 5)}), "1 mismatched, 0 missing, 0 unexpected tensors (first: "
                                                           "0.weight (3, 5) vs (3, 4))"),
])
def test_weights_that_do_not_fit_the_module_name_the_first_misfit(change, said):
    from cirbench.checkpoints import load_module_weights

    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    tensors = {k: v.clone() + 1 for k, v in module.state_dict().items()}
    load_module_weights(module, dict(tensors), "ok.pt")
    assert all(torch.equal(module.state_dict()[k], v) for k, v in tensors.items())
    change(tensors)
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint bad.pt does not fit this backbone: {said}")):
        load_module_weights(module, tensors, "bad.pt")


def test_a_checkpoint_path_that_is_not_a_checkpoint_folder_says_why(tmp_path):
    from cirbench.checkpoints import load_checkpoint, save_checkpoint

    with pytest.raises(CheckpointError, match=r"checkpoint \S+nowhere not found$"):
        load_checkpoint(tmp_path / "nowhere", "m")
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "model.safetensors").write_bytes(b"xx")  # exists, but beside no config.json
    with pytest.raises(CheckpointError, match="is not a cirbench checkpoint: .* has no config.json "):
        load_checkpoint(tmp_path / "weights" / "model.safetensors", "m")
    with pytest.raises(CheckpointError, match="has no model.safetensors and no config.json"):
        load_checkpoint(tmp_path, "m")
    # a weights file of another name is never swapped for the model.safetensors beside it
    save_checkpoint(tmp_path / "ck", {"w": torch.ones(1)}, {"method": "m", "backbone": {}})
    (tmp_path / "ck" / "other.safetensors").write_bytes(b"xx")
    with pytest.raises(CheckpointError, match="other.safetensors is not a cirbench checkpoint: pass the folder"):
        load_checkpoint(tmp_path / "ck" / "other.safetensors", "m")
    assert torch.equal(load_checkpoint(tmp_path / "ck" / "model.safetensors", "m")[0]["w"], torch.ones(1))
    # a method that also reads its official release's file says so
    with pytest.raises(CheckpointError, match=r"other.safetensors is neither a cirbench checkpoint nor an official "
                                              r"\.pt/\.pth file: pass the folder .* or the official checkpoint$"):
        load_checkpoint(tmp_path / "ck" / "other.safetensors", "m", official_suffixes=(".pt", ".pth"))


@pytest.mark.parametrize("method", ["fti4cir", "pic2word", "context-i2w", "searle"])
def test_a_wrong_checkpoint_file_names_what_the_method_takes(tmp_path, method):
    (tmp_path / "notes.txt").write_text("not weights")
    res = CliRunner().invoke(cli, ["run", "-m", method, "-d", "shapes", "--checkpoint", str(tmp_path / "notes.txt"),
                                   "--output", str(tmp_path / "o"), "--quiet"])
    assert res.exit_code == 2, res.output
    assert "notes.txt is neither a cirbench checkpoint nor an official .pt/.pth" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not [p for p in (tmp_path / "o").rglob("*") if p.is_file()]  # no result written


def test_legacy_and_torchscript_files_get_a_clear_reason(tmp_path):
    torch.save({"w": torch.ones(1)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy"):
        load_torch_file(tmp_path / "old.pt")
    (tmp_path / "garbage.pt").write_bytes(b"hello")
    with pytest.raises(CheckpointError, match="not a torch checkpoint"):
        load_torch_file(tmp_path / "garbage.pt")


# -- bad values --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--alpha", "1.5"], "alpha"),
    (["--alpha", "nan"], "alpha"),
    (["--alpha", "-0.1"], "alpha"),
    (["--alpha", "0.9:0.1:0.1"], "stop >= start"),
    (["--alpha", "0:1:0"], "step > 0"),
    (["--alpha", "0:1:nan"], "alpha"),
    (["--batch-size", "0"], "batch-size"),
    (["--workers", "-2"], "workers"),
    (["--device", "tpu:7"], "device"),
    (["--device", "cuda:99"], "device"),
    (["--seed", "-5"], "seed"),
    (["--seed", str(2**40)], "seed"),
    (["--bootstrap", "99999999999999999999"], "bootstrap"),  # used to allocate until the machine ran out
    (["--queries", "99999999999999999999"], "queries"),  # used to generate until the disk or memory ran out
    (["--instances", "1000"], "instances"),
    (["--method", "cirevl", "--sampling-seed", "-1"], "sampling-seed"),
    (["--save-top", "ten"], "'ten' is neither a count of at least 1 nor 'all'"),
    (["--save-top", "0"], "'0' is neither a count of at least 1 nor 'all'"),
    (["--method", " , "], "--method names no method"),
    (["--dataset", ","], "--dataset names no dataset"),
    (["--method", "slerp,image-only", "--label", "mine"], "--label names one run: give it with a single --method"),
    (["--label", "a\nb"], "--label 'a\\nb' is no run name: text on one line, not blank"),  # broke table rows
    (["--label", " "], "--label ' ' is no run name"),
    (["--dataset", "cirr,circo", "--data-root", "cirr=/a", "--data-root", "cirr=/b"],
     "--data-root: dataset 'cirr' is given two folders (/a, /b)"),
])
def test_bad_values_are_one_line_errors(tmp_path, args, message):
    res = CliRunner().invoke(cli, ["run", "--output", str(tmp_path / "o"), "--quiet", *args])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output and "internal error" not in res.output
    assert len(res.output.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["bench", "--section", "rank", "--gallery", "99999999999999999999"], "--gallery"),  # overflowed inside torch
    (["bench", "--section", "rank", "--dim", "99999999999999999999"], "--dim"),
    (["bench", "--section", "rank", "--reps", "99999999999999999999"], "--reps"),  # ran until stopped
    (["compare", "a.json", "b.json", "--replicates", "10000000"], "--replicates"),
    # train --workers 1e20 forked readers until the main process died, and left them behind as orphans
    (["run", "--workers", "99999999999999999999"], "--workers"),
    (["train", "-m", "slerp-tat", "--corpus", "c.csv", "-o", "o", "--workers", "100000"], "--workers"),
    (["bench", "--workers", "100000"], "--workers"),
])
def test_sizes_of_other_commands_have_ceilings(args, message):
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2 and message in res.output and "is not in the range" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1


def test_bench_ranks_a_gallery_smaller_than_its_top_k():
    """`bench --section rank` keeps a run's top 50; a smaller gallery (a quick try) stopped on topk's "selected index
    k out of range": its whole gallery is ranked instead, and the rankings say so."""
    import json

    res = CliRunner().invoke(cli, ["bench", "--section", "rank", "--queries", "2", "--gallery", "3", "--dim", "8",
                                   "--reps", "1", "--whole", "--json"])
    assert res.exit_code == 0, res.output
    rank = json.loads(res.output)["rank"]
    assert rank["k"] == 3 and rank["gallery"] == 3 and rank["whole"]["stream_equals_whole"] is True


def test_bench_agreement_of_a_single_image_and_a_cache_section_without_rows(tiny_config, tmp_path):
    """fp32 vs bf16 agreement on one image: its cosine, and no rank overlap (it has no neighbours; the division by
    their count stopped the bench); `--section cache` without `--cache-rows` printed nothing: now it says what to
    give."""
    import json

    res = CliRunner().invoke(cli, ["bench", "--section", "encode", "--model", str(tiny_config), "--pretrained",
                                   "none", "--images", "1", "--batch-size", "1", "--workers", "0", "--reps", "1",
                                   "--no-official", "--agreement", "--folder", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    agreement = json.loads(res.output.strip().splitlines()[-1])["encode"]["agreement"]
    assert 0.9 < agreement["cosine_min"] <= 1 + 1e-6 and not [k for k in agreement if k.startswith("top")]
    res = CliRunner().invoke(cli, ["bench", "--section", "cache"])
    assert res.exit_code == 2 and "--section cache measures the cache at --cache-rows images" in res.output


def test_multi_line_library_errors_are_reduced_to_one_line(monkeypatch):
    from cirbench.errors import CheckpointError as CE

    @cli.command("explode-test")
    def explode():
        raise CE("first line of a long story\nsecond line\nthird line")

    try:
        res = CliRunner().invoke(cli, ["explode-test"])
        assert res.exit_code == 2 and res.output.strip() == "error: first line of a long story"
        monkeypatch.setenv("CIRBENCH_DEBUG", "1")
        res = CliRunner().invoke(cli, ["explode-test"])
        assert "third line" in res.output
    finally:
        cli.commands.pop("explode-test", None)


@pytest.mark.parametrize("exc", [
    MemoryError(),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                 "tried to allocate 3377699720527872 bytes. Error code 12 (Cannot allocate memory)"),
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    RuntimeError("Caught MemoryError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                 "  File ...\nMemoryError"),
])
def test_running_out_of_memory_is_the_machines_limit_not_an_internal_error(exc):
    @cli.command("oom-test")
    def oom():
        raise exc

    try:
        res = CliRunner().invoke(cli, ["oom-test"])
    finally:
        cli.commands.pop("oom-test", None)
    assert res.exit_code == 1 and res.output.startswith("error: out of memory") and "internal" not in res.output
    assert "--batch-size" in res.output and len(res.output.strip().splitlines()) == 1, res.output


class _FailingReads(torch.utils.data.Dataset):
    """Item 0 raises an error whose constructor takes several arguments (torch re-raises a RuntimeError for
    it), item 1 one it rebuilds from its message (re-raised as itself, with the worker's traceback as text),
    item 2 an error that is no cirbench error (a bug: an internal error, named by its own type and line)."""

    def __len__(self):
        return 3

    def __getitem__(self, i):
        from cirbench.errors import ImageError, UnknownNameError

        if i == 0:
            raise UnknownNameError("image decoder", "torchcodc", ["torchcodec", "pil"])
        if i == 1:
            raise ImageError("corrupt or unreadable image a.jpg: broken data stream")
        raise ValueError("a bug in a plugin's reader")


@pytest.mark.parametrize("item, message", [
    (0, "error: unknown image decoder 'torchcodc' (did you mean 'torchcodec'?); valid: pil, torchcodec"),
    (1, "error: corrupt or unreadable image a.jpg: broken data stream"),
    (2, "internal error: ValueError: a bug in a plugin's reader (in a DataLoader worker) (set CIRBENCH_DEBUG=1 for "
        "the traceback)")])
def test_errors_raised_in_reader_processes_are_one_line_errors(item, message):
    """A cirbench error raised in a DataLoader worker reaches the CLI as torch's "Caught X in DataLoader worker
    process 0. Original Traceback ..." text: the user sees the original line and exit code 2, not an internal
    error or the first line of torch's wrapper."""

    @cli.command("reader-test")
    def reader():
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(_FailingReads(), [item]), num_workers=1)
        list(loader)

    try:
        res = CliRunner().invoke(cli, ["reader-test"])
        assert res.exit_code == (1 if item == 2 else 2) and res.output.strip() == message, res.output
    finally:
        cli.commands.pop("reader-test", None)


def test_image_files_that_are_empty_or_lead_to_a_look_alike_folder_are_refused(tmp_path):
    """A sibling folder whose name starts with the data root's (``data`` and ``data-old``) is outside it."""
    from cirbench.errors import ImageError
    from cirbench.images import read_image_bytes
    from cirbench.types import ImageRef

    root, twin = tmp_path / "data", tmp_path / "data-old"
    (root / "img").mkdir(parents=True)
    twin.mkdir()
    (twin / "a.png").write_bytes(b"\x89PNG from elsewhere")
    (root / "inside.png").write_bytes(b"\x89PNG inside")
    (root / "img" / "empty.png").write_bytes(b"")
    (root / "img" / "linked.png").symlink_to(twin / "a.png")
    (root / "img" / "ok.png").symlink_to(root / "inside.png")
    (root / "twin").symlink_to(twin)
    assert read_image_bytes(ImageRef("ok", root / "img" / "ok.png", root=root)) == b"\x89PNG inside"
    with pytest.raises(ImageError, match=r"empty\.png is empty \(0 bytes\)"):
        read_image_bytes(ImageRef("empty", root / "img" / "empty.png", root=root))
    with pytest.raises(ImageError, match="is a link that leads outside the data root"):
        read_image_bytes(ImageRef("linked", root / "img" / "linked.png", root=root))
    with pytest.raises(ImageError, match="is in a folder that links outside the data root"):
        read_image_bytes(ImageRef("twin", root / "twin" / "a.png", root=root))


def test_a_link_inside_the_data_root_to_nothing_a_nul_in_a_name_and_many_missing_images_are_said_plainly(tmp_path):
    """A link inside the data root whose target is gone is unreadable (named), a name holding NUL is refused before
    any file is touched, and a list of missing images names the first in full, then four, then how many more."""
    from cirbench.errors import ImageError
    from cirbench.images import check_inside, describe_missing, read_image_bytes
    from cirbench.types import ImageRef

    root = tmp_path / "data"
    root.mkdir()
    (root / "gone.png").symlink_to(root / "was-here.png")
    with pytest.raises(ImageError, match=r"cannot read image .*gone\.png: No such file"):
        read_image_bytes(ImageRef("gone", root / "gone.png", root=root))
    with pytest.raises(ImageError, match="contains a NUL character"):
        check_inside(root, "a\x00.png")
    missing = [ImageRef(str(i), root / f"{i}.jpg") for i in range(8)]
    assert describe_missing(missing, 100) == (f"8 of 100 images are missing: {root / '0.jpg'}, 1.jpg, 2.jpg, 3.jpg, "
                                              "4.jpg (and 3 more)")
    assert describe_missing([], 100) == "0 of 100 images are missing"


def test_files_written_as_one_set_are_all_replaced_or_none(tmp_path, monkeypatch):
    """A checkpoint's weights and config.json (as a result and its predictions) are one set: a disk that fills on
    the second file leaves the earlier set whole, with no temporary file beside it, and then a write with space
    replaces both."""
    import os

    from cirbench.checkpoints import CONFIG, WEIGHTS, load_checkpoint, save_checkpoint

    folder = save_checkpoint(tmp_path / "ckpt", {"w": torch.zeros(3)}, {"method": "pic2word", "step": 1})
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    fsync, calls = os.fsync, []

    def full_on_the_second(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return fsync(fd)

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", full_on_the_second)
        with pytest.raises(OSError, match="No space"):
            save_checkpoint(folder, {"w": torch.ones(3)}, {"method": "pic2word", "step": 2})
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before and sorted(before) == sorted([WEIGHTS,
                                                                                                      CONFIG])
    save_checkpoint(folder, {"w": torch.ones(3)}, {"method": "pic2word", "step": 2})
    tensors, config = load_checkpoint(folder, "pic2word")
    assert torch.equal(tensors["w"], torch.ones(3)) and config["step"] == 2


def _with_bom(folder, suffixes=(".csv", ".txt")) -> int:
    """Start every text file under ``folder`` with a UTF-8 byte-order mark, as Excel's "CSV UTF-8" saves it."""
    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix in suffixes]
    for p in files:
        p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes())
    return len(files)


@pytest.mark.parametrize("name", ["icir", "patterncom", "dc-nico"])
def test_annotation_lists_saved_with_a_byte_order_mark_read_the_same(tmp_path, name):
    """The mark became an invisible first character of the first image name ("missing image \\ufeffnico/...")."""
    from test_domain_conversion import write_benchmark
    from test_icir import write_icir
    from test_patterncom import write_patternnet

    from cirbench.plugins import get_registry

    write = {"icir": lambda r: write_icir(r), "patterncom": write_patternnet, "dc-nico": write_benchmark}[name]
    options = {"source": "autumn", "target": "rock"} if name == "dc-nico" else {}

    def loaded(root):
        spec = get_registry().dataset(name)
        sets = spec.create(root, {**{o.name: o.default for o in spec.options}, **options}).load(spec.splits[0])
        sets = sets if isinstance(sets, list) else [sets]
        return [(s.name, [(q.id, q.reference, q.text, q.targets) for q in s.queries], [g.id for g in s.gallery])
                for s in sets]

    write(tmp_path / "plain")
    write(tmp_path / "bom")
    assert _with_bom(tmp_path / "bom") > 0
    assert loaded(tmp_path / "bom") == loaded(tmp_path / "plain")


def test_a_corpus_saved_with_a_byte_order_mark_reads_its_header(tmp_path):
    from cirbench.corpora import open_corpus
    from cirbench.preprocess import Preprocessor
    from cirbench.testing import write_toy_corpus

    path = write_toy_corpus(tmp_path)
    plain = open_corpus(path, Preprocessor("clip", 8))
    _with_bom(tmp_path)
    marked = open_corpus(path, Preprocessor("clip", 8))  # its first column was "\ufeffimage": no image column
    assert len(marked) == len(plain) == 12
    assert [marked[i]["caption"] for i in range(3)] == [plain[i]["caption"] for i in range(3)]
