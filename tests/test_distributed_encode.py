"""torchrun: each rank encodes a shard of the gallery; features, cache and metrics equal one process's."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent


def _run(n: int, tmp_path: Path, cache: Path | None = None) -> tuple[dict, list, Path, str]:
    out, cache = tmp_path / f"out{n}", cache or tmp_path / f"cache{n}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CIRBENCH_LOAD_PLUGINS": "", "CIRBENCH_CACHE": str(tmp_path / "gen")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "cirbench",
           "run", "--method", "slerp", "--dataset", "shapes", "--queries", "40", "--instances", "1", "--device", "cpu",
           "--output", str(out), "--cache-dir", str(cache), "--workers", "0", "--batch-size", "50"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # rank 0 alone reports: one result line, one leaderboard, one progress bar per encoding pass
    assert proc.stdout.count("result:") == 1 and proc.stdout.count("### shapes / val") == 1, proc.stdout
    assert proc.stderr.count("val: queries:   0%") == 1, proc.stderr[-3000:]
    (result,) = (out / "shapes" / "val").glob("*__*.json")
    preds = [json.loads(line) for line in next((out / "shapes" / "val").glob("*.jsonl")).read_text().splitlines()]
    return json.loads(result.read_text()), preds, cache, proc.stderr


def _torchrun_script(script: Path, *args: str, env: dict | None = None, succeeds: bool = True
                     ) -> tuple[subprocess.CompletedProcess, list]:
    """Run ``script`` as 2 torchrun processes; also return the JSON objects the ranks printed, in rank order (their
    lines may interleave). ``succeeds``: check that both ranks finished and printed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script), *args], capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    rows = sorted((json.loads(m) for m in re.findall(r"\{[^{}]*\}", proc.stdout)), key=lambda row: row["rank"])
    if succeeds:
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert [row["rank"] for row in rows] == [0, 1], proc.stdout
    return proc, rows


def test_two_ranks_match_one(tmp_path):
    two, preds2, cache2, _ = _run(2, tmp_path)  # first: both ranks meet a cold cache and generate `shapes` at once
    one, preds1, cache1, _ = _run(1, tmp_path)
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["metrics"] == one["metrics"]
    assert [p["top"] for p in preds2] == [p["top"] for p in preds1]
    shards1 = sorted(cache1.rglob("shard-*.safetensors"))
    shards2 = sorted(cache2.rglob("shard-*.safetensors"))
    assert len(shards2) == len(shards1) == 1  # cached once, by rank 0, gallery order kept
    f1, f2 = load_file(str(shards1[0]))["features"], load_file(str(shards2[0]))["features"]
    assert f1.shape == (432, 128) and torch.allclose(f1, f2, atol=1e-6)

    # a damaged shard: every rank reads the cache and drops it, but the warning is printed once, as one line
    (shards2[0].parent / "shard-damaged.safetensors").write_bytes(b"not a safetensors file")
    again, _, _, stderr = _run(2, tmp_path, cache2)
    assert again["metrics"] == two["metrics"]
    (said,) = [line for line in stderr.splitlines() if "dropping" in line]
    assert said.startswith("warning: dropping feature-cache shard shard-damaged.safetensors (") and said.endswith(
        "); its rows will be recomputed"), stderr[-3000:]


def test_a_rank_with_nothing_to_encode_joins_the_gather(tmp_path):
    """Fewer images than ranks: rank 1 encodes nothing, yet the gather completes with the right rows; and counts
    that do not divide among the ranks come back whole and in order (a row tells its position)."""
    script = tmp_path / "gather.py"
    script.write_text(
        "import json, sys, torch, torch.distributed as dist\n"
        "from cirbench import distributed as d\n"
        "dist.init_process_group('gloo')\n"
        "items = d.shard(['only-image'])\n"
        "local = torch.full((len(items), 3), 7.0) if items else None\n"
        "out = d.gather_sharded_rows(local, 1)\n"
        "orders = []\n"
        "for total in (2, 3, 5):\n"
        "    mine = d.shard(list(range(total)))\n"
        "    rows = torch.tensor(mine, dtype=torch.float32).view(-1, 1).repeat(1, 2)\n"
        "    orders.append(d.gather_sharded_rows(rows, total)[:, 0].tolist())\n"
        "print(json.dumps({'rank': d.rank(), 'shape': list(out.shape), 'sum': float(out.sum()), 'orders': orders}))\n"
        "d.shutdown()\n")
    _, rows = _torchrun_script(script)
    assert all(r["shape"] == [1, 3] and r["sum"] == 21.0 for r in rows)
    assert all(r["orders"] == [[0, 1], [0, 1, 2], [0, 1, 2, 3, 4]] for r in rows), rows


def test_ranks_waiting_for_rank_0_outlast_the_collective_timeout(tmp_path):
    """Rank 0 works alone (an LLM method generating) longer than the collectives' timeout: the others wait on
    long_barrier's long-timeout group, while a plain barrier in the same setting times out."""
    script = tmp_path / "wait.py"
    script.write_text(
        "import json, sys, time\n"
        "from cirbench import distributed as d\n"
        "d.init_from_env('cpu')\n"
        "if d.rank() == 0:\n"
        "    time.sleep(4)\n"
        "(d.long_barrier if sys.argv[1] == 'wait' else d.barrier)()\n"
        "print(json.dumps({'rank': d.rank()}))\n")
    env = {"CIRBENCH_DIST_TIMEOUT_S": "1.5", "CIRBENCH_DIST_WAIT_S": "120"}
    _torchrun_script(script, "wait", env=env)
    barrier, _ = _torchrun_script(script, "barrier", env=env, succeeds=False)
    assert barrier.returncode != 0 and "Timed out" in barrier.stderr


def test_gradients_are_averaged_in_one_reduce_per_dtype_and_carry_the_stop_flag(tmp_path):
    """average_gradients packs the gradients (mixed dtypes, a parameter without one) into one all-reduce per
    dtype and device; each comes back averaged into its own tensor, and a stop asked by one rank reaches all."""
    script = tmp_path / "grads.py"
    script.write_text(
        "import json, torch, torch.distributed as dist\n"
        "from cirbench import distributed as d\n"
        "d.init_from_env('cpu')\n"
        "r = d.rank()\n"
        "calls = []\n"
        "real = dist.all_reduce\n"
        "dist.all_reduce = lambda t, *a, **k: (calls.append(t.dtype), real(t, *a, **k))[1]\n"
        "ps = [torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(4, dtype=torch.float64)),\n"
        "      torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(5))]\n"
        "for i, p in enumerate(ps[:3]):\n"
        "    p.grad = torch.full_like(p, float(r + 1) * (i + 1))\n"
        "stops = [d.average_gradients(ps, stop=(r == 1 and k == 1)) for k in range(3)]\n"
        "alone = d.average_gradients([ps[3]], stop=(r == 0))  # no gradient at all: the flag is reduced alone\n"
        "print(json.dumps({'rank': r, 'stops': stops + [alone], 'calls': len(calls), 'none': ps[3].grad is None,\n"
        "                  'grads': [p.grad.tolist() for p in ps[:3]]}))\n"
        "d.shutdown()\n")
    _, rows = _torchrun_script(script)
    for row in rows:
        assert row["stops"] == [False, True, False, True]  # rank 1 asked at the second step; both ranks learn it
        assert row["calls"] == 7 and row["none"]  # two dtypes: two all-reduces a step, not one per tensor
        # ranks hold (r + 1) * (i + 1): averaged three times over, each tensor keeps 1.5 * (i + 1)
        assert row["grads"] == [[[1.5] * 3] * 2, [3.0] * 4, [4.5]]


GATHER_UNEVEN = """
import json, torch
from cirbench import distributed as d
d.init_from_env("cpu")
r = d.rank()
x = (torch.arange((r + 1) * 2, dtype=torch.float32).reshape(r + 1, 2) + 10 * r).requires_grad_(True)
out = d.all_gather_with_grad(x)
w = torch.arange(out.numel(), dtype=torch.float32).reshape(out.shape)
(out * w).sum().backward()
empty = [p.tolist() for p in d.all_gather_rows(torch.full((r, 2), float(r)))]  # rank 0 has no row at all
print(json.dumps({"rank": r, "out": out.tolist(), "grad": x.grad.tolist(), "empty": empty}))
d.shutdown()
"""


def test_gather_with_grad_takes_ranks_with_different_row_counts(tmp_path):
    """A contrastive batch that lost an unreadable sample on one rank only: the gather pads and cuts back, and
    each rank gets the summed gradient of its own rows (here 2 x the weights of its rows)."""
    script = tmp_path / "gather.py"
    script.write_text(GATHER_UNEVEN)
    _, rows = _torchrun_script(script)
    expected = [[0.0, 1.0], [10.0, 11.0], [12.0, 13.0]]
    assert rows[0]["out"] == rows[1]["out"] == expected
    assert rows[0]["grad"] == [[0.0, 2.0]] and rows[1]["grad"] == [[4.0, 6.0], [8.0, 10.0]]
    assert rows[0]["empty"] == rows[1]["empty"] == [[], [[1.0, 1.0]]]


def test_a_plugin_file_runs_under_torchrun(tmp_path):
    """`torchrun -m cirbench --plugin FILE run`: every rank loads the file (its argv names it), rank 0 writes one
    result, which records the file's sha256."""
    import hashlib

    from test_plugins import LOCAL_METHOD

    plugin = tmp_path / "ranked_sharp.py"
    plugin.write_text(LOCAL_METHOD.format(name="ranked-sharp", module="ranked_sharp"))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CIRBENCH_LOAD_PLUGINS": "", "CIRBENCH_CACHE": str(tmp_path / "gen")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "cirbench",
           "--plugin", str(plugin), "run", "--method", "ranked-sharp", "--beta", "0.5", "--dataset", "shapes",
           "--queries", "40", "--instances", "1", "--device", "cpu", "--output", str(out), "--workers", "0",
           "--no-leaderboard", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = (out / "shapes" / "val").glob("*.json")
    record = json.loads(result.read_text())
    assert record["world_size"] == 2 and record["method"]["plugin_source"] == {
        "kind": "file", "path": str(plugin), "sha256": hashlib.sha256(plugin.read_bytes()).hexdigest()}
