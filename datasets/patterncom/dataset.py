"""PatternCom: PatternNet's file list as the gallery, one evaluation set per attribute file, and the official
``metrics_calc`` (AP over the whole ranking, Precision@K, Recall@K)."""

from __future__ import annotations

import csv
from pathlib import Path, PurePosixPath

from cirbench.dataset import Dataset, prefixed_with_mean, read_numbered_lines
from cirbench.errors import AnnotationError
from cirbench.metrics import average_precision_per_query, hits_matrix
from cirbench.types import EvalSet, ImageRef, Query
from cirbench.util import TEXT_ENCODING

from .protocol import ATTRIBUTES, KS, group_key, relevance_class

GALLERY_FILE, FOLDER = "patternnet.csv", "PatternCom"


def read_attribute_rows(path: Path, hint: str) -> list[tuple[int, str, str, str]]:
    """``image,attribute,value`` rows (the official ``read_csv``: a CSV reader, no header, the first three
    columns read), as ``(line, image, attribute, value)``; AnnotationError naming the file and line for a row with
    fewer columns or an empty image name or value, and for an empty, missing or unreadable file."""
    try:
        with open(path, newline="", encoding=TEXT_ENCODING) as handle:
            lines = list(csv.reader(handle))
    except FileNotFoundError:
        raise AnnotationError(f"annotation file {path} is missing (PatternCom's files go in PatternNet/{FOLDER}/; "
                              f"{hint})") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise AnnotationError(f"cannot read annotation file {path}: {exc}") from None
    rows = []
    for n, row in enumerate(lines, 1):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < 3 or not row[0].strip() or not row[2].strip():
            raise AnnotationError(f"annotation file {path}, line {n}: expected 'image,attribute,value', found "
                                  f"{','.join(row)[:80]!r}")
        rows.append((n, row[0].strip(), row[1].strip(), row[2].strip()))
    if not rows:
        raise AnnotationError(f"annotation file {path} is empty")
    return rows


class PatternCom(Dataset):
    """``--data-root`` is the ``PatternNet`` folder as the official README lays it out: ``images/``,
    ``patternnet.csv`` (the gallery: ``<image path> <n> <class>`` lines, paths from the folder) and
    ``PatternCom/<attribute>.csv``. Images are known by their file names, as the official evaluation matches the
    annotated names to the gallery's paths."""

    queries_score_apart = True  # mAP over the whole ranking, per query: large sets are scored in parts

    def annotation_files(self, split: str) -> list[Path]:
        return [self.data_root / GALLERY_FILE,
                *(self.data_root / FOLDER / f"{a}.csv" for a in self.chosen("attribute", ATTRIBUTES, "attribute"))]

    def load(self, split: str) -> list[EvalSet]:
        self.check_split(split)
        attributes = self.chosen("attribute", ATTRIBUTES, "attribute")
        listing = self.data_root / GALLERY_FILE
        lines = read_numbered_lines(listing, " ", ("path", "n", "class"), f"PatternCom's README has it downloaded "
                                    f"into the PatternNet folder; {self.root_hint()}", required=(0,), at_least=True)
        gallery: list[ImageRef] = []
        seen: dict[str, int] = {}
        for line, (path, *_rest) in lines:
            ref = self.image(PurePosixPath(path).name, path)
            if ref.id in seen:
                raise AnnotationError(f"annotation file {listing} names image {ref.id} twice (lines {seen[ref.id]} "
                                      f"and {line}): images are matched by file name")
            seen[ref.id] = line
            gallery.append(ref)
        images = {ref.id: ref for ref in gallery}
        return [self._attribute_set(attribute, gallery, images) for attribute in attributes]

    def _attribute_set(self, attribute: str, gallery: list[ImageRef], images: dict[str, ImageRef]) -> EvalSet:
        """One attribute's queries: each annotated image with every other value of its group, its positives the
        annotated images of its class (after the merges) with that value. An image annotated twice counts, as a
        positive, with its last row's value (the official name-to-row map keeps the last)."""
        path = self.data_root / FOLDER / f"{attribute}.csv"
        rows = read_attribute_rows(path, self.root_hint())
        for n, name, _, _ in rows:
            if name not in images:
                header = " (a header row? the official reader takes every row as an image's)" if n == 1 else ""
                raise AnnotationError(f"annotation file {path}, line {n}: image {name} is not in {GALLERY_FILE}"
                                      f"{header}")
        groups: dict[str, set[str]] = {}
        for _, name, annotated, value in rows:
            groups.setdefault(group_key(attribute, annotated, name), set()).add(value)
        last_value = {name: value for _, name, _, value in rows}
        positives: dict[tuple[str, str], list[str]] = {}
        for name, value in last_value.items():
            positives.setdefault((relevance_class(name), value), []).append(name)
        queries, unqueried = [], 0
        for i, (_, name, annotated, value) in enumerate(rows):
            others = sorted(groups[group_key(attribute, annotated, name)] - {value})
            unqueried += not others
            kind = relevance_class(name)
            queries += [Query(id=f"{i}:{wanted}", reference=name, texts=(wanted,), category=kind,
                              targets=tuple(positives.get((kind, wanted), ())), extra={"value": value})
                        for wanted in others]
        if not queries:
            raise AnnotationError(f"annotation file {path}: no image has a value of its attribute to be changed to "
                                  "(each class group shows one value only)")
        return EvalSet(attribute, gallery, queries, images, topk=len(gallery),
                       info={"annotated_images": len(rows), "groups": len(groups),
                             "annotated_without_other_value": unqueried})

    # -- metrics ------------------------------------------------------------------------------------------
    def per_query_metrics(self, evalset: EvalSet, ranking) -> dict:
        """The official ``metrics_calc`` per query (x100): AP over the whole ranking (the mean precision at the
        positives' ranks), Precision@K (the positives in the top K over K) and Recall@K (over all positives; 0 for
        a query without any)."""
        import torch

        targets = ranking.target_positions([q.targets for q in evalset.queries])
        hits = hits_matrix(ranking.indices, targets)  # bool [Q, whole gallery]
        total = torch.tensor([float(len(t)) for t in targets], dtype=torch.float64)
        out = {"mAP": average_precision_per_query(hits)}
        for k in KS:
            found = hits[:, :k].sum(dim=1).double()
            out[f"R@{k}"] = found / total.clamp(min=1) * 100
        for k in KS:
            out[f"P@{k}"] = hits[:, :k].sum(dim=1).double() / k * 100
        return out

    def aggregate(self, per_set: dict[str, dict[str, float]]) -> dict[str, float]:
        """Every attribute's metrics prefixed with its name; with several, their mean as ``avg/`` (over all six,
        the paper's "Avg")."""
        return prefixed_with_mean(per_set)
