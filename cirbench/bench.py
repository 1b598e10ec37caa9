"""``cirbench bench``: throughput of the encode path against the model alone, and ranking time.

It writes synthetic JPEG files of COCO-like sizes (640x480, 480x640, 640x427, 500x375, 612x612), then
measures, in one process:

* **model alone**: images/s of ``encode_image`` on random, already-preprocessed tensors (the ceiling);
* **full path**: images/s from files on disk to normalised features through ``encode_images`` (batched
  path on CUDA: bytes-only workers, batched ``decode_jpeg`` on the GPU, size-grouped preprocessing);
* their **ratio**, the **peak GPU memory**, and the time to **rank** a query set against a gallery of
  random normalised features (torch path, and faiss when asked).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .backbones import load_backbone
from .encode import encode_images
from .retrieval import rank
from .types import ImageRef

COCO_SIZES = ((640, 480), (480, 640), (640, 427), (500, 375), (612, 612))


@dataclass
class BenchResult:
    model: str
    device: str
    precision: str
    batch_size: int
    images: int
    model_alone_img_s: float
    full_path_img_s: float
    ratio: float
    peak_gpu_mem_gib: float | None
    rank_queries: int
    rank_gallery: int
    rank_seconds: float
    encode_path: str


def make_jpegs(folder: Path, n: int, seed: int = 0) -> list[ImageRef]:
    """``n`` JPEG files (quality 90) of COCO-like sizes with smooth content plus noise (~50-100 KB each)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    templates = []
    for w, h in COCO_SIZES:
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * 255 / w), (yy * 255 / h), ((xx + yy) * 127 / (w + h))], axis=-1)
        templates.append(base)
    refs = []
    for i in range(n):
        base = templates[i % len(templates)]
        arr = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"{i:07d}.jpg"
        Image.fromarray(arr).save(path, quality=90)
        refs.append(ImageRef(str(i), path))
    return refs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_bench(model: str = "ViT-B-32", pretrained: str = "none", images: int = 256, batch_size: int = 64,
              precision: str = "auto", device: str = "auto", workers: int = 4, queries: int = 800,
              gallery: int = 20000, encode_path: str = "auto", retrieval: str = "torch", folder: Path | None = None,
              progress: bool = True) -> BenchResult:
    """Measure and return a :class:`BenchResult` (see the module docstring)."""
    bb = load_backbone(model, pretrained, device=device, precision=precision)
    dev = bb.device
    pre = bb.preprocessor("clip")
    tmp = tempfile.TemporaryDirectory() if folder is None else None
    root = Path(tmp.name) if tmp else Path(folder)
    try:
        refs = make_jpegs(root, images)
        pixels = torch.randn(batch_size, 3, pre.size, pre.size, device=dev)
        bb.encode_image(pixels)  # warm-up (kernels, autotuning)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        _sync(dev)
        reps = max(2, images // batch_size)
        start = time.perf_counter()
        for _ in range(reps):
            bb.encode_image(pixels)
        _sync(dev)
        model_alone = reps * batch_size / (time.perf_counter() - start)

        encode_images(refs[: min(len(refs), batch_size)], bb.encode_image, pre, batch_size=batch_size,
                      workers=workers, progress=False, path=encode_path, device=dev)  # warm-up (workers, decoder)
        _sync(dev)
        start = time.perf_counter()
        encode_images(refs, bb.encode_image, pre, batch_size=batch_size, workers=workers, progress=progress,
                      pin_memory=dev.type == "cuda", path=encode_path, device=dev, desc="full path")
        _sync(dev)
        full = len(refs) / (time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None

        dim = bb.encode_text(["a"]).shape[-1]
        g = torch.nn.functional.normalize(torch.randn(gallery, dim, device=dev), dim=-1)
        q = torch.nn.functional.normalize(torch.randn(queries, dim, device=dev), dim=-1)
        rank(q[:8], g, 50, backend=retrieval)  # warm-up
        _sync(dev)
        start = time.perf_counter()
        rank(q, g, 50, backend=retrieval)
        _sync(dev)
        rank_s = time.perf_counter() - start
    finally:
        if tmp:
            tmp.cleanup()
    path = encode_path if encode_path != "auto" else ("batched" if dev.type == "cuda" else "workers")
    return BenchResult(model, str(dev), bb.precision, batch_size, images, round(model_alone, 1), round(full, 1),
                       full / model_alone, None if peak is None else round(peak, 2), queries, gallery,
                       round(rank_s, 4), path)


def format_result(result: BenchResult) -> str:
    rows = [("model", f"{result.model} ({result.precision}, {result.device}, batch {result.batch_size})"),
            ("model alone", f"{result.model_alone_img_s:,.1f} img/s"),
            ("full path", f"{result.full_path_img_s:,.1f} img/s ({result.encode_path}, {result.images} JPEG files)"),
            ("ratio", f"{result.ratio:.1%}"),
            ("peak GPU memory", "n/a (CPU)" if result.peak_gpu_mem_gib is None else f"{result.peak_gpu_mem_gib} GiB"),
            ("rank", f"{result.rank_queries} queries x {result.rank_gallery:,} gallery: {result.rank_seconds:.3f} s")]
    return "\n".join(f"{k:<16} {v}" for k, v in rows)


def to_json(result: BenchResult) -> str:
    return json.dumps(asdict(result))
