"""Published i-CIR numbers: the mAP table of the official repository's README (github.com/billpsomas/icir,
commit 463cc1d), for the methods whose runs there use CLIP ViT-L/14 (OpenAI weights, the repository's ``clip``
backbone): its own ``text``, ``image``, ``sum`` and ``product`` (similarities clipped at 0) baselines and
BASIC, with and without query expansion."""

from __future__ import annotations

from cirbench.types import PaperRow

SOURCE = "Psomas et al., Instance-Level Composed Image Retrieval, NeurIPS 2025 (github.com/billpsomas/icir README)"

PAPER_ROWS = (
    PaperRow("text-only", "ViT-L/14", "test", {"mAP": 3.01}, SOURCE),
    PaperRow("image-only", "ViT-L/14", "test", {"mAP": 3.04}, SOURCE),
    PaperRow("image-text-sum", "ViT-L/14", "test", {"mAP": 8.20}, SOURCE),
    PaperRow("image-text-product+clamped", "ViT-L/14", "test", {"mAP": 17.48}, SOURCE),
    PaperRow("basic", "ViT-L/14", "test", {"mAP": 31.64}, SOURCE),
    PaperRow("basic+no-query-expansion", "ViT-L/14", "test", {"mAP": 34.35}, SOURCE),
)
