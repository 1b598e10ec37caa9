"""i-CIR: the official ``query_files.csv`` / ``database_files.csv``, one ranking per instance, mAP."""

from __future__ import annotations

from pathlib import Path

import torch

from cirbench.dataset import Dataset, read_numbered_lines
from cirbench.errors import AnnotationError
from cirbench.metrics import hits_matrix, trapezoid_ap_per_query
from cirbench.types import EvalSet, ImageRef, Query

QUERY_FILE, DATABASE_FILE = "query_files.csv", "database_files.csv"
OWN_FOLDERS = ("query", "database")  # the dataset's image folders, as its tarball unpacks them
EPSILON = 1e-5  # the official compute_ap's recall step is 1 / (positives + 1e-5): a perfect query scores 99.999


def read_rows(path: Path, hint: str) -> list[tuple[int, tuple[str, ...]]]:
    """``image_path,text,instance`` lines with their line numbers, as the official ``icir_dataset`` splits them
    (no header, no quoting: a text holds no comma); ``hint``: where the data root was looked for."""
    return read_numbered_lines(path, ",", ("image_path", "text", "instance"), "i-CIR's tarball unpacks it into the "
                               f"icir folder, the data root; {hint}", required=(0, 2))


class ICIR(Dataset):
    """``--data-root`` is the ``icir`` folder of the official tarball: ``query_files.csv``,
    ``database_files.csv``, ``query/`` and ``database/``. The files name images relative to the folder above
    it (the official scripts join them to ``./data``), so their first component, the folder's own name, is
    dropped; names that already start at ``query/`` or ``database/`` are taken as they are."""

    def annotation_files(self, split: str) -> list[Path]:
        return [self.data_root / QUERY_FILE, self.data_root / DATABASE_FILE]

    def load(self, split: str) -> list[EvalSet]:
        self.check_split(split)
        query_rows = read_rows(self.data_root / QUERY_FILE, self.root_hint())
        database_rows = read_rows(self.data_root / DATABASE_FILE, self.root_hint())
        locate = self.relative_locator(query_rows[0][1][0], OWN_FOLDERS)
        gallery: list[ImageRef] = []
        by_instance: dict[str, list[str]] = {}
        positives: dict[tuple[str, str], list[str]] = {}
        seen: dict[str, int] = {}
        for _, (name, text, instance) in database_rows:
            # a database row is one entry of its instance's ranking, as officially: an image listed twice is
            # two entries (the second apart by its id)
            copies = seen.get(name, 0)
            seen[name] = copies + 1
            ref = self.image(name if not copies else f"{name}#{copies}", locate(name))
            gallery.append(ref)
            by_instance.setdefault(instance, []).append(ref.id)
            positives.setdefault((instance, text), []).append(ref.id)
        images: dict[str, ImageRef] = {}
        queries = []
        for i, (line, (name, text, instance)) in enumerate(query_rows):
            if instance not in by_instance:
                raise AnnotationError(f"annotation file {self.data_root / QUERY_FILE}, line {line}: instance "
                                      f"{instance!r} has no image in {DATABASE_FILE}")
            if name in seen:
                raise AnnotationError(f"annotation file {self.data_root / QUERY_FILE}, line {line}: query image "
                                      f"{name} is also a database image")
            if name not in images:  # an image that queries several texts is one reference
                images[name] = self.image(name, locate(name))
            ref = images[name]
            queries.append(Query(id=str(i), reference=ref.id, texts=(text,),
                                 targets=tuple(positives.get((instance, text), ())),
                                 candidates=tuple(by_instance[instance]), category=instance))
        return [EvalSet("test", gallery, queries, images, topk=50, query_galleries=True,
                        info={"instances": len({q.category for q in queries}), "database": len(gallery)})]

    # -- metrics ------------------------------------------------------------------------------------------
    def per_query_metrics(self, evalset: EvalSet, ranking) -> dict:
        """Each query's AP (x100) over its instance's whole ranking: their mean is the reported mAP."""
        targets = ranking.target_positions([q.targets for q in evalset.queries])
        return {"mAP": trapezoid_ap_per_query(hits_matrix(ranking.indices, targets), EPSILON)}

    def metrics(self, evalset: EvalSet, ranking) -> dict[str, float]:
        """mAP over the queries, and per instance: the mean of the instances' mAP (mmAP) and of their worst
        query's AP (minmAP), as the official ``save_results`` reports them."""
        ap = self.per_query_metrics(evalset, ranking)["mAP"]
        by_instance: dict[str, list[int]] = {}
        for qi, q in enumerate(evalset.queries):
            by_instance.setdefault(str(q.category), []).append(qi)
        groups = [ap[torch.as_tensor(members)] for members in by_instance.values()]
        return {"mAP": float(ap.mean()) if len(ap) else 0.0,
                "mmAP": float(torch.stack([g.mean() for g in groups]).mean()) if groups else 0.0,
                "minmAP": float(torch.stack([g.min() for g in groups]).mean()) if groups else 0.0}

    def score_file(self, split: str, path: Path, extra: dict[str, Path] | None = None) -> dict[str, float]:
        """Score per-query rankings made elsewhere: ``*.predictions.jsonl`` rows with ``query`` (the query's row
        in ``query_files.csv``, from 0, blank lines not counted) and ``top``, each the whole database of the
        query's instance, ranked (an AP reads every positive's rank: a ranking cut short would score the
        positives it holds as all)."""
        self.check_split(split)
        return self.score_predictions_by_set(split, path, label="i-CIR", unit="set", min_length=None, whole=True,
                                             allowed_name="in the database of the query's instance")
