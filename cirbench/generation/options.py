"""The options every method that generates text with local or remote models declares the same way, and
reading them back (a captioner's request and the captioner itself).

Imported when plugins register (``cirbench --help``, ``cirbench methods``): nothing heavy here.
"""

from __future__ import annotations

import os
from typing import Any

from ..types import OptionSpec
from ..util import SEED_MAX
from .cache import GENERATION_MODES


def captioner_options(captioner: str | None, caption_prompt: str,
                      when: str = "") -> tuple[OptionSpec, OptionSpec, OptionSpec]:
    """``--captioner`` (default ``captioner``; ``when`` says when it is used), ``--caption-prompt`` and
    ``--captioner-url``."""
    return (
        OptionSpec("captioner", "Image captioner: hf:PATH_OR_REPO (a transformers image-to-text model), "
                   "hf-chat:PATH_OR_REPO (a local vision-language chat model, e.g. LLaVA) or openai:MODEL (a "
                   f"multimodal chat model, e.g. GPT-4o, at --captioner-url){when}.", "str", captioner),
        OptionSpec("caption_prompt", "Prompt given to the captioner ('' for plain captioning).", "str", caption_prompt),
        OptionSpec("captioner_url", "Base URL of an openai: captioner's endpoint (default $OPENAI_BASE_URL or the "
                   "OpenAI API); the key is read from $OPENAI_API_KEY.", "str", None),
    )


def generation_options(models: str, sampled: str) -> tuple[OptionSpec, OptionSpec, OptionSpec]:
    """``--sampling-seed``, ``--generation-precision`` and ``--generation`` of a method whose local models are
    ``models`` ("captioner", "captioner and language model") and whose sampled texts are ``sampled``."""
    return (
        OptionSpec("sampling_seed", f"Seed for sampled {sampled}.", "int", 0, minimum=0, maximum=SEED_MAX),
        OptionSpec("generation_precision", f"Weights dtype of the local (hf:) {models}: fp32, or bf16/fp16 for half "
                   "the GPU memory (LAVIS, which CIReVL and LDRE used, runs BLIP-2's FlanT5 in bf16 and its OPT in "
                   "fp16). Recorded with every generated text.", "str", "fp32", choices=("fp32", "bf16", "fp16")),
        OptionSpec("generation", "auto: use recorded generations, generate the rest; replay: recorded only (no "
                   "model is loaded); refresh: generate everything again.", "str", "auto", choices=GENERATION_MODES),
    )


def generation_precision(options: dict[str, Any]) -> str:
    """``--generation-precision``: the weights dtype of a method's local generation models."""
    return str(options.get("generation_precision") or "fp32")


def caption_request_of(options: dict[str, Any], n: int) -> dict[str, Any]:
    """The caption request (its image aside) of the captioner that a method's options name, ``n`` captions an
    image (see :func:`cirbench.generation.images.caption_request`)."""
    from .images import caption_request

    return caption_request(str(options["captioner"]), str(options.get("caption_prompt") or ""), n,
                           int(options.get("sampling_seed") or 0), generation_precision(options))


def captioner_of(options: dict[str, Any], n: int, device: str):
    """The captioner that a method's options name, writing ``n`` captions an image, loaded on ``device``."""
    from .captioner import build_captioner

    return build_captioner(str(options["captioner"]), prompt=str(options.get("caption_prompt") or ""), n=n,
                           seed=int(options.get("sampling_seed") or 0), device=device,
                           precision=generation_precision(options), url=options.get("captioner_url"))


# (option naming the model, option naming its endpoint, what it is): the models a generating method may use
_MODEL_OPTIONS = (("captioner", "captioner_url", "the captioner"), ("llm", "llm_url", "the language model"))


def generation_downloads(options: dict[str, Any], model: str, pretrained: str) -> list[tuple[str, str]]:
    """``MethodSpec.downloads`` of a method that generates text (``cirbench run --dry-run``): the local models
    (``hf:``/``hf-chat:``, ``hf-model:PATH_OR_REPO``) it would load and the endpoints (``openai:``,
    ``openai-endpoint:URL``) it would ask for the texts not recorded yet; nothing under ``--generation replay``,
    which loads no model."""
    if options.get("generation") == "replay":
        return []
    from .llm import DEFAULT_OPENAI_URL

    out = []
    for option, url_option, what in _MODEL_OPTIONS:
        spec = options.get(option)
        if not spec:
            continue
        kind, _, name = str(spec).partition(":")
        named = f"{what} {spec} (for the texts not recorded yet; --generation replay needs none)"
        if kind in ("hf", "hf-chat"):
            out.append((named, f"hf-model:{name}"))
        elif kind == "openai":
            url = options.get(url_option) or os.environ.get("OPENAI_BASE_URL") or DEFAULT_OPENAI_URL
            out.append((named, f"openai-endpoint:{url}"))
    return out
