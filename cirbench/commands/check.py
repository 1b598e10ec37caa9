"""``cirbench check``: hold a plugin to the contract, without writing a test suite, each check printed as it
holds. ``--method NAME``: what the loop asks of every method, in seconds and offline (a tiny random CLIP, the toy
dataset; :func:`cirbench.testing.check_method`). ``--dataset NAME --data-root DIR``: what a benchmark's loader and
metrics must satisfy on its data, with rankings made from its annotations and no model
(:func:`cirbench.testing.check_dataset`)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

EPILOG = """\b
Examples:
  cirbench --plugin my_method.py check --method mine          # a method kept in one file
  cirbench check --method weighted-sum --weight 0.3           # an installed plugin's, with an option
  cirbench check --method slerp,searle --keep /tmp/checks     # keep the checks' runs to look at
  cirbench check --method pli --train --tune text             # train it briefly, then check the trained weights
  cirbench --plugin my_bench.py check --dataset mine --data-root data/mine --split val   # a dataset plugin
"""


@click.command(name="check", context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
               epilog=EPILOG)
@click.option("--method", "-m", default=None, help="Method name, or several separated by commas.")
@click.option("--dataset", "-d", default=None, help="Dataset name (instead of --method).")
@click.option("--split", "-s", default=None, help="The dataset's split (default: its default split).")
@click.option("--data-root", type=click.Path(file_okay=False), default=None, help="The dataset's root folder.")
@click.option("--keep", type=click.Path(file_okay=False), default=None,
              help="Write the method checks' runs (results, predictions) into this folder and keep them "
                   "(default: a temporary folder, removed).")
@click.option("--train", is_flag=True,
              help="First train each method two steps on a toy corpus with the tiny CLIP, then check it with that "
                   "checkpoint (for trainable methods that need one; their training options follow as in "
                   "`cirbench train`).")
@click.pass_context
def command(ctx, method, dataset, split, data_root, keep, train):
    """Check a method or a dataset plugin against the contract cirbench asks of it; exit 0 when every check
    holds, 1 when one does not (it says which and why).

    --method: on a tiny random CLIP and a toy dataset (offline, seconds), the method must run through the loop
    (query features of the right shape, finite and unit-norm; the backbone it shares with other methods left as
    it was), rank the same way twice, give the same numbers beside another method in one command as alone, and
    score the same when its queries are composed a few at a time (a query's features depend on it alone).

    --train: a trainable method is first trained for two steps of four samples on a toy corpus (the toy
    images, their captions and the columns the built-in trainers read), and the checks run with that checkpoint:
    its weights must save, load and run through the loop.

    --dataset: on its data, with rankings made from its annotations (no model), a perfect ranking must score 100
    on the main metric, a ranking with the targets last lower, and the per-query values must average to the
    reported metrics. Plugin options are given as in `cirbench run` (--alpha 0.8, --category dress).
    """
    from ..errors import CirbenchError
    from ..plugins import get_registry

    if (method is None) == (dataset is None):
        raise CirbenchError("give --method or --dataset (one of them)")
    if method is None and (keep or train):
        raise CirbenchError(f"{'--keep' if keep else '--train'} is for the method checks: the dataset check runs no "
                            "method")
    reg = get_registry()
    if dataset is not None:
        if _check_dataset(ctx, reg, dataset, split, data_root):
            ctx.exit(1)
        return
    if split or data_root:
        raise CirbenchError("--split and --data-root are the dataset check's: the method checks run on the toy "
                            "dataset")
    names = list(dict.fromkeys(m.strip() for m in method.split(",") if m.strip()))
    if not names:
        raise CirbenchError("--method names no method")
    failed = _check_methods(ctx, reg, [reg.method(n) for n in names], keep, train)
    if keep:
        click.echo(f"the checks' runs: {keep}")
    if failed:
        click.echo(f"{len(failed)} of {len(names)} method(s) break the contract: {', '.join(failed)}", err=True)
        ctx.exit(1)


def _check_methods(ctx, reg, specs, keep: str | None, train: bool = False) -> list[str]:
    """The method checks, each method in a folder of its own (``train``: after training it briefly); the names of
    those that failed."""
    import dataclasses

    from ..cli import declared_by
    from ..testing import CONTRACT_CHECKS, TRAINING_CHECK, check_method, train_for_check

    # with --train, the training options are the methods' too
    extra = _extras(ctx, [dataclasses.replace(s, options=(*s.options, *s.train_options)) if train else s
                          for s in specs])
    checks = (TRAINING_CHECK, *CONTRACT_CHECKS) if train else CONTRACT_CHECKS
    failed = []
    with tempfile.TemporaryDirectory(prefix="cirbench-check-") as scratch:
        for spec in specs:
            folder = Path(keep or scratch) / spec.name
            options = declared_by(extra, spec)
            training = {o.name: extra[o.name] for o in spec.train_options if o.name in extra}

            def run(report, spec=spec, folder=folder, options=options, training=training):
                if train:
                    options = {**options, "checkpoint": str(train_for_check(spec.name, folder, training, reg))}
                    report(TRAINING_CHECK)
                return check_method(spec.name, folder, options, registry=reg, report=report)

            if not _checked(f"'{spec.name}'", _origin(reg, spec), checks,
                            "on the toy dataset with a tiny random CLIP", run):
                failed.append(spec.name)
    return failed


def _extras(ctx, specs):
    from ..cli import plugin_extras

    return plugin_extras(ctx.args, specs, ctx.command)


def _origin(reg, spec) -> str:
    source = reg.source(spec.plugin)
    return f"plugin {spec.plugin}" + (f", {source['path']}" if source.get("path") else "")


def _check_dataset(ctx, reg, name: str, split: str | None, data_root: str | None) -> bool:
    """The dataset checks; True when one failed."""
    from ..testing import DATASET_CHECKS, check_dataset

    spec = reg.dataset(name)
    options = _extras(ctx, [spec])
    where = f"on {data_root}" if data_root else "on its default data"
    return not _checked(f"'{spec.name}' ({spec.resolve_split(split)})", _origin(reg, spec), DATASET_CHECKS,
                        f"{where}, rankings made from its annotations",
                        lambda report: check_dataset(spec.name, split, data_root, options, registry=reg,
                                                     report=report,
                                                     note=lambda line: click.echo(f"  note  {line}")))


def _checked(what: str, origin: str, checks, setting: str, run) -> bool:
    """Run ``run(report)``, printing each check as it holds and the first that does not, why (a dataset whose files
    cannot be read fails its first check): True when all hold."""
    from ..errors import CirbenchError
    from ..plugins import blame
    from ..util import debug_enabled, one_line

    click.echo(f"checking {what} ({origin}) {setting}")
    held: list[str] = []

    def report(check: str) -> None:
        held.append(check)
        click.echo(f"  ok    {check}")

    try:
        run(report)
    except Exception as exc:  # noqa: BLE001 - the plugin's failure is this command's answer
        if debug_enabled():
            raise
        culprit = blame(exc)
        why = (one_line(exc) if isinstance(exc, (AssertionError, CirbenchError))
               else f"{type(exc).__name__}: {one_line(exc)}")
        click.echo(f"  FAIL  {checks[len(held)]}\n        {why}" + (f" (raised in {culprit})" if culprit else ""))
        return False
    click.echo(f"{what.split(' (')[0]} keeps the contract")
    return True
