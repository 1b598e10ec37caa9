"""Built-in plugin: the baselines, ``image-only`` and ``text-only``, their two late fusions, ``image-text-sum``
(the tables' "Image + Text") and ``image-text-product`` ("Text x Image"), and ``weicom``, the weighted fusion of
standardised similarities (WeiCom, Psomas et al., IGARSS 2024).

They bound every composing method from below: a method that cannot beat them is not composing anything.
"""

from cirbench.hookspecs import hookimpl
from cirbench.types import MethodSpec, OptionSpec

CLAMP = OptionSpec("clamp", "Clip both similarities at 0 before multiplying (i-CIR's baseline; FREEDOM's multiplies "
                   "them as they are).", "bool", False)
LAM = OptionSpec("lam", "Weight of the text: (1 - lam) x image + lam x text, both similarities standardised (0.5: the "
                 "official default).", "float", 0.5, sweepable=True, minimum=0.0, maximum=1.0)
BASELINES = (  # name, what it ranks by, its class in model.py, its options
    ("image-only", "the reference image's embedding alone (ignores the text)", "ImageOnly", ()),
    ("text-only", "the modification text's embedding alone (ignores the image)", "TextOnly", ()),
    ("image-text-sum", "the sum of the image's and the text's cosine similarities (late fusion)", "ImageTextSum", ()),
    ("image-text-product", "the product of the image's and the text's cosine similarities (late fusion)",
     "ImageTextProduct", (CLAMP,)),
    ("weicom", "WeiCom (IGARSS 2024): the image's and the text's similarities, each standardised over the gallery "
     "and through the normal CDF, mixed (1 - lam) image + lam text", "WeiCom", (LAM,)),
)


@hookimpl
def register_methods(register):
    for name, ranks_by, factory, options in BASELINES:
        register(MethodSpec(name=name, description=f"Rank by {ranks_by}.",
                            factory=f"cirbench.methods.basic.model:{factory}", options=options,
                            default_backbone=("ViT-L-14", "openai"), default_preprocess="clip"))
