"""``cirbench data fetch``: a benchmark's official annotation files, downloaded from their public sources at a
pinned revision and kept only when their sha256 is the official one.

A dataset plugin names them in ``OFFICIAL_SOURCES`` (``{path under the data root: URL}``); their checksums are
its ``OFFICIAL_SHA256`` (by file name), which ``cirbench data check`` compares too. Nothing here knows a dataset.
A file already in place with the official checksum is left alone; one that differs is kept (the user's edit,
or another release) unless ``force``. Each download goes to a temporary file beside its target and replaces
nothing until its checksum is right.

``CIRBENCH_FETCH_MIRROR`` (a folder or a base URL) serves machines without access to the sources: each file is
looked up there under its path in the data root, then under ``<dataset>/<path>``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import CirbenchError
from .util import file_sha256, one_line

MIRROR_ENV = "CIRBENCH_FETCH_MIRROR"
TIMEOUT_S = 60


def _candidates(dataset: str, relative: str, url: str) -> list[str]:
    """Where to read a file from: the mirror's two places when one is set, else its URL."""
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if not mirror:
        return [url]
    if "://" not in mirror:  # a folder
        base = Path(mirror).expanduser().resolve()
        return [(base / relative).as_uri(), (base / dataset / relative).as_uri()]
    base_url = mirror.rstrip("/") + "/"
    return [urllib.parse.urljoin(base_url, relative), urllib.parse.urljoin(base_url, f"{dataset}/{relative}")]


def _download(source: str, into: Path) -> str:
    """Copy ``source`` into ``into``; return the sha256 of the bytes."""
    digest = hashlib.sha256()
    with urllib.request.urlopen(source, timeout=TIMEOUT_S) as response, open(into, "wb") as out:  # noqa: S310
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def fetch(dataset: Any, name: str, force: bool = False, say: Callable[[str], None] = print) -> dict[str, str]:
    """Fetch the official annotation files of ``dataset`` (a built dataset plugin named ``name``) into its data
    root: ``{path: "present" | "fetched" | "differs"}``. CirbenchError, in one line naming the file and where it
    was looked for, when one cannot be had or does not match its checksum."""
    sources: dict[str, str] = getattr(dataset, "OFFICIAL_SOURCES", {}) or {}
    official: dict[str, str] = getattr(dataset, "OFFICIAL_SHA256", {}) or {}
    if not sources:
        if hasattr(dataset, "prepare"):
            raise CirbenchError(f"dataset '{name}' downloads no annotation files: `cirbench data prepare {name}` "
                                "writes what it derives")
        raise CirbenchError(f"dataset '{name}' names no public source for its annotation files: see its entry in "
                            "datasets/README.md for where they come from")
    root = Path(dataset.data_root)
    status: dict[str, str] = {}
    for relative, url in sources.items():
        expected = official.get(Path(relative).name)
        if expected is None:
            raise CirbenchError(f"dataset '{name}': {relative} has no official sha256 to check a download against")
        target = root / relative
        if target.is_file():
            if file_sha256(target) == expected:
                status[relative] = "present"
                say(f"present   {target}")
                continue
            if not force:
                status[relative] = "differs"
                say(f"differs   {target}: not the official file (kept; --force replaces it)")
                continue
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
        os.close(fd)
        try:
            tried = []
            for source in _candidates(name, relative, url):
                try:
                    got = _download(source, Path(partial))
                    break
                except (OSError, ValueError) as exc:  # unreachable host, HTTP error, absent mirror file
                    tried.append(f"{source} ({one_line(exc)[:80]})")
            else:
                raise CirbenchError(f"cannot fetch {relative}: {'; '.join(tried)}. Download it on a connected "
                                    f"machine into {target}, or set {MIRROR_ENV} to a folder that holds it")
            if got != expected:
                raise CirbenchError(f"{source} is not the official {Path(relative).name} (sha256 {got[:12]}, "
                                    f"expected {expected[:12]}): nothing was written")
            os.replace(partial, target)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
        status[relative] = "fetched"
        say(f"fetched   {target}  ({source})")
    return status
