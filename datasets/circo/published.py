"""Published zero-shot numbers on CIRCO test (mAP@5/10/25/50), as later papers' comparison tables report them;
not re-checked against each paper's PDF."""

from __future__ import annotations

from cirbench.types import PaperRow

MEGAPAIRS = "Zhou et al., MegaPairs (BGE-VL), ACL 2025: Table 1 of the paper as the official README shows it"
COMPODIFF = ("Gu et al., CompoDiff, TMLR 2024, as MegaPairs' Table 1 (ACL 2025) quotes it: the paper's CLIP-L model "
             "trained on SynthTriplets18M, not the released CompoDiff-Aesthetic that cirbench runs")


def _row(method: str, backbone: str, maps: str, source: str) -> PaperRow:
    """``maps``: mAP@5/10/25/50, "—" where the source gives none."""
    values = zip(("mAP@5", "mAP@10", "mAP@25", "mAP@50"), maps.split("/"), strict=True)
    return PaperRow(method, backbone, "test", {k: float(v) for k, v in values if v != "—"}, source)


PAPER_ROWS = (
    _row("pic2word", "ViT-L/14", "8.72/9.51/10.64/11.29", "Saito et al., Pic2Word, CVPR 2023 (as reported by SEARLE)"),
    _row("searle", "ViT-B/32", "9.35/9.94/11.13/11.84", "Baldrati et al., SEARLE, ICCV 2023"),
    _row("searle-xl", "ViT-L/14", "11.68/12.73/14.33/15.12", "Baldrati et al., SEARLE, ICCV 2023"),
    _row("fti4cir", "ViT-L/14", "15.05/16.32/18.06/19.05", "Lin et al., FTI4CIR, SIGIR 2024"),
    _row("slerp-tat", "ViT-B/32", "9.34/10.26/11.65/12.33", "Jang et al., Slerp+TAT, ECCV 2024"),
    _row("slerp-tat", "ViT-L/14", "18.46/19.41/21.43/22.41", "Jang et al., Slerp+TAT, ECCV 2024"),
    _row("osrcir", "ViT-L/14", "23.87/25.33/27.84/28.97", "Tang et al., OSrCIR, CVPR 2025 (GPT-4o)"),
    # the released weights after their conversion, which cirbench runs; the paper's own (before it) in the source
    _row("magiclens", "ViT-B/16", "22.3/23.2/25.0/26.0", "Zhang et al., MagicLens, ICML 2024: the released (converted) "
         "weights, as the official README reports them (the paper's: 23.1/23.8/25.8/26.7)"),
    _row("magiclens", "ViT-L/14", "29.5/30.8/33.2/34.3", "Zhang et al., MagicLens, ICML 2024: the released (converted) "
         "weights, as the official README reports them (the paper's: 29.6/30.8/33.4/34.4)"),
    _row("bge-vl", "ViT-B/16", "34.3/—/—/—", MEGAPAIRS),
    _row("bge-vl", "ViT-L/14", "39.2/—/—/—", MEGAPAIRS),
    _row("compodiff (paper's model)", "ViT-L/14", "12.6/—/—/—",
         COMPODIFF),
)
