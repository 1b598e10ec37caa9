"""``cirbench check --method NAME``: hold a method plugin to the contract the loop asks of every method, in
seconds and offline (a tiny random CLIP, the toy dataset), without writing a test suite. It is
:func:`cirbench.testing.check_method`, the call plugin test suites make, with each check printed as it holds."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

EPILOG = """\b
Examples:
  cirbench --plugin my_method.py check --method mine          # a method kept in one file
  cirbench check --method weighted-sum --weight 0.3           # an installed plugin's, with an option
  cirbench check --method slerp,searle --keep /tmp/checks     # keep the checks' runs to look at
"""


@click.command(name="check", context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
               epilog=EPILOG)
@click.option("--method", "-m", required=True, help="Method name, or several separated by commas.")
@click.option("--keep", type=click.Path(file_okay=False), default=None,
              help="Write the checks' runs (results, predictions) into this folder and keep them (default: a "
                   "temporary folder, removed).")
@click.pass_context
def command(ctx, method, keep):
    """Check METHOD against the plugin contract on a tiny random CLIP and a toy dataset (offline, seconds).

    It must run through the loop (query features of the right shape, finite and unit-norm; the backbone it shares
    with other methods left as it was), rank the same way twice, and give the same numbers beside another
    method in one command as alone. Method options are given as in `cirbench run` (--alpha 0.8). Exit 0 when
    every check holds, 1 when one does not (it says which and why).
    """
    from ..cli import declared_by, plugin_extras
    from ..errors import CirbenchError
    from ..plugins import blame, get_registry
    from ..testing import CONTRACT_CHECKS, check_method
    from ..util import debug_enabled, one_line

    reg = get_registry()
    names = list(dict.fromkeys(m.strip() for m in method.split(",") if m.strip()))
    if not names:
        raise CirbenchError("--method names no method")
    specs = [reg.method(n) for n in names]
    extra = plugin_extras(ctx.args, specs, ctx.command)
    failed = []
    with tempfile.TemporaryDirectory(prefix="cirbench-check-") as scratch:
        for spec in specs:
            options = declared_by(extra, spec)
            source = reg.source(spec.plugin)
            where = f", {source['path']}" if source.get("path") else ""
            click.echo(f"checking '{spec.name}' (plugin {spec.plugin}{where}) on the toy dataset with a tiny "
                       "random CLIP")
            held: list[str] = []

            def report(check: str, _held: list[str] = held) -> None:
                _held.append(check)
                click.echo(f"  ok    {check}")

            folder = Path(keep) / spec.name if keep else Path(scratch) / spec.name
            try:
                check_method(spec.name, folder, options, registry=reg, report=report)
            except Exception as exc:  # noqa: BLE001 - the method's failure is this command's answer
                if debug_enabled():
                    raise
                culprit = blame(exc)
                why = (one_line(exc) if isinstance(exc, (AssertionError, CirbenchError))
                       else f"{type(exc).__name__}: {one_line(exc)}")
                click.echo(f"  FAIL  {CONTRACT_CHECKS[len(held)]}\n        {why}"
                           + (f" (raised in {culprit})" if culprit else ""))
                failed.append(spec.name)
                continue
            click.echo(f"'{spec.name}' keeps the contract")
    if keep:
        click.echo(f"the checks' runs: {keep}")
    if failed:
        click.echo(f"{len(failed)} of {len(specs)} method(s) break the contract: {', '.join(failed)}", err=True)
        ctx.exit(1)
