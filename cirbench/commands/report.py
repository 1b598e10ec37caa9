"""``cirbench report RESULT [RESULT_B]``: an HTML page to look at a run (or two) query by query."""

from __future__ import annotations

from pathlib import Path

import click

EPILOG = """\b
Examples:
  cirbench report results/shapes/val/slerp@alpha=0.8__shapes-clip-bundled.json
  cirbench report results/circo/val/A.json results/circo/val/B.json --top 5 --limit 0
"""


@click.command(name="report", epilog=EPILOG)
@click.argument("results", nargs=-1, required=True, type=click.Path(dir_okay=False, exists=True))
@click.option("--output", "-o", type=click.Path(file_okay=False), default=None,
              help="Folder for report.html, thumbs/ and plots/ (default: <result>.report beside the result).")
@click.option("--top", default=10, show_default=True, type=click.IntRange(1, 50), help="Thumbnails per query.")
@click.option("--limit", default=300, show_default=True, type=click.IntRange(min=0),
              help="Queries shown (0: all; two runs: those that disagree most first).")
@click.option("--no-thumbnails", is_flag=True, help="Do not read images (metrics, plots and ranks only).")
def command(results, output, top, limit, no_thumbnails):
    """Write a self-contained HTML report of one run, or of two runs on the same split: metrics with
    confidence intervals (and a paired test), provenance, plots, and a per-query view with thumbnails,
    targets marked and filters (hits, misses, set, CIRCO aspect, where two runs disagree)."""
    from cirbench.report import build_report

    path = build_report([Path(r) for r in results], Path(output) if output else None, top=top, limit=limit,
                        thumbnails=not no_thumbnails)
    click.echo(f"report: {path}")
