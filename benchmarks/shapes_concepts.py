"""Write a concept list and phrases for the `shapes` benchmark, the offline stand-ins for the Open Images
concepts and GPT-Neo phrases that SEARLE-OTI and SEARLE's Phi training use on real benchmarks.

    python benchmarks/shapes_concepts.py OUTPUT_DIR   # writes OUTPUT_DIR/concepts.txt and OUTPUT_DIR/phrases.json

Concepts: every colour-shape pair, every shape, every colour + "shape"; phrases: a dozen templated sentences per
concept that name it (so each concept is usable: the concept appears in all of its phrases).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cirbench.datasets.shapes.generator import BACKGROUNDS, COLOURS, POSITIONS, SHAPES

TEMPLATES = ("a {c} on a {bg} background", "a picture of a {c} on the {pos}", "the {c} sits in the {pos} of the image",
             "a simple drawing of a {c} against a {bg} backdrop")


def concepts() -> list[str]:
    return [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES] + list(SHAPES) + [
        f"{colour} shape" for colour in COLOURS]


def phrases(concept: str) -> list[str]:
    out = [t.format(c=concept, bg=bg, pos=pos) for t in TEMPLATES for bg, pos in
           zip(BACKGROUNDS, POSITIONS, strict=True)]
    return list(dict.fromkeys(out))


def main(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    names = concepts()
    (folder / "concepts.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    (folder / "phrases.json").write_text(json.dumps({c: phrases(c) for c in names}, indent=1), encoding="utf-8")
    print(f"{len(names)} concepts: {folder / 'concepts.txt'}, {folder / 'phrases.json'}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
