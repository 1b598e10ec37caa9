"""Built-in plugin: the baselines, ``image-only`` and ``text-only``, and their two late fusions,
``image-text-sum`` (the tables' "Image + Text") and ``image-text-product`` ("Text x Image").

They bound every composing method from below: a method that cannot beat them is not composing anything.
"""

from cirbench.hookspecs import hookimpl
from cirbench.types import MethodSpec, OptionSpec


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
    register(MethodSpec(
        name="image-text-sum",
        description="Rank by the sum of the image's and the text's cosine similarities (late fusion).",
        factory="cirbench.methods.basic.model:ImageTextSum",
        default_backbone=("ViT-L-14", "openai"),
        default_preprocess="clip",
    ))
    register(MethodSpec(
        name="image-text-product",
        description="Rank by the product of the image's and the text's cosine similarities (late fusion).",
        factory="cirbench.methods.basic.model:ImageTextProduct",
        options=(OptionSpec("clamp", "Clip both similarities at 0 before multiplying (i-CIR's baseline; FREEDOM's "
                            "multiplies them as they are).", "bool", False),),
        default_backbone=("ViT-L-14", "openai"),
        default_preprocess="clip",
    ))
