"""The example plugin's own tests, written with the fixtures cirbench ships for plugin authors
(``cirbench.testing``: a tiny backbone config, a toy dataset, in-process plugin registration)."""

from __future__ import annotations

import json

import cirbench_example_plugin
import torch
from click.testing import CliRunner

from cirbench.cli import cli
from cirbench.evaluate import RunConfig, evaluate


def _run(cirbench_toy, root, config, tmp_path, weight):
    cfg = RunConfig(method="weighted-sum", dataset="toy", split="val", backbone=str(config), pretrained="none",
                    data_root=root, output=tmp_path / "r", cache_dir=tmp_path / "c", workers=0, progress=False,
                    method_options={"weight": weight})
    return evaluate(cfg, cirbench_toy)


def test_weights_0_and_1_are_the_single_modality_baselines(cirbench_toy, cirbench_toy_root, cirbench_tiny_config,
                                                            tmp_path):
    cirbench_toy.register_plugin(cirbench_example_plugin, name="example")
    zero, one = _run(cirbench_toy, cirbench_toy_root, cirbench_tiny_config, tmp_path, "0,1")
    cfg = RunConfig(method="image-only", dataset="toy", split="val", backbone=str(cirbench_tiny_config),
                    pretrained="none", data_root=cirbench_toy_root, output=tmp_path / "r", cache_dir=tmp_path / "c",
                    workers=0, progress=False)
    (image_only,) = evaluate(cfg, cirbench_toy)
    scores = [torch.tensor([json.loads(line)["scores"] for line in o.predictions_path.read_text().splitlines()])
              for o in (zero, image_only)]
    assert torch.allclose(scores[0], scores[1], atol=1e-5)
    assert zero.label == "weighted-sum@weight=0.0" and one.label == "weighted-sum@weight=1.0"
    assert one.metrics["R@1"] != zero.metrics["R@1"] or one.metrics["mAP@5"] != zero.metrics["mAP@5"]


def test_the_command_is_added_and_bad_weights_are_refused(cirbench_toy, cirbench_toy_root, cirbench_tiny_config,
                                                          tmp_path):
    cirbench_toy.register_plugin(cirbench_example_plugin, name="example")
    res = CliRunner().invoke(cli, ["run", "--method", "weighted-sum", "--dataset", "toy", "--backbone",
                                   str(cirbench_tiny_config), "--pretrained", "none", "--data-root",
                                   str(cirbench_toy_root), "--output", str(tmp_path / "r"), "--weight", "1.5"])
    assert res.exit_code == 2 and "--weight" in res.output and "maximum" in res.output


def test_the_method_meets_what_cirbench_asks_of_a_plugin(cirbench_toy, tmp_path):
    """One call checks the contract: valid features, the shared backbone left alone, deterministic, and the same
    numbers alone as beside another method in one command."""
    from cirbench.testing import check_method

    cirbench_toy.register_plugin(cirbench_example_plugin, name="example")
    (outcome,) = check_method("weighted-sum", tmp_path, options={"weight": 0.5}, registry=cirbench_toy)
    assert outcome.label == "weighted-sum@weight=0.5"
