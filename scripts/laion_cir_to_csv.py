"""Write TransAgg's released Laion-CIR triplets as the CSV `cirbench train --method transagg` reads.

The official files (``laion_template_info.json``, ``laion_llm_info.json``, ``laion_combined_info.json``, from the
Google Drive folder github.com/Code-kunkun/ZS-CIR links) list ``{"ref_image_id", "relative_cap", "tgt_image_id"}``
records; the official dataset classes open ``<images>/<id zero-padded to 7 digits>.png`` for each id. This writes one
row per record: ``image`` (the reference), ``relative_caption``, ``target``, the image paths relative to the CSV's
folder, as cirbench's corpora read them.

    python scripts/laion_cir_to_csv.py laion_combined_info.json --images data/laion_cir/images \\
        --out data/laion_cir/combined.csv
    cirbench train --method transagg --corpus data/laion_cir/combined.csv --output runs/transagg-l14
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

FIELDS = ("ref_image_id", "relative_cap", "tgt_image_id")


def image_name(image_id: object) -> str:
    """The official file name of an image id: ``f"{str(id).zfill(7)}.png"``."""
    return f"{str(image_id).zfill(7)}.png"


def convert(records: list, images: Path, out: Path, only_present: bool = False) -> tuple[int, int]:
    """Write ``out``; returns (rows written, records left out because an image is missing, with ``only_present``)."""
    if not isinstance(records, list):
        raise ValueError("expected a JSON list of triplet records")
    folder = os.path.relpath(images, out.parent)
    written = missing = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "relative_caption", "target"])
        for i, record in enumerate(records):
            lacking = [f for f in FIELDS if not isinstance(record, dict) or f not in record]
            if lacking:
                raise ValueError(f"record {i} has no {', '.join(lacking)}: not a Laion-CIR triplet file")
            ref, tgt = image_name(record["ref_image_id"]), image_name(record["tgt_image_id"])
            if only_present and not ((images / ref).is_file() and (images / tgt).is_file()):
                missing += 1
                continue
            writer.writerow([Path(folder, ref).as_posix(), str(record["relative_cap"]), Path(folder, tgt).as_posix()])
            written += 1
    return written, missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", type=Path, help="an official Laion-CIR *_info.json file")
    parser.add_argument("--images", type=Path, required=True, help="the folder holding the <id>.png images")
    parser.add_argument("--out", type=Path, required=True, help="the CSV to write")
    parser.add_argument("--only-present", action="store_true",
                        help="leave out triplets whose reference or target image is not in --images")
    args = parser.parse_args(argv)
    try:
        records = json.loads(args.json.read_text(encoding="utf-8"))
        written, missing = convert(records, args.images, args.out, args.only_present)
    except (OSError, ValueError) as exc:
        print(f"error: {args.json}: {exc}", file=sys.stderr)
        return 2
    left = f", {missing} left out (an image missing)" if args.only_present else ""
    print(f"{args.out}: {written} triplets{left}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
