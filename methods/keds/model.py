"""KEDs: the Bi-modality Knowledge-guided Projection, its database search, the two streams and their mix.

Follows the official repository (github.com/suoych/KEDs: ``src/model/model.py`` ``IM2TEXT``, ``CrossAttention``,
``CrossFormer`` and ``encode_text_img_retrieval``; ``src/eval_utils.py`` ``get_retrieved_features`` and
``evaluate_cirr``; ``src/eval_retrieval.py`` ``load_model_without_definition``), checked against a transcription of
each (tests/test_keds.py):

* the database is searched with the reference's *normalised* CLIP embedding for its nearest rows by L2 distance
  (the official faiss ``IndexFlatL2`` over the rows as stored), images and captions apart, 16 each;
* each stream maps the reference's raw embedding and every retrieved row through its ``img2text``; the mapped
  reference attends to the mapped images (``retrieval_fuse``) and, apart, to the mapped captions
  (``text_condition``): 3 layers each, 8 heads of 64, every layer's output the next one's query, with no residual
  or norm; its pseudo-words are ``[fused, text-conditioned, mapped]``;
* the three words replace the prompt's ``*`` (``encode_text_img_retrieval``: the text shifted right by two
  places, the end-of-text feature read two places later), which is "a photo of * * * , {caption}" with each
  ``*`` one word, as written here;
* the query is ``normalize(w x normalize(text stream) + (1 - w) x normalize(image stream))``, ``w`` 0.5 in the
  official CIRR evaluation.

The released ``evaluate_fashion`` departs from this (two words, no ``text_condition``, written over the prompt's
``* ,`` by ``encode_text_img_train``) and its COCO loop loads both streams from the image stream's folder; cirbench
evaluates every benchmark as ``evaluate_cirr`` does, the protocol the released streams (which hold
``text_condition``) were evaluated with on CIRR and ImageNet-R. The official order of the retrieved images is
shuffled (``torch.randperm``): attention over them does not depend on it.

No training: the released trainer cannot run as published (``encode_text_img`` builds a 78-token sequence for
CLIP's 77 positions from the three words, and the one-GPU branch of its image-stream loss reads an undefined
variable), and the textual-concept stream's loss reads per-caption subject/remainder files (``cc_subject.json``,
``cc_other.json``) that are not released.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cirbench.backbones import Backbone
from cirbench.checkpoints import load_module_weights
from cirbench.errors import CheckpointError, CirbenchError
from cirbench.method import Method
from cirbench.methods._shared.textinv import (
    Img2Text,
    RawImageReferences,
    encode_with_pseudo_tokens,
    pic2word_prompt,
    token_width,
)
from cirbench.methods._shared.towers import last_loaded
from cirbench.retrieval import rank
from cirbench.safe_unpickle import load_state_dict, load_torch_file
from cirbench.types import Query
from cirbench.util import file_sha256

HUB_REPO = "LionheartzzZ/KEDs"
RELEASED_FOR = ("ViT-L-14", "openai")
FILES = {  # option: (released file, what it is)
    "image_stream": ("image_stream.pt", "KEDs' image stream"),
    "text_stream": ("text_stream.pt", "KEDs' textual-concept stream"),
    "image_database": ("cc_image_databases.pt", "KEDs' database image features"),
    "text_database": ("cc_text_databases.pt", "KEDs' database caption features"),
}
STREAM_PARTS = ("img2text", "retrieval_fuse", "text_condition")  # checkpoint["state_dict_<part>"]
STREAM_SUFFIXES = (".pt", ".pth")
PLACEHOLDER = "*"
WORDS = 3  # [fused with the images, conditioned on the captions, the mapped reference]
HEADS, HEAD_DIM, FUSE_LAYERS = 8, 64, 3  # the official CrossFormer(num_layers=3), CrossAttention's defaults


class CrossAttention(torch.nn.Module):
    """The official ``CrossAttention``: queries attend to keys/values through biased projections into ``heads x
    head_dim``, softmax(q k^T / sqrt(head_dim)) v, projected back (``to_out.0``); no residual, no norm."""

    def __init__(self, dim: int, heads: int = HEADS, head_dim: int = HEAD_DIM):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = torch.nn.Linear(dim, inner)
        self.to_k = torch.nn.Linear(dim, inner)
        self.to_v = torch.nn.Linear(dim, inner)
        self.to_out = torch.nn.Sequential(torch.nn.Linear(inner, dim), torch.nn.Dropout(0.0))

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        def heads(x: torch.Tensor) -> torch.Tensor:  # [B, n, h d] -> [B, h, n, d]
            return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.to_q(q)), heads(self.to_k(kv)), heads(self.to_v(kv)))
        return self.to_out(out.transpose(1, 2).flatten(2))


class CrossFormer(torch.nn.Module):
    """The official ``CrossFormer``: ``cross_layers`` applied in turn, each one's output the next one's queries,
    the keys and values the same throughout."""

    def __init__(self, dim: int, layers: int = FUSE_LAYERS):
        super().__init__()
        self.cross_layers = torch.nn.ModuleList(CrossAttention(dim) for _ in range(layers))

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        for layer in self.cross_layers:
            q = layer(q, kv)
        return q


class KnowledgeStream(torch.nn.Module):
    """One stream: its mapping network and its two knowledge fusions (the checkpoint's three state dicts)."""

    def __init__(self, embed_dim: int, width: int, middle_dim: int = 512, n_layer: int = 2,
                 fuse_layers: int = FUSE_LAYERS):
        super().__init__()
        self.img2text = Img2Text(embed_dim, middle_dim, width, n_layer=n_layer)
        self.retrieval_fuse = CrossFormer(width, fuse_layers)
        self.text_condition = CrossFormer(width, fuse_layers)

    def forward(self, image: torch.Tensor, images: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        """Three pseudo-words ``[B, 3, width]`` from raw reference embeddings ``[B, D]`` and the database rows
        retrieved for them ``[B, K, D]`` (images, captions)."""
        mapped = self.img2text(image).unsqueeze(1)
        fused = self.retrieval_fuse(mapped, self.img2text(images))
        conditioned = self.text_condition(mapped, self.img2text(captions))
        return torch.cat([fused, conditioned, mapped], dim=1)


def architecture_of(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """The stream's sizes as its tensors give them: the mapping's hidden width and depth, the fusions' depth."""
    mapping = {k.split(".")[2] for k in tensors if k.startswith("img2text.layers.")}
    fuse = {k.split(".")[2] for k in tensors if k.startswith("retrieval_fuse.cross_layers.")}
    first = tensors.get("img2text.layers.0.0.weight")
    return {"middle_dim": int(first.shape[0]) if first is not None else 512, "n_layer": len(mapping) or 2,
            "fuse_layers": len(fuse) or FUSE_LAYERS}


def load_stream(path: Path, backbone: Backbone) -> tuple[KnowledgeStream, dict[str, int]]:
    """A stream of the official checkpoint layout (``state_dict_img2text``, ``state_dict_retrieval_fuse``,
    ``state_dict_text_condition``; DDP's ``module.`` prefixes dropped), on the backbone's device, in eval mode."""
    if not path.is_file():
        raise CheckpointError(f"KEDs stream {path} is not a file")
    if path.suffix not in STREAM_SUFFIXES:
        raise CheckpointError(f"KEDs stream {path} is not a {'/'.join(STREAM_SUFFIXES)} checkpoint (the released "
                              "image_stream.pt / text_stream.pt)")
    content = load_torch_file(path)
    if isinstance(content, dict) and "state_dict_img2text" in content and "state_dict_retrieval_fuse" not in content:
        raise CheckpointError(f"checkpoint {path} holds a mapping network without knowledge fusions: a Pic2Word "
                              "checkpoint? (--method pic2word --checkpoint FILE)")
    tensors = {}
    for part in STREAM_PARTS:
        state = load_state_dict(path, f"state_dict_{part}", content)
        tensors.update({f"{part}.{k.removeprefix('module.')}": v for k, v in state.items()})
    arch = architecture_of(tensors)
    stream = KnowledgeStream(backbone.embed_dim, token_width(backbone), **arch)
    load_module_weights(stream, tensors, str(path))
    return stream.to(backbone.device).eval(), arch


def read_features(path: Path, what: str, dim: int) -> torch.Tensor:
    """A ``[N, dim]`` float32 matrix from a ``.npy`` file, a ``.safetensors`` file holding one tensor, or a
    ``torch.save`` file holding a tensor (read without running anything from it); one-line errors."""
    if not path.is_file():
        raise CheckpointError(f"{what} {path} is not a file")
    try:
        if path.suffix == ".npy":
            value: Any = torch.from_numpy(np.load(path, allow_pickle=False))
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
            if len(tensors) != 1:
                raise CheckpointError(f"{what} {path} holds {len(tensors)} tensors; one [rows, {dim}] matrix needed")
            (value,) = tensors.values()
        else:
            value = load_torch_file(path)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file is one line
        raise CheckpointError(f"{what} {path} could not be read: {type(exc).__name__}: {str(exc)[:160]}") from None
    if not isinstance(value, torch.Tensor) or value.ndim != 2 or value.shape[1] != dim:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise CheckpointError(f"{what} {path} is {shape}, not a [rows, {dim}] matrix of this backbone's features "
                              "(made with another backbone?)")
    value = value.float()
    if not bool(torch.isfinite(value).all()):
        raise CheckpointError(f"{what} {path} holds non-finite values (NaN or Inf)")
    return value


class Database:
    """The bi-modality knowledge: image and caption features, row for row, on the backbone's device, searched
    by L2 distance as the official ``IndexFlatL2``. Rows of unit length are searched by inner product (the same
    order); others by ``2 q.x - |x|^2``, their squared norm kept as a last column (the rows are its first ``D``)."""

    def __init__(self, images: torch.Tensor, captions: torch.Tensor, device: torch.device):
        self.rows, self.dim = len(images), images.shape[1]
        self.matrices = [self._searchable(m.to(device)) for m in (images, captions)]

    @staticmethod
    def _searchable(rows: torch.Tensor) -> torch.Tensor:
        squared = (rows * rows).sum(dim=1, keepdim=True)
        return rows if bool(((squared - 1).abs() < 1e-4).all()) else torch.cat([rows, squared], dim=1)

    def nearest(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` nearest images and captions ``[B, k, D]`` each of the normalised ``queries``."""
        q = F.normalize(queries.float(), dim=-1).to(self.matrices[0].device)
        with_norm = torch.cat([2 * q, -torch.ones(len(q), 1, device=q.device)], dim=1)
        found = []
        for matrix in self.matrices:
            idx, _ = rank(q if matrix.shape[1] == self.dim else with_norm, matrix, k)
            found.append(matrix[idx.to(matrix.device), :self.dim])
        return found[0], found[1]


def _released(option: str, model: str, pretrained: str) -> str:
    """``hf-hub:REPO/FILE`` of the released file for ``option``; CheckpointError on another backbone."""
    name, what = FILES[option]
    if (model, pretrained) != RELEASED_FOR:
        raise CheckpointError(f"{what} is released for {'/'.join(RELEASED_FOR)} only; for {model}/{pretrained} pass "
                              f"--{option.replace('_', '-')} FILE")
    return f"hf-hub:{HUB_REPO}/{name}"


def downloads(options: dict, model: str, pretrained: str) -> list[tuple[str, str]]:
    """MethodSpec.downloads of ``KEDs``: the released files that no option names."""
    return [(FILES[o][1], _released(o, model, pretrained)) for o in FILES if not options.get(o)]


def resolve_files(options: dict, backbone: Backbone) -> dict[str, Path]:
    """The file of each option: the one it names, or the released one (the hub's cache, or downloaded)."""
    from cirbench.hub import hub_file

    out = {}
    for option in FILES:
        given = options.get(option)
        if given:
            out[option] = Path(given).expanduser()
        else:
            _released(option, backbone.model_name, backbone.pretrained)  # another backbone: one line
            out[option] = hub_file(HUB_REPO, FILES[option][0], FILES[option][1], option=option.replace("_", "-"))
    return out


def load_bundle(files: dict[str, Path], backbone: Backbone) -> dict[str, Any]:
    """Both streams and the database, and what the result file records of them."""
    image_stream, image_arch = load_stream(files["image_stream"], backbone)
    text_stream, text_arch = load_stream(files["text_stream"], backbone)
    images = read_features(files["image_database"], FILES["image_database"][1], backbone.embed_dim)
    captions = read_features(files["text_database"], FILES["text_database"][1], backbone.embed_dim)
    if len(images) != len(captions):
        raise CheckpointError(f"the database's image and caption features differ in rows ({len(images)} vs "
                              f"{len(captions)}): they must be the same pairs, row for row")
    record = {option: {"path": str(path), "sha256": file_sha256(path)} for option, path in files.items()}
    return {"streams": (image_stream, text_stream), "database": Database(images, captions, backbone.device),
            "record": {**record, "architecture": {"image_stream": image_arch, "text_stream": text_arch},
                       "database_rows": len(images)}}


class KEDs(RawImageReferences, Method):
    """Query = the mix of two streams' features of "a photo of * * * , {caption}", each stream's three words
    from the reference and its nearest database images and captions."""

    def __init__(self, backbone, options, dataset=None):
        super().__init__(backbone, options, dataset)
        files = resolve_files(options, backbone)
        self.bundle = last_loaded(backbone, "keds", tuple(files.values()), lambda: load_bundle(files, backbone))
        self.k = int(options.get("neighbours", 16))

    @torch.no_grad()
    def prepare_references(self, ids: list[str], features: torch.Tensor) -> torch.Tensor:
        """Each reference's raw embedding followed by its nearest database images and captions: ``[N, 1 + 2k,
        D]``, searched once per evaluation set."""
        if self.bundle["database"].rows < self.k:
            raise CirbenchError(f"--neighbours {self.k} exceeds the database's {self.bundle['database'].rows} rows")
        raw = features.to(self.backbone.device).float()
        images, captions = self.bundle["database"].nearest(raw, self.k)  # ranked in chunks by cirbench.retrieval
        return torch.cat([raw.unsqueeze(1), images, captions], dim=1)

    @torch.no_grad()
    def compose(self, references: torch.Tensor, queries: list[Query]) -> torch.Tensor:
        refs = references.to(self.backbone.device).float()
        raw, images, captions = refs[:, 0], refs[:, 1:1 + self.k], refs[:, 1 + self.k:]
        prompts = [pic2word_prompt(q, PLACEHOLDER, WORDS) for q in queries]
        image_stream, text_stream = self.bundle["streams"]
        feats = [encode_with_pseudo_tokens(self.backbone, prompts, stream(raw, images, captions), PLACEHOLDER)
                 for stream in (image_stream, text_stream)]
        w = float(self.options.get("text_stream_weight", 0.5))
        return F.normalize(w * feats[1] + (1 - w) * feats[0], dim=-1)

    def info(self) -> dict:
        return dict(self.bundle["record"])
