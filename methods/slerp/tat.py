"""Text-Anchored-Tuning (TAT): LoRA (peft) on the image tower, text tower frozen, symmetric contrastive loss.

No official TAT code or weights exist; this follows the paper notes: rank 16, LoRA-alpha 16, dropout 0.1,
image encoder only, fixed temperature, AdamW lr 1e-4, 1 epoch, batch 1024. The LoRA target modules are not
stated by the paper: the default adapts both MLP projections of every block (plain ``nn.Linear`` LoRA, which
never touches the base weights). ``--lora-targets attn,mlp.c_fc,mlp.c_proj`` adds attention through peft's
``MultiheadAttention`` adapter; that adapter merges LoRA into the base projection weights for each forward
and unmerges after, which changes them by float round-off (~1e-8 per step).
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict

from cirbench.backbones import Backbone
from cirbench.checkpoints import checkpoint_sha256, load_checkpoint
from cirbench.errors import CheckpointError, CirbenchError
from cirbench.training import TrainableMethod, contrastive_loss

DEFAULT_TARGETS = "mlp.c_fc,mlp.c_proj"


def lora_config(options: dict[str, Any]) -> LoraConfig:
    """The peft LoraConfig for the image tower from the method's training options."""
    targets = [t.strip() for t in str(options.get("lora_targets") or DEFAULT_TARGETS).split(",") if t.strip()]
    pattern = r".*\.(" + "|".join(re.escape(t) for t in targets) + r")$"
    # peft types lora_alpha as int; it scales by lora_alpha / r, so a float alpha is taken as given
    return LoraConfig(r=int(options.get("lora_rank", 16)), lora_alpha=float(options.get("lora_alpha", 16.0)),  # type: ignore[arg-type]
                      lora_dropout=float(options.get("lora_dropout", 0.1)), target_modules=pattern, bias="none")


def _check_targets(visual: torch.nn.Module, options: dict[str, Any], pattern: str) -> None:
    """CirbenchError unless ``--lora-targets`` names modules that LoRA adapts here: plain ``nn.Linear`` layers
    the block calls, or a whole ``nn.MultiheadAttention`` (peft's adapter). A projection inside a
    MultiheadAttention is refused: the fused attention call reads its weight directly, past the adapter."""
    modules = dict(visual.named_modules())
    attention = torch.nn.MultiheadAttention
    inside_attention = {f"{name}.{child}" for name, module in modules.items() if isinstance(module, attention)
                        for child, _ in module.named_modules() if child}

    def adaptable(name: str) -> bool:
        return isinstance(modules[name], (torch.nn.Linear, attention)) and name not in inside_attention

    block = next((name for name in modules if name.endswith(".0")), "")
    offered = sorted({n[len(block) + 1:] for n in modules if block and n.startswith(block + ".") and adaptable(n)})
    said = f"--lora-targets {options.get('lora_targets') or DEFAULT_TARGETS!r}"
    hint = f"the adaptable modules of a block are: {', '.join(offered) or '(none found)'}"
    matched = [name for name in modules if re.fullmatch(pattern, name)]
    if not matched:
        raise CirbenchError(f"{said} matches no module of the image tower; {hint}")
    refused = next((name for name in matched if not adaptable(name)), None)
    if refused is not None:
        kind = type(modules[refused]).__name__
        why = ("sits inside a MultiheadAttention, whose fused call bypasses a LoRA on it (adapt the attention itself)"
               if refused in inside_attention else f"is a {kind}, which LoRA does not adapt here")
        raise CirbenchError(f"{said}: {refused} {why}; {hint}")


def adapted_visual(backbone: Backbone, options: dict[str, Any]) -> torch.nn.Module:
    """A copy of the backbone's image tower with LoRA adapters injected (only adapters trainable)."""
    config = lora_config(options)
    _check_targets(backbone.model.visual, options, str(config.target_modules))
    visual = inject_adapter_in_model(config, copy.deepcopy(backbone.model.visual))
    for name, param in visual.named_parameters():
        param.requires_grad_("lora_" in name)
    return visual


class TATTrainable(TrainableMethod):
    """TAT: adapt the image tower so its features align with the frozen text tower's."""

    name = "slerp-tat"
    preprocess_kind = "clip"
    defaults = {"lr": 1e-4, "weight_decay": 0.01, "batch_size": 1024, "epochs": 1}

    def __init__(self, backbone: Backbone, options: dict[str, Any]):
        super().__init__(backbone, options)
        self.visual = adapted_visual(backbone, options).to(backbone.device)
        self.temperature = float(options.get("temperature", 0.01))

    def named_trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.visual.named_parameters() if p.requires_grad]

    def train_mode(self, training: bool) -> None:
        self.visual.train(training)

    def training_step(self, batch):
        image = self.visual(batch.pixels)
        with torch.no_grad():
            text = self.backbone.model.encode_text(self.backbone.tokenize(batch.captions))
        loss = contrastive_loss(image, text, self.temperature)
        return loss, {}

    def state_to_save(self) -> dict[str, torch.Tensor]:
        return get_peft_model_state_dict(self.visual)

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        result = set_peft_model_state_dict(self.visual, tensors)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise CheckpointError(f"TAT checkpoint has tensors this adapter does not: {unexpected[:3]}")

    def checkpoint_config(self) -> dict[str, Any]:
        n_train = sum(p.numel() for p in self.trainable_parameters())
        n_total = sum(p.numel() for p in self.visual.parameters())
        return {"lora": {k: self.options.get(k) for k in ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")},
                "trainable_parameters": n_train, "image_tower_parameters": n_total}


def load_tat_image_encoder(backbone: Backbone, checkpoint) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The backbone's image tower with a trained TAT adapter merged in, and the checkpoint's identity."""
    tensors, config = load_checkpoint(checkpoint, "slerp-tat", backbone.identity())
    options = config.get("options", {})
    visual = adapted_visual(backbone, options)
    model_keys = set(get_peft_model_state_dict(visual))
    if set(tensors) != model_keys:
        raise CheckpointError(f"checkpoint {checkpoint} does not fit this image tower: "
                              f"{len(set(tensors) - model_keys)} unexpected, {len(model_keys - set(tensors))} missing "
                              "LoRA tensors")
    set_peft_model_state_dict(visual, tensors)
    visual = visual.to(backbone.device).eval()
    for p in visual.parameters():
        p.requires_grad_(False)
    info = {"path": str(checkpoint), "sha256": checkpoint_sha256(checkpoint), "step": config.get("step"),
            "lora": config.get("lora")}
    return visual, info
