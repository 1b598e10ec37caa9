"""CLIP weights saved by transformers (``CLIPModel.save_pretrained``: a hub repository or a folder), read into
open_clip's CLIP.

Fine-tuned CLIPs are often published in transformers' layout (BGE-VL's MegaPairs models, for one); ``--pretrained
hf:REPO_OR_FOLDER`` loads them into the open_clip model ``--backbone`` names, so they run through the same encode
path, cache and preprocessing as every other backbone. The names map one to one, except that transformers keeps
the attention's query, key and value projections apart (open_clip's ``in_proj`` is their concatenation) and stores
both projections as ``Linear`` weights (open_clip's ``proj`` and ``text_projection`` are their transposes). The
activation comes from the checkpoint's config (``quick_gelu`` for weights descended from OpenAI's). The text
tower pools at the end-of-text token as open_clip does (transformers' first ``eos_token_id``, which open_clip's
tokenizer puts at the highest id), so the two give the same features (tested against transformers itself).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from .checkpoints import PRETRAINED_WEIGHTS, pretrained_weights_in
from .errors import CheckpointError
from .hub import split_revision
from .util import json_loads, one_line

_TOWER = {"vision_model": "visual.transformer", "text_model": "transformer"}
_BLOCK = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
          "self_attn.out_proj": "attn.out_proj"}
_PLAIN = {
    "logit_scale": "logit_scale",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
}
_TRANSPOSED = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}
_LAYER = re.compile(r"^(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def open_clip_state(tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """open_clip's CLIP state dict from a transformers ``CLIPModel`` one; CheckpointError naming the first tensor
    that is not a CLIP's."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.endswith("position_ids"):  # a buffer transformers saved in older releases
            continue
        if name in _PLAIN:
            out[_PLAIN[name]] = value
        elif name in _TRANSPOSED:
            out[_TRANSPOSED[name]] = value.t().contiguous()
        elif (m := _LAYER.match(name)) is not None:
            tower, layer, part, kind = m.groups()
            block = f"{_TOWER[tower]}.resblocks.{layer}"
            if part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((block, kind), {})[part[-6]] = value
            elif part in _BLOCK:
                out[f"{block}.{_BLOCK[part]}.{kind}"] = value
            else:
                raise CheckpointError(f"{source}: '{name}' is not a tensor of transformers' CLIPModel")
        else:
            raise CheckpointError(f"{source}: '{name}' is not a tensor of transformers' CLIPModel (a vision-only or "
                                  "text-only model, or another architecture?)")
    for (block, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{source}: {block} lacks the {', '.join(sorted({'q', 'k', 'v'} - set(parts)))} "
                                  "projection")
        out[f"{block}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def _hub_files(repo: str, revision: str | None) -> tuple[Path, Path]:
    """The config and weights of a hub repository (at ``revision`` when given): from the local hub cache, or
    downloaded."""
    from .hub import hub_file

    config = hub_file(repo, "config.json", f"the config of {repo}", option="pretrained", revision=revision)
    error: CheckpointError | None = None
    for name in PRETRAINED_WEIGHTS:
        try:
            return config, hub_file(repo, name, f"the weights of {repo}", option="pretrained", revision=revision)
        except CheckpointError as exc:  # a repository saved as .bin has no model.safetensors
            error = error or exc
    assert error is not None
    raise error


def files_of(source: str) -> tuple[Path, Path]:
    """``(config.json, weights)`` of ``hf:REPO_OR_FOLDER``: a folder as ``save_pretrained`` writes it, or a hub
    repository, ``hf:OWNER/NAME@REVISION`` at a branch, tag or commit (its cache, or a download); CheckpointError
    when either is missing."""
    name = source.removeprefix("hf:").strip()
    folder = Path(name).expanduser()
    if folder.is_dir():
        weights = pretrained_weights_in(folder)
        if not (folder / "config.json").is_file() or weights is None:
            raise CheckpointError(f"--pretrained {source}: the folder needs config.json and "
                                  f"{' or '.join(PRETRAINED_WEIGHTS)} (as CLIPModel.save_pretrained writes them)")
        return folder / "config.json", weights
    repo, revision = split_revision(name)
    if repo.count("/") != 1 or repo.startswith((".", "/", "~")) or revision == "":
        raise CheckpointError(f"--pretrained {source}: neither a folder nor a Hugging Face hub repository id "
                              "(owner/name, or owner/name@revision)")
    return _hub_files(repo, revision)


def read_config(path: Path, source: str) -> dict[str, Any]:
    try:
        config = json_loads(path.read_bytes())  # JSON bytes: UTF-8 (or -16/-32, a BOM), whatever the locale
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"--pretrained {source}: config.json is unreadable: {one_line(exc)}") from None
    if not isinstance(config, dict) or not isinstance(config.get("vision_config"), dict) or not isinstance(
            config.get("text_config"), dict):
        raise CheckpointError(f"--pretrained {source}: config.json is not a CLIPModel's (it needs vision_config "
                              "and text_config)")
    return config


def quick_gelu(config: dict[str, Any]) -> bool:
    """Whether the checkpoint's towers use QuickGELU (transformers' ``hidden_act``, ``quick_gelu`` by default)."""
    acts = {config[tower].get("hidden_act", "quick_gelu") for tower in ("vision_config", "text_config")}
    if len(acts) != 1 or not acts <= {"quick_gelu", "gelu"}:
        raise CheckpointError(f"CLIP checkpoint with activations {sorted(acts)}: open_clip builds quick_gelu or gelu, "
                              "the same in both towers")
    return acts == {"quick_gelu"}
