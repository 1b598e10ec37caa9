"""LinCIR: the SEARLE protocol with LinCIR's weights, and its language-only training (self-masking projection)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

from cirbench.backbones import Backbone
from cirbench.errors import CirbenchError
from cirbench.methods._shared.textinv import (
    LinCIRProtocol,
    PhiTrainable,
    clean_caption,
    encode_with_pseudo_tokens,
    lincir_demo_weights,
    load_phi_weights,
    placeholder_id,
)

PLACEHOLDER = "$"
KEYWORD_TAGS = ("NOUN", "PROPN", "ADJ", "DET")


class LinCIR(LinCIRProtocol):
    """Query feature = text feature of "a photo of $ that {caption}" with $ = Phi(image embedding)."""

    def __init__(self, backbone, options, dataset=None):
        super().__init__(backbone, options, dataset)
        path = options.get("checkpoint")
        self.demo = path is None
        if self.demo:
            path = lincir_demo_weights(backbone)
        tensors, self.sha256 = load_phi_weights(path, "lincir", backbone)
        self.build_phi(tensors, str(path))
        self.checkpoint = str(path)

    def label_tag(self) -> str | None:
        return "demo-weights" if self.demo else None

    def info(self) -> dict:
        weights = ("demo weights (navervision/zeroshot-cir-models lincir_large.pt), not the paper's, which were "
                   "not released") if self.demo else "given checkpoint"
        return {**super().info(), "weights": weights}


# -- language-only training ------------------------------------------------------------------------------
def keyword_runs(tagged: Sequence[tuple[str, str]]) -> list[str]:
    """The official keyword rule: maximal runs of NOUN/PROPN/ADJ/DET tokens, each joined with spaces."""
    runs, current = [], []
    for word, tag in tagged:
        if tag in KEYWORD_TAGS:
            current.append(word)
        elif current:
            runs.append(" ".join(current))
            current = []
    if current:
        runs.append(" ".join(current))
    return runs


def keyword_found(keyword: str, caption: str) -> bool:
    """Whether the official masking loop masks ``keyword`` in ``caption`` (a plain substring test); at the first
    keyword for which it is not, the loop masks one random word instead and stops."""
    return bool(keyword) and keyword in caption


def mask_caption(caption: str, keywords: Sequence[str], rng: random.Random | ModuleType) -> str:
    """The official masking loop: every keyword found in the caption becomes ``$`` (plain substring
    replacement, as the official code does); at the first keyword not found (or when there are none) one
    random space-separated word is replaced instead and the loop stops. ``$`` is written with spaces around
    it, which tokenizes as the official ``[$]`` special token does (a word of its own)."""
    mark = f" {PLACEHOLDER} "
    replaced = caption
    for keyword in list(keywords) or [""]:
        if keyword_found(keyword, caption):
            replaced = replaced.replace(keyword, mark)
        else:
            word = rng.sample(caption.split(" "), 1)[0]  # may be "" (double spaces): replaced between every character
            replaced = replaced.replace(word, mark)
            break
    return " ".join(replaced.split())


class SpacyTagger:
    """spaCy's en_core_web_sm part-of-speech tags, loaded once (the official keyword extractor)."""

    def __init__(self) -> None:
        try:
            import spacy

            self.nlp = spacy.load("en_core_web_sm", disable=["ner", "lemmatizer", "parser"])
        except (ImportError, OSError):
            raise CirbenchError("LinCIR's keyword masking needs spaCy with en_core_web_sm (pip install spacy && "
                                "python -m spacy download en_core_web_sm); or pass --keywords column (a "
                                "'keywords' corpus column) or --keywords random") from None

    def __call__(self, captions: list[str]) -> list[list[str]]:
        return [keyword_runs([(t.text, t.pos_) for t in doc]) for doc in self.nlp.pipe(captions)]


class LinCIRTrainable(PhiTrainable):
    """Self-masking projection: Phi(text embedding of a caption + noise) must be the pseudo-word that makes
    the caption with its keywords masked by ``$`` embed as the caption does (MSE of unnormalised embeddings).
    """

    name = "lincir"
    needs_images = False
    # the official README's command: batch 64 x 8 GPUs, constant lr 1e-4 without warm-up, 20,000 steps; its
    # code's AdamW weight decay 0.01 (torch's AdamW betas and eps), Phi dropout 0.5
    defaults = {"lr": 1e-4, "weight_decay": 0.01, "batch_size": 512, "max_steps": 20000, "warmup_steps": 0,
                "schedule": "constant"}

    def __init__(self, backbone: Backbone, options: dict[str, Any]):
        super().__init__(backbone, options)
        self.mode = options.get("keywords", "spacy")
        self.tagger = SpacyTagger() if self.mode == "spacy" else None
        self.placeholder = placeholder_id(backbone, PLACEHOLDER)

    def keywords(self, captions: list[str], extra: dict[str, list[Any]]) -> list[list[str]]:
        if self.tagger is not None:  # --keywords spacy
            return self.tagger(captions)
        if self.mode == "column":
            if "keywords" not in extra:
                raise CirbenchError("--keywords column needs a 'keywords' column in the corpus ('|'-separated)")
            return [[k.strip().lower() for k in str(v or "").split("|") if k.strip()] for v in extra["keywords"]]
        return [[] for _ in captions]

    def masked_prompts(self, captions: list[str], keywords: list[list[str]]) -> tuple[list[str], dict[str, float]]:
        """Masked captions; one whose ``$`` did not survive truncation becomes "a photo of $" (as officially).
        Also what the batch's masks were, as shares of its captions: ``masked_by_keywords`` (every keyword
        found and masked, no random word) and ``kept_placeholder`` (a ``$`` left after truncation, the rest
        being "a photo of $"). The official log's ``preproc_rate`` is neither: its only zero case, a caption
        that splits into no words, cannot occur, so it reads 1 for every batch."""
        prompts = [mask_caption(c, k, random) for c, k in zip(captions, keywords, strict=True)]
        found = (self.backbone.tokenize(prompts) == self.placeholder).any(dim=1).tolist()
        prompts = [p if ok else f"a photo of {PLACEHOLDER}" for p, ok in zip(prompts, found, strict=True)]
        by_keywords = [bool(k) and all(keyword_found(w, c) for w in k) for c, k in zip(captions, keywords, strict=True)]
        n = max(1, len(found))
        return prompts, {"masked_by_keywords": sum(by_keywords) / n, "kept_placeholder": sum(found) / n}

    def training_step(self, batch):
        tokenizer = self.backbone.tokenizer
        inner = getattr(tokenizer, "tokenizer", tokenizer)
        captions = [clean_caption(c, inner) for c in batch.captions]
        prompts, shares = self.masked_prompts(captions, self.keywords(captions, batch.extra))
        with torch.no_grad():
            original = self.backbone.model.encode_text(self.backbone.tokenize(captions)).float()
        noise = float(self.options.get("noise", 1.0))
        # drawn on the CPU generator (saved in checkpoints), so a resumed run draws what an uninterrupted one would
        scale = torch.rand(len(captions)).unsqueeze(-1)
        inputs = original + (noise * scale * torch.randn(original.shape)).to(original.device)
        pseudo = self.net(inputs)
        counts = (self.backbone.tokenize(prompts) == self.placeholder).sum(dim=1).tolist()
        rows = [pseudo[i].unsqueeze(0).expand(n, -1) for i, n in enumerate(counts)]
        masked = encode_with_pseudo_tokens(self.backbone, prompts, rows, PLACEHOLDER, normalize=False)
        return F.mse_loss(masked.float(), original), shares

    def checkpoint_config(self):
        return {**super().checkpoint_config(), "keywords": self.mode}


def downloads(options: dict, model: str, pretrained: str) -> list[tuple[str, str]]:
    """What ``LinCIR`` fetches (MethodSpec.downloads): the demo weights, unless --checkpoint names some."""
    from cirbench.methods._shared.textinv import lincir_demo_source

    return [] if options.get("checkpoint") else [("LinCIR's demo weights", lincir_demo_source(model, pretrained))]
