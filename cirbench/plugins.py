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
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
import threading
import warnings
from dataclasses import replace
from importlib.metadata import entry_points
from typing import Any

import pluggy

from . import hookspecs
from .errors import CirbenchWarning, PluginError, UnknownNameError
from .types import DatasetSpec, MethodSpec

ENTRY_POINT_GROUP = "cirbench"

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


def _strict() -> bool:
    return os.environ.get("CIRBENCH_STRICT_PLUGINS", "").strip().lower() in {"1", "true", "yes"}


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
        self.distributions: dict[str, str] = {}  # plugin name -> "dist version"
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
                self.distributions[ep.name] = f"{ep.dist.name} {ep.dist.version}"
                self._collect(only=plugin)

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
                                 f"already registered by '{_store[spec.name].plugin}'; keeping the first")
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

    def plugin_rows(self) -> list[dict[str, Any]]:
        """One row per loaded plugin: name, version, hooks, and what it registered."""
        self.load_third_party()
        rows = []
        for plugin in self._order:
            name = self.pm.get_name(plugin) or repr(plugin)
            hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
            rows.append(
                {
                    "name": name,
                    "version": self.distributions.get(name, "built-in" if name.startswith("cirbench.") else ""),
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
    if third_party:
        _registry.load_third_party()
    return _registry


def reset_registry() -> None:
    """Forget the loaded registry (tests use this after changing plugins or environment)."""
    global _registry
    _registry = None


def register_commands(cli: Any, third_party: bool = False) -> None:
    """Let the loaded plugins add their click commands to ``cli`` (third-party ones when asked)."""
    reg = get_registry(third_party=third_party)
    for plugin in list(reg._order):
        reg.call(plugin, "register_commands", cli=cli)


__all__ = ["Registry", "get_registry", "reset_registry", "ENTRY_POINT_GROUP", "builtin_plugin_modules"]
