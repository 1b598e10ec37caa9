"""CIRCO: the official annotation files, the COCO unlabeled gallery, the official metrics and server file."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import Field

from cirbench.dataset import Dataset
from cirbench.errors import AnnotationError
from cirbench.metrics import ap_per_query, hit_count_per_query, hits_matrix
from cirbench.schema import Record, validate_records
from cirbench.types import EvalSet, ImageRef, Query
from cirbench.util import atomic_write_bytes

KS = (5, 10, 25, 50)


class CIRCOQuery(Record):
    """One record of ``annotations/<split>.json`` (test has no target fields)."""

    id: int = Field(ge=0)
    reference_img_id: int = Field(ge=0)
    relative_caption: str
    shared_concept: str
    target_img_id: int | None = Field(default=None, ge=0)
    gt_img_ids: list[int] | None = Field(default=None, min_length=1)
    semantic_aspects: list[str] = []
SUBMISSION_LENGTH = 50
ASPECTS = ("cardinality", "addition", "negation", "direct_addressing", "compare_change", "comparative_statement",
           "statement_with_conjunction", "spatial_relations_background", "viewpoint")


class CIRCO(Dataset):
    target_extras = ("target_img_id",)  # Recall@K reads it; a method must not
    #: where ``cirbench data fetch`` gets them: github.com/miccunifi/CIRCO, pinned
    OFFICIAL_SOURCES = {f"annotations/{split}.json": "https://raw.githubusercontent.com/miccunifi/CIRCO/"
                        f"267b5c9087d856ce1b41d2daf8f385ae5b629a3b/annotations/{split}.json"
                        for split in ("val", "test")}
    OFFICIAL_SHA256 = {  # the official repository's annotations/
        "val.json": "6b31a1dbc3c85627501d9a250f87708f24a27d74d6a65360b6ddd2537a154d04",
        "test.json": "2f7c37e89220c990b6b0525d6f3ed63d3fc02e03ce336aa42a3b822841b14886",
    }
    """The official layout under ``--data-root``: ``annotations/{val,test}.json``,
    ``COCO2017_unlabeled/unlabeled2017/<id:012d>.jpg`` and, optionally,
    ``COCO2017_unlabeled/annotations/image_info_unlabeled2017.json`` (the gallery list; without it the
    gallery is every ``*.jpg`` in the image folder)."""

    @property
    def image_dir(self) -> Path:
        return self.folder(Path("COCO2017_unlabeled") / "unlabeled2017")

    def _ref(self, image_id: int | str, folder: Path, name: str | None = None) -> ImageRef:
        return ImageRef(str(image_id), folder / (name or f"{int(image_id):012d}.jpg"), root=self.data_root)

    def annotation_files(self, split: str) -> list[Path]:
        info = self.data_root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json"
        return [self.data_root / "annotations" / f"{split}.json", *([info] if info.is_file() else [])]

    def gallery(self) -> list[ImageRef]:
        info = self.data_root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json"
        if info.is_file():
            data = self.read_json(info)
            try:
                entries = [(int(im["id"]), Path(str(im["file_name"])).name) for im in data["images"]]
            except (KeyError, TypeError, ValueError):
                raise AnnotationError(f"annotation file {info}: expected images[{{id, file_name}}]") from None
            folder = self.image_dir
            return [self._ref(i, folder, name) for i, name in entries]
        if not self.image_dir.is_dir():
            raise AnnotationError(f"CIRCO gallery not found: neither {info} nor the image folder {self.image_dir} "
                                  f"exists ({self.root_hint()})")
        ids = []
        with os.scandir(self.image_dir) as it:
            for entry in it:
                stem, ext = os.path.splitext(entry.name)
                if ext.lower() == ".jpg" and stem.isdigit():
                    ids.append(int(stem))
        folder = self.image_dir
        return [self._ref(i, folder) for i in sorted(ids)]

    def load(self, split: str) -> list[EvalSet]:
        self.check_split(split)
        return [self._evalset(split, self.gallery())]

    def _evalset(self, split: str, gallery: list[ImageRef]) -> EvalSet:
        path = self.data_root / "annotations" / f"{split}.json"
        hidden = split in self.hidden_splits
        records = validate_records(CIRCOQuery, self.read_json(path), path, id_field="id",
                                   required=() if hidden else ("target_img_id", "gt_img_ids"))
        queries = []
        for i, rec in enumerate(records):
            if rec.id != i:  # the official evaluator looks a query up as annotations[id]
                raise AnnotationError(f"annotation file {path}, record {i}: its id is {rec.id}, but CIRCO ids index "
                                      "the list (record i has id i)")
            targets: tuple[str, ...] = ()
            if not hidden:
                # the official evaluator scores mAP against gt_img_ids and Recall against target_img_id
                targets = tuple(str(g) for g in rec.gt_img_ids or ())  # required on visible splits
            queries.append(Query(
                id=str(rec.id), reference=str(rec.reference_img_id), texts=(rec.relative_caption,),
                targets=targets,
                extra={"shared_concept": rec.shared_concept,
                       "target_img_id": None if hidden else str(rec.target_img_id),
                       "semantic_aspects": list(rec.semantic_aspects)},
            ))
        images = {g.id: g for g in gallery}
        folder = self.image_dir
        for q in queries:  # references are COCO unlabeled images; keep them even if the gallery list lacks one
            images.setdefault(q.reference, self._ref(q.reference, folder))
        return EvalSet(split, gallery, queries, images, exclude_reference=False, hidden_targets=hidden,
                       topk=SUBMISSION_LENGTH)

    def per_query_metrics(self, evalset: EvalSet, ranking) -> dict:
        import torch

        queries = evalset.queries
        hits = hits_matrix(ranking.indices, ranking.target_positions([q.targets for q in queries]))
        n_gt = [len(q.targets) for q in queries]
        aps = ap_per_query(hits, n_gt, sorted({*KS, 10}))
        out = {f"mAP@{k}": aps[k] for k in KS}
        # Recall@K as officially: the count of the single target among the first K predictions
        target = ranking.target_positions([(q.extra["target_img_id"],) for q in queries])
        out.update({f"R@{k}": v for k, v in hit_count_per_query(hits_matrix(ranking.indices, target), KS).items()})
        for aspect in ASPECTS:  # mAP@10 over the queries that have the aspect (nan for the others)
            mask = torch.tensor([aspect in q.extra.get("semantic_aspects", []) for q in queries], dtype=torch.bool)
            if mask.any():
                out[f"aspect/{aspect}/mAP@10"] = torch.where(mask, aps[10], torch.tensor(float("nan"),
                                                                                        dtype=torch.float64))
        return out

    # -- test server -----------------------------------------------------------------------------------
    def write_submission(self, evalset: EvalSet, ranking, out_dir: Path, stem: str) -> list[Path]:
        submission = {q.id: [int(x) for x in ranking.top_ids(qi, SUBMISSION_LENGTH)]
                      for qi, q in enumerate(evalset.queries)}
        self.validate_submission(evalset, submission)
        path = Path(out_dir) / f"{stem}.circo-{evalset.name}.json"
        atomic_write_bytes(path, json.dumps(submission).encode())
        return [path]

    def validate_submission(self, evalset: EvalSet, submission: dict, source: Path | str = "CIRCO submission") -> None:
        """What the server takes: every query and no other, each with exactly 50 unique image ids."""
        self.check_query_ids(evalset, submission, source)
        for q in evalset.queries:
            self.check_ranked(q.id, submission[q.id], source, min_length=SUBMISSION_LENGTH,
                              max_length=SUBMISSION_LENGTH, what="prediction list")

    # -- scoring files made elsewhere --------------------------------------------------------------
    def score_file(self, split: str, path: Path, extra: dict[str, Path] | None = None) -> dict[str, float]:
        """Score a submission as the official evaluator (miccunifi/CIRCO ``src/evaluation.py``) does: query ids
        and image ids are integers (``"00042"`` is 42), every query must be present and no other, a list with
        a duplicate id is refused, and a list of any length is scored as it is (ranks it lacks are misses).

        On the test split, whose targets are hidden, the file is checked as the server takes it (every query,
        50 unique ids each) and nothing is scored: an empty dict."""
        self.check_split(split)
        evalset = self._evalset(split, [])  # scoring needs only the annotation files, not the gallery
        if str(path).endswith(".jsonl"):
            rows = self.read_predictions(path)
            data = rows.get(evalset.name) or rows.get("", {})
        else:
            data = self.read_json(path, "ranking file")
            if not isinstance(data, dict):
                raise AnnotationError(f"{path} is not a CIRCO submission (expected {{query id: [image ids]}})")
        ranked: dict[str, list[str]] = {}
        for key, ids in data.items():
            qid = _as_int(key, f"{path}: key {key!r} is not a query id (an integer)")
            if not isinstance(ids, list):
                raise AnnotationError(f"{path}, query {qid}: expected a list of image ids")
            ints = [str(_as_int(x, f"{path}, query {qid}: {x!r} is not an image id (an integer)")) for x in ids]
            if str(qid) in ranked:
                raise AnnotationError(f"{path}: query {qid} appears twice (as {key!r})")
            ranked[str(qid)] = self.check_ranked(str(qid), ints, path, what="prediction list")
        if evalset.hidden_targets:
            self.validate_submission(evalset, ranked, path)
            return {}
        return self.metrics(evalset, self.ranking_from_ids(evalset, ranked, source=path))


def _as_int(value, message: str) -> int:
    """An integer id as numpy's ``int`` conversion reads it (ints and strings of digits; not floats or bools)."""
    if isinstance(value, bool) or isinstance(value, float):
        raise AnnotationError(message)
    try:
        return int(str(value).strip())
    except ValueError:
        raise AnnotationError(message) from None
