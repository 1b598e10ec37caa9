"""The one training loop that every trainable method uses (TAT, Pic2Word, FTI4CIR, ...).

A method plugs in by subclassing :class:`TrainableMethod` (what to train, the loss of one batch, what to
save) and naming it as ``MethodSpec.trainer``; ``cirbench train --method NAME`` then runs :func:`train`:

* AdamW over ``trainable_parameters()``, linear warm-up then cosine / constant / step schedule;
* bf16 autocast on CUDA (fp32 on CPU), optional gradient clipping;
* ``torchrun`` data parallelism and gradient accumulation: each rank reads its shard of the corpus, and the loss
  terms that compare samples (:func:`contrastive_loss`, :func:`~cirbench.methods._shared.textinv.nt_xent`) take
  the features of all ranks and all micro-batches (:mod:`cirbench.global_batch`), so the contrastive batch is
  the global batch; gradients are averaged across ranks, so N processes, or K micro-batches, compute what one
  process with the same global batch at once computes; the
  ranks step through each epoch together (one whose webdataset shards ran out ends it for all);
* a tqdm bar with loss and throughput, checkpoints every ``save_every`` steps into
  ``<output>/checkpoint-latest/`` (trained weights, optimizer, scheduler, step, data position, RNG states),
  and resume from there after an interruption, continuing exactly where the run stopped (or, with a larger
  ``--epochs``/``--max-steps``, running on); a resume with other settings (:data:`RESUME_FIXED`, the method's
  options, the corpus's size) is refused;
* the final trained weights as ``<output>/model.safetensors`` + ``config.json`` (see
  :mod:`cirbench.checkpoints`), which the method's ``--checkpoint`` option loads;
* optionally (``--validate cirr:val``), the method evaluated on a benchmark with the weights of the step, as
  ``cirbench run --checkpoint`` would (the official scripts validate on CIRR val each epoch): every
  ``validate_every`` steps and at the end, results under ``<output>/validation/``, metrics in the training log,
  the best-scoring weights (the benchmark's main metric) copied to ``<output>/best``; the random states are put
  back afterwards, so validating changes nothing in the training.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import re
import shutil
import signal
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import distributed as dist_utils
from . import global_batch
from .backbones import Backbone, autocast_context
from .checkpoints import load_checkpoint, save_checkpoint
from .corpora import CAPTION_COLUMNS, Batch, PairsCorpus, ShardCorpus, collate, open_corpus, reader_turns
from .errors import CheckpointError, CirbenchError, CirbenchWarning
from .preprocess import Preprocessor, RandomResizedCrop
from .results import environment_info
from .train_state import load_train_state, rng_state, save_train_state, set_rng_state
from .util import (
    atomic_write_bytes,
    json_object_file,
    partial_folder,
    recover_folder,
    replace_folder,
    train_log_entries,
)

if TYPE_CHECKING:
    from .evaluate import Loaded


@dataclass
class TrainConfig:
    """Training hyperparameters (``batch_size`` is the global batch, over ranks and accumulation steps)."""

    output: Path
    epochs: int = 1
    max_steps: int | None = None
    # webdataset shards: the samples of one epoch (open_clip's --train-num-samples); default: the shards' sizes.json
    # or __len__. An epoch then ends after this many samples (global batches of them), or when the shards run out
    train_num_samples: int | None = None
    batch_size: int = 256
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 0
    # a warm-up counted in epochs, as torch's LinearLR stepped once an epoch (PLI's official schedule): during epoch
    # e < warmup_epochs the lr is scaled by warmup_start + (1 - warmup_start) * e / warmup_epochs (a method default;
    # --warmup-steps replaces it)
    warmup_epochs: int = 0
    warmup_start: float = 0.0
    schedule: str = "cosine"  # cosine | constant | step
    min_lr: float = 0.0  # the schedule's floor (torch's eta_min; a method default): see group_lr
    step_epochs: tuple[int, ...] = ()  # schedule "step": multiply lr by step_gamma after each of these epochs
    step_gamma: float = 0.1
    accum_steps: int = 1
    max_grad_norm: float | None = None
    precision: str = "auto"
    device: str = "auto"
    seed: int = 0
    workers: int = 2
    save_every: int = 500
    resume: bool = True
    log_every: int = 10
    progress: bool = True
    # validation during training: benchmarks ("cirr", "cirr:val", or several: "cirr:val,fashioniq:val") evaluated
    # with the weights of the step, every ``validate_every`` steps (default: at each checkpoint) and at the end;
    # the best weights are those of the first benchmark's main metric. ``validate_data_roots``: dataset -> folder
    validate: str | None = None
    validate_data_roots: dict[str, str] = field(default_factory=dict)
    validate_every: int | None = None


class TrainableMethod:
    """Base class of a method's trainable part.

    Subclasses set ``name`` (the method name its checkpoints are for), ``preprocess_kind``, and
    ``defaults`` (TrainConfig fields the method's paper uses, e.g. ``{"lr": 4e-5}``), and implement the
    four methods below. ``self.backbone`` is the frozen CLIP, which ``--validate`` evaluates through too: never
    change it in place (copy what is adapted, as TAT copies the image tower); ``self.options`` the method's
    training options (``MethodSpec.train_options``).
    """

    name = "method"
    preprocess_kind = "clip"
    needs_images = True  # False: a language-only method (LinCIR); its corpus is read for captions alone
    needs_captions = True  # False: images alone; with needs_images False too, each step reads only the sample keys
    caption_columns: tuple[str, ...] = CAPTION_COLUMNS  # where a table or record holds the caption (the first found)
    required_columns: tuple[str, ...] = ()  # other columns each row must have (``batch.extra``), checked on opening
    image_columns: tuple[str, ...] = ()  # those of them naming more images of a sample (``batch.images``; triplets)
    defaults: dict[str, Any] = {}
    adam_betas: tuple[float, float] = (0.9, 0.999)  # torch's AdamW defaults unless the official code says otherwise
    adam_eps: float = 1e-8

    def __init__(self, backbone: Backbone, options: dict[str, Any]):
        self.backbone = backbone
        self.options = dict(options)

    @classmethod
    def downloads(cls, options: dict[str, Any], model: str, pretrained: str) -> list[tuple[str, str]]:
        """What training fetches besides the backbone's weights, named as ``MethodSpec.downloads`` names files
        (``[(what, source)]``; a CirbenchError when it cannot train there without one given): ``cirbench train
        --download-only`` fetches them. It must agree with what the trainer fetches. None by default."""
        return []

    def named_trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """``(name, parameter)`` pairs the optimizer updates (everything else stays frozen)."""
        raise NotImplementedError

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.named_trainable_parameters()]

    def decays(self, name: str, param: torch.nn.Parameter) -> bool:
        """Whether weight decay applies to a parameter (default: matrices, not biases and norms)."""
        return param.ndim >= 2

    def lr_scale(self, name: str, param: torch.nn.Parameter) -> float:
        """A parameter's learning rate as a multiple of ``--lr`` (default 1; TransAgg tunes CLIP's text tower at
        1e-6 beside its head's 1e-4)."""
        return 1.0

    def train_mode(self, training: bool) -> None:
        """Switch the trained modules between train and eval mode (dropout)."""

    def training_step(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one (per-rank) batch, and numbers to show in the progress bar. A term that compares
        samples with each other (contrastive negatives) takes its rows from :func:`cirbench.global_batch.gather`
        (the global batch). Under ``--accum-steps`` a batch runs twice, first without gradients: draw randomness
        from the global generators and change no state here."""
        raise NotImplementedError

    def state_to_save(self) -> dict[str, torch.Tensor]:
        """The trained weights only (saved as safetensors)."""
        raise NotImplementedError

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load weights produced by :meth:`state_to_save`."""
        raise NotImplementedError

    def checkpoint_config(self) -> dict[str, Any]:
        """Method-specific facts for ``config.json`` (architecture sizes, prompts, ...)."""
        return {}

    def prepare(self, corpus: PairsCorpus | ShardCorpus, cfg: TrainConfig) -> None:
        """Work over the whole corpus before the first step (and again on resume): a teacher pass, features
        computed once. Every rank calls it; by default it does nothing. The loop puts the random states back
        afterwards, so that a run whose prepare found its work cached draws what one that did the work draws."""

    def train_preprocessor(self, seed: int) -> Preprocessor | RandomResizedCrop:
        """How training images are preprocessed: by default as at evaluation (``preprocess_kind``); a method
        whose official training augments its images returns that transform (e.g. :class:`RandomResizedCrop`,
        drawn from ``seed``)."""
        return self.backbone.preprocessor(self.preprocess_kind)


class NetTrainable(TrainableMethod):
    """A :class:`TrainableMethod` whose trained part is one module, ``self.net`` (set it in ``__init__``):
    it trains all of ``self.net``'s parameters and saves exactly its state dict."""

    net: torch.nn.Module

    def named_trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return list(self.net.named_parameters())

    def train_mode(self, training: bool) -> None:
        self.net.train(training)

    def state_to_save(self) -> dict[str, torch.Tensor]:
        return self.net.state_dict()

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        from .checkpoints import load_module_weights

        load_module_weights(self.net, tensors, "resume checkpoint")


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between L2-normalised image and text features of the GLOBAL batch.

    The features of every rank (under torchrun, with gradients) and of every micro-batch (``--accum-steps``) are
    gathered by :func:`cirbench.global_batch.gather`, and every rank computes the loss of the whole global batch,
    as open_clip does with ``gather_with_grad`` and ``--accum-freq``.
    """
    image = global_batch.gather(F.normalize(image.float(), dim=-1))
    text = global_batch.gather(F.normalize(text.float(), dim=-1))
    logits = image @ text.T / temperature
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class EpochSampler(torch.utils.data.Sampler[int]):
    """A seeded permutation per epoch, dealt to ranks in chunks of ``per_rank_batch`` so that the global
    batch of every step is the same set, in the same order, whatever the number of ranks; it can start
    part-way through an epoch (resume)."""

    def __init__(self, size: int, seed: int, rank: int, world: int, per_rank_batch: int):
        self.size, self.seed, self.rank, self.world, self.chunk = size, seed, rank, world, per_rank_batch
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def _mine(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=g).tolist()
        return [x for i, x in enumerate(order) if (i // self.chunk) % self.world == self.rank]

    def __iter__(self):
        return iter(self._mine()[self.start :])

    def __len__(self) -> int:
        return max(0, len(self._mine()) - self.start)


def _lr_factor(cfg: TrainConfig, step: int, epoch: int, total_steps: int) -> float:
    ramp = 1.0
    if cfg.warmup_epochs and epoch < cfg.warmup_epochs:
        ramp = cfg.warmup_start + (1 - cfg.warmup_start) * epoch / cfg.warmup_epochs
    return ramp * _schedule_factor(cfg, step, epoch, total_steps)


def _schedule_factor(cfg: TrainConfig, step: int, epoch: int, total_steps: int) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        return cfg.step_gamma ** sum(1 for e in cfg.step_epochs if epoch >= e)
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    raise CirbenchError(f"unknown schedule {cfg.schedule!r}; valid: cosine, constant, step")


def build_optimizer(trainable: TrainableMethod, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with the method's betas/eps, weight decay on the parameters its :meth:`decays` selects."""
    named = trainable.named_trainable_parameters()
    if not named:
        raise CirbenchError(f"method '{trainable.name}' has nothing to train")
    # the decayed and the plain group at --lr come first, even empty, so that an optimizer state saved by an
    # earlier version (those two groups) resumes; a scaled learning rate adds groups after them
    groups: dict[tuple[bool, float], list[torch.nn.Parameter]] = {(True, 1.0): [], (False, 1.0): []}
    for n, p in named:
        groups.setdefault((trainable.decays(n, p), float(trainable.lr_scale(n, p))), []).append(p)
    return torch.optim.AdamW([{"params": params, "weight_decay": cfg.weight_decay if decays else 0.0,
                               "lr_scale": scale} for (decays, scale), params in groups.items()], lr=cfg.lr,
                             betas=trainable.adam_betas, eps=trainable.adam_eps)


def group_lr(cfg: TrainConfig, factor: float, scale: float = 1.0) -> float:
    """The learning rate of a parameter group at schedule ``factor``: ``--lr`` x its scale, or, with a floor
    (``min_lr``, as torch's ``eta_min``, shared by every group), ``min_lr + (lr x scale - min_lr) x factor``."""
    base = cfg.lr * scale
    return cfg.min_lr + (base - cfg.min_lr) * factor if cfg.min_lr else base * factor


LOG_FILE = "train_log.jsonl"


class TrainLog:
    """``<output>/train_log.jsonl``: one JSON object per logged step (step, epoch, loss, lr, the method's own
    numbers, images/s). On resume, entries past the resumed step (work redone after the last checkpoint) are
    dropped, so the file always describes one continuous run. Nothing is written before the first entry: a
    run that fails before its first step leaves the folder as it was."""

    def __init__(self, output: Path, resumed_step: int, enabled: bool):
        self.path = Path(output) / LOG_FILE
        self.enabled = enabled
        self.kept: list[str] | None = None  # the entries to keep, until the first write
        if not enabled:
            return
        self.kept = []
        if resumed_step and self.path.is_file():
            self.kept = [line for line, entry in train_log_entries(self.path) if entry["step"] <= resumed_step]

    def write(self, entry: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.kept is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.path, "".join(line + "\n" for line in self.kept).encode())
            self.kept = None
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")


@dataclass
class _Run:
    """The mutable state of one training run."""

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0
    skipped: int = 0
    seen: int = 0
    unreadable_shards: dict[str, str] = field(default_factory=dict)  # shard -> why (every epoch meets it again)
    # shards: the batches each reader part gave this rank in this epoch, and the part whose turn comes next (where
    # and in which order a resumed epoch's readers go on)
    reader_batches: list[int] = field(default_factory=list)
    next_reader: int = 0

    def position(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "epoch_step": self.epoch_step, "skipped": self.skipped,
                "unreadable_shards": self.unreadable_shards}


@dataclass(frozen=True)
class StepPlan:
    """How a corpus divides into steps: ``per_step`` samples a rank in each micro-batch, ``total_steps`` optimizer
    steps in the run, ``epoch_steps`` in an epoch (``None``: an epoch is one pass over shards of unknown size)."""

    per_step: int
    total_steps: int
    epoch_steps: int | None


def plan_steps(corpus: PairsCorpus | ShardCorpus, cfg: TrainConfig, world: int) -> StepPlan:
    """The run's steps, or a one-line error for a batch the ranks cannot share, too few shards for the ranks, or
    a length that cannot be known (checked before a backbone is loaded). A shard corpus's ``num_samples`` becomes
    the samples of one epoch (``--train-num-samples`` over its ``sizes.json``), which its checkpoints record."""
    per_step = cfg.batch_size // (world * cfg.accum_steps)
    if per_step < 1 or per_step * world * cfg.accum_steps != cfg.batch_size:
        raise CirbenchError(f"--batch-size {cfg.batch_size} must be a multiple of world size ({world}) x "
                            f"--accum-steps ({cfg.accum_steps})")
    if isinstance(corpus, ShardCorpus):
        if len(corpus.urls) < world:
            raise CirbenchError(f"corpus {corpus.source} has {len(corpus.urls)} shard(s) for {world} ranks: each "
                                f"rank reads whole shards, so split it into at least {world} (more keep the ranks' "
                                "epochs even)")
        samples = corpus.num_samples = cfg.train_num_samples or corpus.num_samples
        epoch_steps = None if samples is None else samples // cfg.batch_size
    else:
        if cfg.train_num_samples is not None:
            raise CirbenchError(f"--train-num-samples is for webdataset shards; corpus {corpus.source} has "
                                f"{len(corpus):,} samples")
        samples = len(corpus)
        epoch_steps = (samples // world) // (per_step * cfg.accum_steps)
    if epoch_steps == 0:
        stated = (" (--train-num-samples)" if cfg.train_num_samples else " (its sizes.json or __len__)") \
            if isinstance(corpus, ShardCorpus) else ""
        raise CirbenchError(f"corpus {corpus.source} has {samples:,} samples{stated}, fewer than one global batch "
                            f"({cfg.batch_size})")
    total_steps = cfg.max_steps or (epoch_steps * cfg.epochs if epoch_steps else None)
    if total_steps is None:
        raise CirbenchError(f"corpus {corpus.source}: the number of samples in its shards is unknown (no sizes.json "
                            "or __len__ beside them): pass --max-steps, or --train-num-samples for --epochs")
    return StepPlan(per_step, total_steps, epoch_steps)


def _setup(trainable: TrainableMethod, corpus: str | Path | PairsCorpus | ShardCorpus, cfg: TrainConfig,
           world: int) -> tuple[PairsCorpus | ShardCorpus, StepPlan]:
    if isinstance(corpus, (PairsCorpus, ShardCorpus)):
        if (corpus.images, corpus.captions) != (trainable.needs_images, trainable.needs_captions):
            raise ValueError(f"corpus opened with images={corpus.images}, captions={corpus.captions} for a method "
                             f"with needs_images={trainable.needs_images}, needs_captions={trainable.needs_captions}")
    else:
        corpus = open_corpus(corpus, images=trainable.needs_images, captions=trainable.needs_captions,
                             caption_columns=trainable.caption_columns, required_columns=trainable.required_columns,
                             image_columns=trainable.image_columns)
    if corpus.images:
        corpus.preprocessor = trainable.train_preprocessor(cfg.seed)
    plan = plan_steps(corpus, cfg, world)
    if cfg.warmup_steps >= plan.total_steps:
        warnings.warn(f"the warm-up (--warmup-steps {cfg.warmup_steps}) is as long as the whole run "
                      f"({plan.total_steps} steps): the learning rate never reaches --lr {cfg.lr:g} (it ends at "
                      f"{cfg.lr * plan.total_steps / cfg.warmup_steps:.3g}); pass a shorter --warmup-steps",
                      CirbenchWarning, stacklevel=2)
    return corpus, plan


# What a resumed run must share with the run it continues: the settings that decide which samples each step
# sees and how a step changes the weights. The length (--epochs, --max-steps) may grow, and how the run is
# carried out (device, workers, world size, logging) may change: the global batch of each step is the same
# whatever the number of ranks (EpochSampler).
RESUME_FIXED = ("batch_size", "lr", "weight_decay", "warmup_steps", "warmup_epochs", "warmup_start", "schedule",
                "min_lr", "step_epochs", "step_gamma", "max_grad_norm", "precision", "seed")


SHARD_READING = "shuffled per epoch"  # how shards are read (recorded; earlier versions read them in order)


def _corpus_identity(corpus) -> dict[str, Any]:
    """What a checkpoint records of its corpus; ``samples`` (or ``shards``) must not change on resume."""
    source = str(corpus.source)
    local = Path(source).expanduser()
    if isinstance(corpus, PairsCorpus) and local.exists():
        source = str(local.resolve())
    if isinstance(corpus, ShardCorpus):
        known = {"samples": corpus.num_samples} if corpus.num_samples is not None else {}
        return {"source": source, "shards": len(corpus.urls), "read": SHARD_READING, **known}
    return {"source": source, "samples": len(corpus)}


def _resume_differences(saved: dict[str, Any], run: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(flag, saved value, this run's value)`` for each fixed setting in which a checkpoint's config and
    this run differ (settings an older checkpoint did not record are not compared)."""
    def norm(value):
        return json.loads(json.dumps(value, default=str))

    out = []
    for section, keys in (("train", RESUME_FIXED), ("options", tuple(run["options"]))):
        old = saved.get(section) or {}
        for key in keys:
            if key in old and norm(old[key]) != norm(run[section].get(key)):
                out.append(("--" + key.replace("_", "-"), old[key], run[section].get(key)))
    old_corpus = saved.get("corpus") or {}
    for key in ("samples", "shards"):
        if key in old_corpus and old_corpus[key] != run["corpus"].get(key):
            now = run["corpus"].get(key)
            out.append(("a corpus of", f"{old_corpus[key]} {key}", f"{'an unknown number of' if now is None else now} "
                                                                     f"{key}"))
    return out


def _resume(trainable, optimizer, scheduler, latest: Path, rank: int, run_config: dict[str, Any],
            scaler: torch.amp.GradScaler | None = None, reader_batch: int | None = None) -> _Run:
    """The run stopped at ``latest``, put back. ``reader_batch``: this run's samples a reader batch (a rank's
    micro-batch), into which the shard readers' saved batch counts are converted when they were of another size
    (another --accum-steps)."""
    tensors, saved = load_checkpoint(latest, trainable.name, trainable.backbone.identity())
    differences = _resume_differences(saved, run_config)
    if differences:
        was = ", ".join(f"{flag} {old}" for flag, old, _ in differences)
        now = ", ".join(f"{flag} {new}" for flag, _, new in differences)
        raise CheckpointError(f"{latest} was trained with {was}; this run asks {now}: pass the same to resume it, "
                              "--no-resume to start over, or another --output")
    trainable.load_state(tensors)
    position = load_train_state(latest, optimizer, scheduler, rank, scaler)
    run = _Run(position["step"], position["epoch"], position["epoch_step"], position.get("skipped", 0),
               unreadable_shards=dict(position.get("unreadable_shards") or {}))
    # one entry a rank; kept when the ranks read the same shards as before (otherwise _epoch guesses the turns)
    counts, turns = position.get("reader_batches"), position.get("next_reader")
    if isinstance(counts, list) and isinstance(turns, list) and len(counts) == len(turns) == dist_utils.world_size():
        run.reader_batches, run.next_reader = [int(n) for n in counts[rank]], int(turns[rank])
        saved_batch = position.get("reader_batch")
        if reader_batch and isinstance(saved_batch, int) and saved_batch != reader_batch and run.reader_batches:
            # the same samples passed over, counted in this run's batches (a rest short of one is read again)
            given = [n * saved_batch for n in run.reader_batches]
            run.reader_batches = [n // reader_batch for n in given]
            again = sum(n % reader_batch for n in given)
            if again and rank == 0:
                tqdm.write(f"warning: the checkpoint's readers gave batches of {saved_batch}, this run's are of "
                           f"{reader_batch}: {again} sample(s) of epoch {run.epoch} on rank 0 are read again")
    if rank == 0:
        tqdm.write(f"resuming from {latest} at step {run.step} (epoch {run.epoch})")
        corpus = saved.get("corpus") or {}
        if "shards" in corpus and corpus.get("read", "in order") != SHARD_READING and run.epoch_step:
            tqdm.write(f"warning: {latest} read its shards {corpus.get('read', 'in order')}, this version reads "
                       f"them {SHARD_READING}: the rest of epoch {run.epoch} may repeat or miss samples")
    return run


def _optimizer_step(trainable, optimizer, scheduler, micro, cfg: TrainConfig, factor: float, params,
                    device, stop: bool, scaler: torch.amp.GradScaler) -> tuple[float, dict[str, float], bool]:
    """One optimizer step over the micro-batches; also return whether any rank asked to ``stop`` (Ctrl-C).
    ``scaler`` (enabled for fp16 training, a pass-through otherwise) scales the loss so that small gradients
    survive fp16, and skips a step whose gradients overflowed, lowering the scale, as torch's AMP recipe does."""
    for group in optimizer.param_groups:
        group["lr"] = group_lr(cfg, factor, group.get("lr_scale", 1.0))
    optimizer.zero_grad(set_to_none=True)
    logs: dict[str, float] = {}
    loss_sum = 0.0

    def run(j: int) -> tuple[torch.Tensor, dict[str, float]]:
        lacking = [c for c in trainable.required_columns if c not in micro[j].extra]
        if lacking and micro[j].captions:  # webdataset shards: their samples' fields are only seen as they are read
            raise CirbenchError(f"the corpus's samples have no {', '.join(lacking)}, which method '{trainable.name}' "
                                "reads from each of them")
        # moved on each use: only one micro-batch's pixels are on the device at a time, as without accumulation
        with autocast_context(trainable.backbone.precision, device):
            return trainable.training_step(micro[j].to(device))

    # the loss terms that compare samples see the whole global batch, whatever --accum-steps (see global_batch)
    accumulation = global_batch.Accumulation(len(micro))
    accumulation.first_pass(run)
    for j in range(len(micro)):
        with accumulation.second_pass(j):
            loss, logs = run(j)
        if not bool(torch.isfinite(loss.detach())):
            raise CirbenchError(f"the {trainable.name} loss became {float(loss.detach())}: training diverged "
                                "(lower --lr?)")
        scaler.scale(loss / len(micro)).backward()
        loss_sum += float(loss.detach()) / len(micro)
    stop = dist_utils.average_gradients(params, stop)  # every rank then holds the same (scaled) gradients
    scaler.unscale_(optimizer)
    if cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    with warnings.catch_warnings():  # a step the scaler skipped is no misuse of the (counting-only) scheduler
        warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()` before"))
        scheduler.step()
    return loss_sum, logs, stop


def train(trainable: TrainableMethod, corpus: str | Path | PairsCorpus | ShardCorpus, cfg: TrainConfig) -> Path:
    """Train ``trainable`` on the corpus (a spec, or a corpus :func:`~cirbench.corpora.open_corpus` opened
    with ``images=trainable.needs_images``); return the output folder (with model.safetensors + config.json)."""
    return _Trainer(trainable, corpus, cfg).run()


class _Trainer:
    """One training run: set-up and resume (``__init__``), the loop (:meth:`run`), checkpoints (:meth:`save`)."""

    def __init__(self, trainable: TrainableMethod, corpus: str | Path | PairsCorpus | ShardCorpus, cfg: TrainConfig):
        self.trainable, self.cfg = trainable, cfg
        self.rank_, self.world = dist_utils.rank(), dist_utils.world_size()
        self.device = trainable.backbone.device
        torch.manual_seed(cfg.seed + self.rank_)
        random.seed(cfg.seed + self.rank_)
        np.random.seed(cfg.seed + self.rank_)
        self.corpus, plan = _setup(trainable, corpus, cfg, self.world)
        self.map_style = isinstance(self.corpus, PairsCorpus)
        preprocessor = self.corpus.preprocessor if self.corpus.images else None
        self.train_preprocess = preprocessor.identity() if preprocessor is not None else None  # what checkpoints record
        self.per_step, self.total_steps, self.epoch_steps = plan.per_step, plan.total_steps, plan.epoch_steps
        self.optimizer = build_optimizer(trainable, cfg)
        self.params = trainable.trainable_parameters()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1.0)  # lr set by hand
        # fp16 autocast loses small gradients without loss scaling (the official AMP training scales too)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=trainable.backbone.precision == "fp16")
        self.output = Path(cfg.output)
        self.latest = self.output / "checkpoint-latest"
        if self.rank_ == 0:  # a save that an interrupt cut short leaves the previous checkpoint, complete
            recover_folder(self.latest, "model.safetensors")
            recover_folder(self.output / "best", "model.safetensors")
        dist_utils.barrier()
        self.state = _Run()
        self.interrupted = False
        if cfg.resume and (self.latest / "model.safetensors").is_file():
            self.state = _resume(trainable, self.optimizer, self.scheduler, self.latest, self.rank_,
                                 self.run_config(), self.scaler, self.per_step)
        self.log = TrainLog(self.output, self.state.step, enabled=self.rank_ == 0)
        self.best_score = self._best_so_far()
        self.validation: Loaded | None = None

    @functools.cached_property
    def environment(self) -> dict[str, Any]:
        """What each save records of the machine and versions that trained it (a resumed run: the latest's);
        made once, by rank 0, which alone saves."""
        from .plugins import get_registry

        reg = get_registry()
        spec = reg.methods.get(self.trainable.name)
        plugin = {"method_plugin_source": reg.source(spec.plugin)} if spec is not None else {}
        return {**environment_info(str(self.device)), "world_size": self.world, **plugin}

    def run_config(self) -> dict[str, Any]:
        """The method options, training settings and corpus that a checkpoint records (and a resume checks)."""
        cfg = self.cfg
        return {"options": self.trainable.options, "train": {**asdict(cfg), "output": str(cfg.output)},
                "corpus": _corpus_identity(self.corpus)}

    def save(self, folder: Path, final: bool) -> None:
        run = self.state
        gathered = dist_utils.all_gather_object((rng_state(), list(run.reader_batches), run.next_reader))
        if self.rank_ != 0:
            return
        rngs = [rng for rng, _, _ in gathered]
        position = {**run.position(), "reader_batches": [counts for _, counts, _ in gathered],
                    "next_reader": [turn for _, _, turn in gathered], "reader_batch": self.per_step}
        t = self.trainable
        config = {"method": t.name, "backbone": t.backbone.identity(), **self.run_config(),
                  "optimizer": {"betas": list(t.adam_betas), "eps": t.adam_eps},
                  "step": self.state.step, "skipped_samples": self.state.skipped, "environment": self.environment,
                  "unreadable_shards": self.state.unreadable_shards, **t.checkpoint_config()}
        if self.train_preprocess is not None:
            config["train_preprocess"] = self.train_preprocess
        if final:
            save_checkpoint(folder, t.state_to_save(), config)
            return
        # the resumable state is written whole into a new folder, then put in place: weights, config and
        # optimizer state always belong to one step, whenever the run is stopped
        partial = partial_folder(folder)
        save_checkpoint(partial, t.state_to_save(), config)
        save_train_state(partial, self.optimizer, self.scheduler, position, rngs, self.scaler)
        replace_folder(partial, folder)

    def _best_so_far(self) -> float | None:
        """The score of ``<output>/best``, if this run continues the run that validated it on the same benchmark
        (a run started over, or validated on another benchmark, replaces it at its first validation)."""
        record = json_object_file(self.output / "best" / "validation.json")
        if record is None:
            return None
        same = record.get("validate") == self.cfg.validate and 0 < record.get("step", 0) <= self.state.step
        return float(record["value"]) if same and isinstance(record.get("value"), (int, float)) else None

    @property
    def validate_every(self) -> int:
        return self.cfg.validate_every or self.cfg.save_every

    def validate(self, checkpoint: Path) -> None:
        """Evaluate the weights in ``checkpoint`` on ``cfg.validate`` (every rank takes part, as in ``cirbench
        run`` under torchrun); log the metrics; leave the random states as they were."""
        from .evaluate import Loaded, RunConfig, backbone_key, evaluate

        cfg, t = self.cfg, self.trainable
        assert cfg.validate is not None
        benchmarks = validation_benchmarks(cfg.validate)
        if self.validation is None:  # the training's frozen backbone in fp32, not a second copy; the data read once
            self.validation = Loaded(keep_features=False)  # (each step's adapted gallery would pile up in memory)
            key = backbone_key(t.backbone.model_name, t.backbone.pretrained, "fp32", str(self.device), cfg.seed)
            self.validation.backbones[key] = t.backbone.fp32_view()
        saved = rng_state()  # the evaluation seeds torch; the training's own draws must go on as they were
        started = time.time()
        results = []
        try:
            for dataset, split in benchmarks:
                results.append((dataset, split, evaluate(RunConfig(
                    method=t.name, dataset=dataset, split=split, backbone=t.backbone.model_name,
                    pretrained=t.backbone.pretrained, device=str(self.device),
                    data_root=cfg.validate_data_roots.get(dataset), output=self.output / "validation",
                    method_options={"checkpoint": str(checkpoint)}, label=f"{t.name}@step{self.state.step}",
                    seed=cfg.seed, workers=cfg.workers, bootstrap=0, cache_dir=self.validation_cache,
                    progress=cfg.progress and self.rank_ == 0), loaded=self.validation)))
        finally:
            set_rng_state(saved)
        if self.rank_ != 0:
            return
        self.prune_validation_cache(started)
        metrics: dict[str, dict[str, dict[str, float]]] = {}  # benchmark -> run label -> metric -> value
        for dataset, split, outcomes in results:
            name = f"{dataset}:{split}" if split else dataset
            for o in outcomes:
                values = metrics.setdefault(name, {})[o.label] = {k: round(v, 4) for k, v in o.metrics.items()}
                shown = ", ".join(f"{k} {v:.2f}" for k, v in list(values.items())[:4])
                tqdm.write(f"validation at step {self.state.step} on {name}: {shown} ({o.label})")
        self.log.write({"step": self.state.step, "epoch": self.state.epoch, "validation": metrics})
        first_dataset, _, first_outcomes = results[0]
        self.keep_if_best(checkpoint, first_dataset, first_outcomes)

    @property
    def validation_cache(self) -> Path:
        """The features validation encodes, kept with the run (a method that adapts the image tower makes a gallery
        per step: in the shared cache they would pile up for good)."""
        return self.output / "validation" / "cache"

    def prune_validation_cache(self, started: float) -> None:
        """Drop the features the validation that began at ``started`` did not read or write (earlier steps' adapted
        galleries); those of the frozen backbone are read by every validation and stay."""
        from .cache_inventory import feature_entries, remove

        for entry in feature_entries(self.validation_cache):
            if entry.used < started:  # (a coarse file-system clock may drop one in use too: it is encoded again)
                remove(entry)

    def keep_if_best(self, checkpoint: Path, dataset: str, outcomes) -> None:
        """Copy ``checkpoint``'s weights to ``<output>/best`` when they score above every earlier validation of
        this output (by the benchmark's main metric; ``best/validation.json`` says which step and score)."""
        from .plugins import get_registry

        main = get_registry().dataset(dataset).main_metric
        scores = [o.metrics[main] for o in outcomes if main in o.metrics] if main else []
        if not scores:
            return
        best = self.output / "best"
        if self.best_score is not None and max(scores) <= self.best_score:
            return
        self.best_score = max(scores)
        partial = partial_folder(best)
        partial.mkdir(parents=True)
        for name in ("model.safetensors", "config.json"):
            shutil.copy2(checkpoint / name, partial / name)
        entry = {"validate": self.cfg.validate, "metric": main, "value": max(scores), "step": self.state.step}
        atomic_write_bytes(partial / "validation.json", (json.dumps(entry, indent=2) + "\n").encode())
        replace_folder(partial, best)

    def plan(self) -> str:
        """What this run will do, in one line (printed at its start)."""
        cfg, t = self.cfg, self.trainable
        if isinstance(self.corpus, PairsCorpus):
            corpus = f"{len(self.corpus):,} samples"
        else:
            known = self.corpus.num_samples
            corpus = f"{len(self.corpus.urls)} shards" + (f" ({known:,} samples an epoch)" if known else "")
        epochs = f" ({cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''})" if cfg.max_steps is None else ""
        parts = ([f"{self.per_step * cfg.accum_steps} a rank x {self.world} ranks"] if self.world > 1 else []) + \
            ([f"in {cfg.accum_steps} micro-batches of {self.per_step}"] if cfg.accum_steps > 1 else [])
        ranks = f" ({', '.join(parts)})" if parts else ""
        warmup = f", {cfg.warmup_steps:,} warm-up steps" if cfg.warmup_steps else ""
        if cfg.warmup_epochs:
            warmup += (f", warm-up over {cfg.warmup_epochs} epoch{'s' if cfg.warmup_epochs != 1 else ''} from "
                       f"{cfg.warmup_start:g} x lr")
        if self.train_preprocess is not None:
            images = f"; images: {self.train_preprocess['kind']}"
        else:
            images = "; captions only" if self.corpus.captions else "; sample keys only"
        return (f"train {t.name} on {corpus}: {self.total_steps:,} steps{epochs} of {cfg.batch_size}{ranks}, "
                f"lr {cfg.lr:g} {cfg.schedule}{warmup}, {t.backbone.precision}{images}; checkpoint every "
                f"{cfg.save_every:,} steps in {self.latest}"
                + (f"; validate on {cfg.validate} every {self.validate_every:,} steps" if cfg.validate else ""))

    def run(self) -> Path:
        cfg, run = self.cfg, self.state
        if cfg.progress and self.rank_ == 0:
            tqdm.write(self.plan())
        before = rng_state()  # whether prepare's work comes from a cache must not change the training's draws
        self.trainable.prepare(self.corpus, cfg)
        set_rng_state(before)
        self.trainable.train_mode(True)
        bar = tqdm(total=self.total_steps, initial=run.step, desc=f"train {self.trainable.name}", unit="step",
                   disable=not cfg.progress or self.rank_ != 0)
        self.start = time.perf_counter()
        with self._stop_at_a_step_on_ctrl_c():
            self._steps(bar)
        bar.close()
        self.trainable.train_mode(False)
        self.save(self.latest, final=False)
        self.save(self.output, final=True)
        dist_utils.barrier()
        if cfg.validate:
            self.validate(self.output)
        if self.rank_ == 0 and run.skipped:
            tqdm.write(f"skipped {run.skipped} unreadable samples (missing or corrupt image, or empty caption)")
        if self.rank_ == 0 and run.unreadable_shards:
            tqdm.write(f"skipped {len(run.unreadable_shards)} unreadable shards (named above and in "
                       f"{self.output / 'config.json'})")
        return self.output

    @contextlib.contextmanager
    def _stop_at_a_step_on_ctrl_c(self):
        """Ctrl-C lets the step under way finish, saves checkpoint-latest and stops (a second Ctrl-C stops at
        once): the same command resumes from there. Under torchrun (which forwards the signal to every worker
        and kills them 30 s later) the ranks learn of it through the step's gradient all-reduce, so they all
        stop after the same step, whichever of them the signal reached first. A run started with Ctrl-C ignored
        (``nohup``, or ``&`` in a script: the shell's way of keeping a terminal's Ctrl-C from a background job)
        keeps ignoring it."""
        if (threading.current_thread() is not threading.main_thread()
                or signal.getsignal(signal.SIGINT) is signal.SIG_IGN):
            yield
            return

        def on_ctrl_c(_signum, _frame):
            if os.getpid() != main_pid:  # a reader process forked with this handler: the main process decides
                return
            self.interrupted = True
            signal.signal(signal.SIGINT, before)
            if self.rank_ == 0:
                tqdm.write("stopping after this step to save a checkpoint (Ctrl-C again stops at once)")

        main_pid = os.getpid()
        before = signal.signal(signal.SIGINT, on_ctrl_c)
        try:
            yield
        except _Interrupted:
            self.save(self.latest, final=False)
            if self.rank_ == 0:
                tqdm.write(f"interrupted at step {self.state.step}: saved {self.latest}; the same command resumes")
            raise KeyboardInterrupt from None
        finally:
            signal.signal(signal.SIGINT, before)

    def _steps(self, bar) -> None:
        run = self.state
        while run.step < self.total_steps:
            # a run resumed at the end of an epoch finds that epoch's rest empty: only a whole epoch that gives
            # no step means the corpus has no usable batch
            steps_before, whole_epoch = run.step, run.epoch_step == 0
            self._epoch(bar)
            if run.step >= self.total_steps:
                break
            if run.step == steps_before and whole_epoch:
                shards = "".join(f"; unreadable shard {s}: {why}" for s, why in list(run.unreadable_shards.items())[:3])
                short = "" if self.map_style else (
                    f"; each of the {max(1, self.cfg.workers)} reader(s) of a rank drops its last batch short of "
                    f"{self.per_step} samples: fewer --workers or a smaller --batch-size leaves fewer out")
                raise CirbenchError(f"corpus {self.corpus.source} yielded no usable batch ({run.skipped} samples "
                                    f"skipped{shards}{short})")
            self.log.write({"step": run.step, "epoch": run.epoch, "epoch_steps": run.epoch_step})
            run.epoch, run.epoch_step, run.reader_batches, run.next_reader = run.epoch + 1, 0, [], 0
            if self.cfg.max_steps is None and run.epoch >= self.cfg.epochs:
                # shards whose epochs ended before their stated size (a reader's short last batch is dropped, a
                # rank's share may run out first) end the run after --epochs all the same, short of the plan
                if self.rank_ == 0 and isinstance(self.corpus, ShardCorpus):
                    tqdm.write(f"--epochs {self.cfg.epochs} ended at step {run.step:,} of the {self.total_steps:,} "
                               f"planned from {self.corpus.num_samples:,} samples an epoch: an epoch ends when a "
                               f"rank's shards run out ({LOG_FILE} has each epoch's steps)")
                break

    def _epoch(self, bar) -> None:
        cfg, run = self.cfg, self.state
        if self.epoch_steps and run.epoch_step >= self.epoch_steps:
            return  # resumed at the end of an epoch
        readers = max(1, cfg.workers)
        if not self.map_style and len(run.reader_batches) != readers:
            # a new epoch, or a checkpoint without the counts (or with another --workers): each reader's turns
            # while every reader had samples
            run.reader_batches, run.next_reader = reader_turns(run.epoch_step * cfg.accum_steps, readers)
        loader = _loader(self.corpus, self.map_style, self.per_step, cfg, self.rank_, self.world, run.epoch,
                         run.epoch_step, self.device, run.reader_batches, run.next_reader)
        rotation = run.next_reader  # reader r of this loader reads part (r + rotation) % readers
        micro = []
        taken: list[int] = []  # the parts of the batches read since the last step, counted when a step is made
        for batch in self._batches(loader):
            if batch is not None and not self.map_style:
                taken.append((batch.reader + rotation) % readers)
            if batch is not None:
                run.skipped += batch.skipped
                for shard, why in batch.unreadable_shards:
                    if shard not in run.unreadable_shards:
                        run.unreadable_shards[shard] = why
                        tqdm.write(f"warning: corpus shard {shard} is unreadable ({why}); the rest of it is skipped")
                if batch.places < self.per_step:
                    # a shard reader's last, short batch: dropped, as open_clip's training drops it (partial=False),
                    # so that every step is --batch-size samples read (unreadable ones aside); what it says of
                    # unreadable samples and shards is kept above
                    continue
            # the ranks go on together, so that each step's global batch is the ranks' batches of one place in the
            # epoch, as its saved position says: the epoch ends for all when one rank's shards ran out (the others'
            # rest is dropped, as drop_last drops a partial batch), and a batch that lost every sample (unreadable)
            # on one rank is skipped by all
            going, usable = dist_utils.all_ranks_each(batch is not None, batch is not None and len(batch) > 0)
            if not going:
                return
            if not usable:
                continue
            micro.append(batch)
            if len(micro) < cfg.accum_steps:
                continue
            factor = _lr_factor(cfg, run.step, run.epoch, self.total_steps)
            loss, logs, stop = _optimizer_step(self.trainable, self.optimizer, self.scheduler, micro, cfg, factor,
                                               self.params, self.device, self.interrupted, self.scaler)
            run.seen += sum(len(mb) for mb in micro) * self.world
            micro = []
            run.step += 1
            run.epoch_step += 1
            for part in taken:  # the position a checkpoint of this step holds (a resume reads again what follows)
                run.reader_batches[part] += 1
                run.next_reader = (part + 1) % readers
            taken = []
            bar.update(1)
            if run.step % cfg.log_every == 0 or run.step == self.total_steps:
                rate = run.seen / max(1e-9, time.perf_counter() - self.start)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{group_lr(cfg, factor):.2e}", img_s=f"{rate:.0f}",
                                **{k: f"{v:.3f}" for k, v in logs.items()})
                self.log.write({"step": run.step, "epoch": run.epoch, "loss": loss, "lr": group_lr(cfg, factor),
                                "img_s": round(rate, 1), **logs})
            if run.step % cfg.save_every == 0 and run.step < self.total_steps:
                self.save(self.latest, final=False)
            if cfg.validate and run.step % self.validate_every == 0 and run.step < self.total_steps:
                if run.step % cfg.save_every:
                    self.save(self.latest, final=False)
                self.validate(self.latest)
            if run.step >= self.total_steps:
                return
            # under torchrun only the flag the ranks agreed on counts, so that they all stop at the same step
            if stop or (self.world == 1 and self.interrupted):
                raise _Interrupted
            if run.epoch_step == self.epoch_steps:
                return  # an epoch of a stated number of samples is over (open_clip's with_epoch)

    def _batches(self, loader):
        """The loader's batches, then ``None`` (this rank's epoch is over); after Ctrl-C, a reader process that
        the signal ended before it could ignore it (one still starting up, see :func:`_reader_ignores_ctrl_c`)
        stops the epoch between two steps (its error is expected then, not reported)."""
        batches = iter(loader)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                yield None
                return
            except Exception:
                if self.interrupted and self.world == 1:  # under torchrun the others would wait for this rank
                    raise _Interrupted from None
                raise
            yield batch


class _Interrupted(Exception):
    """Ctrl-C arrived; raised between two steps so that the saved state is one step's."""


def _reader_ignores_ctrl_c(_worker_id: int) -> None:
    """A reader process leaves Ctrl-C to the main process, which finishes its step and saves (the terminal, and
    torchrun, send the signal to the whole process group), whatever way the readers were started."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _loader(corpus, map_style: bool, per_step: int, cfg: TrainConfig, rank: int, world: int, epoch: int,
            epoch_step: int, device: torch.device,
            reader_batches: list[int] | None = None, next_reader: int | None = None) -> torch.utils.data.DataLoader:
    """This epoch's batches for this rank, starting after the ``epoch_step`` steps already done (shards: after the
    ``reader_batches`` each reader part already gave, from part ``next_reader`` on, when known)."""
    done = epoch_step * per_step * cfg.accum_steps
    # the loader's own generator: creating an iterator must not draw from the global RNG (dropout), or a
    # resumed run would diverge from an uninterrupted one
    generator = torch.Generator().manual_seed(cfg.seed * 7919 + epoch * 104729 + rank)
    corpus.epoch = epoch  # each epoch draws its own augmentation (RandomResizedCrop)
    if map_style:
        sampler = EpochSampler(len(corpus), cfg.seed, rank, world, per_step)
        sampler.set_position(epoch, done)
        return torch.utils.data.DataLoader(corpus, batch_size=per_step, sampler=sampler, collate_fn=collate,
                                           num_workers=cfg.workers, drop_last=True, pin_memory=device.type == "cuda",
                                           generator=generator, worker_init_fn=_reader_ignores_ctrl_c)
    corpus.batch_size, corpus.shuffle_seed = per_step, cfg.seed
    if reader_batches is None or next_reader is None:
        reader_batches, next_reader = reader_turns(epoch_step * cfg.accum_steps, max(1, cfg.workers))
    corpus.reader_batches, corpus.first_part = list(reader_batches), next_reader
    # each reader's last batch may be short: the training loop drops it (see _Trainer._epoch)
    return torch.utils.data.DataLoader(corpus, batch_size=per_step, collate_fn=collate, num_workers=cfg.workers,
                                       pin_memory=device.type == "cuda", generator=generator,
                                       worker_init_fn=_reader_ignores_ctrl_c)


def validation_benchmarks(validate: str) -> list[tuple[str, str | None]]:
    """``cirr:val,fashioniq:val`` -> ``[("cirr", "val"), ("fashioniq", "val")]`` (each named once, in order)."""
    from .types import benchmark_split

    out = list(dict.fromkeys(benchmark_split(item) for item in validate.split(",") if item.strip()))
    if not out:
        raise CirbenchError("--validate names no benchmark")
    return out


def check_validation(spec, validate: str, data_roots: dict[str, str] | None = None) -> None:
    """Refuse, before anything is trained, a ``--validate`` benchmark that does not exist, a split it lacks or
    whose targets are hidden, annotations or images that cannot be read from its folder in ``data_roots``, and a
    method whose trained weights cannot be evaluated (no ``checkpoint`` option)."""
    from .evaluate import load_eval_sets
    from .plugins import get_registry
    from .types import resolve_options

    if not any(o.name == "checkpoint" for o in spec.options):
        raise CirbenchError(f"method '{spec.name}' has no --checkpoint option to evaluate its weights with: "
                            "it cannot be validated during training")
    for dataset, asked in validation_benchmarks(validate):
        named = f"{dataset}:{asked}" if asked else dataset
        dspec = get_registry().dataset(dataset)
        try:
            split = dspec.resolve_split(asked)
        except CirbenchError as exc:
            raise CirbenchError(f"--validate {named}: {exc}") from None
        if split in dspec.hidden_splits:
            raise CirbenchError(f"--validate {named}: the targets of '{split}' are hidden (a test server scores "
                                "it); validate on a split with targets")
        dspec.load()
        (options,) = resolve_options(dspec.options, {}, dspec.name, f"dataset {dspec.name}")
        try:  # bad annotations or missing images: now, not after hours of training
            load_eval_sets(dspec, split, (data_roots or {}).get(dspec.name), options)
        except CirbenchError as exc:
            reason = str(exc).replace("--data-root", "--validate-data-root")
            raise CirbenchError(f"--validate {named}: {reason}") from None


def check_not_resumable_elsewhere(output: Path, method: str) -> None:
    """Refuse to write a method's checkpoints over another method's."""
    cfg = Path(output) / "config.json"
    if cfg.is_file():
        saved = (json_object_file(cfg) or {}).get("method")
        if saved and saved != method:
            raise CheckpointError(f"{output} holds a '{saved}' checkpoint; choose another --output for '{method}'")
