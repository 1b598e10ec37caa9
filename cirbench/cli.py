"""The ``cirbench`` command line (click). Heavy libraries (torch, open_clip) are imported inside commands,
so ``cirbench --help`` and the listing commands stay fast."""

from __future__ import annotations

import functools
import importlib
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from . import __version__
from .errors import CirbenchError, from_reader_process, out_of_memory, reader_process_origin
from .types import (
    BOOL_WORDS,
    PREPROCESS_KINDS,
    SAVED_TOP,
    DatasetSpec,
    MethodSpec,
    OptionSpec,
    split_plugin_options,
    switch_off,
)
from .util import MAX_REPLICATES, MAX_WORKERS, SEED_MAX, launched_by_torchrun

EPILOG_RUN = """\b
Examples:
  cirbench run                                      # slerp and both baselines on the embedded shapes benchmark
  cirbench run --method fti4cir --dataset circo --split val --data-root data/CIRCO
  cirbench run --method slerp --dataset cirr --alpha 0.5:1.0:0.05   # alpha sweep, one encoding pass
  cirbench run --method image-only --dataset fashioniq --category dress --allow-missing
  cirbench run --method slerp --dataset circo:test,cirr:test1 --data-root circo=data/CIRCO --data-root cirr=data/CIRR
  cirbench run --method basic --dataset icir --data-root data/icir --save-top all   # whole rankings, to score again
  cirbench run --method slerp,searle --dataset circo --data-root data/CIRCO --dry-run   # check it all, run nothing
  cirbench run --method lincir,cirevl --dataset circo --download-only   # fetch weights and models, then run offline
"""


# Core commands that live in their own modules (each defines a click command named ``command`` and
# imports torch only inside the command body).
BUILTIN_COMMAND_MODULES: tuple[str, ...] = ("cirbench.commands.train", "cirbench.commands.bench",
                                             "cirbench.commands.compare", "cirbench.commands.data",
                                             "cirbench.commands.report", "cirbench.commands.cache",
                                             "cirbench.commands.reproduce", "cirbench.commands.shortcuts",
                                             "cirbench.commands.check", "cirbench.commands.new",
                                             "cirbench.commands.agree")


def _error(line: str) -> None:
    """An error line on stderr; under torchrun prefixed with the rank that says it (every rank meets the error, or
    only the one that read a bad file: the prefix tells which)."""
    click.echo(f"[rank {os.environ['RANK']}] {line}" if launched_by_torchrun() else line, err=True)


def _silence_stdout() -> None:
    """Point standard output at the null device: Python's flush at exit would otherwise meet the closed pipe
    again and print an error of its own."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # no file descriptor behind it (captured output): nothing left to flush
        pass


def hoist_plugin_options(args: list[str]) -> list[str]:
    """``--plugin FILE`` (or ``--plugin=FILE``) written after the command (``cirbench run --plugin x.py ...``) moved
    before it, where the global option is parsed: a plugin's methods must be known before the command reads
    ``--method``. Nothing after a bare ``--`` moves."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest += args[i:]
            break
        if arg.startswith("--plugin="):
            front.append(arg)
        elif arg == "--plugin" and i + 1 < len(args):
            front += [arg, args[i + 1]]
            i += 1
        else:
            rest.append(arg)
        i += 1
    return [*front, *rest]


class CirbenchGroup(click.Group):
    """A click group that turns :class:`CirbenchError` and click's usage errors into one line on stderr and
    their exit code, and adds the commands that plugins register (``register_commands`` hook) on first use."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        from .errors import show_warnings_as_lines
        from .util import one_line

        show_warnings_as_lines()
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except click.ClickException as exc:  # usage errors: one line, with where to look
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            _error(f"error: {one_line(exc.format_message())}{hint}")
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, hoist_plugin_options(args))

    _builtin_commands_loaded = False
    _third_party_commands_loaded = False

    def _load_builtin_commands(self) -> None:
        if not self._builtin_commands_loaded:
            self._builtin_commands_loaded = True
            for module_name in BUILTIN_COMMAND_MODULES:
                module = importlib.import_module(module_name)
                self.add_command(module.command)
            from .plugins import register_commands

            register_commands(self)

    def _load_third_party_commands(self) -> None:
        """Commands of entry-point plugins: only when a command name is not one of cirbench's own, so that a
        broken plugin never stands between the user and the built-in commands (or ``--help``)."""
        if not self._third_party_commands_loaded:
            self._third_party_commands_loaded = True
            from .plugins import get_registry, register_commands

            reg = get_registry()
            before = list(reg._order)
            reg.load_third_party()
            register_commands(self, [plugin for plugin in reg._order if plugin not in before])

    def list_commands(self, ctx):
        self._load_builtin_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx, cmd_name):
        if cmd_name not in self.commands:
            self._load_builtin_commands()
        if cmd_name not in self.commands:
            self._load_third_party_commands()
        return super().get_command(ctx, cmd_name)


    def invoke(self, ctx: click.Context):
        from .util import debug_enabled, one_line, speaks

        try:
            return super().invoke(ctx)
        except CirbenchError as exc:
            exc = from_reader_process(exc) or exc
            _error(f"error: {exc if debug_enabled() else one_line(exc)}")
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            if speaks():  # under torchrun every rank is interrupted: one line says it
                click.echo("interrupted", err=True)
            ctx.exit(130)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except BrokenPipeError:  # the reader of the output left (``cirbench methods | head``): stop, say nothing
            _silence_stdout()
            ctx.exit(1)
        except OSError as exc:  # a file the user named or the disk (unwritable, not a folder, full): not a bug
            if debug_enabled():
                traceback.print_exc()
            else:
                where = ": ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
                _error(f"error: {where + ': ' if where else ''}{exc.strerror or one_line(exc)}")
            ctx.exit(2)
        except Exception as exc:  # noqa: BLE001 - never a traceback for the user; opt-in for developers
            if out_of_memory(exc) and not debug_enabled():  # the machine's limit, not a bug
                _error(f"error: out of memory: {one_line(exc)} (a smaller --batch-size, fewer --workers or "
                       "--precision bf16 needs less)")
                ctx.exit(1)
            inner = from_reader_process(exc)
            if inner is not None and not debug_enabled():  # a cirbench error raised in a DataLoader worker
                _error(f"error: {one_line(inner)}")
                ctx.exit(inner.exit_code)
            if debug_enabled():
                traceback.print_exc()
            else:
                from .plugins import blame

                origin = reader_process_origin(exc)  # a worker's error: its own type and line, not torch's wrapper
                what = (f"{origin[0]}: {one_line(origin[1])} (in a DataLoader worker)" if origin
                        else f"{type(exc).__name__}: {one_line(exc)}")
                culprit = blame(exc)  # a plugin's bug is its author's to fix: say where, not "internal error"
                _error(f"{f'error in {culprit}' if culprit else 'internal error'}: {what} "
                       "(set CIRBENCH_DEBUG=1 for the traceback)")
            ctx.exit(1)


def parse_extra_options(args: list[str]) -> dict[str, str | None]:
    """Turn ``--name value`` / ``--name=value`` extra arguments into a dict (method/dataset options); a bare
    ``--name`` (the last argument, or one followed by another option) maps to None, which a bool option reads
    as true and any other as a missing value, once the option is known (an unknown name is reported as such,
    with its closest match)."""
    out: dict[str, str | None] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise CirbenchError(f"unexpected argument {arg!r}")
        name = arg[2:]
        if "=" in name:
            name, value = name.split("=", 1)
        else:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                value = None
            else:
                value = args[i + 1]
                i += 1
        out[name.replace("-", "_")] = value
        i += 1
    return out


def split_positional(args: list[str], options: Sequence[OptionSpec]) -> tuple[list[str], list[str]]:
    """``args`` parted into positional arguments and ``--name [value]`` plugin options, as
    :func:`parse_extra_options` will read the latter: an option takes the next argument as its value unless that
    is an option, or unless it is a bool option (``options`` say which; ``--no-name`` is one too) and the next
    argument is not a bool word."""
    kinds = {o.name: o.type for o in options}
    positional, rest = [], []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            positional.append(arg)
            i += 1
            continue
        rest.append(arg)
        name = arg[2:].replace("-", "_")
        boolean = kinds.get(name) == "bool" or (name.startswith("no_") and kinds.get(name[3:]) == "bool")
        following = args[i + 1] if i + 1 < len(args) else None
        takes = following is not None and not following.startswith("--") and "=" not in arg and (
            not boolean or following.lower() in BOOL_WORDS)
        if takes and following is not None:
            rest.append(following)
        i += 2 if takes else 1
    return positional, rest


def run_benchmarks(reg, datasets: str, split: str | None) -> list[tuple[DatasetSpec, str]]:
    """``--dataset circo:test,cirr:test1,fashioniq`` with ``--split``: each dataset with its split resolved (one
    named in ``--dataset`` wins over ``--split``), in order, without repeats; any unknown name or split is an
    error before anything runs."""
    from .types import benchmark_split

    out: list[tuple[DatasetSpec, str]] = []
    for item in datasets.split(","):
        if not item.strip():
            continue
        name, named_split = benchmark_split(item)
        spec = reg.dataset(name)
        pair = (spec, spec.resolve_split(named_split or split))
        if all((s.name, sp) != (spec.name, pair[1]) for s, sp in out):
            out.append(pair)
    if not out:
        raise CirbenchError("--dataset names no dataset")
    return out


def data_root_per_dataset(values: tuple[str, ...], datasets: list[str], flag: str = "--data-root",
                          what: str = "datasets run") -> dict[str, str]:
    """``--data-root DIR`` (one dataset) or ``--data-root NAME=DIR`` for each of several: the root of each dataset
    given one. A file, a name that ``--dataset`` does not name, or a bare folder among several datasets is a
    one-line error. ``flag``/``what``: the option and its datasets, as errors name them."""
    roots: dict[str, str] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep or name not in datasets:  # a bare folder (whose name may hold a '=')
            if len(datasets) > 1:
                raise CirbenchError(f"{flag} {value}: '{name}' is not one of the {what} ({', '.join(datasets)})"
                                    if sep else
                                    f"{flag} {value}: with several datasets ({', '.join(datasets)}) give each "
                                    f"its folder as {flag} NAME=DIR")
            name, folder = datasets[0], value
        if Path(folder).is_file():
            raise CirbenchError(f"{flag} {value}: {folder} is a file, not a dataset folder")
        if name in roots and roots[name] != folder:
            raise CirbenchError(f"{flag}: dataset '{name}' is given two folders ({roots[name]}, {folder})")
        roots[name] = folder
    return roots


def refuse_undeclared(extra: dict[str, Any], specs: Sequence[MethodSpec | DatasetSpec], command: click.Command) -> None:
    """A one-line error (with a "did you mean") for an extra ``--name value`` that none of ``specs``, the methods
    and datasets a command runs, declares."""
    from .types import resolve_options

    declared: dict[str, OptionSpec] = {o.name: o for s in specs for o in s.options}
    unknown = {k: v for k, v in extra.items() if k not in declared}
    if not unknown:
        return
    kinds = [(kind, [s.name for s in specs if isinstance(s, cls)]) for kind, cls in (("method", MethodSpec),
                                                                                     ("dataset", DatasetSpec))]
    what = " or ".join(f"{kind}{'s' if len(names) > 1 else ''} {', '.join(names)}" for kind, names in kinds if names)
    dataset = next((s.name for s in specs if isinstance(s, DatasetSpec)), specs[0].name)
    resolve_options(list(declared.values()), unknown, dataset, what, command_option_names(command))


def _plan(runs: list[Any]) -> tuple[str, list[str]]:
    """What ``cirbench run`` would do (``--dry-run``), from its checked runs: per method and benchmark, the
    results it would write, the backbone and where its weights would come from, the queries and images; and the
    backbones whose weights cannot be had here."""
    from .backbones import model_name_of, weights_status
    from .evaluate import choose_backbone, run_label
    from .hub import availability

    lines, weights, results, missing_files = [], {}, 0, []
    offline = False  # something is missing only for want of a network: --download-only would fetch it
    for number, planned in enumerate(runs, 1):
        cfg, checked = planned.cfg, planned.check()
        model, pretrained = choose_backbone(cfg, checked.mspec, checked.dspec)
        if (model, pretrained) not in weights:
            weights[(model, pretrained)] = weights_status(model, pretrained)
        labels = [run_label(cfg, checked.mspec, opts) for opts in checked.option_sets]
        results += len(labels)
        queries = sum(len(es.queries) for es in checked.evalsets)
        images = len({ref.id for es in checked.evalsets for ref in es.images.values()})
        missing = sum(c.get("missing_images", 0) for c in checked.set_counts.values())
        dropped = sum(c.get("queries_dropped", 0) for c in checked.set_counts.values())
        hidden = " (hidden targets: submission files)" if all(es.hidden_targets for es in checked.evalsets) else ""
        lines += [f"[{number}/{len(runs)}] {checked.mspec.name} on {checked.dspec.name}/{checked.split}{hidden}: "
                  f"{len(labels)} result(s) in {Path(cfg.output) / checked.dspec.name / checked.split}: "
                  f"{', '.join(labels[:6])}{' ...' if len(labels) > 6 else ''}",
                  f"    backbone {model} / {pretrained}: weights {weights[(model, pretrained)]}; preprocessing "
                  f"{checked.preprocess_kind}, {cfg.precision}, device {cfg.device}",
                  f"    {queries:,} queries, {images:,} images"
                  + (f" ({missing:,} missing: {dropped:,} queries dropped, --allow-missing)" if missing else "")]
        files: dict[str, str] = {}  # what the method fetches, over the values of a sweep
        for opts in checked.option_sets:
            try:
                for what, source in checked.mspec.download_plan(opts, model_name_of(model), pretrained):
                    if source not in files:
                        status, ok = availability(source)
                        files[source] = f"{what} ({source}): {status}"
                        if not ok:
                            missing_files.append(checked.mspec.name)
                            offline = offline or "no network" in status
            except CirbenchError as exc:
                files[str(exc)] = f"NOT AVAILABLE: {exc}"
                missing_files.append(checked.mspec.name)
        lines += [f"    method file: {line}" for line in files.values()]
    unavailable = [f"the weights of {m} / {p}" for (m, p), status in weights.items()
                   if status.startswith("NOT AVAILABLE")]
    if missing_files:
        names = list(dict.fromkeys(missing_files))
        unavailable.append(f"what {', '.join(names)} {'need' if len(names) > 1 else 'needs'} (above)")
    offline = offline or any(s.startswith("NOT AVAILABLE") and "no network" in s for s in weights.values())
    lines.append(f"dry run: {results} result(s) planned; names, options, plugins and data checked; no model loaded, "
                 "nothing written" + (f"; not available here: {'; '.join(unavailable)}" if unavailable else "")
                 + ("; where there is a network, the same command with --download-only fetches what needs one"
                    if offline else ""))
    return "\n".join(lines), unavailable


Downloads = dict[str, tuple[str, Callable[[], str]]]  # key: (what, how to fetch it), in the order to fetch


def backbone_download(model: str, pretrained: str) -> Downloads:
    """The backbone's weights, as :func:`fetch_all` takes them."""
    from .backbones import download_weights

    return {f"backbone:{model}:{pretrained}": (f"the weights of {model} / {pretrained}",
                                               functools.partial(download_weights, model, pretrained))}


def file_downloads(declared: Callable[[], list[tuple[str, str]]], who: str) -> Downloads:
    """What a method or trainer declares it fetches (``[(what, source)]``, see ``MethodSpec.downloads``), as
    :func:`fetch_all` takes them; a declaration that refuses (no file for this backbone without one given) is a
    thing that cannot be fetched."""
    from .hub import download

    try:
        plan = declared()
    except CirbenchError as exc:
        return {f"plan:{who}:{exc}": (f"what {who} needs", functools.partial(_raise, exc))}
    return {source: (f"{what} ({source})", functools.partial(download, source, what)) for what, source in plan}


def fetch_all(wanted: Downloads, command: str) -> None:
    """Fetch each of ``wanted`` (``--download-only``), a line each (where it now is, or why it could not be
    fetched); CirbenchError after the last when some could not be."""
    failed = []
    for what, action in wanted.values():
        try:
            click.echo(f"{what}: {action()}")
        except CirbenchError as exc:
            click.echo(f"NOT FETCHED: {exc}", err=True)
            failed.append(what)
    if failed:
        raise CirbenchError(f"{len(failed)} of the {len(wanted)} things the {command} needs not fetched (above)")
    things = f"the one thing the {command} needs is" if len(wanted) == 1 else \
        f"the {len(wanted)} things the {command} needs are"
    click.echo(f"download only: {things} here; the same command without --download-only runs without a network")


def _run_downloads(runs: list[Any]) -> Downloads:
    """What the runs would download, read from names and options alone (no benchmark data): each backbone's
    weights and each method's files over the values of its sweeps, once each."""
    from .backbones import model_name_of
    from .evaluate import choose_backbone

    wanted: Downloads = {}
    for planned in runs:
        mspec, dspec, option_sets = planned.method_plan()
        model, pretrained = choose_backbone(planned.cfg, mspec, dspec)
        for key, value in backbone_download(model, pretrained).items():
            wanted.setdefault(key, value)
        for opts in option_sets:
            plan = functools.partial(mspec.download_plan, opts, model_name_of(model), pretrained)
            for key, value in file_downloads(plan, mspec.name).items():
                wanted.setdefault(key, value)
    return wanted


def _raise(exc: Exception) -> str:
    raise exc


def plugin_extras(args: Sequence[str], specs: Sequence[MethodSpec | DatasetSpec],
                  command: click.Command) -> dict[str, Any]:
    """A command's extra options for its plugins: each one that some method or dataset of ``specs`` declares
    (each takes those it declares), a bare ``--no-name`` turning off a bool option that one of them declares."""
    extra = switch_off(parse_extra_options(list(args)), [o for spec in specs for o in spec.options])
    refuse_undeclared(extra, specs, command)
    return extra


def declared_by(extra: dict[str, Any], *specs: MethodSpec | DatasetSpec) -> dict[str, Any]:
    """The extra options that one of ``specs`` declares."""
    names = {o.name for s in specs for o in s.options}
    return {k: v for k, v in extra.items() if k in names}


def command_option_names(command: click.Command) -> list[str]:
    """The option names of ``command`` (``batch_size`` for ``--batch-size``): the "did you mean" hints of an
    unknown extra option, and the names ``run``'s keeps from plugins."""
    return [opt.lstrip("-").replace("-", "_") for p in command.params if isinstance(p, click.Option)
            for opt in p.opts if opt.startswith("--")]


def _add_local_plugins(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    """``--plugin``: noted as the option is parsed, before the command is looked up, so that a plugin's commands,
    methods and datasets are there for it; loaded (strictly) with the built-ins on first use of the registry."""
    if value:
        from .plugins import add_local_plugins

        add_local_plugins(value)
    return value


@click.group(cls=CirbenchGroup, epilog="\b\nExamples:\n  cirbench run\n  cirbench methods\n  "
             "cirbench leaderboard results/\n"
             "  cirbench --plugin my_method.py run --method mine   # a method in one file, not installed")
@click.version_option(__version__, prog_name="cirbench")
@click.option("--plugin", "local_plugins", multiple=True, metavar="FILE.py|FOLDER|MODULE", expose_value=False,
              callback=_add_local_plugins,
              help="Load a plugin that is not installed: a .py file, a package folder or a module's dotted name "
                   "(repeat for several; also CIRBENCH_PLUGINS, separated by ':'). Result files record the "
                   "sha256 of its code.")
def cli() -> None:
    """cirbench: evaluate zero-shot composed image retrieval methods on CIR benchmarks, one loop for all.

    Plugins can add methods, datasets and commands; `cirbench plugins` lists them.
    """


def _save_top(ctx, param, value: str) -> int | None:
    """``--save-top``: a count of at least 1, or ``all`` (None)."""
    if str(value).strip().lower() == "all":
        return None
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise click.BadParameter(f"{value!r} is neither a count of at least 1 nor 'all'")
    return number


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True}, epilog=EPILOG_RUN)
@click.option("--method", "-m", default="slerp,image-only,text-only", show_default=True,
              help="Method name, or several separated by commas (see `cirbench methods`). The default runs Slerp "
                   "beside the image-only and text-only baselines.")
@click.option("--dataset", "-d", default="shapes", show_default=True,
              help="Dataset name (see `cirbench datasets`), or several separated by commas, each with its split if "
                   "wanted (circo:test,cirr:test1,fashioniq): one backbone load serves them all.")
@click.option("--split", "-s", default=None,
              help="Split (default: the dataset's default split); a split named in --dataset wins.")
@click.option("--backbone", default=None, help="open_clip model name or config JSON (default: dataset's or method's).")
@click.option("--pretrained", default=None, help="open_clip pretrained tag, weights file, hf:REPO_OR_FOLDER (a CLIP "
              "saved by transformers; hf:OWNER/NAME@REVISION at a branch, tag or commit), 'remoteclip', 'bundled' "
              "or 'none'.")
@click.option("--preprocess", type=click.Choice(PREPROCESS_KINDS), default=None,
              help="Image preprocessing (default: the method's official choice): targetpad (SEARLE's), clip (the "
                   "backbone's own, as CLIP/open_clip), hf-clip (transformers' CLIPImageProcessor, as LinCIR).")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16", "auto"]), default="fp32", show_default=True,
              help="fp32 is what the official evaluators run (and reproduces the papers); bf16/fp16 cast the weights "
                   "once and are faster on GPUs (agreement with fp32: see README). auto = fp32.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--data-root", "data_roots", multiple=True, metavar="[NAME=]DIR",
              help="Dataset root folder; with several datasets, NAME=DIR for each (repeat).")
@click.option("--output", "-o", type=click.Path(file_okay=False), default="results", show_default=True,
              help="Results folder.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Feature cache folder (default: $CIRBENCH_CACHE or ~/.cache/cirbench).")
@click.option("--no-cache", is_flag=True, help="Do not read or write the feature cache.")
@click.option("--cache-identity", type=click.Choice(["stat", "content"]), default="stat", show_default=True,
              help="What identifies a cached image: path+size+mtime+inode+ctime (stat), or the sha256 of its bytes "
                   "(content: robust to in-place rewrites and moves, but reads every file each run).")
@click.option("--label", default=None, help="Name of this run in result files and leaderboards (default: method).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, SEED_MAX),
              help="Seeds torch, the bootstrap and any random step of a method.")
@click.option("--batch-size", default=None, type=click.IntRange(min=1),
              help="Images per batch (default: 256 on CUDA, 64 on the CPU).")
@click.option("--workers", default=None, type=click.IntRange(0, MAX_WORKERS),
              help="Image-reading worker processes (default: min(16, CPUs) on CUDA, min(8, CPUs) on the CPU).")
@click.option("--max-image-pixels", default=89_478_485, show_default=True, type=click.IntRange(min=1),
              help="Refuse images whose header declares, or whose resized size needs, more pixels than this.")
@click.option("--allow-missing", is_flag=True,
              help="Skip missing images as the official loaders do (a query goes when its reference or a target is "
                   "missing) and record the counts.")
@click.option("--retrieval", "retrieval_backend", type=click.Choice(["auto", "torch", "faiss"]), default="auto",
              show_default=True, help="Ranking backend (auto: torch on CUDA; faiss for large problems on the CPU).")
@click.option("--encode-path", type=click.Choice(["auto", "workers", "batched"]), default="auto", show_default=True,
              help="workers: per-image PIL pipeline in reader processes (the official one, byte for byte); batched: "
                   "readers pass JPEG bytes, decoding (GPU JPEG) and PIL-exact resizing run on whole batches on the "
                   "device. auto: batched on CUDA, workers on the CPU.")
@click.option("--bootstrap", default=1000, show_default=True, type=click.IntRange(0, MAX_REPLICATES),
              help="Bootstrap replicates for the 95% confidence intervals recorded with every metric (0: none).")
@click.option("--save-top", default=str(SAVED_TOP), show_default=True, metavar="N|all", callback=_save_top,
              help="Ranked ids written per query to the predictions file; all: every id the benchmark ranks (on "
                   "i-CIR the instance's whole database, which `cirbench score` needs to score the file again).")
@click.option("--no-leaderboard", is_flag=True, help="Do not print the leaderboard after the run.")
@click.option("--dry-run", is_flag=True,
              help="Check names, options, plugins and every benchmark's data, say what would run (results, backbone "
                   "and where its weights come from, queries and images), and stop: no model loaded, nothing written.")
@click.option("--download-only", is_flag=True,
              help="Fetch what the run would download (the backbone's weights, the methods' released files, "
                   "captioners and language models) into the local caches, and stop: on a machine with a network, "
                   "before the same command runs where there is none. Reads no benchmark data.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.pass_context
def run(ctx, method, dataset, split, backbone, pretrained, preprocess, precision, device, data_roots, output,
        cache_dir, no_cache, cache_identity, label, seed, batch_size, workers, max_image_pixels, allow_missing,
        retrieval_backend, encode_path, bootstrap, save_top, no_leaderboard, dry_run, download_only, quiet):
    """Evaluate METHOD on DATASET/SPLIT and write results/<dataset>/<split>/<run>__<backbone>.json.

    Method and dataset options are given as extra --name value pairs (e.g. --alpha 0.8, --category dress);
    `cirbench methods` and `cirbench datasets` list them.
    """
    from . import distributed
    from .evaluate import Evaluator, Loaded, RunConfig
    from .plugins import get_registry

    reg = get_registry()
    speaks = distributed.speaks()  # under torchrun, rank 0 alone shows progress and results
    names = list(dict.fromkeys(m.strip() for m in method.split(",") if m.strip()))
    if not names:
        raise CirbenchError("--method names no method")
    specs = [reg.method(n) for n in names]
    benchmarks = run_benchmarks(reg, dataset, split)
    dspecs = list({d.name: d for d, _ in benchmarks}.values())
    roots = data_root_per_dataset(data_roots, [d.name for d in dspecs])
    if label is not None and (not label.strip() or not label.isprintable()):
        raise CirbenchError(f"--label {label!r} is no run name: text on one line, not blank (it heads the run's row "
                            "in every leaderboard)")
    if label and len(specs) > 1:
        raise CirbenchError("--label names one run: give it with a single --method")
    extra = plugin_extras(ctx.args, [*specs, *dspecs], ctx.command)
    runs, loaded = [], Loaded()  # one backbone, each benchmark read once, features kept in memory between runs
    for dspec, dsplit in benchmarks:
        for mspec in specs:
            m_opts, d_opts = split_plugin_options(declared_by(extra, mspec, dspec), mspec, dspec)
            cfg = RunConfig(method=mspec.name, dataset=dspec.name, split=dsplit, backbone=backbone,
                            pretrained=pretrained, preprocess=preprocess, precision=precision, device=device,
                            data_root=roots.get(dspec.name), output=output, cache_dir=cache_dir,
                            use_cache=not no_cache, cache_identity=cache_identity, method_options=m_opts,
                            dataset_options=d_opts, label=label, seed=seed, batch_size=batch_size, workers=workers,
                            max_image_pixels=max_image_pixels, allow_missing=allow_missing,
                            retrieval_backend=retrieval_backend, encode_path=encode_path, bootstrap=bootstrap,
                            save_topk=save_top, progress=speaks and not quiet)
            runs.append(Evaluator(cfg, reg, loaded=loaded))
    if download_only:
        if dry_run:
            raise CirbenchError("--download-only and --dry-run: give one of them")
        if speaks:
            fetch_all(_run_downloads(runs), "run")
        return
    for planned in runs:  # every benchmark's data and every plugin, before the first model is loaded
        planned.check()
    if dry_run:
        plan, unavailable = _plan(runs)
        if speaks:
            click.echo(plan)
        if unavailable:
            ctx.exit(1)  # the run itself would stop there
        return
    outcomes = []
    for number, planned in enumerate(runs, 1):
        if len(runs) > 1 and speaks and not quiet:  # which run the progress bars below belong to
            checked = planned.check()
            click.echo(f"[{number}/{len(runs)}] {checked.mspec.name} on {checked.dspec.name}/{checked.split}", err=True)
        outcomes += planned.run()
    distributed.shutdown()
    if not speaks:
        return
    for out in outcomes:
        shown = ", ".join(f"{k} {v:.2f}" for k, v in list(out.metrics.items())[:8])
        click.echo(f"{out.label}: {shown or 'no metrics (hidden targets)'}")
        click.echo(f"  result: {out.result_path}")
        for sub in out.submissions:
            click.echo(f"  submission: {sub}")
    scored = [o for o in outcomes if o.metrics]
    if scored:  # a report compares two runs of one benchmark
        same = [str(o.result_path) for o in scored if o.result_path.parent == scored[0].result_path.parent]
        click.echo(f"look at the queries: cirbench report {' '.join(same[:2])}")
    if not no_leaderboard and outcomes:
        from .leaderboard import build_tables, render_markdown, summary_table

        pairs = list(dict.fromkeys((o.record["dataset"]["name"], o.record["dataset"]["split"]) for o in outcomes))
        tables = build_tables(Path(output), datasets=pairs)
        if len(tables) > 1:  # several benchmarks: also the table across them
            tables.append(summary_table(tables))
        if tables:
            click.echo("")
            click.echo(render_markdown(tables))


@cli.command(epilog="\b\nExamples:\n  cirbench leaderboard\n  cirbench leaderboard results/ --no-paper --ci\n"
             "  cirbench leaderboard results/ --dataset circo --method 'slerp*' --format latex\n"
             "  cirbench leaderboard results/ --summary --format latex   # one table across benchmarks\n"
             "  cirbench leaderboard results/ --seeds   # mean ± sd over each label's training seeds")
@click.argument("results_dir", type=click.Path(file_okay=False), default="results")
@click.option("--dataset", default=None, help="Only this dataset.")
@click.option("--method", "methods", multiple=True, help="Only rows whose label matches (glob or substring; repeat).")
@click.option("--backbone", "backbones", multiple=True,
              help="Only rows whose backbone matches (glob or substring; ViT-B/32 and ViT-B-32 alike, any case).")
@click.option("--no-paper", is_flag=True, help="Leave out the published numbers.")
@click.option("--ci", is_flag=True, help="Show the 95% bootstrap confidence intervals recorded in result files.")
@click.option("--write/--no-write", default=True, show_default=True,
              help="Write leaderboard.md/.html/.tex and CSV files into RESULTS_DIR/leaderboard/.")
@click.option("--format", "fmt", type=click.Choice(["markdown", "csv", "html", "latex"]), default="markdown",
              show_default=True, help="What to print.")
@click.option("--all-metrics", is_flag=True, help="Also show breakdown metrics (e.g. CIRCO's per-aspect mAP@10).")
@click.option("--summary", is_flag=True,
              help="One table across benchmarks, as a paper's main table: each benchmark's published metrics as "
                   "columns (written as summary.md/.html/.tex/.csv).")
@click.option("--seeds", is_flag=True,
              help="One row per label whose runs differ only in --seed and in the trained weights (each training "
                   "seed's checkpoint, evaluated with one --label): mean ± standard deviation, with n.")
def leaderboard(results_dir, dataset, methods, backbones, no_paper, ci, write, fmt, all_metrics, summary, seeds):
    """Tables of all results under RESULTS_DIR: one per dataset/split, runs as rows (sorted by the dataset's
    main metric), metrics as columns.

    The best value of each column among the rows of the table's split is marked (bold in markdown, HTML and
    LaTeX, '*' in CSV). Published numbers appear as rows tagged "paper" (or "paper (test)" when the papers
    report another split).
    """
    from .leaderboard import RENDERERS, build_tables, summary_table, write_tables

    root = Path(results_dir)
    if not root.is_dir():
        raise CirbenchError(f"results folder {root} does not exist")
    tables = build_tables(root, include_paper=not no_paper, all_metrics=all_metrics,
                          datasets=None if dataset is None else [(dataset, None)], methods=list(methods) or None,
                          backbones=list(backbones) or None, seeds=seeds)
    if not tables:
        raise CirbenchError(f"no result files under {root}" + (" match the filters" if methods or backbones or dataset
                                                                  else ""))
    if summary:
        tables = [summary_table(tables)]
    if write:
        for path in write_tables(tables, root / "leaderboard", ci=ci, stem="summary" if summary else "leaderboard"):
            click.echo(f"wrote {path}", err=True)
    click.echo(RENDERERS[fmt](tables, ci))


def _option_rows(options) -> list[str]:
    rows = []
    for o in options:
        choices = f" [{'|'.join(o.choices)}]" if o.choices else ""
        sweep = " (sweepable: a:b:step or a,b,c)" if o.sweepable else ""
        flag = "--" + o.name.replace("_", "-")
        rows.append(f"    {flag} ({o.type}{choices}, default {o.describe_default()}): {o.help}{sweep}")
    return rows


@cli.command(epilog="\b\nExamples:\n  cirbench methods\n  cirbench methods --json")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def methods(as_json):
    """List the registered methods with their descriptions and options."""
    from .plugins import get_registry

    reg = get_registry(third_party=True)
    if as_json:
        click.echo(json.dumps({n: {"description": s.description, "plugin": s.plugin,
                                   "plugin_source": reg.source(s.plugin), "trainable": s.trainer is not None,
                                   "default_backbone": s.default_backbone, "default_preprocess": s.default_preprocess,
                                   "options": {o.name: {"type": o.type, "default": o.default,
                                                        "per_dataset": o.per_dataset, "help": o.help}
                                               for o in s.options},
                                   "train_options": {o.name: {"type": o.type, "default": o.default, "help": o.help}
                                                     for o in s.train_options}}
                               for n, s in sorted(reg.methods.items())}, indent=2, default=str))
        return
    for name, spec in sorted(reg.methods.items()):
        extra = " [trainable: cirbench train --method " + name + "]" if spec.trainer else ""
        click.echo(f"{name}  ({spec.plugin}){extra}\n  {spec.description}")
        if spec.default_backbone:
            click.echo(f"  default backbone: {spec.default_backbone[0]} / {spec.default_backbone[1]}, "
                       f"preprocessing: {spec.default_preprocess}")
        for row in _option_rows(spec.options):
            click.echo(row)
        if spec.train_options:
            click.echo(f"  training options (cirbench train --method {name}):")
            for row in _option_rows(spec.train_options):
                click.echo("  " + row)


@cli.command(epilog="\b\nExamples:\n  cirbench datasets\n  cirbench datasets --json")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def datasets(as_json):
    """List the registered datasets with their splits and options."""
    from .plugins import get_registry

    reg = get_registry(third_party=True)
    if as_json:
        click.echo(json.dumps({n: {"description": s.description, "plugin": s.plugin,
                                   "plugin_source": reg.source(s.plugin), "splits": s.splits,
                                   "hidden_splits": s.hidden_splits,
                                   "options": {o.name: {"type": o.type, "default": o.default, "help": o.help}
                                               for o in s.options}}
                               for n, s in sorted(reg.datasets.items())}, indent=2, default=str))
        return
    for name, spec in sorted(reg.datasets.items()):
        hidden = f" (hidden targets: {', '.join(spec.hidden_splits)})" if spec.hidden_splits else ""
        click.echo(f"{name}  ({spec.plugin})\n  {spec.description}\n  splits: {', '.join(spec.splits)}{hidden}")
        for row in _option_rows(spec.options):
            click.echo(row)


@cli.command(epilog="\b\nExamples:\n  cirbench plugins\n  CIRBENCH_LOAD_PLUGINS= cirbench plugins   # built-ins only")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plugins(as_json):
    """List loaded plugins: name, version, hooks, and what each registered."""
    from .plugins import get_registry

    rows = get_registry().plugin_rows()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        source = row.get("source") or {}
        where = f"{source['path']} (sha256 {source['sha256'][:12]})" if source.get("sha256") else row["version"]
        click.echo(f"{row['name']}  {where}")
        if row.get("error"):
            click.echo(f"  FAILED: {row['error']}")
            continue
        click.echo(f"  hooks: {', '.join(row['hooks']) or '-'}")
        if row["methods"]:
            click.echo(f"  methods: {', '.join(row['methods'])}")
        if row["datasets"]:
            click.echo(f"  datasets: {', '.join(row['datasets'])}")


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
             epilog="\b\nExamples:\n  cirbench score --dataset circo --split val submission_val.json\n"
             "  cirbench score -d cirr -s val recall.json --input subset=recall_subset.json --json\n"
             "  cirbench score -d circo -s test run.circo-test.json   # checks a test-server file\n"
             "  cirbench score -d fashioniq -s val --category dress dress-run.predictions.jsonl\n"
             "  cirbench score -d shapes -s val results/shapes/val/slerp@alpha=0.7__cirbench-shapes-clip-bundled"
             ".predictions.jsonl")
@click.option("--dataset", "-d", required=True, help="Dataset name.")
@click.option("--split", "-s", required=True, help="Split whose annotations score the file.")
@click.option("--data-root", type=click.Path(file_okay=False), default=None, help="Dataset root folder.")
@click.option("--input", "inputs", multiple=True, metavar="NAME=PATH",
              help="An extra file the dataset scores with the main one (`cirbench datasets` lists them, e.g. CIRR's "
                   "subset=recall_subset.json).")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as one JSON object.")
@click.argument("file")
@click.pass_context
def score(ctx, dataset, split, data_root, inputs, as_json, file):
    """Score a ranking FILE made by any code (official submission format, or per-query rankings), as the
    official scorer does; a file it would reject is refused with the reason.

    Dataset options follow as on `cirbench run` (--category dress, --task, --domain, --source/--target): they
    choose the queries the file must rank, before or after FILE.

    On a split whose targets are hidden (CIRCO test, CIRR test1) nothing can be scored here: the file is checked
    as the test server takes it, so that a submission is not wasted on a malformed file.

    Only the annotation files are needed, not the images.
    """
    from .plugins import get_registry
    from .types import resolve_options

    spec = get_registry().dataset(dataset)
    split = spec.resolve_split(split)
    # click hands FILE the first argument it does not know, which may be a dataset option: FILE is the one
    # argument that is neither an option nor an option's value
    positional, tokens = split_positional([file, *ctx.args], spec.options)
    if len(positional) != 1:
        raise CirbenchError("no ranking FILE given (see 'cirbench score --help')" if not positional else
                            f"unexpected argument {positional[1]!r}: score takes one ranking FILE")
    file = positional[0]
    if not Path(file).is_file():
        raise CirbenchError(f"ranking file {file} does not exist" if not Path(file).is_dir() else
                            f"ranking file {file} is a folder")
    given = declared_by(plugin_extras(tokens, [spec], ctx.command), spec)
    allowed = {o.name for o in spec.score_inputs}
    extra: dict[str, Path] = {}
    for item in inputs:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise CirbenchError(f"--input {item!r}: expected NAME=PATH")
        if name not in allowed:
            takes = ", ".join(sorted(allowed)) or "no extra inputs"
            raise CirbenchError(f"--input {name}: dataset {dataset} takes {takes}")
        if not Path(path).is_file():
            raise CirbenchError(f"--input {name}: file {path} does not exist")
        extra[name] = Path(path)
    opts = resolve_options(spec.options, given, spec.name, f"dataset {spec.name}")[0]
    ds = spec.create(data_root, opts)
    metrics = ds.score_file(split, Path(file), extra or None)
    if not metrics and split in spec.hidden_splits and not as_json:
        checked = " and ".join([file, *map(str, extra.values())])
        unchecked = [f"--input {o.name}=PATH" for o in spec.score_inputs if o.name not in extra]
        click.echo(f"{checked}: well-formed for the {dataset} test server ({split} targets are hidden, so only "
                   "the server can score it)" + (f"; not checked: {', '.join(unchecked)}" if unchecked else ""))
        return
    if as_json:
        click.echo(json.dumps(metrics))
        return
    width = max((len(k) for k in metrics), default=6)
    for key, value in metrics.items():
        click.echo(f"{key:<{width}}  {value:8.4f}")


def main() -> None:
    """Console entry point."""
    try:
        cli(prog_name="cirbench")
    except CirbenchError as exc:  # raised while loading plugins in strict mode
        _error(f"error: {exc}")
        sys.exit(exc.exit_code)


if __name__ == "__main__":  # pragma: no cover
    main()
