"""Published i-CIR numbers: the mAP table of the official repository's README (github.com/billpsomas/icir,
commit 463cc1d), for the methods whose runs there use CLIP ViT-L/14 (OpenAI weights, the repository's ``clip``
backbone): its own ``text``, ``image``, ``sum`` and ``product`` (similarities clipped at 0) baselines and
BASIC, with and without query expansion; and the two training-free methods of the same group, WeiCom and FREEDOM
(the table names no backbone for them; its FREEDOM numbers on the domain-conversion benchmarks are FREEDOM's own
ViT-L/14 ones, and WeiCom's official default weight, 0.5, is assumed)."""

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
    PaperRow("weicom@lam=0.5", "ViT-L/14", "test", {"mAP": 18.03}, SOURCE),
    PaperRow("freedom", "ViT-L/14", "test", {"mAP": 17.24}, SOURCE),
)
