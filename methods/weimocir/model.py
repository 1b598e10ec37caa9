"""WeiMoCIR: weighted modality fusion of raw embeddings, and weighted image and caption similarities.

Scoring is one inner product in a product space: a gallery row is ``[image, caption_1, .., caption_K]`` (each
block normalised, the row scaled to unit norm) and a query ``[(1 - beta) q_image, beta/K q_1, .., beta/K q_K]``
(normalised), so that ``query . row`` is the official ``beta * mean_j(q_j . caption_j) + (1 - beta) q_image .
image`` up to a positive factor per query, which leaves every ranking as it is; either retrieval backend ranks
it, and the image features stay the shared, cached ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from cirbench.errors import CirbenchError
from cirbench.generation import GenerationCache
from cirbench.generation.images import caption_missing, generate_once, image_digests
from cirbench.generation.options import caption_request_of, captioner_of, generation_precision
from cirbench.method import Method, QuerySet, capitalized_forward_text
from cirbench.methods._shared.textinv import RawImageReferences
from cirbench.types import ImageRef, Query
from cirbench.util import default_cache_dir, file_sha256, keyed_texts_sha256, read_json_file

F = torch.nn.functional


def modification_text(texts: tuple[str, ...] | list[str]) -> str:
    """The modification text of a query: its one caption, or FashionIQ's two as WeiMoCIR's ``validate_clip.py``
    joins them (forward order only, :func:`~cirbench.method.capitalized_forward_text`)."""
    return capitalized_forward_text(texts)


def read_captions(path: Path, per_image: int) -> dict[str, list[str]]:
    """``{image id: its first per_image captions}`` from the official captions file; a one-line error for a
    file that is missing, malformed, or gives an image fewer captions than are used."""
    where = f"--captions: {path}"
    data = read_json_file(path, "--captions")
    if not isinstance(data, list):
        raise CirbenchError(f"{where}: expected a list of {{\"candidate\": id, \"captions\": [...]}} records, "
                            f"found {type(data).__name__}")
    out: dict[str, list[str]] = {}
    for i, item in enumerate(data):
        if not isinstance(item, dict) or "candidate" not in item or "captions" not in item:
            continue  # the official reader skips records without both fields
        name, captions = item["candidate"], item["captions"]
        if not isinstance(name, str) or not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise CirbenchError(f"{where}, record {i}: 'candidate' must be an image id and 'captions' a list of texts")
        if len(captions) < per_image:
            raise CirbenchError(f"{where}, record {i}: image {name!r} has {len(captions)} captions; "
                                f"--captions-per-image is {per_image}")
        out[name] = captions[:per_image]  # a later record of the same image wins, as in the official dict
    return out


class WeiMoCIR(RawImageReferences, Method):
    """See the plugin docstring and the module docstring for the formulas and how they are ranked."""

    def __init__(self, backbone, options, dataset=None):
        super().__init__(backbone, options, dataset)
        self.alpha = float(self.options["alpha"])
        self.beta = float(self.options["beta"])
        self.per_image = int(self.options["captions_per_image"])
        path, captioner = self.options.get("captions"), self.options.get("captioner")
        self.captions: dict[str, list[str]] = {}
        self.captions_info: dict[str, str | int] | None = None
        self.caption_request: dict[str, Any] | None = None  # captions written by --captioner
        self.stats = {"cached": 0, "generated": 0}
        self.set_name, self.progress = "gallery", True  # what prepare() says of the evaluation set
        if self.beta == 0:
            return
        if path and captioner:
            raise CirbenchError("weimocir: pass --captions FILE or --captioner MODEL, not both")
        if captioner:
            self.caption_request = caption_request_of(self.options, self.per_image)
            return
        if not path:
            raise CirbenchError(f"weimocir scores gallery images by their captions too (--beta {self.beta:g}): "
                                "pass --captions FILE (captions of the benchmark's images; WeiMoCIR's repository "
                                "ships CIRR's, cirr_dataset/cirr_labeled_images_cir_cleaned.json), --captioner "
                                "hf:MODEL to write them, or --beta 0 for the image similarity alone")
        self.captions = read_captions(Path(path).expanduser(), self.per_image)
        self.captions_info = {"path": str(path), "sha256": file_sha256(Path(path).expanduser()),
                              "images": len(self.captions)}

    def info(self) -> dict:
        if self.caption_request is not None:
            return {"captioner": self.caption_request["model"],
                    "caption_prompt": self.options.get("caption_prompt") or "",
                    "caption_decoding": self.caption_request["params"]}
        return {"captions": self.captions_info} if self.captions_info else {}

    def label_tag(self) -> str | None:
        """``captions-<captioner>`` for captions a captioner wrote: such a result is WeiMoCIR with other captions
        than the paper's, and must not pass for it (or for a run on another captioner's) in a leaderboard."""
        if self.caption_request is None:
            return None
        return "captions-" + Path(self.caption_request["model"].partition(":")[2].rstrip("/")).name

    def summary(self) -> dict:
        if self.caption_request is None:
            return {}
        digest = keyed_texts_sha256((image, self.captions[image]) for image in sorted(self.captions))
        return {"generations": dict(self.stats), "captions_sha256": digest,
                "captioned_images": len(self.captions)}

    def _raw_texts(self, texts: list[str]) -> torch.Tensor:
        return self.backbone.encode_text(texts, normalize=False)

    def _caption_features(self, ids: list[str], j: int, bar=None) -> torch.Tensor:
        """Raw text features of caption ``j`` of each image (the empty caption for an image the file lacks): rows
        of the run's feature cache (a gallery's captions, hundreds of thousands on CIRCO, are encoded once, not on
        every run), never the backbone's text memo (they would fill it)."""
        return self.backbone.encode_text_rows([self.captions[i][j] if i in self.captions else "" for i in ids],
                                              bar=bar)

    def prepare(self, query_set: QuerySet) -> None:
        self.set_name, self.progress = query_set.name, query_set.progress
        if self.caption_request is None:
            return
        qs = query_set
        images = {i: ref for i, ref in {**qs.gallery, **qs.references}.items() if i not in self.captions}
        if not images:  # captioned for an earlier evaluation set
            return
        folder = (qs.cache_dir or default_cache_dir()) / "generations"
        mode = str(self.options.get("generation") or "auto")
        generate_once(folder, mode, {"caption": self.caption_request, "images": sorted(images)},
                      f"{qs.name}: waiting for another process that is captioning the same images; its captions "
                      "will be used", lambda cache: self._caption_images(qs, images, cache))

    def _caption_images(self, qs: QuerySet, images: dict[str, ImageRef], cache: GenerationCache) -> None:
        """Each image's captions: recorded ones, else written by the captioner (see :func:`caption_missing`)."""
        assert self.caption_request is not None
        todo = []
        digests = image_digests(list(images.values()), qs.name, qs.progress)
        for (image, ref), digest in zip(images.items(), digests, strict=True):
            key = {**self.caption_request, "image": digest}
            hit = cache.lookup(key)
            if hit is not None and len(hit) == self.per_image:
                self.captions[image] = hit
            else:
                todo.append((image, ref, key))
        self.captions.update(caption_missing(todo, cache, self._build_captioner, model=self.caption_request["model"],
                                             precision=generation_precision(self.options), name=qs.name,
                                             progress=qs.progress))
        for count in self.stats:
            self.stats[count] += cache.stats.get(count, 0)

    def _build_captioner(self):
        return captioner_of(self.options, self.per_image, str(self.backbone.device))

    def prepare_gallery(self, ids: list[str], features: torch.Tensor) -> torch.Tensor:
        if self.beta == 0:
            return features
        image = F.normalize(features.float().to(self.backbone.device), dim=-1)
        return F.normalize(torch.cat([image, self._gallery_captions(ids)], dim=-1), dim=-1)

    def _gallery_captions(self, ids: list[str]) -> torch.Tensor:
        """``[G, K*D]``: the normalised text features of each gallery image's K captions side by side, encoded
        once per backbone for every value of a sweep (kept by :meth:`Backbone.derived` under the captions'
        digest)."""
        digest = keyed_texts_sha256((i, self.captions.get(i, [""] * self.per_image)) for i in ids)

        def encode() -> torch.Tensor:
            with tqdm(total=len(ids) * self.per_image, desc=f"{self.set_name}: gallery captions",
                      unit="text", disable=not self.progress, leave=False) as bar:
                return torch.cat([F.normalize(self._caption_features(ids, j, bar), dim=-1)
                                  for j in range(self.per_image)], dim=-1)

        return self.backbone.derived(("weimocir:gallery-captions", self.per_image, digest), encode)

    def compose(self, references: torch.Tensor, queries: list[Query]) -> torch.Tensor:
        text = self._raw_texts([modification_text(q.texts) for q in queries])
        image = references.to(text.device).float()
        query = F.normalize((1 - self.alpha) * image + self.alpha * text, dim=-1)
        if self.beta == 0:
            return query
        refs = [q.reference for q in queries]
        parts = [(1 - self.beta) * query]
        for j in range(self.per_image):
            fused = F.normalize((1 - self.alpha) * self._caption_features(refs, j) + self.alpha * text, dim=-1)
            parts.append(self.beta / self.per_image * fused)
        return F.normalize(torch.cat(parts, dim=-1), dim=-1)

    def query_details(self, query: Query) -> dict | None:
        if self.beta == 0:
            return None
        return {"reference_captions": self.captions.get(query.reference, [""] * self.per_image)}
