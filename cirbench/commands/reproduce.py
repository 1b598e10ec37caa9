"""``cirbench reproduce RESULT.json``: run what a result file records again and compare (see
:mod:`cirbench.reproduce`)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import click

from . import FiniteFloatRange

EPILOG = """\b
Examples:
  cirbench reproduce results/circo/val/slerp@alpha=0.8__ViT-L-14-openai.json --data-root data/CIRCO
  cirbench reproduce theirs/cirr/test1/searle__ViT-L-14-openai.json --data-root data/CIRR --tolerance 0.05
  cirbench reproduce A.json --backbone my-config.json --checkpoint runs/tat/best --output results-again
  cirbench reproduce results/circo/val/*.json --data-root data/CIRCO   # a whole leaderboard, one backbone load
"""


@click.command(name="reproduce", context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
               epilog=EPILOG)
@click.argument("results", nargs=-1, required=True, metavar="RESULT...")
@click.option("--data-root", type=click.Path(file_okay=False), default=None,
              help="The dataset's folder on this machine (default: the one recorded, if it was given).")
@click.option("--backbone", default=None, help="The backbone's name or config JSON here (default: the one recorded).")
@click.option("--pretrained", default=None, help="The weights' tag or file here (default: the one recorded).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--output", "-o", type=click.Path(file_okay=False), default=None,
              help="Keep the reproduction's result files here (default: a temporary folder, removed at the end).")
@click.option("--cache/--no-cache", "use_cache", default=False, show_default=True,
              help="Let the feature cache serve images encoded before (default: encode every image again).")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Feature cache folder (with --cache; default: $CIRBENCH_CACHE or ~/.cache/cirbench).")
@click.option("--tolerance", type=FiniteFloatRange(min=0), default=0.0, show_default=True,
              help="The largest metric difference (in points) still called reproduced (0: identical).")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.pass_context
def command(ctx, results, data_root, backbone, pretrained, device, output, use_cache, cache_dir, tolerance, as_json,
            quiet):
    """Run what each RESULT records (method, options, checkpoint, dataset, split, backbone, preprocessing,
    precision, seed) again and compare: what differs in the configuration, every metric, and the rankings query
    by query. Method and dataset options given as --name value replace the recorded ones (a checkpoint's new
    path, say); a path may differ, the checksums of what it names may not. Several results share one backbone
    load. Exit 0 when every one is reproduced, 1 when one is not."""
    from cirbench.cli import parse_extra_options
    from cirbench.errors import CirbenchError
    from cirbench.evaluate import Evaluator, Loaded
    from cirbench.reproduce import compare, config_of, render
    from cirbench.results import read_result

    # the result files come first; the method and dataset options (--name value) follow them
    cut = next((i for i, token in enumerate(results) if token.startswith("--")), len(results))
    files, options = results[:cut], parse_extra_options([*results[cut:], *ctx.args])
    if not files:
        raise CirbenchError("name the result files first, then the options to change (--name value)")
    originals = [(Path(r), read_result(Path(r))) for r in files]  # every file read before anything runs
    folder = Path(output) if output else Path(tempfile.mkdtemp(prefix="cirbench-reproduce-"))
    reports, loaded = [], Loaded()
    try:
        runs = [Evaluator(config_of(record, output=folder, data_root=data_root, backbone=backbone,
                                    pretrained=pretrained, device=device, use_cache=use_cache, cache_dir=cache_dir,
                                    options=options, progress=not quiet), loaded=loaded) for _, record in originals]
        for run in runs:
            run.check()
        for (path, record), run in zip(originals, runs, strict=True):
            (outcome,) = run.run()
            comparison = compare(record, path, read_result(outcome.result_path), outcome.result_path, tolerance)
            reports.append((path, comparison, outcome.result_path))
    finally:
        if not output:
            shutil.rmtree(folder, ignore_errors=True)
    if as_json:
        click.echo(json.dumps([{"original": str(path), "reproduced": c.reproduced, "configuration": c.configuration,
                                "environment": c.environment, "metrics": c.metrics, "rankings": c.rankings,
                                "tolerance": tolerance, **({"result": str(again)} if output else {})}
                               for path, c, again in reports], indent=1, default=str))
    else:
        for path, c, again in reports:
            click.echo(render(c, path) + (f"\nresult: {again}" if output else ""))
        if len(reports) > 1:
            click.echo(f"{sum(c.reproduced for _, c, _ in reports)} of {len(reports)} reproduced")
    return 0 if all(c.reproduced for _, c, _ in reports) else 1
