"""Training corpora as users hold them: CSV/TSV files, folders with sidecar captions, webdataset shards.

``open_corpus(spec, preprocessor)`` picks the reader from ``spec``:

* ``pairs.csv`` / ``pairs.tsv``: a header row with an image column (``image``, ``filepath``, ``path`` or
  ``file``) and a caption column (``caption``, ``title``, ``text``); paths are relative to the file's
  folder; any other columns (e.g. ``subject``, ``attribute``) are passed to the method as ``extra``.
* a folder: every image (``.jpg .jpeg .png .webp``) with a sidecar caption file of the same stem
  (``.txt``), searched recursively.
* ``shards-{000..099}.tar`` / ``a.tar`` / ``folder/*.tar`` / a folder that holds ``.tar`` files and no image
  or ``.txt`` file: webdataset shards
  whose samples carry an image (``jpg``/``jpeg``/``png``/``webp``) and a caption (``txt``/``caption``/
  ``json`` with a ``caption`` field).

Language-only methods (LinCIR) open a corpus with ``images=False``: images are then neither needed nor
read, a CSV/TSV needs only its caption column, a ``.txt`` file is one caption per line, a folder's ``.txt``
files are one caption each, a ``.jsonl`` file is one JSON object per line and a ``.json`` file a list of them
(records whose other fields are ``extra``, as Hugging Face ``datasets`` reads such files), and shards only need
their captions; batches carry empty ``pixels``. A method whose caption is another column (RTD's
``target_caption``) names it (``caption_columns``), and the columns it needs besides (``required_columns``)
are checked when the corpus is opened.

A method trained on image triplets (TransAgg: reference image, relative caption, target image) names the
columns of a CSV/TSV that hold its other images (``image_columns``, e.g. ``target``): each is a path relative to
the file's folder, read and preprocessed as the sample's image is, and batches carry them stacked in
``images[column]``; a row whose image of either kind is missing or corrupt is skipped.

Methods that learn from images alone (SEARLE's Phi, trained on unlabelled ImageNet images) open it with
``captions=False``: a CSV/TSV then needs only its image column, a folder's images need no sidecar, shards no
caption. Opened with neither (``images=False, captions=False``) a corpus lists its images without reading
them, and batches carry only each sample's ``keys``: a method that computed what it trains on from the
images once, before its first step (:meth:`~cirbench.training.TrainableMethod.prepare`), reads no image again.

Every sample has a ``key``, its identity in the corpus whatever the order it is read in: the image's path
relative to the CSV's folder or the corpus folder, ``shard-url#sample-key`` in shards, the row number for
captions without images.

Images go through the method's training preprocessing: its evaluation recipe, or a random augmentation
(:class:`~cirbench.preprocess.RandomResizedCrop`) whose draw for each sample is named by the epoch the training
loop sets (``corpus.epoch``) and the sample's place in the corpus (row index; shard url and key).

Unreadable samples (missing or corrupt image, empty caption) are skipped and counted: collated batches
carry ``skipped``, and the training loop reports the total. A shard that cannot be read (not a tar file, cut
short) is skipped from where it breaks and named: batches carry ``unreadable_shards`` ((path, reason) pairs), which
the training loop reports once each and records in the checkpoint. An empty corpus is a one-line error.
"""

from __future__ import annotations

import ast
import csv
import glob
import itertools
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from . import distributed as dist_utils
from .errors import CirbenchError, ImageError
from .images import tensor_decoder
from .preprocess import Preprocessor, RandomResizedCrop
from .util import TEXT_ENCODING, json_loads

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
IMAGE_COLUMNS = ("image", "filepath", "path", "file")
CAPTION_COLUMNS = ("caption", "title", "text")


@dataclass
class Batch:
    """A collated training batch: preprocessed ``pixels``, their ``captions``, extra corpus columns, and each
    sample's ``keys`` (its identity in the corpus)."""

    pixels: torch.Tensor
    captions: list[str]
    extra: dict[str, list[Any]] = field(default_factory=dict)
    skipped: int = 0
    unreadable_shards: list[tuple[str, str]] = field(default_factory=list)  # (shard, why)
    keys: list[str] = field(default_factory=list)
    reader: int = 0  # the loader's reader process that made it (its worker id; 0 without reader processes)
    images: dict[str, torch.Tensor] = field(default_factory=dict)  # the corpus's other image columns, preprocessed

    def to(self, device: torch.device) -> Batch:
        return replace(self, pixels=self.pixels.to(device, non_blocking=True),
                       images={k: v.to(device, non_blocking=True) for k, v in self.images.items()})

    def pin_memory(self) -> Batch:
        """Page-locked pixels (the DataLoader's pinning thread calls this under ``pin_memory=True``), so that
        :meth:`to` copies them to the GPU asynchronously; without it the loader hands the batch on unpinned."""
        return replace(self, pixels=self.pixels.pin_memory(),
                       images={k: v.pin_memory() for k, v in self.images.items()})

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def places(self) -> int:
        """The corpus items its reader put in it: its samples, the unreadable ones, and a marker per unreadable
        shard (fewer than the batch size: the reader's last, short batch)."""
        return len(self) + self.skipped + len(self.unreadable_shards)


UNREADABLE_SHARD = "unreadable_shard"  # the key of the item a shard reader yields for a shard it cannot read


def collate(samples: list[dict[str, Any] | None]) -> Batch | None:
    """Stack good samples; count the ``None`` (skipped) ones; pass on the shards found unreadable."""
    shards = [s[UNREADABLE_SHARD] for s in samples if s is not None and UNREADABLE_SHARD in s]
    good = [s for s in samples if s is not None and UNREADABLE_SHARD not in s]
    skipped = len(samples) - len(good) - len(shards)
    info = torch.utils.data.get_worker_info()  # collate runs in the reader process that read the samples
    reader = info.id if info is not None else 0
    if not good:
        return Batch(torch.empty(0), [], {}, skipped, shards, reader=reader)
    columns = [k for k in good[0]["extra"]]
    images = {k: torch.stack([s["images"][k] for s in good]) for k in good[0].get("images", {})}
    return Batch(torch.stack([s["pixels"] for s in good]), [s["caption"] for s in good],
                 {k: [s["extra"].get(k) for s in good] for k in columns}, skipped, shards, [s["key"] for s in good],
                 reader, images)


NO_PIXELS = torch.empty(0)


def _sample(corpus: PairsCorpus | ShardCorpus, image_bytes: bytes | None, caption: Any, name: str,
            extra: dict[str, Any] | None, draw: str, key: str) -> dict[str, Any] | None:
    """One training sample of ``corpus``, or ``None`` when it is unusable; ``draw`` names the sample's draw of a
    random augmentation (its epoch and place in the corpus), ``key`` its identity."""
    if corpus.captions:
        if not isinstance(caption, str) or not caption.strip():
            return None
        caption = caption.strip()
    else:
        caption = caption.strip() if isinstance(caption, str) else ""
    if not corpus.images:  # language-only training, or the keys alone
        return {"pixels": NO_PIXELS, "caption": caption, "extra": extra or {}, "key": key}
    if corpus.preprocessor is None:
        raise RuntimeError("an image corpus is read before its preprocessor was set (corpus.preprocessor = ...)")
    if image_bytes is None:
        return None
    try:  # an image over the pixel limit is refused from its header, before anything is decoded
        pixels = corpus.preprocessor.from_bytes(image_bytes, name, draw)
    except (ImageError, ValueError, OSError):  # PIL refuses some modes' resampling with ValueError
        return None
    return {"pixels": pixels, "caption": caption, "extra": extra or {}, "key": key}


Rows = list[tuple[Path | None, str, dict[str, Any]]]  # (image path, caption, extra columns)


class PairsCorpus(torch.utils.data.Dataset):
    """A map-style corpus of (image path, caption, extra) rows; bad rows come back as ``None``."""

    def __init__(self, rows: Rows, source: str, images: bool,
                 preprocessor: Preprocessor | RandomResizedCrop | None, captions: bool = True,
                 root: Path | None = None, image_columns: tuple[str, ...] = ()):
        self.rows = rows
        self.source = source
        self.images = images
        self.captions = captions
        self.preprocessor = preprocessor
        self.root = root  # image keys are paths relative to it
        self.image_columns = image_columns  # extra columns naming more images of a sample (relative to root)
        self.epoch = 0  # set by the training loop: part of each sample's augmentation draw

    def __len__(self) -> int:
        return len(self.rows)

    def key(self, index: int) -> str:
        path = self.rows[index][0]
        if path is None:
            return str(index)
        return Path(os.path.relpath(path, self.root)).as_posix() if self.root is not None else Path(path).as_posix()

    def with_images(self, preprocessor: Preprocessor | RandomResizedCrop) -> PairsCorpus:
        """The same samples with their images read and preprocessed (captions as this corpus needs them)."""
        return PairsCorpus(self.rows, self.source, True, preprocessor, self.captions, self.root, self.image_columns)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        path, caption, extra = self.rows[index]
        if not self.images or path is None:
            return _sample(self, None, caption, str(path), extra, "", self.key(index))
        try:
            data = Path(path).read_bytes()
        except OSError:
            return None
        sample = _sample(self, data, caption, str(path), extra, f"{self.epoch}:{index}", self.key(index))
        if sample is None or not self.image_columns:
            return sample
        assert self.preprocessor is not None and self.root is not None  # _sample read the first image with it
        sample["images"] = {}
        for column in self.image_columns:
            other = self.root / str(extra.get(column) or "")
            try:
                sample["images"][column] = self.preprocessor.from_bytes(other.read_bytes(), str(other),
                                                                        f"{self.epoch}:{index}:{column}")
            except (OSError, ImageError, ValueError):  # missing, corrupt, or a mode PIL cannot resample
                return None
        return sample


def _read_table(path: Path, images: bool = True, captions: bool = True,
                caption_columns: tuple[str, ...] = CAPTION_COLUMNS) -> Rows:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        with open(path, newline="", encoding=TEXT_ENCODING) as fh:
            reader = csv.DictReader(fh, delimiter=delimiter)
            header = reader.fieldnames or []
            image_col = next((c for c in IMAGE_COLUMNS if c in header), None)
            caption_col = next((c for c in caption_columns if c in header), None)
            if (images and image_col is None) or (captions and caption_col is None):
                needs = ([f"an image column ({'/'.join(IMAGE_COLUMNS)})"] if images and image_col is None else []) + (
                    [f"a caption column ({'/'.join(caption_columns)})"] if captions and caption_col is None else [])
                raise CirbenchError(f"corpus {path}: needs {' and '.join(needs)}; found {header}")
            rows = []
            for row in reader:
                extra = {k: v for k, v in row.items() if k not in (image_col, caption_col) and k is not None}
                image = path.parent / (row.get(image_col) or "") if images and image_col else None
                rows.append((image, (row.get(caption_col) or "") if caption_col else "", extra))
            return rows
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CirbenchError(f"corpus {path} is unreadable: {exc}") from None


def _read_records(path: Path, caption_columns: tuple[str, ...]) -> Rows:
    """A language-only corpus of JSON records: a ``.jsonl`` file (one object per line) or a ``.json`` file (a
    list of objects); the first of ``caption_columns`` a record has is its caption, its other fields ``extra``."""
    try:
        text = path.read_text(encoding=TEXT_ENCODING)
        if path.suffix.lower() == ".jsonl":
            records = [json_loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json_loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CirbenchError(f"corpus {path} is unreadable: {type(exc).__name__}: {exc}") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise CirbenchError(f"corpus {path}: expected JSON objects (a list of them in a .json file, one per line in "
                            "a .jsonl file)")
    rows: Rows = []
    for record in records:
        column = next((c for c in caption_columns if c in record), None)
        caption = record.get(column) if column is not None else ""
        rows.append((None, caption if isinstance(caption, str) else "",
                     {k: v for k, v in record.items() if k != column}))
    return rows


def _read_folder(folder: Path) -> Rows:
    rows: Rows = []
    for image in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
        sidecar = image.with_suffix(".txt")
        caption = sidecar.read_text(encoding=TEXT_ENCODING, errors="replace") if sidecar.is_file() else ""
        rows.append((image, caption, {}))
    return rows


# open_clip_train/data.py's _SAMPLE_SHUFFLE_SIZE and _SAMPLE_SHUFFLE_INITIAL
SHUFFLE_BUFFER = 5000  # samples (still encoded) each reader shuffles among when training on shards
SHUFFLE_INITIAL = 1000  # samples it gathers before the first one comes out


class ShardCorpus(torch.utils.data.IterableDataset):
    """webdataset tar shards: whole shards to each rank (webdataset's ``split_by_node``), then to each reader.

    Read in order, or, with ``shuffle_seed`` set (training), as ``open_clip``'s webdataset training reads them:
    the shard list shuffled for each epoch (the same order on every rank, then split), and the samples through
    a shuffle buffer of :data:`SHUFFLE_BUFFER` samples per reader. Both draws are named by the seed, the epoch,
    the rank and the reader, so that a resumed epoch (``reader_batches``, ``first_part``) meets the same samples
    in the same places."""

    def __init__(self, urls: list[str], source: str, images: bool,
                 preprocessor: Preprocessor | RandomResizedCrop | None, captions: bool = True,
                 num_samples: int | None = None):
        self.urls = urls
        self.source = source
        # the samples the shards hold, as the files beside them say (:func:`shard_sizes`); None: unknown
        self.num_samples = num_samples
        self.images = images
        self.captions = captions
        self.preprocessor = preprocessor
        # set by the training loop (resume): the batch size, the batches of this epoch each reader part already
        # gave (``reader_batches[part]``; None: none), which tell it how many of its samples to pass over, and
        # the part whose turn comes next (``first_part``, read by reader 0)
        self.batch_size = 0
        self.reader_batches: list[int] | None = None
        self.first_part = 0
        self.epoch = 0  # set by the training loop: part of each sample's augmentation draw
        self.shuffle_seed: int | None = None  # set by the training loop: shuffle shards and samples per epoch

    def with_images(self, preprocessor: Preprocessor | RandomResizedCrop) -> ShardCorpus:
        """The same samples with their images read and preprocessed (captions as this corpus needs them)."""
        return ShardCorpus(self.urls, self.source, True, preprocessor, captions=self.captions,
                           num_samples=self.num_samples)

    def __iter__(self) -> Iterator[dict[str, Any] | None]:
        import webdataset as wds

        info = torch.utils.data.get_worker_info()
        workers = info.num_workers if info else 1
        # The loader takes its batches from readers 0, 1, ... in turn, passing over the readers that ran out. A
        # resumed epoch starts at reader 0: reader r takes part ``first_part + r``, so that the rest of the epoch
        # comes in the order it would have, never interrupted, and each part passes over the batches it gave.
        part = ((info.id if info else 0) + self.first_part) % workers
        given = self.reader_batches
        if given is not None and len(given) != workers:
            raise ValueError(f"reader_batches counts {len(given)} readers; the loader has {workers}")
        skip = self.batch_size * given[part] if given is not None else 0
        broken: list[tuple[str, str]] = []

        def shard_error(exn: Exception) -> bool:
            broken.append(_shard_error(exn))
            return True  # go on with the next shard

        stages: list[Any] = [wds.SimpleShardList(self.urls, seed=self._draw("shards")), wds.split_by_node,
                             lambda shards: itertools.islice(shards, part, None, workers),
                             wds.tarfile_to_samples(handler=shard_error)]
        if self.shuffle_seed is not None:
            stages.append(wds.shuffle(SHUFFLE_BUFFER, SHUFFLE_INITIAL,
                                      rng=random.Random(self._draw(f"samples:{dist_utils.rank()}:{part}"))))

        def items():  # the samples, and a marker for each shard found unreadable, as they come
            for raw in wds.DataPipeline(*stages):
                while broken:
                    yield {UNREADABLE_SHARD: broken.pop(0)}
                yield raw
            while broken:
                yield {UNREADABLE_SHARD: broken.pop(0)}

        for raw in itertools.islice(items(), skip, None):  # a marker fills a batch place as a sample does
            if UNREADABLE_SHARD in raw:
                yield raw
                continue
            image = next((raw[k] for k in ("jpg", "jpeg", "png", "webp") if k in raw), None)
            caption = raw.get("txt") or raw.get("caption")
            if caption is None and "json" in raw:
                try:
                    caption = json_loads(raw["json"]).get("caption")
                except (ValueError, AttributeError):
                    caption = None
            if isinstance(caption, bytes):
                caption = caption.decode(TEXT_ENCODING, errors="replace")
            key, url = raw.get("__key__", "?"), raw.get("__url__", "")
            yield _sample(self, image, caption, key, None, f"{self.epoch}:{url}:{key}", f"{url}#{key}")

    def _draw(self, what: str) -> str | None:
        """The seed of one of this epoch's shuffles (``None``: read in order)."""
        return None if self.shuffle_seed is None else f"{self.shuffle_seed}:{self.epoch}:{what}"


def reader_turns(batches: int, readers: int) -> tuple[list[int], int]:
    """Where the first ``batches`` batches of an epoch leave its readers while every reader has samples (they take
    turns): the batches each reader part gave, and the part whose turn is next."""
    return [len(range(part, batches, readers)) for part in range(readers)], batches % readers


def _shard_error(exn: Exception) -> tuple[str, str]:
    """``(path, reason)`` for an error webdataset met reading a shard (it appends the shard's url to the
    exception's arguments)."""
    args = exn.args or ("",)
    url = args[-1] if len(args) > 1 and isinstance(args[-1], str) else "(a shard)"
    reason = str(args[0]).split(" @ <", 1)[0]  # webdataset appends the file object to some messages
    return url, f"{type(exn).__name__}: {reason}"[:200]


def _shard_urls(spec: str) -> list[str]:
    import braceexpand

    urls = []
    for part in braceexpand.braceexpand(spec):
        urls.extend(sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part])
    missing = [u for u in urls if "://" not in u and not os.path.exists(u)]
    if missing:
        raise CirbenchError(f"corpus shard {missing[0]} does not exist ({len(missing)} of {len(urls)} missing)")
    return urls


def _read_captions(path: Path) -> Rows:
    """A language-only corpus: one caption per line of a ``.txt`` file, or one per ``.txt`` file of a folder."""
    try:
        if path.is_dir():
            return [(None, p.read_text(encoding=TEXT_ENCODING, errors="replace"), {})
                    for p in sorted(path.rglob("*.txt"))]
        return [(None, line, {}) for line in path.read_text(encoding=TEXT_ENCODING, errors="replace").splitlines()
                if line.strip()]
    except OSError as exc:
        raise CirbenchError(f"corpus {path} is unreadable: {exc}") from None


def shard_sizes(urls: list[str]) -> int | None:
    """The number of samples in the shards ``urls``, as open_clip reads it from the files in the first shard's
    folder: ``sizes.json`` (shard file name -> samples, as webdataset's and img2dataset's tools write it) or
    ``__len__`` (the total); ``None`` when neither is there (remote shards included)."""
    folder = Path(urls[0]).parent if "://" not in urls[0] else None
    if folder is None:
        return None
    sizes_file, len_file = folder / "sizes.json", folder / "__len__"
    try:
        if sizes_file.is_file():
            sizes = json_loads(sizes_file.read_bytes())
            if not isinstance(sizes, dict):
                raise ValueError("not an object of shard name -> samples")
            missing = [os.path.basename(u) for u in urls if os.path.basename(u) not in sizes]
            if missing:
                raise ValueError(f"no size for {missing[0]} ({len(missing)} of {len(urls)} shards missing)")
            counts = [sizes[os.path.basename(u)] for u in urls]
            where = sizes_file
        elif len_file.is_file():
            counts = [ast.literal_eval(len_file.read_text().strip())]
            where = len_file
        else:
            return None
    except (OSError, ValueError, SyntaxError) as exc:
        raise CirbenchError(f"corpus {sizes_file if sizes_file.is_file() else len_file}: {exc}") from None

    def count(value: Any) -> int:  # open_clip takes int(value): a number, or a string of one
        if not isinstance(value, bool) and isinstance(value, (int, str)) and str(value).strip().isdigit():
            return int(value)
        raise CirbenchError(f"corpus {where}: {value!r} is not a sample count")

    return sum(count(c) for c in counts)


def _names_shards(text: str) -> bool:
    return text.endswith(".tar") or "{" in text or (("*" in text or "?" in text) and ".tar" in text)


def _existing_shards(text: str) -> list[str]:
    urls = _shard_urls(text)
    if not urls:
        raise CirbenchError(f"corpus {text}: no shards match")
    return urls


def _shard_folder(path: Path) -> list[str] | None:
    """The ``.tar`` files of a folder that holds shards alone (no image or caption file of its own), in order."""
    if not path.is_dir():
        return None
    tars = sorted(str(p) for p in path.glob("*.tar") if p.is_file())
    if not tars or any(p.suffix.lower() in (*IMAGE_EXTENSIONS, ".txt") for p in path.rglob("*")):
        return None
    return tars


def open_corpus(spec: str | Path, preprocessor: Preprocessor | None = None, *,
                images: bool = True, captions: bool = True, caption_columns: tuple[str, ...] = CAPTION_COLUMNS,
                required_columns: tuple[str, ...] = (),
                image_columns: tuple[str, ...] = ()) -> PairsCorpus | ShardCorpus:
    """The corpus reader for ``spec`` (see the module docstring); CirbenchError if it is absent, malformed or
    empty. ``images=False`` opens it language-only (captions, no images); ``captions=False`` for images alone;
    neither, for the keys of its images. An image corpus may be opened before its backbone exists (so that a bad
    corpus fails before a backbone is loaded or downloaded); its ``preprocessor`` is then set before it is read.
    ``caption_columns``: where a table or record holds its caption (the first found); ``required_columns``: the
    other columns every row of a table or record file must have; ``image_columns``: those of them that name more
    images of each sample (a CSV/TSV's), read with its image."""
    text = str(spec)
    path = Path(text).expanduser()
    if images:
        tensor_decoder()  # a bad CIRBENCH_IMAGE_DECODER fails here, not in a reader process
    urls = _existing_shards(text) if _names_shards(text) else _shard_folder(path)
    if image_columns and (urls or not (path.is_file() and path.suffix.lower() in (".csv", ".tsv"))):
        raise CirbenchError(f"corpus {text}: this method trains on images named in the columns "
                            f"image and {', '.join(image_columns)} of a .csv/.tsv file (paths relative to it)")
    if urls:
        return ShardCorpus(urls, text, images, preprocessor, captions=captions, num_samples=shard_sizes(urls))
    text_only = not images and captions  # captions without images; otherwise the corpus lists its images
    suffix = path.suffix.lower()
    if path.is_dir():
        rows = _read_captions(path) if text_only else _read_folder(path)
    elif path.is_file() and suffix in (".csv", ".tsv"):
        rows = _read_table(path, images=not text_only, captions=captions, caption_columns=caption_columns)
    elif text_only and path.is_file() and suffix == ".txt":
        rows = _read_captions(path)
    elif text_only and path.is_file() and suffix in (".json", ".jsonl"):
        rows = _read_records(path, caption_columns)
    elif not path.exists():
        raise CirbenchError(f"corpus {path} does not exist")
    else:
        lines = ", a .txt file of captions, a .json/.jsonl file of records" if text_only else ""
        raise CirbenchError(f"corpus {path}: expected a .csv/.tsv file{lines}, a folder of images with .txt "
                            "captions, or webdataset .tar shards")
    if not rows:
        raise CirbenchError(f"corpus {path} is empty")
    for i, (_, _, extra) in enumerate(rows if required_columns else ()):
        lacking = [c for c in required_columns if c not in extra]
        if lacking:
            raise CirbenchError(f"corpus {path}: row {i + 1} has no {', '.join(lacking)} (the method reads "
                                f"{'/'.join(caption_columns)} and {', '.join(required_columns)} from each row)")
    root = None if text_only else (path if path.is_dir() else path.parent)
    return PairsCorpus(rows, text, images, preprocessor, captions, root, image_columns)
