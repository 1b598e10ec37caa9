"""Core CLI commands that live in their own modules (registered in cirbench.cli.BUILTIN_COMMAND_MODULES)."""
