"""MA-CIR: the official ``meta_data`` files, Recall@1 per composition type (and per condition)."""

from __future__ import annotations

import bisect
from pathlib import Path

import torch

from cirbench.dataset import Dataset
from cirbench.errors import AnnotationError
from cirbench.metrics import hits_matrix, recall_per_query
from cirbench.schema import Record, validate_records
from cirbench.types import EvalSet, Query

from . import COMPOSITION_TYPES, CONDITIONS

PROMPT = "a photo of * that {}"  # the official prompt of every pseudo-word method (``$`` there)
EDIT_MARK = "_edit_"  # an edited image's name: <source>_edit_<n>...


class Triplet(Record):
    """One record of ``meta_data/macir_meta_*.json``."""

    reference_image: str
    target_image: str
    relative_caption: str
    composition_type: str
    condition_type: str


def source_prefix(reference: str) -> str:
    """What the restricted level keeps of a ranking: names starting with this (the official ``reference_prefixes``:
    the part before ``_edit_``, else the name up to its first dot). A prefix test, as officially: ``img_1``
    also keeps ``img_10_edit_0.jpg``."""
    return reference.split(EDIT_MARK)[0] if EDIT_MARK in reference else reference.split(".")[0]


def starting_with(ordered: list[str], prefix: str) -> list[str]:
    """The names of the sorted list ``ordered`` that start with ``prefix`` (one run of it, found by bisection)."""
    out = []
    i = bisect.bisect_left(ordered, prefix)
    while i < len(ordered) and ordered[i].startswith(prefix):
        out.append(ordered[i])
        i += 1
    return out


class MACIR(Dataset):
    """``--data-root`` is the dataset folder as downloaded: ``meta_data/macir_meta_full.json`` and
    ``meta_data/image_ids.json`` (split ``full``), ``meta_data/macir_meta_<condition>.json`` and
    ``meta_data/image_ids_<condition>.json`` (splits ``add``, ``remove``, ``replace``), the images in
    ``images/``."""

    def _files(self, split: str) -> tuple[Path, Path]:
        meta = self.data_root / "meta_data"
        if split == "full":
            return meta / "macir_meta_full.json", meta / "image_ids.json"
        return meta / f"macir_meta_{split}.json", meta / f"image_ids_{split}.json"

    def annotation_files(self, split: str) -> list[Path]:
        return list(self._files(split))

    def load(self, split: str) -> list[EvalSet]:
        self.check_split(split)
        meta_path, ids_path = self._files(split)
        triplets = validate_records(Triplet, self.read_json(meta_path), meta_path)
        names = self.read_json(ids_path)
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise AnnotationError(f"annotation file {ids_path}: expected a list of image names")
        repeated = next((n for i, n in enumerate(names) if n in names[:i]), None) if len(set(names)) < len(names) \
            else None
        if repeated is not None:
            raise AnnotationError(f"annotation file {ids_path}: image {repeated!r} is listed twice (the official "
                                  "evaluator takes each gallery image once)")
        images = self.folder("images")
        gallery = [self.image(n, images.relative_to(self.data_root) / n) for n in names]
        known, ordered = set(names), sorted(names)
        position = {n: i for i, n in enumerate(names)}
        refs = {g.id: g for g in gallery}
        queries, too_few = [], 0
        for i, t in enumerate(triplets):
            where = f"annotation file {meta_path}, record {i}"
            if t.reference_image not in known:  # the official ranking drops exactly one entry per row, the reference
                raise AnnotationError(f"{where}: reference image {t.reference_image!r} is not in {ids_path.name} (the "
                                      "official evaluator removes each reference from the gallery's ranking)")
            if split == "full" and (t.target_image not in known or t.target_image == t.reference_image):
                raise AnnotationError(f"{where}: target image {t.target_image!r} is not a gallery image other than "
                                      "the reference (the official evaluator needs exactly one match per query)")
            candidates = None
            if split != "full":  # restricted: the images named after the reference's source, the reference aside
                candidates = tuple(sorted((n for n in starting_with(ordered, source_prefix(t.reference_image))
                                           if n != t.reference_image), key=position.__getitem__))
                if len(candidates) < 2:  # not counted, as officially
                    too_few += 1
                    continue
            queries.append(Query(id=str(i), reference=t.reference_image, texts=(t.relative_caption,),
                                 targets=(t.target_image,), candidates=candidates, category=t.composition_type,
                                 extra={"condition": t.condition_type},
                                 prompt=PROMPT.format(t.relative_caption)))
        if not queries:
            raise AnnotationError(f"annotation file {meta_path}: no query has two or more images of its source to "
                                  "rank")
        return [EvalSet(split, gallery, queries, dict(refs), exclude_reference=split == "full", topk=50,
                        query_galleries=split != "full",
                        info={"queries_with_fewer_than_two_candidates": too_few} if split != "full" else {})]

    # -- metrics ------------------------------------------------------------------------------------------
    def per_query_metrics(self, evalset: EvalSet, ranking) -> dict:
        """Recall@1 (x100) of every query, and by composition type (``R@1/<type>``, the official printout) and on
        ``full`` by composition type and condition (``by-condition/<type>_<condition>``, the official
        ``full_splits``); ``nan`` where a query is of another kind."""
        targets = ranking.target_positions([q.targets for q in evalset.queries])
        hit = recall_per_query(hits_matrix(ranking.indices[:, :1], targets), (1,))[1]
        out = {"R@1": hit}
        kinds = [str(q.category) for q in evalset.queries]
        found = set(kinds)
        order = [*(t for t in COMPOSITION_TYPES if t in found), *sorted(found - set(COMPOSITION_TYPES))]
        for kind in order:
            out[f"R@1/{kind}"] = _only(hit, [k == kind for k in kinds])
        if evalset.name == "full":
            pairs = [(str(q.category), str(q.extra.get("condition"))) for q in evalset.queries]
            for kind in order:
                for condition in sorted({c for k, c in pairs if k == kind}, key=_condition_order):
                    out[f"by-condition/{kind}_{condition}"] = _only(hit, [p == (kind, condition) for p in pairs])
        return out

    # -- rankings made elsewhere ------------------------------------------------------------------------------
    def score_file(self, split: str, path: Path, extra: dict[str, Path] | None = None) -> dict[str, float]:
        """Score per-query rankings made elsewhere: ``*.predictions.jsonl`` rows with ``query`` (the triplet's
        position in the meta file, from 0) and ``top`` (ranked gallery images, the reference left out; on the
        restricted splits, images of the query's source); Recall@1 reads the first."""
        self.check_split(split)
        return self.score_predictions_by_set(split, path, label="MA-CIR", unit="split", min_length=1,
                                             allowed_name="an image of the query's source"
                                             if split != "full" else "an image of the split's gallery")


def _only(values: torch.Tensor, keep: list[bool]) -> torch.Tensor:
    """``values`` where ``keep``, ``nan`` elsewhere (a metric that does not count those queries)."""
    mask = torch.tensor(keep, dtype=torch.bool)
    return torch.where(mask, values, torch.full_like(values, float("nan")))


def _condition_order(condition: str) -> tuple[int, str]:
    return (CONDITIONS.index(condition) if condition in CONDITIONS else len(CONDITIONS), condition)
