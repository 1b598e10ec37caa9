"""Loading and unloading the local transformers models that generate text (captioners, language models).

The weights' dtype is always passed explicitly: transformers 4 loads fp32 unless told otherwise, transformers
5 loads the checkpoint's own dtype (``dtype="auto"``), so leaving it out would make the same cache key hold
texts generated at different precisions depending on the installed version.
"""

from __future__ import annotations

import gc
from typing import Any

from ..errors import UnknownNameError
from ..hub import pretrained_source

GENERATION_PRECISIONS = ("fp32", "bf16", "fp16")


def from_pretrained_args(path: str, precision: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """What ``from_pretrained`` takes for ``path`` (a local folder, a hub id, or ``OWNER/NAME@REVISION``):
    ``(path_or_id, where, weights)``, ``where`` the keywords that find the files (for processors and tokenizers),
    ``weights`` those plus the weights' dtype (for models)."""
    import torch
    import transformers

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise UnknownNameError("generation precision", precision, GENERATION_PRECISIONS)
    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in 4.56; the old name warns in 5
    name, where = pretrained_source(path)
    return name, where, {**where, key: dtypes[precision]}


def load_image_text_to_text(path: str, precision: str, device: str, chat: bool = False) -> tuple[Any, Any]:
    """The processor and the image-text-to-text model at ``path`` (a captioner, a vision-language model), the
    model's weights in ``precision``, on ``device`` and in eval mode. ``chat``: a processor without a chat
    template (to place images in the messages) is a ValueError, before the weights are read."""
    import transformers

    # AutoModelForVision2Seq before transformers 4.46 (since deprecated, then removed)
    auto = (getattr(transformers, "AutoModelForImageTextToText", None)
            or transformers.AutoModelForVision2Seq)  # type: ignore[attr-defined]
    name, where, load = from_pretrained_args(path, precision)
    processor = transformers.AutoProcessor.from_pretrained(name, **where)
    if chat and not getattr(processor, "chat_template", None):
        raise ValueError("its processor has no chat template to place the image in the prompt")
    return processor, auto.from_pretrained(name, **load).to(device).eval()


def free_memory() -> None:
    """Return what dropped generation models held (their GPU memory above all): call it after the last
    reference to a model is gone, before the next model loads or the images are encoded."""
    gc.collect()
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
