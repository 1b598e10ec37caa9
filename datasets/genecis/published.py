"""Published GeneCIS numbers: only those checked against their source are listed.

The official repository's DOWNLOAD.md gives the average Recall@1 over the four tasks of its released
Combiner models trained on CC3M (Table 2 and Table 6 of the paper); MegaPairs' README gives its BGE-VL models'.
Numbers later ZS-CIR papers print for Pic2Word, SEARLE or LinCIR on GeneCIS were not checked against their PDFs
and are left out.
"""

from __future__ import annotations

from cirbench.types import PaperRow

SOURCE = "Vaze et al., GeneCIS, CVPR 2023 (github.com/facebookresearch/genecis DOWNLOAD.md)"

MEGAPAIRS = "Zhou et al., MegaPairs (BGE-VL), ACL 2025: Table 1 of the paper as the official README shows it"

PAPER_ROWS = (
    PaperRow("combiner-cc3m", "RN50x4", "test", {"avg/R@1": 16.8}, SOURCE),
    PaperRow("combiner-cc3m", "ViT-B/16", "test", {"avg/R@1": 17.6}, SOURCE),
    PaperRow("bge-vl", "ViT-B/16", "test", {"avg/R@1": 18.0}, MEGAPAIRS),
    PaperRow("bge-vl", "ViT-L/14", "test", {"avg/R@1": 18.1}, MEGAPAIRS),
)
