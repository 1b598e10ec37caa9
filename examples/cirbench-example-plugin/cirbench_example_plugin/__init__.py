"""A third-party cirbench plugin, kept working by CI as the plugin author's tutorial.

It registers two methods, ``weighted-sum`` (the classic "image + text" vector-arithmetic baseline) and
``text-adapter`` (a linear map on the text features trained with ``cirbench train``: how a trainable method
plugs in), and one command, ``cirbench hello-plugin``. Like every plugin, this module stays light: the method
classes are named by lazy "module:Class" strings, so ``cirbench methods`` does not import torch.
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
    register(MethodSpec(
        name="text-adapter",
        description="Weighted sum with a linear text adapter trained image-to-caption (example plugin).",
        factory="cirbench_example_plugin.adapter:TextAdapter",
        options=(OptionSpec("checkpoint", "The folder `cirbench train --method text-adapter` wrote.", "path", None),
                 OptionSpec("weight", "Weight of the adapted text feature.", "float", 0.5, sweepable=True,
                            minimum=0.0, maximum=1.0)),
        default_backbone=("ViT-L-14", "openai"),
        default_preprocess="clip",
        # `cirbench train --method text-adapter` runs this class through the shared training loop; its options
        # follow as --temperature 0.05
        trainer="cirbench_example_plugin.adapter:TextAdapterTrainable",
        train_options=(OptionSpec("temperature", "Contrastive temperature.", "float", 0.07, minimum=1e-4),),
    ))


@hookimpl
def register_commands(cli):
    @cli.command(name="hello-plugin", epilog="\b\nExample:\n  cirbench hello-plugin")
    def hello_plugin():
        """Say hello from the example plugin (shows how plugins add commands)."""
        click.echo("hello from cirbench-example-plugin")
