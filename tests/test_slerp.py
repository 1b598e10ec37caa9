"""Slerp: the formula against float64, its limits, and alpha sweeps that encode once."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import registered
from toy_plugin import ToyPlugin

from cirbench.evaluate import RunConfig, evaluate
from cirbench.methods.slerp.compose import slerp


def _reference(v, w, alpha):
    v = v / np.linalg.norm(v, axis=-1, keepdims=True)
    w = w / np.linalg.norm(w, axis=-1, keepdims=True)
    out = []
    for a, b in zip(v, w, strict=True):
        dot = float(np.clip(a @ b, -1, 1))
        if abs(dot) > 0.9995:
            c = a + alpha * (b - a)
        else:
            theta = np.arccos(dot)
            c = np.sin((1 - alpha) * theta) / np.sin(theta) * a + np.sin(alpha * theta) / np.sin(theta) * b
        out.append(c / np.linalg.norm(c))
    return np.stack(out)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8, 0.9, 1.0])
def test_slerp_matches_float64_reference(alpha):
    rng = np.random.default_rng(0)
    v, w = rng.normal(size=(64, 32)), rng.normal(size=(64, 32))
    w[:4] = v[:4] * 3 + 1e-4 * rng.normal(size=(4, 32))  # nearly parallel rows take the linear fallback
    w[4:8] = -v[4:8] * 2 + 1e-4 * rng.normal(size=(4, 32))  # nearly opposite rows too (|v . w| > 0.9995, as
    # in the official slerp.py), where the spherical formula divides by a vanishing sine
    for row, cos in zip(range(8, 14), [0.6, 0.9, 0.98, -0.6, -0.9, -0.98], strict=True):
        # aligned but not parallel (|v . w| <= 0.9995): the spherical formula, whose result differs from the
        # linear one by 1e-2 (cos 0.6) to 3e-4 (cos 0.98) here, so a lower parallel threshold cannot pass
        u = w[row] - (w[row] @ v[row]) / (v[row] @ v[row]) * v[row]
        w[row] = cos * v[row] / np.linalg.norm(v[row]) + np.sqrt(1 - cos**2) * u / np.linalg.norm(u)
    ours = slerp(torch.tensor(v, dtype=torch.float32), torch.tensor(w, dtype=torch.float32), alpha).double().numpy()
    np.testing.assert_allclose(ours, _reference(v, w, alpha), atol=2e-5)
    assert np.allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5)


def test_slerp_endpoints_and_midpoint():
    v = torch.tensor([[1.0, 0.0]])
    w = torch.tensor([[0.0, 1.0]])
    assert torch.allclose(slerp(v, w, 0.0), v) and torch.allclose(slerp(v, w, 1.0), w, atol=1e-6)
    rng = torch.Generator().manual_seed(0)  # the endpoints are the normalised inputs exactly, not a round-off away
    a, b = torch.randn(16, 32, generator=rng), torch.randn(16, 32, generator=rng)
    normalize = torch.nn.functional.normalize
    assert torch.equal(slerp(a, b, 0.0), normalize(a, dim=-1)) and torch.equal(slerp(a, b, 1.0), normalize(b, dim=-1))
    mid = slerp(v, w, 0.5)
    assert torch.allclose(mid, torch.tensor([[2**-0.5, 2**-0.5]]), atol=1e-6)


def _cfg(tmp_path, tiny_config, toy_root, method, **kw):
    return RunConfig(method=method, dataset="toy", split="val", backbone=str(tiny_config), pretrained="none",
                     data_root=toy_root, output=tmp_path / "results", cache_dir=tmp_path / "cache", workers=0,
                     progress=False, **kw)


def _top(outcome):
    return [json.loads(line)["top"] for line in outcome.predictions_path.read_text().splitlines()]


def _scores(outcome):
    return torch.tensor([json.loads(line)["scores"] for line in outcome.predictions_path.read_text().splitlines()])


def test_alpha_limits_rank_like_image_only_and_text_only(tmp_path, tiny_config, toy_root):
    with registered(ToyPlugin(), "toy") as reg:
        (img,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, "image-only"), reg)
        (txt,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, "text-only"), reg)
        zero, one = evaluate(_cfg(tmp_path, tiny_config, toy_root, "slerp", method_options={"alpha": "0,1"}), reg)
    # the same ranked scores (items whose scores differ by float round-off may swap places)
    assert torch.allclose(_scores(zero), _scores(img), atol=1e-5)
    assert torch.allclose(_scores(one), _scores(txt), atol=1e-5)
    assert [t[0] for t in _top(zero)] == [t[0] for t in _top(img)]
    assert zero.label == "slerp@alpha=0.0" and one.label == "slerp@alpha=1.0"


def test_alpha_sweep_encodes_once(tmp_path, tiny_config, toy_root):
    with registered(ToyPlugin(), "toy") as reg:
        outs = evaluate(_cfg(tmp_path, tiny_config, toy_root, "slerp", method_options={"alpha": "0.5:1.0:0.1"}), reg)
    assert [o.record["method"]["options"]["alpha"] for o in outs] == [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert len({o.result_path for o in outs}) == 6
    # the first value encodes the 12 images once; later values hit the cache for every image
    assert outs[0].record["cache"]["misses"] == 12
    # each result counts its own: the later values encode nothing and find every image
    assert all(o.record["cache"]["misses"] == 0 and o.record["cache"]["hits"] >= 12 for o in outs[1:])
