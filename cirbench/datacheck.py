"""``cirbench data check``: what a dataset's split finds on disk, without torch and without decoding images.

The annotation files are loaded as a run loads them (the same one-line errors) and their checksums compared
with the official ones the dataset plugin declares; every image file is looked up; a sample of image headers
gives sizes and modes (PIL reads headers only).
"""

from __future__ import annotations

import os
import random
from collections import Counter
from pathlib import Path
from typing import Any

from .dataset import Dataset, annotation_checksums


def _annotation_report(dataset: Dataset, split: str) -> list[dict[str, str]]:
    official = getattr(dataset, "OFFICIAL_SHA256", {}) or {}
    rows = []
    for name, sha in annotation_checksums(dataset, split).items():
        expected = official.get(Path(name).name)
        if sha == "missing":
            status = "missing"
        elif expected is None:
            status = "no official checksum known"
        else:
            status = "official" if sha == expected else "differs from the official file"
        rows.append({"file": name, "sha256": sha, "status": status})
    return rows


def _header(path: str) -> tuple[str, str, int, int] | str:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.format or "?", im.mode, im.width, im.height
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"


def check(dataset: Dataset, split: str, sample: int = 200, seed: int = 0) -> dict[str, Any]:
    """A report (a JSON-able dict) of ``dataset``'s ``split`` on disk."""
    annotations = _annotation_report(dataset, split)
    sets = dataset.load(split)
    images: dict[str, Any] = {}
    for es in sets:
        images.update(es.images)
    missing = sorted((ref for ref in images.values() if not os.path.isfile(ref.path)), key=lambda r: str(r.path))
    present = [ref for ref in images.values() if os.path.isfile(ref.path)]
    chosen = random.Random(seed).sample(present, min(sample, len(present)))
    headers = [(ref, _header(str(ref.path))) for ref in chosen]
    good = [h for _, h in headers if isinstance(h, tuple)]
    unreadable = [(str(ref.path), h) for ref, h in headers if isinstance(h, str)]
    widths, heights = sorted(h[2] for h in good), sorted(h[3] for h in good)

    def spread(values: list[int]) -> dict[str, int]:
        return {"min": values[0], "median": values[len(values) // 2], "max": values[-1]} if values else {}

    return {
        "dataset": dataset.name, "split": split, "data_root": str(dataset.data_root),
        "annotations": annotations,
        "sets": {es.name: {"queries": len(es.queries), "gallery": len(es.gallery)} for es in sets},
        "images": {"referenced": len(images), "present": len(present), "missing": len(missing),
                   "first_missing": [str(r.path) for r in missing[:5]]},
        "sample": {"checked": len(headers), "formats": dict(Counter(h[0] for h in good)),
                   "modes": dict(Counter(h[1] for h in good)), "width": spread(widths), "height": spread(heights),
                   "unreadable": unreadable[:5], "unreadable_count": len(unreadable)},
    }


def render(report: dict[str, Any]) -> str:
    """The report as the text ``cirbench data check`` prints."""
    lines = [f"{report['dataset']}/{report['split']} under {report['data_root']}"]
    sets = ", ".join(f"{name}: {c['queries']:,} queries, {c['gallery']:,} gallery"
                     for name, c in report["sets"].items())
    lines.append(f"  sets        {sets}")
    for a in report["annotations"]:
        lines.append(f"  annotation  {a['file']}: {a['status']}" + (f" (sha256 {a['sha256'][:12]}...)"
                                                                   if a["sha256"] != "missing" else ""))
    im = report["images"]
    lines.append(f"  images      {im['present']:,} of {im['referenced']:,} present, {im['missing']:,} missing")
    for path in im["first_missing"]:
        lines.append(f"    missing   {path}")
    s = report["sample"]
    if s["checked"]:
        def fmt(counter: dict[str, int]) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(counter.items(), key=lambda kv: -kv[1]))
        lines.append(f"  sample      {s['checked']} headers: {fmt(s['formats'])}; modes {fmt(s['modes'])}")
        if s["width"]:
            w, h = s["width"], s["height"]
            lines.append(f"              width {w['min']}/{w['median']}/{w['max']}, height {h['min']}/{h['median']}/"
                         f"{h['max']} (min/median/max)")
        for path, why in s["unreadable"]:
            lines.append(f"    unreadable {path}: {why}")
    return "\n".join(lines)


def healthy(report: dict[str, Any]) -> bool:
    """Everything referenced is there and readable, and no annotation file is missing."""
    return (report["images"]["missing"] == 0 and report["sample"]["unreadable_count"] == 0
            and all(a["status"] != "missing" for a in report["annotations"]))
