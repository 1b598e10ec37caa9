"""Test helpers: register the toy plugin for a test and always unregister it."""

from __future__ import annotations

import contextlib

from cirbench import plugins


@contextlib.contextmanager
def registered(plugin, name: str):
    """Register ``plugin`` in the process-wide registry for the duration of the block."""
    reg = plugins.get_registry()
    reg.register_plugin(plugin, name=name)
    try:
        yield reg
    finally:
        plugins.reset_registry()
