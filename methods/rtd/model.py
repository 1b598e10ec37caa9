"""RTD: LinCIR's evaluation through a tuned copy of CLIP's text tower, and the post-hoc training that tunes it
(the official ``train_text_encoder.py``)."""

from __future__ import annotations

from typing import Any

import torch

from cirbench.backbones import Backbone
from cirbench.checkpoints import checkpoint_sha256, load_checkpoint
from cirbench.errors import CheckpointError
from cirbench.methods._shared.textinv import (
    LinCIRProtocol,
    clean_caption,
    clean_text,
    encode_with_pseudo_tokens,
    lincir_demo_source,
    lincir_demo_weights,
    load_phi_weights,
    loaded_phi,
    nt_xent,
    searle_prompt,
)
from cirbench.methods._shared.towers import (
    TEXT_PARTS,
    load_part_state,
    part_parameters,
    part_state,
    text_tower_copy,
    tuned_backbone,
)
from cirbench.training import TrainableMethod

PLACEHOLDER = "$"
PHI = "phi."  # the frozen Phi's tensors in an RTD checkpoint, beside the text tower's


class RTD(LinCIRProtocol):
    """Query feature = the tuned text tower's feature of "a photo of $ that {caption}", $ = Phi(image
    embedding); gallery features are the backbone's own."""

    def __init__(self, backbone, options, dataset=None):
        super().__init__(backbone, options, dataset)
        downloads(options, backbone.model_name, backbone.pretrained)  # no --checkpoint: what to do, in one line
        path = options["checkpoint"]
        tensors, config = load_checkpoint(path, "rtd", backbone.identity())
        phi = {k.removeprefix(PHI): v for k, v in tensors.items() if k.startswith(PHI)}
        self.build_phi(phi, str(path))
        view = text_tower_copy(backbone.model)
        load_part_state(view, {k: v for k, v in tensors.items() if not k.startswith(PHI)}, str(path))
        self.tuned = tuned_backbone(backbone, view)
        self.checkpoint, self.sha256 = str(path), checkpoint_sha256(path)
        self.phi_source = config.get("phi")

    def text_encoder(self) -> Backbone:
        return self.tuned

    def info(self) -> dict:
        return {**super().info(), **({"phi": self.phi_source} if self.phi_source else {})}


PHI_HINT = "pass --phi (a LinCIR Phi for this backbone: `cirbench train --method lincir`)"


class RTDTrainable(TrainableMethod):
    """Frozen-target text contrastive learning (the official ``train_text_encoder.py``): for a batch of B
    triplets, the tuned tower encodes "a photo of $ that {conditioning}" and "a photo of $" (2B prompts, refined
    batch sampling), $ = Phi(frozen embedding of the reference caption + noise) (refined concatenation); the
    frozen tower encodes the target and the reference captions (2B); NT-Xent between the two sets."""

    name = "rtd"
    needs_images = False
    caption_columns = ("target_caption",)
    required_columns = ("reference_caption", "conditioning_caption")
    # the official run.sh: batch 128 x 4 GPUs, lr 1e-5 constant (constant_with_warmup, 0 warm-up steps), 2,000
    # steps, fp16; its AdamW: weight decay 0.01 on every parameter of the text encoder, torch's betas and eps
    defaults = {"lr": 1e-5, "weight_decay": 0.01, "batch_size": 512, "max_steps": 2000, "warmup_steps": 0,
                "schedule": "constant"}

    @classmethod
    def downloads(cls, options: dict[str, Any], model: str, pretrained: str) -> list[tuple[str, str]]:
        """LinCIR's demo Phi, the frozen Phi when ``--phi`` names none."""
        if options.get("phi"):
            return []
        return [("LinCIR's demo weights", lincir_demo_source(model, pretrained, PHI_HINT))]

    def __init__(self, backbone: Backbone, options: dict[str, Any]):
        super().__init__(backbone, options)
        path = options.get("phi") or lincir_demo_weights(backbone, PHI_HINT, option="phi")
        tensors, sha256 = load_phi_weights(path, "lincir", backbone)
        self.phi = loaded_phi(backbone, tensors, str(path))
        self.phi_record = {"source": str(path), "sha256": sha256}
        self.view = text_tower_copy(backbone.model)
        for _, p in part_parameters(self.view):
            p.requires_grad_(True)
        self.tuned = tuned_backbone(backbone, self.view)
        self.noise, self.tau = float(options.get("noise", 0.5)), float(options.get("tau", 0.07))

    def named_trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return part_parameters(self.view)

    def decays(self, name, param):
        return True  # the official AdamW decays every parameter it is given

    def train_mode(self, training: bool) -> None:
        for name, module in self.view.named_children():
            if name in TEXT_PARTS:
                module.train(training)

    def training_step(self, batch):
        inner = getattr(self.backbone.tokenizer, "tokenizer", self.backbone.tokenizer)
        references = [clean_caption(str(c or ""), inner) for c in batch.extra["reference_caption"]]
        targets = [clean_caption(c, inner) for c in batch.captions]
        conditions = [clean_text(str(c or ""), PLACEHOLDER) for c in batch.extra["conditioning_caption"]]
        n = len(references)
        with torch.no_grad():  # the frozen tower: T_t, then T_r (the targets of the refined batch's second half)
            frozen = self.backbone.model.encode_text(self.backbone.tokenize(targets + references)).float()
            reference = frozen[n:]
            # drawn on the CPU generator (saved in checkpoints), so a resumed run draws what an uninterrupted one would
            scale = torch.rand(n).unsqueeze(-1)
            inputs = reference + (self.noise * scale * torch.randn(reference.shape)).to(reference.device)
            pseudo = self.phi(inputs)
        prompts = [searle_prompt(c, PLACEHOLDER) for c in conditions] + [f"a photo of {PLACEHOLDER}"] * n
        composed = encode_with_pseudo_tokens(self.tuned, prompts, torch.cat([pseudo, pseudo]), PLACEHOLDER,
                                             normalize=False)
        return nt_xent(frozen, composed, self.tau), {}

    def state_to_save(self) -> dict[str, torch.Tensor]:
        return {**{k: v.detach() for k, v in part_state(self.view).items()},
                **{PHI + k: v for k, v in self.phi.state_dict().items()}}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        load_part_state(self.view, {k: v for k, v in tensors.items() if not k.startswith(PHI)}, "resumed state")

    def checkpoint_config(self) -> dict[str, Any]:
        return {"phi": self.phi_record, "noise": self.noise, "tau": self.tau,
                "tuned": "the text tower, every parameter; Phi frozen"}


def downloads(options: dict, model: str, pretrained: str) -> list[tuple[str, str]]:
    """MethodSpec.downloads of ``RTD``: nothing to fetch, but no run without --checkpoint (no weights exist)."""
    if options.get("checkpoint") is None:
        raise CheckpointError("rtd needs --checkpoint: RTD's authors released no weights; tune a text tower with "
                              "`cirbench train --method rtd --corpus TRIPLETS.jsonl --output DIR` and pass DIR")
    return []
