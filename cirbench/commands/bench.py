"""``cirbench bench``: throughput of the encode path against the model alone and the official scripts' way,
ranking against a plain topk, and the feature cache's warm-run overhead (see :mod:`cirbench.bench`)."""

from __future__ import annotations

import click

from ..util import MAX_WORKERS

EPILOG = """\b
Examples:
  cirbench bench                                          # small CPU-friendly defaults
  cirbench bench --model ViT-L-14 --images 6144 --batch-size 256 --workers 16 --gallery 123403   # a GPU
  cirbench bench --section rank --gallery 123403 --queries 800
  cirbench bench --section rank --whole --gallery 30400 --queries 5000 --reps 1   # AP over whole rankings
  cirbench bench --section cache --cache-rows 123403
  cirbench bench --model ViT-B-32 --agreement --json
"""


@click.command(name="bench", epilog=EPILOG)
@click.option("--model", default="ViT-B-32", show_default=True, help="open_clip model name or config JSON.")
@click.option("--pretrained", default="none", show_default=True, help="Weights (random weights time the same).")
@click.option("--section", "sections", multiple=True, type=click.Choice(["encode", "rank", "cache"]),
              help="What to measure (repeat; default: encode and rank, plus cache when --cache-rows is given).")
@click.option("--images", type=click.IntRange(1, 10_000_000), default=None,
              help="Synthetic JPEG files (default: 6144 on CUDA, 128 on CPU).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Default: 256 on CUDA, 32 on CPU.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="auto: bf16 on CUDA (the throughput goals are bf16), fp32 on the CPU.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--workers", type=click.IntRange(0, MAX_WORKERS), default=None,
              help="Reader workers (default: min(16, CPUs)).")
@click.option("--reps", type=click.IntRange(1, 1000), default=3, show_default=True, help="Timed repetitions (median).")
@click.option("--no-official", is_flag=True, help="Skip the official-style pipeline (slow on large models).")
@click.option("--official-images", type=click.IntRange(0, 10_000_000), default=0, show_default=True,
              help="Time the official-style pipeline on the first N files only (0: all; it runs ~10x slower).")
@click.option("--queries", type=click.IntRange(1, 1_000_000), default=800, show_default=True, help="Queries to rank.")
@click.option("--gallery", type=click.IntRange(1, 100_000_000), default=None,
              help="Gallery size to rank against (default: 123403 on CUDA, 20000 on CPU).")
@click.option("--dim", type=click.IntRange(1, 16_384), default=768, show_default=True,
              help="Feature width for rank/cache.")
@click.option("--cache-rows", type=click.IntRange(0, 100_000_000), default=0, show_default=True,
              help="Measure the feature cache at this many images (CIRCO: 123403).")
@click.option("--whole", is_flag=True, help="rank: also every query against the whole gallery, with its hits and AP "
              "(the cost of benchmarks that score whole rankings: domain conversion, i-CIR, PatternCom).")
@click.option("--agreement", is_flag=True, help="Also measure fp32 vs bf16 feature agreement.")
@click.option("--folder", type=click.Path(file_okay=False), default=None,
              help="Keep the synthetic files here (reused by later runs) instead of a temporary folder.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def command(model, pretrained, sections, images, batch_size, precision, device, workers, reps, no_official,
            official_images, queries, gallery, dim, cache_rows, whole, agreement, folder, as_json):
    """Measure images/s of the model alone, of the full encode path (files -> features) and of the official
    scripts' pipeline, each piece alone, peak GPU memory, ranking time against a plain topk, and the feature
    cache's warm-run overhead."""
    import json
    import os

    from cirbench.backbones import resolve_device
    from cirbench.bench import BenchConfig, format_report, run_bench

    cuda = resolve_device(device).type == "cuda"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    chosen = tuple(sections) or (("encode", "rank") + (("cache",) if cache_rows else ()))
    if "cache" in chosen and not cache_rows:
        raise click.UsageError("--section cache measures the cache at --cache-rows images: give that count "
                               "(CIRCO: 123403)")
    cfg = BenchConfig(model=model, pretrained=pretrained, device=device, precision=precision,
                      images=images or (6144 if cuda else 128), batch_size=batch_size or (256 if cuda else 32),
                      workers=workers if workers is not None else min(16, cpus), reps=reps, official=not no_official,
                      official_images=official_images,
                      queries=queries, gallery=gallery or (123403 if cuda else 20000), dim=dim, cache_rows=cache_rows,
                      agreement=agreement, folder=folder, sections=chosen, whole=whole)
    result = run_bench(cfg)
    click.echo(json.dumps(result) if as_json else format_report(result))
