"""cirbench: a pluggable harness for zero-shot composed image retrieval (ZS-CIR).

The core (this package) knows nothing about any one method or dataset. Built-in plugins live in
``cirbench.methods`` and ``cirbench.datasets`` and register through the same pluggy hooks as
third-party plugins (entry-point group ``cirbench``).
"""

__version__ = "0.1.0"
