"""Published domain-conversion mAP (the mean over domain pairs): the table of i-CIR's repository README
(github.com/billpsomas/icir, commit 463cc1d), for the runs there with CLIP ViT-L/14 (OpenAI weights, the
repository's ``clip`` backbone): its ``text`` and ``image`` baselines and BASIC, with and without query
expansion."""

from __future__ import annotations

from cirbench.types import PaperRow

SOURCE = "Psomas et al., Instance-Level Composed Image Retrieval, NeurIPS 2025 (github.com/billpsomas/icir README)"

_TABLE = {  # ImageNet-R, NICO++, mini-DomainNet, LTLL
    "text-only": (0.74, 1.09, 0.57, 5.72),
    "image-only": (3.84, 6.32, 6.66, 16.49),
    "basic": (32.13, 31.65, 39.58, 41.38),
    "basic+no-query-expansion": (27.54, 28.90, 35.75, 38.22),
}
_ORDER = ("dc-imagenet-r", "dc-nico", "dc-minidn", "dc-ltll")

PAPER_ROWS = {name: tuple(PaperRow(method, "ViT-L/14", "test", {"avg/mAP": values[i]}, SOURCE)
                          for method, values in _TABLE.items())
              for i, name in enumerate(_ORDER)}
