"""The Hugging Face hub and other download hosts, answered fast when the machine is offline.

Model loaders (open_clip tags, transformers models, hub checkpoints) retry for minutes before they give up
on a machine without a network. cirbench probes the host once per process instead and fails in seconds with
a line that says how to supply the file. No torch here: the listing and error paths stay light.
"""

from __future__ import annotations

import functools
import os
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CheckpointError
from .util import file_sha256, one_line

_TRUE = {"1", "true", "yes", "on"}


@functools.cache
def host_reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Whether ``host:port`` accepts a TCP connection within ``timeout`` seconds (probed once per process)."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_reachable() -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT`` when set) can be reached; False under HF_HUB_OFFLINE."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return False
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return host_reachable(url.hostname or "huggingface.co", url.port or 443)


def local_files_only(path: str) -> bool:
    """``local_files_only`` for a transformers ``from_pretrained(path)``: True for a local folder or when the
    hub cannot be reached (a cached hub model still loads; an uncached one fails at once)."""
    return Path(path).is_dir() or not hub_reachable()


def split_revision(name: str) -> tuple[str, str | None]:
    """``OWNER/NAME@REVISION`` as ``(OWNER/NAME, REVISION)``; ``(name, None)`` without a revision."""
    repo, at, revision = name.partition("@")
    return repo, (revision if at else None)


def pretrained_source(name: str) -> tuple[str, dict[str, Any]]:
    """What transformers' ``from_pretrained`` takes for ``name``: ``(path_or_id, {"local_files_only", "revision"})``
    for a local folder, a hub id ``OWNER/NAME``, or ``OWNER/NAME@REVISION`` at a branch, tag or commit."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser()), {"local_files_only": True}
    repo, revision = split_revision(name)
    return repo, {"local_files_only": local_files_only(repo), **({"revision": revision} if revision else {})}


@dataclass(frozen=True)
class HubFile:
    """A file of a Hugging Face hub model repository, pinned where its publication is known: the ``revision``
    (a commit) it is downloaded at, so that a later push to the repository does not change what a default
    fetches, and its ``sha256`` (the Git LFS oid the hub shows), so that what is used is the published file."""

    repo: str
    filename: str
    revision: str | None = None
    sha256: str | None = None

    @property
    def source(self) -> str:
        """``hf-hub:REPO[@REVISION]/FILE``, as ``MethodSpec.downloads`` and ``--dry-run`` name it."""
        return f"hf-hub:{self.repo}{'@' + self.revision if self.revision else ''}/{self.filename}"

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo}/blob/{self.revision or 'main'}/{self.filename}"

    def fetch(self, what: str, option: str | None = "checkpoint") -> Path:
        """The file, from the local hub cache or downloaded, checked: :func:`hub_file`."""
        return hub_file(self.repo, self.filename, what, option, revision=self.revision, sha256=self.sha256)

    @classmethod
    def parse(cls, source: str) -> HubFile:
        """The file a ``hf-hub:REPO[@REVISION]/FILE`` source names."""
        pinned, _, filename = source.removeprefix("hf-hub:").rpartition("/")
        repo, revision = split_revision(pinned)
        return cls(repo, filename, revision or None)


def _cached(file: HubFile) -> Path | None:
    """The file in the local hub cache: at its revision, or, when its sha256 is known, the copy a download at the
    repository's head left (the same file when the hash says so, so it is not fetched again)."""
    from huggingface_hub import try_to_load_from_cache

    revisions = [file.revision] + ([None] if file.revision and file.sha256 else [])
    for revision in revisions:
        try:
            cached = try_to_load_from_cache(file.repo, file.filename, revision=revision)
        except Exception:  # noqa: BLE001 - not a repository id (a missing folder): not cached
            cached = None
        if not isinstance(cached, str) or not Path(cached).is_file():
            continue
        if revision == file.revision or file_sha256(cached) == file.sha256:
            return Path(cached)
    return None


def _or_pass(option: str | None) -> str:
    """How to supply a file by hand, where an option takes it (none: a plain download, ``--download-only``)."""
    return f" and pass --{option} PATH" if option else ""


def published(path: Path, sha256: str | None, what: str, url: str, option: str | None) -> Path:
    """``path`` when it is the file published at ``url`` (its sha256 is ``sha256``, or none is known);
    CheckpointError otherwise."""
    if sha256 and file_sha256(path) != sha256:
        raise CheckpointError(f"{path} is not {what} published at {url} (its sha256 differs from {sha256[:12]}...): "
                              "delete it to download it again" + (f", or pass --{option} PATH" if option else ""))
    return path


def hub_file(repo_id: str, filename: str, what: str, option: str | None = "checkpoint", *,
             revision: str | None = None, sha256: str | None = None) -> Path:
    """A file of a Hugging Face hub model repository: from the local hub cache when it is there, downloaded
    otherwise, at ``revision`` when given (a commit: what was published then) and checked against ``sha256``
    when given; CheckpointError naming the file and how to supply it (``--option PATH``, when an option takes it)
    when neither works (offline, no access) or the file is not the published one."""
    file = HubFile(repo_id, filename, revision, sha256)
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise CheckpointError(f"{what} come from the Hugging Face hub ({file.url}): pip install huggingface_hub, "
                              f"or download the file{_or_pass(option)}") from None
    cached = _cached(file)
    if cached is not None:
        return published(cached, sha256, what, file.url, option)
    try:
        if not hub_reachable():
            raise ConnectionError("the hub is not reachable from this machine")
        path = Path(hf_hub_download(repo_id, filename, revision=revision))
    except Exception as exc:  # noqa: BLE001 - offline, gated, renamed: every failure is the same one line
        raise CheckpointError(f"cannot get {what} ({file.url}): {type(exc).__name__}: {one_line(exc)[:160]}. "
                              f"Download the file on a connected machine{_or_pass(option)}") from None
    return published(path, sha256, what, file.url, option)


def availability(source: str) -> tuple[str, bool]:
    """Where a file a method would fetch comes from, found without fetching it (``cirbench run --dry-run``):
    ``(words, available)`` for a URL (torch's hub cache, as :func:`url_file` keeps it) or ``hf-hub:REPO/FILE``
    (the Hugging Face cache, as :func:`hub_file`), a transformers model ``hf-model:PATH_OR_REPO`` (a local folder,
    or the hub's cache, as ``from_pretrained`` finds it) or a chat endpoint ``openai-endpoint:URL`` (its host
    answers; the OpenAI API also needs ``$OPENAI_API_KEY``)."""
    if source.startswith("hf-model:"):
        return _model_availability(source.removeprefix("hf-model:"))
    if source.startswith("openai-endpoint:"):
        url = source.removeprefix("openai-endpoint:")
        if urllib.parse.urlparse(url).hostname == "api.openai.com" and not os.environ.get("OPENAI_API_KEY"):
            return "NOT AVAILABLE: $OPENAI_API_KEY is not set", False
        return ("its host answers", True) if _url_reachable(url) else ("NOT AVAILABLE: its host does not answer", False)
    if source.startswith("hf-hub:"):
        return _hub_availability(HubFile.parse(source), "no network")
    if _url_cache(source).is_file():
        return "in the torch hub cache", True
    if _url_reachable(source):
        return "to download", True
    return "NOT AVAILABLE: no network", False


def download(source: str, what: str) -> str:
    """Fetch what a method would (a ``MethodSpec.downloads`` source, see :func:`availability`) into the local
    caches, and say where it is: a URL's file into torch's hub cache, a hub file at its revision, a transformers
    model's files (``from_pretrained``'s: configs, tokenizer, one format of weights) into the hub cache; an
    endpoint has nothing to fetch. CheckpointError, in one line, when it cannot be had."""
    if source.startswith("openai-endpoint:"):
        return "an endpoint: nothing to download"
    if source.startswith("hf-hub:"):
        return str(HubFile.parse(source).fetch(what, option=None))
    if source.startswith("hf-model:"):
        return str(_download_model(source.removeprefix("hf-model:"), what))
    return str(url_file(source, what, None))


#: what ``from_pretrained`` reads besides the weights: configs, tokenizers and processors, remote code, templates
MODEL_FILES = ("*.json", "*.txt", "*.model", "*.tiktoken", "*.py", "*.jinja")
#: the weights, in the one format ``from_pretrained`` prefers: safetensors, else PyTorch's (whole or sharded)
WEIGHT_FORMATS = (("model.safetensors", "model-*-of-*.safetensors"), ("pytorch_model.bin", "pytorch_model-*-of-*.bin"))


def _download_model(name: str, what: str) -> Path:
    """A transformers model's files (a local folder is itself): the hub repository's configs, tokenizer and
    processor files and its weights in one format, at its revision (``OWNER/NAME@REVISION``)."""
    import fnmatch

    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    repo, revision = split_revision(name)
    try:
        from huggingface_hub import HfApi, snapshot_download

        if not hub_reachable():
            raise ConnectionError("the hub is not reachable from this machine")
        files = HfApi().list_repo_files(repo, revision=revision)
        weights = next((list(patterns) for patterns in WEIGHT_FORMATS
                        if any(fnmatch.fnmatch(f, p) for f in files for p in patterns)), [])
        return Path(snapshot_download(repo, revision=revision, allow_patterns=[*MODEL_FILES, *weights]))
    except Exception as exc:  # noqa: BLE001 - offline, gated, renamed: one line
        raise CheckpointError(f"cannot get {what} (https://huggingface.co/{repo}"
                              f"{'/tree/' + revision if revision else ''}): {type(exc).__name__}: "
                              f"{one_line(exc)[:160]}") from None


def _hub_availability(file: HubFile, unavailable: str) -> tuple[str, bool]:
    """A hub repository's file: in the Hugging Face cache, to download, or not available (``unavailable`` says
    why)."""
    try:
        cached = _cached(file)
    except ImportError:
        return "NOT AVAILABLE: huggingface_hub is not installed", False
    if cached is not None:
        return "in the Hugging Face cache", True
    return ("to download", True) if hub_reachable() else (f"NOT AVAILABLE: {unavailable}", False)


def _model_availability(name: str) -> tuple[str, bool]:
    """Where ``from_pretrained(name)`` would find a transformers model: a local folder, the hub's cache (its
    config.json there), a download, or nowhere."""
    if Path(name).expanduser().is_dir():
        return "a local folder", True
    repo, revision = split_revision(name)
    return _hub_availability(HubFile(repo, "config.json", revision or None),
                             "neither a local folder nor in the Hugging Face cache, and no network")


def _url_cache(url: str) -> Path:
    """Where :func:`url_file` keeps the file published at ``url``: ``<torch hub dir>/checkpoints/<name>``."""
    import torch  # only on the path that needs the file

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlparse(url).path).name


def _url_reachable(url: str) -> bool:
    parts = urllib.parse.urlparse(url)
    return host_reachable(parts.hostname or "", parts.port or (80 if parts.scheme == "http" else 443))


def url_file(url: str, what: str, option: str | None) -> Path:
    """A file published at ``url`` (a release asset, a data file in a repository): from torch's hub cache
    (``<torch hub dir>/checkpoints/<name>``) when it is there, downloaded into it otherwise; CheckpointError
    naming the URL and ``--option PATH`` (when an option takes it) when the host cannot be reached or the
    download fails."""
    import torch

    cached = _url_cache(url)
    if cached.is_file():
        return cached
    if not _url_reachable(url):
        raise CheckpointError(f"cannot download {what} ({url}): no network. Download the file on a connected "
                              f"machine{_or_pass(option)}")
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(cached), progress=True)  # writes a temporary file, then renames
    except Exception as exc:  # noqa: BLE001 - a moved asset, a proxy: every failure is the same one line
        raise CheckpointError(f"cannot download {what} ({url}): {type(exc).__name__}: {one_line(exc)[:160]}. "
                              f"Download the file on a connected machine{_or_pass(option)}") from None
    return cached


def given_or_pinned(given: str | Path | None, option: str, url: str, sha256: str | None, what: str) -> Path:
    """The file an option names (``given``), or the one published at ``url`` (downloaded once, see
    :func:`url_file`) and checked against its ``sha256`` when that is known; a one-line error for a missing
    file or a download that is not the published one."""
    from .errors import CirbenchError

    flag = option.replace("_", "-")
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise CirbenchError(f"--{flag} {path} is not a file")
        return path
    return published(url_file(url, what, flag), sha256, what, url, flag)
