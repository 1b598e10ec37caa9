"""``cirbench train``: train a method's trainable part with the shared training loop."""

from __future__ import annotations

import click

from ..util import MAX_WORKERS, SEED_MAX
from . import FiniteFloatRange

EPILOG = """\b
Examples:
  cirbench train --method slerp-tat --corpus laion/{00000..00199}.tar --max-steps 2000 --output runs/tat
  cirbench train --method pic2word --corpus cc3m/{00000..00331}.tar --train-num-samples 2905954 --epochs 2 \\
      --output runs/p2w   # sizes.json beside the shards makes --train-num-samples unnecessary
  cirbench train --method pic2word --corpus cc3m.csv --output runs/pic2word --epochs 30
  cirbench train --method searle --corpus imagenet/test --output runs/searle-b32   # images, no captions
  cirbench train --method pic2word --corpus cc3m.csv --output runs/p2w --validate cirr:val \\
      --validate-data-root data/CIRR --validate-every 1000
  torchrun --nproc-per-node 8 -m cirbench train --method slerp-tat --corpus pairs.csv --output runs/tat
  cirbench train --method slerp-tat --corpus pairs.csv --output runs/tat \\
      --batch-size 1024 --accum-steps 8   # on one GPU: 8 micro-batches of 128, still 1024 negatives
  cirbench train --method rtd --corpus LLM_triplets.jsonl --output runs/rtd --download-only   # on a login node
  cirbench data prepare shapes   # writes the offline shapes benchmark's training corpus and prints its path
  cirbench train --method slerp-tat --backbone cirbench-shapes-clip --pretrained bundled \\
      --corpus ~/.cache/cirbench/shapes/v1-seed0/train/train.csv --output runs/tat-shapes --batch-size 128
"""


@click.command(name="train", context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
               epilog=EPILOG)
@click.option("--method", "-m", required=True, help="A trainable method (see `cirbench methods`).")
@click.option("--corpus", required=True, help="CSV/TSV of image,caption; a folder with .txt sidecars; or .tar shards, "
              "as a brace/glob pattern or a folder of them (read shuffled per epoch, whole shards to each rank: at "
              "least one shard per rank). A method that trains on images alone, like searle, needs no caption.")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Checkpoint folder.")
@click.option("--backbone", default=None, help="open_clip model name or config JSON (default: the method's).")
@click.option("--pretrained", default=None, help="open_clip tag, weights file, hf:REPO_OR_FOLDER (a CLIP saved by "
              "transformers), 'bundled' or 'none'.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Epochs (default: the method's).")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Stop after this many optimizer steps.")
@click.option("--train-num-samples", type=click.IntRange(min=1), default=None,
              help="Shards: the samples of one epoch (as open_clip's flag). Default: the sizes.json or __len__ beside "
                   "the shards; with neither, pass this or --max-steps.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Global batch size (default: the method's).")
@click.option("--lr", type=FiniteFloatRange(min=0, min_open=True, max=10), default=None,
              help="Peak learning rate (default: the method's).")
@click.option("--weight-decay", type=FiniteFloatRange(min=0), default=None,
              help="AdamW weight decay (default: the method's).")
@click.option("--warmup-steps", type=click.IntRange(min=0), default=None,
              help="Linear warm-up steps (default: the method's); given, it also replaces a method's default "
                   "warm-up counted in epochs, so --warmup-steps 0 turns any warm-up off.")
@click.option("--schedule", type=click.Choice(["cosine", "constant", "step"]), default=None,
              help="Learning-rate schedule after the warm-up (default: the method's).")
@click.option("--accum-steps", type=click.IntRange(min=1), default=1, show_default=True,
              help="Run each rank's batch as N micro-batches, one after another (less memory). Contrastive negatives "
                   "still come from the whole --batch-size, as open_clip's --accum-freq: each micro-batch runs once "
                   "more, without gradients.")
@click.option("--max-grad-norm", type=FiniteFloatRange(min=0, min_open=True), default=None,
              help="Clip the gradients' global norm to this before each step (open_clip's --grad-clip-norm); "
                   "default: the method's (TransAgg's official trainer clips at 5; the others do not clip).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="Autocast over fp32 weights; auto = bf16 on a GPU, fp32 on the CPU.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--seed", type=click.IntRange(0, SEED_MAX), default=0, show_default=True,
              help="Seeds initialisation and dropout (each rank adds its rank), the data order and each sample's "
                   "augmentation (for a CSV or folder, the same on any number of ranks).")
@click.option("--workers", type=click.IntRange(0, MAX_WORKERS), default=2, show_default=True,
              help="Reader processes per rank.")
@click.option("--save-every", type=click.IntRange(min=1), default=500, show_default=True,
              help="Checkpoint every N steps.")
@click.option("--log-every", type=click.IntRange(min=1), default=10, show_default=True,
              help="Write the loss to OUTPUT/train_log.jsonl every N steps.")
@click.option("--no-resume", is_flag=True, help="Start over even if OUTPUT holds a run. Without it a run in OUTPUT "
              "continues, if its settings are the same (batch size, lr, schedule, seed, method options, corpus "
              "size); --epochs and --max-steps may grow.")
@click.option("--validate", "validate", default=None, metavar="DATASET[:SPLIT][,...]",
              help="Evaluate the method with the weights of the step on this benchmark (e.g. cirr:val) or these "
                   "(cirr:val,fashioniq:val), every --validate-every steps and at the end; results in "
                   "OUTPUT/validation, metrics in the log, and in OUTPUT/best the weights that score best on the "
                   "first benchmark's main metric.")
@click.option("--validate-data-root", "validate_data_roots", multiple=True, metavar="[NAME=]DIR",
              help="The --validate benchmark's data root; with several, NAME=DIR for each (repeat).")
@click.option("--validate-every", type=click.IntRange(min=1), default=None,
              help="Validate every N steps (default: at each checkpoint, --save-every).")
@click.option("--download-only", is_flag=True,
              help="Fetch what the training would download (the backbone's weights, the method's files: SEARLE's "
                   "concepts and phrases, RTD's frozen LinCIR Phi) into the local caches, and stop: on a machine with "
                   "a network, before the same command runs where there is none. Reads no corpus.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.pass_context
def command(ctx, method, corpus, output, backbone, pretrained, epochs, max_steps, train_num_samples, batch_size, lr,
            weight_decay, warmup_steps, schedule, accum_steps, max_grad_norm, precision, device, seed, workers,
            save_every, log_every, no_resume, validate, validate_data_roots, validate_every, download_only, quiet):
    """Train METHOD on a CORPUS of images and/or captions; resumable; torchrun for several GPUs or nodes.

    Method training options follow as --name value (e.g. --lora-rank 8); `cirbench methods` lists them.
    """
    from pathlib import Path

    from cirbench import distributed
    from cirbench.backbones import load_backbone
    from cirbench.checkpoints import backbone_flags
    from cirbench.cli import command_option_names, data_root_per_dataset, parse_extra_options
    from cirbench.corpora import open_corpus
    from cirbench.errors import CirbenchError
    from cirbench.plugins import get_registry
    from cirbench.training import (
        TrainConfig,
        check_not_resumable_elsewhere,
        check_validation,
        plan_steps,
        train,
        validation_benchmarks,
    )
    from cirbench.types import resolve_options

    spec = get_registry().method(method)
    trainer_cls = spec.load_trainer()
    options = resolve_options(spec.train_options, parse_extra_options(ctx.args), None, f"training of {method}",
                              command_option_names(ctx.command))
    if len(options) != 1:
        raise CirbenchError("training options cannot be swept")
    model_name, weights = training_backbone(spec, backbone, pretrained)
    if download_only:
        from cirbench.backbones import model_name_of
        from cirbench.cli import backbone_download, fetch_all, file_downloads

        fetch_all({**backbone_download(model_name, weights), **file_downloads(
            lambda: trainer_cls.downloads(options[0], model_name_of(model_name), weights), method)}, "training")
        return
    check_not_resumable_elsewhere(Path(output), method)
    roots: dict[str, str] = {}
    if validate:
        roots = data_root_per_dataset(validate_data_roots, list(dict.fromkeys(
            name for name, _ in validation_benchmarks(validate))), "--validate-data-root", "benchmarks validated")
        check_validation(spec, validate, roots)
    elif validate_data_roots:
        raise CirbenchError("--validate-data-root is the folder of a --validate benchmark: give --validate too")
    # a bad corpus fails before the backbone is loaded
    corpus_data = open_corpus(corpus, images=trainer_cls.needs_images, captions=trainer_cls.needs_captions,
                              caption_columns=trainer_cls.caption_columns,
                              required_columns=trainer_cls.required_columns, image_columns=trainer_cls.image_columns)
    dev = distributed.init_from_env(device)
    given = {"epochs": epochs, "max_steps": max_steps, "train_num_samples": train_num_samples,
             "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "warmup_steps": warmup_steps,
             "schedule": schedule, "max_grad_norm": max_grad_norm}
    values = {**trainer_cls.defaults, **{k: v for k, v in given.items() if v is not None}}
    if warmup_steps is not None:  # a warm-up given in steps replaces the method's own, in epochs
        values.pop("warmup_epochs", None)
    cfg = TrainConfig(output=Path(output), accum_steps=accum_steps, precision=precision,
                      device=str(dev), seed=seed, workers=workers, save_every=save_every, log_every=log_every,
                      resume=not no_resume, progress=not quiet, validate=validate,
                      validate_data_roots=roots, validate_every=validate_every, **values)
    plan_steps(corpus_data, cfg, distributed.world_size())  # a length it cannot know fails before the backbone loads
    bb = load_backbone(model_name, weights, device=str(dev), precision=precision, seed=seed, training=True)
    trainable = trainer_cls(bb, options[0])
    trainable.name = spec.name  # the registered name is the one source of truth (checkpoints record it)
    out = train(trainable, corpus_data, cfg)
    distributed.shutdown()
    if distributed.speaks():
        click.echo(f"trained {method}: {out / 'model.safetensors'}")
        # trained on images preprocessed otherwise than the method evaluates by default: evaluate them alike
        kind = getattr(trainable, "preprocess_kind", None)
        preprocess = f" --preprocess {kind}" if trainer_cls.needs_images and kind not in (
            None, spec.default_preprocess) else ""
        click.echo(f"use it: cirbench run --method {method} --checkpoint {out} "
                   f"{backbone_flags(bb.identity(), model_name)}{preprocess}")


def training_backbone(spec, backbone: str | None, pretrained: str | None) -> tuple[str, str]:
    """The backbone a training runs on: ``--backbone``/``--pretrained``, else the method's default (ViT-L-14 with
    OpenAI's weights when it has none); a config file without ``--pretrained`` starts from random weights."""
    from cirbench.evaluate import DEFAULT_BACKBONE

    default = spec.default_backbone or DEFAULT_BACKBONE
    model_name = backbone or default[0]
    weights = pretrained or ("none" if model_name.endswith(".json") else
                             ("bundled" if backbone == "cirbench-shapes-clip" else default[1]))
    return model_name, weights
