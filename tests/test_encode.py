"""The batched (GPU-style) encode path: same features as the per-image worker path, same error handling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cirbench.backbones import load_backbone
from cirbench.errors import ImageError
from cirbench.features import decode_batch, encode_images
from cirbench.preprocess import Preprocessor
from cirbench.types import ImageRef


@pytest.fixture
def image_files(tmp_path):
    rng = np.random.default_rng(0)
    refs = []
    for i, (w, h) in enumerate([(64, 48), (48, 64), (64, 48), (50, 50), (80, 30), (64, 48)]):
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        path = tmp_path / (f"{i}.jpg" if i % 3 else f"{i}.png")
        Image.fromarray(arr).save(path, quality=90)
        refs.append(ImageRef(str(i), path))
    return refs


@pytest.mark.parametrize("kind", ["clip", "targetpad"])
def test_batched_path_matches_worker_path(image_files, tiny_config, kind):
    bb = load_backbone(str(tiny_config), "none", device="cpu")
    pre = bb.preprocessor(kind)
    slow = encode_images(image_files, bb.encode_image, pre, batch_size=4, workers=0, progress=False, path="workers")
    fast = encode_images(image_files, bb.encode_image, pre, batch_size=4, workers=0, progress=False, path="batched")
    assert fast.shape == slow.shape == (6, 32)
    assert torch.allclose(fast, slow, atol=1e-5)


def test_batched_decode_names_a_corrupt_jpeg(image_files, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    datas = [torch.frombuffer(bytearray(r.path.read_bytes()), dtype=torch.uint8) for r in image_files[:2]]
    datas.append(torch.frombuffer(bytearray(bad.read_bytes()), dtype=torch.uint8))
    with pytest.raises(ImageError, match="bad.jpg"):
        decode_batch(datas, ["a", "b", str(bad)], torch.device("cpu"))
    refs = [*image_files, ImageRef("bad", bad)]
    with pytest.raises(ImageError, match="bad.jpg"):
        encode_images(refs, lambda x: x.mean(dim=(2, 3)), Preprocessor("clip", 32),
                      batch_size=8, workers=0, progress=False, path="batched")


def test_bench_command_reports_every_figure(tiny_config):
    import json

    from click.testing import CliRunner

    from cirbench.cli import cli

    res = CliRunner().invoke(cli, ["bench", "--model", str(tiny_config), "--images", "10", "--batch-size", "4",
                                   "--workers", "0", "--queries", "20", "--gallery", "300", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["model_alone_img_s"] > 0 and out["full_path_img_s"] > 0
    assert out["ratio"] == pytest.approx(out["full_path_img_s"] / out["model_alone_img_s"], rel=0.05, abs=1e-3)
    assert out["rank_queries"] == 20 and out["rank_gallery"] == 300 and out["rank_seconds"] > 0
    assert out["encode_path"] == "workers" and out["peak_gpu_mem_gib"] is None
    res = CliRunner().invoke(cli, ["bench", "--model", str(tiny_config), "--images", "6", "--batch-size", "3",
                                   "--workers", "0", "--gallery", "100", "--encode-path", "batched"])
    assert res.exit_code == 0 and "full path" in res.output and "batched" in res.output
