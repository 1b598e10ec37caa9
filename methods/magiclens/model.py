"""MagicLens: its released weights read without JAX, its CLIP on open_clip, its multimodal head, its queries.

Follows the official repository (github.com/google-deepmind/magiclens: ``model.py``, ``layers.py``,
``inference.py``, ``data_utils.py``) and the scenic CLIP it builds on (``scenic/projects/baselines/clip``):

* The ``.pkl`` is ``pickle.dump`` of ``flax.serialization.to_bytes(params)``: msgpack of the parameter tree, each
  array an extension (type 1) holding ``(shape, dtype name, bytes)``, arrays over 1 GiB split into chunks. It is
  read here with ``msgpack`` (:func:`read_flax_weights`), as plain data.
* The CLIP is scenic's port of OpenAI's (QuickGELU, LayerNorm eps 1e-5), its weights MagicLens's own (tuned):
  they map onto open_clip's names by inverting scenic's ``_convert_vars`` (:func:`clip_state`): separate
  query/key/value kernels ``[D, heads, 64]`` become ``in_proj_weight``, ``[heads, 64, D]`` ``out_proj``, conv
  kernels HWIO become OIHW, dense kernels are transposed, ``scale`` is ``weight``. Scenic's text mask adds a
  padding mask to the causal one, which changes no token the end-of-text pooling reads.
* The head (:class:`MagicLensHead`): the unnormalised CLIP image and text embeddings as a sequence of two, 4
  pre-LayerNorm transformer layers (LayerNorm ``(1 + scale)``, eps 1e-6; attention logits capped at
  ``50 tanh(x / 50)``; ReLU feed-forward of 4 D), then attention pooling by one learned query (its projections
  4 D wide, the query scaled per dimension by ``softplus``), LayerNorm, and L2 normalisation.
* Every gallery image is embedded as a query with the empty text; a query's text is its caption, FashionIQ's
  captions joined by " and ", CIRCO's "find {shared concept} but {caption}", ImageNet-R's (DTIN's) "find this
  object in {domain}".
* Images: :mod:`cirbench.preprocess`'s ``magiclens`` kind (each image divided by its largest pixel value, squashed
  to 224 x 224 by JAX's antialiased bilinear resize).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cirbench.backbones import Backbone
from cirbench.checkpoints import check_fit
from cirbench.errors import CheckpointError
from cirbench.method import Method
from cirbench.methods._shared.towers import (
    IMAGE_PARTS,
    TEXT_PARTS,
    last_loaded,
    tuned_copy,
)
from cirbench.safe_unpickle import load_bytes_pickle
from cirbench.types import Query
from cirbench.util import file_sha256

CLIP = "params/clip/"
HEAD_PARTS = ("multimodal_encoder", "contrastive_multimodal_pooler")
# the released checkpoints: MagicLens-B on CLIP ViT-B/16, MagicLens-L on CLIP ViT-L/14
SIZES = {512: ("base", "ViT-B-16"), 768: ("large", "ViT-L-14")}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
          "int32": torch.int32, "int64": torch.int64, "uint8": torch.uint8, "int8": torch.int8, "bool": torch.bool}
CHUNKED = "__msgpack_chunked_array__"


# -- the released weights ------------------------------------------------------------------------------------------
def _array(data: bytes) -> torch.Tensor:
    import msgpack

    shape, dtype, buffer = msgpack.unpackb(data, raw=True)
    name = dtype.decode() if isinstance(dtype, bytes) else str(dtype)
    if name not in DTYPES:
        raise CheckpointError(f"an array of dtype {name!r}, which cirbench does not read")
    flat = torch.frombuffer(bytearray(buffer), dtype=DTYPES[name]) if buffer else torch.empty(0, dtype=DTYPES[name])
    return flat.reshape([int(n) for n in shape])


def _ext(code: int, data: bytes) -> Any:
    if code == 1:  # flax's _MsgpackExtType.ndarray
        return _array(data)
    if code == 3:  # npscalar, packed as a 0-d array
        return _array(data).reshape(())
    raise CheckpointError(f"a msgpack extension of type {code}, which flax's array serialization does not write")


def _flatten(tree: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    if isinstance(tree, dict):
        if CHUNKED in tree:  # an array over 1 GiB, split by flax into flat chunks
            shape = [int(tree["shape"][str(i)]) for i in range(len(tree["shape"]))]
            chunks = [tree["chunks"][str(i)] for i in range(len(tree["chunks"]))]
            out[prefix.rstrip("/")] = torch.cat([c.reshape(-1) for c in chunks]).reshape(shape)
            return
        for key, value in tree.items():
            _flatten(value, f"{prefix}{key}/", out)
    elif isinstance(tree, torch.Tensor):
        out[prefix.rstrip("/")] = tree
    else:
        raise CheckpointError(f"{prefix.rstrip('/')} holds a {type(tree).__name__}, not an array")


def read_flax_weights(path: Path | str) -> dict[str, torch.Tensor]:
    """The arrays of a ``pickle.dump(flax.serialization.to_bytes(params))`` file, by their ``/``-joined path."""
    import msgpack

    path = Path(path)
    data = load_bytes_pickle(path)
    try:
        tree = msgpack.unpackb(data, ext_hook=_ext, raw=False, strict_map_key=False)
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from None
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise CheckpointError(f"checkpoint {path} is not flax-serialized weights: {type(exc).__name__}: "
                              f"{str(exc)[:200]}") from None
    out: dict[str, torch.Tensor] = {}
    try:
        _flatten(tree, "", out)
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from None
    bad = next((k for k, v in out.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} holds non-finite values (NaN or Inf) in {bad}")
    return out


# -- scenic's CLIP onto open_clip's names ------------------------------------------------------------------------
_BLOCK = re.compile(r"^transformer/resblocks[._](\d+)/(.+)$")


def _block(prefix: str, index: str, rest: str, t: torch.Tensor, attn: dict) -> dict[str, torch.Tensor]:
    base = f"{prefix}transformer.resblocks.{index}."
    parts = rest.split("/")
    if parts[0] == "attn":
        if parts[1] == "out":
            if parts[2] == "kernel":  # [heads, dh, D] -> out_proj.weight [D, heads * dh]
                return {base + "attn.out_proj.weight": t.reshape(-1, t.shape[-1]).T}
            return {base + "attn.out_proj.bias": t}
        attn.setdefault(base, {})[(parts[1], parts[2])] = t  # query/key/value kernels [D, heads, dh], biases
        return {}
    if parts[0] in ("ln_1", "ln_2"):
        return {base + f"{parts[0]}.{'weight' if parts[1] == 'scale' else 'bias'}": t}
    if parts[0] == "mlp":
        return {base + f"mlp.{parts[1]}.{'weight' if parts[2] == 'kernel' else 'bias'}": t.T if parts[2] == "kernel"
                else t}
    raise CheckpointError(f"unexpected CLIP tensor {prefix}transformer/resblocks_{index}/{rest}")


def clip_state(flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MagicLens's CLIP tensors (``params/clip/...``, scenic's names) under open_clip's names (its logit scale, no
    part of an embedding, left out)."""
    out: dict[str, torch.Tensor] = {}
    attn: dict[str, dict[tuple[str, str], torch.Tensor]] = {}
    for key, t in flat.items():
        if not key.startswith(CLIP):
            continue
        tower, _, rest = key[len(CLIP):].partition("/")
        prefix = "visual." if tower == "visual" else ""
        if tower == "logit_scale":  # CLIP's temperature: no part of an embedding
            continue
        if tower not in ("visual", "text"):
            raise CheckpointError(f"unexpected CLIP tensor {key}")
        block = _BLOCK.match(rest)
        if block:
            out.update(_block(prefix, block.group(1), block.group(2), t, attn))
        elif rest == "conv1/kernel":
            out["visual.conv1.weight"] = t.permute(3, 2, 0, 1)  # HWIO -> OIHW
        elif rest in ("class_embedding", "positional_embedding"):
            out[prefix + rest] = t
        elif rest in ("proj/kernel", "text_projection/kernel"):
            out[prefix + rest.split("/")[0]] = t
        elif rest == "token_embedding/embedding":
            out["token_embedding.weight"] = t
        elif rest.split("/")[0] in ("ln_pre", "ln_post", "ln_final"):
            name, field = rest.split("/")
            out[f"{prefix}{name}.{'weight' if field == 'scale' else 'bias'}"] = t
        else:
            raise CheckpointError(f"unexpected CLIP tensor {key}")
    for base, parts in attn.items():
        try:
            kernels = [parts[(n, "kernel")] for n in ("query", "key", "value")]
            biases = [parts[(n, "bias")] for n in ("query", "key", "value")]
        except KeyError as missing:
            raise CheckpointError(f"checkpoint lacks the attention {missing.args[0]} of {base}") from None
        out[base + "attn.in_proj_weight"] = torch.cat([k.reshape(k.shape[0], -1).T for k in kernels])
        out[base + "attn.in_proj_bias"] = torch.cat([b.reshape(-1) for b in biases])
    return out


# -- the head ----------------------------------------------------------------------------------------------------------
class LayerNorm(torch.nn.Module):
    """The head's LayerNorm (praxis'): ``(x - mean) / sqrt(var + eps) * (1 + scale) + bias``, eps 1e-6."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.zeros(dim))
        self.bias = torch.nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).square().mean(-1, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.eps) * (1 + self.scale) + self.bias


class Projection(torch.nn.Module):
    """``AttentionProjection``: ``w [D, heads, dh]``; the output projection ``...NH,DNH->...D`` (bias ``[D]``),
    the others ``...D,DNH->...NH`` (bias ``[heads, dh]``)."""

    def __init__(self, dim: int, heads: int, dim_head: int, output: bool = False):
        super().__init__()
        self.output = output
        self.w = torch.nn.Parameter(torch.zeros(dim, heads, dim_head))
        self.b = torch.nn.Parameter(torch.zeros(dim) if output else torch.zeros(heads, dim_head))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.output:
            return torch.einsum("...nh,dnh->...d", x, self.w) + self.b
        return torch.einsum("...d,dnh->...nh", x, self.w) + self.b


class PerDimScale(torch.nn.Module):
    def __init__(self, dim_head: int):
        super().__init__()
        self.per_dim_scale = torch.nn.Parameter(torch.zeros(dim_head))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 1.442695041 / np.sqrt(x.shape[-1]) * F.softplus(self.per_dim_scale)
        return x * scale


class Attention(torch.nn.Module):
    """``DotProductAttention``: logits capped at ``50 tanh(x / 50)``."""

    def __init__(self, dim: int, hidden: int, heads: int, per_dim_scale: bool):
        super().__init__()
        dim_head = hidden // heads
        self.dim_head = dim_head
        self.query, self.key, self.value = (Projection(dim, heads, dim_head) for _ in range(3))
        self.post = Projection(dim, heads, dim_head, output=True)
        self.per_dim_scale = PerDimScale(dim_head) if per_dim_scale else None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        query, key, value = self.query(q), self.key(k), self.value(v)
        query = self.per_dim_scale(query) if self.per_dim_scale is not None else query * self.dim_head ** -0.5
        logits = torch.einsum("btnh,bsnh->bnts", query, key)
        logits = 50.0 * torch.tanh(logits / 50.0)
        encoded = torch.einsum("bnts,bsnh->btnh", logits.softmax(-1), value)
        return self.post(encoded)


class Weight(torch.nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(dim_in, dim_out))


class Bias(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.b = torch.nn.Parameter(torch.zeros(dim))


class FFN(torch.nn.Module):
    def __init__(self, dim_in: int, dim_out: int, relu: bool):
        super().__init__()
        self.linear, self.bias, self.relu = Weight(dim_in, dim_out), Bias(dim_out), relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x @ self.linear.w + self.bias.b
        return F.relu(x) if self.relu else x


class FeedForward(torch.nn.Module):
    """``TransformerFFN``: LayerNorm, ReLU layer, linear layer, residual."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.layer_norm = LayerNorm(dim)
        self.ffn_layer1, self.ffn_layer2 = FFN(dim, hidden, relu=True), FFN(hidden, dim, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_layer2(self.ffn_layer1(self.layer_norm(x))) + x


class Layer(torch.nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.layer_norm = LayerNorm(dim)
        self.self_attention = Attention(dim, dim, heads, per_dim_scale=False)
        self.ff_layer = FeedForward(dim, 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = self.layer_norm(x)
        return self.ff_layer(self.self_attention(normed, normed, normed) + x)


class Encoder(torch.nn.Module):
    def __init__(self, dim: int, heads: int, layers: int):
        super().__init__()
        for i in range(layers):
            self.add_module(f"x_layers_{i}", Layer(dim, heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.children():
            x = layer(x)
        return x


class Pooler(torch.nn.Module):
    """``AttenTokenPoolingLayer``: learned queries attend (4 D wide, per-dimension scaled), then LayerNorm."""

    def __init__(self, dim: int, heads: int, queries: int):
        super().__init__()
        self.pool_attn = Attention(dim, 4 * dim, heads, per_dim_scale=True)
        self.pool_attn_ln = LayerNorm(dim)
        self.pooling_attn_query = torch.nn.Parameter(torch.zeros(queries, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query = self.pooling_attn_query.unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.pool_attn_ln(self.pool_attn(query, x, x))


class MagicLensHead(torch.nn.Module):
    """The multimodal encoder and pooler over [image, text] CLIP embeddings; L2-normalised output."""

    def __init__(self, dim: int, heads: int, layers: int, pool_heads: int, queries: int = 1):
        super().__init__()
        self.multimodal_encoder = Encoder(dim, heads, layers)
        self.contrastive_multimodal_pooler = Pooler(dim, pool_heads, queries)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        x = torch.stack([image.float(), text.float()], dim=1)
        pooled = self.contrastive_multimodal_pooler(self.multimodal_encoder(x))[:, 0]
        return pooled / torch.sqrt((pooled * pooled).sum(-1, keepdim=True) + 1e-12)  # _normalize_embed


def head_of(flat: dict[str, torch.Tensor], source: str) -> MagicLensHead:
    """The head with its sizes read off the checkpoint's shapes, holding its weights."""
    tensors = {k.removeprefix("params/").replace("/", "."): v for k, v in flat.items()
               if k.startswith(tuple(f"params/{part}/" for part in HEAD_PARTS))}
    try:
        dim = int(tensors["contrastive_multimodal_pooler.pooling_attn_query"].shape[1])
        queries = int(tensors["contrastive_multimodal_pooler.pooling_attn_query"].shape[0])
        heads = int(tensors["multimodal_encoder.x_layers_0.self_attention.query.w"].shape[1])
        pool_heads = int(tensors["contrastive_multimodal_pooler.pool_attn.query.w"].shape[1])
    except KeyError as missing:
        raise CheckpointError(f"checkpoint {source} has no {missing.args[0]}: not MagicLens weights") from None
    layers = len({k.split(".")[1] for k in tensors if k.startswith("multimodal_encoder.x_layers_")})
    head = MagicLensHead(dim, heads, layers, pool_heads, queries)
    own = head.state_dict()
    check_fit(own, tensors, source)
    head.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()})
    return head.eval()


# -- the method ------------------------------------------------------------------------------------------------------
def load_magiclens(path: Path, backbone: Backbone) -> tuple[Backbone, MagicLensHead, dict[str, Any]]:
    """A view of the backbone holding MagicLens's CLIP, its head, and what the result file records."""
    flat = read_flax_weights(path)
    head = head_of(flat, str(path))
    dim = head.contrastive_multimodal_pooler.pooling_attn_query.shape[1]
    size, model = SIZES.get(int(dim), (f"of width {dim}", backbone.model_name))
    if backbone.activation != "quick_gelu":
        raise CheckpointError(f"MagicLens's CLIP uses QuickGELU; this {backbone.model_name} backbone uses "
                              f"{backbone.activation}: pass --backbone {model} --pretrained openai (its weights are "
                              "replaced by MagicLens's own)")
    try:
        tuned = tuned_copy(backbone, clip_state(flat), str(path), IMAGE_PARTS + TEXT_PARTS)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; MagicLens-{size} runs on CLIP {model}: pass --backbone {model} --pretrained "
                              "openai") from None
    record = {"checkpoint": str(path), "sha256": file_sha256(path), "size": size}
    return tuned, head.to(backbone.device), record


def query_text(query: Query, dataset: str | None) -> str:
    """The text the official inference pairs with a query's image (see the module docstring)."""
    if dataset == "circo" and query.extra.get("shared_concept"):
        return f"find {query.extra['shared_concept']} but {query.text}"
    if dataset == "imagenet-r" and query.category:
        return f"find this object in {query.category}"
    return " and ".join(query.texts)


class MagicLens(Method):
    """Query = the head's embedding of (reference image, text); gallery = the head's embedding of (image, "")."""

    def __init__(self, backbone, options, dataset=None):
        super().__init__(backbone, options, dataset)
        downloads(options, backbone.model_name, backbone.pretrained)
        path = Path(options["checkpoint"]).expanduser()
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} not found (MagicLens's weights are a .pkl file)")
        self.tuned, self.head, self.record = last_loaded(backbone, "magiclens", path,
                                                         lambda: load_magiclens(path, backbone))

    def reference_feature_kind(self) -> dict:
        return {"kind": "magiclens-clip-image", "magiclens_sha256": self.record["sha256"]}

    @torch.no_grad()
    def encode_references(self, pixels: torch.Tensor) -> torch.Tensor:
        """MagicLens's CLIP image embeddings, unnormalised (the head takes them so)."""
        pixels = pixels.to(self.tuned.device, dtype=self.tuned.input_dtype, non_blocking=True)
        with self.tuned.autocast():
            return self.tuned.model.encode_image(pixels).float()

    def gallery_feature_kind(self) -> dict:
        return {"kind": "magiclens-index", "magiclens_sha256": self.record["sha256"]}

    @torch.no_grad()
    def encode_gallery(self, pixels: torch.Tensor) -> torch.Tensor:
        image = self.encode_references(pixels)
        empty = self.tuned.encode_text([""], normalize=False).float().expand(len(image), -1)
        return self.head(image, empty)

    @torch.no_grad()
    def compose(self, references: torch.Tensor, queries: list[Query]) -> torch.Tensor:
        text = self.tuned.encode_text([query_text(q, self.dataset) for q in queries], normalize=False).float()
        return self.head(references.to(text.device).float(), text)

    def info(self) -> dict:
        return dict(self.record)


def downloads(options: dict, model: str, pretrained: str) -> list[tuple[str, str]]:
    """MethodSpec.downloads of ``MagicLens``: nothing fetched (the weights sit behind gsutil or Google Drive), no
    run without --checkpoint."""
    if options.get("checkpoint") is None:
        raise CheckpointError("magiclens needs --checkpoint: magic_lens_clip_large.pkl (or _base.pkl), from "
                              "gs://gresearch/magiclens/models or the Google Drive folder github.com/google-deepmind/"
                              "magiclens links")
    return []
