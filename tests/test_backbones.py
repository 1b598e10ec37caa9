"""Backbones: identity, weights files, offline downloads fail fast and clearly."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch
from safetensors.torch import save_file

from cirbench import backbones
from cirbench.backbones import load_backbone
from cirbench.errors import CheckpointError, CirbenchError


def test_random_init_identity_and_encoders(tiny_config):
    bb = load_backbone(str(tiny_config), "none", device="cpu", seed=3)
    ident = bb.identity()
    assert ident["model"] == "cirbench-tiny-test" and ident["weights"] == {"kind": "random-init", "seed": 3}
    assert len(ident["config_sha256"]) == 64
    feats = bb.encode_text(["make it red", "make it blue", "make it red"])
    assert feats.shape == (3, 32) and torch.allclose(feats.norm(dim=-1), torch.ones(3))
    assert torch.equal(feats[0], feats[2])
    img = bb.encode_image(torch.randn(2, 3, 32, 32))
    assert img.shape == (2, 32)
    assert bb.precision == "fp32" and bb.slug == "cirbench-tiny-test-none"


def test_weights_file_round_trip_and_mismatch(tmp_path, tiny_config):
    src = load_backbone(str(tiny_config), "none", device="cpu", seed=1)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(weights))
    loaded = load_backbone(str(tiny_config), str(weights), device="cpu", seed=99)
    assert loaded.identity()["weights"]["kind"] == "file"
    assert len(loaded.identity()["weights"]["sha256"]) == 64
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(src.encode_image(x), loaded.encode_image(x))

    other_cfg = tmp_path / "cirbench-tiny-other.json"
    cfg = json.loads(tiny_config.read_text())
    cfg["vision_cfg"]["width"] = 48
    other_cfg.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="do not fit this backbone"):
        load_backbone(str(other_cfg), str(weights), device="cpu")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_backbone(str(tiny_config), str(tmp_path / "nope.safetensors"), device="cpu")
    (tmp_path / "junk.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read weights"):
        load_backbone(str(tiny_config), str(tmp_path / "junk.safetensors"), device="cpu")


def test_offline_pretrained_tag_fails_fast_with_a_clear_message(monkeypatch):
    monkeypatch.setattr(backbones, "_weights_reachable", lambda: False)
    monkeypatch.setattr(backbones, "_weights_cached", lambda cfg, cache_dir: False)
    start = time.perf_counter()
    with pytest.raises(CirbenchError, match="cannot download pretrained weights 'openai' for ViT-B-32.*no network"):
        load_backbone("ViT-B-32", "openai", device="cpu")
    assert time.perf_counter() - start < 30


def test_remoteclip_weights_come_from_the_hub_and_fail_offline_with_the_file_to_fetch(monkeypatch, tmp_path,
                                                                                   tiny_config):
    """``--pretrained remoteclip``: RemoteCLIP's state dict for the model, from the hub (or its cache), built with
    the activation open_clip gives the model name (RemoteCLIP's own loading); offline, one line naming the file
    and ``--pretrained PATH``; a model RemoteCLIP has no weights for is refused."""
    from cirbench import hub

    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    with pytest.raises(CheckpointError, match=r"cannot get RemoteCLIP's weights \(https://huggingface.co/chendelong"
                                              rf"/RemoteCLIP/blob/{backbones.REMOTECLIP_REVISION}/RemoteCLIP-ViT-B-32"
                                              r".pt\).* --pretrained PATH"):
        load_backbone("ViT-B-32", "remoteclip", device="cpu")
    with pytest.raises(CirbenchError, match="RemoteCLIP has weights for RN50, ViT-B-32, ViT-L-14, not ViT-B-16"):
        load_backbone("ViT-B-16", "remoteclip", device="cpu")
    src = load_backbone(str(tiny_config), "none", device="cpu", seed=5)
    weights = tmp_path / "RemoteCLIP-cirbench-tiny-test.pt"
    torch.save(src.model.state_dict(), weights)
    asked = []
    monkeypatch.setattr(backbones, "REMOTECLIP", (*backbones.REMOTECLIP[:3], {"cirbench-tiny-test": "ab" * 32}))
    monkeypatch.setattr(hub, "hub_file", lambda *args, **kw: asked.append((args, kw)) or weights)
    bb = load_backbone(str(tiny_config), "remoteclip", device="cpu", seed=0)
    assert asked == [(("chendelong/RemoteCLIP", "RemoteCLIP-cirbench-tiny-test.pt", "RemoteCLIP's weights",
                       "pretrained"), {"revision": backbones.REMOTECLIP_REVISION, "sha256": "ab" * 32})]
    assert bb.identity()["weights"] == {"kind": "hub-file", "tag": "remoteclip", "sha256": backbones.file_sha256(
        weights), "source": "hf-hub:chendelong/RemoteCLIP/RemoteCLIP-cirbench-tiny-test.pt"}
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(src.encode_image(x), bb.encode_image(x))


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(CirbenchError, match="unknown pretrained tag for ViT-B-32 'nosuchtag'.*openai"):
        load_backbone("ViT-B-32", "nosuchtag", device="cpu")
    with pytest.raises(CirbenchError, match="unknown backbone 'ViT-Q-99'"):
        load_backbone("ViT-Q-99", "none", device="cpu")
    with pytest.raises(CirbenchError, match="unknown precision"):
        load_backbone("ViT-B-32", "none", device="cpu", precision="fp8")


@pytest.mark.parametrize("content, message", [
    (b"\x93\x00binary", "is not valid JSON"),
    (b"[" * 100_000, "is not valid JSON: nested too deeply"),
    (b"[]", "is not an open_clip model config (it needs embed_dim, vision_cfg, text_cfg)"),
    (json.dumps({"embed_dim": 64, "vision_cfg": {}}).encode(), "is not an open_clip model config"),
])
def test_a_bad_backbone_config_file_says_what_is_wrong(tmp_path, content, message):
    """Not the list of every open_clip model (what open_clip says of a config it silently did not register)."""
    path = tmp_path / "model.json"
    path.write_bytes(content)
    with pytest.raises(CirbenchError, match=re.escape(f"backbone config {path} {message}")):
        load_backbone(str(path), "none", device="cpu")


def test_fp32_view_shares_the_weights_and_evaluates_as_a_fresh_fp32_backbone(tiny_config, toy_root, tmp_path):
    """What a training run (bf16 autocast over fp32 weights) validates through: its own model, not a copy, in
    fp32 with a text memo of its own; features equal those of the same backbone loaded for ``cirbench run``."""
    from cirbench.evaluate import Evaluator, Loaded, RunConfig, backbone_key
    from cirbench.testing import ToyDatasetPlugin, registered

    training = load_backbone(str(tiny_config), "none", device="cpu", precision="bf16", seed=3, training=True)
    training.encode_text(["a red cube"])  # a bf16 feature in the training backbone's memo
    view = training.fp32_view()
    assert view.model is training.model and view.precision == "fp32" and not view._text_memo
    fresh = load_backbone(str(tiny_config), "none", device="cpu", precision="fp32", seed=3)
    assert torch.equal(view.encode_text(["a red cube"]), fresh.encode_text(["a red cube"]))
    assert not torch.equal(view.encode_text(["a red cube"]), training.encode_text(["a red cube"]))
    pixels = torch.rand(2, 3, 32, 32)
    assert torch.equal(view.encode_image(pixels), fresh.encode_image(pixels))
    with pytest.raises(ValueError, match="no fp32 view"):
        load_backbone(str(tiny_config), "none", device="cpu", precision="bf16").fp32_view()
    # an evaluation finds a loaded backbone by what its configuration names, and loads another for anything else
    loaded = Loaded()
    loaded.backbones[backbone_key(str(tiny_config), "none", "fp32", "cpu", 3)] = view
    for precision, reused in (("fp32", True), ("bf16", False)):
        cfg = RunConfig(method="slerp", dataset="toy", data_root=str(toy_root), backbone=str(tiny_config),
                        pretrained="none", precision=precision, device="cpu", seed=3, output=str(tmp_path / "out"),
                        use_cache=False, progress=False, bootstrap=0)
        evaluator = Evaluator(cfg, loaded=loaded)
        with registered(ToyDatasetPlugin(), "toy"):
            evaluator.run()
        assert (evaluator.backbone is view) == reused and evaluator.backbone.precision == precision


def test_texts_encoded_in_small_batches_are_encoded_alike(tiny_config):
    """Texts encoded a few at a time, memoised or not, raw rows or normalised features, equal one batch's: every
    text once, in order (repeats included)."""
    backbone = load_backbone(str(tiny_config), "none", device="cpu", seed=0)
    texts = [f"a photo of {i % 7} things" for i in range(17)]
    with torch.no_grad():
        want = backbone.model.encode_text(backbone.tokenize(texts)).float()
    rows = backbone.encode_text_rows(texts, batch_size=3)
    assert torch.allclose(rows, want, atol=1e-5)
    for memoize in (False, True):
        feats = backbone.encode_text(texts, batch_size=2, memoize=memoize)
        assert torch.allclose(feats, torch.nn.functional.normalize(want, dim=-1), atol=1e-5), memoize


@pytest.mark.parametrize(("model", "tag", "repo", "cached"), [
    ("ViT-B-32", "openai", "timm/vit_base_patch32_clip_224.openai", "open_clip_model.safetensors"),
    ("ViT-B-32", "openai", "timm/vit_base_patch32_clip_224.openai", "open_clip_pytorch_model.bin"),
    ("ViTamin-S", "datacomp1b", "jienengchen/ViTamin-S", "pytorch_model.bin"),  # hf_hub names a file of the repo
    ("ViTamin-S", "datacomp1b", "jienengchen/ViTamin-S", "pytorch_model.safetensors"),  # its safetensors twin
])
def test_an_open_clip_tags_weights_in_the_hub_cache_are_found_offline(monkeypatch, tmp_path, model, tag, repo,
                                                                       cached):
    """Weights fetched on a connected machine are found in the hub cache where open_clip's
    download_pretrained_from_hf looks (``org/name/`` or ``org/name/file``, safetensors first): --dry-run says so and
    an offline load is not refused for want of a network. A file open_clip would not read is not taken for them."""
    import huggingface_hub.constants

    root = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(backbones, "_weights_reachable", lambda: False)
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text("not weights")
    assert backbones.weights_status(model, tag).startswith("NOT AVAILABLE: no network")
    (snapshot / cached).write_bytes(b"weights")
    assert backbones.weights_status(model, tag) == f"in the local cache ({open_clip_hub(model, tag)})"
    assert backbones._tag_source(open_clip_cfg(model, tag), tag, model, None) == open_clip_hub(model, tag)


def open_clip_cfg(model, tag):
    import open_clip

    return open_clip.get_pretrained_cfg(model, tag)


def open_clip_hub(model, tag):
    return open_clip_cfg(model, tag)["hf_hub"]
