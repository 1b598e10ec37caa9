"""Built-in plugin: the baselines, ``image-only`` and ``text-only``, and their two late fusions,
``image-text-sum`` (the tables' "Image + Text") and ``image-text-product`` ("Text x Image").

They bound every composing method from below: a method that cannot beat them is not composing anything.
"""

from cirbench.hookspecs import hookimpl
from cirbench.types import MethodSpec, OptionSpec

CLAMP = OptionSpec("clamp", "Clip both similarities at 0 before multiplying (i-CIR's baseline; FREEDOM's multiplies "
                   "them as they are).", "bool", False)
BASELINES = (  # name, what it ranks by, its class in model.py, its options
    ("image-only", "the reference image's embedding alone (ignores the text)", "ImageOnly", ()),
    ("text-only", "the modification text's embedding alone (ignores the image)", "TextOnly", ()),
    ("image-text-sum", "the sum of the image's and the text's cosine similarities (late fusion)", "ImageTextSum", ()),
    ("image-text-product", "the product of the image's and the text's cosine similarities (late fusion)",
     "ImageTextProduct", (CLAMP,)),
)


@hookimpl
def register_methods(register):
    for name, ranks_by, factory, options in BASELINES:
        register(MethodSpec(name=name, description=f"Rank by {ranks_by}.",
                            factory=f"cirbench.methods.basic.model:{factory}", options=options,
                            default_backbone=("ViT-L-14", "openai"), default_preprocess="clip"))
