"""Test helpers: register a plugin for a test and always unregister it (``cirbench.testing.registered``)."""

from cirbench.testing import registered

__all__ = ["registered"]
