"""The text-adapter method: how a plugin adds a method that is trained with ``cirbench train``.

A linear map on CLIP's text features (identity at the start) is trained so that a caption's adapted feature finds
its image among the batch's images; at evaluation the query is the weighted sum of the reference image's feature
and the adapted text feature of the modification. Three pieces:

* ``TextAdapterTrainable`` (the spec's ``trainer``): what is trained (``self.net``; ``NetTrainable`` saves, loads
  and optimises it) and the loss of a batch. The shared loop does the rest: corpora, AdamW and its schedule,
  checkpoints and resume, torchrun, ``--accum-steps``, ``--validate``.
* Its loss compares each caption with every image of the batch through ``contrastive_loss``, which takes its rows
  from ``cirbench.global_batch.gather``: the whole global batch, over GPUs and micro-batches alike.
* ``TextAdapter`` (the spec's ``factory``): the evaluation method, reading the folder ``cirbench train`` wrote,
  through ``--checkpoint``; ``load_checkpoint`` refuses one of another method or backbone in one line.
"""

from __future__ import annotations

import torch

from cirbench import Method, NetTrainable, contrastive_loss
from cirbench.checkpoints import checkpoint_sha256, load_checkpoint, load_module_weights

NAME = "text-adapter"


def build_adapter(width: int) -> torch.nn.Linear:
    adapter = torch.nn.Linear(width, width)
    with torch.no_grad():  # the identity: an untrained adapter is plain CLIP
        adapter.weight.copy_(torch.eye(width))
        adapter.bias.zero_()
    return adapter


def raw_text(backbone, texts: list[str]) -> torch.Tensor:
    """CLIP text features before normalisation (the frozen backbone: no gradients; a corpus's captions, met once,
    are not memoised on it)."""
    return backbone.encode_text(texts, memoize=False, normalize=False)


class TextAdapterTrainable(NetTrainable):
    name = NAME
    preprocess_kind = "clip"  # training images are preprocessed as at evaluation
    defaults = {"lr": 1e-4, "weight_decay": 0.0, "batch_size": 256, "epochs": 1, "schedule": "cosine"}

    def __init__(self, backbone, options):
        super().__init__(backbone, options)
        self.net = build_adapter(backbone.embed_dim).to(backbone.device)

    def training_step(self, batch):
        with torch.no_grad(), self.backbone.autocast():
            image = self.backbone.model.encode_image(batch.pixels.to(self.backbone.device)).float()
        text = self.net(raw_text(self.backbone, batch.captions))
        return contrastive_loss(image, text, float(self.options["temperature"])), {}


class TextAdapter(Method):
    """Query = normalize((1 - w) * reference image + w * normalize(adapter(text)))."""

    def __init__(self, backbone, options, dataset=None):
        super().__init__(backbone, options, dataset)
        tensors, _config = load_checkpoint(options.get("checkpoint"), NAME, backbone.identity())
        self.adapter = build_adapter(backbone.embed_dim)
        load_module_weights(self.adapter, tensors, str(options.get("checkpoint")))
        self.adapter = self.adapter.to(backbone.device).eval()
        self.sha256 = checkpoint_sha256(options["checkpoint"])

    def info(self) -> dict:
        # recorded in every result (and part of its fingerprint): which weights made these numbers
        return {"checkpoint": {"path": str(self.options.get("checkpoint")), "sha256": self.sha256}}

    @torch.no_grad()
    def compose(self, references, queries):
        text = self.adapter(raw_text(self.backbone, [" and ".join(q.texts) for q in queries]))
        w = float(self.options["weight"])
        mixed = (1 - w) * references.float() + w * torch.nn.functional.normalize(text, dim=-1)
        return torch.nn.functional.normalize(mixed, dim=-1)
