"""Published zero-shot numbers on FashionIQ val (R@10/R@50 per category and their mean), as later papers'
comparison tables report them; not re-checked against each paper's PDF."""

from __future__ import annotations

from cirbench.types import PaperRow

MEGAPAIRS = "Zhou et al., MegaPairs (BGE-VL), ACL 2025: Table 1 of the paper as the official README shows it"
COMPODIFF = ("Gu et al., CompoDiff, TMLR 2024, as MegaPairs' Table 1 (ACL 2025) quotes it: the paper's CLIP-L model "
             "trained on SynthTriplets18M, not the released CompoDiff-Aesthetic that cirbench runs")


def _row(method: str, backbone: str, dress: str | None, shirt: str | None, toptee: str | None, avg: str,
         source: str) -> PaperRow:
    metrics: dict[str, float] = {}
    for cat, value in (("dress", dress), ("shirt", shirt), ("toptee", toptee), ("avg", avg)):
        if value:  # "R@10/R@50", "—" for a number the source does not give
            for metric, number in zip(("R@10", "R@50"), value.split("/"), strict=True):
                if number != "—":
                    metrics[f"{cat}/{metric}"] = float(number)
    return PaperRow(method, backbone, "val", metrics, source)


PAPER_ROWS = (
    _row("pic2word", "ViT-L/14", "20.00/40.20", "26.20/43.60", "27.90/47.40", "24.70/43.70",
         "Saito et al., Pic2Word, CVPR 2023"),
    _row("searle", "ViT-B/32", "18.54/39.51", "24.44/41.61", "25.70/46.46", "22.89/42.53",
         "Baldrati et al., SEARLE, ICCV 2023"),
    _row("searle-xl", "ViT-L/14", "20.48/43.13", "26.89/45.58", "29.32/49.97", "25.56/46.23",
         "Baldrati et al., SEARLE, ICCV 2023"),
    _row("context-i2w", "ViT-L/14", "23.10/45.30", "29.70/48.60", "30.60/52.90", "27.80/48.93",
         "Tang et al., Context-I2W, AAAI 2024 (as FiRE's comparison table reports it)"),
    _row("fti4cir", "ViT-L/14", "24.39/47.84", "31.35/50.59", "32.43/54.21", "29.39/50.88",
         "Lin et al., FTI4CIR, SIGIR 2024"),
    _row("slerp-tat", "ViT-B/32", "19.24/42.14", "23.06/41.95", "26.57/47.78", "22.96/43.96",
         "Jang et al., Slerp+TAT, ECCV 2024"),
    _row("slerp-tat", "ViT-L/14", None, None, None, "28.32/47.60", "Jang et al., Slerp+TAT, ECCV 2024"),
    _row("osrcir", "ViT-L/14", "29.70/51.81", "33.17/52.03", "36.92/59.27", "33.26/54.37",
         "Tang et al., OSrCIR, CVPR 2025 (GPT-4o)"),
    _row("bge-vl", "ViT-B/16", None, None, None, "31.9/—", MEGAPAIRS),
    _row("bge-vl", "ViT-L/14", None, None, None, "34.6/—", MEGAPAIRS),
    _row("compodiff (paper's model)", "ViT-L/14", None, None, None, "36.0/—", COMPODIFF),
)

# FashionIQ under the caption-pairs protocol (VAL's, CoSMo's: dataset fashioniq-pairs), which PLI reports
PAIRS_ROWS = (
    _row("pli", "ViT-L/14", None, None, None, "36.37/58.78",
         "Chen & Lai, PLI (masked tuning), ICME 2025, as github.com/fedasaro62/peft-cir's notes on its port quote it"),
)
