"""Code shared by several built-in methods (not a plugin: packages whose name starts with "_" are skipped
when built-in plugins are discovered). Third-party methods may import it too, e.g. the textual-inversion
helpers in :mod:`cirbench.methods._shared.textinv`."""
