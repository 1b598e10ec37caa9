"""The trainable example method: trained by `cirbench train`, evaluated through its --checkpoint."""

from __future__ import annotations

import json

import cirbench_example_plugin
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from cirbench.cli import cli
from cirbench.testing import TOY_COLOURS, check_method, train_for_check


def _corpus(root, folder):
    """Image-caption pairs over the toy dataset's images: "a <colour> picture"."""
    rows = ["image,caption"] + [f"{root / 'images' / f'img_{colour}_{j}.png'},a {colour} picture"
                                for colour in TOY_COLOURS for j in range(3)]
    path = folder / "pairs.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_trained_with_cirbench_train_and_evaluated_with_its_checkpoint(cirbench_toy, cirbench_toy_root,
                                                                       cirbench_tiny_config, tmp_path):
    cirbench_toy.register_plugin(cirbench_example_plugin, name="example")
    backbone = ["--backbone", str(cirbench_tiny_config), "--pretrained", "none"]
    out = tmp_path / "adapter"
    res = CliRunner().invoke(cli, ["train", "--method", "text-adapter", "--corpus", str(_corpus(cirbench_toy_root,
                                   tmp_path)), "--output", str(out), *backbone, "--batch-size", "4", "--accum-steps",
                                   "2", "--max-steps", "3", "--lr", "1e-2", "--temperature", "0.05", "--workers", "0",
                                   "--quiet"])
    assert res.exit_code == 0, res.output
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "text-adapter" and config["step"] == 3 and config["options"] == {"temperature": 0.05}
    weight = load_file(str(out / "model.safetensors"))["weight"]
    assert (weight - torch.eye(weight.shape[0])).abs().max() > 0  # it moved off the identity

    res = CliRunner().invoke(cli, ["run", "--method", "text-adapter", "--checkpoint", str(out), "--dataset", "toy",
                                   "--data-root", str(cirbench_toy_root), *backbone, "--output", str(tmp_path / "r"),
                                   "--workers", "0", "--quiet", "--no-leaderboard"])
    assert res.exit_code == 0, res.output
    (result,) = (tmp_path / "r" / "toy" / "val").glob("*.json")
    info = json.loads(result.read_text())["method"]["info"]["checkpoint"]
    assert len(info["sha256"]) == 64
    check_method("text-adapter", tmp_path / "contract", options={"checkpoint": str(out)}, registry=cirbench_toy)

    res = CliRunner().invoke(cli, ["run", "--method", "text-adapter", "--dataset", "toy", "--data-root",
                                   str(cirbench_toy_root), *backbone, "--output", str(tmp_path / "r")])
    assert res.exit_code == 2 and "needs --checkpoint" in res.output and "Traceback" not in res.output


def test_the_contract_holds_for_weights_trained_on_the_toy_corpus(cirbench_toy, tmp_path):
    """What `cirbench check --method text-adapter --train` does: two training steps on the toy corpus with the
    check's tiny CLIP, then the contract checks with that checkpoint."""
    cirbench_toy.register_plugin(cirbench_example_plugin, name="example")
    folder = tmp_path / "check"
    trained = train_for_check("text-adapter", folder, {"temperature": "0.05"}, registry=cirbench_toy)
    assert json.loads((trained / "config.json").read_text())["options"] == {"temperature": 0.05}
    check_method("text-adapter", folder, options={"checkpoint": str(trained)}, registry=cirbench_toy)
