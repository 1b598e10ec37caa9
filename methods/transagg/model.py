"""TransAgg: its head, CLIP's token features as the official model returns them, checkpoints, training.

Follows the official repository (github.com/Code-kunkun/ZS-CIR: ``model/model.py`` ``TransAgg``, the modified
``model/clip/model.py`` that also returns every token's feature, ``trainer.py``, ``utils.py``, ``config.py``),
checked against a transcription of ``combine_features`` and of the training loss (tests/test_transagg.py):

* the reference image's tokens are CLIP's last vision layer's tokens through ``ln_post`` and the projection (the
  class token's is the image feature); the text's are the text tower's tokens through ``ln_final`` and the
  projection (the end token's is the text feature);
* the fusion input is ``[text tokens (77), separator, image tokens]``; its key-padding mask is the official
  ``torch.cat`` of the text's padding (``token == 0``, a bool) with the image's zeros (a float): the result is a
  *float* mask, which ``nn.MultiheadAttention`` adds to the attention logits, so the padding is attended to with
  a bias of +1, not masked out. That is what the official torch 1.12 computes in training and in evaluation (its
  inference fast path skips pre-norm layers); later versions' fast path, taken without gradients, reads a float
  key-padding mask as a boolean one and drops the padding instead. cirbench builds the same mask and runs the
  fusion with torch's fast path off (:func:`official_attention`), so the query is the official one on any torch;
* query = ``normalize(w1 text + w2 f_U + w3 image)``, ``f_U = output(dropout(relu(combiner([img_rep, text_rep]))))``,
  ``(w1, w2, w3) = weighted(f_U)`` (no softmax), the image and text features raw.

Training (the official ``Trainer.train_epoch`` with its ``Config``): cross-entropy of ``100 q . normalize(target)``
over the batch, AdamW (lr 1e-4 for the head, 1e-6 for the tuned towers, weight decay 0.05 on every parameter,
eps 1e-8), gradients clipped at norm 5, a cosine schedule stepped every iteration over 100 epochs down to 1e-6
(torch's ``eta_min``, which is also the towers' lr: theirs stays 1e-6), batch 64, images through ``targetpad``
(ratio 1.25), CLIP's image tower frozen and its text tower tuned (``--tune``). The official AMP (fp16) run is
``--precision fp16``; cirbench's global batch gathers every rank's, where the official trains on one GPU.
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
from cirbench.checkpoints import check_fit, checkpoint_sha256, is_official_file, load_checkpoint, load_module_weights
from cirbench.errors import CheckpointError, CirbenchError
from cirbench.method import Method, capitalized_forward_text
from cirbench.methods._shared.textinv import image_and_tokens, output_during
from cirbench.methods._shared.towers import (
    IMAGE_PARTS,
    TEXT_PARTS,
    in_parts,
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
TOWER_PREFIX = "pretrained_model."  # the official module's CLIP, whose parameter names are open_clip's
TUNED = {"text": TEXT_PARTS, "both": IMAGE_PARTS + TEXT_PARTS, "neither": ()}
LOGIT_SCALE = 100.0  # the official fixed logit scale
HEADS = 8


@contextlib.contextmanager
def official_attention() -> Iterator[None]:
    """torch's transformer layers without their inference fast path (see the module docstring): a float key-padding
    mask is then added to the logits, as torch 1.12 added it for a pre-norm layer."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


class Head(torch.nn.Module):
    """The official TransAgg without its CLIP: ``fusion`` (``nn.TransformerEncoder``, pre-norm, GELU, 8 heads),
    ``combiner_layer``, ``weighted_layer``, ``output_layer``, ``sep_token``; names as the official state dict's."""

    def __init__(self, dim: int, layers: int = 2, dropout: float = 0.5):
        super().__init__()
        layer = torch.nn.TransformerEncoderLayer(d_model=dim, nhead=HEADS, dropout=dropout, batch_first=True,
                                                 norm_first=True, activation="gelu")
        self.fusion = torch.nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
        self.dropout = torch.nn.Dropout(dropout)
        self.combiner_layer = torch.nn.Linear(2 * dim, 8 * dim)
        self.weighted_layer = torch.nn.Linear(dim, 3)
        self.output_layer = torch.nn.Linear(8 * dim, dim)
        self.sep_token = torch.nn.Parameter(torch.randn(1, 1, dim))

    def forward(self, text_tokens: torch.Tensor, tokens: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """The normalised query from the text's projected token features ``[B, L, D]`` (its token ids ``tokens``
        ``[B, L]``) and the reference image's ``[B, N, D]`` (the class token's first)."""
        batch, length = tokens.shape
        text_tokens, image_tokens = text_tokens.float(), image_tokens.float()
        combined = torch.cat([text_tokens, self.sep_token.expand(batch, -1, -1), image_tokens], dim=1)
        # the official mask: bool padding concatenated with float zeros is a float mask, added to the logits
        mask = torch.cat([(tokens == 0).float(), combined.new_zeros(batch, image_tokens.shape[1] + 1)], dim=1)
        with official_attention():
            out = self.fusion(combined, src_key_padding_mask=mask)
        end = tokens.argmax(dim=-1)
        image_rep, text_rep = out[:, length + 1], out[torch.arange(batch, device=out.device), end]
        fused = self.output_layer(self.dropout(F.relu(self.combiner_layer(torch.cat([image_rep, text_rep], -1)))))
        w = self.weighted_layer(fused)
        text = text_tokens[torch.arange(batch, device=out.device), end]
        query = w[:, 0:1] * text + w[:, 1:2] * fused + w[:, 2:3] * image_tokens[:, 0]
        return F.normalize(query, dim=-1)


def check_towers(model: torch.nn.Module, name: str) -> None:
    """That ``model`` is a CLIP whose token features TransAgg reads as the official code does (OpenAI's layout:
    a ViT whose class token is pooled after ``ln_post``, a text tower of its own); a one-line error otherwise."""
    visual = getattr(model, "visual", None)
    if visual is None or not hasattr(visual, "transformer") or getattr(visual, "proj", None) is None or \
            getattr(visual, "attn_pool", None) is not None or getattr(visual, "final_ln_after_pool", False) or \
            getattr(visual, "pool_type", "tok") != "tok" or getattr(model, "text", None) is not None or \
            not hasattr(model, "ln_final"):
        raise CirbenchError(f"transagg reads the token features of a CLIP laid out as OpenAI's (a ViT pooling its "
                            f"class token, a text tower of its own); {name} is not")


def image_token_features(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Every image token's feature ``[B, N, D]`` as the official modified CLIP returns it: the last vision layer's
    tokens through ``ln_post`` and the projection (row 0, the class token's, is the image feature)."""
    _, tokens = image_and_tokens(model, pixels)
    return model.visual.ln_post(tokens) @ model.visual.proj


def text_token_features(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Every text token's feature ``[B, L, D]``: the text tower's tokens through ``ln_final`` and the projection (the
    end token's is the text feature)."""
    _, out = output_during(model.ln_final, lambda: model.encode_text(tokens))
    projection = model.text_projection
    return projection(out) if isinstance(projection, torch.nn.Module) else out @ projection


def query_text(query: Query) -> str:
    """The official evaluation's text (``trainer.py``'s ``compute_fiq_val_metrics``): FashionIQ's two captions as
    :func:`~cirbench.method.capitalized_forward_text` joins them, any other benchmark's as it is."""
    return capitalized_forward_text(query.texts) if len(query.texts) <= 2 else " and ".join(query.texts)


def split_state(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the head's tensors, the CLIP's under ``pretrained_model.`` with the prefix dropped)."""
    named = {k.removeprefix("module."): v for k, v in tensors.items()}  # DDP's prefix dropped
    head = {k: v for k, v in named.items() if not k.startswith(TOWER_PREFIX)}
    towers = {k.removeprefix(TOWER_PREFIX): v for k, v in named.items() if k.startswith(TOWER_PREFIX)}
    return head, towers


def changed_parts(backbone: Backbone, towers: dict[str, torch.Tensor], source: str) -> tuple[str, ...]:
    """The parts of CLIP the checkpoint holds other weights for than the backbone's (its tuned towers). The
    official file holds all of CLIP: a tower equal to the backbone's was frozen."""
    own = backbone.model.state_dict()
    changed = []
    for parts in (IMAGE_PARTS, TEXT_PARTS):
        mine = {k: v for k, v in towers.items() if in_parts(k, parts)}
        if not mine:
            continue
        theirs = {k: v for k, v in own.items() if in_parts(k, parts)}
        check_fit(theirs, mine, source)
        if any(not torch.equal(mine[k].to(v.dtype).cpu(), v.detach().cpu()) for k, v in theirs.items()):
            changed.extend(parts)
    return tuple(changed)


def head_options(head: dict[str, torch.Tensor]) -> dict[str, int]:
    layers = {k.split(".")[2] for k in head if k.startswith("fusion.layers.")}
    return {"layers": len(layers) or 2}


def load_weights(path: Any, backbone: Backbone) -> dict[str, Any]:
    """The head (built and loaded), the tuned towers' tensors and what the result file records, from the official
    ``.pth`` or a cirbench folder."""
    if path is None:
        raise CheckpointError("transagg needs --checkpoint: the official .pth (linked from "
                              "github.com/Code-kunkun/ZS-CIR) or a folder of `cirbench train --method transagg`")
    if is_official_file(path, OFFICIAL_SUFFIXES):
        p = Path(path)
        head, towers = split_state(load_state_dict(p))
        if "combiner_layer.weight" not in head:
            raise CheckpointError(f"checkpoint {p} has no combiner_layer: not a TransAgg checkpoint")
        if any(k.startswith(("visual_encoder.", "text_encoder.")) for k in towers):
            raise CheckpointError(f"checkpoint {p} is a TransAgg of BLIP (visual_encoder, text_encoder): not an "
                                  "open_clip model; cirbench runs TransAgg's CLIP checkpoints")
        record = {"checkpoint": str(p), "sha256": file_sha256(p), "format": "official"}
        arch = head_options(head)
    else:
        tensors, config = load_checkpoint(path, "transagg", backbone.identity(), OFFICIAL_SUFFIXES)
        head, towers = split_state(tensors)
        arch = {"layers": int((config.get("options") or {}).get("layers", 2))}
        record = {"checkpoint": str(path), "sha256": checkpoint_sha256(path), "format": "cirbench"}
    check_towers(backbone.model, backbone.model_name)
    net = Head(backbone.embed_dim, arch["layers"])
    load_module_weights(net, head, str(path))
    tuned = changed_parts(backbone, towers, str(path))
    record["tuned"] = "both" if IMAGE_PARTS[0] in tuned else "text" if tuned else "neither"
    return {"head": net.to(backbone.device).eval(), "towers": {k: v for k, v in towers.items() if in_parts(k, tuned)},
            "parts": tuned, "record": {**record, "architecture": arch}}


def load_model(path: Path, backbone: Backbone) -> dict[str, Any]:
    """:func:`load_weights`, with the tuned towers in a view of the backbone's model."""
    loaded = load_weights(path, backbone)
    towers = loaded.pop("towers")
    loaded["backbone"] = tuned_copy(backbone, towers, str(path), loaded["parts"]) if loaded["parts"] else backbone
    return loaded


def downloads(options: dict, model: str, pretrained: str) -> list[tuple[str, str]]:
    """MethodSpec.downloads of ``TransAgg``: nothing fetched (the checkpoints sit on Google Drive), no run without
    --checkpoint."""
    if options.get("checkpoint") is None:
        raise CheckpointError("transagg needs --checkpoint: the official .pth (from the Google Drive folder linked by "
                              "github.com/Code-kunkun/ZS-CIR) or a folder of `cirbench train --method transagg "
                              "--corpus TRIPLETS.csv --output DIR`")
    return []


class TransAgg(Method):
    """Query = the head over the reference image's and the text's CLIP tokens (tuned towers where the checkpoint
    tuned them); gallery = CLIP's image feature (the tuned image tower's, when it was tuned)."""

    def __init__(self, backbone, options, dataset=None):
        super().__init__(backbone, options, dataset)
        downloads(options, backbone.model_name, backbone.pretrained)
        path = Path(options["checkpoint"]).expanduser()
        self.loaded = last_loaded(backbone, "transagg", path, lambda: load_model(path, backbone))
        self.tuned: Backbone = self.loaded["backbone"]

    def gallery_feature_kind(self) -> dict:
        if IMAGE_PARTS[0] not in self.loaded["parts"]:  # the backbone's own image tower: everyone's features
            return {"kind": "image-global"}
        return {"kind": "image-global", "transagg_sha256": self.loaded["record"]["sha256"]}

    def encode_gallery(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.tuned.encode_image(pixels)

    def reference_feature_kind(self) -> dict:
        kind: dict[str, Any] = {"kind": "image-tokens-projected"}
        if IMAGE_PARTS[0] in self.loaded["parts"]:
            kind["transagg_sha256"] = self.loaded["record"]["sha256"]
        return kind

    @torch.no_grad()
    def encode_references(self, pixels: torch.Tensor) -> torch.Tensor:
        with self.tuned.autocast():
            return image_token_features(self.tuned.model, pixels.to(self.tuned.device)).float()

    @torch.no_grad()
    def compose(self, references: torch.Tensor, queries: list[Query]) -> torch.Tensor:
        tokens = self.tuned.tokenize([query_text(q) for q in queries])
        with self.tuned.autocast():
            text = text_token_features(self.tuned.model, tokens)
        return self.loaded["head"](text, tokens, references.to(self.tuned.device))

    def info(self) -> dict:
        return dict(self.loaded["record"])


class TransAggTrainable(TrainableMethod):
    """The head (and the towers ``--tune`` names) trained so that reference image + relative caption retrieve the
    target image within the batch."""

    name = "transagg"
    preprocess_kind = "targetpad"  # the official training and evaluation transform (ratio 1.25)
    # a triplet per row: the reference (the image column), its relative caption, the target image's path
    caption_columns = ("relative_caption", "relative_cap", "caption", "text")
    required_columns = ("target",)
    image_columns = ("target",)
    # the official Config: lr 1e-4 (towers: 1e-6, --clip-lr-scale), weight decay 0.05, 100 epochs, batch 64; its
    # CosineAnnealingWarmRestarts(T_0=epochs, eta_min=1e-2 lr) stepped per iteration; clip_grad_norm_(5)
    defaults = {"lr": 1e-4, "weight_decay": 0.05, "batch_size": 64, "epochs": 100, "warmup_steps": 0,
                "schedule": "cosine", "min_lr": 1e-6, "max_grad_norm": 5.0}

    def __init__(self, backbone: Backbone, options: dict[str, Any]):
        super().__init__(backbone, options)
        check_towers(backbone.model, backbone.model_name)
        self.parts = TUNED[str(options.get("tune", "text"))]
        self.view = tower_view(backbone.model, self.parts) if self.parts else backbone.model
        for p in backbone.model.parameters():
            p.requires_grad_(False)
        for _, p in part_parameters(self.view, self.parts):
            p.requires_grad_(True)
        self.head = Head(backbone.embed_dim, int(options.get("layers", 2)),
                         float(options.get("dropout", 0.5))).to(backbone.device)
        self.scale = float(options.get("clip_lr_scale", 0.01))

    def named_trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        towers = [(TOWER_PREFIX + n, p) for n, p in part_parameters(self.view, self.parts)]
        return list(self.head.named_parameters()) + towers

    def decays(self, name: str, param: torch.nn.Parameter) -> bool:
        return True  # both official groups decay

    def lr_scale(self, name: str, param: torch.nn.Parameter) -> float:
        return self.scale if name.startswith(TOWER_PREFIX) else 1.0

    def train_mode(self, training: bool) -> None:
        self.head.train(training)
        for name, module in self.view.named_children():
            if name in self.parts:
                module.train(training)

    def training_step(self, batch):
        tuned_image = IMAGE_PARTS[0] in self.parts
        with torch.set_grad_enabled(tuned_image and torch.is_grad_enabled()):
            references = image_token_features(self.view, batch.pixels)
            target = self.view.encode_image(batch.images["target"])
        tokens = self.backbone.tokenize(batch.captions)
        with torch.set_grad_enabled(bool(set(self.parts) & set(TEXT_PARTS)) and torch.is_grad_enabled()):
            text = text_token_features(self.view, tokens)
        query = self.head(text, tokens, references)
        logits = LOGIT_SCALE * global_batch.gather(query.float()) @ \
            global_batch.gather(F.normalize(target.float(), dim=-1)).T
        return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device)), {}

    def state_to_save(self) -> dict[str, torch.Tensor]:
        towers = {TOWER_PREFIX + k: v.detach() for k, v in part_state(self.view, self.parts).items()}
        return {**{k: v.detach() for k, v in self.head.state_dict().items()}, **towers}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        head, towers = split_state(tensors)
        load_module_weights(self.head, head, "resumed state")
        if self.parts:
            load_part_state(self.view, towers, "resumed state", self.parts)

    def checkpoint_config(self) -> dict[str, Any]:
        return {"architecture": {"layers": int(self.options.get("layers", 2)),
                                 "tune": self.options.get("tune", "text")}}
