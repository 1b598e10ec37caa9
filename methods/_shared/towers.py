"""Tuned copies of a backbone's towers, for methods that fine-tune CLIP itself (RTD's text tower, PLI's two),
and :func:`last_loaded`, which keeps a method's big files loaded once across a sweep.

The backbone a method gets is shared (see :mod:`cirbench.method`): it is never changed in place. A method that
tunes a tower, or loads tuned weights into one, works on a *view* of the open_clip model: a shallow copy whose
named top-level parts (``visual``; the text tower's ``token_embedding``, ``positional_embedding``,
``transformer``, ``ln_final``, ``text_projection``, or a custom model's ``text``) are deep copies, everything
else the model's own. :func:`tuned_backbone` wraps a view as a :class:`~cirbench.backbones.Backbone` with a
text memo of its own, so that its features are never served for the shared model's, nor the other way round.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from cirbench.backbones import Backbone
from cirbench.checkpoints import check_fit

# open_clip's text tower: CLIP's own parts, or CustomTextCLIP's one ``text`` module
TEXT_PARTS = ("text", "token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
IMAGE_PARTS = ("visual",)


def tower_view(model: torch.nn.Module, parts: tuple[str, ...]) -> torch.nn.Module:
    """A view of the open_clip model whose top-level ``parts`` are copies of its own (to tune, or to load tuned
    weights into): everything else is the model's, shared, never changed."""
    view = copy.copy(model)
    for registry in ("_modules", "_parameters", "_buffers"):
        view.__dict__[registry] = dict(model.__dict__[registry])
    for name, module in model._modules.items():
        if name in parts and module is not None:
            view._modules[name] = copy.deepcopy(module)
    for name, param in model._parameters.items():
        if name in parts and param is not None:
            view._parameters[name] = torch.nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
    return view


def text_tower_copy(model: torch.nn.Module) -> torch.nn.Module:
    """:func:`tower_view` with a copy of the text tower."""
    return tower_view(model, TEXT_PARTS)


def in_parts(name: str, parts: tuple[str, ...]) -> bool:
    """Whether a state-dict entry ``name`` belongs to one of the top-level ``parts``."""
    return name.split(".", 1)[0] in parts


def part_state(view: torch.nn.Module, parts: tuple[str, ...] = TEXT_PARTS) -> dict[str, torch.Tensor]:
    """The entries of ``view``'s state dict that belong to ``parts`` (the tensors themselves)."""
    return {name: tensor for name, tensor in view.state_dict(keep_vars=True).items() if in_parts(name, parts)}


def part_parameters(view: torch.nn.Module,
                    parts: tuple[str, ...] = TEXT_PARTS) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in view.named_parameters() if in_parts(name, parts)]


@torch.no_grad()
def load_part_state(view: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str,
                    parts: tuple[str, ...] = TEXT_PARTS) -> None:
    """Copy saved ``parts`` into ``view``'s; CheckpointError naming the first tensor that does not fit."""
    own = part_state(view, parts)
    check_fit(own, tensors, source)
    for name, tensor in own.items():
        tensor.data.copy_(tensors[name].to(tensor.dtype))


def tuned_backbone(backbone: Backbone, view: torch.nn.Module) -> Backbone:
    """``backbone`` with ``view`` as its model: its features are the tuned towers' (its own text memo)."""
    return replace(backbone, model=view, _text_memo={}, _derived={}, feature_store=None)


def tuned_copy(backbone: Backbone, tensors: dict[str, torch.Tensor], source: str,
               parts: tuple[str, ...]) -> Backbone:
    """``backbone`` with copies of its ``parts`` holding a checkpoint's ``tensors`` for them, in evaluation mode
    (:func:`tower_view`, :func:`load_part_state`, :func:`tuned_backbone`): what a method evaluates tuned towers
    with. CheckpointError naming the first tensor that does not fit."""
    view = tower_view(backbone.model, parts)
    load_part_state(view, tensors, source, parts)
    return tuned_backbone(backbone, view.eval())


def last_loaded(backbone: Backbone, slot: str, path: Path | Sequence[Path], load: Callable[[], Any]) -> Any:
    """``load()``'s result for the checkpoint at ``path`` (or the files ``path`` lists, read together), kept on the
    backbone under ``slot`` while it is the last checkpoint loaded there (the same files: the same paths, sizes and
    modification times): the values of a sweep share one load, and a new checkpoint replaces the last (training's
    validation loads one at every step, and a copy of CLIP each would pile up)."""
    paths = [path] if isinstance(path, Path) else list(path)
    loaded = backbone.derived(slot, dict)
    identity = tuple((str(p.resolve()), (st.st_size, st.st_mtime_ns) if (st := _stat(p)) else None) for p in paths)
    if identity not in loaded:
        loaded.clear()
        loaded[identity] = load()
    return loaded[identity]


def _stat(path: Path) -> os.stat_result | None:
    return path.stat() if path.exists() else None
