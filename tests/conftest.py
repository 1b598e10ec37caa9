"""Shared fixtures: a tiny open_clip config, a tiny generated CIR dataset registered as a plugin."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory) -> Path:
    """Path to a tiny open_clip model config (random weights with --pretrained none)."""
    path = tmp_path_factory.mktemp("cfg") / "cirbench-tiny-test.json"
    path.write_text(json.dumps(TINY_CLIP))
    return path


@pytest.fixture
def toy_root(tmp_path) -> Path:
    """A tiny CIR dataset on disk: colour images, queries 'make it <colour>'."""
    root = tmp_path / "toy"
    from PIL import Image

    items = []
    for i, (cname, rgb) in enumerate(COLOURS.items()):
        for j in range(3):
            name = f"img_{cname}_{j}.png"
            (root / "images").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (36 + 4 * j, 28 + 2 * i), rgb).save(root / "images" / name)
            items.append((name, cname))
    queries = []
    for qi, (name, cname) in enumerate(items):
        target_colour = list(COLOURS)[(list(COLOURS).index(cname) + 1) % len(COLOURS)]
        targets = [n for n, c in items if c == target_colour]
        queries.append({"id": str(qi), "reference": name, "text": f"make it {target_colour}", "targets": targets})
    (root / "queries.json").write_text(json.dumps({"gallery": [n for n, _ in items], "queries": queries}))
    return root
