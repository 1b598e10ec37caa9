"""Core CLI commands that live in their own modules (registered in cirbench.cli.BUILTIN_COMMAND_MODULES)."""

from __future__ import annotations

import math

import click


class FiniteFloatRange(click.FloatRange):
    """click's FloatRange, which lets ``nan`` through (every comparison with it is false), refusing nan and inf."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number
