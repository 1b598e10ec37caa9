"""BGE-VL-CLIP's composed query, as the official evaluation (``eval/flag_mmret.py`` ``encode_mm_it``,
``eval/flag_dataset.py``'s collator, ``eval/eval_Circo.py``, ``eval/eval_fashioniq.py`` and their query files)
computes it, checked against a transcription of it (tests/test_bge_vl.py):

* query = ``normalize(get_text_features(text) + get_image_features(reference))``, both unnormalised; the gallery is
  the images' normalised ``get_image_features``; fp32 (the evaluations pass ``use_fp16=False``);
* the text is truncated at 75 tokens, start and end included (the collator's ``caption_max_len=75``), not CLIP's 77;
* the texts are the released query files' (``eval/data``), which are, on every query, CIRCO's "Find a picture that
  also {shared concept}, but {relative caption}." and FashionIQ's "{caption 1}, and {caption 2}" (the captions as
  annotated); other benchmarks' modification text is used as it is (the repository evaluates CIRCO and FashionIQ
  only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cirbench.method import Method
from cirbench.methods._shared.textinv import RawImageReferences
from cirbench.types import Query

TEXT_TOKENS = 75  # MMIT_Collator(tokenizer, caption_max_len=75)


def query_text(query: Query, dataset: str | None) -> str:
    """The instruction the official query files pair with the reference image."""
    if dataset == "circo" and query.extra.get("shared_concept"):
        return f"Find a picture that also {query.extra['shared_concept']}, but {query.text}."
    if len(query.texts) == 2:
        return f"{query.texts[0]}, and {query.texts[1]}"
    return query.text


class BGEVL(RawImageReferences, Method):
    """Query = normalize(raw image embedding + raw text embedding)."""

    @torch.no_grad()
    def compose(self, references: torch.Tensor, queries: list[Query]) -> torch.Tensor:
        bb = self.backbone
        width = int(getattr(bb.tokenizer, "context_length", 77))
        cut = min(TEXT_TOKENS, width)  # a backbone of a shorter context (not BGE-VL's) keeps its own
        tokens = bb.tokenizer([query_text(q, self.dataset) for q in queries], context_length=cut)
        tokens = F.pad(tokens, (0, width - cut)).to(bb.device)  # padding after the end token changes nothing
        with bb.autocast():
            text = bb.model.encode_text(tokens).float()
        return F.normalize(references.to(bb.device).float() + text, dim=-1)
