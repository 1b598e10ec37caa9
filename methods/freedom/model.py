"""FREEDOM: the official ``calculate_rankings`` (``--method freedom``) as a cirbench method (see the plugin
docstring).

Followed to the operation: whether the query image joins its neighbours is decided once for a whole set of
queries, as officially for each domain pair (when some query's best gallery match is below 0.98 cosine, i.e. not
its own copy, every query's image is put first and its last neighbour dropped); words are counted over the
neighbours in order, ties kept in the order the words were first met; the fused query is ranked by its inner
product with the gallery (its length changes no ranking, so it is normalised here).
"""

from __future__ import annotations

import torch

from cirbench.errors import CirbenchError
from cirbench.hub import given_or_pinned
from cirbench.method import Method, gallery_groups
from cirbench.types import Query
from cirbench.util import file_sha256, read_first_column

COMMIT = "5df4bca6f53b365ee2bc06da7b070bcdfdf2b516"  # github.com/NikosEfth/freedom
VOCABULARY_URL = f"https://raw.githubusercontent.com/NikosEfth/freedom/{COMMIT}/data/open_image_v7_class_names.csv"
VOCABULARY_SHA256 = "422cfba670f27ff984934e540caedf88ebe0091af2a3231a1be758147f7f1f6b"
SELF_MATCH = 0.98  # a best gallery match at least this close is the query's own image
WORD_CHUNK = 256  # queries whose neighbours are matched against the vocabulary at once


def frequent_words(named: list[list[list[str]]], miu: int) -> tuple[list[list[str]], list[list[float]]]:
    """The official ``keep_k_most_frequent``: per query, the ``miu`` words named most often over its neighbours
    (ties in the order first met; the empty word counts 0), with weights count / largest count."""
    words, weights = [], []
    for neighbours in named:
        counts: dict[str, int] = {}
        for listed in neighbours:
            for word in listed:
                counts[word] = counts.get(word, 0) + 1
                if word == "":
                    counts[word] = 0
        top = sorted(counts, key=lambda w: counts[w], reverse=True)[:miu]
        values = [counts[w] for w in top]
        largest = max(max(values), 0.0001)
        words.append(top)
        weights.append([v / largest for v in values])
    return words, weights


class Freedom(Method):
    def __init__(self, backbone, options, dataset=None):
        super().__init__(backbone, options, dataset)
        path = given_or_pinned(self.options.get("vocabulary"), "vocabulary", VOCABULARY_URL, VOCABULARY_SHA256,
                               "FREEDOM's vocabulary (Open Images v7 class names)")
        self.vocabulary = read_first_column(path, "vocabulary")
        self.source = {"path": str(path), "sha256": file_sha256(path)}
        self.kappa, self.ni, self.miu = (int(self.options.get(k) or d) for k, d in (("kappa", 20), ("ni", 7),
                                                                                    ("miu", 7)))
        self.rows: dict[str, int] = {}
        self.words: dict[str, list[str]] = {}  # query id -> the words it was composed with (the predictions)

    def info(self) -> dict:
        return {"vocabulary": self.source}

    def prepare_gallery(self, ids: list[str], features: torch.Tensor) -> torch.Tensor:
        self.rows = {image: i for i, image in enumerate(ids)}
        return features

    def compose(self, references: torch.Tensor, queries: list[Query]) -> torch.Tensor:
        """The reference image's feature: the words are found in :meth:`finalize_queries`, from the gallery."""
        return torch.nn.functional.normalize(references.float(), dim=-1)

    def _vocabulary_features(self) -> torch.Tensor:
        return self.backbone.derived(("freedom-vocabulary", tuple(self.vocabulary)),
                                     lambda: torch.nn.functional.normalize(
                                         self.backbone.encode_text_rows(self.vocabulary), dim=-1))

    def finalize_queries(self, queries: list[Query], features: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
        """Each query as the weighted sum of ``"{word} {text}"`` over its frequent words (see the module)."""
        device = features.device
        vocabulary = self._vocabulary_features().to(device)
        images = features.float()
        neighbours = torch.empty(len(queries), self.kappa, images.shape[1], device=device)
        best = torch.empty(len(queries), device=device)
        for members, own in gallery_groups(queries, gallery, self.rows):
            if own.shape[0] < self.kappa:
                raise CirbenchError(f"freedom: --kappa {self.kappa} is more than the {own.shape[0]} images of a "
                                    "query's gallery")
            chosen = torch.as_tensor(members, device=device)
            values, nearest = (images[chosen] @ own.float().T).topk(self.kappa, dim=1)
            neighbours[chosen] = own[nearest].float()
            best[chosen] = values[:, 0]
        if len(queries) and float(best.min()) < SELF_MATCH:  # a query whose own image is not in the gallery
            neighbours = torch.cat([images.unsqueeze(1), neighbours[:, :-1]], dim=1)
        named: list[list[list[str]]] = []
        for start in range(0, len(queries), WORD_CHUNK):
            top = (neighbours[start : start + WORD_CHUNK] @ vocabulary.T).topk(self.ni, dim=2).indices.cpu()
            named += [[[self.vocabulary[w] for w in listed] for listed in query] for query in top.tolist()]
        words, weights = frequent_words(named, self.miu)
        # every query's "{word} {text}" encoded in one call (each distinct text once), then summed with weights
        composed = [[f"{w} {' and '.join(q.texts)}" for w in kept] for q, kept in zip(queries, words, strict=True)]
        distinct = list(dict.fromkeys(t for texts in composed for t in texts))
        position = {t: i for i, t in enumerate(distinct)}
        width = max((len(k) for k in words), default=0)
        index = torch.zeros(len(queries), width, dtype=torch.long)
        weight = torch.zeros(len(queries), width, dtype=torch.float32)
        for qi, (texts, values) in enumerate(zip(composed, weights, strict=True)):
            index[qi, : len(texts)] = torch.as_tensor([position[t] for t in texts], dtype=torch.long)
            weight[qi, : len(values)] = torch.as_tensor(values, dtype=torch.float32)
        feats = self.backbone.encode_text(distinct).float().to(device)
        fused = (feats[index.to(device)] * weight.to(device).unsqueeze(-1)).sum(dim=1)
        for q, kept in zip(queries, words, strict=True):
            self.words[q.id] = kept
        return torch.nn.functional.normalize(fused, dim=-1)

    def query_details(self, query: Query) -> dict | None:
        kept = self.words.get(query.id)
        return {"words": kept} if kept is not None else None


def downloads(options: dict, model: str, pretrained: str) -> list[tuple[str, str]]:
    """What ``Freedom`` fetches (MethodSpec.downloads): the official vocabulary, unless --vocabulary names one."""
    return [] if options.get("vocabulary") else [("FREEDOM's vocabulary", VOCABULARY_URL)]
