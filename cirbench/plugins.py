"""The plugin manager: built-in plugins and entry-point plugins, registered through the same hooks.

Environment variables:

* ``CIRBENCH_STRICT_PLUGINS=1``: a plugin that fails to import, or registers a duplicate name, raises
  instead of warning (for plugin authors).
* ``CIRBENCH_LOAD_PLUGINS=name1,name2``: load only these third-party plugins (entry-point names);
  an empty value loads none. Built-ins always load.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import warnings
from dataclasses import replace
from importlib.metadata import entry_points
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginError, UnknownNameError
from .types import DatasetSpec, MethodSpec

ENTRY_POINT_GROUP = "cirbench"

# Built-in plugins: every subpackage of these packages, registered through the same hooks as
# third-party plugins. A subpackage's __init__ holds the light registration; heavy code is imported lazily.
BUILTIN_PACKAGES = ("cirbench.methods", "cirbench.datasets")


def builtin_plugin_modules() -> list[str]:
    """Module names of the built-in plugins (found by listing the built-in packages, not importing them)."""
    names = []
    for package_name in BUILTIN_PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__):
            if info.ispkg and not info.name.startswith("_"):
                names.append(f"{package_name}.{info.name}")
    return sorted(names)


class PluginWarning(UserWarning):
    """A plugin failed to load or registered a name that was taken; the rest still works."""


def _strict() -> bool:
    return os.environ.get("CIRBENCH_STRICT_PLUGINS", "").strip().lower() in {"1", "true", "yes"}


def _problem(message: str, exc: BaseException | None = None) -> None:
    if _strict():
        raise PluginError(message) from exc
    warnings.warn(message, PluginWarning, stacklevel=3)


class Registry:
    """All registered methods and datasets, and the pluggy manager that produced them."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("cirbench")
        self.pm.add_hookspecs(hookspecs)
        self.methods: dict[str, MethodSpec] = {}
        self.datasets: dict[str, DatasetSpec] = {}
        self.failed: dict[str, str] = {}
        self.distributions: dict[str, str] = {}  # plugin name -> "dist version"
        self._order: list[Any] = []  # registration order: built-ins first, so a clash keeps the built-in

    # -- loading ---------------------------------------------------------------------------------
    def load_builtins(self) -> None:
        for module_name in builtin_plugin_modules():
            try:
                module = importlib.import_module(module_name)
            except Exception as exc:  # noqa: BLE001 - a broken built-in must not break the CLI
                self.failed[module_name] = f"{type(exc).__name__}: {exc}"
                _problem(f"built-in plugin {module_name} failed to load: {exc}", exc)
                continue
            self.pm.register(module, name=module_name)
            self._order.append(module)

    def load_entry_points(self) -> None:
        selected = os.environ.get("CIRBENCH_LOAD_PLUGINS")
        wanted = None if selected is None else {s.strip() for s in selected.split(",") if s.strip()}
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if wanted is not None and ep.name not in wanted:
                continue
            if self.pm.get_plugin(ep.name) is not None:
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # noqa: BLE001 - one broken plugin must not break the others
                self.failed[ep.name] = f"{type(exc).__name__}: {exc}"
                _problem(f"plugin '{ep.name}' ({ep.value}) failed to load: {type(exc).__name__}: {exc}", exc)
                continue
            try:
                self.pm.register(plugin, name=ep.name)
                self._order.append(plugin)
            except Exception as exc:  # noqa: BLE001
                self.failed[ep.name] = f"{type(exc).__name__}: {exc}"
                _problem(f"plugin '{ep.name}' could not be registered: {exc}", exc)
                continue
            if ep.dist is not None:
                self.distributions[ep.name] = f"{ep.dist.name} {ep.dist.version}"
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            _problem(f"a plugin implements an unknown hook: {exc}", exc)

    def register_plugin(self, plugin: Any, name: str | None = None) -> None:
        """Register an in-process plugin object (tests, notebooks) and collect what it registers."""
        self.pm.register(plugin, name=name)
        self._order.append(plugin)
        self.pm.check_pending()
        self._collect(only=plugin)

    # -- collecting what plugins register -----------------------------------------------------------
    def _collect(self, only: Any = None) -> None:
        plugins = [only] if only is not None else list(self._order)
        for plugin in plugins:
            pname = self.pm.get_name(plugin) or repr(plugin)
            for hook_name, store, kind in (
                ("register_methods", self.methods, "method"),
                ("register_datasets", self.datasets, "dataset"),
            ):
                impl = getattr(plugin, hook_name, None)
                if impl is None:
                    continue

                def register(spec, _store=store, _kind=kind, _pname=pname):
                    expected = MethodSpec if _kind == "method" else DatasetSpec
                    if not isinstance(spec, expected):
                        _problem(f"plugin '{_pname}' registered a {type(spec).__name__}, not a {expected.__name__}")
                        return
                    if spec.name in _store:
                        _problem(
                            f"plugin '{_pname}' registers {_kind} '{spec.name}', already registered by "
                            f"'{_store[spec.name].plugin}'; keeping the first"
                        )
                        return
                    _store[spec.name] = replace(spec, plugin=_pname)

                try:
                    impl(register=register)
                except PluginError:
                    raise
                except Exception as exc:  # noqa: BLE001
                    self.failed[pname] = f"{type(exc).__name__}: {exc}"
                    _problem(f"plugin '{pname}' failed in {hook_name}: {type(exc).__name__}: {exc}", exc)

    # -- queries ---------------------------------------------------------------------------------
    def method(self, name: str) -> MethodSpec:
        if name not in self.methods:
            raise UnknownNameError("method", name, list(self.methods))
        return self.methods[name]

    def dataset(self, name: str) -> DatasetSpec:
        if name not in self.datasets:
            raise UnknownNameError("dataset", name, list(self.datasets))
        return self.datasets[name]

    def plugin_rows(self) -> list[dict[str, Any]]:
        """One row per loaded plugin: name, version, hooks, and what it registered."""
        rows = []
        for plugin in self._order:
            name = self.pm.get_name(plugin)
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


def get_registry(refresh: bool = False) -> Registry:
    """The process-wide registry, loading built-in and entry-point plugins on first use."""
    global _registry
    if _registry is None or refresh:
        reg = Registry()
        reg.load_builtins()
        reg.load_entry_points()
        reg._collect()
        _registry = reg
    return _registry


def reset_registry() -> None:
    """Forget the loaded registry (tests use this after changing plugins or environment)."""
    global _registry
    _registry = None


def register_commands(cli: Any) -> None:
    """Let every plugin add its click commands to ``cli``."""
    reg = get_registry()
    for plugin in reg._order:
        impl = getattr(plugin, "register_commands", None)
        if impl is None:
            continue
        try:
            impl(cli=cli)
        except Exception as exc:  # noqa: BLE001
            _problem(f"plugin '{reg.pm.get_name(plugin)}' failed in register_commands: {exc}", exc)


__all__ = ["Registry", "get_registry", "reset_registry", "ENTRY_POINT_GROUP", "builtin_plugin_modules"]
