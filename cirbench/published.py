"""Published zero-shot numbers, shown as "paper" rows beside ours in leaderboards.

Copied from the papers' tables as collected in the project's reference notes; metric names match the
dataset plugins' metric names, so paper rows and our rows line up in one table. A row's ``split``
is the split the paper reports (CIRR/CIRCO: test; FashionIQ: val).
"""

from __future__ import annotations

from typing import Any


def _cirr(r: str, s: str | None = None) -> dict[str, float]:
    out = dict(zip(["R@1", "R@5", "R@10", "R@50"], (float(x) if x != "—" else None for x in r.split("/")),
                   strict=True))
    if s:
        out.update(zip(["Rs@1", "Rs@2", "Rs@3"], (float(x) for x in s.split("/")), strict=True))
    return {k: v for k, v in out.items() if v is not None}


def _circo(m: str) -> dict[str, float]:
    return dict(zip(["mAP@5", "mAP@10", "mAP@25", "mAP@50"], (float(x) for x in m.split("/")), strict=True))


def _fiq(dress: str | None, shirt: str | None, toptee: str | None, avg: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for cat, val in (("dress", dress), ("shirt", shirt), ("toptee", toptee), ("avg", avg)):
        if val:
            r10, r50 = (float(x) for x in val.split("/"))
            out[f"{cat}/R@10"], out[f"{cat}/R@50"] = r10, r50
    return out


PUBLISHED: list[dict[str, Any]] = [
    # CIRR test1
    {"dataset": "cirr", "split": "test1", "method": "pic2word", "backbone": "ViT-L/14",
     "metrics": _cirr("23.90/51.70/65.30/87.80")},
    {"dataset": "cirr", "split": "test1", "method": "searle", "backbone": "ViT-B/32",
     "metrics": _cirr("24.00/53.42/66.82/89.78", "54.89/76.60/88.19")},
    {"dataset": "cirr", "split": "test1", "method": "searle-xl", "backbone": "ViT-L/14",
     "metrics": _cirr("24.24/52.48/66.29/88.84", "53.76/75.01/88.19")},
    {"dataset": "cirr", "split": "test1", "method": "fti4cir", "backbone": "ViT-L/14",
     "metrics": _cirr("25.90/55.61/67.66/89.66", "55.21/75.88/87.98")},
    {"dataset": "cirr", "split": "test1", "method": "slerp-tat", "backbone": "ViT-B/32",
     "metrics": _cirr("28.19/55.88/68.77/88.51", "61.13/80.63/90.68")},
    {"dataset": "cirr", "split": "test1", "method": "slerp-tat", "backbone": "ViT-L/14",
     "metrics": _cirr("30.94/59.40/70.94/89.18", "64.70/82.92/92.31")},
    {"dataset": "cirr", "split": "test1", "method": "slerp (unconfirmed)", "backbone": "ViT-L/14",
     "metrics": _cirr("24.43/49.93/62.29/—", "57.71/77.59/88.80")},
    # CIRCO test
    {"dataset": "circo", "split": "test", "method": "pic2word", "backbone": "ViT-L/14",
     "metrics": _circo("8.72/9.51/10.64/11.29")},
    {"dataset": "circo", "split": "test", "method": "searle", "backbone": "ViT-B/32",
     "metrics": _circo("9.35/9.94/11.13/11.84")},
    {"dataset": "circo", "split": "test", "method": "searle-xl", "backbone": "ViT-L/14",
     "metrics": _circo("11.68/12.73/14.33/15.12")},
    {"dataset": "circo", "split": "test", "method": "fti4cir", "backbone": "ViT-L/14",
     "metrics": _circo("15.05/16.32/18.06/19.05")},
    {"dataset": "circo", "split": "test", "method": "slerp-tat", "backbone": "ViT-B/32",
     "metrics": _circo("9.34/10.26/11.65/12.33")},
    {"dataset": "circo", "split": "test", "method": "slerp-tat", "backbone": "ViT-L/14",
     "metrics": _circo("18.46/19.41/21.43/22.41")},
    # FashionIQ val
    {"dataset": "fashioniq", "split": "val", "method": "pic2word", "backbone": "ViT-L/14",
     "metrics": _fiq("20.00/40.20", "26.20/43.60", "27.90/47.40", "24.70/43.70")},
    {"dataset": "fashioniq", "split": "val", "method": "searle", "backbone": "ViT-B/32",
     "metrics": _fiq("18.54/39.51", "24.44/41.61", "25.70/46.46", "22.89/42.53")},
    {"dataset": "fashioniq", "split": "val", "method": "searle-xl", "backbone": "ViT-L/14",
     "metrics": _fiq("20.48/43.13", "26.89/45.58", "29.32/49.97", "25.56/46.23")},
    {"dataset": "fashioniq", "split": "val", "method": "fti4cir", "backbone": "ViT-L/14",
     "metrics": _fiq("24.39/47.84", "31.35/50.59", "32.43/54.21", "29.39/50.88")},
    {"dataset": "fashioniq", "split": "val", "method": "slerp-tat", "backbone": "ViT-B/32",
     "metrics": _fiq("19.24/42.14", "23.06/41.95", "26.57/47.78", "22.96/43.96")},
    {"dataset": "fashioniq", "split": "val", "method": "slerp-tat", "backbone": "ViT-L/14",
     "metrics": _fiq(None, None, None, "28.32/47.60")},
]


def published_rows(dataset: str, split: str) -> list[dict[str, Any]]:
    """The published rows for one dataset/split."""
    return [r for r in PUBLISHED if r["dataset"] == dataset and r["split"] == split]
