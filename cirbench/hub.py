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
from pathlib import Path

from .errors import CheckpointError
from .util import one_line

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


def hub_file(repo_id: str, filename: str, what: str, option: str = "checkpoint") -> Path:
    """A file of a Hugging Face hub model repository: from the local hub cache when it is there, downloaded
    otherwise; CheckpointError naming the file and how to supply it (``--option PATH``) when neither works
    (offline, no access)."""
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
    except ImportError:
        raise CheckpointError(f"{what} come from the Hugging Face hub ({repo_id}/{filename}): pip install "
                              f"huggingface_hub, or download the file and pass --{option} PATH") from None
    cached = try_to_load_from_cache(repo_id, filename)
    if isinstance(cached, str) and Path(cached).is_file():
        return Path(cached)
    try:
        if not hub_reachable():
            raise ConnectionError("the hub is not reachable from this machine")
        return Path(hf_hub_download(repo_id, filename))
    except Exception as exc:  # noqa: BLE001 - offline, gated, renamed: every failure is the same one line
        raise CheckpointError(f"cannot get {what} (https://huggingface.co/{repo_id}/blob/main/{filename}): "
                              f"{type(exc).__name__}: {one_line(exc)[:160]}. Download the file on a connected "
                              f"machine and pass --{option} PATH") from None


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
        repo, _, filename = source.removeprefix("hf-hub:").rpartition("/")
        return _hub_availability(repo, filename, "no network")
    if _url_cache(source).is_file():
        return "in the torch hub cache", True
    if _url_reachable(source):
        return "to download", True
    return "NOT AVAILABLE: no network", False


def _hub_availability(repo: str, filename: str, unavailable: str) -> tuple[str, bool]:
    """A hub repository's file: in the Hugging Face cache, to download, or not available (``unavailable`` says
    why)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return "NOT AVAILABLE: huggingface_hub is not installed", False
    try:
        cached = try_to_load_from_cache(repo, filename)
    except Exception:  # noqa: BLE001 - not a repository id (a missing folder): not cached
        cached = None
    if isinstance(cached, str):
        return "in the Hugging Face cache", True
    return ("to download", True) if hub_reachable() else (f"NOT AVAILABLE: {unavailable}", False)


def _model_availability(name: str) -> tuple[str, bool]:
    """Where ``from_pretrained(name)`` would find a transformers model: a local folder, the hub's cache (its
    config.json there), a download, or nowhere."""
    if Path(name).expanduser().is_dir():
        return "a local folder", True
    return _hub_availability(name, "config.json",
                             "neither a local folder nor in the Hugging Face cache, and no network")


def _url_cache(url: str) -> Path:
    """Where :func:`url_file` keeps the file published at ``url``: ``<torch hub dir>/checkpoints/<name>``."""
    import torch  # only on the path that needs the file

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlparse(url).path).name


def _url_reachable(url: str) -> bool:
    parts = urllib.parse.urlparse(url)
    return host_reachable(parts.hostname or "", parts.port or (80 if parts.scheme == "http" else 443))


def url_file(url: str, what: str, option: str) -> Path:
    """A file published at ``url`` (a release asset, a data file in a repository): from torch's hub cache
    (``<torch hub dir>/checkpoints/<name>``) when it is there, downloaded into it otherwise; CheckpointError
    naming the URL and ``--option PATH`` when the host cannot be reached or the download fails."""
    import torch

    cached = _url_cache(url)
    if cached.is_file():
        return cached
    if not _url_reachable(url):
        raise CheckpointError(f"cannot download {what} ({url}): no network. Download the file on a connected "
                              f"machine and pass --{option} PATH")
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(cached), progress=True)  # writes a temporary file, then renames
    except Exception as exc:  # noqa: BLE001 - a moved asset, a proxy: every failure is the same one line
        raise CheckpointError(f"cannot download {what} ({url}): {type(exc).__name__}: {one_line(exc)[:160]}. "
                              f"Download the file on a connected machine and pass --{option} PATH") from None
    return cached


def given_or_pinned(given: str | Path | None, option: str, url: str, sha256: str | None, what: str) -> Path:
    """The file an option names (``given``), or the one published at ``url`` (downloaded once, see
    :func:`url_file`) and checked against its ``sha256`` when that is known; a one-line error for a missing
    file or a download that is not the published one."""
    from .errors import CirbenchError
    from .util import file_sha256

    flag = option.replace("_", "-")
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise CirbenchError(f"--{flag} {path} is not a file")
        return path
    path = url_file(url, what, flag)
    if sha256 and file_sha256(path) != sha256:
        raise CheckpointError(f"{path} is not {what} published at {url} (its sha256 differs): delete it to "
                              f"download it again, or pass --{flag} FILE")
    return path
