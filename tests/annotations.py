"""Locating the real official annotation files, and building data roots with placeholder images."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ANNOTATIONS = Path(os.environ.get("CIRBENCH_ANNOTATIONS", REPO.parent / "shared" / "annotations"))

needs_annotations = pytest.mark.skipif(
    not (ANNOTATIONS / "cirr").is_dir(),
    reason=f"official annotation files not found at {ANNOTATIONS} (set CIRBENCH_ANNOTATIONS)",
)


def write_placeholder(path: Path, seed: int) -> None:
    """A tiny image whose colour depends on ``seed`` (PNG or JPEG by suffix)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 9), ((seed * 37) % 256, (seed * 91) % 256, (seed * 13) % 256)).save(path)


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for p in dst.rglob("*"):
        p.chmod(0o644 if p.is_file() else 0o755)
    dst.chmod(0o755)
    return dst
