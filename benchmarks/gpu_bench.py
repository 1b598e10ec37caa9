"""The four speed goals of cirbench in one run, beside the official scripts' pipeline (see README.md here),
sized to fit one call on a lent GPU machine.

    bash benchmarks/device_gpu_bench.sh                  # on the lent GPU (installs carried wheels, then this)
    python benchmarks/gpu_bench.py                       # on any GPU machine with cirbench importable
    QUICK=1 DEVICE=cpu python benchmarks/gpu_bench.py    # smoke test on a CPU with a tiny model (~1 min)

Goals (one H100, bf16): 1. ViT-L/14 full path >= 90 % of the model alone; 2. ViT-B/32 >= 15,000 img/s (or
within 90 % of the GPU JPEG decoder's own ceiling, measured in the same run); 3. a 123,403-image gallery at
ViT-L/14 in < 60 s (cold cache, through FeatureCache + encode_images as `cirbench run` calls them); 4. 800 x
123,403 ranked (top 50) in < 1 s; and on the CPU, ranking within 1.2x of a plain ``torch.topk``.

Stages run in this order, each on its own: ``env`` (versions, GPU, the JPEG decoder's ceiling, which exact
product mode the batched preprocessing takes), ``rank`` (goal 4, on the device and on the CPU), ``encode_B``
(goal 2, with the pipeline's pieces and fp32/bf16 agreement), ``encode_L`` (goal 1), ``gallery`` (goal 3),
``train`` (no goal: checks of training that only a GPU can make, fp16 under the loss scaler and a resume that
ends where an uninterrupted run does, against the device's own run-to-run spread). A
stage that fails is recorded (one line and the traceback) and the next one runs; results.json and results.md
are rewritten after every stage, into $WORK and into $OUT when set, so a run cut short still returns what it
measured. ``BUDGET_S`` bounds the whole run: a stage that no longer fits is skipped and says so, and the
gallery stage shrinks to the images that fit, its time then extrapolated (and labelled so) from the measured
rate. The gallery's files are hard links to the encode stages' JPEGs (one decode each, like distinct files).

Environment: DEVICE, QUICK, BUDGET_S (default 420), STAGES (comma list), WORK (scratch folder, default
/tmp/cirbench-gpu-bench), N_IMAGES, OFFICIAL_IMAGES, GALLERY_N, WORKERS, BATCH, REPS, MODEL_L, MODEL_B,
PRETRAINED.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from cirbench.bench import BenchConfig, bench_encode, bench_rank, describe_pixels, make_jpegs, timed
from cirbench.testing import write_tiny_config
from cirbench.types import ImageRef

E = os.environ
QUICK = E.get("QUICK") == "1"
DEVICE = E.get("DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
WORK = Path(E.get("WORK", "/tmp/cirbench-gpu-bench"))
CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
WORKERS = int(E.get("WORKERS", min(16, CPUS)))
N_IMAGES = int(E.get("N_IMAGES", 48 if QUICK else 6144))
OFFICIAL_IMAGES = int(E.get("OFFICIAL_IMAGES", 16 if QUICK else 2048))
GALLERY_N = int(E.get("GALLERY_N", 300 if QUICK else 123403))
BATCH = int(E.get("BATCH", 16 if QUICK else 256))
REPS = int(E.get("REPS", 1 if QUICK else 2))
BUDGET_S = float(E.get("BUDGET_S", 420))
STAGES = [s for s in E.get("STAGES", "env,rank,encode_B,encode_L,gallery,train").split(",") if s]
T0 = time.monotonic()
# the least time a stage needs to be worth starting (model loads, file writing, one timed pass)
MIN_S = {"env": 5, "rank": 20, "encode_B": 45, "encode_L": 75, "gallery": 45, "train": 40}


def log(*parts) -> None:
    print(f"{time.strftime('%H:%M:%S')} [{time.monotonic() - T0:6.1f} s]", *parts, file=sys.stderr, flush=True)


def left() -> float:
    return BUDGET_S - (time.monotonic() - T0)


def models() -> dict[str, str]:
    if QUICK:
        tiny = str(write_tiny_config(WORK / "models"))
        return {"L": tiny, "B": tiny}
    return {"L": E.get("MODEL_L", "ViT-L-14"), "B": E.get("MODEL_B", "ViT-B-32")}


def pool() -> list[ImageRef]:
    return make_jpegs(WORK / "jpegs", N_IMAGES)


# -- stages ---------------------------------------------------------------------------------------------------
def stage_env(out: dict) -> dict:
    import torchvision

    from cirbench.encode import image_library
    from cirbench.preprocess import auto_products
    from cirbench.results import installed_version

    r = {"device": DEVICE, "quick": QUICK, "torch": torch.__version__, "torchvision": torchvision.__version__,
         "python": sys.version.split()[0], "cpus": CPUS, "workers": WORKERS, "batch_size": BATCH, "reps": REPS,
         "budget_s": BUDGET_S}
    r["image_library"] = image_library()  # the library the batched path decodes JPEGs with
    r["open_clip"] = installed_version("open_clip_torch") or "missing"
    dev = torch.device(DEVICE)
    r["preprocess_products"] = auto_products(dev)
    if dev.type == "cuda":
        r["gpu"] = torch.cuda.get_device_name(dev)
        r["gpu_mem_gib"] = round(torch.cuda.get_device_properties(dev).total_memory / 2**30, 1)
        r["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        smi = shutil.which("nvidia-smi")
        if smi:
            r["nvidia_smi"] = subprocess.run(
                [smi, "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
        ceilings = decoder_ceilings(dev)  # every library that loads here, side by side
        r["decoder_ceilings_img_s"] = ceilings
        in_use = ceilings.get(r["image_library"].split()[0])  # the library the batched path uses (none: PIL)
        r["decoder_ceiling_img_s"] = in_use if isinstance(in_use, float) else None
    return r


def decoder_ceilings(dev: torch.device) -> dict[str, float | str]:
    """Each GPU JPEG decoder alone on the same bytes already in memory (batches of BATCH): its own ceiling
    in img/s, or why that library is unavailable here."""
    from cirbench import images

    refs = pool()[:2048]
    datas = [torch.frombuffer(bytearray(r.path.read_bytes()), dtype=torch.uint8) for r in refs]
    batches = [datas[i : i + BATCH] for i in range(0, len(datas), BATCH)]
    out: dict[str, float | str] = {}
    for name, make in (("torchvision", images._torchvision), ("torchcodec", images._torchcodec)):
        try:
            jpeg = make().jpeg
            seconds = timed(lambda jpeg=jpeg: [jpeg(b, dev) for b in batches], dev, max(REPS, 2))["seconds"]
            out[name] = len(datas) / seconds
        except Exception as exc:  # noqa: BLE001 - not installed or not loadable here: say so, go on
            out[name] = f"unavailable: {type(exc).__name__}: {str(exc)[:100]}"
    return out


def stage_rank(out: dict) -> dict:
    r = {"device": bench_rank(BenchConfig(device=DEVICE, queries=800, gallery=GALLERY_N, reps=max(REPS, 3)))}
    if DEVICE != "cpu":  # the CPU goal, on this machine's cores, in the same run
        r["cpu"] = bench_rank(BenchConfig(device="cpu", queries=800, gallery=GALLERY_N, reps=max(REPS, 3)))
    return r


def _encode(which: str, pieces: bool) -> Callable[[dict], dict]:
    def stage(out: dict) -> dict:
        cfg = BenchConfig(model=models()[which], pretrained=E.get("PRETRAINED", "none"), device=DEVICE,
                          images=N_IMAGES, batch_size=BATCH, workers=WORKERS, reps=REPS, official=True,
                          official_images=OFFICIAL_IMAGES, pieces=pieces, agreement=pieces)
        return bench_encode(cfg, WORK / "jpegs")
    return stage


def stage_gallery(out: dict) -> dict:
    """Goal 3: GALLERY_N files at ViT-L/14 into an empty feature cache, then read back warm. If the rate that
    encode_L measured (or, without it, a short calibration pass) says the whole gallery would not fit the
    budget: as many images as fit, and the time extrapolated."""
    from cirbench.backbones import load_backbone
    from cirbench.encode import encode_images, pixels_identity
    from cirbench.feature_cache import FeatureCache

    bb = load_backbone(models()["L"], E.get("PRETRAINED", "none"), device=DEVICE,
                       precision="bf16" if DEVICE != "cpu" else "fp32")
    pre = bb.preprocessor("targetpad")
    key = {"format": 2, "backbone": bb.identity(), "preprocess": pixels_identity(pre, "auto", bb.device),
           "precision": bb.precision}
    root = WORK / "feature-cache"
    shutil.rmtree(root, ignore_errors=True)

    def compute(todo, on_chunk=None):
        return encode_images(todo, bb.encode_image, pre, batch_size=BATCH, workers=WORKERS, progress=False,
                             device=bb.device, dtype=bb.input_dtype, on_chunk=on_chunk)

    src = pool()
    compute(src[:BATCH])  # kernels, decoder, workers
    rate = out.get("encode_L", {}).get("full_path_targetpad_img_s")
    if not rate:  # encode_L did not run: a short calibration pass instead
        t0 = time.perf_counter()
        compute(src[: BATCH * 4])
        rate = len(src[: BATCH * 4]) / (time.perf_counter() - t0)
    fits = int((left() - 20) * rate / 1.3)  # 20 s for the links and the warm read; a 30 % margin on the rate
    n = max(0, min(GALLERY_N, fits))
    if n < min(GALLERY_N, 2000):
        return {"skipped": f"budget: {left():.0f} s left, {GALLERY_N:,} images at {rate:,.0f} img/s need "
                           f"{GALLERY_N / rate:.0f} s", "extrapolated_cold_s": GALLERY_N / rate}
    refs = gallery_files(src, n)
    t0 = time.perf_counter()
    cold = FeatureCache(root).get_or_compute(key, refs, compute)
    cold_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    warm = FeatureCache(root).get_or_compute(key, refs, compute)
    warm_s = time.perf_counter() - t0
    r = {"images": n, "target_images": GALLERY_N, "cold_s": cold_s, "warm_s": warm_s, "img_s": n / cold_s,
         "same_features": bool(torch.equal(cold, warm))}
    if n < GALLERY_N:
        r["extrapolated_cold_s"] = GALLERY_N / r["img_s"]
    return r


def gallery_files(src: list[ImageRef], n: int) -> list[ImageRef]:
    """``n`` gallery files: hard links (or copies where links fail) to the distinct JPEGs ``src``."""
    folder = WORK / "gallery"
    folder.mkdir(parents=True, exist_ok=True)
    refs = []
    for i in range(n):
        path = folder / f"{i:07d}.jpg"
        if not path.exists():
            try:
                os.link(src[i % len(src)].path, path)
            except OSError:
                shutil.copyfile(src[i % len(src)].path, path)
        refs.append(ImageRef(str(i), path))
    return refs


def _probe_trainable(backbone):
    """A small mapping network over the frozen image tower, trained contrastively against the image embeddings
    (cirbench's built-in methods are not importable from a bare checkout): enough to run the whole training loop,
    autocast, loss scaler, dropout and the RandomResizedCrop augmentation included."""
    from cirbench.preprocess import RandomResizedCrop
    from cirbench.training import NetTrainable, contrastive_loss

    class Probe(NetTrainable):
        name = "gpu-bench-probe"

        def __init__(self, backbone):
            super().__init__(backbone, {})
            width = backbone.embed_dim
            self.net = torch.nn.Sequential(torch.nn.Linear(width, 512), torch.nn.GELU(), torch.nn.Dropout(0.1),
                                           torch.nn.Linear(512, width)).to(backbone.device)

        def training_step(self, batch):
            with torch.no_grad():
                image = self.backbone.model.encode_image(batch.pixels)
            return contrastive_loss(self.net(image), image, 0.07), {}

        def train_preprocessor(self, seed):
            return RandomResizedCrop(super().train_preprocessor(seed), seed=seed)

    return Probe(backbone)


def stage_train(out: dict) -> dict:
    """Training at B/32 on the device, 6 steps, dropout and augmentation on: fp16 autocast under the loss scaler
    (the scale it ends at), and three runs' weights: straight, straight again (the device's run-to-run spread:
    atomics in backward kernels may differ) and stopped after 3 steps then resumed (equal to the straight run's
    within that spread when the GPU's random state and the scale are restored)."""
    from safetensors.torch import load_file

    from cirbench.backbones import load_backbone
    from cirbench.training import TrainConfig, train

    precision = "fp16" if DEVICE.startswith("cuda") else "fp32"
    corpus = WORK / "train-corpus.csv"
    corpus.write_text("image,caption\n" + "".join(f"{r.path},a photo\n" for r in pool()[:64]))

    backbone = load_backbone(models()["B"], E.get("PRETRAINED", "none"), device=DEVICE, precision=precision,
                             seed=0, training=True)  # frozen: one load serves every run

    def run(name: str, steps: int) -> tuple[dict, dict | None]:
        folder = WORK / "train" / name
        torch.manual_seed(0)  # every run's probe starts from the same weights
        train(_probe_trainable(backbone), corpus, TrainConfig(
            output=folder, max_steps=steps, batch_size=16, lr=1e-4, schedule="constant", workers=min(WORKERS, 4),
            progress=False, precision=precision))
        state = json.loads((folder / "checkpoint-latest" / "train_state.json").read_text())
        return load_file(str(folder / "model.safetensors")), state.get("grad_scaler")

    shutil.rmtree(WORK / "train", ignore_errors=True)
    straight, scaler = run("straight", 6)
    again, _ = run("again", 6)
    run("resumed", 3)
    resumed, _ = run("resumed", 6)

    def max_diff(a: dict, b: dict) -> float:
        return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)

    return {"precision": precision, "grad_scaler": scaler, "repeat_max_abs_diff": max_diff(straight, again),
            "resume_max_abs_diff": max_diff(straight, resumed)}


STAGE_FUNCS: dict[str, Callable[[dict], dict]] = {
    "env": stage_env, "rank": stage_rank, "encode_B": _encode("B", pieces=True),
    "encode_L": _encode("L", pieces=False), "gallery": stage_gallery, "train": stage_train}


# -- the run --------------------------------------------------------------------------------------------------
def main() -> int:
    unknown = [s for s in STAGES if s not in STAGE_FUNCS]
    if unknown:
        print(f"error: unknown stage(s) {', '.join(unknown)}; valid: {', '.join(STAGE_FUNCS)}", file=sys.stderr)
        return 2
    WORK.mkdir(parents=True, exist_ok=True)
    out: dict = {"stages": STAGES, "budget_s": BUDGET_S}
    for name in STAGES:
        if left() < MIN_S[name] * (0.2 if QUICK else 1):
            out[name] = {"skipped": f"budget: {left():.0f} s left, the stage needs at least {MIN_S[name]} s"}
            log(f"{name}: skipped ({out[name]['skipped']})")
            continue
        log(f"{name}: start ({left():.0f} s of the budget left)")
        t0 = time.monotonic()
        try:
            out[name] = STAGE_FUNCS[name](out)
        except Exception as exc:  # noqa: BLE001 - recorded, and the other stages still run
            out[name] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:500],
                         "traceback": traceback.format_exc()}
            log(f"{name}: FAILED: {out[name]['error']}")
        out[name]["stage_s"] = round(time.monotonic() - t0, 1)
        if DEVICE.startswith("cuda"):
            torch.cuda.empty_cache()
        save(out)
    out["total_s"] = round(time.monotonic() - T0, 1)
    save(out)
    print(goal_table(out))
    return 0 if not any("error" in out.get(s, {}) for s in STAGES) else 1


def save(out: dict) -> None:
    (WORK / "results.json").write_text(json.dumps(out, indent=1))
    (WORK / "results.md").write_text(goal_table(out) + "\n")
    if E.get("OUT"):
        Path(E["OUT"]).mkdir(parents=True, exist_ok=True)
        for name in ("results.json", "results.md"):
            shutil.copy(WORK / name, Path(E["OUT"]) / name)


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f} img/s"


def goal_table(out: dict) -> str:
    """The goals as a markdown table; a stage that failed or was skipped says so in its row."""
    env, r, eB, eL, g = (out.get(k, {}) for k in ("env", "rank", "encode_B", "encode_L", "gallery"))

    def missing(stage: dict, name: str) -> str | None:
        if not stage:
            return f"{name}: not run"
        if "error" in stage:
            return f"{name} failed: {stage['error'][:120]}"
        if "skipped" in stage and not stage.get("extrapolated_cold_s"):
            return f"{name} skipped: {stage['skipped']}"
        return None

    rows = []
    why = missing(eL, "encode_L")
    rows.append(("1: L/14 full path >= 90% of model alone", "90%", why or
                 f"{_rate(eL['full_path_clip_img_s'])} = {eL['ratio_full_over_model']:.1%} of "
                 f"{_rate(eL['model_alone_img_s'])}", why or _rate(eL.get("official_style_img_s")),
                 None if why else eL["ratio_full_over_model"] >= 0.9))
    ceiling = env.get("decoder_ceiling_img_s")
    target_b = 15000.0 if not ceiling else min(15000.0, 0.9 * ceiling)
    why = missing(eB, "encode_B")
    rows.append(("2: B/32 >= 15,000 img/s (or 90% of the JPEG decoder)",
                 f"{target_b:,.0f} img/s" + (f" (decoder {ceiling:,.0f})" if ceiling else ""),
                 why or f"{_rate(eB['full_path_clip_img_s'])} ({eB['ratio_full_over_model']:.1%} of model alone)",
                 why or _rate(eB.get("official_style_img_s")),
                 None if why else eB["full_path_clip_img_s"] >= target_b))
    why = missing(g, "gallery")
    if why:
        rows.append(("3: 123,403 gallery at L/14 < 60 s", "60 s", why, "-", None))
    else:
        cold = g.get("extrapolated_cold_s", g.get("cold_s"))
        measured = (f"{g['cold_s']:.1f} s cold, {g['warm_s']:.2f} s warm" if "cold_s" in g else g["skipped"])
        if "extrapolated_cold_s" in g:
            measured += f"; {cold:.1f} s extrapolated to {GALLERY_N:,}"
        official = eL.get("official_style_img_s")
        rows.append((f"3: {GALLERY_N:,} gallery at L/14 < 60 s", "60 s", measured,
                     f"{GALLERY_N / official:.0f} s (extrapolated)" if official else "-", cold < 60))
    why = missing(r, "rank")
    rd = r.get("device", {})
    rows.append((f"4: 800 x {GALLERY_N:,} ranked < 1 s", "1 s", why or
                 f"{rd['cirbench_torch_s']:.3f} s (x{rd['ratio_cirbench_over_topk']:.2f} of topk)", "-",
                 None if why else rd["cirbench_torch_s"] < 1))
    rc = r.get("cpu") or (rd if DEVICE == "cpu" else None)
    if rc:
        rows.append((f"CPU: ranking within 1.2x of topk ({CPUS} cores)", "x1.20",
                     f"{rc['cirbench_torch_s']:.3f} s (x{rc['ratio_cirbench_over_topk']:.2f} of "
                     f"{rc['plain_topk_s']:.3f} s)", "-", rc["ratio_cirbench_over_topk"] <= 1.2))
    device = env.get("gpu", env.get("device", DEVICE))
    lines = [f"device: {device}, torch {env.get('torch', torch.__version__)}, {WORKERS} reader workers, "
             f"batch {BATCH}, preprocessing products {env.get('preprocess_products', '?')}, "
             f"images decoded by {env.get('image_library', '?')}"]
    ceilings = env.get("decoder_ceilings_img_s") or {}
    if ceilings:
        lines.append("JPEG decoder alone: " + ", ".join(
            f"{k} {_rate(v)}" if isinstance(v, float) else f"{k} {v}" for k, v in ceilings.items()))
    lines += ["", "| goal | target | cirbench | official-style | verdict |", "|---|---|---|---|---|"]
    verdict = {True: "PASS", False: "FAIL", None: "n/a"}
    lines += [f"| {a} | {b} | {c} | {d} | {verdict[ok]} |" for a, b, c, d, ok in rows]
    pixels = eB.get("agreement", {}).get("pixels_batched_vs_official")
    if pixels:
        lines.append("\nbatched path (JPEGs decoded on the device) vs the official PIL path, targetpad: "
                     + describe_pixels(pixels))
    variants = eB.get("agreement", {}).get("pixels_by_jpeg_variant", {})
    lines += [f"* {name}: {describe_pixels(p)}" for name, p in variants.items()]
    t = out.get("train", {})
    if t and "repeat_max_abs_diff" in t:
        scale = (t.get("grad_scaler") or {}).get("scale")
        lines.append(f"\ntraining ({t['precision']}{f', loss scale {scale:g}' if scale else ''}): a resumed run ends "
                     f"{t['resume_max_abs_diff']:.2e} from an uninterrupted one (max abs weight difference; two "
                     f"uninterrupted runs: {t['repeat_max_abs_diff']:.2e})")
    elif t:
        lines.append(f"\ntraining: {t.get('error') or t.get('skipped')}")
    syncs = eB.get("host_syncs")
    if syncs:
        lines.append(f"\nhost syncs in one B/32 full pass: {syncs['calling_thread']} in the model's thread, "
                     f"{syncs['other_threads']} in staging/writing threads; most frequent: "
                     + "; ".join(f"{place} x{n}" for place, n in list(syncs["places"].items())[:4]))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
