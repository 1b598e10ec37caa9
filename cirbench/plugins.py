"""The plugin manager: built-in plugins and entry-point plugins, registered through the same pluggy hooks.

Hooks are called through pluggy (``pm.subset_hook_caller``, one plugin at a time so that every registration
is attributed to its plugin): only functions decorated with ``cirbench.hookimpl`` are called, and pluggy's
ordering, wrappers and tracing apply.

Third-party plugins (entry-point group ``cirbench``) are loaded only when a command needs them: listings
(``methods``, ``datasets``, ``plugins``), a method or dataset name that no built-in plugin registers, or a
command name cirbench does not know. ``cirbench --help`` and runs of built-in methods on built-in datasets
never import them. Each one is loaded in isolation: an exception, ``sys.exit()`` or an import that does not
finish within ``CIRBENCH_PLUGIN_TIMEOUT`` seconds (default 30) disables that plugin with a warning.

Environment variables:

* ``CIRBENCH_STRICT_PLUGINS=1``: a plugin that fails to load, or registers a duplicate name, raises
  instead of warning (for plugin authors).
* ``CIRBENCH_LOAD_PLUGINS=name1,name2``: load only these third-party plugins (entry-point names);
  an empty value loads none. Built-ins always load.
* ``CIRBENCH_TRACE_PLUGINS=1``: print every hook call (pluggy's tracing) to stderr.
* ``CIRBENCH_PLUGINS=FILE.py:FOLDER:module``: plugins that are not installed (``os.pathsep``-separated), as the
  global option ``cirbench --plugin``: a ``.py`` file, a package folder, or an importable module's dotted name.

Local plugins (``--plugin``/``CIRBENCH_PLUGINS``) are what a researcher iterates on: a method in one file, run
without packaging it. They load right after the built-ins, always strictly (the user named them: a failure is an
error, never a warning), and every result file records where each plugin's code came from
(:meth:`Registry.source`): built-in, a distribution and its version, or a file and the sha256 of its code.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import pkgutil
import sys
import threading
import traceback
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import replace
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from . import hookspecs
from .errors import CirbenchWarning, PluginError, UnknownNameError
from .types import DatasetSpec, MethodSpec

ENTRY_POINT_GROUP = "cirbench"
LOCAL_PLUGINS_ENV = "CIRBENCH_PLUGINS"

# Built-in plugins: every subpackage of these packages (names starting with "_" are shared code, not plugins),
# registered through the same hooks as third-party plugins. A subpackage's __init__ holds the light
# registration; heavy code is imported lazily.
BUILTIN_PACKAGES = ("cirbench.methods", "cirbench.datasets")
REGISTER_HOOKS = (("register_methods", "methods", MethodSpec), ("register_datasets", "datasets", DatasetSpec))


def builtin_plugin_modules() -> list[str]:
    """Module names of the built-in plugins (found by listing the built-in packages, not importing them)."""
    names = []
    for package_name in BUILTIN_PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__):
            if info.ispkg and not info.name.startswith("_"):
                names.append(f"{package_name}.{info.name}")
    return sorted(names)


class PluginWarning(CirbenchWarning):
    """A plugin failed to load or registered a name that was taken; the rest still works."""


_forced_strict = 0  # > 0 while loading a plugin the user named: its problems are errors


def _strict() -> bool:
    return _forced_strict > 0 or os.environ.get("CIRBENCH_STRICT_PLUGINS", "").strip().lower() in {"1", "true", "yes"}


@contextlib.contextmanager
def _strictly() -> Iterator[None]:
    global _forced_strict
    _forced_strict += 1
    try:
        yield
    finally:
        _forced_strict -= 1


def _problem(message: str, exc: BaseException | None = None) -> None:
    if _strict():
        raise PluginError(message) from exc
    warnings.warn(message, PluginWarning, stacklevel=3)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({exc.code!r})"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _load_isolated(ep, timeout: float) -> Any:
    """``ep.load()`` in a daemon thread: any exception (``SystemExit`` included) or a hang is reported, never
    propagated into cirbench."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["plugin"] = ep.load()
        except BaseException as exc:  # noqa: BLE001 - SystemExit and friends are the plugin's failure
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name=f"cirbench-plugin-{ep.name}")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"importing it did not finish within {timeout:g} s (CIRBENCH_PLUGIN_TIMEOUT)")
    if "error" in result:
        raise result["error"]
    return result["plugin"]


_cli_local_specs: list[str] = []  # what `cirbench --plugin` named (the option's callback fills it)
_local_modules: set[str] = set()  # sys.modules names of the local plugin files imported (reset_registry drops them)
_local_paths: list[str] = []  # the folders of local plugin files put on sys.path (reset_registry takes them off)


def add_local_plugins(specs: Iterable[str]) -> None:
    """Plugins named on the command line (``cirbench --plugin``), loaded with the built-ins by
    :func:`get_registry` (before those of ``CIRBENCH_PLUGINS``)."""
    for spec in specs:
        if spec not in _cli_local_specs:
            _cli_local_specs.append(spec)


def local_plugin_specs() -> list[str]:
    """The local plugins to load: ``cirbench --plugin`` values, then ``CIRBENCH_PLUGINS``'s."""
    from_env = [s.strip() for s in os.environ.get(LOCAL_PLUGINS_ENV, "").split(os.pathsep) if s.strip()]
    return list(dict.fromkeys([*_cli_local_specs, *from_env]))


def _is_path(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or os.sep in spec or Path(spec).expanduser().exists()


def code_digest(location: Path) -> str:
    """sha256 of a plugin's code: a file's bytes, or a package folder's ``.py`` files (relative names and bytes,
    in sorted order; caches and data files left out)."""
    h = hashlib.sha256()
    if location.is_dir():
        for file in sorted(f for f in location.rglob("*.py") if "__pycache__" not in f.parts):
            h.update(file.relative_to(location).as_posix().encode() + b"\0")
            h.update(file.read_bytes() + b"\0")
    else:
        h.update(location.read_bytes())
    return h.hexdigest()


def _where(exc: BaseException, location: Path) -> str:
    """`` (file.py:LINE)``: the innermost frame of the plugin's own code in ``exc``'s traceback, if any."""
    if isinstance(exc, SyntaxError) or exc.__traceback__ is None:
        return ""  # a SyntaxError's message names the file and line already
    root = location if location.is_dir() else location.parent
    inside = [f for f in traceback.extract_tb(exc.__traceback__)
              if Path(f.filename).resolve().is_relative_to(root.resolve())]
    return f" ({Path(inside[-1].filename).name}:{inside[-1].lineno})" if inside else ""


def shadowed_module(name: str, entry: Path | None = None) -> str | None:
    """Where an importable module named ``name`` lives (its file, or "built-in"), unless it is ``entry`` itself:
    a plugin file loaded under that name would take its place for every later ``import name`` (a ``torch.py``
    plugin would be what cirbench gets for torch). None when no such module is installed; a namespace package
    (a bare folder on the path) is no module to shadow."""
    try:
        found = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if found is None or found.origin is None:
        return None
    if found.has_location and entry is not None and Path(found.origin).resolve() == entry.resolve():
        return None
    return found.origin if found.has_location else "built-in"


def _import_local(spec: str) -> tuple[str, ModuleType, dict[str, Any]]:
    """Import the local plugin ``spec`` (a ``.py`` file, a package folder or a module's dotted name): its plugin
    name, module and source (what results record). PluginError, in one line, when it cannot be."""
    if not _is_path(spec):
        try:
            module = importlib.import_module(spec)
        except BaseException as exc:  # noqa: BLE001 - SystemExit included: the plugin's failure
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise PluginError(f"plugin '{spec}' failed to import: {_describe(exc)}") from None
        source: dict[str, Any] = {"kind": "module", "module": spec}
        if file := getattr(module, "__file__", None):
            location = Path(file).parent if Path(file).name == "__init__.py" else Path(file)
            source.update(path=str(location), sha256=code_digest(location))
        top = spec.partition(".")[0]
        dists = importlib.metadata.packages_distributions().get(top) or []
        if dists:
            source["distribution"] = f"{dists[0]} {importlib.metadata.version(dists[0])}"
        return spec, module, source
    path = Path(spec).expanduser()
    if not path.exists():
        raise PluginError(f"plugin {spec}: no such file or folder")
    path = path.resolve()
    if path.is_dir():
        if not (path / "__init__.py").is_file():
            raise PluginError(f"plugin {spec}: a folder without __init__.py is not a Python package")
        name, entry, search = path.name, path / "__init__.py", [str(path)]
    elif path.suffix != ".py":
        raise PluginError(f"plugin {spec}: neither a .py file nor a package folder")
    else:
        name, entry, search = path.stem, path, None
    if not name.isidentifier():
        raise PluginError(f"plugin {spec}: '{name}' is not a Python module name (letters, digits, _): rename it")
    if (old := sys.modules.get(name)) is not None:
        if getattr(old, "__file__", None) == str(entry):  # loaded already (another registry, same process)
            return name, old, {"kind": "file", "path": str(path), "sha256": code_digest(path)}
        raise PluginError(f"plugin {spec}: a module named '{name}' is imported already "
                          f"(from {getattr(old, '__file__', None) or 'built-in'}): rename the plugin")
    if (other := shadowed_module(name, entry)) is not None:
        raise PluginError(f"plugin {spec}: a module named '{name}' is installed already (at {other}): loaded under "
                          "that name the plugin would stand in for it; rename the plugin")
    module_spec = importlib.util.spec_from_file_location(name, entry, submodule_search_locations=search)
    if module_spec is None or module_spec.loader is None:
        raise PluginError(f"plugin {spec}: Python cannot load it as a module")
    module = importlib.util.module_from_spec(module_spec)
    # importable by its name, so that lazy "name:Class" factories and its neighbours' imports resolve
    sys.modules[name] = module
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))
        _local_paths.append(str(path.parent))
    try:
        module_spec.loader.exec_module(module)
    except BaseException as exc:  # noqa: BLE001
        sys.modules.pop(name, None)
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise PluginError(f"plugin {spec} failed to load: {_describe(exc)}{_where(exc, path)}") from None
    _local_modules.add(name)
    return name, module, {"kind": "file", "path": str(path), "sha256": code_digest(path)}


class Registry:
    """All registered methods and datasets, and the pluggy manager that produced them."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("cirbench")
        self.pm.add_hookspecs(hookspecs)
        if os.environ.get("CIRBENCH_TRACE_PLUGINS", "").strip() not in ("", "0"):
            self.pm.trace.root.setwriter(lambda text: sys.stderr.write(f"[cirbench plugins] {text}"))
            self.pm.enable_tracing()
        self.methods: dict[str, MethodSpec] = {}
        self.datasets: dict[str, DatasetSpec] = {}
        self.failed: dict[str, str] = {}
        self.sources: dict[str, dict[str, Any]] = {}  # plugin name -> where its code comes from (see source())
        self._local_loaded: set[str] = set()
        self._order: list[Any] = []  # registration order: built-ins first, so a clash keeps the built-in
        self.third_party_loaded = False

    # -- loading ---------------------------------------------------------------------------------
    def load_builtins(self) -> None:
        for module_name in builtin_plugin_modules():
            try:
                module = importlib.import_module(module_name)
            except Exception as exc:  # noqa: BLE001 - a broken built-in must not break the CLI
                self.failed[module_name] = _describe(exc)
                _problem(f"built-in plugin {module_name} failed to load: {_describe(exc)}", exc)
                continue
            self._register(module, module_name)

    def load_third_party(self) -> None:
        """Load the entry-point plugins (once) and collect what they register."""
        if self.third_party_loaded:
            return
        self.third_party_loaded = True
        selected = os.environ.get("CIRBENCH_LOAD_PLUGINS")
        wanted = None if selected is None else {s.strip() for s in selected.split(",") if s.strip()}
        timeout = float(os.environ.get("CIRBENCH_PLUGIN_TIMEOUT", "30"))
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if (wanted is not None and ep.name not in wanted) or self.pm.get_plugin(ep.name) is not None:
                continue
            try:
                plugin = _load_isolated(ep, timeout)
            except BaseException as exc:  # noqa: BLE001 - one broken plugin must not break the others
                self.failed[ep.name] = _describe(exc)
                _problem(f"plugin '{ep.name}' ({ep.value}) failed to load: {_describe(exc)}", exc)
                continue
            if self._register(plugin, ep.name) and ep.dist is not None:
                self.sources[ep.name] = {"kind": "distribution", "distribution": ep.dist.name,
                                         "version": ep.dist.version}
                self._collect(only=plugin)

    def load_local(self, specs: Iterable[str]) -> None:
        """Load the local plugins ``specs`` (see :func:`local_plugin_specs`) not loaded yet, strictly: a plugin
        that fails to import, implements an unknown hook or registers a name that is taken raises PluginError."""
        for spec in specs:
            if spec in self._local_loaded:
                continue
            self._local_loaded.add(spec)
            with _strictly():
                name, module, source = _import_local(spec)
                if self.pm.has_plugin(name):
                    if self.sources.get(name) == source:
                        continue  # the same code named twice (a path and its CIRBENCH_PLUGINS twin)
                    raise PluginError(f"plugin {spec}: a plugin named '{name}' is loaded already: rename one")
                self._register(module, name)
                self.sources[name] = source
                self._collect(only=module)

    def _register(self, plugin: Any, name: str) -> bool:
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except Exception as exc:  # noqa: BLE001
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            self.failed[name] = _describe(exc)
            what = "implements an unknown hook" if isinstance(exc, pluggy.PluginValidationError) else "failed"
            _problem(f"plugin '{name}' {what}: {_describe(exc)}", exc)
            return False
        self._order.append(plugin)
        return True

    def register_plugin(self, plugin: Any, name: str | None = None) -> None:
        """Register an in-process plugin object (tests, notebooks) and collect what it registers."""
        self.pm.register(plugin, name=name)
        self.pm.check_pending()
        self._order.append(plugin)
        self.sources[self.pm.get_name(plugin) or repr(plugin)] = {"kind": "in-process"}
        self._collect(only=plugin)

    # -- calling hooks, attributed to their plugin --------------------------------------------------
    def call(self, plugin: Any, hook_name: str, **kwargs: Any) -> None:
        """Call ``hook_name`` on one plugin through pluggy; a failure disables that plugin with a warning."""
        if not any(impl.plugin is plugin for impl in getattr(self.pm.hook, hook_name).get_hookimpls()):
            return
        pname = self.pm.get_name(plugin) or repr(plugin)
        caller = self.pm.subset_hook_caller(hook_name, remove_plugins=[p for p in self._order if p is not plugin])
        try:
            caller(**kwargs)
        except PluginError:
            raise
        except BaseException as exc:  # noqa: BLE001 - SystemExit included: the plugin's failure, not cirbench's
            if isinstance(exc, KeyboardInterrupt):
                raise
            self.failed[pname] = _describe(exc)
            _problem(f"plugin '{pname}' failed in {hook_name}: {_describe(exc)}", exc)

    def _collect(self, only: Any = None) -> None:
        for plugin in [only] if only is not None else list(self._order):
            pname = self.pm.get_name(plugin) or repr(plugin)
            for hook_name, attr, expected in REGISTER_HOOKS:
                store = getattr(self, attr)

                def register(spec, _store=store, _expected=expected, _pname=pname):
                    if not isinstance(spec, _expected):
                        _problem(f"plugin '{_pname}' registered a {type(spec).__name__}, not a {_expected.__name__}")
                        return
                    try:
                        spec.validate(_pname)
                    except PluginError as exc:
                        _problem(str(exc), exc)
                        return
                    if spec.name in _store:
                        _problem(f"plugin '{_pname}' registers {_expected.__name__[:-4].lower()} '{spec.name}', "
                                 f"already registered by '{_store[spec.name].plugin}'"
                                 + ("" if _strict() else "; keeping the first"))
                        return
                    _store[spec.name] = replace(spec, plugin=_pname)

                self.call(plugin, hook_name, register=register)

    # -- queries ---------------------------------------------------------------------------------
    def method(self, name: str) -> MethodSpec:
        if name not in self.methods:
            self.load_third_party()
        if name not in self.methods:
            raise UnknownNameError("method", name, list(self.methods))
        return self.methods[name]

    def dataset(self, name: str) -> DatasetSpec:
        if name not in self.datasets:
            self.load_third_party()
        if name not in self.datasets:
            raise UnknownNameError("dataset", name, list(self.datasets))
        return self.datasets[name]

    def source(self, plugin: str) -> dict[str, Any]:
        """Where ``plugin``'s code comes from, as result files record it: ``{"kind": "built-in"}`` (cirbench's
        version and git revision say the rest), ``{"kind": "distribution", "distribution", "version"}`` (an
        entry point), ``{"kind": "file", "path", "sha256"}`` (``--plugin FILE.py`` or a package folder),
        ``{"kind": "module", "module", "path", "sha256"[, "distribution"]}`` (``--plugin dotted.name``) or
        ``{"kind": "in-process"}`` (registered by Python code, as tests do)."""
        if plugin in self.sources:
            return dict(self.sources[plugin])
        return {"kind": "built-in"} if plugin.startswith("cirbench.") else {"kind": "unknown"}

    def plugin_rows(self) -> list[dict[str, Any]]:
        """One row per loaded plugin: name, version, hooks, and what it registered."""
        self.load_third_party()
        rows = []
        for plugin in self._order:
            name = self.pm.get_name(plugin) or repr(plugin)
            hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
            source = self.source(name)
            rows.append(
                {
                    "name": name,
                    "version": describe_source(source) if source["kind"] in ("distribution", "built-in") else "",
                    "source": source,
                    "hooks": hooks,
                    "methods": sorted(m for m, s in self.methods.items() if s.plugin == name),
                    "datasets": sorted(d for d, s in self.datasets.items() if s.plugin == name),
                }
            )
        for name, why in self.failed.items():
            rows.append({"name": name, "version": "", "hooks": [], "methods": [], "datasets": [], "error": why})
        return rows


_registry: Registry | None = None


def get_registry(refresh: bool = False, third_party: bool = False) -> Registry:
    """The process-wide registry with the built-in plugins (and, with ``third_party``, the entry-point ones;
    they are otherwise loaded on first need)."""
    global _registry
    if _registry is None or refresh:
        reg = Registry()
        reg.load_builtins()
        reg._collect()
        _registry = reg
    _registry.load_local(local_plugin_specs())
    if third_party:
        _registry.load_third_party()
    return _registry


def describe_source(source: dict[str, Any] | None) -> str:
    """A recorded plugin source (:meth:`Registry.source`) in a few words: ``my_method.py sha256 52fb883c04a9``,
    ``cirbench-example-plugin 0.1.0``, ``built-in``."""
    if not source:
        return "not recorded"
    if source.get("sha256"):  # the file's name (its folder is in the record): the digest must fit the line
        return f"{source.get('module') or Path(str(source.get('path'))).name} sha256 {source['sha256'][:12]}"
    if source.get("kind") == "distribution":
        return f"{source.get('distribution')} {source.get('version')}"
    return str(source.get("kind"))


def blame(exc: BaseException) -> str | None:
    """Which plugin that cirbench does not ship raised ``exc``: ``plugin 'name' at file.py:LINE in function`` for
    the innermost frame of its code on the traceback (a method's ``compose`` that fails deep inside torch is
    still the plugin's line), or None when no such plugin's code is on it."""
    if _registry is None:
        return None
    owners: dict[str, str] = {}  # top-level module name -> plugin name
    for plugin in _registry._order:
        name = _registry.pm.get_name(plugin)
        module = plugin.__name__ if isinstance(plugin, ModuleType) else type(plugin).__module__
        top = module.partition(".")[0]
        if name and top != "cirbench":
            owners[top] = name
    found = None
    tb = exc.__traceback__
    while tb is not None:
        top = str(tb.tb_frame.f_globals.get("__name__", "")).partition(".")[0]
        if top in owners:
            found = (owners[top], tb.tb_frame.f_code, tb.tb_lineno)
        tb = tb.tb_next
    if found is None:
        return None
    name, code, line = found
    return f"plugin '{name}' at {Path(code.co_filename).name}:{line} in {code.co_name}"


def reset_registry() -> None:
    """Forget the loaded registry and the ``--plugin`` values (tests use this after changing plugins or
    environment)."""
    global _registry
    _registry = None
    _cli_local_specs.clear()
    for name in [m for m in sys.modules if m in _local_modules or m.partition(".")[0] in _local_modules]:
        del sys.modules[name]  # a later registry imports its files afresh (tests write one per test)
    _local_modules.clear()
    for folder in _local_paths:  # else a later plugin of a name seen before would find its file "installed"
        if folder in sys.path:
            sys.path.remove(folder)
    _local_paths.clear()


def register_commands(cli: Any, plugins: Iterable[Any] | None = None) -> None:
    """Let the loaded plugins (or only ``plugins``) add their click commands to ``cli``. A command under a name
    that is taken (one of cirbench's, or an earlier plugin's) is refused and the first kept: a plugin may add
    commands, never stand in for one (an error for a plugin the user named with --plugin, else a warning)."""
    reg = get_registry()
    for plugin in list(reg._order) if plugins is None else list(plugins):
        before = dict(cli.commands)
        reg.call(plugin, "register_commands", cli=cli)
        pname = reg.pm.get_name(plugin) or repr(plugin)
        for name, command in before.items():
            if cli.commands.get(name) is not command:
                cli.commands[name] = command
                local = reg.sources.get(pname, {}).get("kind") in ("file", "module")
                with _strictly() if local else contextlib.nullcontext():
                    _problem(f"plugin '{pname}' registers command '{name}', which cirbench has already"
                             + ("" if _strict() else "; keeping the first"))


__all__ = ["Registry", "get_registry", "reset_registry", "ENTRY_POINT_GROUP", "LOCAL_PLUGINS_ENV",
           "add_local_plugins", "local_plugin_specs", "blame", "describe_source", "builtin_plugin_modules",
           "code_digest", "register_commands", "shadowed_module"]
