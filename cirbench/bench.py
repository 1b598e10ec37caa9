"""``cirbench bench``: measured throughput of every piece of the pipeline, side by side, in one run.

Sections (each optional):

* **encode**: images/s of the model alone on random, already-preprocessed tensors (the ceiling); of the
  full path, files on disk to features (:func:`cirbench.encode.encode_images`); of the official scripts' way
  (fp32, PIL decode + targetpad + bicubic in DataLoader workers, batch 32, ``ToTensor``/``Normalize`` in the
  workers); their ratios; the pieces alone (readers only, decoding only, preprocessing only); peak GPU memory.
  Synthetic JPEGs of COCO-like sizes, written once per folder.
* **rank**: seconds to rank ``queries`` x ``gallery`` (top 50): cirbench's torch backend, a plain
  ``torch.topk(q @ g.T)`` on the same data (the bound to approach), faiss, and a bf16 gallery.
* **cache**: warm-run overhead of the feature cache at ``cache_rows`` images: identifying the images (one
  ``stat`` each), writing the features as a shard, reading them back (checksum verified), beside the I/O
  floor (a bare ``os.stat`` loop, a bare ``safetensors`` save and load of the same tensor).
* **agreement**: fp32 vs bf16 features of the same images (cosine) and rank agreement; the batched path's
  pixels (the GPU JPEG decoder on CUDA) beside the official PIL path's, in uint8 levels.

On CUDA the encode section also counts the host-device synchronisations of one full pass, by thread and place
(:func:`audit_syncs`): the model's thread should make none.

Results are a JSON-able dict; :func:`format_report` renders it as a table.
"""

from __future__ import annotations

import functools
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .types import ImageRef

COCO_SIZES = ((640, 480), (480, 640), (640, 427), (500, 375), (612, 612))
OFFICIAL_BATCH = 32


@dataclass
class BenchConfig:
    model: str = "ViT-B-32"
    pretrained: str = "none"
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 on CUDA, fp32 on the CPU (the throughput goals are stated in bf16)
    images: int = 128
    batch_size: int = 32
    workers: int = 2
    reps: int = 3
    official: bool = True
    official_images: int = 0  # time the official-style pipeline on the first N files only (0: all of them)
    pieces: bool = True
    queries: int = 800
    gallery: int = 20000
    dim: int = 768
    cache_rows: int = 0
    agreement: bool = False
    folder: str | None = None
    sections: tuple[str, ...] = ("encode", "rank")
    whole: bool = False  # rank: also each query against the whole gallery, with its hits and AP


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, reps: int) -> dict[str, Any]:
    """Median of ``reps`` timed calls after one warm-up call."""
    fn()
    _sync(device)
    runs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        runs.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(runs), "runs_s": [round(r, 5) for r in runs]}


SYNC_WARNING = "synchronizing CUDA operation"  # what torch warns in CUDA's sync debug mode


def audit_syncs(run: Callable[[], Any]) -> dict[str, Any]:
    """Run ``run`` once with CUDA's sync debug mode set to warn: the host-device synchronisations it made in
    the calling thread (the model's, in the encode path) and in the others (staging, writing), and where: the
    thread and the ``file:line`` of the Python call that made each, most frequent first."""
    import threading
    import warnings
    from collections import Counter

    places: Counter = Counter()
    caller = threading.current_thread().name
    show = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if SYNC_WARNING in str(message):
            places[(threading.current_thread().name, f"{os.path.basename(filename)}:{lineno}")] += 1
        else:
            show(message, category, filename, lineno, file, line)

    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    in_caller = sum(n for (thread, _), n in places.items() if thread == caller)
    return {"calling_thread": in_caller, "other_threads": sum(places.values()) - in_caller,
            "places": {f"{thread} {place}": n for (thread, place), n in places.most_common(12)}}


def _photo(width: int, height: int, rng: np.random.Generator):
    """A PIL RGB image of smooth gradients plus noise (JPEG sizes like a photo's)."""
    from PIL import Image

    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (width + height)], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8))


def _save_jpeg(image, path: Path, **options: Any) -> None:
    """``image`` as a JPEG at ``path``, written beside it and renamed into place (a stopped run leaves no half
    file that a later run would reuse)."""
    tmp = path.with_suffix(".tmp")
    image.save(tmp, format="JPEG", **options)
    os.replace(tmp, path)


def _write_jpeg(path: Path, index: int, seed: int) -> None:
    w, h = COCO_SIZES[index % len(COCO_SIZES)]
    _save_jpeg(_photo(w, h, np.random.default_rng(seed * 100_003 + index)), path, quality=90)


# JPEG encodings a gallery holds besides baseline 4:2:0 (COCO has greyscale and CMYK files, web images
# progressive and 4:4:4 ones): (PIL mode, size, save options). A GPU decoder may treat them otherwise than
# libjpeg-turbo, PIL's decoder; CMYK files take the PIL path on every device (not in ``JPEG_MODES``). Pillow
# writes restart markers and RGB components from 10.2 on (before, those two are plain baseline files).
JPEG_VARIANTS: dict[str, tuple[str, tuple[int, int], dict[str, Any]]] = {
    "baseline-420": ("RGB", (640, 480), {"quality": 90}),
    "422": ("RGB", (640, 427), {"quality": 90, "subsampling": 1}),
    "444": ("RGB", (500, 375), {"quality": 90, "subsampling": 0}),
    "progressive": ("RGB", (480, 640), {"quality": 90, "progressive": True}),
    "optimized-q100": ("RGB", (612, 612), {"quality": 100, "optimize": True}),
    "odd-size": ("RGB", (333, 517), {"quality": 85}),
    "restart-markers": ("RGB", (640, 480), {"quality": 90, "restart_marker_rows": 1}),  # as many cameras write
    "rgb-no-ycc": ("RGB", (500, 375), {"quality": 90, "keep_rgb": True}),  # RGB components (Adobe transform 0)
    "greyscale": ("L", (640, 480), {"quality": 90}),
    "cmyk": ("CMYK", (500, 375), {"quality": 90}),
}


def make_jpeg_variants(folder: Path, per_variant: int = 4, seed: int = 0) -> dict[str, list[ImageRef]]:
    """``per_variant`` JPEG files of each of :data:`JPEG_VARIANTS`, by variant (written once, then reused)."""
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[ImageRef]] = {}
    for v, (name, (mode, (w, h), options)) in enumerate(JPEG_VARIANTS.items()):
        out[name] = []
        for i in range(per_variant):
            path = folder / f"{name}-{i}.jpg"
            if not path.exists():
                _save_jpeg(_photo(w, h, np.random.default_rng((seed * 100 + v) * 100 + i)).convert(mode), path,
                           **options)
            out[name].append(ImageRef(f"{name}-{i}", path))
    return out


def _write_range(args: tuple[str, int, int, int]) -> None:
    folder, start, stop, seed = args
    for i in range(start, stop):
        path = Path(folder) / f"{i:07d}.jpg"
        if not path.exists():
            _write_jpeg(path, i, seed)


def make_jpegs(folder: Path, n: int, seed: int = 0) -> list[ImageRef]:
    """``n`` JPEG files (quality 90) of COCO-like sizes with smooth content plus noise (~60-100 KB each);
    files already there are reused; many files are written by all CPU cores."""
    folder.mkdir(parents=True, exist_ok=True)
    missing = [i for i in range(n) if not (folder / f"{i:07d}.jpg").exists()]
    if len(missing) > 256:
        from concurrent.futures import ProcessPoolExecutor

        step = 1000
        with ProcessPoolExecutor() as pool:
            list(pool.map(_write_range, [(str(folder), s, min(n, s + step), seed) for s in range(0, n, step)]))
    else:
        _write_range((str(folder), 0, n, seed))
    return [ImageRef(str(i), folder / f"{i:07d}.jpg") for i in range(n)]


# -- the official scripts' way (a replica for timing and agreement) ------------------------------------------
class OfficialStyleFiles(torch.utils.data.Dataset):
    """SEARLE's ``targetpad_transform`` composition applied in DataLoader workers, float tensors handed over."""

    def __init__(self, refs: list[ImageRef], size: int):
        from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

        from .preprocess import CLIP_MEAN, CLIP_STD, Preprocessor

        pad = Preprocessor("targetpad", size)
        self.paths = [str(r.path) for r in refs]
        self.transform = Compose([lambda im: _pad(im, pad), Resize(size, interpolation=InterpolationMode.BICUBIC),
                                  CenterCrop(size), lambda im: im.convert("RGB"), ToTensor(),
                                  Normalize(CLIP_MEAN, CLIP_STD)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        return self.transform(Image.open(self.paths[i]))


def _pad(image, pre):
    import torchvision.transforms.functional as TF

    plan = pre.plan(*image.size)
    return TF.pad(image, list(plan.pad), 0, "constant") if any(plan.pad) else image


def official_style_encode(refs: list[ImageRef], model_encode: Callable, size: int, device: torch.device,
                          workers: int) -> torch.Tensor:
    loader = torch.utils.data.DataLoader(OfficialStyleFiles(refs, size), batch_size=OFFICIAL_BATCH,
                                         num_workers=workers, pin_memory=device.type == "cuda")
    out = []
    with torch.no_grad():
        for batch in loader:
            out.append(model_encode(batch.to(device)).float().cpu())
    return torch.cat(out)


# -- sections ----------------------------------------------------------------------------------------------
def bench_encode(cfg: BenchConfig, folder: Path) -> dict[str, Any]:
    from .backbones import load_backbone
    from .encode import BatchFiles, Stager, decode_jpegs, encode_images
    from .preprocess import auto_products, bf16_digit_products_are_exact

    bb = load_backbone(cfg.model, cfg.pretrained, device=cfg.device, precision=_precision(cfg))
    dev = bb.device
    pre = bb.preprocessor("clip")
    refs = make_jpegs(folder, cfg.images)
    pixels = torch.randn(cfg.batch_size, 3, pre.size, pre.size, device=dev)
    iters = max(2, cfg.images // cfg.batch_size)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    alone = timed(lambda: [bb.encode_image(pixels) for _ in range(iters)], dev, cfg.reps)
    r: dict[str, Any] = {"model": bb.model_name, "device": str(dev), "precision": bb.precision,
                         "batch_size": cfg.batch_size, "workers": cfg.workers, "images": len(refs),
                         "model_alone_img_s": iters * cfg.batch_size / alone["seconds"]}

    def full(path: str, kind: str = "clip"):
        return encode_images(refs, bb.encode_image, bb.preprocessor(kind), batch_size=cfg.batch_size,
                             workers=cfg.workers, progress=False, path=path, device=dev, dtype=bb.input_dtype)

    path = "batched" if dev.type == "cuda" else "workers"
    for kind in ("clip", "targetpad"):
        t = timed(functools.partial(full, path, kind), dev, cfg.reps)
        r[f"full_path_{kind}_img_s"] = len(refs) / t["seconds"]
    r["encode_path"] = path
    r["ratio_full_over_model"] = r["full_path_clip_img_s"] / r["model_alone_img_s"]
    if dev.type == "cuda":  # the loop should never wait for the device in the model's thread
        r["host_syncs"] = audit_syncs(lambda: full(path))
    if cfg.official:
        bb32 = load_backbone(cfg.model, cfg.pretrained, device=cfg.device, precision="fp32")
        subset = refs[: cfg.official_images] if cfg.official_images else refs
        t = timed(lambda: official_style_encode(subset, bb32.encode_image, pre.size, dev, cfg.workers), dev, 1)
        r["official_style_img_s"] = len(subset) / t["seconds"]
        r["official_style_images"] = len(subset)
        r["speedup_over_official_style"] = r["full_path_targetpad_img_s"] / r["official_style_img_s"]
        del bb32
    if cfg.pieces:
        files = BatchFiles(refs, pre, cfg.batch_size, batched=True)
        loader = lambda: list(torch.utils.data.DataLoader(files, batch_size=None, num_workers=cfg.workers))  # noqa: E731
        r["piece_readers_img_s"] = len(refs) / timed(loader, dev, cfg.reps)["seconds"]
        packed = loader()
        batches = [list(torch.split(p["jpeg_data"], p["jpeg_lengths"].tolist())) for p in packed]
        decode = lambda: [decode_jpegs(b, ["x"] * len(b), dev) for b in batches]  # noqa: E731
        r["piece_decode_img_s"] = len(refs) / timed(decode, dev, cfg.reps)["seconds"]
        decoded = decode()
        r["preprocess_products"] = auto_products(dev)
        r["piece_preprocess_img_s"] = len(refs) / timed(lambda: [pre.batch_uint8(d) for d in decoded], dev,
                                                         cfg.reps)["seconds"]
        def preprocess_all(products: str) -> list:
            return [pre.batch_uint8(d, products=products) for d in decoded]

        modes = ["float64", "digits-float32"] + (["digits-bf16"] if bf16_digit_products_are_exact(dev) else [])
        r["piece_preprocess_by_products_img_s"] = {
            m: len(refs) / timed(functools.partial(preprocess_all, m), dev, cfg.reps)["seconds"] for m in modes}
        stager = Stager(refs, pre, dev, bb.input_dtype)
        r["piece_stage_img_s"] = len(refs) / timed(lambda: [stager(p) for p in packed], dev, cfg.reps)["seconds"]
    if dev.type == "cuda":
        r["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 3)
    if cfg.agreement:
        r["agreement"] = bench_agreement(cfg, refs, folder)
    return r


def bench_agreement(cfg: BenchConfig, refs: list[ImageRef], folder: Path) -> dict[str, Any]:
    """fp32 vs bf16 features of the same images through the same path: cosine and top-10 rank overlap; the
    batched path's pixels beside the official path's, on ``refs`` and on each JPEG encoding of
    :data:`JPEG_VARIANTS`."""
    from .backbones import load_backbone
    from .encode import encode_images

    feats = {}
    for prec in ("fp32", "bf16"):
        bb = load_backbone(cfg.model, cfg.pretrained, device=cfg.device, precision=prec)
        feats[prec] = encode_images(refs, bb.encode_image, bb.preprocessor("clip"), batch_size=cfg.batch_size,
                                    workers=cfg.workers, progress=False, device=bb.device, dtype=bb.input_dtype)
    cos = (feats["fp32"] * feats["bf16"]).sum(-1)
    k = min(10, len(refs) - 1)  # each image's nearest others (none beside a single image: no overlap to tell)
    top32 = torch.topk(feats["fp32"] @ feats["fp32"].T, k + 1, dim=1).indices[:, 1:]
    top16 = torch.topk(feats["bf16"] @ feats["bf16"].T, k + 1, dim=1).indices[:, 1:]
    overlap = ({f"top{k}_overlap": float(np.mean([len(set(a.tolist()) & set(b.tolist())) / k
                                                   for a, b in zip(top32, top16, strict=True)]))} if k else {})
    return {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()), **overlap,
            "pixels_batched_vs_official": pixel_agreement(refs[:512], bb.preprocessor("targetpad"), bb.device,
                                                          cfg.batch_size, cfg.workers),
            "pixels_by_jpeg_variant": jpeg_variant_agreement(folder, bb.preprocessor("targetpad"), bb.device,
                                                             cfg.batch_size, cfg.workers)}


def jpeg_variant_agreement(folder: Path, pre, device: torch.device, batch_size: int, workers: int
                           ) -> dict[str, dict[str, Any]]:
    """:func:`pixel_agreement`'s figures for each of :data:`JPEG_VARIANTS` (files written under
    ``folder/jpeg-variants``), all encoded in one pass per path: where a GPU decoder departs from PIL's pixels,
    which encodings it is."""
    variants = make_jpeg_variants(folder / "jpeg-variants")
    diff = pixel_differences([r for refs in variants.values() for r in refs], pre, device, batch_size, workers)
    out, start = {}, 0
    for name, refs in variants.items():
        out[name] = _difference_figures(diff[start : start + len(refs)])
        start += len(refs)
    return out


def pixel_agreement(refs: list[ImageRef], pre, device: torch.device, batch_size: int, workers: int
                    ) -> dict[str, Any]:
    """The batched path's preprocessed pixels (on CUDA: the GPU JPEG decoder) beside the official per-image PIL
    path's, on the same files, in uint8 levels: how many values and images differ, and by how much. The
    resampling is exact, so on the CPU (the same libjpeg-turbo decoding) nothing differs."""
    return _difference_figures(pixel_differences(refs, pre, device, batch_size, workers))


def pixel_differences(refs: list[ImageRef], pre, device: torch.device, batch_size: int, workers: int
                      ) -> torch.Tensor:
    """``[images, values]``: how many uint8 levels each preprocessed value of the batched path is from the
    official per-image PIL path's."""
    from .encode import encode_images

    mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1)

    def levels(pixels: torch.Tensor) -> torch.Tensor:  # normalised input back to its uint8 values
        return ((pixels.float() * std + mean) * 255).round().to(torch.int16).flatten(1)

    got = {path: encode_images(refs, levels, pre, batch_size=batch_size, workers=workers, progress=False, path=path,
                               device=device, dtype=torch.float32).to(torch.int16)
           for path in ("batched", "workers")}
    return (got["batched"] - got["workers"]).abs()


def _difference_figures(diff: torch.Tensor) -> dict[str, Any]:
    return {"images": diff.shape[0], "values_differing": float((diff > 0).float().mean()),
            "images_differing": float((diff > 0).any(dim=1).float().mean()), "max_levels": int(diff.max()),
            "mean_levels": float(diff.float().mean())}


def bench_rank(cfg: BenchConfig) -> dict[str, Any]:
    from .backbones import resolve_device
    from .retrieval import _faiss_available, rank

    dev = resolve_device(cfg.device)
    gen = torch.Generator().manual_seed(0)
    g = torch.nn.functional.normalize(torch.randn(cfg.gallery, cfg.dim, generator=gen), dim=-1).to(dev)
    q = torch.nn.functional.normalize(torch.randn(cfg.queries, cfg.dim, generator=gen), dim=-1).to(dev)
    k = min(50, cfg.gallery)  # a run keeps the top 50 (the largest k of the metrics); a smaller gallery: all of it
    r: dict[str, Any] = {"queries": cfg.queries, "gallery": cfg.gallery, "dim": cfg.dim, "k": k, "device": str(dev)}
    r["cirbench_torch_s"] = timed(lambda: rank(q, g, k, backend="torch"), dev, cfg.reps)["seconds"]
    r["plain_topk_s"] = timed(lambda: [x.cpu() for x in torch.topk(q @ g.T, k, dim=1)], dev, cfg.reps)["seconds"]
    r["ratio_cirbench_over_topk"] = r["cirbench_torch_s"] / r["plain_topk_s"]
    gb = g.to(torch.bfloat16)
    r["cirbench_bf16_gallery_s"] = timed(lambda: rank(q, gb, k, backend="torch"), dev, cfg.reps)["seconds"]
    if _faiss_available():
        r["faiss_s"] = timed(lambda: rank(q, g, k, backend="faiss"), dev, cfg.reps)["seconds"]
    r["auto_s"] = timed(lambda: rank(q, g, k, backend="auto"), dev, cfg.reps)["seconds"]
    if cfg.whole:
        r["whole"] = bench_whole_ranking(q, g, dev, cfg.reps)
    return r


def bench_whole_ranking(q: torch.Tensor, g: torch.Tensor, dev: torch.device, reps: int) -> dict[str, Any]:
    """What benchmarks with AP over a whole ranking pay (domain conversion, i-CIR, PatternCom): every query ranked
    against the whole gallery, then its hits and AP (a positive every 401 gallery images), and the peak memory
    (the process's resident set on the CPU, allocated memory on CUDA)."""
    import resource

    from .evaluate import stream_step
    from .metrics import average_precision_per_query, hits_matrix
    from .retrieval import rank

    n = g.shape[0]
    targets = [list(range(i % 401, n, 401)) for i in range(q.shape[0])]

    def peak() -> float:
        if dev.type == "cuda":
            return round(torch.cuda.max_memory_allocated(dev) / 2**30, 3)
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    # first in the parts a run ranks and scores such a set in (the process's peak only grows: this one comes first)
    step = stream_step(q.shape[0], n)
    parts = []
    for s in range(0, q.shape[0], step):
        part = rank(q[s : s + step], g, n, backend="torch")[0]
        parts.append(average_precision_per_query(hits_matrix(part, targets[s : s + step])))
        del part
    out: dict[str, Any] = {"stream_parts": -(-q.shape[0] // step), "stream_queries_per_part": step,
                           "stream_peak_gib": peak()}
    ranked: dict[str, torch.Tensor] = {}

    def whole() -> None:
        ranked["indices"] = rank(q, g, n, backend="torch")[0]  # the last call's ranking is what AP reads

    out["rank_s"] = timed(whole, dev, reps)["seconds"]
    indices = ranked["indices"]
    aps: dict[str, torch.Tensor] = {}
    out["hits_and_ap_s"] = timed(lambda: aps.update(ap=average_precision_per_query(hits_matrix(indices, targets))),
                                 dev, reps)["seconds"]
    out["peak_gpu_mem_gib" if dev.type == "cuda" else "peak_rss_gib"] = peak()
    out["stream_equals_whole"] = bool(torch.equal(torch.cat([torch.as_tensor(p) for p in parts]),
                                                  torch.as_tensor(aps["ap"])))
    return out


def bench_cache(cfg: BenchConfig, folder: Path) -> dict[str, Any]:
    """Warm-run overhead at ``cache_rows`` images (empty files: only their identity matters here)."""
    from safetensors.torch import load_file, save_file

    from .feature_cache import FeatureCache

    n = cfg.cache_rows
    files = folder / f"cache-files-{n}"
    files.mkdir(parents=True, exist_ok=True)
    refs = [ImageRef(str(i), files / f"{i:012d}.jpg") for i in range(n)]
    if not (files / f"{n - 1:012d}.jpg").exists():
        for ref in refs:
            ref.path.touch()
    feats = torch.nn.functional.normalize(torch.randn(n, cfg.dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    key = {"format": 2, "bench": cfg.dim}
    r: dict[str, Any] = {"rows": n, "dim": cfg.dim}
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        t0 = time.perf_counter()
        for ref in refs:
            os.stat(ref.path)
        r["floor_stat_loop_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        save_file({"features": feats}, f"{tmp}/plain.safetensors")
        r["floor_safetensors_save_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        load_file(f"{tmp}/plain.safetensors")
        r["floor_safetensors_load_s"] = time.perf_counter() - t0
        cache = FeatureCache(Path(tmp) / "cache")
        t0 = time.perf_counter()
        out = cache.get_or_compute(key, refs, lambda todo, on_chunk=None: feats)
        r["cold_identify_and_write_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        warm = FeatureCache(Path(tmp) / "cache").get_or_compute(key, refs, _never)
        r["warm_identify_read_verify_s"] = time.perf_counter() - t0
        if not (torch.equal(out, feats) and torch.equal(warm, feats)):  # a timing of a cache that loses rows is none
            raise RuntimeError("the feature cache returned other features than it was given")
    return r


def _never(todo, on_chunk=None):
    raise AssertionError(f"{len(todo)} rows were not served from the cache")


def _precision(cfg: BenchConfig) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    from .backbones import resolve_device

    return "bf16" if resolve_device(cfg.device).type == "cuda" else "fp32"


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run the asked sections; a JSON-able dict of figures."""
    out: dict[str, Any] = {"config": asdict(cfg), "torch": torch.__version__}
    tmp = tempfile.TemporaryDirectory() if cfg.folder is None else None
    folder = Path(tmp.name) if tmp is not None else Path(str(cfg.folder))
    try:
        if "encode" in cfg.sections:
            out["encode"] = bench_encode(cfg, folder / "jpegs")
        if "rank" in cfg.sections:
            out["rank"] = bench_rank(cfg)
        if "cache" in cfg.sections and cfg.cache_rows:
            out["cache"] = bench_cache(cfg, folder)
    finally:
        if tmp:
            tmp.cleanup()
    return out


def describe_pixels(p: dict[str, Any]) -> str:
    """One line for :func:`pixel_agreement`'s figures."""
    return (f"pixels of {p['images']} images: {p['values_differing']:.2%} of values differ in "
            f"{p['images_differing']:.0%} of images, by at most {p['max_levels']} levels "
            f"(mean {p['mean_levels']:.3f})")


def format_report(result: dict[str, Any]) -> str:
    lines = []
    e = result.get("encode")
    if e:
        lines.append(f"encode  {e['model']} ({e['precision']}, {e['device']}, batch {e['batch_size']}, "
                     f"{e['workers']} workers, {e['images']} JPEGs, path {e['encode_path']})")
        lines.append(f"  model alone          {e['model_alone_img_s']:10,.1f} img/s")
        lines.append(f"  full path (clip)     {e['full_path_clip_img_s']:10,.1f} img/s   "
                     f"{e['ratio_full_over_model']:.1%} of the model alone")
        lines.append(f"  full path (targetpad){e['full_path_targetpad_img_s']:10,.1f} img/s")
        if "official_style_img_s" in e:
            lines.append(f"  official-style       {e['official_style_img_s']:10,.1f} img/s   "
                         f"(fp32, PIL in workers, batch 32; cirbench x{e['speedup_over_official_style']:.2f})")
        for key in ("readers", "decode", "preprocess", "stage"):
            if f"piece_{key}_img_s" in e:
                note = f"   ({e['preprocess_products']} products)" if key == "preprocess" else ""
                lines.append(f"  piece: {key:<13} {e[f'piece_{key}_img_s']:10,.1f} img/s{note}")
        for mode, rate in e.get("piece_preprocess_by_products_img_s", {}).items():
            lines.append(f"    preprocess, {mode:<14}{rate:10,.1f} img/s")
        if "host_syncs" in e:
            h = e["host_syncs"]
            lines.append(f"  host syncs (1 pass)  {h['calling_thread']} in the model's thread, {h['other_threads']} in "
                         "the others" + "".join(f"\n    {n:6d}  {place}" for place, n in h["places"].items()))
        if "peak_gpu_mem_gib" in e:
            lines.append(f"  peak GPU memory      {e['peak_gpu_mem_gib']} GiB")
        if "agreement" in e:
            a = e["agreement"]
            lines.append(f"  fp32 vs bf16         cosine min {a['cosine_min']:.5f}, mean {a['cosine_mean']:.5f}"
                         + "".join(f"; {k} {v:.3f}" for k, v in a.items() if k.startswith("top")))
            lines.append(f"  batched vs official  {describe_pixels(a['pixels_batched_vs_official'])}")
            lines += [f"    {name:<18} {describe_pixels(p)}" for name, p in a.get("pixels_by_jpeg_variant", {}).items()]
    r = result.get("rank")
    if r:
        lines.append(f"rank  {r['queries']} x {r['gallery']:,} (dim {r['dim']}, top {r['k']}, {r['device']})")
        lines.append(f"  cirbench (torch)     {r['cirbench_torch_s']:.4f} s   "
                     f"x{r['ratio_cirbench_over_topk']:.2f} of a plain topk ({r['plain_topk_s']:.4f} s)")
        lines.append(f"  bf16 gallery         {r['cirbench_bf16_gallery_s']:.4f} s")
        if "faiss_s" in r:
            lines.append(f"  faiss                {r['faiss_s']:.4f} s")
        lines.append(f"  auto                 {r['auto_s']:.4f} s")
        if "whole" in r:
            w = r["whole"]
            memory = (f"peak GPU memory {w['peak_gpu_mem_gib']} GiB" if "peak_gpu_mem_gib" in w else
                      f"peak RSS {w['peak_rss_gib']} GiB")
            lines.append(f"  whole gallery        {w['rank_s']:.4f} s ranked, {w['hits_and_ap_s']:.4f} s hits and AP; "
                         f"{memory}")
            lines.append(f"  in a run's parts     {w['stream_parts']} part(s) of {w['stream_queries_per_part']:,} "
                         f"queries: peak {w['stream_peak_gib']} GiB; the same APs as at once: "
                         f"{w['stream_equals_whole']}")
    c = result.get("cache")
    if c:
        lines.append(f"cache  {c['rows']:,} rows x {c['dim']}")
        lines.append(f"  cold: identify + write  {c['cold_identify_and_write_s']:.3f} s   (floor: stat loop "
                     f"{c['floor_stat_loop_s']:.3f} s + safetensors save {c['floor_safetensors_save_s']:.3f} s)")
        lines.append(f"  warm: identify + read   {c['warm_identify_read_verify_s']:.3f} s   (floor: stat loop "
                     f"{c['floor_stat_loop_s']:.3f} s + safetensors load {c['floor_safetensors_load_s']:.3f} s)")
    return "\n".join(lines)
