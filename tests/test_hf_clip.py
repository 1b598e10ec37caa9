"""--pretrained hf:REPO_OR_FOLDER: CLIP weights saved by transformers, read into open_clip, give transformers' own
features; what is not such a checkpoint is one line."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from generation_models import TINY_HF, save_hf_clip

from cirbench.backbones import load_backbone, weights_status
from cirbench.errors import CirbenchError


def official_features(model, pixels, tokens):
    """CLIPModel.get_image_features / get_text_features as the BGE-VL code computes them: the pooled output of each
    tower through its projection (the text pooled at its end token, the padding masked)."""
    mask = (tokens != 0).long()
    mask[:, 0] = 1
    with torch.no_grad():
        image = model.visual_projection(model.vision_model(pixel_values=pixels)[1])
        text = model.text_projection(model.text_model(input_ids=tokens, attention_mask=mask)[1])
    return image, text


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_a_transformers_clip_gives_its_own_features_through_open_clip(tmp_path, tiny_config, act):
    hf = save_hf_clip(tmp_path / "clip", act)
    bb = load_backbone(str(tiny_config), f"hf:{tmp_path / 'clip'}", device="cpu")
    assert bb.activation == act and bb.weights_identity["kind"] == "transformers"
    assert len(bb.weights_identity["sha256"]) == 64 and bb.weights_identity["source"] == f"hf:{tmp_path / 'clip'}"
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    texts = ["a red dress", "make it blue and add a much longer description of the change", "x"]
    image, text = official_features(hf, pixels, bb.tokenize(texts))
    torch.testing.assert_close(bb.encode_image(pixels), F.normalize(image, dim=-1), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(bb.encode_text(texts), F.normalize(text, dim=-1), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(bb.model.logit_scale, hf.logit_scale)


def test_a_bin_checkpoint_loads_and_misfits_are_one_line(tmp_path, tiny_config):
    save_hf_clip(tmp_path / "bin", safetensors=False)
    assert (tmp_path / "bin" / "pytorch_model.bin").is_file()
    load_backbone(str(tiny_config), f"hf:{tmp_path / 'bin'}", device="cpu")

    def refused(match, pretrained):
        with pytest.raises(CirbenchError, match=match) as info:
            load_backbone(str(tiny_config), pretrained, device="cpu")
        assert "\n" not in str(info.value)

    save_hf_clip(tmp_path / "wide", hidden_size=48)
    refused("do not fit this backbone", f"hf:{tmp_path / 'wide'}")
    (tmp_path / "empty").mkdir()
    refused("needs config.json and model.safetensors or pytorch_model.bin", f"hf:{tmp_path / 'empty'}")
    from transformers import CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(**TINY_HF["vision_config"])).save_pretrained(tmp_path / "vision")
    refused("not a CLIPModel's", f"hf:{tmp_path / 'vision'}")  # its config has no text_config
    config = json.loads((tmp_path / "bin" / "config.json").read_text())
    (tmp_path / "vision" / "config.json").write_text(json.dumps(config))
    refused("is not a tensor of transformers' CLIPModel", f"hf:{tmp_path / 'vision'}")
    config["text_config"]["hidden_act"] = "relu"
    (tmp_path / "bin" / "config.json").write_text(json.dumps(config))
    refused("activations", f"hf:{tmp_path / 'bin'}")
    refused("neither a folder nor a Hugging Face hub repository id", "hf:no-such-thing")


def test_a_hub_repository_offline_is_one_line_and_the_dry_run_says_so(tmp_path, tiny_config, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(CirbenchError, match=r"cannot get the config of BAAI/BGE-VL-base.*--pretrained PATH") as info:
        load_backbone(str(tiny_config), "hf:BAAI/BGE-VL-base", device="cpu")
    assert "\n" not in str(info.value)
    assert weights_status(str(tiny_config), "hf:BAAI/BGE-VL-base").startswith("NOT AVAILABLE")
    save_hf_clip(tmp_path / "local")
    assert weights_status(str(tiny_config), f"hf:{tmp_path / 'local'}").startswith("a local folder")


def test_a_run_on_transformers_weights_records_them(tmp_path, tiny_config, toy_root):
    from helpers import registered
    from toy_plugin import ToyPlugin

    from cirbench.cli import cli

    save_hf_clip(tmp_path / "clip")
    with registered(ToyPlugin(), "toy"):
        res = CliRunner().invoke(cli, ["run", "--method", "image-only", "--dataset", "toy", "--data-root",
                                       str(toy_root), "--backbone", str(tiny_config), "--pretrained",
                                       f"hf:{tmp_path / 'clip'}", "--no-cache", "--quiet", "--output",
                                       str(tmp_path / "res")])
    assert res.exit_code == 0, res.output
    (result,) = (tmp_path / "res").rglob("image-only*.json")
    weights = json.loads(result.read_text())["backbone"]["weights"]
    assert weights["kind"] == "transformers" and len(weights["config_sha256"]) == 64


def test_a_hub_repository_saved_as_bin_loads_from_the_hub_cache(tmp_path, tiny_config, monkeypatch):
    """A hub repository without model.safetensors (saved by an older transformers as pytorch_model.bin) is read
    from the Hugging Face cache offline, as the same files in a folder are."""
    import shutil

    import huggingface_hub.constants

    from cirbench import hub

    save_hf_clip(tmp_path / "bin", safetensors=False)
    snapshot = tmp_path / "hub" / "models--lab--tiny-clip" / "snapshots" / ("c" * 40)
    snapshot.mkdir(parents=True)
    for name in ("config.json", "pytorch_model.bin"):
        shutil.copy(tmp_path / "bin" / name, snapshot / name)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("c" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    from cirbench.hf_clip import files_of

    assert files_of("hf:lab/tiny-clip") == (snapshot / "config.json", snapshot / "pytorch_model.bin")
    from_hub = load_backbone(str(tiny_config), "hf:lab/tiny-clip", device="cpu")
    from_folder = load_backbone(str(tiny_config), f"hf:{tmp_path / 'bin'}", device="cpu")
    assert from_hub.weights_identity["sha256"] == from_folder.weights_identity["sha256"]
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(from_hub.encode_image(pixels), from_folder.encode_image(pixels))
