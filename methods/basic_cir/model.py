"""BASIC: the official ``calculate_rankings`` (``--method basic``) as a cirbench method (see the plugin docstring).

What the official code does is followed to the operation, its quirks included: the corpus files are read with
their header row (``object_name`` is the first object name), ``1e-5`` is added to every entry of the contrastive
scatter matrix, only the query image is projected (the gallery is centred, not projected), and the expansion
weights are ``exp(0.1 cos)`` over the nearest images and the query itself (similarity 1). The eigen-decomposition
runs in float64 (the official one in float32 on the GPU).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cirbench.errors import CheckpointError
from cirbench.hub import given_or_pinned
from cirbench.method import Method, affine_queries, gallery_groups, query_chunks, with_constant
from cirbench.safe_unpickle import load_object_npy, load_tensor_pickle
from cirbench.types import Query
from cirbench.util import file_sha256, read_first_column

COMMIT = "463cc1d4881854f9667977b6dab0e775902ea760"  # github.com/billpsomas/icir
RAW = f"https://raw.githubusercontent.com/billpsomas/icir/{COMMIT}/"
CORPUS, NEGATIVE_CORPUS = "corpora/generic_subjects.csv", "corpora/generic_styles.csv"
LAION_MEAN = "data/laion_mean/laion_1m_mean_{kind}.pkl"
SYNTHETIC = "synthetic_data/dataset_1_sd_{kind}.pkl.npy"
SHA256 = {  # of the files at COMMIT (the synthetic features are not pinned: the mirror we read lacked them)
    CORPUS: "c090d82e6e592fa9c0dc50b33e796b1fbc595c735bf8d1bf1166396bcf86e70a",
    NEGATIVE_CORPUS: "5b7cdeb763e470c4b427a65e713bdd6c902e66d2ef5d82935f330cc93508a207",
    LAION_MEAN.format(kind="clip"): "afacfa72119a0837aa031d3fcc570b051bb0074c17577fb86b2168f9689e23ab",
    LAION_MEAN.format(kind="siglip"): "192bafe11847922f0a0d0868486ba5f132de467e70f10b4310f2863c9a2c5744",
}
SCATTER_SHIFT = 1e-5  # added to every entry of (1 - a) S_objects - a S_styles, as officially
EXPANSION_TEMPERATURE = 0.1  # expansion weights exp(0.1 * cos)
COMPONENTS = ("contextualize", "standardize", "laion_mean", "project", "query_expansion", "normalize")


def official_kind(backbone) -> str | None:
    """``clip`` or ``siglip``: the backbone the official LAION mean and synthetic features were made with."""
    return kind_of(str(backbone.model_name), str(backbone.pretrained or ""))


def kind_of(name: str, tag: str) -> str | None:
    """:func:`official_kind` of an open_clip model name and pretrained tag."""
    if (name, tag) == ("ViT-L-14", "openai"):
        return "clip"
    if name.removeprefix("hf-hub:timm/") == "ViT-L-16-SigLIP-256" and (tag == "webli" or name.startswith("hf-hub:")):
        return "siglip"
    return None


def needed_files(options: dict[str, Any], model: str, pretrained: str) -> dict[str, tuple[str | None, str]]:
    """``{option: (file in the official repository, what it is)}`` of each file BASIC reads with these options, in
    the order it reads them (an option given names the file instead); the file is None where it is published for
    other backbones only (:func:`unpublished` says what to do). What ``Basic`` reads and what --dry-run foresees
    (:func:`downloads`)."""
    on = {name: bool(options.get(name, True)) for name in COMPONENTS}
    files: dict[str, tuple[str | None, str]] = {}
    if on["contextualize"] or on["standardize"] or on["project"]:
        files["corpus"] = (CORPUS, "BASIC's object names")
    if on["project"]:
        files["negative_corpus"] = (NEGATIVE_CORPUS, "BASIC's style words")
    kind = kind_of(model, pretrained)
    if on["standardize"] and on["laion_mean"]:
        files["laion_mean_file"] = (LAION_MEAN.format(kind=kind) if kind else None, "BASIC's LAION-1M mean")
    if on["normalize"]:
        files["synthetic_data"] = (SYNTHETIC.format(kind=kind) if kind else None,
                                   "BASIC's synthetic normalisation features")
    return files


def unpublished(option: str, what: str, model: str, pretrained: str) -> CheckpointError:
    """The error for a per-backbone file BASIC's authors did not publish for this backbone, none given."""
    switch = "laion-mean" if option == "laion_mean_file" else "normalize"
    return CheckpointError(f"{what} is published for ViT-L-14/openai and ViT-L-16-SigLIP-256/webli only; for "
                           f"{model}/{pretrained} pass --{option.replace('_', '-')} FILE or --no-{switch}")


def downloads(options: dict[str, Any], model: str, pretrained: str) -> list[tuple[str, str]]:
    """MethodSpec.downloads of ``Basic``: the official files of :func:`needed_files` that no option names."""
    out = []
    for option, (relative, what) in needed_files(options, model, pretrained).items():
        if options.get(option):
            continue
        if relative is None:
            raise unpublished(option, what, model, pretrained)
        out.append((what, RAW + relative))
    return out


def read_corpus(path: Path) -> list[str]:
    """The first column of every row, the header row included, as the official ``csv.reader`` loop reads it."""
    return read_first_column(path, "corpus")


def contrastive_projection(objects: torch.Tensor, styles: torch.Tensor, weight: float, components: int) -> tuple[
        torch.Tensor, int]:
    """``V^T V`` over the top eigenvectors of ``(1 - a) S_objects - a S_styles + 1e-5`` (the scatter matrices of
    the centred corpora, over ``n - 1``), at most ``components`` of them and only those of positive eigenvalue;
    returns it and how many were kept."""
    a, b = objects.double(), styles.double()
    scatter = (1 - weight) * (a.T @ a / (a.shape[0] - 1)) - weight * (b.T @ b / (b.shape[0] - 1)) + SCATTER_SHIFT
    values, vectors = torch.linalg.eigh(scatter)  # ascending
    kept = min(components, int((values > 0).sum()))
    top = vectors.flip(dims=[1])[:, :kept]  # [D, kept], descending eigenvalues
    return (top @ top.T).float(), kept


class Basic(Method):
    """Two vectors per query, the expanded and projected image and the contextualised text, both centred and
    folded with the gallery's centring and normalisation; the gallery's unit features with a 1 appended; scores
    fused by :meth:`combine_scores`."""

    query_vectors = 2
    unit_features = False  # centred and projected: the fusion reads the similarities' sizes

    def __init__(self, backbone, options, dataset=None):
        super().__init__(backbone, options, dataset)
        o = self.options
        self.on = {name: bool(o.get(name, True)) for name in COMPONENTS}
        self.sources: dict[str, dict[str, str]] = {}
        files = needed_files(o, backbone.model_name, backbone.pretrained)
        self.words = read_corpus(self._file("corpus", *files["corpus"])) if "corpus" in files else []
        self.styles = read_corpus(self._file("negative_corpus", *files["negative_corpus"])) \
            if "negative_corpus" in files else []
        self.laion: torch.Tensor | None = None
        if "laion_mean_file" in files:
            self.laion = self._laion_mean(self._file("laion_mean_file", *files["laion_mean_file"]))
        self.synthetic: tuple[torch.Tensor, torch.Tensor] | None = None
        if "synthetic_data" in files:
            self.synthetic = self._synthetic(self._file("synthetic_data", *files["synthetic_data"]))
        self.rows: dict[str, int] = {}
        self.mean_text = torch.zeros(backbone.embed_dim)
        self.projection: torch.Tensor | None = None
        self.kept = 0
        self.limits: dict[tuple[float, ...], tuple[float, float]] = {}  # per image mean: see _normalisation
        self.texts: dict[str, torch.Tensor] = {}

    # -- files -------------------------------------------------------------------------------------------
    def _file(self, option: str, relative: str | None, what: str) -> Path:
        if relative is None and not self.options.get(option):
            raise unpublished(option, what, self.backbone.model_name, self.backbone.pretrained)
        path = given_or_pinned(self.options.get(option), option, RAW + (relative or ""), SHA256.get(relative or ""),
                               what)
        self.sources[option] = {"path": str(path), "sha256": file_sha256(path)}
        return path

    def _laion_mean(self, path: Path) -> torch.Tensor:
        value: Any
        if path.suffix == ".npy":
            value = load_object_npy(path)
        else:
            value = load_tensor_pickle(path)
            value = value.get("laion_1m_mean") if isinstance(value, dict) else value
        mean = torch.as_tensor(value, dtype=torch.float32).reshape(-1) if value is not None else None
        if mean is None or mean.numel() != self.backbone.embed_dim:
            raise CheckpointError(f"LAION mean {path} is not one {self.backbone.embed_dim}-d vector (the backbone's "
                                  "feature size): it was made for another backbone")
        return mean

    def _synthetic(self, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        data = load_object_npy(path)
        try:
            pair = tuple(torch.as_tensor(data[k], dtype=torch.float32) for k in ("image_features", "text_features"))
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"synthetic features {path} hold no 'image_features' and 'text_features' "
                                  "arrays") from None
        if any(t.ndim != 2 or t.shape[1] != self.backbone.embed_dim or not len(t) for t in pair):
            raise CheckpointError(f"synthetic features {path} are not [N, {self.backbone.embed_dim}] arrays (the "
                                  "backbone's feature size): they were made for another backbone")
        return pair[0], pair[1]

    def info(self) -> dict:
        return {"components": {k: v for k, v in self.on.items()}, **self.sources}

    def label_tag(self) -> str | None:
        off = [f"no-{name.replace('_', '-')}" for name in COMPONENTS if not self.on[name]]
        return "+".join(off) or None

    def summary(self) -> dict:
        summary: dict[str, Any] = {"principal_components": self.kept}
        if len(self.limits) == 1:
            summary["normalisation_minima"] = list(next(iter(self.limits.values())))
        elif self.limits:  # one per gallery centred by its own mean
            summary["normalisation_minima"] = {"galleries": len(self.limits), **{
                what: [min(v[i] for v in self.limits.values()), max(v[i] for v in self.limits.values())]
                for i, what in enumerate(("image_range", "text_range"))}}
        return summary

    # -- statistics --------------------------------------------------------------------------------------
    def _corpus_features(self, names: list[str]) -> torch.Tensor:
        key = ("basic-corpus", tuple(names))
        return self.backbone.derived(key, lambda: torch.nn.functional.normalize(
            self.backbone.encode_text_rows(names), dim=-1))

    def prepare_gallery(self, ids: list[str], features: torch.Tensor) -> torch.Tensor:
        """The gallery's unit features with a constant 1 appended, and the statistics that hold for every gallery.

        Centring and the synthetic normalisation are affine in each similarity, so the queries carry them
        (:meth:`finalize_queries`): ``q . (g - m)`` is ``[q, -q . m] . [g, 1]``. That keeps one prepared gallery
        right for queries centred by different means: officially, without the LAION mean, each i-CIR instance's
        images and queries are centred by the mean of that instance's database."""
        device = self.backbone.device
        gallery = torch.nn.functional.normalize(features.float(), dim=-1)
        self.rows = {image: i for i, image in enumerate(ids)}
        objects = self._corpus_features(self.words) if self.words else None
        zero = torch.zeros(self.backbone.embed_dim, device=device)
        self.mean_text = objects.mean(0).to(device) if self.on["standardize"] and objects is not None else zero
        if self.on["project"]:
            assert objects is not None
            styles = self._corpus_features(self.styles)
            self.projection, self.kept = contrastive_projection(objects - self.mean_text.to(objects.device),
                                                                styles - self.mean_text.to(styles.device),
                                                                float(self.options.get("negative_weight", 0.2)),
                                                                int(self.options.get("components", 250)))
            self.projection = self.projection.to(device)
        self.limits.clear()
        return with_constant(gallery, 1.0)

    def _image_mean(self, own: torch.Tensor) -> torch.Tensor:
        """What the images ranking the gallery ``own`` (unit features) are centred by: LAION's mean, or the mean
        of ``own`` (the whole gallery, or an i-CIR instance's database, as officially), or nothing."""
        if not self.on["standardize"]:
            return torch.zeros(own.shape[1], device=own.device)
        return self.laion.to(own.device) if self.laion is not None else own.mean(0)

    def _normalisation(self, mean_image: torch.Tensor) -> tuple[float, float]:
        """The synthetic pairs' least image-image and text-image similarity, both centred (images by
        ``mean_image``, texts by the corpus mean), as ``(low_image, low_text)``; memoised per mean."""
        key = tuple(mean_image.tolist())
        if key not in self.limits:
            assert self.synthetic is not None
            images, texts = (torch.nn.functional.normalize(t.to(mean_image.device), dim=-1) for t in self.synthetic)
            images, texts = images - mean_image, texts - self.mean_text.to(mean_image.device)
            self.limits[key] = (float((images @ images.T).min()), float((texts @ images.T).min()))
        return self.limits[key]

    # -- queries -------------------------------------------------------------------------------------------
    def _text_features(self, texts: list[str]) -> torch.Tensor:
        """Each text's feature: contextualised (the mean of ``"{name} {text}"`` and ``"{text} {name}"`` over the
        corpus's first names), then normalised."""
        missing = [t for t in dict.fromkeys(texts) if t not in self.texts]
        if missing and self.on["contextualize"]:
            words = self.words[: int(self.options.get("context_words", 100))]
            for text in missing:
                both = [f"{w} {text}" for w in words] + [f"{text} {w}" for w in words]
                mean = self.backbone.encode_text(both, memoize=False).float().mean(0)
                self.texts[text] = torch.nn.functional.normalize(mean, dim=-1)
        elif missing:
            for text, feature in zip(missing, self.backbone.encode_text(missing).float(), strict=True):
                self.texts[text] = feature
        return torch.stack([self.texts[t] for t in texts])

    def compose(self, references: torch.Tensor, queries: list[Query]) -> torch.Tensor:
        """The unit image feature and the centred text feature (a last entry 0 to match the gallery's width);
        what depends on the gallery a query ranks is done in :meth:`finalize_queries`."""
        device = self.backbone.device
        image = torch.nn.functional.normalize(references.float().to(device), dim=-1)
        text = self._text_features([" and ".join(q.texts) for q in queries]).to(device) - self.mean_text
        return with_constant(torch.stack([image, text], dim=1), 0.0)

    def finalize_queries(self, queries: list[Query], features: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
        """Per gallery a query ranks (i-CIR's instance database, else the whole gallery): the image centred,
        expanded (``query_expansion``: a weighted mean with its nearest centred gallery images) and projected;
        then both vectors folded with the gallery's centring and the synthetic normalisation, so that their
        product with ``[g, 1]`` is ``(v . (g - m) - low) / |low_image|``."""
        dim = features.shape[-1] - 1
        image, text = features[:, 0, :dim], features[:, 1, :dim]
        project = (lambda x: x @ self.projection) if self.projection is not None else (lambda x: x)
        out = torch.empty_like(features)
        k = int(self.options.get("expansion_k", 25))
        for members, own in gallery_groups(queries, gallery, self.rows):
            own = own[:, :dim].float()
            mean = self._image_mean(own)
            low_image, low_text = self._normalisation(mean) if self.synthetic is not None else (0.0, 0.0)
            scale = 1.0 / abs(low_image) if self.synthetic is not None else 1.0
            centred = own - mean if self.on["query_expansion"] else own  # read only to expand
            for chosen in query_chunks(members, image.device):
                query = image[chosen] - mean
                if self.on["query_expansion"]:
                    values, nearest = (project(query) @ centred.T).topk(min(k, len(centred)), dim=1)
                    stack = torch.cat([centred[nearest], query.unsqueeze(1)], dim=1)  # [n, k + 1, D]
                    weights = torch.exp(EXPANSION_TEMPERATURE * torch.cat([values, torch.ones_like(values[:, :1])], 1))
                    query = (stack * (weights / weights.sum(dim=1, keepdim=True)).unsqueeze(-1)).sum(dim=1)
                for slot, vector, low in ((0, project(query), low_image), (1, text[chosen], low_text)):
                    out[chosen, slot] = affine_queries(vector, mean, scale, low)
        return out

    def combine_scores(self, sims: torch.Tensor) -> torch.Tensor:
        """Harris' corner score of the two similarities (already shifted and scaled by the synthetic minima, both by
        the image one's size as officially: see :meth:`finalize_queries`), clipped at zero."""
        image, text = sims[..., 0, :].clamp(min=0), sims[..., 1, :].clamp(min=0)
        lam = float(self.options.get("harris_lambda", 0.1))
        return text * image - lam * (text + image) ** 2
