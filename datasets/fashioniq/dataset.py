"""FashionIQ: official caption/split files, per-category galleries, Recall@{10,50}."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field

from cirbench.dataset import Dataset
from cirbench.errors import CirbenchError
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
    #: where ``cirbench data fetch`` gets them: github.com/XiaoxiaoGuo/fashion-iq, pinned
    OFFICIAL_SOURCES = {f"{folder}/{kind}.{category}.{split}.json": "https://raw.githubusercontent.com/XiaoxiaoGuo/"
                        f"fashion-iq/f71b16c3b09ef03b02c0fed160fa072fb3b8aa16/{folder}/{kind}.{category}.{split}.json"
                        for folder, kind in (("captions", "cap"), ("image_splits", "split"))
                        for category in ("dress", "shirt", "toptee") for split in ("val", "test")}
    OFFICIAL_SHA256 = {  # the official repository's captions/ and image_splits/
        "cap.dress.val.json": "5e5117d45695df9c3ca91fac3e0bc49e6422ae9c8b3793f0ac9b3ab83adb7de9",
        "cap.shirt.val.json": "7b7ca3797b85dddfd83e74cdb4454cb63e3e7c09acef2590155efbacea6d7feb",
        "cap.toptee.val.json": "b4e09f428e6c255cc4b4ec46e77908305ab83075d82840c960be81af15cdc5eb",
        "cap.dress.test.json": "190240b3b4d115cd4f80de65ab78ca18a3f8581c041cbeea6f5a1f57ee4f5a48",
        "cap.shirt.test.json": "27c7551b005d4befa53135a7ddee5e31c97821eafd3ceb3fec514e7ac0ad83a7",
        "cap.toptee.test.json": "db822aa52340ce1f09c3000064f79b60b6c476b50b98bf34200dd2996c06e146",
        "split.dress.val.json": "21ff91d53c23859da91bfd49f3acc139b7f3a3dc944fc4e4a80194468cf14bab",
        "split.shirt.val.json": "b82effbf7352a6f828b38c45eb32e53d726bd4d6fd81d6290c81eeb2c68e3234",
        "split.toptee.val.json": "ee42b2505275dd7a19b11ddb88c9264aab2d77f4e59b075fb1c7c3095d02f412",
        "split.dress.test.json": "1d1d3af24b9ec4ed3f7805c53a870148df9b51e232b32912505d8ae54718353d",
        "split.shirt.test.json": "8d243830e80e77c23c8dc9a85db87813230d38da146f0706082db812f591968b",
        "split.toptee.test.json": "25a30d4f4013a04026585399b10980db7cba39dfaad0d97a0671a62e2125ddbf",
    }
    """The official layout under ``--data-root``: ``captions/cap.<cat>.<split>.json``,
    ``image_splits/split.<cat>.<split>.json``, and the images in any of the layouts the official code reads,
    as ``.png``, ``.jpg`` or ``.jpeg``: ``images/<asin>`` (SEARLE reads ``.jpg``, Pic2Word ``.png``),
    ``<category>/<asin>`` (FTI4CIR), ``resized_images/<category>/<asin>`` (the starter kit),
    ``images/<category>/<asin>``, or ``image_data/<category>/<asin>`` (CoSMo's, PLI's). Each image is looked up
    in those folders in that order."""

    def categories(self) -> tuple[str, ...]:
        chosen = self.options.get("category", "all")
        return CATEGORIES if chosen in (None, "all") else (chosen,)

    def _image_locator(self, category: str):
        folders = [self.folder(rel) for rel in ("images", category, f"resized_images/{category}",
                                                  f"images/{category}", f"image_data/{category}")]
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

    def annotation_files(self, split: str) -> list[Path]:
        return [self.data_root / folder / f"{kind}.{cat}.{split}.json" for cat in self.categories()
                for folder, kind in (("image_splits", "split"), ("captions", "cap"))]

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
                targets=() if hidden or rec.target is None else (rec.target,),  # required on visible splits
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
        return self.score_predictions_by_set(split, path, label="FashionIQ", unit="category", min_length=max(KS),
                                             allowed_name="an image of its category's gallery")
