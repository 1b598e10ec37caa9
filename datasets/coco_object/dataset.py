"""COCO object composition: the frozen query file, masked query regions, and the masked-image preparation."""

from __future__ import annotations

import csv
import functools
import io
import json
import math
from pathlib import Path
from typing import Annotated, Any, NamedTuple

from pydantic import AfterValidator, Field, FiniteFloat

from cirbench.dataset import Dataset
from cirbench.errors import AnnotationError, CirbenchError, ImageError
from cirbench.metrics import hits_matrix, recall_per_query
from cirbench.schema import Record, validate_records
from cirbench.types import EvalSet, ImageRef, ImageView, Query
from cirbench.util import TEXT_ENCODING

from . import KS

FROZEN = Path(__file__).resolve().parent / "lists" / "coco_eval.csv"
FROZEN_SHA256 = "3bad6e345ba018985df423ab1f3ab8998e08886a18ffbf399ab02d229d024c75"
FROZEN_QUERIES = 4765
HEADER = ["id", "query_regions", "query_class", "classes"]
MASKED = "val2017_masked"


class Row(NamedTuple):
    file: str  # 000000000139.jpg
    region: tuple[float, float, float, float]  # x1 y1 x2 y2 as written (floats)
    region_text: tuple[str, ...]
    query_class: str
    others: tuple[str, ...]


def read_queries(path: Path) -> list[Row]:
    """The official ``coco_eval.csv``: ``id,query_regions,query_class,classes`` with ``x1;y1;x2;y2`` regions
    and ``;``-separated other classes (empty: none, read as one empty class as pandas' NaN is officially)."""
    try:
        text = Path(path).read_text(encoding=TEXT_ENCODING)
    except (OSError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"cannot read query file {path}: {exc}") from None
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header != HEADER:
        raise AnnotationError(f"query file {path}: expected the header {','.join(HEADER)}, found {header}")
    rows, seen = [], set()
    for n, fields in enumerate(reader, 2):
        if not fields:
            continue
        if len(fields) != 4:
            raise AnnotationError(f"query file {path}, line {n}: expected 4 fields, found {len(fields)}")
        file, region, query_class, classes = fields
        parts = region.split(";")
        try:
            box = tuple(float(x) for x in parts)
        except ValueError:
            box = ()
        if len(box) != 4 or not all(math.isfinite(v) and v >= 0 for v in box) or not (box[2] > box[0] and
                                                                                      box[3] > box[1]):
            raise AnnotationError(f"query file {path}, line {n}: query_regions {region!r} is not x1;y1;x2;y2 (pixel "
                                  "coordinates) with x2 > x1 and y2 > y1")
        if not file.endswith(".jpg") or "/" in file or file in seen or not query_class:
            raise AnnotationError(f"query file {path}, line {n}: bad or repeated image {file!r} or empty class")
        seen.add(file)
        rows.append(Row(file, box, tuple(p.strip() for p in parts), query_class,
                        tuple(classes.split(";")) if classes else ("",)))
    if not rows:
        raise AnnotationError(f"query file {path} holds no queries")
    return rows


MADE_FOR = ".made-for.json"  # in val2017_masked/: which object each masked image shows (written by prepare)


def object_key(r: Row) -> str:
    """The object a masked query image shows: its class and region as the query file writes them."""
    return f"{r.query_class}|{';'.join(r.region_text)}"


def read_made_for(folder: Path) -> dict[str, str]:
    """``{file: object_key}`` of the masked images ``cirbench data prepare`` wrote ({} for images it did not
    write, e.g. those of the official script)."""
    from cirbench.util import json_object_file

    return {str(k): str(v) for k, v in (json_object_file(folder / MADE_FOR) or {}).items()}


# -- COCO's instances file, as far as the masking reads it -------------------------------------------------------
def _polygon(points: list[float]) -> list[float]:
    if len(points) < 6 or len(points) % 2:
        raise ValueError(f"a polygon is x, y pairs, at least three of them: found {len(points)} numbers")
    return points


class _CocoImage(Record):
    id: int
    width: int = Field(ge=1)
    height: int = Field(ge=1)


class _CocoCategory(Record):
    id: int
    name: str


class _CocoRLE(Record):
    counts: list[int] | str
    size: Annotated[list[int], Field(min_length=2, max_length=2)]


class _CocoAnnotation(Record):
    id: int
    image_id: int
    category_id: int
    bbox: Annotated[list[FiniteFloat], Field(min_length=4, max_length=4)]
    segmentation: list[Annotated[list[FiniteFloat], AfterValidator(_polygon)]] | _CocoRLE


def coco_index(data: Any, path: Path):
    """COCO's ``instances_val2017.json`` (``data``, as read from ``path``) as a pycocotools ``COCO`` index, its
    images, objects and categories checked first (each field pycocotools and the masking read, of the type COCO
    writes): a malformed file is a one-line error naming the list, the record and the field, not an error deep
    inside pycocotools."""
    import contextlib

    from pycocotools.coco import COCO

    if not isinstance(data, dict):
        raise AnnotationError(f"annotation file {path}: expected COCO's object of images, annotations and "
                              f"categories, found {type(data).__name__}")
    for key, model in (("images", _CocoImage), ("annotations", _CocoAnnotation), ("categories", _CocoCategory)):
        if key not in data:
            raise AnnotationError(f"annotation file {path} has no '{key}' list (is it COCO's instances_val2017.json?)")
        validate_records(model, data[key], f"{path} ('{key}')", id_field="id")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco.createIndex()
    return coco


def region_crop(image, box: tuple[int, int, int, int]):
    """The official query region: the masked image cropped to the integer box (``int(float(x))``)."""
    return image.crop(box)


def int_box(region: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    return tuple(int(v) for v in region)  # type: ignore[return-value]


class CocoObject(Dataset):
    OFFICIAL_SHA256 = {"coco_eval.csv": FROZEN_SHA256}
    """Under ``--data-root`` (Pic2Word's ``data/coco``): ``val2017/<id:012d>.jpg`` (COCO 2017 val, the targets),
    ``val2017_masked/<id:012d>.jpg`` (made by ``cirbench data prepare coco-object``, the queries) and, for
    that preparation only, ``annotations/instances_val2017.json``."""

    def query_file(self) -> Path:
        return Path(self.options.get("queries") or FROZEN)

    def annotation_files(self, split: str) -> list[Path]:
        return [self.query_file()]

    def rows(self) -> list[Row]:
        path = self.query_file()
        rows = read_queries(path)
        if path == FROZEN:
            from cirbench.util import file_sha256

            if file_sha256(path) != FROZEN_SHA256 or len(rows) != FROZEN_QUERIES:
                raise CirbenchError(f"the shipped query file {path} was modified (its sha256 is not {FROZEN_SHA256}): "
                                    "reinstall cirbench, or pass your own file with --queries")
        return rows

    def load(self, split: str) -> list[EvalSet]:
        self.check_split(split)
        rows = self.rows()
        targets = self.folder("val2017")
        masked = self.folder(MASKED)
        made_for = read_made_for(masked)
        stale = [r.file for r in rows if made_for.get(r.file, object_key(r)) != object_key(r)]
        if stale:
            raise AnnotationError(f"{len(stale)} masked query images in {masked} show another object than "
                                  f"{self.query_file()} asks (first: {stale[0]}): run `cirbench data prepare "
                                  f"coco-object --data-root {self.data_root} --queries {self.query_file()}` again")
        gallery = [ImageRef(r.file.removesuffix(".jpg"), targets / r.file, root=self.data_root) for r in rows]
        images, queries = {}, []
        for i, (r, target) in enumerate(zip(rows, gallery, strict=True)):
            box = int_box(r.region)
            view = ImageView(f"coco-object-region:{','.join(map(str, box))}:resize=squash",
                             functools.partial(region_crop, box=box), resize="squash")
            ref = ImageRef(f"{target.id}@masked", masked / r.file, root=self.data_root, view=view)
            images[ref.id] = ref
            others = " and ".join(r.others)
            queries.append(Query(id=str(i), reference=ref.id, texts=(f"a photo of {r.query_class} and {others}",),
                                 prompt=f"a photo of * and {r.query_class} and {others}", targets=(target.id,),
                                 extra={"query_class": r.query_class}))
        return [EvalSet("val", gallery, queries, images, topk=max(KS))]

    def per_query_metrics(self, evalset: EvalSet, ranking) -> dict:
        targets = ranking.target_positions([q.targets for q in evalset.queries])
        return {f"R@{k}": v for k, v in recall_per_query(hits_matrix(ranking.indices, targets), KS).items()}

    # -- preparation: the masked query images ------------------------------------------------------------
    def prepare(self, progress: bool = True) -> str:
        """Write ``val2017_masked/<file>`` for every query: the image with everything outside the query object's
        segmentation mask set to white (255), saved as JPEG with PIL's defaults, as Pic2Word's
        ``prepare_data.py``. The query's object is the annotation of its image whose class and box are the ones
        the query file names."""
        try:
            import pycocotools  # noqa: F401
        except ImportError:
            raise CirbenchError("preparing coco-object needs pycocotools: pip install 'cirbench[coco]'") from None
        from PIL import Image
        from tqdm import tqdm

        from cirbench.images import load_image
        from cirbench.util import atomic_write_bytes

        ann_path = self.data_root / "annotations" / "instances_val2017.json"
        if not ann_path.is_file():
            raise AnnotationError(f"{ann_path} is missing: download COCO 2017's annotations (instances_val2017.json)")
        coco = coco_index(self.read_json(ann_path), ann_path)
        names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
        out_dir = self.folder(MASKED)
        out_dir.mkdir(parents=True, exist_ok=True)
        made_for = read_made_for(out_dir)
        written = skipped = 0
        for r in tqdm(self.rows(), desc="coco-object: masked queries", unit="img", disable=not progress):
            dest = out_dir / r.file
            if dest.is_file() and made_for.get(r.file, object_key(r)) == object_key(r):
                skipped += 1  # made for this object (or by the official script: kept as it is)
                continue
            ann = self._annotation(coco, names, r)
            source = ImageRef(r.file, self.folder("val2017") / r.file, root=self.data_root)
            image = self._image(source, load_image(source), coco.imgs[ann["image_id"]])
            try:
                mask = coco.annToMask(ann)
            except ValueError as exc:  # pycocotools' "Invalid RLE mask representation"
                raise AnnotationError(f"the segmentation of annotation {ann['id']} in {ann_path} is no mask: "
                                      f"{exc}") from None
            if mask.shape != image.shape[:2]:
                raise AnnotationError(f"the segmentation of annotation {ann['id']} in {ann_path} is "
                                      f"{mask.shape[1]}x{mask.shape[0]}, its image {r.file} "
                                      f"{image.shape[1]}x{image.shape[0]}")
            h, w = mask.shape
            mask = mask.reshape(h, w, 1)
            if image.ndim == 2:
                image = image.reshape(h, w, 1)
            masked = image * mask + (1 - mask) * 255
            if masked.shape[2] == 1:
                masked = masked[:, :, 0]
            buf = io.BytesIO()
            Image.fromarray(masked).save(buf, format="JPEG")
            atomic_write_bytes(dest, buf.getvalue())
            made_for[r.file] = object_key(r)
            written += 1
            if written % 500 == 0:  # an interrupted preparation keeps what it says of the images it wrote
                atomic_write_bytes(out_dir / MADE_FOR, json.dumps(made_for).encode())
        if written:
            atomic_write_bytes(out_dir / MADE_FOR, json.dumps(made_for).encode())
        return f"coco-object: wrote {written} masked query images to {out_dir} ({skipped} already there)"

    @staticmethod
    def _image(source: ImageRef, image, info: dict):
        """The pixels the official script masks (``np.array(Image.open(path))``) of ``image`` (``source`` as
        :func:`cirbench.images.load_image` decodes it), if it is the image the annotation file describes: of its
        size, RGB or greyscale as COCO's images are."""
        import numpy as np

        if image.mode not in ("RGB", "L"):
            raise ImageError(f"image {source.path} is {image.mode}: COCO 2017's images are RGB or greyscale (L), as "
                             "the masking reads them")
        if image.size != (info["width"], info["height"]):
            raise ImageError(f"image {source.path} is {image.width}x{image.height}, the annotation file's image "
                             f"{info['id']} {info['width']}x{info['height']}: is it COCO 2017's?")
        return np.array(image)

    @staticmethod
    def _annotation(coco, names: dict[int, str], r: Row) -> dict:
        stem = r.file.removesuffix(".jpg")
        if not stem.isdigit() or not stem.isascii():
            raise AnnotationError(f"query image {r.file} is not named by its COCO image id (<id:012d>.jpg): the "
                                  "masking finds its objects by that id")
        image_id = int(stem)
        if image_id not in coco.imgs:
            raise AnnotationError(f"query image {r.file}: image id {image_id} is not among the annotation file's "
                                  "images (is annotations/instances_val2017.json COCO 2017's?)")
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=None)):
            x, y, w, h = ann["bbox"]
            if names.get(ann["category_id"]) == r.query_class and all(
                    abs(a - b) < 1e-6 for a, b in zip((x, y, x + w, y + h), r.region, strict=True)):
                return ann
        raise AnnotationError(f"no annotation of image {r.file} is a {r.query_class} with box "
                              f"{';'.join(r.region_text)} (is annotations/instances_val2017.json COCO 2017's?)")
