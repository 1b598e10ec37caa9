"""The encode pipeline: the batched path equals the official per-image path, bad files are named, nothing is
lost when a run fails part-way, and workers, threads and chunks behave."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
import torch
from PIL import Image

from cirbench.backbones import load_backbone
from cirbench.encode import (
    BatchFiles,
    ChunkWriter,
    Prefetcher,
    decode_jpegs,
    default_batch_size,
    default_workers,
    encode_images,
    jpeg_decoder,
    resolve_path,
)
from cirbench.errors import CirbenchError, ImageError
from cirbench.preprocess import Preprocessor
from cirbench.types import ImageRef


def _image(w, h, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], axis=-1)
    return np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture
def image_files(tmp_path):
    """JPEGs (colour and grey) and PNGs (RGB, palette, RGBA) of odd sizes."""
    refs = []
    specs = [(64, 48, "jpg", "RGB"), (48, 64, "jpg", "RGB"), (61, 45, "png", "RGB"), (50, 50, "jpg", "L"),
             (80, 30, "png", "P"), (33, 70, "png", "RGBA"), (64, 48, "jpg", "RGB")]
    for i, (w, h, ext, mode) in enumerate(specs):
        img = Image.fromarray(_image(w, h, i))
        if mode == "L":
            img = img.convert("L")
        elif mode == "P":
            img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
        elif mode == "RGBA":
            img = img.convert("RGBA")
            img.putalpha(Image.fromarray((_image(w, h, 99)[..., 0] // 2 + 60).astype(np.uint8)))
        path = tmp_path / f"{i}.{ext}"
        img.save(path, quality=90)
        refs.append(ImageRef(str(i), path))
    return refs


def _pixels(x):
    return x.reshape(x.shape[0], -1)  # an "encoder" that returns the preprocessed pixels themselves


@pytest.mark.parametrize("kind", ["clip", "targetpad"])
def test_batched_path_gives_the_official_pixels(image_files, kind):
    """Same bytes as the per-image PIL pipeline: CPU JPEG decoding is libjpeg-turbo in both, and the
    batched resize reproduces PIL's integer arithmetic exactly."""
    pre = Preprocessor(kind, 24)
    slow = encode_images(image_files, _pixels, pre, batch_size=3, workers=0, progress=False, path="workers")
    fast = encode_images(image_files, _pixels, pre, batch_size=3, workers=0, progress=False, path="batched")
    assert slow.shape == (7, 3 * 24 * 24)
    assert torch.equal(fast, slow)


def test_worker_processes_and_threads_keep_the_order(image_files, tiny_config):
    bb = load_backbone(str(tiny_config), "none", device="cpu")
    pre = bb.preprocessor("targetpad")
    one = encode_images(image_files, bb.encode_image, pre, batch_size=2, workers=0, progress=False)
    many = encode_images(image_files, bb.encode_image, pre, batch_size=2, workers=2, progress=False,
                         prefetch_threads=3, path="batched")
    assert torch.allclose(one, many, atol=1e-6)


def test_the_prefetcher_waits_for_every_thread_not_the_first_to_finish():
    """A thread that finds the batches exhausted is done while another still stages the last one it took: every
    batch is yielded, whichever thread finishes first."""
    import time

    def stage(item):
        time.sleep(0.3 if item == 0 else 0.0)  # the thread holding batch 0 is the last to finish
        return item, torch.full((1,), float(item))

    got = dict(Prefetcher(iter(range(4)), stage, torch.device("cpu"), threads=3))
    assert sorted(got) == [0, 1, 2, 3]


def test_rows_never_handed_over_are_an_error_not_uninitialised_features():
    writer = ChunkWriter(4, str, None, torch.device("cpu"))
    writer.submit(torch.arange(0, 3), torch.ones(3, 2))
    with pytest.raises(CirbenchError, match="3 of 4 images"):
        writer.close()


def test_packed_batches_are_a_few_tensors(image_files):
    pre = Preprocessor("clip", 24)
    packed = BatchFiles(image_files, pre, batch_size=7, batched=True)[0]
    jpegs = [i for i, r in enumerate(image_files) if r.path.suffix == ".jpg"]
    assert packed["jpeg_index"].tolist() == jpegs
    assert packed["jpeg_data"].numel() == sum(image_files[i].path.stat().st_size for i in jpegs)
    assert packed["done"].shape == (3, 3, 24, 24) and packed["done"].dtype == torch.uint8
    assert packed["errors"] == []



class _SharedInWorker(torch.utils.data.Dataset):
    """Reports, from inside the worker, whether the packed tensors were built in shared memory."""

    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, b):
        packed = self.files[b]
        return {**packed, "shared": [packed["jpeg_data"].is_shared(), packed["done"].is_shared()]}


def test_worker_batches_are_built_in_shared_memory(image_files):
    """A worker writes each batch's bytes straight into shared memory (one copy), so handing it to the main
    process copies nothing more; the bytes are the files' own, back to back."""
    pre = Preprocessor("clip", 24)
    files = BatchFiles(image_files, pre, batch_size=7, batched=True)
    loader = torch.utils.data.DataLoader(_SharedInWorker(files), batch_size=None, num_workers=1)
    (packed,) = list(loader)
    assert packed["shared"] == [True, True]
    jpegs = [image_files[i].path.read_bytes() for i in packed["jpeg_index"].tolist()]
    assert packed["jpeg_data"].numpy().tobytes() == b"".join(jpegs)
    assert torch.equal(packed["done"], files[0]["done"])
    assert not files[0]["jpeg_data"].is_shared()  # in the main process a plain tensor

def test_corrupt_jpeg_is_named(image_files, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    refs = [*image_files, ImageRef("bad", bad)]
    for path in ("batched", "workers"):
        with pytest.raises(ImageError, match="bad.jpg"):
            encode_images(refs, _pixels, Preprocessor("clip", 24), batch_size=8, workers=0, progress=False,
                          path=path)
    bad.write_bytes(b"junk\n")  # not an image at all: the file and its first bytes, not PIL's BytesIO object
    for path in ("batched", "workers"):
        with pytest.raises(ImageError) as err:
            encode_images(refs, _pixels, Preprocessor("clip", 24), batch_size=8, workers=0, progress=False,
                          path=path)
        assert str(err.value) == (f"corrupt or unreadable image {bad}: not an image format PIL reads (it starts with "
                                  "b'junk\\n', 5 bytes)"), str(err.value)


def test_decoder_falls_back_and_names_the_file(image_files, tmp_path):
    good = torch.frombuffer(bytearray(image_files[0].path.read_bytes()), dtype=torch.uint8)
    out = decode_jpegs([good, good], ["a", "b"], torch.device("cpu"))
    assert [tuple(o.shape) for o in out] == [(3, 48, 64)] * 2
    broken = torch.frombuffer(bytearray(b"\xff\xd8\xff\xe0" + b"\x00" * 40), dtype=torch.uint8)
    with pytest.raises(ImageError, match="broken.jpg"):
        decode_jpegs([good, broken], ["a", "broken.jpg"], torch.device("cpu"))


@pytest.mark.parametrize("size", [(40000, 40000), (30000, 1)])
def test_pixel_bombs_are_refused_before_decoding(tmp_path, size):
    """A tiny PNG whose header declares a huge (or extremely thin) image: refused from the header alone, on
    every path an image is read by (the batched decoder, the reader processes, the PIL path of a view)."""
    from cirbench.images import load_image

    path = tmp_path / "bomb.png"
    Image.new("1", size).save(path, optimize=True)
    assert path.stat().st_size < 200_000
    for encode_path in ("batched", "workers"):
        with pytest.raises(ImageError, match="pixel limit"):
            encode_images([ImageRef("b", path)], _pixels, Preprocessor("clip", 24, max_pixels=10_000_000),
                          batch_size=1, workers=0, progress=False, path=encode_path)
    small = tmp_path / "small.png"  # the PIL path checks the declared pixels against the limit given
    Image.new("RGB", (300, 200)).save(small)
    with pytest.raises(ImageError, match="declares 300x200 pixels, over the pixel limit of 59,999"):
        load_image(ImageRef("s", small), max_pixels=59_999)
    assert load_image(ImageRef("s", small), max_pixels=60_000).size == (300, 200)


def test_encoding_defaults_follow_the_device(monkeypatch):
    """Batches of 256 on CUDA, 64 on the CPU; reader processes up to 16 on CUDA and 8 on the CPU, never more than
    the cores this process may use; ``auto`` is the batched path on CUDA and the reader processes elsewhere (no GPU
    is needed to ask)."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert (default_batch_size("cuda"), default_batch_size(cpu)) == (256, 64)
    for cores, want in ((3, (3, 3)), (12, (12, 8)), (64, (16, 8))):
        monkeypatch.setattr("os.sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
        assert (default_workers(cuda), default_workers("cpu")) == want
    assert [resolve_path(p, cuda) for p in ("auto", "workers", "batched")] == ["batched", "workers", "batched"]
    assert [resolve_path(p, cpu) for p in ("auto", "workers", "batched")] == ["workers", "workers", "batched"]
    with pytest.raises(CirbenchError, match="unknown encode path 'gpu'; valid: auto, workers, batched"):
        resolve_path("gpu", cpu)
    assert jpeg_decoder("auto", cpu) == jpeg_decoder("batched", cpu) == jpeg_decoder("workers", cuda) == "libjpeg-turbo"


def test_finished_rows_are_handed_over_every_chunk_rows_images(image_files):
    """``on_chunk`` gets the rows in chunks of ``chunk_rows`` (the last one shorter), each row once, with the
    features ``encode_images`` returns for it."""
    chunks = []
    feats = encode_images(image_files, _pixels, Preprocessor("clip", 24), batch_size=1, workers=0, progress=False,
                          prefetch_threads=1, chunk_rows=2, on_chunk=lambda pos, f: chunks.append((pos, f)))
    assert [len(pos) for pos, _ in chunks] == [2, 2, 2, 1]
    positions = torch.cat([pos for pos, _ in chunks])
    assert sorted(positions.tolist()) == list(range(len(image_files)))
    assert torch.equal(torch.cat([f for _, f in chunks]), feats[positions])


def test_failure_part_way_keeps_finished_chunks(image_files, tmp_path):
    bad = tmp_path / "late.png"
    bad.write_bytes(b"not an image")
    refs = [*image_files, ImageRef("late", bad)]
    seen = []
    with pytest.raises(ImageError, match="late.png"):
        encode_images(refs, _pixels, Preprocessor("clip", 24), batch_size=2, workers=0, progress=False,
                      prefetch_threads=1, chunk_rows=2, on_chunk=lambda pos, f: seen.extend(pos.tolist()))
    # every batch before the bad file's batch (6 and the bad 7) was handed over
    assert sorted(seen) == list(range(6))


def test_non_finite_features_are_refused(image_files):
    with pytest.raises(CirbenchError, match="not finite"):
        encode_images(image_files, lambda x: torch.full((x.shape[0], 4), float("nan")), Preprocessor("clip", 24),
                      batch_size=4, workers=0, progress=False)


def test_bad_batch_size_and_workers_are_errors(image_files):
    with pytest.raises(CirbenchError, match="batch size"):
        encode_images(image_files, _pixels, Preprocessor("clip", 24), batch_size=0, workers=0, progress=False)
    with pytest.raises(CirbenchError, match="workers"):
        encode_images(image_files, _pixels, Preprocessor("clip", 24), batch_size=2, workers=-1, progress=False)


def test_symlink_leaving_the_root_is_refused(tmp_path, image_files):
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(outside)
    (root / "link.png").symlink_to(outside)
    (root / "inside.png").symlink_to(image_files[2].path)  # a link inside tmp but outside root
    Image.new("RGB", (8, 8)).save(root / "real.png")
    (root / "ok.png").symlink_to(root / "real.png")
    pre = Preprocessor("clip", 24)
    ok = encode_images([ImageRef("ok", root / "ok.png", root=root)], _pixels, pre, workers=0, progress=False)
    assert ok.shape[0] == 1
    with pytest.raises(ImageError, match="outside the data root"):
        encode_images([ImageRef("x", root / "link.png", root=root)], _pixels, pre, workers=0, progress=False)


def test_bench_whole_ranking_also_runs_in_the_parts_a_run_scores_in(monkeypatch):
    """The whole-gallery section ranks and scores first in the parts a run would use (STREAM_ENTRIES), then at
    once: the same APs, and the two peaks reported."""
    from cirbench import bench, evaluate

    monkeypatch.setattr(evaluate, "STREAM_ENTRIES", 300 * 7)  # 7 queries of 300 images a part
    gen = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(20, 16, generator=gen), dim=-1)
    g = torch.nn.functional.normalize(torch.randn(300, 16, generator=gen), dim=-1)
    out = bench.bench_whole_ranking(q, g, torch.device("cpu"), reps=1)
    assert out["stream_parts"] == 3 and out["stream_queries_per_part"] == 7 and out["stream_equals_whole"] is True
    assert 0 < out["stream_peak_gib"] <= out["peak_rss_gib"]


def test_bench_measures_every_section(tiny_config, tmp_path):
    """Figures that come from measurement: positive rates, ratios that are the quotient of the rates they
    relate, ranking and cache sections that really ran (their asserts check results, not just times)."""
    import json

    from click.testing import CliRunner

    from cirbench.cli import cli

    res = CliRunner().invoke(cli, ["bench", "--model", str(tiny_config), "--images", "10", "--batch-size", "4",
                                   "--workers", "0", "--queries", "20", "--gallery", "300", "--reps", "1",
                                   "--cache-rows", "50", "--agreement", "--whole", "--folder", str(tmp_path),
                                   "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    e, r, c = out["encode"], out["rank"], out["cache"]
    assert e["model_alone_img_s"] > 0 and e["full_path_clip_img_s"] > 0 and e["official_style_img_s"] > 0
    assert e["ratio_full_over_model"] == pytest.approx(e["full_path_clip_img_s"] / e["model_alone_img_s"])
    assert all(e[f"piece_{p}_img_s"] > 0 for p in ("readers", "decode", "preprocess", "stage"))
    assert 0.9 < e["agreement"]["cosine_mean"] <= 1.0 + 1e-6 and "peak_gpu_mem_gib" not in e
    pixels = e["agreement"]["pixels_batched_vs_official"]  # the CPU decodes as PIL does: nothing may differ
    assert pixels["images"] == 10 and pixels["max_levels"] == 0 and pixels["values_differing"] == 0
    from cirbench.bench import JPEG_VARIANTS  # greyscale, progressive, 4:4:4, CMYK...: all PIL's pixels on the CPU
    variants = e["agreement"]["pixels_by_jpeg_variant"]
    assert list(variants) == list(JPEG_VARIANTS) and all(v["images"] == 4 for v in variants.values())
    assert all(v["max_levels"] == 0 for v in variants.values()), variants
    assert r["ratio_cirbench_over_topk"] == pytest.approx(r["cirbench_torch_s"] / r["plain_topk_s"])
    assert r["whole"]["rank_s"] > 0 and r["whole"]["hits_and_ap_s"] > 0 and r["whole"]["peak_rss_gib"] > 0
    assert c["rows"] == 50 and c["warm_identify_read_verify_s"] > 0
    assert len(list(tmp_path.glob("jpegs/*.jpg"))) == 10  # the synthetic files are kept for the next run


def test_pil_bytes_roundtrip_helper():
    buf = io.BytesIO()
    Image.fromarray(_image(10, 10, 0)).save(buf, format="PNG")
    assert buf.getvalue()[:4] == b"\x89PNG"


def test_staging_runs_ahead_of_the_model_and_is_bounded(image_files, monkeypatch):
    """Overlap without timing: while the model still holds batch 0, the prefetch thread decodes and preprocesses
    the next batches (up to the queue's depth, then it waits), so reading, staging and the model run at once."""
    import threading
    import time

    import cirbench.encode as enc

    staged, ahead = [], threading.Event()
    real_call = enc.Stager.__call__

    def counting(self, packed):
        result = real_call(self, packed)
        staged.append(int(packed["start"]))
        if len(staged) >= 3:
            ahead.set()
        return result

    monkeypatch.setattr(enc.Stager, "__call__", counting)
    seen_while_busy = []

    def model(x):
        if not seen_while_busy:
            assert ahead.wait(timeout=30), f"only {len(staged)} batch(es) staged while the model held batch 0"
            time.sleep(0.5)  # time for an unbounded prefetcher to run further ahead (and fail below)
        seen_while_busy.append(len(staged))
        return x.reshape(x.shape[0], -1)

    refs = image_files * 2  # 14 images, batches of 2: 7 batches
    out = encode_images(refs, model, Preprocessor("clip", 16), batch_size=2, workers=0, progress=False,
                        path="batched", prefetch_threads=1)
    assert out.shape[0] == 14 and sorted(staged) == list(range(0, 14, 2))
    # at the model's i-th batch: batch i, two waiting in the queue, one more staged and waiting to be queued
    assert seen_while_busy[0] >= 3
    assert all(n <= i + 4 for i, n in enumerate(seen_while_busy)), seen_while_busy


def test_sync_audit_counts_synchronisations_by_thread_and_place(monkeypatch):
    """CUDA's sync debug mode warns from whichever thread synchronised; the audit tells the calling (model)
    thread from the others, names each place, restores the mode, and lets other warnings through."""
    import threading
    import warnings

    from cirbench.bench import SYNC_WARNING, audit_syncs

    mode = {"now": 0}
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: mode["now"])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode",
                        lambda m: mode.update(now={"warn": 1, "default": 0}.get(m, m)))

    def staging():
        for _ in range(3):
            # as torch's TORCH_WARN arrives in Python
            warnings.warn(f"called a {SYNC_WARNING}", UserWarning, stacklevel=1)

    def run():
        assert mode["now"] == 1
        thread = threading.Thread(target=staging, name="cirbench-prefetch-0")
        thread.start()
        thread.join()
        warnings.warn(f"called a {SYNC_WARNING}", UserWarning, stacklevel=1)
        warnings.warn("something else", UserWarning, stacklevel=1)

    with pytest.warns(UserWarning, match="something else"):
        audit = audit_syncs(run)
    assert mode["now"] == 0
    assert audit["calling_thread"] == 1 and audit["other_threads"] == 3
    assert list(audit["places"].values()) == [3, 1]
    assert next(iter(audit["places"])).startswith("cirbench-prefetch-0 test_encode.py:")


def test_the_cuda_chunk_writer_thread_hands_rows_over_in_order_and_raises_in_the_caller(monkeypatch):
    """On CUDA the finished rows are copied to the host asynchronously and written by a thread of their own, each
    after the event recorded behind its copy: every chunk lands in its rows in submission order, ``on_chunk`` runs
    in that thread, and a non-finite chunk's error reaches the caller (at its next submit or at close) while no
    later chunk is written. Run here with CUDA's stream and event stood in for (the same code, no GPU)."""
    import threading

    from cirbench.encode import ChunkWriter

    synced = []

    class Event:
        def record(self, stream):
            self.stream = stream

        def synchronize(self):
            synced.append(self.stream)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: f"stream of {device}")
    seen = []
    writer = ChunkWriter(6, lambda i: f"img{i}.jpg", lambda pos, feats: seen.append(
        (pos.tolist(), threading.current_thread().name)), torch.device("cuda:0"))
    assert writer.thread is not None and writer.thread.is_alive()
    for pos in ([4, 5], [0, 1], [2, 3]):
        writer.submit(torch.tensor(pos), torch.tensor(pos, dtype=torch.float16)[:, None].repeat(1, 3))
    out = writer.close()
    assert torch.equal(out, torch.arange(6, dtype=torch.float32)[:, None].repeat(1, 3)) and out.dtype == torch.float32
    assert seen == [([4, 5], "cirbench-chunk-writer"), ([0, 1], "cirbench-chunk-writer"),
                    ([2, 3], "cirbench-chunk-writer")]
    assert synced == ["stream of cuda:0"] * 3 and not writer.thread.is_alive()

    seen.clear()
    broken = ChunkWriter(6, lambda i: f"img{i}.jpg", lambda pos, feats: seen.append(pos.tolist()),
                         torch.device("cuda:0"))
    broken.submit(torch.tensor([0, 1]), torch.tensor([[1.0], [float("nan")]]))
    deadline = time.monotonic() + 30
    while broken.error is None and time.monotonic() < deadline:  # the thread reaches the bad chunk
        time.sleep(0.01)
    with pytest.raises(CirbenchError, match="features of image img1.jpg are not finite"):
        broken.submit(torch.tensor([2, 3]), torch.ones(2, 1))
    with pytest.raises(CirbenchError, match="features of image img1.jpg are not finite"):
        broken.close()
    assert seen == [] and broken.rows == 0


def test_jpeg_variants_are_the_encodings_they_are_named_for(tmp_path):
    """The agreement set of ``cirbench bench`` holds what its names say (a GPU decoder's departures are reported
    by encoding): checked from the files' own headers."""
    from PIL import Image, JpegImagePlugin

    from cirbench.bench import make_jpeg_variants

    refs = make_jpeg_variants(tmp_path, per_variant=1)
    opened = {name: Image.open(r[0].path) for name, r in refs.items()}
    sampling = {name: JpegImagePlugin.get_sampling(im) for name, im in opened.items()}  # 0 4:4:4, 1 4:2:2, 2 4:2:0
    assert sampling["baseline-420"] == 2 and sampling["422"] == 1 and sampling["444"] == 0
    assert opened["progressive"].info.get("progressive") and not opened["baseline-420"].info.get("progressive")
    assert opened["greyscale"].mode == "L" and opened["cmyk"].mode == "CMYK" and opened["odd-size"].size == (333, 517)
    assert all(im.format == "JPEG" for im in opened.values())
    import PIL

    if tuple(int(x) for x in PIL.__version__.split(".")[:2]) >= (10, 2):  # the release that writes them
        restart = refs["restart-markers"][0].path.read_bytes()
        assert b"\xff\xdd" in restart and b"\xff\xd0" in restart  # DRI, then RST0 in the scan
        assert opened["rgb-no-ycc"].info.get("adobe_transform") == 0
    before = {r[0].path: r[0].path.stat().st_mtime_ns for r in refs.values()}
    make_jpeg_variants(tmp_path, per_variant=1)  # kept for the next run, not rewritten
    assert {r[0].path: r[0].path.stat().st_mtime_ns for r in refs.values()} == before


def test_jpeg_variant_figures_are_each_variants_own(tmp_path, monkeypatch):
    """The variants are encoded in one pass per path and their rows then split by variant: each variant's
    figures come from its own files' rows (here, a fake difference of k levels on the k-th file)."""
    from cirbench import bench

    monkeypatch.setattr(bench, "pixel_differences",
                        lambda refs, *a: torch.arange(len(refs)).view(-1, 1).repeat(1, 5))
    figures = bench.jpeg_variant_agreement(tmp_path, None, torch.device("cpu"), 4, 0)
    assert list(figures) == list(bench.JPEG_VARIANTS)
    assert [f["max_levels"] for f in figures.values()] == [4 * v + 3 for v in range(len(bench.JPEG_VARIANTS))]
    assert figures["baseline-420"]["images_differing"] == 0.75 and figures["444"]["images"] == 4
