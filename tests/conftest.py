"""Shared fixtures: cirbench's own tests use the same helpers plugin authors get from ``cirbench.testing``
(a tiny open_clip config, a tiny generated CIR dataset registered as a plugin)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cirbench.testing import TINY_CLIP, TOY_COLOURS, write_tiny_config, write_toy_dataset  # noqa: F401

COLOURS = TOY_COLOURS


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory) -> Path:
    """Path to a tiny open_clip model config (random weights with --pretrained none)."""
    return write_tiny_config(tmp_path_factory.mktemp("cfg"))


@pytest.fixture
def toy_root(tmp_path) -> Path:
    """A tiny CIR dataset on disk: colour images, queries 'make it <colour>'."""
    return write_toy_dataset(tmp_path / "toy")
