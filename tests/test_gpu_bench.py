"""benchmarks/gpu_bench.py fits one call on a lent GPU: a failing stage is recorded and the others still run,
a stage that no longer fits the budget is skipped and says so, and results are written after every stage."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_bench.py"


def _load(monkeypatch, tmp_path, **env):
    for key, value in {"QUICK": "1", "DEVICE": "cpu", "WORK": str(tmp_path / "work"), "OUT": str(tmp_path),
                       **env}.items():
        monkeypatch.setenv(key, value)
    spec = importlib.util.spec_from_file_location("gpu_bench_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_failing_stage_is_recorded_and_the_rest_still_run(monkeypatch, tmp_path):
    bench = _load(monkeypatch, tmp_path, STAGES="env,encode_L,rank")
    calls = []

    def broken(out):
        calls.append("encode_L")
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore lines")

    def rank(out):
        calls.append("rank")
        assert "error" in out["encode_L"]  # earlier results are visible to later stages
        return {"device": {"cirbench_torch_s": 0.5, "ratio_cirbench_over_topk": 1.1, "plain_topk_s": 0.45}}

    monkeypatch.setitem(bench.STAGE_FUNCS, "encode_L", broken)
    monkeypatch.setitem(bench.STAGE_FUNCS, "rank", rank)
    assert bench.main() == 1
    assert calls == ["encode_L", "rank"]
    out = json.loads((tmp_path / "results.json").read_text())  # copied to $OUT
    assert out["env"]["preprocess_products"] == "float64" and out["env"]["device"] == "cpu"
    assert out["encode_L"]["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert "Traceback" in out["encode_L"]["traceback"]
    table = (tmp_path / "results.md").read_text()
    assert "encode_L failed: RuntimeError: CUDA error" in table and "| n/a |" in table
    assert "0.500 s (x1.10 of topk) | - | PASS |" in table


def test_stages_that_no_longer_fit_the_budget_are_skipped(monkeypatch, tmp_path):
    bench = _load(monkeypatch, tmp_path, STAGES="env,gallery", BUDGET_S="3")
    monkeypatch.setitem(bench.STAGE_FUNCS, "env", lambda out: {"device": "cpu"})
    monkeypatch.setattr(bench, "MIN_S", {**bench.MIN_S, "env": 0, "gallery": 1000})
    assert bench.main() == 0
    out = json.loads((tmp_path / "work" / "results.json").read_text())
    assert out["gallery"]["skipped"].startswith("budget:")
    assert "gallery skipped: budget" in (tmp_path / "results.md").read_text()


def test_unknown_stage_is_one_line(monkeypatch, tmp_path, capsys):
    bench = _load(monkeypatch, tmp_path, STAGES="env,encode_X")
    assert bench.main() == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "encode_X" in err


@pytest.mark.parametrize("rate,expect_n", [(None, None), (50.0, 0)])
def test_gallery_shrinks_to_the_budget(monkeypatch, tmp_path, rate, expect_n):
    """With the whole budget the tiny gallery runs in full; at a rate too slow for what is left it is skipped
    with the extrapolated time."""
    bench = _load(monkeypatch, tmp_path, STAGES="gallery", GALLERY_N="40", N_IMAGES="20", BUDGET_S="400")
    out = {"encode_L": {"full_path_targetpad_img_s": rate}} if rate else {}
    if rate:
        monkeypatch.setattr(bench, "left", lambda: 21.0)  # 1 s after the fixed allowance: ~38 images fit
    r = bench.stage_gallery(out)
    if expect_n is None:
        assert r["images"] == 40 and r["same_features"] and "extrapolated_cold_s" not in r
        assert len(list((tmp_path / "work" / "gallery").iterdir())) == 40
    else:
        assert r["skipped"].startswith("budget:") and r["extrapolated_cold_s"] == pytest.approx(40 / rate)


def test_the_table_reports_host_syncs_and_decoder_pixels(monkeypatch, tmp_path):
    bench = _load(monkeypatch, tmp_path)
    encode_b = {"full_path_clip_img_s": 16000.0, "ratio_full_over_model": 0.6,
                "host_syncs": {"calling_thread": 0, "other_threads": 24,
                               "places": {"cirbench-prefetch-0 encode.py:151": 12,
                                          "cirbench-prefetch-1 encode.py:151": 12}}}
    table = bench.goal_table({"encode_B": encode_b})
    assert "| 16,000 img/s (60.0% of model alone) | - | PASS |" in table
    assert ("host syncs in one B/32 full pass: 0 in the model's thread, 24 in staging/writing threads; most "
            "frequent: cirbench-prefetch-0 encode.py:151 x12; cirbench-prefetch-1 encode.py:151 x12") in table
    assert "host syncs" not in bench.goal_table({"encode_B": {**encode_b, "host_syncs": None}})
    pixels = {"images": 512, "values_differing": 0.0123, "images_differing": 0.5, "max_levels": 3,
              "mean_levels": 0.0125}
    table = bench.goal_table({"encode_B": {**encode_b, "agreement": {"pixels_batched_vs_official": pixels}}})
    assert ("batched path (JPEGs decoded on the device) vs the official PIL path, targetpad: pixels of 512 images: "
            "1.23% of values differ in 50% of images, by at most 3 levels (mean 0.013)") in table
    grey = {**pixels, "images": 4, "max_levels": 40}
    table = bench.goal_table({"encode_B": {**encode_b, "agreement": {"pixels_batched_vs_official": pixels,
                                                                     "pixels_by_jpeg_variant": {"greyscale": grey}}}})
    assert "* greyscale: pixels of 4 images: 1.23% of values differ in 50% of images, by at most 40 levels" in table
