"""``cirbench bench``: encode-path throughput against the model alone, peak memory, ranking time."""

from __future__ import annotations

import click

EPILOG = """\b
Examples:
  cirbench bench                                          # small CPU-friendly defaults
  cirbench bench --model ViT-L-14 --images 6144 --batch-size 256 --gallery 123403 --workers 16   # on a GPU
  cirbench bench --model ViT-B-32 --images 20000 --batch-size 512 --json
"""


@click.command(name="bench", epilog=EPILOG)
@click.option("--model", default="ViT-B-32", show_default=True, help="open_clip model name or config JSON.")
@click.option("--pretrained", default="none", show_default=True, help="Weights (random weights time the same).")
@click.option("--images", type=int, default=None, help="Synthetic JPEG files (default: 6144 on CUDA, 128 on CPU).")
@click.option("--batch-size", type=int, default=None, help="Default: 256 on CUDA, 32 on CPU.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--workers", type=int, default=None, help="Reader workers (default: min(16, CPUs)).")
@click.option("--queries", type=int, default=800, show_default=True, help="Queries to rank.")
@click.option("--gallery", type=int, default=None, help="Gallery size to rank against (default: 123403 on CUDA, "
              "20000 on CPU).")
@click.option("--encode-path", type=click.Choice(["auto", "workers", "batched"]), default="auto", show_default=True)
@click.option("--retrieval", type=click.Choice(["torch", "faiss"]), default="torch", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def command(model, pretrained, images, batch_size, precision, device, workers, queries, gallery, encode_path,
            retrieval, as_json):
    """Measure images/s of the full encode path (files -> features) and of the model alone, their ratio,
    peak GPU memory, and the time to rank a query set against a gallery."""
    import os

    from cirbench.backbones import resolve_device
    from cirbench.bench import format_result, run_bench, to_json

    cuda = resolve_device(device).type == "cuda"
    result = run_bench(model=model, pretrained=pretrained, images=images or (6144 if cuda else 128),
                       batch_size=batch_size or (256 if cuda else 32), precision=precision, device=device,
                       workers=workers if workers is not None else min(16, os.cpu_count() or 1), queries=queries,
                       gallery=gallery or (123403 if cuda else 20000), encode_path=encode_path, retrieval=retrieval,
                       progress=not as_json)
    click.echo(to_json(result) if as_json else format_result(result))
