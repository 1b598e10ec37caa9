"""PLI: the weighted-sum query on masked-tuned towers, its checkpoints (cirbench and official), masked tuning.

Follows the official repository (github.com/Chen-Junyang-cn/PLI: ``trainers/pretrainer.py``,
``models/image_encoders/clip_image_encoder.py``, ``losses/batch_based_classification_loss.py``,
``evaluators/pretrainer_evaluator.py``, ``cirr_test_submission.py``, ``optimizers.py``, ``options/``). What its
code does, as this port does it:

* Masking (``random_masking``, MAE's): the patch tokens, with their positional embeddings, are shuffled by the
  argsort of ``torch.rand`` noise and the first ``int(L * (1 - mask_ratio))`` kept, in that shuffled order; the
  class token is put first, then ``ln_pre``, the transformer, ``ln_post`` on the class token and ``proj``. Here a
  module in the slot open_clip's VisionTransformer keeps for patch dropout (after the positional embedding, before
  ``ln_pre``) does it, with the same draw, so open_clip's own forward runs the rest.
* The loss: ``(masked image + caption) @ image.T / tau``, cross-entropy against the diagonal, on raw
  (unnormalised) embeddings, tau 1.0 (the trainer passes none), gradients through all three branches; the global
  batch's rows (DataParallel computes it on the whole batch).
* Optimisation: AdamW, lr 1e-6, weight decay 5e-5 on every tuned parameter, torch's betas; the lr warmed up
  once an epoch from 0.01 x lr over 5 epochs (LinearLR in SequentialLR; its decays at epochs 35 and 45 lie beyond
  the 5 to 10 epochs the README's commands run); batch 64; fp32 (``--precision fp32``; cirbench's ``auto`` trains
  under bf16 autocast on a GPU).
* Evaluation: query = ``normalize(text) + img_weight * normalize(image)``, normalised, against normalised gallery
  features, both towers the tuned ones. CIRR's and FashionIQ's texts go through ``caption_post_process`` first
  (``. ? & *`` become ``dotmark questionmark andmark starmark``), CIRCO's do not. FashionIQ's text is
  ``"{c1} and {c2}"``.

On FashionIQ the official evaluation is CoSMo's (VAL's) caption-pairs protocol (the repository's own, deduplicated
``captions_pairs`` files, each pair queried in both caption orders, a gallery of the pairs' images, the reference
removed): the ``fashioniq-pairs`` dataset runs it, its queries' two texts in the line's order, which this port joins
as the official does. On ``fashioniq`` (the standard protocol) it scores "{c1} and {c2}".
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cirbench import global_batch
from cirbench.backbones import Backbone
from cirbench.checkpoints import checkpoint_sha256, is_official_file, load_checkpoint
from cirbench.errors import CheckpointError, CirbenchError
from cirbench.method import Method
from cirbench.methods._shared.towers import (
    IMAGE_PARTS,
    TEXT_PARTS,
    last_loaded,
    load_part_state,
    part_parameters,
    part_state,
    tower_view,
    tuned_copy,
)
from cirbench.safe_unpickle import load_state_dict
from cirbench.training import TrainableMethod
from cirbench.types import Query
from cirbench.util import file_sha256

OFFICIAL_SUFFIXES = (".pth", ".pt")
OFFICIAL_IMAGE = "image_encoder.visual_encoder."  # ClipImageEncoder wraps CLIP's visual as visual_encoder
OFFICIAL_TEXT = "text_encoder."  # ClipTextEncoder holds CLIP's text parts under their own names
TUNED = {"both": IMAGE_PARTS + TEXT_PARTS, "text": TEXT_PARTS, "image": IMAGE_PARTS}
# CoSMo's caption_post_process, which the official CIRR and FashionIQ datasets apply to every modification text
TEXT_MARKS = ((".", "dotmark"), ("?", "questionmark"), ("&", "andmark"), ("*", "starmark"))
MARKED_DATASETS = ("cirr", "fashioniq", "fashioniq-pairs")


def official_text(text: str) -> str:
    """The official ``caption_post_process``: stripped, punctuation spelled out."""
    text = text.strip()
    for mark, word in TEXT_MARKS:
        text = text.replace(mark, word)
    return text


def query_text(query: Query, marks: bool) -> str:
    """The modification text the official evaluation encodes: the caption, or FashionIQ's "{c1} and {c2}"."""
    text = " and ".join(t.strip() for t in query.texts)
    return official_text(text) if marks else text


def official_tensors(path: Path) -> dict[str, torch.Tensor]:
    """CLIP's tensors, under open_clip's names, from the official checkpoint (``model_state_dict`` holding the
    image encoder, the text encoder and the compositor's state)."""
    raw = load_state_dict(path, "model_state_dict")
    extra = sorted(k for k in raw if k.startswith("compositor."))
    if extra:
        raise CheckpointError(f"checkpoint {path} holds a compositor ({extra[0]}, ...): PLI's Combiner or Phi "
                              "variant, which cirbench's pli (the weighted sum) does not run")
    tensors = {}
    for name, tensor in raw.items():
        if name.startswith(OFFICIAL_IMAGE):
            tensors["visual." + name.removeprefix(OFFICIAL_IMAGE)] = tensor
        elif name.startswith(OFFICIAL_TEXT):
            tensors[name.removeprefix(OFFICIAL_TEXT)] = tensor
        # else the image encoder's vision_mask_token, which the official forward never uses
    if not any(k.startswith("visual.") for k in tensors) or not any(not k.startswith("visual.") for k in tensors):
        raise CheckpointError(f"checkpoint {path} lacks image_encoder.visual_encoder.* or text_encoder.* tensors: "
                              "not a PLI checkpoint of CLIP (its BLIP checkpoints are not open_clip models)")
    return tensors


def load_towers(path: Any, backbone: Backbone) -> tuple[Backbone, dict[str, Any]]:
    """The backbone with the tuned towers of a cirbench folder or the official checkpoint, and what the result file
    records of it."""
    if is_official_file(path, OFFICIAL_SUFFIXES):
        p = Path(path)
        tensors, parts = official_tensors(p), IMAGE_PARTS + TEXT_PARTS
        record = {"checkpoint": str(p), "sha256": file_sha256(p), "format": "official", "tuned": "both"}
    else:
        tensors, config = load_checkpoint(path, "pli", backbone.identity(), OFFICIAL_SUFFIXES)
        tune = (config.get("options") or {}).get("tune", "both")
        if tune not in TUNED:
            raise CheckpointError(f"checkpoint {path} records tune={tune!r}; valid: {', '.join(TUNED)}")
        parts = TUNED[tune]
        record = {"checkpoint": str(path), "sha256": checkpoint_sha256(path), "format": "cirbench", "tuned": tune}
    return tuned_copy(backbone, tensors, str(path), parts), record


class PLI(Method):
    """Query = normalize(normalize(text) + w x normalize(reference image)), text and images through the tuned
    towers."""

    def __init__(self, backbone, options, dataset=None):
        super().__init__(backbone, options, dataset)
        downloads(options, backbone.model_name, backbone.pretrained)
        path = Path(options["checkpoint"]).expanduser()
        self.tuned, self.record = last_loaded(backbone, "pli-towers", path, lambda: load_towers(path, backbone))
        self.marks = bool(options.get("official_text", True)) and dataset in MARKED_DATASETS

    def gallery_feature_kind(self) -> dict:
        if self.record["tuned"] == "text":  # the image tower is the backbone's: its features are everyone's
            return {"kind": "image-global"}
        return {"kind": "image-global", "pli_sha256": self.record["sha256"]}

    def encode_gallery(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.tuned.encode_image(pixels)

    @torch.no_grad()
    def compose(self, references: torch.Tensor, queries: list[Query]) -> torch.Tensor:
        text = self.tuned.encode_text([query_text(q, self.marks) for q in queries])
        image = F.normalize(references.to(text.device).float(), dim=-1)
        return F.normalize(text + float(self.options["image_weight"]) * image, dim=-1)

    def info(self) -> dict:
        return dict(self.record)


class OfficialMasking(torch.nn.Module):
    """The official ``random_masking`` in open_clip's patch-dropout slot: the class token first, then
    ``int(L * (1 - ratio))`` of the ``L`` patch tokens, those the argsort of ``torch.rand`` noise puts first."""

    def __init__(self, ratio: float):
        super().__init__()
        self.ratio = ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls, patches = x[:, :1], x[:, 1:]
        n, length, width = patches.shape
        keep = int(length * (1 - self.ratio))
        noise = torch.rand(n, length, device=x.device)
        kept = torch.argsort(noise, dim=1)[:, :keep]
        return torch.cat([cls, torch.gather(patches, 1, kept.unsqueeze(-1).expand(-1, -1, width))], dim=1)


@contextlib.contextmanager
def masked(visual: torch.nn.Module, masking: torch.nn.Module) -> Iterator[None]:
    """``visual`` (a copy the trainer owns) with ``masking`` in its patch-dropout slot, for one forward."""
    before = visual.patch_dropout
    visual.patch_dropout = masking
    try:
        yield
    finally:
        visual.patch_dropout = before


class PLITrainable(TrainableMethod):
    """Masked tuning: (image with its patches masked, its caption) -> the image, within the global batch."""

    name = "pli"
    # the README's CLIP commands: lr 1e-6; its ViT-L/14 targetpad command (the released checkpoint's) batch 64 and
    # 5 epochs (its other commands train 10); weight decay 5e-5 and the per-epoch warm-up (LinearLR from
    # gamma**2 = 0.01 over --warmup_iters 5 epochs) are its defaults
    defaults = {"lr": 1e-6, "weight_decay": 5e-5, "batch_size": 64, "epochs": 5, "schedule": "constant",
                "warmup_steps": 0, "warmup_epochs": 5, "warmup_start": 0.01}

    def __init__(self, backbone: Backbone, options: dict[str, Any]):
        super().__init__(backbone, options)
        self.parts = TUNED[str(options.get("tune", "both"))]
        if not hasattr(backbone.model, "visual") or not hasattr(backbone.model.visual, "patch_dropout"):
            raise CirbenchError(f"pli masks the patch tokens of a ViT image tower; {backbone.model_name}'s image "
                                "tower has none (a ResNet?)")
        # the image tower is copied even when frozen: the masked forward swaps a module of the trainer's own copy
        self.view = tower_view(backbone.model, IMAGE_PARTS + TEXT_PARTS)
        for _, p in self.view.named_parameters():
            p.requires_grad_(False)
        for _, p in part_parameters(self.view, self.parts):
            p.requires_grad_(True)
        self.masking = OfficialMasking(float(options.get("mask_ratio", 0.75)))
        self.tau = float(options.get("tau", 1.0))
        self.preprocess_kind = str(options.get("preprocess", "clip"))

    def named_trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return part_parameters(self.view, self.parts)

    def decays(self, name: str, param: torch.nn.Parameter) -> bool:
        return True  # the official AdamW decays every parameter it is given

    def train_mode(self, training: bool) -> None:
        for name, module in self.view.named_children():
            if name in self.parts:
                module.train(training)

    def training_step(self, batch):
        tokens = self.backbone.tokenize(batch.captions)
        with masked(self.view.visual, self.masking):
            reference = self.view.encode_image(batch.pixels)
        composed = reference + self.view.encode_text(tokens)
        target = self.view.encode_image(batch.pixels)
        logits = global_batch.gather(composed.float()) @ global_batch.gather(target.float()).T / self.tau
        return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device)), {}

    def state_to_save(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in part_state(self.view, self.parts).items()}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        load_part_state(self.view, tensors, "resumed state", self.parts)


def downloads(options: dict, model: str, pretrained: str) -> list[tuple[str, str]]:
    """MethodSpec.downloads of ``PLI``: nothing fetched (the official checkpoint sits on a share no script can
    read), no run without --checkpoint."""
    if options.get("checkpoint") is None:
        raise CheckpointError("pli needs --checkpoint: the official ViT-L/14 checkpoint (a .pth linked from "
                              "github.com/Chen-Junyang-cn/PLI) or a folder of `cirbench train --method pli "
                              "--corpus PAIRS.csv --output DIR`")
    return []
