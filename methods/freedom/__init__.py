"""Built-in plugin: FREEDOM (Efthymiadis et al., "Composed Image Retrieval for Training-FREE DOMain Conversion",
WACV 2025), training-free.

The query image is described by words: its ``kappa`` nearest gallery images (the image itself among them when
the gallery holds it, else put first) each name their ``ni`` nearest words of a large vocabulary (Open Images
v7's class names), the ``miu`` most frequent words are kept with weights (their counts over the largest count),
and the query is the weighted sum of the text features of ``"{word} {text}"`` ("cat cartoon"), ranked by cosine.
Defaults are the official ``run_retrieval.py --method freedom`` (kappa 20, miu 7, ni 7).
"""

from cirbench.hookspecs import hookimpl
from cirbench.types import MethodSpec, OptionSpec

OPTIONS = (
    OptionSpec("kappa", "Nearest gallery images that name the query image's words.", "int", 20, minimum=1,
               maximum=100_000),
    OptionSpec("ni", "Nearest words each of those images names.", "int", 7, minimum=1, maximum=100_000),
    OptionSpec("miu", "Most frequent words kept, each composed with the query's text.", "int", 7, minimum=1,
               maximum=100_000),
    OptionSpec("vocabulary", "Words, a CSV whose first column is read (default: download FREEDOM's "
               "open_image_v7_class_names.csv).", "path", None),
)


@hookimpl
def register_methods(register):
    register(MethodSpec(
        name="freedom",
        description="FREEDOM (WACV 2025): the query image named by the frequent words of its nearest gallery "
                    "images, each composed with the text (training-free).",
        factory="cirbench.methods.freedom.model:Freedom",
        downloads="cirbench.methods.freedom.model:downloads",
        options=OPTIONS,
        default_backbone=("ViT-L-14", "openai"),
        default_preprocess="clip",
    ))
