"""``cirbench data``: what a dataset needs on disk. ``fetch`` downloads its official annotation files (checked
against their sha256), ``prepare`` writes files a benchmark derives from its sources (coco-object's masked
queries); ``check`` says what is present and missing (see that command)."""

from __future__ import annotations

import click

EPILOG_GROUP = """\b
Examples:
  cirbench data fetch circo --data-root data/CIRCO
  cirbench data check --dataset cirr --data-root data/CIRR
  cirbench data prepare coco-object --data-root data/coco
"""

EPILOG_CHECK = """\b
Examples:
  cirbench data check --dataset cirr --split val --data-root data/CIRR
  cirbench data check --dataset fashioniq --data-root data/FashionIQ --category dress --json
  cirbench data check --dataset circo:test,cirr:test1 --data-root circo=data/CIRCO --data-root cirr=data/CIRR
"""

EPILOG_FETCH = """\b
Examples:
  cirbench data fetch circo --data-root data/CIRCO        # annotations/{val,test}.json, checked against sha256
  cirbench data fetch cirr --data-root data/CIRR          # cirr/captions/ and cirr/image_splits/ (val, test1)
  CIRBENCH_FETCH_MIRROR=/shared/cir cirbench data fetch fashioniq --data-root data/FashionIQ   # no internet
"""

EPILOG_PREPARE = """\b
Examples:
  cirbench data prepare coco-object --data-root data/coco     # val2017_masked/ from instances_val2017.json
  cirbench data prepare shapes                                # generate the embedded benchmark now
"""


@click.group("data", epilog=EPILOG_GROUP)
def command() -> None:
    """Prepare and check benchmark data on disk."""


def build_dataset(ctx: click.Context, name: str, data_root: str | None):
    """The dataset plugin ``name`` with its options from the command's ``--name value`` extra arguments."""
    from cirbench.cli import command_option_names, parse_extra_options
    from cirbench.plugins import get_registry
    from cirbench.types import resolve_options

    spec = get_registry().dataset(name)
    (options,) = resolve_options(spec.options, parse_extra_options(ctx.args), spec.name, f"dataset {spec.name}",
                                 command_option_names(ctx.command))
    return spec, spec.create(data_root, options)


@command.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
                 epilog=EPILOG_PREPARE)
@click.argument("dataset")
@click.option("--data-root", type=click.Path(file_okay=False), default=None, help="Dataset root folder.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.pass_context
def prepare(ctx, dataset, data_root, quiet):
    """Write the files DATASET derives from its sources (dataset options as --name value)."""
    from cirbench.errors import CirbenchError

    spec, ds = build_dataset(ctx, dataset, data_root)
    if not hasattr(ds, "prepare"):
        raise CirbenchError(f"dataset '{spec.name}' needs no preparation: its files are used as distributed")
    click.echo(ds.prepare(progress=not quiet))


@command.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True}, epilog=EPILOG_CHECK)
@click.option("--dataset", "-d", required=True,
              help="Dataset name (see `cirbench datasets`), or several separated by commas, each with its split if "
                   "wanted (circo:test,cirr:test1), as `cirbench run` takes them.")
@click.option("--split", "-s", default=None,
              help="Split (default: the dataset's default split); a split named in --dataset wins.")
@click.option("--data-root", "data_roots", multiple=True, metavar="[NAME=]DIR",
              help="Dataset root folder; with several datasets, NAME=DIR for each (repeat).")
@click.option("--sample", default=200, show_default=True, type=click.IntRange(min=0),
              help="How many image headers to read for sizes and modes.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (a list with several datasets).")
@click.pass_context
def check(ctx, dataset, split, data_roots, sample, as_json):
    """What DATASET/SPLIT finds under the data root: annotation files against the official checksums, images
    present and missing, image sizes and modes. Exit 1 when something is missing or unreadable. Needs no
    torch and decodes no image."""
    import json

    from cirbench import cli
    from cirbench.datacheck import check as run_check
    from cirbench.datacheck import healthy, render
    from cirbench.plugins import get_registry
    from cirbench.types import resolve_options

    benchmarks = cli.run_benchmarks(get_registry(), dataset, split)
    specs = list({spec.name: spec for spec, _ in benchmarks}.values())
    roots = cli.data_root_per_dataset(data_roots, [spec.name for spec in specs])
    extra = cli.plugin_extras(ctx.args, specs, ctx.command)
    reports = []
    for spec, sp in benchmarks:
        (options,) = resolve_options(spec.options, cli.declared_by(extra, spec), spec.name, f"dataset {spec.name}")
        reports.append(run_check(spec.create(roots.get(spec.name), options), sp, sample=sample))
    if as_json:
        click.echo(json.dumps(reports[0] if len(reports) == 1 else reports, indent=1))
    else:
        click.echo("\n\n".join(render(report) for report in reports))
    return 0 if all(healthy(report) for report in reports) else 1


@command.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True}, epilog=EPILOG_FETCH)
@click.argument("dataset")
@click.option("--data-root", type=click.Path(file_okay=False), default=None, help="Dataset root folder.")
@click.option("--force", is_flag=True, help="Replace files in place that are not the official ones.")
@click.pass_context
def fetch(ctx, dataset, data_root, force):
    """Download DATASET's official annotation files from their public sources (pinned revisions) into the data
    root, each kept only when its sha256 is the official one; files already in place are left alone. Exit 1 when
    a file in place differs from the official one (kept unless --force). Images are not fetched: their licences
    ask for each benchmark's own download (datasets/README.md says where)."""
    from cirbench.fetch import fetch as fetch_files

    spec, ds = build_dataset(ctx, dataset, data_root)
    status = fetch_files(ds, spec.name, force=force, say=click.echo)
    differs = [path for path, state in status.items() if state == "differs"]
    if differs:
        ctx.exit(1)
