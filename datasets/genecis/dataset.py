"""GeneCIS: the official template files, COCO val2017 and Visual Genome crops, per-template galleries."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from pydantic import Field, FiniteFloat

from cirbench.dataset import Dataset, prefixed_with_mean
from cirbench.errors import AnnotationError
from cirbench.metrics import hits_matrix, recall_per_query
from cirbench.schema import Record, validate_records
from cirbench.types import EvalSet, ImageRef, ImageView, Query

from . import KS, TASKS

DILATION = 0.7  # the official VAWDataset's crop dilation
#: the official template files: (templates, sha256) where read from the official repository; the attribute
#: files were not in the snapshot we read, so their counts and checksums are not checked
OFFICIAL_FILES: dict[str, tuple[int | None, str | None]] = {
    "change_object": (1960, "0a5145984f7d8594c457a3609288ae2acfcdb6b72bd0309220e616300c9beac8"),
    "focus_object": (1960, "ee6de86ffb78ad989986b65f7e74e5627a90c1395a8cdc4aed8da3d92f4c016c"),
    "change_attribute": (None, None),
    "focus_attribute": (None, None),
}
VG_FOLDERS = ("visual_genome/VG_100K_all", "VG_100K_all", "visual_genome/VG_100K", "visual_genome/VG_100K_2",
              "VG_100K", "VG_100K_2")
COCO_FOLDERS = ("coco/val2017", "val2017")


class CocoImage(Record):
    val_image_id: int = Field(ge=0)


class VGInstance(Record):
    image_id: int | str
    instance_bbox: list[FiniteFloat] = Field(min_length=4, max_length=4)  # NaN would crop the whole image


class ObjectTemplate(Record):
    reference: CocoImage
    target: CocoImage
    condition: str
    gallery: list[CocoImage] = Field(min_length=1)


class AttributeTemplate(Record):
    reference: VGInstance
    target: VGInstance
    condition: str
    gallery: list[VGInstance] = Field(min_length=1)


def dilated_square_crop(image, box: tuple[float, float, float, float], dilation: float = DILATION):
    """The official crop of a Visual Genome instance: its box ``(x, y, w, h)`` grown by ``dilation`` of its size
    up and left, ``(1 + dilation)`` of its size wide and tall, clipped to the image; then padded to a square
    with black, the crop centred (offset floored)."""
    from PIL import Image

    x, y, w, h = box
    width, height = image.size
    left, top = max(0, x - dilation * w), max(0, y - dilation * h)
    right, bottom = min(width, left + (1 + dilation) * w), min(height, top + (1 + dilation) * h)
    if right <= left or bottom <= top:  # an annotation of another image (or of another version of it)
        raise ValueError(f"the box (x, y, w, h) = ({', '.join(_number(v) for v in box)}) lies outside the image "
                         f"({width}x{height})")
    image = image.crop((left, top, right, bottom))
    cw, ch = image.size
    if cw == ch:
        return image
    side = max(cw, ch)
    square = Image.new(image.mode, (side, side), (0,) if image.mode == "L" else (0, 0, 0))
    square.paste(image, ((side - cw) // 2, (side - ch) // 2))
    return square


def _number(v: float) -> str:
    return f"{v:g}"


class GeneCIS(Dataset):
    OFFICIAL_SHA256 = {f"{task}.json": sha for task, (_, sha) in OFFICIAL_FILES.items() if sha}
    #: where ``cirbench data fetch`` gets the files whose checksums are known: github.com/facebookresearch/genecis
    OFFICIAL_SOURCES = {f"genecis/{name}": "https://raw.githubusercontent.com/facebookresearch/genecis/"
                        f"0c5c968c01b8ccffcc0990af2b430d21d7a12f49/genecis/{name}" for name in OFFICIAL_SHA256}
    """The official layout under ``--data-root`` (see datasets/README.md): the template files as the official
    repository ships them (``genecis/<task>.json``, or ``<task>.json`` at the root), COCO 2017 val images
    (``coco/val2017/<id:012d>.jpg`` or ``val2017/``) and Visual Genome 1.2 images (``<image_id>.jpg`` in
    ``visual_genome/VG_100K_all``, or VG 1.2's own ``VG_100K`` + ``VG_100K_2``, under ``visual_genome/`` or at
    the root)."""

    def tasks(self) -> tuple[str, ...]:
        chosen = self.options.get("task", "all")
        return TASKS if chosen in (None, "all") else (chosen,)

    def template_path(self, task: str) -> Path:
        for candidate in (self.data_root / "genecis" / f"{task}.json", self.data_root / f"{task}.json"):
            if candidate.is_file():
                return candidate
        return self.data_root / "genecis" / f"{task}.json"

    def annotation_files(self, split: str) -> list[Path]:
        return [self.template_path(task) for task in self.tasks()]

    def load(self, split: str) -> list[EvalSet]:
        self.check_split(split)
        return [self._task(task) for task in self.tasks()]

    # -- images ---------------------------------------------------------------------------------------
    def _locator(self, folders: tuple[str, ...]):
        """Find ``name`` in the first of ``folders`` (under the data root) that has it; a name found in none
        points into the first existing folder, so the loop reports it missing."""
        existing = [self.folder(f) for f in folders if (self.data_root / f).is_dir()]
        listing: dict[Path, set[str]] = {}
        for folder in existing:
            with os.scandir(folder) as it:
                listing[folder] = {e.name for e in it}
        fallback = existing[0] if existing else self.folder(folders[0])

        def locate(name: str) -> Path:
            for folder, names in listing.items():
                if name in names:
                    return folder / name
            return fallback / name

        return locate

    def _object_images(self, templates: list[ObjectTemplate]):
        locate = self._locator(COCO_FOLDERS)

        def ref(item: CocoImage) -> ImageRef:
            return ImageRef(str(item.val_image_id), locate(f"{item.val_image_id:012d}.jpg"), root=self.data_root)

        return ref

    def _attribute_images(self, templates: list[AttributeTemplate]):
        locate = self._locator(VG_FOLDERS)

        def ref(item: VGInstance) -> ImageRef:
            x, y, w, h = (float(v) for v in item.instance_bbox)
            box = (x, y, w, h)
            key = f"{item.image_id}@{','.join(_number(v) for v in box)}"
            view = ImageView(f"genecis-crop:{','.join(_number(v) for v in box)}:dilation={DILATION}",
                             functools.partial(dilated_square_crop, box=box))
            return ImageRef(key, locate(f"{item.image_id}.jpg"), root=self.data_root, view=view)

        return ref

    # -- templates --------------------------------------------------------------------------------------
    def _task(self, task: str) -> EvalSet:
        path = self.template_path(task)
        templates: list[AttributeTemplate | ObjectTemplate]
        if task.endswith("attribute"):
            attribute = validate_records(AttributeTemplate, self.read_json(path), path)
            templates, ref = list(attribute), self._attribute_images(attribute)
        else:
            objects = validate_records(ObjectTemplate, self.read_json(path), path)
            templates, ref = list(objects), self._object_images(objects)
        if not templates:
            raise AnnotationError(f"annotation file {path} holds no templates")
        for i, t in enumerate(templates):
            for item in (t.reference, t.target, *t.gallery):
                if isinstance(item, VGInstance) and (item.instance_bbox[2] <= 0 or item.instance_bbox[3] <= 0):
                    raise AnnotationError(f"annotation file {path}, record {i}: a box of image {item.image_id} has "
                                          f"no area ({item.instance_bbox})")
        images: dict[str, ImageRef] = {}
        gallery: dict[str, ImageRef] = {}
        queries = []
        for i, t in enumerate(templates):
            reference, target = ref(t.reference), ref(t.target)
            images.setdefault(reference.id, reference)
            candidates = [target]
            for item in t.gallery:
                im = ref(item)
                if im.id == target.id:
                    # the official code ranks [target] + gallery as listed: a distractor that is the target's own
                    # image stays a separate, non-target entry (one change_object template has one)
                    im = ImageRef(f"{im.id}#distractor", im.path, root=im.root, view=im.view)
                candidates.append(im)
            for im in candidates:
                gallery.setdefault(im.id, im)
            queries.append(Query(id=str(i), reference=reference.id, texts=(t.condition,), targets=(target.id,),
                                 candidates=tuple(im.id for im in candidates), category=task))
        return EvalSet(task, list(gallery.values()), queries, images, topk=max(KS), query_galleries=True,
                       info={"templates": len(templates),
                             "official": dict(zip(("templates", "sha256"), OFFICIAL_FILES[task], strict=True))})

    # -- metrics ------------------------------------------------------------------------------------------
    def per_query_metrics(self, evalset: EvalSet, ranking) -> dict:
        targets = ranking.target_positions([q.targets for q in evalset.queries])
        return {f"R@{k}": v for k, v in recall_per_query(hits_matrix(ranking.indices, targets), KS).items()}

    def aggregate(self, per_set: dict[str, dict[str, float]]) -> dict[str, float]:
        """Every task's metrics prefixed with its name; with several tasks, their mean as ``avg/``."""
        return prefixed_with_mean(per_set)

    def score_file(self, split: str, path: Path, extra: dict[str, Path] | None = None) -> dict[str, float]:
        """Score per-template rankings made elsewhere (``*.predictions.jsonl`` rows with ``set`` (the task),
        ``query`` (the template's position in its file) and ``top``: the template's gallery ids, best first,
        at least 3 of them)."""
        self.check_split(split)
        def template_gallery(evalset: EvalSet):
            galleries = {q.id: set(q.candidates or ()) for q in evalset.queries}
            return lambda qid: galleries.get(qid, set())

        return self.score_predictions_by_set(split, path, label="GeneCIS", unit="task", min_length=max(KS),
                                             allowed=template_gallery, allowed_name="in the template's gallery")
