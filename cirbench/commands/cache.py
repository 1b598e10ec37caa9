"""``cirbench cache``: what the feature cache holds (``list``) and removing what is no longer wanted (``clear``).
See :mod:`cirbench.cache_inventory`."""

from __future__ import annotations

from pathlib import Path

import click

from . import FiniteFloatRange

EPILOG_GROUP = """\b
Examples:
  cirbench cache list
  cirbench cache clear --unused-for 30
"""

EPILOG_LIST = """\b
Examples:
  cirbench cache list
  cirbench cache list --cache-dir /scratch/cirbench-cache --json
"""

EPILOG_CLEAR = """\b
Examples:
  cirbench cache clear --unused-for 30               # what no run has read for a month
  cirbench cache clear --backbone 'ViT-B-32*' --dry-run
  cirbench cache clear --all --yes
"""

CACHE_DIR = click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
                         help="Feature cache folder (default: $CIRBENCH_CACHE or ~/.cache/cirbench).")


def _entries(n: int) -> str:
    return f"{n} entr{'y' if n == 1 else 'ies'}"


def _root(cache_dir: str | None) -> Path:
    from cirbench.util import default_cache_dir

    return Path(cache_dir) if cache_dir else default_cache_dir()


@click.group("cache", epilog=EPILOG_GROUP)
def command() -> None:
    """Look at and prune the feature cache (features are keyed by backbone, weights, preprocessing, precision
    and feature kind; a run encodes only what it lacks)."""


@command.command("list", epilog=EPILOG_LIST)
@CACHE_DIR
@click.option("--json", "json_out", is_flag=True, help="Print the entries as JSON.")
def list_entries(cache_dir, json_out):
    """The cached features, one row per key (backbone, precision, preprocessing, feature kind, rows, size, when
    a run last used them), most recently used first; then the cache's other folders and their sizes."""
    from cirbench.cache_inventory import as_json, feature_entries, human_size, other_folders

    root = _root(cache_dir)
    if not root.is_dir():
        click.echo(f"{root}: no cache there yet (nothing has been encoded with it)")
        return
    entries, others = feature_entries(root), other_folders(root)
    if json_out:
        click.echo(as_json(entries, others))
        return
    if entries:
        import pandas as pd

        table = pd.DataFrame([e.row() for e in entries])
        table["size"] = [human_size(s) for s in table["size"]]
        click.echo(table.to_string(index=False))
    total = sum(e.size for e in entries)
    click.echo(f"{root}/features: {_entries(len(entries))}, "
               f"{sum(e.rows for e in entries):,} rows, {human_size(total)}")
    damaged = [e for e in entries if e.key is None or e.unreadable_shards]
    if damaged:
        click.echo(f"  {len(damaged)} with an unreadable key or shard (the next run that needs one rebuilds it): "
                   + ", ".join(e.folder.name for e in damaged))
    for name, size in others.items():
        click.echo(f"{root}/{name}: {human_size(size)}")


@command.command("clear", epilog=EPILOG_CLEAR)
@CACHE_DIR
@click.option("--backbone", "backbones", multiple=True,
              help="Only entries whose backbone (model/pretrained, as `cache list` shows it) matches (glob or "
                   "substring; repeat).")
@click.option("--unused-for", type=FiniteFloatRange(min=0), default=None,
              help="Only entries no run has read or written for this many days.")
@click.option("--all", "everything", is_flag=True, help="Every feature entry (needed when no other filter is given).")
@click.option("--dry-run", is_flag=True, help="Say what would be removed, remove nothing.")
@click.option("--yes", "-y", is_flag=True, help="Remove without asking.")
def clear(cache_dir, backbones, unused_for, everything, dry_run, yes):
    """Remove cached features: those of a backbone, those unused for a while, or all of them. The next run that
    needs them encodes them again. Only features are removed; generated benchmarks, LLM generations and other
    folders of the cache stay."""
    from cirbench.cache_inventory import feature_entries, human_size, remove, select
    from cirbench.errors import CirbenchError

    if not (backbones or unused_for is not None or everything):
        raise CirbenchError("say what to remove: --backbone PATTERN, --unused-for DAYS, or --all")
    root = _root(cache_dir)
    chosen = select(feature_entries(root), backbones, unused_for) if root.is_dir() else []
    size = human_size(sum(e.size for e in chosen))
    if not chosen:
        click.echo(f"{root}/features: no entry matches; nothing removed")
        return
    for entry in chosen:
        click.echo(f"  {entry.folder.name}  {entry.backbone}  {entry.feature}  {entry.rows:,} rows  "
                   f"{human_size(entry.size)}")
    if dry_run:
        click.echo(f"would remove {_entries(len(chosen))} ({size}); nothing removed")
        return
    if not yes:
        click.confirm(f"remove these {_entries(len(chosen))} ({size})?", abort=True)
    gone, failed = [], []
    for entry in chosen:
        why = remove(entry)
        if why is None:
            gone.append(entry)
        else:
            failed.append((entry, why))
    click.echo(f"removed {_entries(len(gone))} ({human_size(sum(e.size for e in gone))}) from {root}/features")
    if failed:
        entry, why = failed[0]
        raise CirbenchError(f"{_entries(len(failed))} could not be removed, e.g. {entry.folder} ({why})")
