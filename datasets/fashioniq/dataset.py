"""FashionIQ: official caption/split files, per-category galleries, Recall@{10,50}."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field

from cirbench.dataset import Dataset
from cirbench.errors import AnnotationError, CirbenchError
from cirbench.metrics import hits_matrix, recall_per_query
from cirbench.schema import ImageName, Record, validate_records, validate_value
from cirbench.types import EvalSet, ImageRef, Query

from . import CATEGORIES

KS = (10, 50)


class FashionIQQuery(Record):
    """One record of ``captions/cap.<category>.<split>.json`` (test has no target)."""

    candidate: ImageName
    target: ImageName | None = None
    captions: list[str] = Field(min_length=2, max_length=2)
EXTENSIONS = (".png", ".jpg", ".jpeg")


class FashionIQ(Dataset):
    """The official layout under ``--data-root``: ``captions/cap.<cat>.<split>.json``,
    ``image_splits/split.<cat>.<split>.json``, and the images in any of the layouts the official code reads,
    as ``.png``, ``.jpg`` or ``.jpeg``: ``images/<asin>`` (SEARLE reads ``.jpg``, Pic2Word ``.png``),
    ``<category>/<asin>`` (FTI4CIR), ``resized_images/<category>/<asin>`` (the starter kit), or
    ``images/<category>/<asin>``. Each image is looked up in those folders in that order."""

    def categories(self) -> tuple[str, ...]:
        chosen = self.options.get("category", "all")
        return CATEGORIES if chosen in (None, "all") else (chosen,)

    def _image_locator(self, category: str):
        folders = [self.folder(rel) for rel in ("images", category, f"resized_images/{category}",
                                                  f"images/{category}")]
        listing: dict[Path, set[str]] = {}
        for folder in folders:
            if folder.is_dir():
                with os.scandir(folder) as it:
                    listing[folder] = {e.name for e in it if e.is_file()}

        def locate(asin: str) -> Path:
            for folder, names in listing.items():
                for ext in EXTENSIONS:
                    if asin + ext in names:
                        return folder / (asin + ext)
            return folders[0] / f"{asin}.png"  # reported as missing by the loop

        return locate

    def load(self, split: str) -> list[EvalSet]:
        self.check_split(split)
        return [self._category(split, cat) for cat in self.categories()]

    def _category(self, split: str, category: str) -> EvalSet:
        hidden = split in self.hidden_splits
        split_path = self.data_root / "image_splits" / f"split.{category}.{split}.json"
        caption_path = self.data_root / "captions" / f"cap.{category}.{split}.json"
        names = validate_value(list[ImageName], self.read_json(split_path), split_path,
                               "expected a list of image names")
        locate = self._image_locator(category)
        gallery = [ImageRef(n, locate(n), root=self.data_root) for n in dict.fromkeys(names)]
        records = validate_records(FashionIQQuery, self.read_json(caption_path), caption_path,
                                   required=() if hidden else ("target",))
        images = {g.id: g for g in gallery}
        queries = []
        for i, rec in enumerate(records):
            images.setdefault(rec.candidate, ImageRef(rec.candidate, locate(rec.candidate), root=self.data_root))
            queries.append(Query(
                id=f"{category}-{i}",  # FashionIQ has no query ids: category and position in the file
                reference=rec.candidate,
                texts=tuple(rec.captions),  # empty captions are kept, as in the official files
                targets=() if hidden else (rec.target,),
                category=category,
            ))
        return EvalSet(category, gallery, queries, images, exclude_reference=False, hidden_targets=hidden,
                       topk=max(KS))

    def per_query_metrics(self, evalset: EvalSet, ranking) -> dict:
        targets = ranking.target_positions([q.targets for q in evalset.queries])
        return {f"R@{k}": v for k, v in recall_per_query(hits_matrix(ranking.indices, targets), KS).items()}

    def score_file(self, split: str, path: Path, extra: dict[str, Path] | None = None) -> dict[str, float]:
        """Score per-query rankings (``*.predictions.jsonl`` rows with ``set``, ``query`` and ``top``): at least
        50 unique ids of the category's gallery per query, every query of every category present."""
        self.check_split(split)
        if split in self.hidden_splits:
            raise CirbenchError("FashionIQ test targets are not public")
        if not str(path).endswith(".jsonl"):
            raise CirbenchError("FashionIQ has no official submission format: score a per-query ranking file "
                                "(*.predictions.jsonl rows with set, query and top)")
        rows = self.read_predictions(path)
        per_set = {}
        for evalset in self.load(split):
            ranked = rows.get(evalset.name)
            if ranked is None:
                raise AnnotationError(f"{path} has no rankings for category {evalset.name}")
            gallery = set(evalset.gallery_ids)
            ranked = {qid: self.check_ranked(qid, ids, path, min_length=max(KS), allowed=gallery)
                      for qid, ids in ranked.items()}
            per_set[evalset.name] = self.metrics(evalset, self.ranking_from_ids(evalset, ranked, source=path))
        return self.aggregate(per_set)
