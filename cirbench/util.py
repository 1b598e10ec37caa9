"""Generic helpers every part of cirbench uses: atomic writes, hashing, the cache folder, one-line errors.

Nothing here knows about methods, datasets or torch.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def matches_any(value: str, patterns: list[str] | tuple[str, ...] | None) -> bool:
    """Whether ``value`` matches one of ``patterns`` (a glob, or a substring); no pattern matches everything."""
    return not patterns or any(fnmatch.fnmatch(value, p) or p in value for p in patterns)


def default_cache_dir() -> Path:
    """``$CIRBENCH_CACHE``, else ``~/.cache/cirbench``."""
    return Path(os.environ.get("CIRBENCH_CACHE", Path.home() / ".cache" / "cirbench"))


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()

# Text files a user or another program wrote (annotation lists, corpora, word lists, prompts) are read as UTF-8
# with an optional byte-order mark: editors on Windows (Excel's "CSV UTF-8") start files with one, which would
# otherwise become an invisible first character of the first image name or column. Files without it read the same.
TEXT_ENCODING = "utf-8-sig"


def partial_folder(folder: Path) -> Path:
    """A new name beside ``folder`` to write its next version into, for :func:`replace_folder` (and one that
    :func:`recover_folder` removes if the writing never finished)."""
    folder = Path(folder)
    return folder.with_name(f"{folder.name}.partial-{uuid.uuid4().hex[:8]}")


def replace_folder(new: Path, folder: Path) -> Path:
    """Put the finished folder ``new`` in the place of ``folder`` by renames: at every moment ``folder`` or, for
    the instant between the two renames, ``<folder>.previous`` holds a complete set of files
    (:func:`recover_folder` puts that one back). A checkpoint written file by file in place could be left with
    new weights beside an old optimizer state by an interrupt."""
    new, folder = Path(new), Path(folder)
    previous = folder.with_name(folder.name + ".previous")
    shutil.rmtree(previous, ignore_errors=True)
    if folder.exists():
        os.rename(folder, previous)
    os.rename(new, folder)
    shutil.rmtree(previous, ignore_errors=True)
    return folder


def recover_folder(folder: Path, complete: str) -> None:
    """Undo what an interrupted :func:`replace_folder` left: the previous folder back if ``folder`` lacks the file
    ``complete``, and unfinished ``<folder>.partial-*`` folders removed."""
    folder = Path(folder)
    previous = folder.with_name(folder.name + ".previous")
    if not (folder / complete).is_file() and (previous / complete).is_file():
        shutil.rmtree(folder, ignore_errors=True)
        os.rename(previous, folder)
    for partial in folder.parent.glob(folder.name + ".partial-*"):
        shutil.rmtree(partial, ignore_errors=True)


def atomic_write_bytes(path: Path, data: bytes, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename: readers see the old file or the new
    one, never half of one. The file gets the user's umask (``mkstemp`` alone would leave it 0600)."""
    atomic_write_files([(Path(path), data)], fsync=fsync)
    return Path(path)


def atomic_write_files(files: Sequence[tuple[Path, bytes]], fsync: bool = True) -> None:
    """Write files that belong together (a result and its predictions): every one is staged (written and
    synced beside its target) before any is renamed into place, in the order given, so that running out of
    space or failing to write any of them leaves every target as it was, and no temporary file behind."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, data in files:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            staged.append((tmp, path))
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                if fsync:
                    os.fsync(fh.fileno())
            os.chmod(tmp, 0o666 & ~_UMASK)
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def making(target: Path, waiting: str | None = None):
    """Hold, for the ``with`` block, the exclusive lock on making ``target`` (an advisory ``flock`` on
    ``.lock-<name>`` beside it): processes that make the same files (torchrun ranks, parallel jobs sharing a
    cache) take turns, and the later ones find the work done. ``waiting`` is printed (stderr) when another
    process holds the lock. The lock only saves work: where it cannot be taken (no ``fcntl``, a folder this
    process cannot write) the block runs without it."""
    try:
        import fcntl

        target.parent.mkdir(parents=True, exist_ok=True)
        fh = open(target.parent / f".lock-{target.name}", "a+b")  # noqa: SIM115 - closed below
    except (ImportError, OSError):
        yield
        return
    with fh:  # closing it releases the lock
        try:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if waiting:
                    print(waiting, file=sys.stderr, flush=True)
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        except OSError:  # a file system without locks (some network mounts): unlocked
            pass
        yield


def atomic_write_json(path: Path, obj: Any, indent: int | None = 2) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=indent, default=str) + "\n").encode())


def sha256_bytes(*parts: bytes | memoryview) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.hexdigest()


def keyed_seed(seed: int, key: str) -> int:
    """A 63-bit seed for one item (a training sample's crop, a query's noise) from the run's ``seed`` and the item's
    ``key``: the same draw whatever the batch, order, reader or rank that meets the item."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def keyed_texts_sha256(items: Iterable[tuple[str, Sequence[str]]]) -> str:
    """The sha256 of texts by key, in the given order (``key NUL text NUL text ... LF`` each): what a result
    records of the generated texts it used, and what identifies a set of them."""
    return sha256_bytes(*(key.encode() + b"\0" + "\0".join(texts).encode() + b"\n" for key, texts in items))


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor, for :func:`sha256_bytes` (no copy when it is contiguous)."""
    import torch

    if not t.numel():
        return memoryview(b"")
    return memoryview(t.contiguous().view(torch.uint8).numpy())  # type: ignore[arg-type]  # an ndarray is a buffer


_FILE_HASHES: dict[tuple[str, int, int, int], str] = {}


def file_sha256(path: Path | str) -> str:
    """sha256 of a file, memoised by (path, size, mtime, inode) so big weights are hashed once per process."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _FILE_HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        _FILE_HASHES[key] = h.hexdigest()
    return _FILE_HASHES[key]


def content_digest(path: Path | str) -> str:
    """What a path option names, by content: a file's sha256; a folder's (a checkpoint folder: its weights and
    config beside its logs), over the names and sha256s of the files directly in it, hidden ones aside (not its
    subfolders: a training run's resumable state); ``"missing"`` for nothing there. Where it lies is no part of it."""
    path = Path(path).expanduser()
    if path.is_file():
        return file_sha256(path)
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file() and not f.name.startswith("."))
        return "folder:" + json_hash([[f.name, file_sha256(f)] for f in files])
    return "missing"


def read_first_column(path: Path | str, what: str) -> list[str]:
    """The first value of every non-empty row of a CSV file, its header row included, as a plain ``csv.reader``
    loop reads a word list (BASIC's corpora, FREEDOM's vocabulary); a one-line CirbenchError naming ``what``
    for an unreadable or empty file."""
    import csv
    import io

    from .errors import CirbenchError

    try:
        text = Path(path).read_text(encoding=TEXT_ENCODING)
    except (OSError, UnicodeDecodeError) as exc:
        raise CirbenchError(f"cannot read the {what} {path}: {exc}") from None
    values = [row[0] for row in csv.reader(io.StringIO(text, newline="")) if row]
    if not values:
        raise CirbenchError(f"{what} {path} holds no words")
    return values


def json_loads(text: str | bytes) -> Any:
    """``json.loads`` for files a user or another program wrote: data nested too deeply for the parser (a
    corrupt or hostile file) is a ``json.JSONDecodeError`` like any other malformed JSON, not a RecursionError."""
    try:
        return json.loads(text)
    except RecursionError:
        doc = text if isinstance(text, str) else text.decode("utf-8", errors="replace")
        raise json.JSONDecodeError("nested too deeply", doc[:100], 0) from None


def is_number(value: Any) -> bool:
    """Whether ``value`` is an int or a float, not a bool (which Python counts as an int)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def train_log_entries(path: Path | str) -> list[tuple[str, dict[str, Any]]]:
    """The entries of a training log (``train_log.jsonl``), each with its line: JSON objects with an integer
    ``step``. A line torn by an interrupted run, damaged on disk (not UTF-8, not JSON) or of another shape is
    left out."""
    out = []
    for raw in Path(path).read_bytes().splitlines():
        try:
            line = raw.decode("utf-8")
            entry = json_loads(line)
        except ValueError:  # UnicodeDecodeError and JSONDecodeError both
            continue
        if isinstance(entry, dict) and type(entry.get("step")) is int:
            out.append((line, entry))
    return out


def read_json_file(path: Path | str, option: str) -> Any:
    """The JSON file a user passed with ``option`` (e.g. ``--captions``); a one-line CirbenchError naming both
    when it is missing, unreadable or not valid JSON."""
    from .errors import CirbenchError

    try:
        return json_loads(Path(path).read_bytes())
    except FileNotFoundError:
        raise CirbenchError(f"{option}: {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CirbenchError(f"{option}: cannot read {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise CirbenchError(f"{option}: {path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None


def json_object_file(path: Path | str) -> dict[str, Any] | None:
    """The JSON object in a file cirbench wrote itself (a marker, a record, a key), or None when the file is
    missing, unreadable, not JSON (a write torn by a crash) or not an object (edited by hand, another tool's):
    each caller then treats it as absent."""
    try:
        value = json_loads(Path(path).read_bytes())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def json_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# the largest --seed: training seeds numpy (which takes < 2**32) with the seed plus the rank
SEED_MAX = 2**31 - 1
# the most bootstrap/permutation replicates a command takes: their memory and time grow with the count, and 10,000
# already pins a 95% interval far below a metric's printed precision
MAX_REPLICATES = 100_000
# the most image-reading worker processes a command starts (a node has far fewer cores)
MAX_WORKERS = 256


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def speaks() -> bool:
    """Whether this process prints progress, warnings and results: a plain process, or rank 0 of a torchrun
    launch. Known from the launcher's environment, before the process group is joined."""
    return not launched_by_torchrun() or int(os.environ["RANK"]) == 0


def one_line(exc: BaseException | str, limit: int = 800) -> str:
    """The first meaningful line of an error message (library errors such as torch's weights-only refusal span
    dozens of lines); the full text is shown with ``CIRBENCH_DEBUG=1``."""
    text = str(exc) if not isinstance(exc, str) else exc
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    first = lines[0] if lines else (type(exc).__name__ if isinstance(exc, BaseException) else "")
    if len(first) > limit:
        first = first[: limit - 3] + "..."
    return first


def debug_enabled() -> bool:
    return os.environ.get("CIRBENCH_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def checkpoint_folder(path: Path) -> Path:
    """The checkpoint folder of ``path``: the folder itself, or the folder of its ``model.safetensors`` (what
    ``--checkpoint`` may name; the training log lies beside the weights)."""
    return path.parent if path.is_file() else path
