"""Where a training caption names its subject: FTI4CIR splits a caption into subject and attribute phrases,
Context-I2W masks the subject's name. spaCy's English parser (``en_core_web_sm``) decides when it is installed."""

from __future__ import annotations

import importlib.util
from typing import Any

_SPLIT_WORDS = {"with", "in", "on", "at", "near", "and", "that", "while", "under", "over", "behind", "next", "of",
                "wearing", "holding", "sitting", "standing", "is", "are", "which", "who", "by", "from", "for"}

_SPACY: dict[str, Any] = {}


def english_parser() -> Any | None:
    """spaCy's ``en_core_web_sm`` pipeline, loaded once, or None when spaCy or the model is not installed."""
    if "nlp" not in _SPACY:
        _SPACY["nlp"] = None
        if importlib.util.find_spec("spacy") is not None:
            try:
                import spacy

                _SPACY["nlp"] = spacy.load("en_core_web_sm")
            except OSError:  # spaCy without its English model
                pass
    return _SPACY["nlp"]


def _first_noun(doc: Any) -> Any | None:
    """The first noun (or proper noun) of a parsed caption, or None."""
    return next((tok for tok in doc if tok.pos_ in ("NOUN", "PROPN")), None)


def split_subject_attribute(caption: str) -> tuple[str, str]:
    """Split a caption at its first noun into (subject, attribute): spaCy's parser when an English model is
    installed; otherwise a rule: the subject runs up to the first preposition/conjunction/verb-like word."""
    nlp = english_parser()
    if nlp is not None:
        doc = nlp(caption)
        if (tok := _first_noun(doc)) is not None:
            return doc[: tok.i + 1].text, doc[tok.i + 1 :].text.strip() or caption
    words = caption.split()
    for i, w in enumerate(words[1:], start=1):
        if w.lower().strip(",.") in _SPLIT_WORDS:
            return " ".join(words[:i]), " ".join(words[i:])
    return caption, caption


def mask_subject(caption: str, placeholder: str) -> str | None:
    """The caption with the name of its subject (its first noun, by spaCy's parser) replaced by ``placeholder``;
    None when no English parser is installed or the caption has no noun."""
    nlp = english_parser()
    if nlp is None:
        return None
    doc = nlp(caption)
    if (tok := _first_noun(doc)) is None:
        return None
    return (doc[: tok.i].text_with_ws + placeholder + tok.whitespace_ + doc[tok.i + 1 :].text).strip()
