"""torchrun: each rank encodes a shard of the gallery; features, cache and metrics equal one process's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent


def _run(n: int, tmp_path: Path) -> tuple[dict, list, Path]:
    out, cache = tmp_path / f"out{n}", tmp_path / f"cache{n}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CIRBENCH_LOAD_PLUGINS": "", "CIRBENCH_CACHE": str(tmp_path / "gen")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "cirbench",
           "run", "--method", "slerp", "--dataset", "shapes", "--queries", "40", "--instances", "1", "--device", "cpu",
           "--output", str(out), "--cache-dir", str(cache), "--workers", "0", "--quiet", "--no-leaderboard",
           "--batch-size", "50"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = (out / "shapes" / "val").glob("*__*.json")
    preds = [json.loads(line) for line in next((out / "shapes" / "val").glob("*.jsonl")).read_text().splitlines()]
    return json.loads(result.read_text()), preds, cache


def test_two_ranks_match_one(tmp_path):
    one, preds1, cache1 = _run(1, tmp_path)
    two, preds2, cache2 = _run(2, tmp_path)
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["metrics"] == one["metrics"]
    assert [p["top"] for p in preds2] == [p["top"] for p in preds1]
    shards1 = sorted(cache1.rglob("shard-*.safetensors"))
    shards2 = sorted(cache2.rglob("shard-*.safetensors"))
    assert len(shards2) == len(shards1) == 1  # cached once, by rank 0, gallery order kept
    f1, f2 = load_file(str(shards1[0]))["features"], load_file(str(shards2[0]))["features"]
    assert f1.shape == (432, 128) and torch.allclose(f1, f2, atol=1e-6)
