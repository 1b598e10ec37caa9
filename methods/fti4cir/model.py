"""FTI4CIR: architecture, attribute selection, losses, checkpoints (cirbench and official), inference."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F

from cirbench.backbones import Backbone
from cirbench.checkpoints import checkpoint_sha256, is_official_file, load_checkpoint
from cirbench.errors import CirbenchError
from cirbench.method import Method, average_variants, capitalized_forward_text, caption_variants
from cirbench.methods._shared.captions import split_subject_attribute
from cirbench.methods._shared.textinv import (
    Phi,
    benchmark_prompt,
    clean_text,
    encode_with_pseudo_tokens,
    loaded_eval_net,
    nt_xent,
    placeholder_id,
    token_width,
    vision_tokens,
)
from cirbench.safe_unpickle import load_pickled_module_tensors
from cirbench.training import NetTrainable
from cirbench.types import Query
from cirbench.util import file_sha256

PLACEHOLDER = "*"
DEFAULTS = {"num_queries": 24, "max_attributes": 12, "threshold": 0.05, "layers": 3}

OFFICIAL_SUFFIXES = (".pt", ".pth", ".bin")  # the official release's checkpoint, read by the safe unpickler


class _Attention(torch.nn.Module):
    """Single-stream multi-head attention; names follow the official module (to_queries, to_keys_values, project)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_queries = torch.nn.Linear(dim, dim, bias=False)
        self.to_keys_values = torch.nn.Linear(dim, 2 * dim, bias=False)
        self.project = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = self.to_queries(x).reshape(b, n, self.heads, c // self.heads).transpose(1, 2)
        kv = self.to_keys_values(x).reshape(b, n, 2, self.heads, c // self.heads)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.project(out.transpose(1, 2).reshape(b, n, c))


class _Mlp(torch.nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = torch.nn.Linear(dim, hidden)
        self.fc2 = torch.nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class _Layer(torch.nn.Module):
    """Pre-LN transformer layer (norm1, attn, norm2, mlp), MLP ratio 2, ReLU."""

    def __init__(self, dim: int, heads: int = 1, mlp_ratio: float = 2.0):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.norm2 = torch.nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _Transformer(torch.nn.Module):
    def __init__(self, dim: int, layers: int):
        super().__init__()
        self.layers = torch.nn.ModuleList(_Layer(dim) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class FTI4CIRNet(torch.nn.Module):
    """The trained parts: ``templates`` (attribute queries), ``transformer``, ``local_atte_fc``, ``phi_s``,
    ``phi_a``."""

    def __init__(self, patch_dim: int, embed_dim: int, token_dim: int, options: dict[str, Any]):
        super().__init__()
        self.num_queries = int(options.get("num_queries", 24))
        self.max_attributes = int(options.get("max_attributes", 12))
        self.threshold = float(options.get("threshold", 0.05))
        self.templates = torch.nn.Parameter(torch.randn(1, self.num_queries, patch_dim))
        self.transformer = _Transformer(patch_dim, int(options.get("layers", 3)))
        self.local_atte_fc = torch.nn.Sequential(torch.nn.Linear(patch_dim, embed_dim), torch.nn.Sigmoid())
        self.phi_s = Phi(embed_dim, 4 * embed_dim, token_dim, dropout=0.5)
        self.phi_a = Phi(embed_dim, 4 * embed_dim, token_dim, dropout=0.5)

    def local_features(self, patches: torch.Tensor) -> torch.Tensor:
        """The ``num_queries`` latent attribute features ``[B, Q, embed_dim]`` (sigmoid outputs)."""
        queries = self.templates.expand(patches.shape[0], -1, -1).to(patches.dtype)
        out = self.transformer(torch.cat([queries, patches], dim=1))[:, : self.num_queries]
        return self.local_atte_fc(out)

    def select(self, local: torch.Tensor, global_feat: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """As the official ``get_img_local_attr_feats``: take the ``max_attributes`` (12) queries of highest
        softmax weight; the kept ones (weight > threshold, at least 1) come first in their original order, then
        the rest of the 12 by weight. Returns normalised features ``[B, max_attributes, D]`` and the kept
        counts (the orthogonality loss sees these 12, not all 24)."""
        weights = torch.softmax((local @ global_feat.unsqueeze(-1)).squeeze(-1), dim=1)
        by_weight = torch.argsort(weights, dim=1, descending=True)[:, : self.max_attributes]
        counts = (weights > self.threshold).sum(dim=1).clamp(1, self.max_attributes).tolist()
        rows = []
        for i, r in enumerate(counts):
            kept = torch.sort(by_weight[i, :r]).values
            rows.append(local[i, torch.cat([kept, by_weight[i, r:]])])
        return F.normalize(torch.stack(rows), dim=-1), counts


def build_net(backbone: Backbone, options: dict[str, Any]) -> FTI4CIRNet:
    most = int(options.get("max_attributes", 12))
    kept = int((backbone.tokenize([inference_prompt(most, "")]) == placeholder_id(backbone, PLACEHOLDER)).sum())
    if kept < most + 1:  # the prompt's pseudo-words must all fit in the text context
        raise CirbenchError(f"--max-attributes {most}: the prompt {inference_prompt(most, '')!r} does not fit in "
                            f"the text context of this backbone, which keeps {kept} of its {most + 1} pseudo-words; "
                            f"use --max-attributes {max(kept - 1, 1)} or less")
    patch_dim = int(backbone.model.visual.transformer.width)
    return FTI4CIRNet(patch_dim, backbone.embed_dim, token_width(backbone), options)


def pseudo_words(net: FTI4CIRNet, backbone: Backbone, pixels: torch.Tensor):
    """Subject word ``[B, W]``, attribute words ``[B, Q, W]`` (kept ones first), kept counts, and the
    intermediate features the losses need."""
    global_feat, patches = vision_tokens(backbone, pixels)
    local = net.local_features(patches)
    selected, counts = net.select(local, global_feat)
    return net.phi_s(global_feat), net.phi_a(selected), counts, global_feat, selected


def inference_prompt(count: int, caption: str) -> str:
    return f"a photo of {PLACEHOLDER} with {(PLACEHOLDER + ' ') * count}but {clean_text(caption, PLACEHOLDER)}"


def caption_variants_fti4cir(texts: tuple[str, ...]) -> list[str]:
    """One caption as is; FashionIQ: SEARLE's forward/reverse with the forward first caption through Python's
    ``str.capitalize`` (which also lowercases the rest of it), as FTI4CIR's ``evaluate.py`` writes it."""
    if len(texts) == 1:
        return [texts[0]]
    return [capitalized_forward_text(texts), caption_variants(texts)[1]]


def load_weights(path, backbone: Backbone) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """Tensors, architecture options and sha256 from a cirbench folder or the official pickled module."""
    if is_official_file(path, OFFICIAL_SUFFIXES):
        p = Path(path)
        tensors = {k.removeprefix("module."): v for k, v in load_pickled_module_tensors(p).items()}
        options = dict(DEFAULTS)
        if "templates" in tensors:
            options["num_queries"] = int(tensors["templates"].shape[1])
        options["layers"] = len({m.group(1) for k in tensors if (m := re.match(r"transformer\.layers\.(\d+)\.", k))})
        return tensors, options, file_sha256(p)
    tensors, config = load_checkpoint(path, "fti4cir", backbone.identity(), OFFICIAL_SUFFIXES)
    return tensors, {**DEFAULTS, **config.get("options", {})}, checkpoint_sha256(path)


class FTI4CIR(Method):
    """Query feature = text feature of "a photo of * with * .. * but {caption}" with the image's words."""

    def __init__(self, backbone, options, dataset=None):
        super().__init__(backbone, options, dataset)
        tensors, self.arch, self.sha256 = load_weights(options.get("checkpoint"), backbone)
        self.net = loaded_eval_net(build_net(backbone, self.arch), tensors, backbone, str(options.get("checkpoint")))

    def reference_feature_kind(self) -> dict:
        return {"kind": "fti4cir-pseudo-words", "checkpoint_sha256": self.sha256}

    @torch.no_grad()
    def encode_references(self, pixels: torch.Tensor) -> torch.Tensor:
        """Packed per image: row 0 the subject word, rows 1..max the kept attribute words (zero padded),
        and the last row's first value the kept count."""
        subject, attrs, counts, _, _ = pseudo_words(self.net, self.backbone, pixels)
        m = self.net.max_attributes
        packed = torch.zeros(subject.shape[0], m + 2, subject.shape[-1], device=subject.device)
        packed[:, 0] = subject
        for i, r in enumerate(counts):
            packed[i, 1 : 1 + r] = attrs[i, :r]
            packed[i, m + 1, 0] = r
        return packed

    @torch.no_grad()
    def compose(self, references: torch.Tensor, queries: list[Query]) -> torch.Tensor:
        m = self.net.max_attributes
        prompts, words, counts = [], [], []
        for packed, q in zip(references, queries, strict=True):
            r = int(packed[m + 1, 0])
            variants = caption_variants_fti4cir(q.texts)
            counts.append(len(variants))
            own = benchmark_prompt(q, f"{PLACEHOLDER} with " + " ".join([PLACEHOLDER] * r))
            if own is not None:  # the benchmark's prompt: the image's subject and attribute words at its '*'
                variants = [own]
                counts[-1] = 1
            for text in variants:
                prompts.append(text if own is not None else inference_prompt(r, text))
                words.append(packed[: 1 + r])
        return average_variants(encode_with_pseudo_tokens(self.backbone, prompts, words, PLACEHOLDER), counts)

    def info(self) -> dict:
        return {"checkpoint": str(self.options.get("checkpoint")), "sha256": self.sha256, "architecture": self.arch}


# -- training -----------------------------------------------------------------------------------------
class FTI4CIRTrainable(NetTrainable):
    """Contrastive(global, pseudo sentence) + orthogonality + reg_weight x (three caption regularisers)."""

    name = "fti4cir"
    preprocess_kind = "targetpad"
    # the official train.py defaults: AdamW(all parameters, lr 4e-5, weight decay 0.01), batch 256, 80 epochs
    # (--num_epochs; the README's command says 60 with flags its parser does not accept), lr x0.1 from epoch 10
    defaults = {"lr": 4e-5, "weight_decay": 0.01, "batch_size": 256, "epochs": 80, "schedule": "step",
                "step_epochs": (10,), "step_gamma": 0.1}

    def decays(self, name, param):
        return True  # the official optimizer decays every parameter, biases and norms included

    def __init__(self, backbone: Backbone, options: dict[str, Any]):
        super().__init__(backbone, options)
        self.net = build_net(backbone, options).to(backbone.device)

    def training_step(self, batch):
        subject, attrs, counts, global_feat, selected = pseudo_words(cast(FTI4CIRNet, self.net), self.backbone,
                                                                     batch.pixels)
        words = [torch.cat([subject[i : i + 1], attrs[i, :r]]) for i, r in enumerate(counts)]
        templates = [f"a photo of {PLACEHOLDER} with " + " ".join([PLACEHOLDER] * r) for r in counts]
        sentence = encode_with_pseudo_tokens(self.backbone, templates, words, PLACEHOLDER, normalize=False)
        contrast = nt_xent(global_feat, sentence, float(self.options.get("temperature", 0.2)))
        cos = selected @ selected.transpose(1, 2)
        ortho = F.mse_loss(cos, torch.eye(cos.shape[1], device=cos.device).expand_as(cos))
        subjects, attributes = self._subjects_attributes(batch)
        with torch.no_grad():
            # memoize=False: each caption's phrase is met once an epoch; memoised, a corpus's phrases would pile up
            # on the device for the whole run
            both_real = self.backbone.encode_text([f"a photo of {s} with {a}" for s, a in zip(subjects, attributes,
                                                                                              strict=True)],
                                                  memoize=False)
        subj_pseudo = encode_with_pseudo_tokens(
            self.backbone, [f"a photo of {PLACEHOLDER} with {clean_text(a, PLACEHOLDER)}" for a in attributes],
            subject, PLACEHOLDER)
        attr_pseudo = encode_with_pseudo_tokens(
            self.backbone, [f"a photo of {clean_text(s, PLACEHOLDER)} with " + " ".join([PLACEHOLDER] * r)
                            for s, r in zip(subjects, counts, strict=True)],
            [attrs[i, :r] for i, r in enumerate(counts)], PLACEHOLDER)
        reg = cast(torch.Tensor, sum((1 - F.cosine_similarity(f, both_real, dim=-1)).mean()
                                     for f in (subj_pseudo, attr_pseudo, F.normalize(sentence, dim=-1))))
        loss = contrast + ortho + float(self.options.get("reg_weight", 1.4)) * reg
        return loss, {"contrast": float(contrast.detach()), "ortho": float(ortho.detach()), "reg": float(reg.detach()),
                      "words": sum(counts) / len(counts)}

    def _subjects_attributes(self, batch) -> tuple[list[str], list[str]]:
        if batch.extra.get("subject") and batch.extra.get("attribute") and all(batch.extra["subject"]):
            return list(batch.extra["subject"]), list(batch.extra["attribute"])
        pairs = [split_subject_attribute(c) for c in batch.captions]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def checkpoint_config(self):
        return {"architecture": {k: self.options.get(k) for k in DEFAULTS}}
