"""Published domain-conversion mAP (the mean over domain pairs), CLIP ViT-L/14 with OpenAI weights (both
repositories' ``clip`` backbone):

* FREEDOM's README ("Expected results", github.com/NikosEfth/freedom, commit 5df4bca): its ``text``,
  ``image``, ``sum`` and ``product`` baselines (the product unclipped) and FREEDOM;
* i-CIR's README (github.com/billpsomas/icir, commit 463cc1d): BASIC, with and without query expansion, and
  WeiCom (its official default weight, 0.5, assumed: the table does not name it). Its table repeats FREEDOM's
  baselines and FREEDOM but for NICO++'s image baseline (6.32 there, 6.82 in FREEDOM's): the benchmark
  authors' own number is listed.
"""

from __future__ import annotations

from cirbench.types import PaperRow

FREEDOM = "Efthymiadis et al., Composed Image Retrieval for Training-Free Domain Conversion, WACV 2025 " \
          "(github.com/NikosEfth/freedom README)"
ICIR = "Psomas et al., Instance-Level Composed Image Retrieval, NeurIPS 2025 (github.com/billpsomas/icir README)"

_ORDER = ("dc-imagenet-r", "dc-minidn", "dc-nico", "dc-ltll")
_TABLE = {  # method: (mAP per benchmark in _ORDER, source)
    "text-only": ((0.74, 0.57, 1.09, 5.72), FREEDOM),
    "image-only": ((3.84, 6.66, 6.82, 16.49), FREEDOM),
    "image-text-sum": ((6.21, 9.33, 9.30, 17.86), FREEDOM),
    "image-text-product": ((7.83, 9.86, 9.79, 23.16), FREEDOM),
    "freedom": ((29.91, 37.27, 26.10, 33.24), FREEDOM),
    "basic": ((32.13, 39.58, 31.65, 41.38), ICIR),
    "basic+no-query-expansion": ((27.54, 35.75, 28.90, 38.22), ICIR),
    "weicom@lam=0.5": ((10.47, 8.52, 10.54, 26.60), ICIR),
}

PAPER_ROWS = {name: tuple(PaperRow(method, "ViT-L/14", "test", {"avg/mAP": values[i]}, source)
                          for method, (values, source) in _TABLE.items())
              for i, name in enumerate(_ORDER)}
