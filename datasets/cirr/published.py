"""Published zero-shot numbers on CIRR test1 (R@1/5/10/50 and Rs@1/2/3), as later papers' comparison tables
report them (not re-checked against each paper's PDF), or as a method's official repository shows its test-server
result."""

from __future__ import annotations

from cirbench.types import PaperRow

MEGAPAIRS = "Zhou et al., MegaPairs (BGE-VL), ACL 2025: Table 1 of the paper as the official README shows it"
COMPODIFF = ("Gu et al., CompoDiff, TMLR 2024, as MegaPairs' Table 1 (ACL 2025) quotes it: the paper's CLIP-L model "
             "trained on SynthTriplets18M, not the released CompoDiff-Aesthetic that cirbench runs")


def _row(method: str, backbone: str, recall: str, subset: str | None, source: str) -> PaperRow:
    metrics = {k: float(v) for k, v in zip(("R@1", "R@5", "R@10", "R@50"), recall.split("/"), strict=True) if v != "—"}
    if subset:
        metrics.update({k: float(v) for k, v in zip(("Rs@1", "Rs@2", "Rs@3"), subset.split("/"), strict=True)
                        if v != "—"})
    return PaperRow(method, backbone, "test1", metrics, source)


PAPER_ROWS = (
    _row("pic2word", "ViT-L/14", "23.90/51.70/65.30/87.80", None, "Saito et al., Pic2Word, CVPR 2023"),
    _row("searle", "ViT-B/32", "24.00/53.42/66.82/89.78", "54.89/76.60/88.19", "Baldrati et al., SEARLE, ICCV 2023"),
    _row("searle-xl", "ViT-L/14", "24.24/52.48/66.29/88.84", "53.76/75.01/88.19", "Baldrati et al., SEARLE, ICCV 2023"),
    _row("context-i2w", "ViT-L/14", "25.60/55.10/68.50/89.80", None,
         "Tang et al., Context-I2W, AAAI 2024 (as FiRE's comparison table reports it)"),
    _row("fti4cir", "ViT-L/14", "25.90/55.61/67.66/89.66", "55.21/75.88/87.98", "Lin et al., FTI4CIR, SIGIR 2024"),
    # the released ViT-L/14 checkpoint (ImageNet images with LLaVA captions, targetpad); R@50 and Rs@2/3 unquoted
    _row("pli", "ViT-L/14", "26.15/56.82/69.30/—", "56.22/—/—",
         "Chen & Lai, PLI (masked tuning), ICME 2025, as github.com/fedasaro62/peft-cir's notes on its port quote it"),
    _row("slerp-tat", "ViT-B/32", "28.19/55.88/68.77/88.51", "61.13/80.63/90.68", "Jang et al., Slerp+TAT, ECCV 2024"),
    _row("slerp-tat", "ViT-L/14", "30.94/59.40/70.94/89.18", "64.70/82.92/92.31", "Jang et al., Slerp+TAT, ECCV 2024"),
    _row("slerp (unconfirmed)", "ViT-L/14", "24.43/49.93/62.29/—", "57.71/77.59/88.80",
         "Jang et al., Slerp+TAT, ECCV 2024 (Slerp without TAT; unconfirmed)"),
    # the test server's page for alpha 0.8, beta 0.1, as the official repository shows it (submission/CLIP-L14-01.png)
    _row("weimocir", "ViT-L/14 (LAION-2B)", "30.94/60.867/73.084/91.614", "58.554/79.06/90.072",
         "Wu et al., WeiMoCIR, TAAI 2024 (github.com/whats2000/WeiMoCIR, CIRR server result)"),
    _row("osrcir", "ViT-L/14", "29.45/57.68/69.86/—", None, "Tang et al., OSrCIR, CVPR 2025 (GPT-4o)"),
    _row("bge-vl", "ViT-B/16", "36.1/—/—/—", "71.6/—/—", MEGAPAIRS),
    _row("bge-vl", "ViT-L/14", "38.0/—/—/—", "73.2/—/—", MEGAPAIRS),
    _row("compodiff (paper's model)", "ViT-L/14", "18.2/—/—/—", "57.4/—/—",
         COMPODIFF),
)
