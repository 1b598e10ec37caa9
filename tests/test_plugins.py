"""The plugin system: hooks documented, entry points loaded, broken plugins isolated, listings fast."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from cirbench import hookspecs, plugins
from cirbench.cli import cli
from cirbench.errors import CirbenchError
from cirbench.hookspecs import hookimpl
from cirbench.types import MethodSpec

REPO = Path(__file__).resolve().parent.parent


def _hookspecs():
    return [(n, f) for n, f in inspect.getmembers(hookspecs, inspect.isfunction)
            if hasattr(f, "cirbench_spec")]


def test_every_hookspec_is_documented_with_its_signature():
    specs = _hookspecs()
    assert {n for n, _ in specs} == {"register_methods", "register_datasets", "register_commands"}
    readme = (REPO / "README.md").read_text()
    for name, func in specs:
        assert func.__doc__ and len(func.__doc__.strip()) > 80, f"{name} needs a real docstring"
        signature = f"{name}{inspect.signature(func)}"
        assert signature in readme, f"README.md must document the hook as `{signature}`"


@pytest.fixture
def fake_entry_points(tmp_path, monkeypatch):
    """Install entry-point plugins from source written by the test (a dist-info folder on sys.path)."""

    def install(name: str, module_source: str) -> None:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(module_source))
        dist = tmp_path / f"{name}-0.1.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
        (dist / "entry_points.txt").write_text(f"[cirbench]\n{name} = {name}\n")

    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.reset_registry()
    yield install
    plugins.reset_registry()


GOOD = """
from cirbench.hookspecs import hookimpl
from cirbench.types import MethodSpec

@hookimpl
def register_methods(register):
    register(MethodSpec(name="good-method", description="from a plugin", factory="x:y"))
"""
BROKEN = "raise ImportError('this plugin is broken on purpose')\n"
DUPLICATE = """
from cirbench.hookspecs import hookimpl
from cirbench.types import MethodSpec

@hookimpl
def register_methods(register):
    register(MethodSpec(name="image-only", description="a clash", factory="x:y"))
    register(MethodSpec(name="dup-survivor", description="still registered", factory="x:y"))
"""
EXITS = "import sys\nsys.exit(3)\n"
HANGS = "import time\ntime.sleep(600)\n"
UNDECORATED = """
from cirbench.types import MethodSpec

def register_methods(register):  # no @hookimpl: pluggy must not call it
    register(MethodSpec(name="sneaky", description="d", factory="x:y"))
"""
MISSPELLED = """
from cirbench.hookspecs import hookimpl

@hookimpl
def register_method(register):
    pass
"""


def test_entry_point_plugin_is_loaded_and_listed(fake_entry_points):
    fake_entry_points("goodplugin", GOOD)
    res = CliRunner().invoke(cli, ["plugins", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.output)}
    assert rows["goodplugin"]["methods"] == ["good-method"]
    assert rows["goodplugin"]["version"] == "goodplugin 0.1"
    assert rows["goodplugin"]["hooks"] == ["register_methods"]
    assert "image-only" in rows["cirbench.methods.basic"]["methods"]


def test_broken_plugin_warns_and_everything_else_works(fake_entry_points):
    fake_entry_points("brokenplugin", BROKEN)
    fake_entry_points("goodplugin", GOOD)
    with pytest.warns(plugins.PluginWarning, match="brokenplugin.*broken on purpose"):
        reg = plugins.get_registry(third_party=True)
    assert "good-method" in reg.methods and "image-only" in reg.methods
    plugins.reset_registry()
    with pytest.warns(plugins.PluginWarning, match="brokenplugin"):
        res = CliRunner().invoke(cli, ["methods"])
    assert res.exit_code == 0 and "good-method" in res.output


def test_strict_mode_makes_a_broken_plugin_an_error(fake_entry_points, monkeypatch):
    fake_entry_points("brokenplugin", BROKEN)
    monkeypatch.setenv("CIRBENCH_STRICT_PLUGINS", "1")
    res = CliRunner().invoke(cli, ["methods"])
    assert res.exit_code == 2
    assert "brokenplugin" in res.output and "Traceback" not in res.output


def test_duplicate_name_is_refused_with_a_warning(fake_entry_points):
    fake_entry_points("dupplugin", DUPLICATE)
    with pytest.warns(plugins.PluginWarning, match="dupplugin.*image-only.*already registered"):
        reg = plugins.get_registry(third_party=True)
    assert reg.methods["image-only"].plugin == "cirbench.methods.basic"
    assert "dup-survivor" in reg.methods


def test_misspelled_hook_is_reported(fake_entry_points):
    fake_entry_points("typoplugin", MISSPELLED)
    with pytest.warns(plugins.PluginWarning, match="unknown hook"):
        plugins.get_registry(third_party=True)


def test_a_plugin_refused_for_an_unknown_hook_registers_nothing(fake_entry_points):
    """Its valid hooks are not called either, and it is not left registered, where it would fail the check of every
    plugin loaded after it."""
    fake_entry_points("halfplugin", MISSPELLED + GOOD.replace("good-method", "half-method"))
    fake_entry_points("goodplugin", GOOD)
    with pytest.warns(plugins.PluginWarning, match="plugin 'halfplugin' implements an unknown hook"):
        reg = plugins.get_registry(third_party=True)
    assert "half-method" not in reg.methods and reg.methods["good-method"].plugin == "goodplugin"
    assert set(reg.failed) == {"halfplugin"}  # no plugin loaded after it is blamed for its hook


def test_ctrl_c_in_a_plugins_hook_stops_the_command_rather_than_the_plugin():
    class Interrupted:
        @hookimpl
        def register_methods(self, register):
            raise KeyboardInterrupt

    reg = plugins.get_registry()
    with pytest.raises(KeyboardInterrupt):
        reg.register_plugin(Interrupted(), name="interrupted")
    plugins.reset_registry()


def test_load_plugins_env_selects_third_party_plugins(fake_entry_points, monkeypatch):
    fake_entry_points("goodplugin", GOOD)
    monkeypatch.setenv("CIRBENCH_LOAD_PLUGINS", "")
    reg = plugins.get_registry(third_party=True)
    assert "good-method" not in reg.methods and "image-only" in reg.methods
    plugins.reset_registry()
    monkeypatch.setenv("CIRBENCH_LOAD_PLUGINS", "goodplugin")
    assert "good-method" in plugins.get_registry(third_party=True).methods


def test_in_process_plugin_and_builtins_share_the_hooks():
    class Local:
        @hookimpl
        def register_methods(self, register):
            register(MethodSpec(name="local-method", description="d", factory="x:y"))

    reg = plugins.get_registry()
    try:
        reg.register_plugin(Local(), name="local")
        assert reg.methods["local-method"].plugin == "local"
        assert all(s.plugin.startswith("cirbench.") for n, s in reg.methods.items()
                   if n in ("image-only", "text-only"))
    finally:
        plugins.reset_registry()


@pytest.mark.parametrize("args", [["--help"], ["methods"], ["datasets"], ["plugins"], ["run", "--help"]])
def test_listing_commands_do_not_import_torch(args):
    code = (
        "import sys\n"
        "from cirbench.cli import cli\n"
        f"try:\n    cli.main({args!r}, prog_name='cirbench', standalone_mode=False)\n"
        "except SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'open_clip', 'pandas') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout[-2000:]


def test_example_plugin_is_installed_and_runs_through_the_loop(tmp_path, tiny_config, toy_root):
    """The tutorial plugin in examples/ (installed by .ci/run) is listed and runs through `cirbench run`."""
    pytest.importorskip("cirbench_example_plugin", reason="examples/cirbench-example-plugin is not installed")
    from helpers import registered
    from toy_plugin import ToyPlugin

    runner = CliRunner()
    with registered(ToyPlugin(), "toy"):
        res = runner.invoke(cli, ["plugins"])
        assert "weighted-sum" in res.output
        res = runner.invoke(cli, ["run", "--method", "weighted-sum", "--dataset", "toy", "--split", "val",
                                  "--backbone", str(tiny_config), "--pretrained", "none", "--data-root",
                                  str(toy_root), "--output", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c"),
                                  "--workers", "0", "--quiet", "--weight", "0,1"])
        assert res.exit_code == 0, res.output
    files = sorted(p.name for p in (tmp_path / "r" / "toy" / "val").glob("*.json"))
    assert files == ["weighted-sum@weight=0.0__cirbench-tiny-test-none.json",
                     "weighted-sum@weight=1.0__cirbench-tiny-test-none.json"]
    assert CliRunner().invoke(cli, ["hello-plugin"]).output.strip() == "hello from cirbench-example-plugin"


def test_option_names_of_cirbench_run_cannot_be_taken_by_plugins():
    """`run --seed` would hide a plugin option called seed (as it once hid the shapes generator seed)."""

    class Clash:
        @hookimpl
        def register_datasets(self, register):
            from cirbench.types import DatasetSpec, OptionSpec

            register(DatasetSpec(name="clash", description="d", factory="x:y", splits=("val",),
                                 options=(OptionSpec("seed", "hidden by run --seed", "int", 0),)))

    reg = plugins.get_registry()
    try:
        with pytest.warns(plugins.PluginWarning, match="--seed is an option of `cirbench run`"):
            reg.register_plugin(Clash(), name="clash")
        assert "clash" not in reg.datasets
        shapes_options = {o.name for o in reg.dataset("shapes").options}
        assert "generator_seed" in shapes_options and "seed" not in shapes_options
    finally:
        plugins.reset_registry()


def test_third_party_plugins_load_only_when_needed(fake_entry_points):
    fake_entry_points("goodplugin", GOOD)
    reg = plugins.get_registry()
    assert "good-method" not in reg.methods and not reg.third_party_loaded  # built-ins only so far
    assert reg.method("image-only").name == "image-only" and not reg.third_party_loaded
    assert reg.method("good-method").plugin == "goodplugin" and reg.third_party_loaded  # loaded on a miss


def test_a_plugin_that_exits_or_hangs_cannot_take_the_cli_down(fake_entry_points, monkeypatch):
    fake_entry_points("exitplugin", EXITS)
    fake_entry_points("hangplugin", HANGS)
    fake_entry_points("goodplugin", GOOD)
    monkeypatch.setenv("CIRBENCH_PLUGIN_TIMEOUT", "2")
    res = CliRunner().invoke(cli, ["--help"])
    assert res.exit_code == 0 and "run" in res.output  # never imported for --help
    with pytest.warns(plugins.PluginWarning) as caught:
        res = CliRunner().invoke(cli, ["methods"])
    assert res.exit_code == 0 and "good-method" in res.output and "image-only" in res.output
    messages = " ".join(str(w.message) for w in caught)
    assert "exitplugin" in messages and "sys.exit(3)" in messages
    assert "hangplugin" in messages and "did not finish within 2 s" in messages


def test_undecorated_hook_functions_are_not_called(fake_entry_points):
    fake_entry_points("undecorated", UNDECORATED)
    reg = plugins.get_registry(third_party=True)
    assert "sneaky" not in reg.methods


def test_plugin_import_errors_name_the_plugin(tmp_path):
    from cirbench.errors import PluginError
    from cirbench.types import MethodSpec

    spec = MethodSpec(name="needs-dep", description="d", factory="a_module_that_is_not_installed:Thing",
                      plugin="someplugin")
    with pytest.raises(PluginError, match="plugin 'someplugin': cannot import a_module_that_is_not_installed"):
        spec.load()


class _NotAMethod:
    def __init__(self, *args):
        self.args = args


def test_a_factory_that_makes_no_method_or_dataset_names_the_plugin(tmp_path):
    """A factory whose product is not a Method (Dataset) subclass: one line naming the plugin and the factory,
    where the loop would fail later on a missing attribute, in cirbench's code, as an internal error."""
    from cirbench.errors import PluginError
    from cirbench.types import DatasetSpec, MethodSpec

    method = MethodSpec(name="m", description="d", factory=_NotAMethod, plugin="mine")
    with pytest.raises(PluginError, match=r"^plugin 'mine': the factory of method 'm' \(_NotAMethod\) made a "
                                          r"_NotAMethod, not a cirbench.method.Method \(subclass it\)$"):
        method.create(None, {}, None)
    dataset = DatasetSpec(name="d", description="d", factory="builtins:slice", splits=("val",),
                          plugin="mine")
    with pytest.raises(PluginError, match=r"'d' \(builtins:slice\) made a slice, not a "
                                          r"cirbench.dataset.Dataset"):
        dataset.create(tmp_path, {})
    plugin = tmp_path / "fake.py"
    plugin.write_text(FAKE_FACTORY)
    res = CliRunner().invoke(cli, ["--plugin", str(plugin), "run", "-m", "fake", "-d", "shapes", "-q",
                                   "--no-leaderboard", "--output", str(tmp_path / "out")])
    assert res.exit_code == 2 and "internal error" not in res.output, res.output
    assert "plugin 'fake': the factory of method 'fake' (fake:Fake) made a Fake" in res.output


FAKE_FACTORY = """
from cirbench import hookimpl
from cirbench.types import MethodSpec


class Fake:
    def __init__(self, backbone, options, dataset):
        pass


@hookimpl
def register_methods(register):
    register(MethodSpec(name="fake", description="not a Method", factory="fake:Fake"))
"""


@pytest.mark.parametrize("change, said", [
    ({"name": "bad name!"}, "registers a dataset with an invalid name 'bad name!'"),
    ({"splits": ()}, "dataset 'd' declares no splits"),
    ({"splits": ("val", "")}, "dataset 'd' declares no splits"),
    ({"default_split": "train"}, "default split 'train' is not one of its splits"),
    ({"hidden_splits": ("test1",)}, "hides splits it does not have"),
    ({"paper_rows": ({"method": "x"},)}, "paper rows that are not PaperRow objects"),
    ({"paper_rows": "PAPER_ROW_OF_ANOTHER_SPLIT"}, "paper rows that are not PaperRow objects for one of its splits"),
    ({"options": "TWICE"}, "dataset 'd' declares an option twice"),
    ({"options": "RESERVED"}, "option --split is an option of"),
])
def test_a_malformed_dataset_spec_is_refused_naming_the_plugin(change, said):
    """What a third-party dataset plugin gets wrong in its spec is a PluginError naming the plugin, before any run."""
    from cirbench.errors import PluginError
    from cirbench.types import DatasetSpec, OptionSpec, PaperRow

    values = {"PAPER_ROW_OF_ANOTHER_SPLIT": (PaperRow("x", "ViT-B/32", "train", {"R@1": 1.0}, "a paper"),),
              "TWICE": (OptionSpec("k", "k", "int", 1), OptionSpec("k", "k", "int", 2)),
              "RESERVED": (OptionSpec("split", "s", "str", "val"),)}
    fields = {"name": "d", "description": "a dataset", "factory": "x:y", "splits": ("val", "test"),
              "hidden_splits": ("test",)}
    fields.update({k: values.get(v, v) if isinstance(v, str) else v for k, v in change.items()})
    with pytest.raises(PluginError, match=f"plugin 'mine'.*{re.escape(said)}"):
        DatasetSpec(**fields).validate("mine")


@pytest.mark.parametrize("raw, said", [
    ("0.1:0.5", "must be start:stop:step"),
    ("0.1:x:0.1", "must be numbers start:stop:step"),
    ("0.1:inf:0.1", "must be finite numbers"),
    ("0:1:0.00001", "has 100001 values (at most 10,001)"),
    ("0:2:0.5", "above its maximum"),
])
def test_malformed_sweeps_are_one_line_errors(raw, said):
    from cirbench.types import OptionSpec, expand_sweep

    alpha = OptionSpec("alpha", "weight", "float", 0.5, minimum=0.0, maximum=1.0, sweepable=True)
    with pytest.raises(CirbenchError, match=f"option --alpha: .*{re.escape(said)}"):
        expand_sweep(alpha, raw)


def test_hook_calls_can_be_traced(monkeypatch, capsys):
    monkeypatch.setenv("CIRBENCH_TRACE_PLUGINS", "1")
    plugins.reset_registry()
    try:
        plugins.get_registry()
    finally:
        plugins.reset_registry()
    assert "register_methods" in capsys.readouterr().err


def test_reserved_option_names_cover_every_option_of_cirbench_run():
    """The reserved list is written out (plugins are validated without importing the CLI); it must not fall
    behind the run command, or a plugin option would again be silently hidden by one of run's."""
    from cirbench.cli import command_option_names, run
    from cirbench.types import RESERVED_OPTION_NAMES

    own = set(command_option_names(run))
    assert {"bootstrap", "batch_size", "retrieval"} <= own <= RESERVED_OPTION_NAMES, sorted(own - RESERVED_OPTION_NAMES)


def test_every_built_in_integer_option_has_a_ceiling():
    """A size option without one took any value: '--layers 99999999999999999999' built layers until the memory ran
    out, '--num-queries' of that size overflowed inside torch. Seeds stop at the largest numpy accepts."""
    reg = plugins.get_registry()
    unbounded = [f"{spec.name} --{o.name}" for spec in [*reg.methods.values(), *reg.datasets.values()]
                 for o in [*spec.options, *(getattr(spec, "train_options", ()) or ())]
                 if o.type == "int" and (o.maximum is None or o.minimum is None)]
    assert unbounded == []


def test_every_builtin_plugin_registers_without_a_warning():
    """A built-in plugin that fails to register is only a warning for users (the CLI goes on without it): here
    it is a failure."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", plugins.PluginWarning)
        reg = plugins.Registry()
        reg.load_builtins()
        reg._collect()
    assert {"image-only", "text-only", "slerp", "slerp-tat", "pic2word", "searle", "searle-oti", "fti4cir", "lincir",
            "cirevl", "ldre", "seize"} <= set(reg.methods)
    assert {"cirr", "circo", "fashioniq", "genecis", "imagenet-r", "coco-object", "shapes"} <= set(reg.datasets)
    assert reg.methods["searle"].trainer and reg.methods["lincir"].trainer


def test_check_method_holds_for_the_built_in_methods_and_catches_what_breaks_the_contract(tmp_path):
    """cirbench.testing.check_method: the offline built-in methods pass, and so does a method that draws from
    torch's random state (the loop seeds it before each method, and encoding leaves it alone, so a draw does not
    depend on what ran or was cached before); a method whose rankings change from run to run, or that changes
    what methods share (here: the backbone's memoised text features), is caught and named, and so is one whose
    numbers depend on what ran before it in the command."""
    import os

    import torch

    from cirbench import Method, MethodSpec, hookimpl
    from cirbench.testing import check_method

    class Seeded(Method):
        def compose(self, references, queries):
            return torch.nn.functional.normalize(torch.randn(len(queries), references.shape[1]), dim=-1)

    class Restless(Method):
        def compose(self, references, queries):
            unseeded = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
            return torch.nn.functional.normalize(torch.randn(len(queries), references.shape[1], generator=unseeded),
                                                 dim=-1)

    class Poisoning(Method):
        def compose(self, references, queries):
            texts = [q.texts[0] for q in queries]
            feats = self.backbone.encode_text(texts)
            for text, feat in zip(texts, feats, strict=True):
                self.backbone._text_memo[text] = -feat  # what another method will read as this text's feature
            return references

    class Following(Method):
        def compose(self, references, queries):  # reads what the methods before it left in a shared memo
            shift = torch.zeros_like(references)
            shift[:, 0] = float(len(self.backbone._text_memo))
            return torch.nn.functional.normalize(references + shift, dim=-1)

    class Plugin:
        @hookimpl
        def register_methods(self, register):
            register(MethodSpec(name="following", description="depends on what ran before", factory=Following))
            register(MethodSpec(name="seeded", description="random queries, seeded", factory=Seeded))
            register(MethodSpec(name="restless", description="random queries", factory=Restless))
            register(MethodSpec(name="poisoning", description="spoils shared features", factory=Poisoning))

    reg = plugins.get_registry()
    try:
        reg.register_plugin(Plugin(), name="contract-breakers")
        for name in ("image-only", "text-only", "image-text-sum", "image-text-product", "weicom", "slerp", "seeded"):
            (outcome,) = check_method(name, tmp_path / name, registry=reg)
            assert outcome.metrics
        with pytest.raises(AssertionError, match="method 'restless' is not deterministic"):
            check_method("restless", tmp_path / "restless", registry=reg)
        with pytest.raises(AssertionError, match="method 'text-only' gives other numbers after method 'poisoning'"):
            check_method("poisoning", tmp_path / "poisoning", registry=reg)
        with pytest.raises(AssertionError, match="method 'following' gives other numbers when it follows method "
                                                 "'text-only' in one command"):
            check_method("following", tmp_path / "following", registry=reg)
    finally:
        plugins.reset_registry()


def test_every_builtin_method_and_dataset_is_documented():
    """Each built-in method and dataset has a row in README.md's tables, and each dataset a heading in
    datasets/README.md that names it (its expected files): a plugin added without them fails here."""
    import re

    readme = (REPO / "README.md").read_text()
    layouts = (REPO / "datasets" / "README.md").read_text()
    in_tables = {name for line in readme.splitlines() if line.startswith("| `")
                 for name in re.findall(r"`([^`]+)`", line.split("|")[1])}
    headings = " ".join(line for line in layouts.splitlines() if line.startswith("#"))
    reg = plugins.get_registry()
    builtin = [spec for spec in [*reg.methods.values(), *reg.datasets.values()]
               if spec.plugin.startswith("cirbench.")]
    assert len(builtin) > 20
    assert [s.name for s in builtin if s.name not in in_tables] == []
    assert [s.name for s in reg.datasets.values() if s.plugin.startswith("cirbench.")
            and not re.search(rf"(?<![\w-]){re.escape(s.name)}(?![\w-])", headings)] == []


# -- local plugins: `cirbench --plugin FILE.py|FOLDER|MODULE` and CIRBENCH_PLUGINS ------------------------------

LOCAL_METHOD = '''
"""A method in one file, not installed: image + beta * text."""
from cirbench import MethodSpec, OptionSpec, hookimpl


@hookimpl
def register_methods(register):
    register(MethodSpec(name="{name}", description="image + beta * text (a local plugin)",
                        factory="{module}:Sharp", options=(OptionSpec("beta", "text weight", "float", 1.0),)))


def _sharp():
    import torch

    from cirbench.method import Method

    class Sharp(Method):
        def compose(self, references, queries):
            text = self.backbone.encode_text([q.text for q in queries])
            return torch.nn.functional.normalize(references + self.options["beta"] * text, dim=-1)

    return Sharp


def __getattr__(name):  # the method class is built lazily: listing methods imports no torch
    if name == "Sharp":
        return _sharp()
    raise AttributeError(name)
'''


@pytest.fixture
def local_plugins():
    """Local plugins leave nothing behind: the registry, the --plugin values and the imported modules go."""
    yield
    plugins.reset_registry()


def _file(folder: Path, name: str, text: str = "") -> Path:
    (folder / name).write_text(text)
    return folder / name


def _folder(folder: Path, name: str) -> Path:
    (folder / name).mkdir()
    return folder / name


@pytest.mark.parametrize("make, said", [
    (lambda d: d / "missing.py", "no such file or folder"),
    (lambda d: _folder(d, "pkg"), "a folder without __init__.py is not a Python package"),
    (lambda d: _file(d, "notes.txt", "x"), "neither a .py file nor a package folder"),
    (lambda d: _file(d, "my-plugin.py"), "'my-plugin' is not a Python module name"),
    (lambda d: _file(d, "json.py"), "a module named 'json' is imported already"),
    (lambda d: _file(d, "broken_plugin.py", "import not_installed_anywhere\n"), "failed to load: ModuleNotFoundError"),
    (lambda d: "no_such_module_anywhere", "plugin 'no_such_module_anywhere' failed to import: ModuleNotFoundError"),
])
def test_a_local_plugin_that_cannot_be_loaded_is_one_line(tmp_path, local_plugins, make, said):
    """``--plugin`` with a path that is not there, a folder that is no package, a file that is no Python module or
    whose name clashes with an imported module, or code that fails to import: one line, exit 2, nothing run."""
    res = CliRunner().invoke(cli, ["--plugin", str(make(tmp_path)), "methods"])
    assert res.exit_code == 2 and said in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_plugin_file_runs_through_the_loop_and_results_record_its_code(tmp_path, tiny_config, toy_root,
                                                                         local_plugins):
    """`cirbench --plugin my_sharp.py run --method sharp` runs a method kept in one file (its lazy "module:Class"
    factory resolves to the file); the result records the file and the sha256 of its code; `reproduce` without
    the file says which to load, and with an edited file says the code changed."""
    from helpers import registered
    from toy_plugin import ToyPlugin

    plugin = tmp_path / "lab" / "my_sharp.py"
    plugin.parent.mkdir()
    plugin.write_text(LOCAL_METHOD.format(name="sharp", module="my_sharp"))

    def invoke(*args):
        with registered(ToyPlugin(), "toy"):
            return CliRunner().invoke(cli, list(args))

    res = invoke("--plugin", str(plugin), "plugins", "--json")
    assert res.exit_code == 0, res.output
    row = {r["name"]: r for r in json.loads(res.output)}["my_sharp"]
    assert row["methods"] == ["sharp"] and row["source"] == {"kind": "file", "path": str(plugin),
                                                            "sha256": _sha256(plugin)}
    res = invoke("--plugin", str(plugin), "methods", "--json")
    listed = json.loads(res.output)
    assert listed["sharp"]["plugin_source"] == row["source"]
    assert listed["slerp"]["plugin_source"] == {"kind": "built-in"}
    res = invoke("run", "--plugin", str(plugin), "--method", "sharp", "--beta", "2", "--dataset", "toy",
                 "--data-root", str(toy_root), "--backbone", str(tiny_config), "--pretrained", "none",
                 "--output", str(tmp_path / "out"), "--workers", "0", "--quiet", "--bootstrap", "0",
                 "--no-leaderboard")
    assert res.exit_code == 0, res.output
    (result,) = (tmp_path / "out" / "toy" / "val").glob("*.json")
    record = json.loads(result.read_text())
    assert record["method"]["plugin"] == "my_sharp" and record["method"]["options"] == {"beta": 2.0}
    assert record["method"]["plugin_source"] == {"kind": "file", "path": str(plugin), "sha256": _sha256(plugin)}

    again = ("reproduce", str(result), "--backbone", str(tiny_config), "--quiet")
    res = invoke(*again)
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert (f"method 'sharp' is not registered: the result was run with the plugin {plugin} (sha256 "
            f"{_sha256(plugin)[:12]}); load it with `cirbench --plugin {plugin} reproduce ...`") in res.output
    copy = tmp_path / "colleague" / "my_sharp.py"  # the same code elsewhere: no difference to tell
    copy.parent.mkdir()
    copy.write_bytes(plugin.read_bytes())
    res = invoke("--plugin", str(copy), *again)
    assert res.exit_code == 0 and "method plugin" not in res.output and "(identical)" in res.output, res.output
    plugins.reset_registry()
    before = _sha256(plugin)
    plugin.write_text(plugin.read_text() + "\n# edited\n")
    res = invoke("--plugin", str(plugin), *again)
    assert res.exit_code == 0, res.output
    assert (f"environment: method plugin my_sharp.py sha256 {before[:12]} -> my_sharp.py sha256 "
            f"{_sha256(plugin)[:12]}") in res.output
    assert "(identical)" in res.output


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("syntax.py", "x = (\n", "plugin {path} failed to load: SyntaxError: '(' was never closed (syntax.py, line 1)"),
    ("raises.py", "def f():\n    raise ValueError('bad config')\n\n\nf()\n",
     "plugin {path} failed to load: ValueError: bad config (raises.py:2)"),
    ("exits.py", "import sys\nsys.exit(3)\n", "plugin {path} failed to load: it called sys.exit(3) (exits.py:2)"),
    ("json.py", "", "plugin {path}: a module named 'json' is imported already"),
    ("my-plugin.py", "", "plugin {path}: 'my-plugin' is not a Python module name"),
    ("notes.txt", "", "plugin {path}: neither a .py file nor a package folder"),
    ("absent.py", None, "plugin {path}: no such file or folder"),
    ("takes_slerp.py", LOCAL_METHOD.format(name="slerp", module="takes_slerp"),
     "plugin 'takes_slerp' registers method 'slerp', already registered by 'cirbench.methods.slerp'"),
    ("typo_hook.py", "from cirbench import hookimpl\n\n\n@hookimpl\ndef register_method(register):\n    pass\n",
     "plugin 'typo_hook' implements an unknown hook"),
    ("no_spec.py", "from cirbench import hookimpl\n\n\n@hookimpl\ndef register_methods(register):\n"
                   "    register({'name': 'mine'})\n", "plugin 'no_spec' registered a dict, not a MethodSpec"),
])
def test_a_plugin_the_user_names_fails_with_one_line(tmp_path, local_plugins, name, text, expected):
    """A plugin named with --plugin is loaded strictly: whatever is wrong with it is an error line (exit 2),
    never a traceback, and never a warning followed by 'unknown method'."""
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    res = CliRunner().invoke(cli, ["--plugin", str(path), "methods"])
    assert res.exit_code == 2, res.output
    assert expected.format(path=path) in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1, res.output
    assert "; keeping the first" not in res.output  # strict: nothing was kept


def test_a_plugin_file_named_as_an_installed_module_is_refused(tmp_path, monkeypatch, local_plugins):
    """A plugin file named as a module that is installed but not imported yet (torch.py before torch is imported,
    as in every fresh `cirbench` process) would stand in for that module for every later import: refused in one
    line, the module left importable. A plugin file that is itself on the path (`python -m cirbench` in its
    folder) is no clash."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "lab_installed_mod.py").write_text("REAL = True\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "lab_installed_mod", raising=False)
    plugin = _file(_folder(tmp_path, "plugins"), "lab_installed_mod.py", LOCAL_METHOD.format(
        name="shadow", module="lab_installed_mod"))
    res = CliRunner().invoke(cli, ["--plugin", str(plugin), "methods"])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    assert res.output.strip() == (f"error: plugin {plugin}: a module named 'lab_installed_mod' is installed already "
                                  f"(at {site / 'lab_installed_mod.py'}): loaded under that name the plugin would "
                                  "stand in for it; rename the plugin")
    assert importlib.import_module("lab_installed_mod").REAL
    own = _file(tmp_path / "plugins", "lab_own_mod.py", LOCAL_METHOD.format(name="own", module="lab_own_mod"))
    monkeypatch.syspath_prepend(str(own.parent))
    res = CliRunner().invoke(cli, ["--plugin", str(own), "methods"])
    assert res.exit_code == 0 and "own" in res.output, res.output


COMMAND_PLUGIN = """
import click
from cirbench import hookimpl


@hookimpl
def register_commands(cli):
    @cli.command("hello-mine")
    def hello():
        \"\"\"Say hello.\"\"\"
        click.echo("hello mine")
{taken}
"""
STANDS_IN = """
    @cli.command("agree")
    def agree():
        \"\"\"Stands in for cirbench agree.\"\"\"
        click.echo("stood in")
"""


def test_a_plugin_command_never_stands_in_for_one_cirbench_has(tmp_path, local_plugins):
    """A plugin adds commands; one under a name cirbench has (its `agree`) silently replaced cirbench's. Refused:
    an error for a plugin the user named (--plugin), a warning for an installed one, cirbench's command kept."""
    import click

    def cirbench_in_a_process(plugin, *args):  # commands load once per process, as the CLI runs
        return subprocess.run([sys.executable, "-m", "cirbench", "--plugin", str(plugin), *args], capture_output=True,
                              text=True, timeout=120)

    adds = _file(tmp_path, "adds_cmd.py", COMMAND_PLUGIN.format(taken=""))
    out = cirbench_in_a_process(adds, "hello-mine")
    assert out.returncode == 0 and out.stdout == "hello mine\n", out.stderr
    takes = _file(tmp_path, "takes_cmd.py", COMMAND_PLUGIN.format(taken=STANDS_IN))
    out = cirbench_in_a_process(takes, "agree", "--help")
    assert out.returncode == 2 and "stood in" not in out.stdout, out.stdout
    assert (out.stdout + out.stderr).strip() == "error: plugin 'takes_cmd' registers command 'agree', which cirbench " \
                                                "has already"
    group = click.Group(commands=[click.Command("agree", help="cirbench's")])
    own = group.commands["agree"]
    namespace: dict = {}
    exec(COMMAND_PLUGIN.format(taken=STANDS_IN), namespace)  # noqa: S102 - the plugin's code, as an installed module
    plugin = type("Installed", (), {"register_commands": staticmethod(namespace["register_commands"])})()
    with pytest.warns(plugins.PluginWarning, match="plugin 'installed' registers command 'agree', which cirbench has "
                                                   "already; keeping the first"):
        plugins.get_registry().register_plugin(plugin, name="installed")
        plugins.register_commands(group, [plugin])
    assert group.commands["agree"] is own and "hello-mine" in group.commands


def test_plugin_folders_modules_and_the_environment_variable(tmp_path, monkeypatch, local_plugins):
    """A package folder (its factory in a submodule), a module's dotted name and CIRBENCH_PLUGINS all load;
    each records what its code is; the same plugin named twice loads once."""
    folder = tmp_path / "labpkg"
    folder.mkdir()
    (folder / "__init__.py").write_text(LOCAL_METHOD.format(name="sharp-pkg", module="labpkg.impl")
                                        .split("def _sharp")[0])
    (folder / "impl.py").write_text("from labpkg_helpers import Sharp  # noqa: F401\n")
    (tmp_path / "labpkg_helpers.py").write_text(
        "from cirbench.method import Method\n\n\nclass Sharp(Method):\n    pass\n")
    installed = tmp_path / "site"
    (installed / "lab_methods").mkdir(parents=True)
    (installed / "lab_methods" / "__init__.py").write_text("")
    (installed / "lab_methods" / "cir.py").write_text(LOCAL_METHOD.format(name="sharp-mod", module="x"))
    monkeypatch.syspath_prepend(str(installed))
    monkeypatch.setenv(plugins.LOCAL_PLUGINS_ENV, os.pathsep.join([str(folder), "lab_methods.cir", str(folder)]))

    reg = plugins.get_registry(refresh=True)
    assert {"sharp-pkg", "sharp-mod"} <= set(reg.methods)
    assert reg.methods["sharp-pkg"].plugin == "labpkg" and reg.methods["sharp-mod"].plugin == "lab_methods.cir"
    assert reg.source("labpkg") == {"kind": "file", "path": str(folder), "sha256": plugins.code_digest(folder)}
    assert reg.source("lab_methods.cir") == {"kind": "module", "module": "lab_methods.cir",
                                              "path": str(installed / "lab_methods" / "cir.py"),
                                              "sha256": _sha256(installed / "lab_methods" / "cir.py")}
    # the folder plugin's lazy factory imports its submodule, which imports a neighbour of the folder
    assert reg.methods["sharp-pkg"].load().__name__ == "Sharp"
    digest = plugins.code_digest(folder)
    (folder / "impl.py").write_text((folder / "impl.py").read_text() + "# edited\n")
    assert plugins.code_digest(folder) != digest  # a folder's digest covers every module in it
    res = CliRunner().invoke(cli, ["--plugin", str(folder), "plugins"])
    assert res.exit_code == 0, res.output
    assert f"labpkg  {folder} (sha256 " in res.output and res.output.count("labpkg  ") == 1


BUGGY_METHODS = '''
import itertools

from cirbench import MethodSpec, hookimpl
from cirbench.method import Method

_calls = itertools.count()


class Raises(Method):
    def compose(self, references, queries):
        return references @ "text"


class Drifts(Method):  # a state that outlives the run: the second run ranks otherwise
    def compose(self, references, queries):
        import torch

        turn = next(_calls)
        return torch.nn.functional.normalize(references + turn * self.backbone.encode_text(["x"]), dim=-1)


class Tunes(Method):  # adapts the shared backbone in place instead of a copy
    def compose(self, references, queries):
        self.backbone.model.logit_scale.data += 1
        return references


class Batchy(Method):  # centres each query on the batch it is composed in
    def compose(self, references, queries):
        import torch

        text = self.backbone.encode_text([q.text for q in queries])
        mixed = references + text - 0.5 * text.mean(0, keepdim=True)
        return torch.nn.functional.normalize(mixed, dim=-1)


@hookimpl
def register_methods(register):
    for name, cls in (("raises", Raises), ("drifts", Drifts), ("tunes", Tunes), ("batchy", Batchy)):
        register(MethodSpec(name=name, description="broken on purpose", factory=cls))
'''


def test_check_holds_a_plugin_file_to_the_contract(tmp_path, local_plugins):
    """`cirbench check` runs check_method's three checks, printing each as it holds; a method that raises, that
    ranks differently the second time, or that changes the shared backbone fails at the right check, with the
    plugin's file and line where the method's own code raised, and exit 1."""
    good = tmp_path / "sharp_ok.py"
    good.write_text(LOCAL_METHOD.format(name="sharp", module="sharp_ok"))
    res = CliRunner().invoke(cli, ["--plugin", str(good), "check", "--method", "sharp", "--beta", "0.5",
                                   "--keep", str(tmp_path / "kept")])
    assert res.exit_code == 0, res.output
    assert res.output.count("  ok    ") == 4 and "'sharp' keeps the contract" in res.output
    kept = json.loads(next((tmp_path / "kept" / "sharp" / "alone" / "toy" / "val").glob("*.json")).read_text())
    assert kept["method"]["options"] == {"beta": 0.5}

    plugins.reset_registry()
    broken = tmp_path / "broken_methods.py"
    broken.write_text(BUGGY_METHODS)
    res = CliRunner().invoke(cli, ["--plugin", str(broken), "check", "--method", "raises,drifts,tunes,batchy"])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    blocks = res.output.split("checking ")[1:]
    assert "FAIL  runs through the loop" in blocks[0] and (
        "TypeError: unsupported operand type(s) for @: 'Tensor' and 'str' (raised in plugin 'broken_methods' at "
        "broken_methods.py:12 in compose)") in blocks[0]
    assert "ok    runs through the loop" in blocks[1] and "FAIL  deterministic" in blocks[1]
    assert "method 'drifts' is not deterministic" in blocks[1]
    assert "FAIL  runs through the loop" in blocks[2] and "changed the backbone in place" in blocks[2]
    assert blocks[3].count("ok    ") == 3 and "FAIL  batch-independent" in blocks[3]
    assert "a query's features depend on the others composed with it" in blocks[3]
    assert "4 of 4 method(s) break the contract: raises, drifts, tunes, batchy" in res.output


def test_check_train_checks_a_trainable_method_with_weights_it_trained(tmp_path):
    """`cirbench check --method NAME --train` trains the method two steps on the toy corpus (its training options
    as in `cirbench train`), then runs the contract checks with that checkpoint; a method that cannot be trained
    fails the training check in one line."""
    res = CliRunner().invoke(cli, ["check", "--method", "pli", "--train", "--tune", "text", "--image-weight", "0.5",
                                   "--keep", str(tmp_path / "kept")])
    assert res.exit_code == 0, res.output
    assert res.output.count("  ok    ") == 5 and "  ok    trains: two steps on a toy corpus" in res.output
    trained = json.loads((tmp_path / "kept" / "pli" / "trained" / "config.json").read_text())
    assert trained["options"]["tune"] == "text" and trained["train"]["max_steps"] == 2
    kept = json.loads(next((tmp_path / "kept" / "pli" / "alone" / "toy" / "val").glob("*.json")).read_text())
    assert kept["method"]["options"]["image_weight"] == 0.5
    assert kept["method"]["info"]["checkpoint"] == str(tmp_path / "kept" / "pli" / "trained")
    res = CliRunner().invoke(cli, ["check", "--method", "slerp", "--train"])
    assert res.exit_code == 1 and "FAIL  trains" in res.output and "method 'slerp' is not trainable" in res.output
    res = CliRunner().invoke(cli, ["check", "--method", "pli", "--train", "--lora-rank", "4"])
    assert res.exit_code == 2 and "lora" in res.output and len(res.output.strip().splitlines()) == 1, res.output
    res = CliRunner().invoke(cli, ["check", "--dataset", "cirr", "--train"])
    assert res.exit_code != 0 and "--train is for the method checks" in res.output, res.output


def test_a_plugins_bug_names_the_plugin_and_its_line_not_an_internal_error(tmp_path, local_plugins):
    broken = tmp_path / "buggy_run.py"
    broken.write_text(BUGGY_METHODS)
    res = CliRunner().invoke(cli, ["--plugin", str(broken), "run", "--method", "raises", "--output",
                                   str(tmp_path / "out"), "--quiet", "--bootstrap", "0"])
    assert res.exit_code == 1
    assert res.output.strip() == ("error in plugin 'buggy_run' at buggy_run.py:12 in compose: TypeError: unsupported "
                                  "operand type(s) for @: 'Tensor' and 'str' (set CIRBENCH_DEBUG=1 for the traceback)")


def test_new_writes_plugins_that_keep_the_contract_as_written(tmp_path, monkeypatch, local_plugins):
    """`cirbench new method|dataset NAME` writes a file that `cirbench check` passes and `cirbench run` runs, with
    no edit; an existing file is never overwritten, a bad name is refused."""
    from cirbench.testing import write_tiny_config, write_toy_dataset

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    res = runner.invoke(cli, ["new", "method", "my-method"])
    assert res.exit_code == 0 and "wrote my_method.py" in res.output, res.output
    res = runner.invoke(cli, ["new", "dataset", "my-bench", "--output", "plugins/my_bench.py"])
    assert res.exit_code == 2 and "plugins is not a folder" in res.output
    (tmp_path / "plugins").mkdir()
    res = runner.invoke(cli, ["new", "dataset", "my-bench", "--output", "plugins/my_bench.py"])
    assert res.exit_code == 0, res.output
    before = (tmp_path / "my_method.py").read_text()
    res = runner.invoke(cli, ["new", "method", "my-method"])
    assert res.exit_code == 2 and "my_method.py exists already" in res.output
    assert (tmp_path / "my_method.py").read_text() == before
    for bad in ("My Method", "9lives", "x--y"):
        res = runner.invoke(cli, ["new", "method", bad])
        assert res.exit_code == 2 and "is no plugin name" in res.output, bad
    # a file `check` would refuse: a name taken, a module installed under the file's name (torch.py)
    res = runner.invoke(cli, ["new", "method", "slerp", "--output", "mine.py"])
    assert res.exit_code == 2 and "method 'slerp' is registered already (by cirbench.methods.slerp)" in res.output
    res = runner.invoke(cli, ["new", "method", "torch"])
    assert res.exit_code == 2 and "torch.py: a module named 'torch' is installed already" in res.output, res.output
    assert not (tmp_path / "mine.py").exists() and not (tmp_path / "torch.py").exists()
    res = runner.invoke(cli, ["new", "dataset", "slerp", "--output", "slerp_bench.py"])  # a method's name: free
    assert res.exit_code == 0, res.output

    res = runner.invoke(cli, ["--plugin", "my_method.py", "check", "--method", "my-method", "--weight", "0.5"])
    assert res.exit_code == 0 and "'my-method' keeps the contract" in res.output, res.output
    data = write_toy_dataset(tmp_path / "data")  # the template's layout: queries.json + images/
    res = runner.invoke(cli, ["--plugin", "plugins/my_bench.py", "check", "--dataset", "my-bench", "--data-root",
                              str(data)])
    assert res.exit_code == 0 and "'my-bench' keeps the contract" in res.output, res.output
    res = runner.invoke(cli, ["--plugin", "my_method.py", "--plugin", "plugins/my_bench.py", "run", "--method",
                              "my-method,image-only", "--dataset", "my-bench", "--data-root", str(data), "--backbone",
                              str(write_tiny_config(tmp_path)), "--pretrained", "none", "--workers", "0", "--quiet",
                              "--bootstrap", "0", "--no-leaderboard"])
    assert res.exit_code == 0, res.output
    record = json.loads(next((tmp_path / "results" / "my-bench" / "val").glob("my-method*.json")).read_text())
    assert set(record["metrics"]) == {"R@1", "R@5", "R@10", "mAP@10"} and record["counts"]["queries"] == 12
    assert record["dataset"]["plugin_source"]["path"] == str(tmp_path / "plugins" / "my_bench.py")
    (data / "queries.json").write_text('{"queries": []}')  # what the template refuses in one line
    res = runner.invoke(cli, ["--plugin", "plugins/my_bench.py", "run", "--dataset", "my-bench", "--data-root",
                              str(data), "--dry-run"])
    assert res.exit_code == 2 and "expected an object with 'gallery' and 'queries'" in res.output, res.output


def test_plugin_options_after_the_command_are_taken_as_the_global_one():
    """`cirbench run --plugin x.py --method mine` means what `cirbench --plugin x.py run --method mine` does (the
    method must be known before run reads --method); nothing after a bare `--` moves; no plugin may declare an
    option named `plugin`."""
    from cirbench.cli import hoist_plugin_options
    from cirbench.types import RESERVED_OPTION_NAMES

    assert hoist_plugin_options(["run", "--method", "m", "--plugin", "a.py", "--plugin=b.py", "-q"]) == [
        "--plugin", "a.py", "--plugin=b.py", "run", "--method", "m", "-q"]
    assert hoist_plugin_options(["run", "--", "--plugin", "a.py"]) == ["run", "--", "--plugin", "a.py"]
    assert hoist_plugin_options(["run", "--plugin"]) == ["run", "--plugin"]  # no value: click says so
    assert "plugin" in RESERVED_OPTION_NAMES
