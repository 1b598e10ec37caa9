"""Test helpers: register a plugin for a test and always unregister it (``cirbench.testing.registered``); record
what the training loop does."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cirbench.testing import registered

__all__ = ["record_training", "registered"]


def record_training(events: list[list[Any]], patch: Callable[[Any, str, Any], None] = setattr) -> None:
    """Make the training loop append ``["epoch", n]`` when it opens epoch n's loader and ``["step", keys]`` (the
    keys of the step's samples) at each optimizer step; ``patch`` is ``setattr`` or a test's
    ``monkeypatch.setattr`` (which puts the loop back after the test)."""
    from cirbench import training

    real_step, real_loader = training._optimizer_step, training._loader

    def loader(*args):
        events.append(["epoch", args[6]])
        return real_loader(*args)

    def step(trainable, optimizer, scheduler, micro, *args):
        events.append(["step", [k for batch in micro for k in batch.keys]])
        return real_step(trainable, optimizer, scheduler, micro, *args)

    patch(training, "_loader", loader)
    patch(training, "_optimizer_step", step)
