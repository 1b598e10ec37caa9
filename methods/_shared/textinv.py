"""Encoding prompts whose placeholder words are replaced by pseudo-word embeddings (textual inversion).

Pic2Word, SEARLE and FTI4CIR map an image to one or more token embeddings and write them into a prompt
("a photo of * , {caption}"). :func:`encode_with_pseudo_tokens` tokenizes the prompts, and a forward hook
on the text tower's token-embedding module swaps the embedding at each placeholder position for the next
pseudo-word of that prompt, so the rest of open_clip's own ``encode_text`` (positional embedding, causal
transformer, final norm, end-of-text pooling, projection) runs unchanged, for the built-in text tower and
for ``model.text`` towers alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cirbench.backbones import Backbone
from cirbench.checkpoints import load_module_weights  # noqa: F401 - re-exported for methods
from cirbench.errors import CirbenchError

PLACEHOLDERS = ("*", "$")


def token_embedding_module(model) -> torch.nn.Embedding:
    tower = getattr(model, "text", None) or model
    module = getattr(tower, "token_embedding", None)
    if module is None:
        raise CirbenchError(f"{type(model).__name__} has no token embedding: textual inversion needs a CLIP text tower")
    return module


def token_width(backbone: Backbone) -> int:
    """The width of the text tower's token embeddings (the pseudo-word size)."""
    return int(token_embedding_module(backbone.model).weight.shape[1])


def placeholder_id(backbone: Backbone, placeholder: str) -> int:
    """The token id a lone placeholder word gets (e.g. ``*`` -> ``*</w>``)."""
    ids = backbone.tokenizer([placeholder])[0].tolist()
    inner = [i for i in ids[1:] if i != 0][:-1]  # drop start, padding and end tokens
    if len(inner) != 1:
        raise CirbenchError(f"placeholder {placeholder!r} is not a single token for this tokenizer")
    return inner[0]


def clean_text(text: str, placeholder: str) -> str:
    """Remove stray placeholder characters from user text, so that only the prompt's placeholders count."""
    return text.replace(placeholder, " ").strip()


def encode_with_pseudo_tokens(
    backbone: Backbone,
    prompts: Sequence[str],
    pseudo: torch.Tensor | Sequence[torch.Tensor],
    placeholder: str = "*",
    normalize: bool = True,
) -> torch.Tensor:
    """Text features of ``prompts`` with the k-th ``placeholder`` of prompt i replaced by ``pseudo[i][k]``.

    ``pseudo`` is a ``[B, P, width]`` tensor (every prompt has P placeholders), a ``[B, width]`` tensor (one
    each), or a list of ``[n_i, width]`` tensors (any number per prompt). Gradients flow into ``pseudo``.
    """
    tokens = backbone.tokenize(list(prompts))
    pid = placeholder_id(backbone, placeholder)
    mask = tokens == pid
    if isinstance(pseudo, torch.Tensor):
        rows = list(pseudo.unsqueeze(1) if pseudo.ndim == 2 else pseudo)
    else:
        rows = list(pseudo)
    if len(rows) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(rows)} pseudo-token rows")
    counts = mask.sum(dim=1).tolist()
    for i, (row, n) in enumerate(zip(rows, counts, strict=True)):
        if row.shape[0] != n:
            raise ValueError(f"prompt {i} has {n} placeholders '{placeholder}' (after truncation) but "
                             f"{row.shape[0]} pseudo-words were given: {prompts[i]!r}")
    flat = torch.cat([r.reshape(-1, r.shape[-1]) for r in rows]) if rows else None
    module = token_embedding_module(backbone.model)

    def substitute(_module, _inputs, output):
        if flat is None or flat.numel() == 0:
            return output
        output = output.clone()
        output[mask] = flat.to(device=output.device, dtype=output.dtype)
        return output

    handle = module.register_forward_hook(substitute)
    try:
        with backbone.autocast():
            feats = backbone.model.encode_text(tokens)
    finally:
        handle.remove()
    feats = feats.float()
    return torch.nn.functional.normalize(feats, dim=-1) if normalize else feats


class Phi(torch.nn.Module):
    """SEARLE-style mapping network ``Linear-GELU-Dropout-Linear-GELU-Dropout-Linear``.

    Parameter names (``layers.0``, ``layers.3``, ``layers.6``) follow the official SEARLE/FTI4CIR modules,
    so their released state dicts load as they are.
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, dropout: float = 0.5):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_dim, hidden_dim), torch.nn.GELU(), torch.nn.Dropout(dropout),
            torch.nn.Linear(hidden_dim, hidden_dim), torch.nn.GELU(), torch.nn.Dropout(dropout),
            torch.nn.Linear(hidden_dim, output_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def raw_image_features(backbone: Backbone, pixels: torch.Tensor) -> torch.Tensor:
    """CLIP image embeddings *before* normalisation (what Pic2Word/SEARLE/FTI4CIR map to pseudo-words)."""
    pixels = pixels.to(backbone.device, non_blocking=True)
    with torch.no_grad(), backbone.autocast():
        return backbone.model.encode_image(pixels).float()


class RawImageReferences:
    """Method mixin: reference images are encoded as raw (unnormalised) CLIP embeddings, the input of the
    mapping networks of Pic2Word and SEARLE; every method using it shares those cached features."""

    backbone: Backbone

    def reference_feature_kind(self) -> dict:
        return {"kind": "image-global-raw"}

    def encode_references(self, pixels: torch.Tensor) -> torch.Tensor:
        return raw_image_features(self.backbone, pixels)
