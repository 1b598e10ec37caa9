"""The encode pipeline: image files -> features, with reading, decoding, preprocessing and the model overlapped.

Three stages run at once:

1. **readers** (DataLoader worker processes): each reads a whole batch of files and hands it over packed in a
   few tensors (one byte buffer plus lengths, not one tensor per image). Headers are probed and the pixel
   limit enforced before anything is decoded. On the ``workers`` path a reader also decodes and preprocesses
   with PIL, exactly the official pipeline. On the ``batched`` path it forwards JPEG bytes (RGB and grey
   JPEGs) and preprocesses only other files (PNG, palette, RGBA, CMYK ...) with PIL.
2. **prefetch threads** in the main process: JPEGs decoded as a batch (``torchvision.io.decode_jpeg``, the
   GPU's JPEG decoder on CUDA), then resized and cropped with PIL's exact arithmetic as two batched matrix
   products (:meth:`cirbench.preprocess.Preprocessor.batch_uint8`), normalised and cast, on their own CUDA
   stream; a CUDA event hands each batch to the model stream, so nothing waits on the host.
3. the **model** in the calling thread, writing features into device memory; every ``chunk_rows`` images the
   finished rows are copied to pinned host memory asynchronously and a writer thread checks them (finite)
   and hands them to ``on_chunk`` (the feature cache writes them, so a killed run resumes where it stopped).

``path="workers"`` is the CPU default and equals the official pipeline byte for byte; ``path="batched"`` is
the CUDA default and equals it given the same decoded pixels (the GPU JPEG decoder may differ from
libjpeg-turbo by a grey level on some pixels).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import CirbenchError, ImageError
from .images import decode_bytes, load_image, open_pil, probe, read_image_bytes, tensor_decodable, tensor_decoder
from .preprocess import Preprocessor, host_to_device
from .types import ImageRef

ENCODE_PATHS = ("auto", "workers", "batched")
DEFAULT_CHUNK_ROWS = 8192


def default_batch_size(device: torch.device | str) -> int:
    """256 on CUDA (where the batched path needs large batches to overlap), 64 on the CPU."""
    return 256 if torch.device(device).type == "cuda" else 64


def default_workers(device: torch.device | str) -> int:
    """Reader processes: up to 16 on CUDA, up to 8 on the CPU (the model shares the cores there)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(16 if torch.device(device).type == "cuda" else 8, cpus)


def resolve_path(path: str, device: torch.device) -> str:
    if path not in ENCODE_PATHS:
        raise CirbenchError(f"unknown encode path {path!r}; valid: {', '.join(ENCODE_PATHS)}")
    if path == "auto":
        return "batched" if device.type == "cuda" else "workers"
    return path


def jpeg_decoder(path: str, device: torch.device | str) -> str:
    """The decoder that turns JPEGs into pixels: nvJPEG (the GPU's) on the batched path on CUDA, ``"nvjpeg"``
    through torchvision.io and ``"nvjpeg/torchcodec"`` through TorchCodec (which may pick the GPU's hardware
    JPEG engine); else ``"libjpeg-turbo"``, the official pipelines' (PIL on the workers path, the tensor decoder
    on the CPU: the same pixels, tested)."""
    device = torch.device(device)
    if device.type != "cuda" or resolve_path(path, device) != "batched":
        return "libjpeg-turbo"
    decoder = tensor_decoder()
    if decoder is None:
        return "libjpeg-turbo"  # no tensor decoder: PIL decodes on the CPU, the pixels go to the GPU
    return "nvjpeg" if decoder.name == "torchvision" else f"nvjpeg/{decoder.name}"


def image_library() -> str:
    """The library and version that decodes images into tensors, as results record it (``pil`` when none)."""
    decoder = tensor_decoder()
    return "pil" if decoder is None else f"{decoder.name} {decoder.version}"


def pixels_identity(preprocessor: Preprocessor, path: str, device: torch.device | str) -> dict[str, Any]:
    """What determines the pixels a model sees, as results and the feature cache record it: the preprocessing
    recipe, and the JPEG decoder where it is not the official one (GPU decoding may move some pixels; features
    made from them are never served to a run that asked for the official pipeline, and its results are told
    apart). The official decoder adds nothing, so keys and fingerprints made before this field stay valid."""
    ident = preprocessor.identity()
    if preprocessor.floating:  # decoded by PIL on every path (see BatchFiles)
        return ident
    decoder = jpeg_decoder(path, device)
    return ident if decoder == "libjpeg-turbo" else {**ident, "jpeg_decoder": decoder}


# -- stage 1: readers ------------------------------------------------------------------------------------
class BatchFiles(torch.utils.data.Dataset):
    """Item ``b`` is batch ``b`` of ``images``, read by one worker and packed (see the module docstring)."""

    def __init__(self, images: Sequence[ImageRef], preprocessor: Preprocessor, batch_size: int, batched: bool):
        self.images = list(images)
        self.preprocessor = preprocessor
        self.batch_size = batch_size
        self.batched = batched

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)

    def __getitem__(self, b: int) -> dict[str, Any]:
        start = b * self.batch_size
        refs = self.images[start : start + self.batch_size]
        pre = self.preprocessor
        errors: list[tuple[int, str]] = []
        done_index, done = [], []
        jpeg_index, jpeg_bytes, jpeg_sizes = [], [], []
        for i, ref in enumerate(refs):
            name = str(ref.path)
            try:
                if pre.floating:  # resized in floating point, as its official code: never the batched JPEG path
                    done.append(pre.pil_float(load_image(ref, pre.max_pixels)))
                    done_index.append(i)
                    continue
                if ref.view is not None:  # a region of the file: the PIL path, as the benchmark's code
                    view_pre = pre if ref.view.resize is None else dataclasses.replace(
                        pre, kind="clip", resize_mode=ref.view.resize)
                    done.append(view_pre.pil_uint8(load_image(ref, pre.max_pixels)))
                    done_index.append(i)
                    continue
                data = read_image_bytes(ref)
                fmt, mode, width, height = probe(data, name)
                pre.plan(width, height)  # the pixel limit, before anything is decoded
                if self.batched and tensor_decodable(fmt, mode):
                    jpeg_index.append(i)
                    jpeg_bytes.append(data)
                    jpeg_sizes.append((height, width))
                else:
                    done.append(pre.pil_uint8(open_pil(data, name, pre.max_pixels)))
                    done_index.append(i)
            except ImageError as exc:
                errors.append((i, _with_name(str(exc), name)))
            except Exception as exc:  # noqa: BLE001 - any decoder failure is reported with the file name
                errors.append((i, f"corrupt or unreadable image {name}: {type(exc).__name__}: {exc}"))
        done_pixels = handover_tensor((len(done), 3, pre.size, pre.size),
                                      torch.float32 if pre.floating else torch.uint8)
        if done:
            torch.stack(done, out=done_pixels)
        return {
            "start": start,
            "count": len(refs),
            "errors": errors,
            "done_index": torch.tensor(done_index, dtype=torch.int64),
            "done": done_pixels,
            "jpeg_index": torch.tensor(jpeg_index, dtype=torch.int64),
            "jpeg_lengths": torch.tensor([len(x) for x in jpeg_bytes], dtype=torch.int64),
            "jpeg_sizes": torch.tensor(jpeg_sizes, dtype=torch.int64).view(-1, 2),
            "jpeg_data": pack_bytes(jpeg_bytes),
        }


def handover_tensor(shape: tuple[int, ...], dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """An empty tensor (uint8 by default) to hand to the main process: in a DataLoader worker it is allocated in
    shared memory, so the hand-off passes it without the copy into shared memory it would otherwise make."""
    numel = math.prod(shape)
    if numel and torch.utils.data.get_worker_info() is not None:
        storage = torch.UntypedStorage._new_shared(numel * dtype.itemsize)
        return torch.empty(0, dtype=dtype).set_(storage).view(shape)
    return torch.empty(shape, dtype=dtype)


def pack_bytes(chunks: Sequence[bytes]) -> torch.Tensor:
    """``chunks`` back to back in one uint8 tensor, copied once (see :func:`handover_tensor`); joining them
    first and converting the result cost two more copies, about half of a reader's time per JPEG."""
    out = handover_tensor((sum(len(c) for c in chunks),))
    flat, offset = out.numpy(), 0
    for chunk in chunks:
        flat[offset : offset + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
        offset += len(chunk)
    return out


def _with_name(message: str, name: str) -> str:
    return message if name in message else f"{message} ({name})"


# -- stage 2: decoding and preprocessing -------------------------------------------------------------------
def decode_jpegs(datas: list[torch.Tensor], names: list[str], device: torch.device,
                 max_pixels: int | None = None) -> list[torch.Tensor]:
    """Decode JPEG byte tensors to uint8 RGB ``[3, H, W]`` tensors on ``device``: all at once through the
    tensor decoder (:func:`~cirbench.images.tensor_decoder`; nvJPEG on CUDA); if the batch fails, one by one,
    falling back to the CPU decoders for a file the GPU decoder rejects; ImageError names a file no decoder can
    read."""
    if not datas:
        return []
    decoder = tensor_decoder()
    if decoder is not None and device.type == "cuda":
        try:
            return list(decoder.jpeg(list(datas), device))
        except (RuntimeError, ValueError):
            pass
    out = []
    for data, name in zip(datas, names, strict=True):
        img = None
        if decoder is not None:
            try:
                img = decoder.jpeg(data, device)
            except (RuntimeError, ValueError):
                pass
        if img is None:
            img = decode_bytes(data, name, max_pixels).to(device, non_blocking=True)
        out.append(img)
    return out


class Stager:
    """Turns a packed batch into normalised model input on ``device`` (stage 2)."""

    def __init__(self, images: Sequence[ImageRef], preprocessor: Preprocessor, device: torch.device,
                 dtype: torch.dtype):
        self.images, self.preprocessor, self.device, self.dtype = images, preprocessor, device, dtype

    def __call__(self, packed: dict[str, Any]) -> tuple[int, torch.Tensor]:
        start, count = int(packed["start"]), int(packed["count"])
        if packed["errors"]:
            first = packed["errors"][0][1]
            more = f" (and {len(packed['errors']) - 1} more in this batch)" if len(packed["errors"]) > 1 else ""
            raise ImageError(first + more)
        pre, dev = self.preprocessor, self.device
        jpeg_index, done_index = packed["jpeg_index"], packed["done_index"]
        jpegs = self._jpegs(packed, start) if jpeg_index.numel() else None
        if jpegs is not None and jpeg_index.numel() == count:  # every file a JPEG (the usual batch)
            return start, pre.normalize(jpegs).to(self.dtype)
        pixels = torch.empty(count, 3, pre.size, pre.size, dtype=torch.float32, device=dev)
        if jpegs is not None:
            pixels[host_to_device(jpeg_index, dev)] = jpegs
        if done_index.numel():
            done = packed["done"].pin_memory() if dev.type == "cuda" else packed["done"]
            pixels[host_to_device(done_index, dev)] = done.to(dev, non_blocking=True).to(torch.float32)
        return start, pre.normalize(pixels).to(self.dtype)

    def _jpegs(self, packed: dict[str, Any], start: int) -> torch.Tensor:
        """The batch's JPEGs decoded on the device and resized: uint8-valued ``[J, 3, size, size]``."""
        lengths = packed["jpeg_lengths"].tolist()
        datas = list(torch.split(packed["jpeg_data"], lengths))
        names = [str(self.images[start + i].path) for i in packed["jpeg_index"].tolist()]
        decoded = decode_jpegs(datas, names, self.device, self.preprocessor.max_pixels)
        for img, (h, w), name in zip(decoded, packed["jpeg_sizes"].tolist(), names, strict=True):
            if tuple(img.shape[-2:]) != (h, w):
                raise ImageError(f"image {name}: decoded size {tuple(img.shape[-2:])} differs from its header "
                                 f"({h}, {w})")
        return self.preprocessor.batch_uint8(decoded)


class _Done:
    pass


class Prefetcher:
    """Runs ``stage`` on the items of ``iterator`` in ``threads`` background threads (each with its own CUDA
    stream on CUDA), at most ``depth`` finished items waiting; yields ``(start, pixels)`` ready for the
    calling thread's stream. An exception in a thread is raised in the caller."""

    def __init__(self, iterator, stage: Callable, device: torch.device, threads: int = 2, depth: int = 2):
        self.iterator, self.stage, self.device = iterator, stage, device
        self.threads = max(1, threads)
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.workers: list[threading.Thread] = []

    def _put(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None
        try:
            with torch.cuda.stream(stream) if cuda else contextlib.nullcontext(), torch.no_grad():
                while not self.stop.is_set():
                    with self.lock:
                        try:
                            packed = next(self.iterator)
                        except StopIteration:
                            break
                    start, pixels = self.stage(packed)
                    event = None
                    if cuda:
                        event = torch.cuda.Event()
                        event.record(stream)
                    self._put((start, pixels, event))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            self._put(exc)
        finally:
            self._put(_Done())

    def __iter__(self):
        self.workers = [threading.Thread(target=self._run, daemon=True, name=f"cirbench-prefetch-{i}")
                        for i in range(self.threads)]
        for t in self.workers:
            t.start()
        finished = 0
        try:
            while finished < self.threads:
                item = self.queue.get()
                if isinstance(item, _Done):
                    finished += 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                start, pixels, event = item
                if event is not None:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    pixels.record_stream(current)
                yield start, pixels
        finally:
            self.close()

    def close(self) -> None:
        self.stop.set()
        for t in self.workers:
            t.join(timeout=30)


# -- stage 3: the model and the hand-off of finished rows ----------------------------------------------------
class ChunkWriter:
    """Receives finished feature rows (asynchronously copied from the device on CUDA), checks that they are
    finite, fills the output and calls ``on_chunk(positions, features)``; on CUDA in a thread of its own."""

    def __init__(self, total: int, names: Callable[[int], str], on_chunk: Callable | None, device: torch.device):
        self.total, self.names, self.on_chunk, self.device = total, names, on_chunk, device
        self.out: torch.Tensor | None = None
        self.rows = 0  # rows written: the output is uninitialised memory until every one has been
        self.error: BaseException | None = None
        self.queue: queue.Queue = queue.Queue()
        self.thread = None
        if device.type == "cuda":
            self.thread = threading.Thread(target=self._loop, daemon=True, name="cirbench-chunk-writer")
            self.thread.start()

    def submit(self, positions: torch.Tensor, feats: torch.Tensor) -> None:
        if self.error is not None:
            raise self.error
        if self.thread is None:
            self._write(positions, feats, None)
            return
        host = feats.to("cpu", non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self.queue.put((positions, host, event))

    def _loop(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue
            try:
                self._write(*item)
            except BaseException as exc:  # noqa: BLE001 - raised in the caller at the next submit or close
                self.error = exc

    def _write(self, positions: torch.Tensor, feats: torch.Tensor, event) -> None:
        if event is not None:
            event.synchronize()
        feats = feats.float()
        finite = torch.isfinite(feats.reshape(feats.shape[0], -1)).all(dim=1)
        if not bool(finite.all()):
            bad = int(positions[~finite][0])
            raise CirbenchError(f"the features of image {self.names(bad)} are not finite (NaN or Inf): the model or "
                                "its weights are broken; nothing was cached for it")
        if self.out is None:
            self.out = torch.empty((self.total, *feats.shape[1:]), dtype=torch.float32)
        self.out[positions] = feats
        self.rows += len(positions)
        if self.on_chunk is not None:
            self.on_chunk(positions, feats)

    def close(self) -> torch.Tensor:
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join()
        if self.error is not None:
            raise self.error
        if self.rows != self.total:
            raise CirbenchError(f"the encoder handed over the features of {self.rows} of {self.total} images: an "
                                "internal error of the encoding pipeline (a batch was lost between its stages)")
        return self.out if self.out is not None else torch.empty(0)


def encode_images(
    images: Sequence[ImageRef],
    encode: Callable[[torch.Tensor], torch.Tensor],
    preprocessor: Preprocessor,
    batch_size: int | None = None,
    workers: int | None = None,
    desc: str = "encoding images",
    progress: bool = True,
    path: str = "auto",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    on_chunk: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    prefetch_threads: int | None = None,
    pin_memory: bool | None = None,  # accepted for compatibility; staging memory is always pinned on CUDA
) -> torch.Tensor:
    """Encode ``images`` with ``encode(pixels)``; the features, in order, as a float32 CPU tensor.

    ``on_chunk(positions, features)`` receives finished rows every ``chunk_rows`` images (and at the end), in
    completion order. A corrupt image raises ImageError naming it; non-finite features raise CirbenchError.
    """
    device = torch.device(device)
    if not images:
        return torch.empty(0)
    path = resolve_path(path, device)
    batch_size = default_batch_size(device) if batch_size is None else batch_size
    workers = default_workers(device) if workers is None else workers
    if batch_size < 1:
        raise CirbenchError(f"batch size must be at least 1 (got {batch_size})")
    if workers < 0:
        raise CirbenchError(f"workers must be 0 or more (got {workers})")
    files = BatchFiles(images, preprocessor, batch_size, batched=path == "batched")
    # a generator of its own: the loader's seed draw leaves torch's global random state alone, so a method that
    # draws from it meets the same state whether its images were encoded or found in the cache
    loader = torch.utils.data.DataLoader(files, batch_size=None, shuffle=False, num_workers=workers,
                                         prefetch_factor=2 if workers else None, persistent_workers=False,
                                         generator=torch.Generator())
    stages = Prefetcher(iter(loader), Stager(images, preprocessor, device, dtype), device,
                        prefetch_threads or (2 if device.type == "cuda" else 1))
    writer = ChunkWriter(len(images), lambda i: str(images[i].path), on_chunk, device)
    with tqdm(total=len(images), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        return _run_model(stages, encode, writer, chunk_rows, bar)


def _run_model(stages: Prefetcher, encode: Callable, writer: ChunkWriter, chunk_rows: int, bar) -> torch.Tensor:
    """Stage 3: the model over the prefetched batches, finished rows handed to ``writer`` every ``chunk_rows``;
    rows finished before a failure still reach it (the cache keeps them, so a rerun resumes)."""
    pending: list[tuple[int, torch.Tensor]] = []
    pending_rows = 0

    def flush() -> None:
        nonlocal pending, pending_rows
        if pending:
            positions = torch.cat([torch.arange(s, s + f.shape[0]) for s, f in pending])
            writer.submit(positions, torch.cat([f for _, f in pending]) if len(pending) > 1 else pending[0][1])
            pending, pending_rows = [], 0

    failed = True
    try:
        for start, pixels in stages:
            with torch.no_grad():
                feats = encode(pixels)
            if feats.shape[0] != pixels.shape[0]:
                raise CirbenchError(f"the image encoder returned {feats.shape[0]} rows for a batch of "
                                    f"{pixels.shape[0]} images")
            pending.append((start, feats.detach().float()))
            pending_rows += feats.shape[0]
            bar.update(feats.shape[0])
            if pending_rows >= chunk_rows:
                flush()
        failed = False
    finally:
        try:
            flush()
            out = writer.close()
        except BaseException:
            if not failed:
                raise
    return out
