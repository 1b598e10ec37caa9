"""The four speed goals of cirbench in one run, beside the official scripts' pipeline (see README.md here).

    python benchmarks/gpu_bench.py                       # on a GPU: ViT-L-14 and ViT-B-32, bf16 (15-25 min)
    QUICK=1 DEVICE=cpu python benchmarks/gpu_bench.py    # smoke test on a CPU with a tiny model (~1 min)

Goals (one H100, bf16): 1. ViT-L/14 full path >= 90 % of the model alone; 2. ViT-B/32 >= 15,000 img/s (or
within 90 % of the GPU JPEG decoder's own ceiling, measured in the same run); 3. a 123,403-image gallery at
ViT-L/14 in < 60 s (cold cache, through FeatureCache + encode_images as `cirbench run` calls them); 4. 800 x
123,403 ranked (top 50) in < 1 s. Environment: DEVICE, QUICK, WORK (scratch folder, default
/tmp/cirbench-gpu-bench), N_IMAGES, GALLERY_N, WORKERS, MODEL_L, MODEL_B, PRETRAINED. Writes
$WORK/results.json and $WORK/results.md (also copied to $OUT when set) and prints the goal table last.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from cirbench.bench import BenchConfig, bench_encode, bench_rank, make_jpegs
from cirbench.testing import write_tiny_config

E = os.environ
QUICK = E.get("QUICK") == "1"
DEVICE = E.get("DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
WORK = Path(E.get("WORK", "/tmp/cirbench-gpu-bench"))
CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
WORKERS = int(E.get("WORKERS", min(16, CPUS)))
N_IMAGES = int(E.get("N_IMAGES", 64 if QUICK else 6144))
GALLERY_N = int(E.get("GALLERY_N", 200 if QUICK else 123403))
BATCH = 16 if QUICK else 256


def log(*parts) -> None:
    print(time.strftime("%H:%M:%S"), *parts, file=sys.stderr, flush=True)


def models() -> dict[str, str]:
    if QUICK:
        tiny = str(write_tiny_config(WORK / "models"))
        return {"L": tiny, "B": tiny}
    return {"L": E.get("MODEL_L", "ViT-L-14"), "B": E.get("MODEL_B", "ViT-B-32")}


def decoder_ceiling(folder: Path) -> float | None:
    """The GPU JPEG decoder alone on bytes already in memory (batches of 256): its own ceiling."""
    if not DEVICE.startswith("cuda"):
        return None
    from torchvision.io import ImageReadMode, decode_jpeg

    refs = make_jpegs(folder, min(N_IMAGES, 2048))
    datas = [torch.frombuffer(bytearray(r.path.read_bytes()), dtype=torch.uint8) for r in refs]
    batches = [datas[i : i + 256] for i in range(0, len(datas), 256)]
    dev = torch.device(DEVICE)
    decode_jpeg(batches[0], mode=ImageReadMode.RGB, device=dev)
    torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    for b in batches:
        decode_jpeg(b, mode=ImageReadMode.RGB, device=dev)
    torch.cuda.synchronize(dev)
    return len(datas) / (time.perf_counter() - t0)


def gallery_goal(model: str) -> dict:
    """Goal 3: encode GALLERY_N files at ViT-L/14 into an empty feature cache, then read them back warm."""
    from cirbench.backbones import load_backbone
    from cirbench.encode import encode_images
    from cirbench.feature_cache import FeatureCache

    refs = make_jpegs(WORK / "jpegs", GALLERY_N)
    bb = load_backbone(model, E.get("PRETRAINED", "none"), device=DEVICE, precision="bf16" if DEVICE != "cpu" else "fp32")
    pre = bb.preprocessor("targetpad")
    key = {"format": 2, "backbone": bb.identity(), "preprocess": pre.identity(), "precision": bb.precision}
    root = WORK / "feature-cache"
    shutil.rmtree(root, ignore_errors=True)

    def compute(todo, on_chunk=None):
        return encode_images(todo, bb.encode_image, pre, batch_size=BATCH, workers=WORKERS, progress=False,
                             device=bb.device, dtype=bb.input_dtype, on_chunk=on_chunk)

    compute(refs[:BATCH])  # warm-up: kernels, decoder, workers
    t0 = time.perf_counter()
    cold = FeatureCache(root).get_or_compute(key, refs, compute)
    cold_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    warm = FeatureCache(root).get_or_compute(key, refs, compute)
    warm_s = time.perf_counter() - t0
    return {"images": len(refs), "cold_s": cold_s, "warm_s": warm_s, "img_s": len(refs) / cold_s,
            "same_features": bool(torch.equal(cold, warm))}


def main() -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    out: dict = {"device": DEVICE, "quick": QUICK, "torch": torch.__version__, "workers": WORKERS}
    if DEVICE.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(0)
    names = models()
    for which in ("L", "B"):
        log(f"encode {which}: {names[which]}")
        cfg = BenchConfig(model=names[which], pretrained=E.get("PRETRAINED", "none"), device=DEVICE,
                          images=N_IMAGES, batch_size=BATCH, workers=WORKERS, reps=1 if QUICK else 3,
                          official=True, agreement=True)
        out[f"encode_{which}"] = bench_encode(cfg, WORK / "jpegs")
    out["decoder_ceiling_img_s"] = decoder_ceiling(WORK / "jpegs")
    log("gallery goal")
    out["gallery"] = gallery_goal(names["L"])
    log("rank goal")
    out["rank"] = bench_rank(BenchConfig(device=DEVICE, queries=800, gallery=GALLERY_N, reps=3))
    (WORK / "results.json").write_text(json.dumps(out, indent=1))
    table = goal_table(out)
    (WORK / "results.md").write_text(table + "\n")
    if E.get("OUT"):
        for name in ("results.json", "results.md"):
            shutil.copy(WORK / name, Path(E["OUT"]) / name)
    print(table)


def goal_table(out: dict) -> str:
    eL, eB, g, r = out["encode_L"], out["encode_B"], out["gallery"], out["rank"]
    ceiling = out.get("decoder_ceiling_img_s")
    target_b = 15000.0 if ceiling is None else min(15000.0, 0.9 * ceiling)
    rows = [
        ("1: L/14 full path >= 90% of model alone", f"{0.9 * eL['model_alone_img_s']:,.0f} img/s",
         f"{eL['full_path_clip_img_s']:,.0f} img/s ({eL['ratio_full_over_model']:.1%})",
         f"{eL.get('official_style_img_s', 0):,.0f} img/s", eL["ratio_full_over_model"] >= 0.9),
        ("2: B/32 >= 15,000 img/s (or 90% of the decoder)", f"{target_b:,.0f} img/s"
         + (f" (decoder {ceiling:,.0f})" if ceiling else ""), f"{eB['full_path_clip_img_s']:,.0f} img/s",
         f"{eB.get('official_style_img_s', 0):,.0f} img/s", eB["full_path_clip_img_s"] >= target_b),
        (f"3: {g['images']:,} gallery at L/14 < 60 s", "60 s", f"{g['cold_s']:.1f} s cold, {g['warm_s']:.2f} s warm",
         f"{g['images'] / max(eL.get('official_style_img_s', 1e-9), 1e-9):.0f} s (extrapolated)", g["cold_s"] < 60),
        (f"4: 800 x {r['gallery']:,} ranked < 1 s", "1 s", f"{r['cirbench_torch_s']:.3f} s "
         f"(x{r['ratio_cirbench_over_topk']:.2f} of topk)", "-", r["cirbench_torch_s"] < 1),
    ]
    lines = [f"device: {out.get('gpu', out['device'])}, torch {out['torch']}, {out['workers']} reader workers",
             "| goal | target | cirbench | official-style | verdict |", "|---|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} | {'PASS' if ok else 'FAIL'} |" for a, b, c, d, ok in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
