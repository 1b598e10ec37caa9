"""The CLI surface: every command's help ends with an example; errors are one line, exit 2."""

from __future__ import annotations

import json
import re
import socket
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from cirbench.cli import cli, parse_extra_options, split_positional
from cirbench.errors import CirbenchError, show_warnings_as_lines
from cirbench.feature_cache import CacheWarning
from cirbench.plugins import PluginWarning
from cirbench.types import OptionSpec, resolve_options


def _all_commands():
    ctx = cli.make_context("cirbench", [], resilient_parsing=True)
    return cli.list_commands(ctx)


def test_core_commands_are_present():
    assert {"run", "leaderboard", "methods", "datasets", "plugins", "score"} <= set(_all_commands())


@pytest.mark.parametrize("command", [None, *_all_commands()])
def test_every_help_ends_with_an_example(command):
    args = ["--help"] if command is None else [command, "--help"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    tail = res.output.strip().splitlines()
    example_at = max(i for i, line in enumerate(tail) if line.strip().startswith("Example"))
    assert all(line.strip().startswith("cirbench") or not line.strip() or line.startswith("    ")
               for line in tail[example_at + 1:]), res.output
    assert any("cirbench" in line for line in tail[example_at + 1:])
    # a line continuation written as one backslash in an epilog string joins two example lines, indentation and all
    assert not [line for line in tail[example_at + 1:] if re.search(r"\S {3,}--", line.strip())], res.output


def test_every_option_of_every_command_says_what_it_does():
    import click

    ctx = cli.make_context("cirbench", [], resilient_parsing=True)
    silent = []

    def walk(command, path):
        if isinstance(command, click.Group):
            for name in command.list_commands(ctx):
                walk(command.get_command(ctx, name), [*path, name])
            return
        silent.extend(f"{' '.join(path)} {p.opts[0]}" for p in command.params
                      if isinstance(p, click.Option) and not (p.help or "").strip())
        if not (command.help or "").strip():
            silent.append(" ".join(path))

    walk(cli, ["cirbench"])
    assert not silent, silent


def test_extra_options_parsing():
    assert parse_extra_options(["--alpha", "0.8", "--category=dress"]) == {"alpha": "0.8", "category": "dress"}
    assert parse_extra_options(["--lora-rank", "8"]) == {"lora_rank": "8"}
    assert parse_extra_options(["--alpha", "--category", "dress"]) == {"alpha": None, "category": "dress"}
    with pytest.raises(CirbenchError, match="unexpected argument"):
        parse_extra_options(["stray"])


def test_a_file_among_plugin_options_is_told_from_their_values():
    """score's FILE may stand before, between or after dataset options: an option takes the next argument as its
    value, a bool option only a bool word (so `--flag file` leaves the file positional)."""
    specs = [OptionSpec("category", "c", "str"), OptionSpec("flag", "f", "bool", False)]
    assert split_positional(["--category", "dress", "f.jsonl"], specs) == (["f.jsonl"], ["--category", "dress"])
    assert split_positional(["f.jsonl", "--category=dress"], specs) == (["f.jsonl"], ["--category=dress"])
    assert split_positional(["--flag", "f.jsonl", "--category", "x"], specs) == (
        ["f.jsonl"], ["--flag", "--category", "x"])
    assert split_positional(["--flag", "no", "f.jsonl"], specs) == (["f.jsonl"], ["--flag", "no"])
    assert split_positional(["--no-flag", "f.jsonl", "g"], specs) == (["f.jsonl", "g"], ["--no-flag"])
    assert parse_extra_options(split_positional(["--category", "dress", "f", "--flag"], specs)[1]) == {
        "category": "dress", "flag": None}


def test_a_bare_option_is_a_switch_for_bool_options_and_a_missing_value_otherwise():
    """A bare --name: true for a bool option; 'needs a value' for another known option; an unknown name is
    reported as unknown, with its closest match (a mistyped command option too), not as a missing value."""
    runner = CliRunner()
    res = runner.invoke(cli, ["run", "--dataset", "shapes", "--alpha"])
    assert res.exit_code == 2 and "error: option --alpha needs a value" in res.output, res.output
    res = runner.invoke(cli, ["run", "--dataset", "shapes", "--quiett"])
    assert res.exit_code == 2 and "unknown option --quiett" in res.output and "did you mean --quiet?" in res.output
    spec = OptionSpec("adaptive_ensemble", "a switch", "bool", False)
    assert resolve_options([spec], {"adaptive_ensemble": None}, None, "x") == [{"adaptive_ensemble": True}]
    assert resolve_options([spec], {"adaptive_ensemble": "false"}, None, "x") == [{"adaptive_ensemble": False}]


def test_cirbench_warnings_are_one_line_said_by_rank_0_alone(monkeypatch):
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # put back after the test
    show_warnings_as_lines()
    show_warnings_as_lines()  # installed once, however often the CLI starts in one process
    said = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("dropping shard x (bad header\nsecond line); recomputed", CacheWarning, stacklevel=1)
        warnings.warn("a library's own", UserWarning, stacklevel=1)
        said.append(warnings.formatwarning(caught[-2].message, CacheWarning, "f.py", 1))
        said.append(warnings.formatwarning(caught[-1].message, UserWarning, "f.py", 1))
        monkeypatch.setenv("RANK", "1")
        monkeypatch.setenv("WORLD_SIZE", "2")
        said.append(warnings.formatwarning(PluginWarning("said by every rank"), PluginWarning, "f.py", 1))
        monkeypatch.setenv("RANK", "0")
        said.append(warnings.formatwarning(PluginWarning("rank 0 says it"), PluginWarning, "f.py", 1))
    assert len(caught) == 2  # recorders (pytest.warns) still see every warning
    assert said[0] == "warning: dropping shard x (bad header\n"
    assert said[1].startswith("f.py:1: UserWarning: a library's own")  # other warnings keep Python's format
    assert said[2] == "" and said[3] == "warning: rank 0 says it\n"


def test_unknown_dataset_is_one_line_exit_2():
    res = CliRunner().invoke(cli, ["run", "--method", "image-only", "--dataset", "nope"])
    assert res.exit_code == 2
    assert res.output.strip().count("\n") == 0 and "unknown dataset 'nope'; valid:" in res.output


def test_errors_under_torchrun_say_which_rank_met_them():
    """Every rank that meets an error says it (a bad file may reach one rank alone): each line names its rank."""
    for env, prefix in (({"RANK": "1", "WORLD_SIZE": "2"}, "[rank 1] error: "), ({}, "error: ")):
        for args in (["run", "--method", "image-only", "--dataset", "nope"], ["run", "--workers", "-1"]):
            res = CliRunner(env=env).invoke(cli, args)
            assert res.exit_code == 2 and res.output.startswith(prefix) and res.output.count("\n") == 1, res.output


def test_unknown_names_suggest_the_closest_one():
    res = CliRunner().invoke(cli, ["run", "--method", "slerpp"])
    assert res.exit_code == 2 and "unknown method 'slerpp' (did you mean 'slerp'?); valid:" in res.output
    res = CliRunner().invoke(cli, ["data", "check", "--dataset", "cirrr"])
    assert res.exit_code == 2 and "did you mean 'cirr'?" in res.output


def test_an_unknown_option_names_the_closest_option_of_the_command_or_its_plugins(tmp_path):
    """Every extra option is checked against the methods' and the dataset's before anything runs, and a
    misspelt option of the command itself gets a hint; options are shown as typed (dashes)."""
    runner = CliRunner()
    cases = [(["run", "--batchsize", "3"], "unknown option --batchsize for methods slerp, image-only, text-only or "
              "dataset shapes (did you mean --batch-size?); valid: --alpha, --generator-seed"),
             (["run", "--method", "slerp", "--alpa", "0.5"], "(did you mean --alpha?)"),
             (["run", "--dataset", "fashioniq", "--categry", "dress"], "(did you mean --category?)"),
             (["train", "--method", "slerp-tat", "--corpus", str(tmp_path), "-o", str(tmp_path / "o"),
               "--lora_rnk", "2"], "unknown option --lora-rnk for training of slerp-tat (did you mean --lora-rank?)"),
             (["train", "--method", "slerp-tat", "--corpus", str(tmp_path), "-o", str(tmp_path / "o"),
               "--max-step", "2"], "(did you mean --max-steps?)"),
             (["data", "check", "--dataset", "circo", "--data-roots", str(tmp_path)], "(did you mean --data-root?)")]
    for args, message in cases:
        res = runner.invoke(cli, args)
        assert res.exit_code == 2 and message in res.output, res.output


def test_a_bare_no_flag_turns_off_the_bool_option_of_the_method_that_declares_it(tmp_path, monkeypatch):
    """In a run of several methods, --no-expand reaches the method that declares --expand (default on), and only
    it; a value after it, or --expand beside it, is a one-line error."""
    import json

    import torch

    from cirbench import Method, MethodSpec, OptionSpec, hookimpl
    from cirbench.plugins import get_registry, reset_registry

    class Flagged(Method):
        def compose(self, references, queries):
            return torch.nn.functional.normalize(references.float(), dim=-1)

    class FlaggedPlugin:
        @hookimpl
        def register_methods(self, register):
            register(MethodSpec(name="flagged", description="has a switch that is on", factory=Flagged,
                                options=(OptionSpec("expand", "a switch", "bool", True),)))

    monkeypatch.setenv("CIRBENCH_CACHE", str(tmp_path / "cache"))
    get_registry().register_plugin(FlaggedPlugin(), name="flagged-plugin")
    try:
        res = CliRunner().invoke(cli, ["run", "--method", "flagged,image-only", "--no-expand", "--output",
                                       str(tmp_path / "out"), "--bootstrap", "0", "--no-leaderboard", "--quiet"])
        assert res.exit_code == 0, res.output
        record = json.loads((tmp_path / "out/shapes/val/flagged__cirbench-shapes-clip-bundled.json").read_text())
        assert record["method"]["options"]["expand"] is False
        for args, message in ((["--no-expand", "yes"], "--no-expand takes no value"),
                              (["--no-expand", "--expand"], "--expand and --no-expand contradict each other")):
            res = CliRunner().invoke(cli, ["run", "--method", "flagged,image-only", *args])
            assert res.exit_code == 2 and message in res.output, res.output
    finally:
        reset_registry()


def test_the_readme_python_example_runs_as_written(tmp_path, monkeypatch):
    """README's "From Python" example, run as it stands (in a folder of its own: it writes results/)."""
    import contextlib
    import io

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### From Python", 1)[1].split("\n### ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
        exec(compile(code, "README.md", "exec"), {})
    lines = printed.getvalue().splitlines()
    assert [line.split()[0] for line in lines[:2]] == ["slerp@alpha=0.6", "slerp@alpha=0.8"], lines
    assert lines[2].startswith("val-0 ['square-"), lines
    assert sorted(p.name for p in (tmp_path / "results" / "shapes" / "val").glob("*.json")) == [
        "slerp@alpha=0.6__cirbench-shapes-clip-bundled.json", "slerp@alpha=0.8__cirbench-shapes-clip-bundled.json"]


def test_run_dry_run_checks_and_says_what_would_run_and_writes_nothing(tmp_path, tiny_config):
    """--dry-run: the checks of a real run (names, options, data), then the plan: results per method and
    benchmark, the backbone and where its weights would come from, counts; no model loaded, nothing written;
    exit 1 when the weights cannot be had here (the run would stop there), 2 for what the checks refuse."""
    out = tmp_path / "results"
    res = CliRunner().invoke(cli, ["run", "--dry-run", "--alpha", "0.6,0.8", "--output", str(out)])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0] == f"[1/3] slerp on shapes/val: 2 result(s) in {out / 'shapes' / 'val'}: slerp@alpha=0.6, " \
                       "slerp@alpha=0.8"
    assert "backbone cirbench-shapes-clip / bundled: weights bundled with cirbench" in lines[1]
    assert lines[2].strip() == "400 queries, 1,296 images"
    assert lines[-1].startswith("dry run: 4 result(s) planned") and not out.exists()

    res = CliRunner().invoke(cli, ["run", "--dry-run", "-m", "image-only", "--backbone", str(tiny_config),
                                   "--pretrained", str(tmp_path / "absent.safetensors"), "--output", str(out)])
    assert res.exit_code == 1 and "weights NOT AVAILABLE: weights file" in res.output, res.output
    assert f"not available here: the weights of {tiny_config} / " in res.output.splitlines()[-1]
    assert not out.exists()
    res = CliRunner().invoke(cli, ["run", "--dry-run", "-m", "image-only", "--backbone", str(tiny_config),
                                   "--pretrained", "no-such-tag", "--output", str(out)])
    assert res.exit_code == 2 and "unknown pretrained tag" in res.output, res.output


def test_dry_run_says_what_each_method_would_fetch(tmp_path, tiny_config, monkeypatch, endpoint):
    """Each method's declared downloads (MethodSpec.downloads): found in torch's hub cache, to download, or not
    available (no network here), or the option it cannot run without; an option that names the file fetches
    nothing. The declarations are the functions the methods fetch with (BASIC's files follow its switches)."""
    from cirbench.methods.basic_cir.model import downloads as basic_downloads
    from cirbench.methods.freedom.model import VOCABULARY_URL

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    base = ["run", "--dry-run", "--backbone", str(tiny_config), "--pretrained", "none", "--output", str(tmp_path / "o")]
    res = CliRunner().invoke(cli, [*base, "-m", "searle,pic2word"])
    assert res.exit_code == 1, res.output
    assert ("method file: NOT AVAILABLE: SEARLE publishes weights for ViT-B-32 and ViT-L-14 with OpenAI weights "
            "only; for cirbench-tiny-test/none pass --checkpoint") in res.output
    assert "method file: NOT AVAILABLE: it needs --checkpoint" in res.output
    assert res.output.splitlines()[-1].endswith("not available here: what searle, pic2word need (above)")
    res = CliRunner().invoke(cli, [*base, "-m", "context-i2w"])
    assert res.exit_code == 1 and res.output.splitlines()[-1].endswith("what context-i2w needs (above)"), res.output

    cached = tmp_path / "torch" / "hub" / "checkpoints" / VOCABULARY_URL.rsplit("/", 1)[-1]
    cached.parent.mkdir(parents=True)
    cached.write_text("cat\ndog\n")
    res = CliRunner().invoke(cli, [*base, "-m", "freedom"])
    assert res.exit_code == 0 and f"FREEDOM's vocabulary ({VOCABULARY_URL}): in the torch hub cache" in res.output
    res = CliRunner().invoke(cli, [*base, "-m", "freedom", "--vocabulary", str(cached)])
    assert res.exit_code == 0 and "method file" not in res.output, res.output

    # the language-model methods: the models they would load and the endpoints they would ask
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    res = CliRunner().invoke(cli, [*base, "-m", "cirevl"])
    assert res.exit_code == 1, res.output
    assert ("the captioner hf:Salesforce/blip2-flan-t5-xxl (for the texts not recorded yet; --generation replay needs "
            "none) (hf-model:Salesforce/blip2-flan-t5-xxl): NOT AVAILABLE: neither a local folder nor in the Hugging "
            "Face cache, and no network") in res.output
    assert "(openai-endpoint:https://api.openai.com/v1): NOT AVAILABLE: $OPENAI_API_KEY is not set" in res.output
    assert res.output.splitlines()[-1].endswith("; where there is a network, the same command with --download-only "
                                                 "fetches what needs one")
    local = tmp_path / "blip2"
    local.mkdir()
    res = CliRunner().invoke(cli, [*base, "-m", "cirevl", "--captioner", f"hf:{local}", "--llm-url", endpoint.url])
    assert res.exit_code == 0, res.output
    assert f"(hf-model:{local}): a local folder" in res.output
    assert f"(openai-endpoint:{endpoint.url}): its host answers" in res.output
    with socket.socket() as free:  # a port nothing listens on
        free.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{free.getsockname()[1]}/v1"
    res = CliRunner().invoke(cli, [*base, "-m", "osrcir", "--llm-url", closed])
    assert res.exit_code == 1 and f"(openai-endpoint:{closed}): NOT AVAILABLE: its host does not answer" in res.output
    res = CliRunner().invoke(cli, [*base, "-m", "ldre,osrcir", "--generation", "replay"])
    assert res.exit_code == 0 and "method file" not in res.output, res.output  # replay loads no model
    res = CliRunner().invoke(cli, [*base, "-m", "weimocir", "--beta", "0", "--captioner", "hf:Salesforce/blip2"])
    assert res.exit_code == 0 and "method file" not in res.output, res.output  # no captions: no captioner
    res = CliRunner().invoke(cli, [*base, "-m", "weimocir", "--captioner", f"hf-chat:{local}"])
    assert res.exit_code == 0 and f"the captioner hf-chat:{local} (for the texts" in res.output, res.output

    official = basic_downloads({}, "ViT-L-14", "openai")
    assert [what for what, _ in official] == ["BASIC's object names", "BASIC's style words", "BASIC's LAION-1M mean",
                                              "BASIC's synthetic normalisation features"]
    assert [w for w, _ in basic_downloads({"normalize": False, "project": False}, "ViT-L-14", "openai")] == [
        "BASIC's object names", "BASIC's LAION-1M mean"]
    with pytest.raises(CirbenchError, match="pass --synthetic-data FILE or --no-normalize"):
        basic_downloads({"laion_mean": False}, "ViT-B-32", "openai")


def test_training_into_another_methods_checkpoint_folder_is_refused(tmp_path):
    """`cirbench train --output` over a folder that holds another method's checkpoint is a one-line error before
    anything is read or written; the checkpoint stays as it was."""
    out = tmp_path / "runs" / "searle-b32"
    out.mkdir(parents=True)
    config = json.dumps({"method": "searle", "step": 300}).encode()
    (out / "config.json").write_bytes(config)
    (out / "model.safetensors").write_bytes(b"weights")
    res = CliRunner().invoke(cli, ["train", "--method", "pic2word", "--corpus", str(tmp_path / "none.csv"),
                                   "--output", str(out)])
    assert res.exit_code == 2, res.output
    assert res.output.strip() == f"error: {out} holds a 'searle' checkpoint; choose another --output for 'pic2word'"
    assert (out / "config.json").read_bytes() == config and sorted(p.name for p in out.iterdir()) == [
        "config.json", "model.safetensors"]


@pytest.mark.parametrize("args", [["methods"], ["datasets"]])
def test_output_to_a_reader_that_left_stops_quietly(args):
    """``cirbench methods | head -1``: the pipe closes under the listing; cirbench stops without an error line
    (it printed "error: Broken pipe") and with a non-zero status, as a command killed by SIGPIPE."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line
    try:
        out = subprocess.run([sys.executable, "-m", "cirbench", *args], stdout=write, stderr=subprocess.PIPE,
                             text=True, timeout=120)
    finally:
        os.close(write)
    assert out.returncode == 1 and out.stderr == "", out.stderr
