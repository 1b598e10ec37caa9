"""Pic2Word: mapping network, prompts, checkpoint loading (cirbench and official layouts), training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cirbench.backbones import Backbone
from cirbench.checkpoints import checkpoint_sha256, is_official_file, load_checkpoint
from cirbench.method import Method
from cirbench.methods._shared.textinv import (
    Img2Text,
    Pic2WordFamilyTrainable,
    RawImageReferences,
    encode_with_pseudo_tokens,
    loaded_eval_net,
    pic2word_prompt,
    raw_image_features,
    token_width,
)
from cirbench.safe_unpickle import load_state_dict
from cirbench.types import Query
from cirbench.util import file_sha256

PLACEHOLDER = "*"

OFFICIAL_SUFFIXES = (".pt", ".pth", ".bin")  # the official release's checkpoint, read by the safe unpickler


def build_net(backbone: Backbone, options: dict[str, Any]) -> Img2Text:
    return Img2Text(backbone.embed_dim, int(options.get("middle_dim", 512)), token_width(backbone),
                    float(options.get("dropout", 0.1)))


def prompt(query: Query, dataset: str | None) -> str:
    """The official prompt of ``query`` with Pic2Word's ``*`` (see :func:`pic2word_prompt`)."""
    return pic2word_prompt(query, PLACEHOLDER)


def load_official_or_cirbench(path, backbone: Backbone) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """Tensors and options from a cirbench folder, or from the official checkpoint layout."""
    if is_official_file(path, OFFICIAL_SUFFIXES):
        state = load_state_dict(path, "state_dict_img2text")
        tensors = {k.removeprefix("module."): v for k, v in state.items()}
        middle = tensors["layers.0.0.weight"].shape[0] if "layers.0.0.weight" in tensors else 512
        return tensors, {"middle_dim": middle, "dropout": 0.1}, file_sha256(Path(path))
    tensors, config = load_checkpoint(path, "pic2word", backbone.identity(), OFFICIAL_SUFFIXES)
    return tensors, config.get("options", {}), checkpoint_sha256(path)


class Pic2Word(RawImageReferences, Method):
    """Retrieve with the text feature of the prompt holding the image's pseudo-word."""

    def __init__(self, backbone, options, dataset=None):
        super().__init__(backbone, options, dataset)
        tensors, net_options, self.sha256 = load_official_or_cirbench(options.get("checkpoint"), backbone)
        self.net = loaded_eval_net(build_net(backbone, net_options), tensors, backbone, str(options.get("checkpoint")))

    @torch.no_grad()
    def compose(self, references: torch.Tensor, queries: list[Query]) -> torch.Tensor:
        tokens = self.net(references.to(self.backbone.device).float())
        return encode_with_pseudo_tokens(self.backbone, [prompt(q, self.dataset) for q in queries], tokens,
                                         PLACEHOLDER)

    def info(self) -> dict:
        return {"checkpoint": str(self.options.get("checkpoint")), "sha256": self.sha256}


class Pic2WordTrainable(Pic2WordFamilyTrainable):
    """Train the mapping so that "a photo of *" with the image's pseudo-word matches the image (CLIP frozen)."""

    name = "pic2word"
    # the official README's training command (lr 1e-4, wd 0.1, 30 epochs, 10k warm-up, batch 128) and its code's
    # AdamW settings for ViT models (Pic2WordFamilyTrainable). The official --batch-size is per GPU (main.py spawns
    # a process per visible GPU and trainer.py gathers their features for the loss); ours is the global batch, so
    # 128 is the official command on one GPU.
    defaults = {"lr": 1e-4, "weight_decay": 0.1, "batch_size": 128, "epochs": 30, "warmup_steps": 10000,
                "schedule": "cosine"}

    def __init__(self, backbone: Backbone, options: dict[str, Any]):
        super().__init__(backbone, options)
        self.net = build_net(backbone, options).to(backbone.device)

    def training_step(self, batch):
        image = raw_image_features(self.backbone, batch.pixels)
        return self.photo_of_loss(image, self.net(image)), {}

    def checkpoint_config(self):
        return {"architecture": {"middle_dim": self.options.get("middle_dim"),
                                 "token_width": token_width(self.backbone)}}
