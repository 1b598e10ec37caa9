"""Images meet generated text: what every method that captions images or shows them to a model shares.

A caption request is keyed by the image's content (:func:`image_digest`), the captioner, the sha256 of its
prompt and its decoding (:func:`caption_request`), so that every method asking the same captioner the same
way about the same image (LDRE's references, WeiMoCIR's gallery) reads the same recorded texts.
:func:`caption_missing` captions what the cache lacks, in batches, with a progress bar, recording each batch
as it comes back; :func:`image_data_url` is an image as a multimodal chat model receives it (OSrCIR);
:func:`generate_once` runs a method's generation so that torchrun ranks and parallel jobs pay for each text
once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import CirbenchError, ImageError
from ..images import load_image, read_image_bytes
from ..types import ImageRef
from ..util import json_hash, making, one_line, sha256_bytes
from .cache import GenerationCache
from .hf import free_memory

CAPTION_BATCH = 8  # images captioned at once
DIGEST_THREADS = 8  # threads reading images to hash them


_DIGESTS: dict[str, str] = {}  # a file's stat identity -> its digest, for the life of the process


def image_digest(ref: ImageRef) -> str:
    """What a captioner sees of ``ref``: the file's sha256, and the view of it when the benchmark takes one.
    Each file is read once per process while its size, times and inode stay the same (the feature cache's
    ``stat`` identity): the values of a sweep do not read a 123,403-image gallery again."""
    from ..feature_cache import image_identity

    identity = image_identity(ref, "stat")
    known = _DIGESTS.get(identity)
    if known is not None:
        return known
    try:
        digest = sha256_bytes(read_image_bytes(ref))
    except ImageError as exc:
        raise CirbenchError(str(exc)) from None
    digest = digest if ref.view is None else f"{digest}|view:{ref.view.key}"
    if not identity.endswith("|missing"):
        _DIGESTS[identity] = digest
    return digest


MIME = {b"\xff\xd8\xff": "image/jpeg", b"\x89PNG\r\n\x1a\n": "image/png", b"GIF87a": "image/gif",
        b"GIF89a": "image/gif"}


def image_data_url(ref: ImageRef) -> str:
    """``ref`` as a ``data:`` URL for a multimodal model's ``image_url``: the file's own bytes when it is a JPEG,
    PNG, GIF or WebP (what such endpoints take), else, and for a view of the file (a crop), the image the
    benchmark means encoded as PNG."""
    import base64

    try:
        data = read_image_bytes(ref)
        mime = next((m for magic, m in MIME.items() if data.startswith(magic)), None)
        if mime is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            mime = "image/webp"
        if ref.view is not None or mime is None:
            import io

            buffer = io.BytesIO()
            load_image(ref).convert("RGB").save(buffer, format="PNG")
            data, mime = buffer.getvalue(), "image/png"
    except ImageError as exc:
        raise CirbenchError(str(exc)) from None
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def image_digests(refs: Sequence[ImageRef], name: str, progress: bool) -> list[str]:
    """:func:`image_digest` of each image, in order: read by a few threads (file reads, often over a network
    file system, dominate), with a progress bar."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    with ThreadPoolExecutor(max_workers=DIGEST_THREADS) as pool:
        return list(tqdm(pool.map(image_digest, refs), total=len(refs), desc=f"{name}: reading images",
                         unit="img", disable=not progress or len(refs) < 1000, leave=False))


def caption_decoding(n: int, seed: int, precision: str) -> dict[str, Any]:
    """How the captioner decodes (see :mod:`.captioner`): beam search for one caption, nucleus sampling with
    ``seed`` for several; part of every caption's cache key."""
    return {"n": n, "num_beams": 5, "max_new_tokens": 30,
            "sampling": {"top_p": 0.9, "top_k": 50, "seed": seed} if n > 1 else None,
            "precision": precision}


def caption_request(model: str, prompt: str, n: int, seed: int, precision: str) -> dict[str, Any]:
    """A caption request without its image (add ``"image": image_digest(ref)``): a transformers captioner's
    decoding, or a chat model's, with the precision of local weights (an endpoint's is the server's, not ours to
    record). An unknown kind of captioner is a one-line error here, before anything is encoded."""
    from .captioner import CHAT_CAPTION_PROMPT, chat_caption_decoding, check_captioner

    kind = check_captioner(model).partition(":")[0]
    if kind == "hf":
        params = caption_decoding(n, seed, precision)
    else:
        params, prompt = chat_caption_decoding(n, seed), prompt or CHAT_CAPTION_PROMPT  # the prompt it is sent
        if kind == "hf-chat":
            params["precision"] = precision
    return {"task": "caption", "model": model, "prompt": sha256_bytes(prompt.encode()), "params": params}


def say(name: str, progress: bool, message: str) -> None:
    """One line before a step that shows no bar of its own for a while (loading a model of many GB)."""
    from .. import distributed

    if progress and distributed.is_main():
        from tqdm.auto import tqdm

        tqdm.write(f"{name}: {message}")


@contextlib.contextmanager
def resumable(cache: GenerationCache, total: int, what: str) -> Iterator[list[int]]:
    """Count what a generation loop records (``made[0]``); an error that stops it midway says that those texts
    are kept and that running again goes on from there."""
    made = [0]
    try:
        yield made
    except CirbenchError as exc:
        if not made[0]:
            raise
        raise CirbenchError(f"{one_line(exc)} ({made[0]} of the {total} {what} are recorded in {cache.path}: "
                            "running again goes on from there)", exit_code=exc.exit_code) from None


def caption_missing(todo: Sequence[tuple[str, ImageRef, dict[str, Any]]], cache: GenerationCache,
                    build: Callable[[], Any], *, model: str, precision: str, name: str, progress: bool,
                    unit_name: str = "images", first: str = "", role: str = "image") -> dict[str, list[str]]:
    """Caption each ``(unit, image, cache key)`` of ``todo`` (none of them in ``cache``) with the captioner that
    ``build`` loads, record every caption under its key, and return ``{unit: captions}``. The captioner is
    loaded only when there is something to caption and dropped afterwards (before any other model loads: both
    at once may not fit a GPU); a replay run fails at once, naming the first image (``role``, e.g. "reference
    image") and what asked for it (``first``, e.g. "query 17")."""
    out: dict[str, list[str]] = {}
    if not todo:
        return out
    what = f"caption of {role} {todo[0][1].id} by {model}; {len(todo)} {unit_name} in all"
    cache.require_live(f"{first} ({what})" if first else what)
    say(name, progress, (f"asking {model} for the captions of {len(todo)} {unit_name}" if model.startswith("openai:")
                         else f"loading the captioner {model} ({precision}) for {len(todo)} {unit_name}"))
    captioner = build()
    from tqdm.auto import tqdm

    with resumable(cache, len(todo), f"{unit_name}' captions") as made:
        for start in tqdm(range(0, len(todo), CAPTION_BATCH), desc=f"{name}: captioning", unit="batch",
                          disable=not progress, leave=False):
            chunk = todo[start : start + CAPTION_BATCH]
            # a chat model is sent each file's own bytes (as the official chat-model pipelines send them), a
            # transformers captioner given the decoded image
            images = [image_data_url(r) if getattr(captioner, "takes_urls", False) else load_image(r).convert("RGB")
                      for _, r, _ in chunk]
            # seeded by the batch's first unit: two units of one image never share their draws
            captions = captioner.caption(images, salt=chunk[0][0])
            cache.put_many([(key, caps) for (_, _, key), caps in zip(chunk, captions, strict=True)],
                           captioner.source())
            for (u, _, _), caps in zip(chunk, captions, strict=True):
                out[u] = caps
            made[0] += len(chunk)
    del captioner
    free_memory()
    return out


def generate_once(folder: Path, mode: str, same: Any, waiting: str, work: Callable[[GenerationCache], None]) -> None:
    """Run ``work`` on the generation cache in ``folder`` so that each text is paid for once: under torchrun,
    rank 0 generates what is missing while the other ranks wait, then they replay what it recorded; jobs on
    one cache that would generate the same texts (``same``: everything that determines them) take turns, the
    later ones reading the first one's texts (``waiting`` is printed while one waits). Jobs that would generate
    other texts never wait on each other."""
    from .. import distributed  # torch: only once a method runs

    if distributed.world_size() > 1 and not distributed.is_main():
        distributed.long_barrier()
        work(GenerationCache(folder, "replay"))
        return
    turn = (contextlib.nullcontext() if mode == "replay"
            else making(folder / f"turn-{json_hash(same)[:24]}", waiting=waiting))
    with turn:
        work(GenerationCache(folder, mode))  # read in turn: the texts a job before this one made are there
    if distributed.world_size() > 1:
        distributed.long_barrier()
