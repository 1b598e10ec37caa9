"""Built-in plugin: the two single-modality baselines, ``image-only`` and ``text-only``.

They make the loop real from day one and bound every composing method from below: a method that
cannot beat both is not composing anything.
"""

from cirbench.hookspecs import hookimpl
from cirbench.types import MethodSpec


@hookimpl
def register_methods(register):
    register(MethodSpec(
        name="image-only",
        description="Rank by the reference image's embedding alone (ignores the text).",
        factory="cirbench.methods.basic.model:ImageOnly",
        default_backbone=("ViT-L-14", "openai"),
        default_preprocess="clip",
    ))
    register(MethodSpec(
        name="text-only",
        description="Rank by the modification text's embedding alone (ignores the image).",
        factory="cirbench.methods.basic.model:TextOnly",
        default_backbone=("ViT-L-14", "openai"),
        default_preprocess="clip",
    ))
