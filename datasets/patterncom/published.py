"""Published PatternCom mAP: the two tables of the official repository's README (github.com/billpsomas/rscir,
commit 1560858), whose numbers its ``evaluate.py`` reproduces: ViT-L/14 with OpenAI's CLIP weights and with
RemoteCLIP's (``--pretrained remoteclip``), the ``text``, ``image`` and ``Text & Image`` (the mean of the two
similarities: ``image-text-sum``) baselines and WeiCom at its default weight and at the best one for each
backbone. Per attribute, then the mean over the six attributes (the table's "Avg").

Note: the official scripts load both weight files into open_clip's ``ViT-L-14`` as it is built by default, with
nn.GELU; OpenAI's weights were trained with QuickGELU, which ``--backbone ViT-L-14 --pretrained openai`` builds.
To run the CLIP rows' exact model, pass the official ``CLIP-ViT-L-14.bin`` as ``--pretrained`` (a weights file
keeps the activation the model name says).
"""

from __future__ import annotations

from cirbench.types import PaperRow

from .protocol import ATTRIBUTES

SOURCE = "Psomas et al., Composed Image Retrieval for Remote Sensing, IGARSS 2024 (github.com/billpsomas/rscir README)"

_TABLES = {  # backbone: {method: mAP per attribute in ATTRIBUTES order, then the mean}
    "ViT-L/14": {
        "text-only": (13.47, 4.83, 3.58, 2.00, 3.31, 6.22, 5.57),
        "image-only": (14.66, 8.32, 13.49, 16.47, 7.84, 15.76, 12.74),
        "image-text-sum": (23.13, 11.02, 15.87, 16.93, 10.13, 21.38, 16.41),
        "weicom@lam=0.5": (46.08, 17.45, 16.49, 8.36, 18.15, 23.97, 21.75),
        "weicom@lam=0.3": (46.74, 20.97, 22.07, 13.22, 20.96, 26.22, 25.03),
    },
    "ViT-L/14 (RemoteCLIP)": {
        "text-only": (10.75, 8.87, 22.16, 6.98, 8.25, 24.12, 13.52),
        "image-only": (14.40, 6.62, 15.11, 13.10, 6.99, 15.18, 11.90),
        "image-text-sum": (23.67, 10.01, 18.45, 13.98, 7.97, 19.63, 15.62),
        "weicom@lam=0.5": (43.68, 31.45, 39.94, 14.92, 20.51, 29.78, 30.05),
        "weicom@lam=0.6": (41.04, 31.59, 41.56, 14.56, 20.79, 31.24, 30.13),
    },
}

PAPER_ROWS = tuple(
    PaperRow(method, backbone, "test",
             {**{f"{a}/mAP": v for a, v in zip(ATTRIBUTES, values, strict=False)}, "avg/mAP": values[-1]}, SOURCE)
    for backbone, rows in _TABLES.items() for method, values in rows.items())
