"""Context-I2W: the context-dependent mapping network, its prompts, checkpoints (cirbench and official), training.

Follows the official repository (github.com/Pter61/context-i2w: ``model/model.py`` ``IM2TEXT_OWM_Attn``,
``src/eval_utils.py``, ``src/trainer.py``). What its code does, as this port does it:

* The context ``c`` is CLIP's text feature (projected, not normalised) of the very prompt the pseudo-word goes
  into, with the official ``<|replace|>`` token where the image goes. That token is not a new embedding: the
  official tokenizer drops the last BPE merge of CLIP's vocabulary and gives its id (``vocab_size - 3``, 49405)
  to ``<|replace|>``, so ``c`` reads the trained embedding row 49405 (the merge ``jekyll</w>``) there. This port
  writes that row at the prompt's ``*`` (so the only words that tokenize otherwise are those that used the
  dropped merge, i.e. "jekyll").
* Intent View Selector: the vision tokens before ``ln_post`` pass a weight-normalised linear map ``W_R`` and are
  multiplied, channel by channel, by ``to_c(c)``.
* Visual Target Extractor: 4 learned latents attend (6 layers, 8 heads of 64, keys/values from the tokens and the
  latents, then a 4x GELU feed-forward) over the patch tokens; their mean is the local feature.
* The global feature (the class token through ``ln_post``/``proj`` and Pic2Word's MLP) plus ``tanh(local_gate)``
  times the local feature (through ``ln_post_local``/``proj_local`` and its own MLP) is the pseudo-word, which
  replaces the placeholder of Pic2Word's prompts ("a photo of * , {caption}").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cirbench.backbones import Backbone
from cirbench.checkpoints import checkpoint_sha256, is_official_file, load_checkpoint
from cirbench.errors import CheckpointError, CirbenchError
from cirbench.method import Method
from cirbench.methods._shared.captions import english_parser, mask_subject
from cirbench.methods._shared.textinv import (
    Pic2WordFamilyTrainable,
    clean_text,
    encode_with_pseudo_tokens,
    loaded_eval_net,
    pic2word_prompt,
    token_embedding_module,
    token_width,
    vision_tokens,
)
from cirbench.safe_unpickle import load_state_dict
from cirbench.types import Query
from cirbench.util import file_sha256

PLACEHOLDER = "*"
OFFICIAL_SUFFIXES = (".pt", ".pth", ".bin")  # the official release's checkpoint, read by the safe unpickler
DEFAULTS = {"middle_dim": 512, "n_layer": 2, "dropout": 0.1, "num_latents": 4, "depth": 6, "heads": 8,
            "dim_head": 64, "ff_mult": 4}
MASK_MARKS = ("<|replace|>", PLACEHOLDER)  # how a corpus's masked caption marks the subject's name


def replace_row(backbone: Backbone) -> torch.Tensor:
    """The token embedding the official ``<|replace|>`` id reads: row ``vocab_size - 3`` (see the module doc)."""
    weight = token_embedding_module(backbone.model).weight
    return weight[weight.shape[0] - 3].detach()


class WeightNormLinear(torch.nn.Module):
    """A bias-free ``Linear`` under weight normalisation (``torch.nn.utils.weight_norm(dim=0)``): weight =
    ``weight_g * weight_v / ||weight_v||`` row by row, with the official parameter names."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        v = torch.nn.Linear(dim_in, dim_out, bias=False).weight.detach().clone()
        self.weight_v = torch.nn.Parameter(v)
        self.weight_g = torch.nn.Parameter(v.norm(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)
        return F.linear(x, weight)


class ContextAttention(torch.nn.Module):
    """The latents attend over the tokens and themselves (the official ``ContextDependantAttention``)."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.norm_media = torch.nn.LayerNorm(dim)
        self.norm_latents = torch.nn.LayerNorm(dim)
        self.to_q = torch.nn.Linear(dim, inner, bias=False)
        self.to_kv = torch.nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = torch.nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm_media(x), self.norm_latents(latents)
        b, h = x.shape[0], self.heads
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.reshape(b, t.shape[1], h, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(dim_head)) v, as the official einsums
        return self.to_out(out.transpose(1, 2).reshape(b, latents.shape[1], -1))


def _feed_forward(dim: int, mult: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.LayerNorm(dim), torch.nn.Linear(dim, dim * mult, bias=False), torch.nn.GELU(),
                               torch.nn.Linear(dim * mult, dim, bias=False))


class VisualTargetExtractor(torch.nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, num_latents: int, ff_mult: int):
        super().__init__()
        self.latents = torch.nn.Parameter(torch.randn(num_latents, dim))
        self.layers = torch.nn.ModuleList(
            torch.nn.ModuleList([ContextAttention(dim, heads, dim_head), _feed_forward(dim, ff_mult)])
            for _ in range(depth))
        self.norm = torch.nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, dim]`` tokens -> ``[B, num_latents, dim]``."""
        latents = self.latents.to(x.dtype).expand(x.shape[0], -1, -1)
        for attend, feed_forward in self.layers:  # type: ignore[misc]
            latents = attend(x, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm(latents)


def _mlp(dim_in: int, middle: int, n_layer: int, dropout: float) -> torch.nn.Sequential:
    """Pic2Word's ``Linear-Dropout-ReLU`` blocks (``layers.0.0``, ``layers.1.0``, ...)."""
    blocks, dim = [], dim_in
    for _ in range(n_layer):
        blocks.append(torch.nn.Sequential(torch.nn.Linear(dim, middle), torch.nn.Dropout(dropout), torch.nn.ReLU()))
        dim = middle
    return torch.nn.Sequential(*blocks)


class ContextI2WNet(torch.nn.Module):
    """The official ``IM2TEXT_OWM_Attn``; parameter names follow it, so its released state dict loads as it is."""

    def __init__(self, context_dim: int, vision_width: int, token_dim: int, options: dict[str, Any]):
        super().__init__()
        o = {**DEFAULTS, **options}
        middle, n_layer, dropout = int(o["middle_dim"]), int(o["n_layer"]), float(o["dropout"])
        self.to_c = torch.nn.Linear(context_dim, vision_width, bias=False)
        self.W_R = WeightNormLinear(vision_width, vision_width)
        scale = vision_width ** -0.5
        self.ln_post = torch.nn.LayerNorm(vision_width)
        self.ln_post_local = torch.nn.LayerNorm(vision_width)
        self.proj = torch.nn.Parameter(scale * torch.randn(vision_width, token_dim))
        self.proj_local = torch.nn.Parameter(scale * torch.randn(vision_width, token_dim))
        self.VT_Extractor = VisualTargetExtractor(vision_width, int(o["depth"]), int(o["heads"]), int(o["dim_head"]),
                                                  int(o["num_latents"]), int(o["ff_mult"]))
        self.layers = _mlp(token_dim, middle, n_layer, dropout)
        self.fc_out = torch.nn.Linear(middle, token_dim)
        self.layers_local = _mlp(token_dim, middle, n_layer, dropout)
        self.fc_out_local = torch.nn.Linear(middle, token_dim)
        self.local_gate = torch.nn.Parameter(torch.zeros(1))

    def forward(self, context: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """One pseudo-word ``[B, token_dim]`` from the context text features ``[B, D]`` and the vision tokens
        before ``ln_post`` ``[B, 1 + patches, width]``."""
        x = self.W_R(tokens) * self.to_c(context).unsqueeze(1)  # the Intent View Selector
        local = self.VT_Extractor(x[:, 1:]).mean(dim=1)  # the official AvgPool2d((num_latents, 1)) over the latents
        global_word = self.fc_out(self.layers(self.ln_post(x[:, 0]) @ self.proj))
        local_word = self.fc_out_local(self.layers_local(self.ln_post_local(local) @ self.proj_local))
        return global_word + local_word * torch.tanh(self.local_gate)


def build_net(backbone: Backbone, options: dict[str, Any]) -> ContextI2WNet:
    width = getattr(getattr(backbone.model.visual, "transformer", None), "width", None)
    if width is None:
        raise CirbenchError(f"context-i2w maps the tokens of a ViT image tower; {backbone.model_name} has none")
    return ContextI2WNet(backbone.embed_dim, int(width), token_width(backbone), options)


def architecture_of(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The architecture options a state dict was trained with (the official one's are the defaults)."""
    def count(prefix: str) -> int:
        return len({k[len(prefix):].split(".")[0] for k in tensors if k.startswith(prefix)})

    arch = dict(DEFAULTS)
    if "layers.0.0.weight" in tensors:
        arch["middle_dim"] = int(tensors["layers.0.0.weight"].shape[0])
        arch["n_layer"] = count("layers.")
    if "VT_Extractor.latents" in tensors:
        arch["num_latents"] = int(tensors["VT_Extractor.latents"].shape[0])
        arch["depth"] = count("VT_Extractor.layers.")
    q = tensors.get("VT_Extractor.layers.0.0.to_q.weight")
    if q is not None:
        arch["heads"] = max(1, int(q.shape[0]) // int(arch["dim_head"]))
    ff = tensors.get("VT_Extractor.layers.0.1.1.weight")
    if ff is not None:
        arch["ff_mult"] = max(1, int(ff.shape[0]) // int(ff.shape[1]))
    return arch


def load_weights(path, backbone: Backbone) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """Tensors, architecture options and sha256 from a cirbench folder or the official checkpoint (a dict holding
    ``state_dict_img2text``, its names under ``module.`` when saved from DistributedDataParallel)."""
    if is_official_file(path, OFFICIAL_SUFFIXES):
        p = Path(path)
        tensors = {k.removeprefix("module."): v for k, v in load_state_dict(p, "state_dict_img2text").items()}
        if "to_c.weight" not in tensors:
            raise CheckpointError(f"checkpoint {p} holds a mapping network without a context (no to_c): a Pic2Word "
                                  "checkpoint? Run it with --method pic2word")
        renamed = {"W_R.parametrizations.weight.original0": "W_R.weight_g",  # torch.nn.utils.parametrizations
                   "W_R.parametrizations.weight.original1": "W_R.weight_v"}
        tensors = {renamed.get(k, k): v for k, v in tensors.items()}
        return tensors, architecture_of(tensors), file_sha256(p)
    tensors, config = load_checkpoint(path, "context-i2w", backbone.identity(), OFFICIAL_SUFFIXES)
    return tensors, {**config.get("options", {}), **architecture_of(tensors)}, checkpoint_sha256(path)


def context_features(backbone: Backbone, prompts: list[str]) -> torch.Tensor:
    """The official ``c``: text features (unnormalised) of the prompts with ``<|replace|>``'s row at their ``*``.
    A long training caption whose mask lies beyond the text context loses it as the official tokenizer's
    truncation does: its ``c`` is the cut caption's feature."""
    row = replace_row(backbone)
    return encode_with_pseudo_tokens(backbone, prompts, row.expand(len(prompts), -1), PLACEHOLDER, normalize=False,
                                     drop_cut=True)


class ContextI2W(Method):
    """Query feature = text feature of Pic2Word's prompt holding a pseudo-word mapped from the reference image's
    tokens under the prompt's own context."""

    def __init__(self, backbone, options, dataset=None):
        super().__init__(backbone, options, dataset)
        tensors, self.arch, self.sha256 = load_weights(options.get("checkpoint"), backbone)
        self.net = loaded_eval_net(build_net(backbone, self.arch), tensors, backbone, str(options.get("checkpoint")))

    def reference_feature_kind(self) -> dict:
        # the tokens alone, not the checkpoint: every Context-I2W checkpoint on this backbone shares them
        return {"kind": "vision-tokens-before-ln-post"}

    @torch.no_grad()
    def encode_references(self, pixels: torch.Tensor) -> torch.Tensor:
        return vision_tokens(self.backbone, pixels)[1]

    @torch.no_grad()
    def compose(self, references: torch.Tensor, queries: list[Query]) -> torch.Tensor:
        prompts = [pic2word_prompt(q, PLACEHOLDER) for q in queries]
        context = context_features(self.backbone, prompts)
        words = self.net(context.float(), references.to(self.backbone.device).float())
        return encode_with_pseudo_tokens(self.backbone, prompts, words, PLACEHOLDER)

    def info(self) -> dict:
        return {"checkpoint": str(self.options.get("checkpoint")), "sha256": self.sha256, "architecture": self.arch}


def masked_prompt(caption: str, masked: str | None) -> str:
    """The training caption with its subject's name replaced by ``*``: the corpus's ``masked_caption`` (marked with
    ``<|replace|>`` as the official CSV's, or ``*``), else the first noun by spaCy's parser; a one-line error when
    the masked caption marks nothing, or when there is none and no parser to find the subject."""
    if masked:
        for mark in MASK_MARKS:
            if mark in masked:
                before, _, after = masked.partition(mark)
                return f"{clean_text(before, PLACEHOLDER)} {PLACEHOLDER} {clean_text(after, PLACEHOLDER)}".strip()
        raise CirbenchError(f"the masked_caption {masked!r} marks no subject: write its name as <|replace|> or *")
    found = mask_subject(clean_text(caption, PLACEHOLDER), PLACEHOLDER)
    if found is None:
        why = ("spaCy's en_core_web_sm, which would find it, is not installed" if english_parser() is None else
               "spaCy finds no noun in it")
        raise CirbenchError(f"context-i2w trains on captions whose subject is masked: the caption {caption!r} has no "
                            f"masked_caption column (its subject's name as <|replace|> or *) and {why}")
    return found


class ContextI2WTrainable(Pic2WordFamilyTrainable):
    """Train the mapping so that "a photo of *" holding the pseudo-word, mapped under the context of the caption
    whose subject is masked, matches the image (CLIP frozen; the official ``get_loss_img2text_replace_token``)."""

    name = "context-i2w"
    # the official src/params.py defaults (its README gives no training command): AdamW with get_default_params'
    # ViT settings (lr 5e-4; betas and eps as Pic2WordFamilyTrainable's), weight decay 0.2, 32 epochs, a cosine
    # schedule after 10,000 warm-up steps, 64 pairs per GPU (ours: the global batch)
    defaults = {"lr": 5e-4, "weight_decay": 0.2, "batch_size": 64, "epochs": 32, "warmup_steps": 10000,
                "schedule": "cosine"}

    def __init__(self, backbone: Backbone, options: dict[str, Any]):
        super().__init__(backbone, options)
        self.net = build_net(backbone, options).to(backbone.device)

    def training_step(self, batch):
        masked = batch.extra.get("masked_caption") or [None] * len(batch)
        prompts = [masked_prompt(caption, m) for caption, m in zip(batch.captions, masked, strict=True)]
        image, tokens = vision_tokens(self.backbone, batch.pixels)
        with torch.no_grad():
            context = context_features(self.backbone, prompts)
        loss = self.photo_of_loss(image, self.net(context.float(), tokens))
        return loss, {"gate": float(torch.tanh(self.net.local_gate.detach()))}

    def checkpoint_config(self):
        return {"architecture": {k: self.options.get(k, v) for k, v in DEFAULTS.items()}}
