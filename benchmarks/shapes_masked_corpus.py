"""Write the `shapes` training corpus with the `masked_caption` column Context-I2W trains on: each caption with
the name of its object (its shape, or "shape"/"object"/"thing" where the caption leaves the shape out) replaced by
the official `<|replace|>`, as the official CSV's masked column marks it (spaCy does this for real captions).

    python benchmarks/shapes_masked_corpus.py CORPUS.csv OUTPUT.csv   # the images stay where CORPUS.csv names them
"""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

from cirbench.datasets.shapes.generator import SHAPES

NOUN = re.compile(r"\b(" + "|".join((*SHAPES, "shape", "object", "thing")) + r")\b")


def masked(caption: str) -> str:
    """The caption with its first object name replaced (the captions name one object, before any position)."""
    out, n = NOUN.subn("<|replace|>", caption, count=1)
    if not n:
        raise ValueError(f"no object name in the caption {caption!r}")
    return out


def main(source: str, target: str) -> None:
    src = Path(source).resolve()
    with open(src, newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = Path(target)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "caption", "masked_caption"])
        writer.writeheader()
        for row in rows:  # image paths made absolute: the copy is read from another folder
            writer.writerow({"image": str(src.parent / row["image"]), "caption": row["caption"],
                             "masked_caption": masked(row["caption"])})
    print(f"{len(rows)} captions masked: {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
