"""A third-party cirbench plugin, kept working by CI as the plugin author's tutorial.

It registers one method, ``weighted-sum`` (the classic "image + text" vector-arithmetic baseline), and one
command, ``cirbench hello-plugin``. Like every plugin, this module stays light: the method class is named by
a lazy "module:Class" string, so ``cirbench methods`` does not import torch.
"""

import click

from cirbench import MethodSpec, OptionSpec, hookimpl


@hookimpl
def register_methods(register):
    register(MethodSpec(
        name="weighted-sum",
        description="normalize((1 - w) * image + w * text): the vector-arithmetic baseline (example plugin).",
        factory="cirbench_example_plugin.method:WeightedSum",
        options=(OptionSpec("weight", "Weight of the text feature (0 = image-only, 1 = text-only).", "float", 0.5,
                            sweepable=True, minimum=0.0, maximum=1.0),),
        default_backbone=("ViT-L-14", "openai"),
        default_preprocess="clip",
    ))


@hookimpl
def register_commands(cli):
    @cli.command(name="hello-plugin", epilog="\b\nExample:\n  cirbench hello-plugin")
    def hello_plugin():
        """Say hello from the example plugin (shows how plugins add commands)."""
        click.echo("hello from cirbench-example-plugin")
