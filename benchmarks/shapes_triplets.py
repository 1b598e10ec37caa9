"""Write image triplets from the `shapes` training corpus, for TransAgg's training (its Laion-CIR-Template analogue):
each corpus image is a reference, the benchmark's own query generator changes one or two of its attributes and
writes the text ("make it blue and move it to the left"), and a corpus image showing the changed attributes is the
target (rows whose target combination the corpus lacks are left out). The attributes are read back from the
corpus's subject and attribute columns; the draws are seeded.

    python benchmarks/shapes_triplets.py CORPUS.csv OUTPUT.csv [--seed 0]   # image paths written absolute
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

from cirbench.datasets.shapes.generator import Attributes, make_query


def attributes(subject: str, attribute: str) -> Attributes:
    """The inverse of the generator's ``subject_attribute``: "size colour shape" and "position position on a
    background background"."""
    size, colour, shape = subject.split()
    words = attribute.split()
    return Attributes(shape=shape, colour=colour, size=size, position=words[0], background=words[-2])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    src = args.corpus.resolve()
    with open(src, newline="") as fh:
        rows = list(csv.DictReader(fh))
    images = [(str(src.parent / row["image"]), attributes(row["subject"], row["attribute"])) for row in rows]
    by_key: dict[str, list[str]] = {}
    for path, attrs in images:
        by_key.setdefault(attrs.key(), []).append(path)
    rng = random.Random(args.seed)
    triplets = []
    for path, attrs in images:
        target, text = make_query(attrs, rng)
        candidates = by_key.get(target.key())
        if candidates:
            triplets.append({"image": path, "relative_caption": text, "target": rng.choice(candidates)})
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "relative_caption", "target"])
        writer.writeheader()
        writer.writerows(triplets)
    print(f"{len(triplets)} triplets of {len(images)} references: {args.output}")


if __name__ == "__main__":
    main()
