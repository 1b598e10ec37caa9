"""Encoding prompts whose placeholder words are replaced by pseudo-word embeddings (textual inversion).

Pic2Word, SEARLE and FTI4CIR map an image to one or more token embeddings and write them into a prompt
("a photo of * , {caption}"). :func:`encode_with_pseudo_tokens` tokenizes the prompts, and a forward hook
on the text tower's token-embedding module swaps the embedding at each placeholder position for the next
pseudo-word of that prompt, so the rest of open_clip's own ``encode_text`` (positional embedding, causal
transformer, final norm, end-of-text pooling, projection) runs unchanged, for the built-in text tower and
for ``model.text`` towers alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from cirbench import global_batch
from cirbench.backbones import Backbone
from cirbench.checkpoints import checkpoint_sha256, is_official_file, load_checkpoint, load_module_weights
from cirbench.errors import CirbenchError
from cirbench.hub import HubFile
from cirbench.method import Method, average_variants, caption_variants
from cirbench.preprocess import Preprocessor, RandomResizedCrop
from cirbench.training import NetTrainable, contrastive_loss
from cirbench.types import Query

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


def nt_xent(v1: torch.Tensor, v2: torch.Tensor, temperature: float) -> torch.Tensor:
    """The contrastive loss SEARLE and FTI4CIR train with (their ``utils.contrastive_loss``, after PALAVRA's NT-Xent):
    over the 2B normalised rows of ``v1`` and ``v2``, ``-mean log(exp(s_ii'/t) / sum_{j != i} exp(s_ij/t))``, where
    i' is row i's partner in the other set (intra- and cross-modal negatives; the positive pair is in the
    denominator too). Computed with log-sum-exp (the same value, without overflow at low temperatures). The rows
    of every rank (with gradients) and of every micro-batch of an accumulated step are gathered
    (:func:`cirbench.global_batch.gather`: the global batch)."""
    v1 = global_batch.gather(F.normalize(v1.float(), dim=1))
    v2 = global_batch.gather(F.normalize(v2.float(), dim=1))
    positive = (v1 * v2).sum(dim=1) / temperature
    joint = torch.cat([v1, v2])
    logits = joint @ joint.T / temperature
    logits = logits.masked_fill(torch.eye(joint.shape[0], dtype=torch.bool, device=joint.device), float("-inf"))
    return -(torch.cat([positive, positive]) - torch.logsumexp(logits, dim=0)).mean()


def clean_text(text: str, placeholder: str) -> str:
    """Remove stray placeholder characters from user text, so that only the prompt's placeholders count."""
    return text.replace(placeholder, " ").strip()


def encode_with_pseudo_tokens(
    backbone: Backbone,
    prompts: Sequence[str],
    pseudo: torch.Tensor | Sequence[torch.Tensor],
    placeholder: str = "*",
    normalize: bool = True,
    first_only: bool = False,
    drop_cut: bool = False,
) -> torch.Tensor:
    """Text features of ``prompts`` with the k-th ``placeholder`` of prompt i replaced by ``pseudo[i][k]``.

    ``pseudo`` is a ``[B, P, width]`` tensor (every prompt has P placeholders), a ``[B, width]`` tensor (one
    each), or a list of ``[n_i, width]`` tensors (any number per prompt). Gradients flow into ``pseudo``.
    ``first_only``: only the first placeholder of each prompt is replaced, later ones stay the plain word (as
    SEARLE's own ``encode_with_pseudo_tokens`` does for text that has its own ``$``, such as generated phrases).
    A prompt too long for the text context loses the placeholders past it: an error, unless ``drop_cut``, where
    their pseudo-words go with them (as a tokenizer's truncation drops a special token there).
    """
    tokens = backbone.tokenize(list(prompts))
    pid = placeholder_id(backbone, placeholder)
    mask = tokens == pid
    if first_only:
        mask &= mask.cumsum(dim=1) == 1
    if isinstance(pseudo, torch.Tensor):
        rows = list(pseudo.unsqueeze(1) if pseudo.ndim == 2 else pseudo)
    else:
        rows = list(pseudo)
    if len(rows) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(rows)} pseudo-token rows")
    counts = mask.sum(dim=1).tolist()
    for i, (row, n) in enumerate(zip(rows, counts, strict=True)):
        if row.shape[0] > n and int(tokens[i, -1]) != 0:  # the prompt fills the text context: it was cut short
            if drop_cut:
                rows[i] = row[:n]
                continue
            raise CirbenchError(f"the prompt {prompts[i]!r} keeps {n} of its {row.shape[0]} pseudo-words "
                                f"'{placeholder}' within this backbone's text context of {tokens.shape[1]} tokens: "
                                "fewer pseudo-words (e.g. --max-attributes) or a backbone with a longer context")
        if row.shape[0] != n:
            raise ValueError(f"prompt {i} has {n} placeholders '{placeholder}' but {row.shape[0]} pseudo-words were "
                             f"given: {prompts[i]!r}")
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


class Img2Text(torch.nn.Module):
    """Pic2Word's mapping network (its ``IM2TEXT``, which KEDs keeps): ``Linear(d, m)-Dropout-ReLU-Linear(m, m)-
    Dropout-ReLU`` then ``fc_out: Linear(m, token width)``.

    Names follow the official module (``layers.0.0``, ``layers.1.0``, ``fc_out``) so its weights load as is.
    """

    def __init__(self, embed_dim: int, middle_dim: int, output_dim: int, dropout: float = 0.1, n_layer: int = 2):
        super().__init__()
        blocks, dim = [], embed_dim
        for _ in range(n_layer):
            blocks.append(torch.nn.Sequential(torch.nn.Linear(dim, middle_dim), torch.nn.Dropout(dropout),
                                              torch.nn.ReLU()))
            dim = middle_dim
        self.layers = torch.nn.Sequential(*blocks)
        self.fc_out = torch.nn.Linear(middle_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.layers(x))


def loaded_phi(backbone: Backbone, tensors: dict[str, torch.Tensor], source: str, dropout: float = 0.5) -> Phi:
    """A :class:`Phi` for ``backbone`` (input: its embedding, hidden 4x, output: its token width) holding
    ``tensors``, on the backbone's device, in eval mode and frozen (a trained Phi that other weights are evaluated
    or tuned around)."""
    embed = backbone.embed_dim
    phi = Phi(embed, 4 * embed, token_width(backbone), dropout=dropout)
    load_module_weights(phi, tensors, source)
    phi = phi.to(backbone.device).eval()
    for p in phi.parameters():
        p.requires_grad_(False)
    return phi


class PhiTrainable(NetTrainable):
    """The trainer of a SEARLE-shaped :class:`Phi` (SEARLE, LinCIR): ``self.net`` maps the frozen CLIP's image
    (or text) embedding to a pseudo-word, with the ``dropout`` option; both official optimizers decay every
    Phi parameter."""

    def __init__(self, backbone: Backbone, options: dict):
        super().__init__(backbone, options)
        embed = backbone.embed_dim
        self.net = Phi(embed, 4 * embed, token_width(backbone), dropout=float(options.get("dropout", 0.5)))
        self.net = self.net.to(backbone.device)
        for p in backbone.model.parameters():
            p.requires_grad_(False)

    def decays(self, name, param):
        return True

    def checkpoint_config(self) -> dict:
        return {"architecture": {"phi": "SEARLE (4x hidden, GELU, dropout)", "token_width": token_width(self.backbone)}}


def loaded_eval_net(net: torch.nn.Module, tensors: dict[str, torch.Tensor], backbone: Backbone,
                    source: str) -> torch.nn.Module:
    """``net`` holding ``tensors`` (strictly: a CheckpointError names the first mismatch), on the backbone's
    device, in evaluation mode: a method's trained network as its evaluation uses it."""
    load_module_weights(net, tensors, source)
    return net.to(backbone.device).eval()


class Pic2WordFamilyTrainable(NetTrainable):
    """What the trainers built on Pic2Word's code share (Pic2Word, Context-I2W): CLIP frozen, ``self.net``'s
    pseudo-word trained so that "a photo of *" holding it matches the image under CLIP's own contrastive loss;
    AdamW with betas 0.9/0.98 and eps 1e-6 (the code's settings for ViT models), no weight decay on parameters
    named "bn"/"ln"/"bias"/"logit_scale"; the training images through the code's RandomResizedCrop (scale 0.9-1.0),
    or the evaluation preprocessing with ``--augment none``."""

    preprocess_kind = "clip"
    adam_betas = (0.9, 0.98)
    adam_eps = 1e-6

    def decays(self, name, param):
        return not any(part in name for part in ("bn", "ln", "bias", "logit_scale"))

    def photo_of_loss(self, image: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        """The official loss: "a photo of *" with each image's pseudo-word ``words`` ``[B, width]`` against the raw
        image features ``image``, symmetric InfoNCE at CLIP's own temperature (1 / logit_scale.exp()) over the
        global batch."""
        text = encode_with_pseudo_tokens(self.backbone, ["a photo of *"] * len(words), words, "*", normalize=False)
        return contrastive_loss(image, text, 1.0 / float(self.backbone.model.logit_scale.exp()))

    def train_preprocessor(self, seed):
        base = super().train_preprocessor(seed)
        assert isinstance(base, Preprocessor)  # the evaluation recipe, which the crop draws from
        if self.options.get("augment", "random-resized-crop") == "none":
            return base
        return RandomResizedCrop(base, scale=(0.9, 1.0), seed=seed)


def raw_image_features(backbone: Backbone, pixels: torch.Tensor) -> torch.Tensor:
    """CLIP image embeddings *before* normalisation (what Pic2Word/SEARLE/FTI4CIR map to pseudo-words)."""
    pixels = pixels.to(backbone.device, non_blocking=True)
    with torch.no_grad(), backbone.autocast():
        return backbone.model.encode_image(pixels).float()


def output_during(module: torch.nn.Module, run: Callable[[], Any]) -> tuple[Any, Any]:
    """``run()``'s result and what ``module`` returned while it ran (the last call's; a forward hook, removed
    after): a layer's tokens read from one ordinary forward pass of open_clip's own code."""
    captured: dict[str, Any] = {}
    handle = module.register_forward_hook(lambda _m, _i, out: captured.__setitem__("out", out))
    try:
        result = run()
    finally:
        handle.remove()
    return result, captured["out"]


def image_and_tokens(model: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(``model.encode_image(pixels)``, the last vision block's tokens before ``ln_post`` ``[B, N, width]``: the
    class token then the patch tokens), from one pass of the image tower, gradients and dtypes as they come."""
    global_feat, tokens = output_during(model.visual.transformer, lambda: model.encode_image(pixels))
    if tokens.shape[0] != pixels.shape[0]:  # sequence-first transformer (older open_clip)
        tokens = tokens.permute(1, 0, 2)
    return global_feat, tokens


def vision_tokens(backbone: Backbone, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw global image embedding ``[B, D]``, the last vision block's tokens before ``ln_post`` ``[B, N, width]``:
    the class token then the patch tokens), both float32 and without gradient, from one pass of the image tower.
    FTI4CIR's attribute queries and Context-I2W's mapping network read these tokens (the official ``get_tokens``)."""
    with torch.no_grad(), backbone.autocast():
        global_feat, tokens = image_and_tokens(backbone.model, pixels.to(backbone.device))
    return global_feat.float(), tokens.float()


class RawImageReferences:
    """Method mixin: reference images are encoded as raw (unnormalised) CLIP embeddings, the input of the
    mapping networks of Pic2Word and SEARLE; every method using it shares those cached features."""

    backbone: Backbone

    def reference_feature_kind(self) -> dict:
        return {"kind": "image-global-raw"}

    def encode_references(self, pixels: torch.Tensor) -> torch.Tensor:
        return raw_image_features(self.backbone, pixels)


def load_phi_weights(path, method: str, backbone: Backbone) -> tuple[dict[str, torch.Tensor], str]:
    """Phi's tensors and the file's sha256: an official ``.pt``/``.pth`` (a dict holding the state dict under
    ``"Phi"``, as SEARLE and LinCIR release them, read by the safe reader) or a ``cirbench train`` folder."""
    from pathlib import Path

    from cirbench.safe_unpickle import load_state_dict
    from cirbench.util import file_sha256

    if is_official_file(path, (".pt", ".pth")):
        return load_state_dict(path, "Phi"), file_sha256(Path(path))
    tensors, _ = load_checkpoint(path, method, backbone.identity(), (".pt", ".pth"))
    return tensors, checkpoint_sha256(path)


BENCHMARK_IMAGE = "*"  # where the reference image goes in a benchmark's own prompt (Query.prompt)


def benchmark_prompt(query: Query, image_words: str) -> str | None:
    """The benchmark's own prompt (``Query.prompt``) with its ``*`` replaced by ``image_words`` (a method's
    placeholder(s) for the image), or None when the benchmark fixes no prompt."""
    if query.prompt is None:
        return None
    before, sep, after = query.prompt.partition(BENCHMARK_IMAGE)
    if not sep:
        raise ValueError(f"query {query.id}: the benchmark prompt {query.prompt!r} has no '*' for the image")
    return before + image_words + after


def pic2word_prompt(query: Query, placeholder: str = "*", words: int = 1) -> str:
    """Pic2Word's official prompts (which Context-I2W and KEDs keep, with their own placeholder token): CIRR/CIRCO
    "a photo of * , {caption}"; FashionIQ "a photo of * , {cap2} and {cap1}"; the benchmark's own prompt where it
    fixes one (its domain-conversion and object-composition tasks). ``words``: how many placeholders stand where
    the image goes (KEDs writes three pseudo-words there)."""
    image = " ".join([placeholder] * words)
    own = benchmark_prompt(query, image)
    if own is not None:
        return own
    caps = [clean_text(t, placeholder) for t in query.texts]
    text = f"{caps[1]} and {caps[0]}" if len(caps) == 2 else caps[0]
    return f"a photo of {image} , {text}"


def searle_prompt(text: str, placeholder: str = "$") -> str:
    """The SEARLE protocol's prompt, which LinCIR evaluates with too."""
    return f"a photo of {placeholder} that {clean_text(text, placeholder)}"


class SearleProtocol(RawImageReferences, Method):
    """The SEARLE evaluation protocol, shared by SEARLE and LinCIR: a Phi network maps the raw CLIP image
    embedding to ``$`` in "a photo of $ that {caption}"; with two captions (FashionIQ) the forward ("c1 and
    c2") and reverse ("c2 and c1") prompts are encoded and their normalised features averaged. Subclasses
    build ``self.phi`` (:meth:`build_phi`) and load its weights."""

    placeholder = "$"
    phi: torch.nn.Module
    checkpoint: str = ""
    sha256: str = ""

    def build_phi(self, tensors: dict[str, torch.Tensor], source: str, dropout: float = 0.5) -> None:
        """``self.phi`` (input: the image embedding, hidden 4x, output: the token width) with ``tensors``."""
        self.phi = loaded_phi(self.backbone, tensors, source, dropout)

    def pseudo_words(self, references: torch.Tensor) -> torch.Tensor:
        """One pseudo-word ``[B, width]`` per reference (what :meth:`compose` receives for it)."""
        return self.phi(references.to(self.backbone.device).float())

    @torch.no_grad()
    def compose(self, references: torch.Tensor, queries: list[Query]) -> torch.Tensor:
        tokens = self.pseudo_words(references)
        variants = [caption_variants(q.texts) for q in queries]
        counts = [len(v) for v in variants]
        prompts = [benchmark_prompt(q, self.placeholder) or searle_prompt(t, self.placeholder)
                   for q, v in zip(queries, variants, strict=True) for t in v]
        repeated = tokens.repeat_interleave(torch.tensor(counts, device=tokens.device), dim=0)
        feats = encode_with_pseudo_tokens(self.text_encoder(), prompts, repeated, self.placeholder)
        return average_variants(feats, counts)

    def text_encoder(self) -> Backbone:
        """What encodes the prompts: the backbone (RTD: the backbone with its own tuned text tower)."""
        return self.backbone

    def info(self) -> dict:
        return {"checkpoint": self.checkpoint, "sha256": self.sha256}


def clean_caption(caption: str, tokenizer: Any, limit: int = 75) -> str:
    """LinCIR's (and RTD's) official cleaning of a caption: '<PERSON>' -> 'person', lower case, no '$', at most
    ``limit`` BPE tokens."""
    caption = (caption or "").replace("<PERSON>", "person").lower().replace("$", "").strip()
    encode, decode = getattr(tokenizer, "encode", None), getattr(tokenizer, "decode", None)
    if callable(encode) and callable(decode):
        ids = encode(caption)
        if len(ids) > limit:
            caption = decode(ids[:limit]).strip()
    return caption


#: LinCIR's demo Phi and the backbone it was trained on: ``lincir_large.pt`` of the commit that uploaded it
#: (5118df4, "upload all large models"), by its Git LFS sha256
LINCIR_DEMO = (HubFile("navervision/zeroshot-cir-models", "lincir_large.pt", "5118df4683de6efa09f8e5336d86ca626ed21c44",
                       "5ba98d52db7a5e9a78f9ba7436991235477b89544caf246e4659642bf9b409bd"), ("ViT-L-14", "openai"))


def lincir_demo_weights(backbone: Backbone, what: str = "train Phi (cirbench train --method lincir) and pass "
                        "--checkpoint", option: str = "checkpoint"):
    """The file of LinCIR's demo Phi (the Hugging Face hub's ``navervision/zeroshot-cir-models``
    ``lincir_large.pt``, trained on openai/clip-vit-large-patch14), for ViT-L-14/openai only; ``what`` tells
    what to do on another backbone, ``--option`` where to pass the file when it cannot be fetched."""
    lincir_demo_source(backbone.model_name, backbone.pretrained, what)
    return LINCIR_DEMO[0].fetch("LinCIR's demo weights", option=option)


def lincir_demo_source(model: str, pretrained: str, what: str = "train Phi (cirbench train --method lincir) and "
                       "pass --checkpoint") -> str:
    """``hf-hub:REPO@REVISION/FILE`` of LinCIR's demo Phi; CheckpointError (saying ``what`` to do) on another
    backbone."""
    from cirbench.errors import CheckpointError

    demo, (demo_model, demo_pretrained) = LINCIR_DEMO
    if (model, pretrained) != (demo_model, demo_pretrained):
        raise CheckpointError(f"LinCIR's demo weights are for {demo_model}/{demo_pretrained}; for {model}/"
                              f"{pretrained} {what}")
    return demo.source


class LinCIRProtocol(SearleProtocol):
    """The SEARLE protocol as LinCIR's ``validate.py`` runs it (and RTD's, which is LinCIR's): its own
    preprocessing, and the reference pixels handed to the float32 vision tower as ``images.half()``
    (``utils.extract_pseudo_tokens_with_phi``): rounded to fp16 on the way in (the gallery's are not)."""

    def reference_feature_kind(self) -> dict:
        return {**super().reference_feature_kind(), "pixels": "fp16"}

    def encode_references(self, pixels: torch.Tensor) -> torch.Tensor:
        return raw_image_features(self.backbone, pixels.to(self.backbone.device).half().float())
