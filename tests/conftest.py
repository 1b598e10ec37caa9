"""Shared fixtures: cirbench's own tests use the same helpers plugin authors get from ``cirbench.testing``
(a tiny open_clip config, a tiny generated CIR dataset registered as a plugin)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cirbench.testing import TINY_CLIP, TOY_COLOURS, write_tiny_config, write_toy_dataset  # noqa: F401

COLOURS = TOY_COLOURS


@pytest.fixture
def endpoint():
    """A fake OpenAI-compatible chat endpoint on the loopback address (see generation_models)."""
    from generation_models import FakeChatEndpoint

    server = FakeChatEndpoint()
    yield server
    server.close()


@pytest.fixture(scope="session", autouse=True)
def _a_cache_of_the_suites_own(tmp_path_factory):
    """Features, generated benchmarks and generations go to a cache of the suite's own (the processes it starts
    inherit it), never into the user's ~/.cache/cirbench; a test may still set another for itself."""
    patch = pytest.MonkeyPatch()
    patch.setenv("CIRBENCH_CACHE", str(tmp_path_factory.mktemp("cirbench-cache")))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def tiny_config(cirbench_tiny_config) -> Path:
    """Path to a tiny open_clip model config (random weights with --pretrained none): the fixture cirbench.testing
    gives plugin authors, under the suite's short name."""
    return cirbench_tiny_config


@pytest.fixture
def toy_root(cirbench_toy_root) -> Path:
    """A tiny CIR dataset on disk: colour images, queries 'make it <colour>' (cirbench.testing's)."""
    return cirbench_toy_root
