"""CIRR: loading the official rc2 files, the official metrics, and the test-server files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field

from cirbench.dataset import Dataset
from cirbench.errors import AnnotationError, CirbenchError
from cirbench.metrics import hits_matrix, recall_per_query
from cirbench.schema import ImageName, Record, validate_records, validate_value
from cirbench.types import EvalSet, Query
from cirbench.util import atomic_write_files

RECALL_KS = (1, 5, 10, 50)


class ImgSet(Record):
    id: int
    members: list[ImageName] = Field(min_length=1)


class CIRRQuery(Record):
    """One record of ``captions/cap.rc2.<split>.json`` (test1 has no target fields)."""

    pairid: int
    reference: ImageName
    caption: str
    img_set: ImgSet
    target_hard: ImageName | None = None
SUBSET_KS = (1, 2, 3)
VERSION = "rc2"
#: github.com/Cuberick-Orion/CIRR, branch cirr_dataset at the commit whose files the checksums below are
SOURCE = "https://raw.githubusercontent.com/Cuberick-Orion/CIRR/2276fba2d2c53862c8ae79ea18e1f1ae03719f56"


class CIRR(Dataset):
    """The official layout under ``--data-root``: ``cirr/captions/cap.rc2.<split>.json``,
    ``cirr/image_splits/split.rc2.<split>.json`` (or ``captions/``/``image_splits/`` at the root), and the
    images where the split file says (``./dev/<name>.png``, ``./test1/<name>.png``), relative to the root."""

    #: where ``cirbench data fetch`` gets them: the official repository's cirr_dataset branch, pinned
    OFFICIAL_SOURCES = {f"cirr/{folder}/{name}": f"{SOURCE}/{folder}/{name}"
                        for folder, name in (("captions", "cap.rc2.val.json"), ("captions", "cap.rc2.test1.json"),
                                             ("image_splits", "split.rc2.val.json"),
                                             ("image_splits", "split.rc2.test1.json"))}
    OFFICIAL_SHA256 = {  # the rc2 files of the official repository (cirr_dataset branch)
        "cap.rc2.val.json": "a85c3a1aa464f1af7229918e8018d08b8b20ce5dab479ffdf39d61113140f919",
        "cap.rc2.test1.json": "26a2b2e7a5c96c903491aefc7d5f237f03d3cca97712e1b6bb3b231db5ff8001",
        "split.rc2.val.json": "de36f7a7219c8bb06347a67748cfc68405be7dad62853a1e31846c98e491235b",
        "split.rc2.test1.json": "bf2bb9ed0659c4aae35de72350652b9ab75d36a060211f826bec15c58ec12566",
    }

    def _annotation_dir(self) -> Path:
        for candidate in (self.data_root / "cirr", self.data_root):
            if (candidate / "captions").is_dir():
                return candidate
        return self.data_root / "cirr"

    def annotation_files(self, split: str) -> list[Path]:
        ann = self._annotation_dir()
        return [ann / "image_splits" / f"split.{VERSION}.{split}.json",
                ann / "captions" / f"cap.{VERSION}.{split}.json"]

    def load(self, split: str) -> list[EvalSet]:
        self.check_split(split)
        ann = self._annotation_dir()
        split_path = ann / "image_splits" / f"split.{VERSION}.{split}.json"
        caption_path = ann / "captions" / f"cap.{VERSION}.{split}.json"
        names = validate_value(dict[ImageName, str], self.read_json(split_path), split_path,
                               "expected an object mapping image names to paths")
        gallery = [self.image(name, rel) for name, rel in names.items()]
        hidden = split in self.hidden_splits
        records = validate_records(CIRRQuery, self.read_json(caption_path), caption_path, id_field="pairid",
                                   required=() if hidden else ("target_hard",))
        queries = []
        for i, rec in enumerate(records):
            for image_id in [rec.reference, *rec.img_set.members, *([] if hidden else [rec.target_hard])]:
                if image_id not in names:
                    raise AnnotationError(f"annotation file {caption_path}, record {i} (pairid {rec.pairid}): image "
                                          f"{image_id!r} is not in {split_path.name}")
            queries.append(Query(
                id=str(rec.pairid),
                reference=rec.reference,
                texts=(rec.caption,),
                # target_soft is ignored, as officially (a visible split's records have target_hard: required)
                targets=() if hidden or rec.target_hard is None else (rec.target_hard,),
                candidates=tuple(rec.img_set.members),
            ))
        images = {g.id: g for g in gallery}
        return [EvalSet(split, gallery, queries, images, exclude_reference=True, hidden_targets=hidden,
                        topk=max(RECALL_KS))]

    def per_query_metrics(self, evalset: EvalSet, ranking) -> dict:
        targets = ranking.target_positions([q.targets for q in evalset.queries])
        out = {f"R@{k}": v for k, v in recall_per_query(hits_matrix(ranking.indices, targets), RECALL_KS).items()}
        if ranking.candidate_order is not None:
            import torch

            width = max(SUBSET_KS)
            subset = torch.full((len(evalset.queries), width), -1, dtype=torch.long)
            subset_ids: dict[str, int] = {}
            for qi, row in enumerate(ranking.candidate_order):
                ids = [subset_ids.setdefault(x, len(subset_ids)) for x in row[:width]]
                subset[qi, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            sub_targets = [[subset_ids[t] for t in q.targets if t in subset_ids] for q in evalset.queries]
            out.update({f"Rs@{k}": v for k, v in
                        recall_per_query(hits_matrix(subset, sub_targets), SUBSET_KS).items()})
        return out

    # -- test server -----------------------------------------------------------------------------------
    def submission_dicts(self, evalset: EvalSet, ranking) -> tuple[dict, dict]:
        """The two official server files as dicts, validated."""
        recall: dict[str, Any] = {"version": VERSION, "metric": "recall"}
        subset: dict[str, Any] = {"version": VERSION, "metric": "recall_subset"}
        for qi, q in enumerate(evalset.queries):
            top = ranking.top_ids(qi, max(RECALL_KS))
            members = ranking.candidate_order[qi][: max(SUBSET_KS)] if ranking.candidate_order else []
            recall[q.id] = top
            subset[q.id] = members
        self.validate_submission(evalset, recall, subset)
        return recall, subset

    def validate_submission(self, evalset: EvalSet, recall: dict, subset: dict | None,
                            sources: tuple[Path | str, Path | str] = ("CIRR recall file", "CIRR recall_subset file")
                            ) -> None:
        """What the server takes: in the recall file, every query and no other with exactly 50 unique names of the
        split's images, the reference left out; in the recall_subset file (when given), exactly 3 unique
        ``img_set`` members, the reference left out."""
        for is_subset, data, source in zip((False, True), (recall, subset), sources, strict=True):
            if data is not None:
                lists = {k: v for k, v in data.items() if k not in ("version", "metric")}
                self.check_query_ids(evalset, lists, source)
                self._check_lists(evalset, lists, source, subset=is_subset, exact=True)

    def _check_lists(self, evalset: EvalSet, lists: dict, source: Path | str, *, subset: bool, exact: bool
                     ) -> dict[str, list[str]]:
        """Each list checked by :meth:`check_ranked`: a recall list holds at least (``exact``: exactly) 50 unique
        names of the split's images, a subset list 3 unique ``img_set`` members; neither the query's reference."""
        length = max(SUBSET_KS) if subset else max(RECALL_KS)
        gallery = set(evalset.gallery_ids)
        by_id = {q.id: q for q in evalset.queries}
        out = {}
        for qid, ids in lists.items():
            q = by_id.get(qid)
            if subset:
                allowed, name = set(q.candidates or ()) - {q.reference} if q else set(), "in the query's img_set"
            else:
                allowed, name = gallery, "an image of the split's gallery"
            out[qid] = self.check_ranked(qid, ids, source, min_length=length, max_length=length if exact else None,
                                         reference=q.reference if q else None, allowed=allowed, allowed_name=name,
                                         what="subset ranking" if subset else "ranking")
        return out

    def write_submission(self, evalset: EvalSet, ranking, out_dir: Path, stem: str) -> list[Path]:
        recall, subset = self.submission_dicts(evalset, ranking)
        files = [(Path(out_dir) / f"{stem}.cirr-{evalset.name}-{metric}.json", json.dumps(data).encode())
                 for metric, data in (("recall", recall), ("recall_subset", subset))]
        atomic_write_files(files)  # one pair: both of this run's, or (a full disk) both of the earlier run's
        return [path for path, _ in files]

    # -- scoring files made elsewhere --------------------------------------------------------------
    def score_file(self, split: str, path: Path, extra: dict[str, Path] | None = None) -> dict[str, float]:
        """Score rankings made elsewhere with the official val protocol (SEARLE ``validate.py``): each list
        holds at least 50 unique names of the split's images without the query's reference (the protocol
        removes it; a list that still holds it is refused rather than silently shortened), and a subset list
        at least 3 unique ``img_set`` members, the reference excluded.

        On test1, whose targets are hidden, the files are checked as the server takes them (see
        :meth:`validate_submission`; both carry ``version`` and ``metric``) and nothing is scored: an empty dict."""
        (evalset,) = self.load(split)
        subset_path = (extra or {}).get("subset")
        if evalset.hidden_targets:
            if str(path).endswith(".jsonl"):
                raise CirbenchError("CIRR test1 targets are hidden: check the two server files (recall, and "
                                    "recall_subset with --input subset=PATH), not per-query rankings")
            recall = self._read_server_file(path, "recall", for_server=True)
            subset = self._read_server_file(subset_path, "recall_subset", for_server=True) if subset_path else None
            self.validate_submission(evalset, recall, subset, (path, subset_path or "CIRR recall_subset file"))
            return {}
        if str(path).endswith(".jsonl"):
            rows = self.read_predictions(path)
            ranked = rows.get(evalset.name) or rows.get("", {})
            subsets = rows.get("subset:" + evalset.name) or rows.get("subset:")
        else:
            ranked = self._read_server_file(path, "recall")
            subsets = self._read_server_file(subset_path, "recall_subset") if subset_path else None
        ranked = self._check_lists(evalset, ranked, path, subset=False, exact=False)
        if subsets is not None:
            subsets = self._check_lists(evalset, subsets, subset_path or path, subset=True, exact=False)
        ranking = self.ranking_from_ids(evalset, ranked, subsets, source=path)
        return self.metrics(evalset, ranking)

    def _read_server_file(self, path: Path, metric: str, *, for_server: bool = False) -> dict[str, list]:
        """A server file's rankings by pair id; ``version`` and ``metric`` must be right when present, and
        present at all ``for_server`` (the server needs them)."""
        data = self.read_json(path, "ranking file")
        if not isinstance(data, dict) or data.get("metric") not in (None, metric):
            got = data.get("metric") if isinstance(data, dict) else type(data).__name__
            raise AnnotationError(f"{path} is not a CIRR '{metric}' file (its metric is {got!r})")
        if data.get("version") not in (None, VERSION):
            raise AnnotationError(f"{path} is for CIRR version {data.get('version')!r}, not {VERSION}")
        missing = [key for key in ("version", "metric") if key not in data]
        if for_server and missing:
            raise AnnotationError(f"{path} lacks {' and '.join(repr(k) for k in missing)}: the test server needs "
                                  f'"version": "{VERSION}", "metric": "{metric}"')
        return {str(k): v for k, v in data.items() if k not in ("version", "metric")}
