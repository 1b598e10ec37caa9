"""The base class of a method plugin: how query and gallery features are made.

A method subclasses :class:`Method` and registers a :class:`~cirbench.types.MethodSpec` whose
``factory`` points at the subclass. The evaluation loop, for each eval set:

1. calls :meth:`Method.prepare` once with the set's queries and reference images (targets removed): methods
   that work per query set, such as captioning the references and rewriting captions with a language model,
   do it there; it comes first, so that a model that cannot be loaded or a generation that cannot be
   replayed fails before the gallery is encoded;
2. encodes the gallery with :meth:`Method.encode_gallery` (cached under :meth:`gallery_feature_kind`) and
   passes the features with the images' ids to :meth:`Method.prepare_gallery`, whose return is the gallery
   the queries are ranked against (by default the features unchanged; WeiMoCIR appends the text features of
   captions of each gallery image);
3. encodes the distinct reference images with :meth:`Method.encode_references` (cached under
   :meth:`reference_feature_kind`; by default the same kind as the gallery, so they are reused; a method
   whose kind is ``None`` needs no reference features and gets ``[B, 0]`` tensors), and passes them all to
   :meth:`Method.prepare_references` (work per reference image over the whole set, such as optimising a
   pseudo-word for each; by default nothing);
4. calls :meth:`Method.compose` on batches of queries with their reference features. A method with
   ``query_vectors = K > 1`` returns ``[B, K, D]`` and scores them with :meth:`Method.combine_scores`;
5. calls :meth:`Method.finalize_queries` once with all the set's query features and the gallery features
   (the default returns them unchanged; a method whose official protocol weighs its queries by statistics of
   the whole query set against the gallery, as LDRE does on CIRCO, does it there), and ranks the returned
   (normalised) query features against the gallery.

A method never sees a dataset's metrics, targets or annotation files; it knows the dataset's name (for
per-dataset defaults), the queries' texts, their reference images, the gallery's images (in :meth:`prepare`)
and (in :meth:`prepare_gallery` and :meth:`finalize_queries`) the gallery's features, and the gallery images' ids.
Where each query ranks a gallery of its own (GeneCIS's templates, i-CIR's instances), a query's
``candidates`` name that gallery (sorted by id, so that their order says nothing); elsewhere they are hidden
(CIRR's subsets would give the target away).

The backbone a method gets is shared: by the other methods and benchmarks of a ``cirbench run`` and, in
training, by the training itself. Never change it in place (weights, hooks left behind, merged adapters):
copy what the method adapts, as Slerp+TAT copies the image tower.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .backbones import Backbone
from .types import ImageRef, Query


@dataclass
class QuerySet:
    """What :meth:`Method.prepare` sees of an evaluation set: its queries with targets and candidate subsets
    removed, their reference images by id, where the run caches things, whether to show progress, and the
    gallery's images by id (the database a method may index, as WeiMoCIR captions each of its images; which
    of them answers which query is never said)."""

    dataset: str
    split: str
    name: str
    queries: list[Query]
    references: dict[str, ImageRef]
    cache_dir: Path | None = None
    progress: bool = True
    gallery: dict[str, ImageRef] = field(default_factory=dict)


class Method:
    """Base class for method plugins (see the module docstring). The method's name comes from its registered
    :class:`~cirbench.types.MethodSpec` (bound by the loop when it builds the method)."""

    spec: Any = None
    query_vectors: int = 1  # K > 1: compose returns [B, K, D], scored by combine_scores
    # False: compose, finalize_queries and prepare_gallery return vectors of any length, ranked by their inner
    # products as they are (BASIC's centred and projected features, whose similarities are fused by size)
    unit_features: bool = True

    def bind_spec(self, spec: Any) -> None:
        self.spec = spec

    @property
    def name(self) -> str:
        return self.spec.name if self.spec is not None else type(self).__name__.lower()

    def __init__(self, backbone: Backbone, options: dict[str, Any], dataset: str | None = None):
        self.backbone = backbone
        self.options = dict(options)
        self.dataset = dataset

    # -- gallery ---------------------------------------------------------------------------------
    def gallery_feature_kind(self) -> dict:
        """What, besides backbone, preprocessing and precision, identifies the gallery features.

        The default is the plain CLIP image feature, shared by every method that does not override
        :meth:`encode_gallery`. A class that overrides it gets its own kind, named after the class, so its
        features can never be served to another method (or another method's to it); methods whose encoder
        has weights (LoRA, fine-tuning) should add their checkpoint hash.
        """
        owner = _owner(type(self), "encode_gallery")
        if owner is Method:
            return {"kind": "image-global"}
        return {"kind": "image-global", "encoder": f"{owner.__module__}.{owner.__qualname__}"}

    def encode_gallery(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised gallery features ``[B, D]`` for a preprocessed batch."""
        return self.backbone.encode_image(pixels)

    def prepare_gallery(self, ids: list[str], features: torch.Tensor) -> torch.Tensor:
        """The gallery the queries are ranked against, from the encoded gallery ``features`` ``[G, D]`` (cached,
        in the run's precision) of the images ``ids`` (gallery order); called once per evaluation set, after
        :meth:`prepare` and before any :meth:`compose`. One L2-normalised row per image, of any width:
        :meth:`compose` returns that width. A method that scores a gallery image by more than its image
        feature puts it here (WeiMoCIR appends the text features of captions of each image, so that one inner
        product weighs image and caption similarities). Default: the features unchanged."""
        return features

    # -- references ------------------------------------------------------------------------------
    def reference_feature_kind(self) -> dict | None:
        """What identifies the reference-image features (default: the gallery features, reused when
        :meth:`encode_references` is not overridden; otherwise a kind named after the overriding class).
        ``None``: the method needs no reference features (it reads its reference images in :meth:`prepare`)."""
        owner = _owner(type(self), "encode_references")
        if owner is Method:
            return self.gallery_feature_kind()
        return {"kind": "references", "encoder": f"{owner.__module__}.{owner.__qualname__}"}

    def encode_references(self, pixels: torch.Tensor) -> torch.Tensor:
        """Reference-image features ``[B, ...]`` (any trailing shape) for a preprocessed batch."""
        return self.encode_gallery(pixels)

    def prepare_references(self, ids: list[str], features: torch.Tensor) -> torch.Tensor:
        """Work done once per evaluation set on the features of all its distinct reference images (``ids``, in
        first-use order, with ``features`` from :meth:`encode_references`), after they are encoded and before
        any :meth:`compose`; returns what :meth:`compose` receives for them, one row per reference (any
        trailing shape). Gradients are enabled. Default: the features unchanged. SEARLE-OTI optimises one
        pseudo-word per reference image here."""
        return features

    # -- queries ---------------------------------------------------------------------------------
    def prepare(self, query_set: QuerySet) -> None:
        """Work done once per evaluation set, before its images are encoded and before any :meth:`compose`
        (default: nothing)."""

    def compose(self, references: torch.Tensor, queries: list[Query]) -> torch.Tensor:
        """Normalised query features ``[B, D]`` from reference features ``[B, ...]`` and the queries."""
        raise NotImplementedError

    def finalize_queries(self, queries: list[Query], features: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
        """The query features to rank, from what :meth:`compose` returned for every query of the set
        (``features``, in the order of ``queries``, whose targets are removed) and the set's gallery features
        ``[G, D]`` (on the device, in the run's precision); same shape, normalised. Default: unchanged."""
        return features

    def combine_scores(self, sims: torch.Tensor) -> torch.Tensor:
        """One score per gallery item ``[..., G]`` from the cosine similarities ``[..., K, G]`` of a query's K
        vectors (only used when ``query_vectors > 1``)."""
        raise NotImplementedError

    def query_details(self, query: Query) -> dict[str, Any] | None:
        """What the method made for one query that a reader of the predictions wants to see (generated
        captions, rewritten texts); written into the predictions file. Default: nothing."""
        return None

    def info(self) -> dict:
        """Extra identity for the result file (checkpoint path and hash, ...): configuration only, known when
        the method is built (the run's fingerprint includes it). Record a file it read as ``{"path": ...,
        "sha256": ...}`` (or ``"checkpoint"`` for the path): the fingerprint counts the sha256, not the path."""
        return {}

    def summary(self) -> dict:
        """What the method did during the run, for the result file (e.g. generations made, replayed or
        imported, and a digest of the generated texts). Default: nothing."""
        return {}

    def label_tag(self) -> str | None:
        """A tag the run's label carries (``lincir+demo-weights``), for results that must not pass for others."""
        return None


def _owner(cls: type, name: str) -> type:
    """The class in ``cls``'s MRO that defines ``name``."""
    for klass in cls.__mro__:
        if name in vars(klass):
            return klass
    return Method


def gallery_groups(queries: list[Query], gallery: torch.Tensor,
                   rows: dict[str, int]) -> Iterator[tuple[list[int], torch.Tensor]]:
    """The positions of ``queries`` that rank one gallery, with that gallery's rows of ``gallery`` (the set's
    prepared gallery; ``rows``: each image id's row, as :meth:`Method.prepare_gallery` was given them): a query's
    own ``candidates`` where a set gives each query a gallery of its own (i-CIR's instance databases), else the
    whole gallery. Methods that look into the gallery for a query (query expansion, neighbours) look there."""
    groups: dict[tuple[str, ...] | None, list[int]] = {}
    for qi, q in enumerate(queries):
        groups.setdefault(q.candidates or None, []).append(qi)
    for candidates, members in groups.items():
        if candidates is None:
            yield members, gallery
        else:
            yield members, gallery[torch.as_tensor([rows[c] for c in candidates], device=gallery.device)]


QUERY_CHUNK = 256  # queries whose per-query maps (standardisation, expansion) are made at once


def query_chunks(members: list[int], device: torch.device) -> Iterator[torch.Tensor]:
    """``members`` (query positions, as :func:`gallery_groups` gives them) in chunks of :data:`QUERY_CHUNK`, as
    index tensors on ``device``: what a method that maps each query against its gallery holds at once stays
    bounded however many queries share one gallery."""
    for start in range(0, len(members), QUERY_CHUNK):
        yield torch.as_tensor(members[start : start + QUERY_CHUNK], device=device)


def with_constant(features: torch.Tensor, value: float) -> torch.Tensor:
    """``features`` with one more entry, ``value``, on their last axis: a gallery's 1 (and a composed query's
    placeholder 0) for methods whose queries carry an affine map of each similarity (:func:`affine_queries`)."""
    return torch.cat([features, features.new_full((*features.shape[:-1], 1), value)], dim=-1)


def affine_queries(vectors: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor | float,
                   shift: torch.Tensor | float = 0.0) -> torch.Tensor:
    """``[v * scale, (-v . mean - shift) * scale]`` for each vector ``v`` of ``vectors`` (``[..., D]``; ``scale``
    and ``shift`` per vector, ``[...]``, or one for all): its product with a gallery row ``[g, 1]``
    (:func:`with_constant`) is ``(v . (g - mean) - shift) * scale``. A method that centres, standardises or
    shifts its similarities per query gallery (BASIC, WeiCom) keeps one prepared gallery this way."""
    scale = torch.as_tensor(scale, dtype=vectors.dtype, device=vectors.device)
    return torch.cat([vectors * scale.unsqueeze(-1), ((-(vectors @ mean) - shift) * scale).unsqueeze(-1)], dim=-1)


def caption_variants(texts: tuple[str, ...] | list[str]) -> list[str]:
    """The texts a query's modification is encoded as.

    One text: itself. Two texts (FashionIQ): the SEARLE convention, forward ``"{c1} and {c2}"`` and
    reverse ``"{c2} and {c1}"``, captions stripped of ``.?, `` at both ends; the caller encodes both and
    averages the normalised features.
    """
    if len(texts) == 1:
        return [texts[0]]
    caps = [t.strip(".?, ") for t in texts[:2]]
    return [f"{caps[0]} and {caps[1]}", f"{caps[1]} and {caps[0]}"]


def capitalized_forward_text(texts: tuple[str, ...] | list[str]) -> str:
    """One text: itself. FashionIQ's two captions as CLIP4Cir's evaluation joins them, and the methods built on
    it after (TransAgg, FTI4CIR, WeiMoCIR): ``"{c1} and {c2}"``, both stripped of ``.?, `` at their ends and the
    first through Python's ``str.capitalize`` (which lowercases the rest of it)."""
    if len(texts) == 1:
        return texts[0]
    c1, c2 = (t.strip(".?, ") for t in texts[:2])
    return f"{c1.capitalize()} and {c2}"


def average_variants(features: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Average consecutive groups of normalised features (``counts`` per query) and renormalise."""
    out = []
    start = 0
    for n in counts:
        out.append(features[start : start + n].mean(0))
        start += n
    return torch.nn.functional.normalize(torch.stack(out), dim=-1)
