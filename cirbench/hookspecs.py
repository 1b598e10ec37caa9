"""The hooks a cirbench plugin implements. Each docstring here is the plugin author's documentation.

A plugin is a module (or object) with functions decorated by ``cirbench.hookimpl``. Built-in plugins
(``cirbench.methods.*``, ``cirbench.datasets.*``) use exactly these hooks; third-party plugins are found
through the entry-point group ``cirbench``. See ``examples/cirbench-example-plugin`` for a tutorial.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("cirbench")
hookimpl = pluggy.HookimplMarker("cirbench")


@hookspec
def register_methods(register):
    """Register ZS-CIR methods.

    Call ``register(spec)`` once per method, with a :class:`cirbench.types.MethodSpec`. Give the spec a
    lazy ``factory`` string (``"package.module:Class"``) so that listing methods does not import torch.
    The factory is called as ``factory(backbone, options, dataset)`` and returns a
    :class:`cirbench.method.Method`. A name already taken by another plugin is refused with a warning
    (an error when ``CIRBENCH_STRICT_PLUGINS=1``).
    """


@hookspec
def register_datasets(register):
    """Register CIR benchmarks.

    Call ``register(spec)`` once per dataset, with a :class:`cirbench.types.DatasetSpec`. The factory is
    called as ``factory(data_root, options)`` and returns a :class:`cirbench.dataset.Dataset`, whose
    ``load(split)`` gives the query and gallery sets and whose ``metrics`` score a ranking. A name
    already taken by another plugin is refused with a warning (an error in strict mode).
    """


@hookspec
def register_commands(cli):
    """Add commands to the ``cirbench`` click group.

    ``cli`` is the top-level :class:`click.Group`; decorate new commands with ``@cli.command()``. Import
    heavy libraries inside the command bodies, not at module level, so ``cirbench --help`` stays fast. A plugin
    adds commands, never replaces one: a name that cirbench (or an earlier plugin) has is refused.
    """
