"""Built-in plugin: BASIC (Psomas et al., "Instance-Level Composed Image Retrieval", NeurIPS 2025), training-free.

The image and the text of a query are scored apart and fused. Features are centred (images by the mean of
LAION-1M's image features, texts by the mean of a corpus of object names); the query image is projected onto
the principal directions of object names against style words (contrastive PCA: ``(1 - a) S_objects - a
S_styles``, its top components), expanded with its 25 nearest gallery images (weights ``exp(0.1 cos)``), and
the text is contextualised (the mean feature of the text beside each of 100 object names, both orders). The two
similarities are shifted and scaled by the minima that synthetic (Stable Diffusion) image-text pairs reach,
clipped at zero and fused as Harris' corner score ``s_t s_i - lambda (s_t + s_i)^2``. Defaults are the official
``run_retrieval.py --method basic --use_preset``; each component can be switched off for the paper's ablations
(a run labels what it switched off: ``basic+no-query-expansion`` is the paper's BASIC†).
"""

from cirbench.hookspecs import hookimpl
from cirbench.types import MethodSpec, OptionSpec

OPTIONS = (
    OptionSpec("contextualize", "Average the text's features beside each of --context-words object names of "
               "--corpus (both orders).", "bool", True),
    OptionSpec("context_words", "How many of --corpus's first names contextualise a text.", "int", 100, minimum=1,
               maximum=100_000),
    OptionSpec("standardize", "Centre the features (images by --laion-mean, texts by --corpus's mean).", "bool", True),
    OptionSpec("laion_mean", "Centre images by LAION-1M's mean image feature (off: by the mean of the gallery a "
               "query ranks, on i-CIR its instance's database, as officially).", "bool", True),
    OptionSpec("laion_mean_file", "The LAION-1M mean for the backbone: the official .pkl or a .npy vector "
               "(default: download the official one for ViT-L-14/openai or ViT-L-16-SigLIP-256/webli).",
               "path", None),
    OptionSpec("project", "Project the query image onto the contrastive principal components.", "bool", True),
    OptionSpec("components", "Principal components kept (at most those of positive eigenvalue).", "int", 250,
               minimum=1, maximum=65_536),
    OptionSpec("negative_weight", "Weight a of the style words' scatter in (1 - a) S_objects - a S_styles.",
               "float", 0.2, minimum=0.0, maximum=1.0),
    OptionSpec("corpus", "Object names, a CSV whose first column is read (default: download the official "
               "generic_subjects.csv).", "path", None),
    OptionSpec("negative_corpus", "Style words, a CSV whose first column is read (default: download the "
               "official generic_styles.csv).", "path", None),
    OptionSpec("query_expansion", "Expand the query image with its nearest gallery images.", "bool", True),
    OptionSpec("expansion_k", "Gallery images a query image is expanded with.", "int", 25, minimum=1,
               maximum=100_000),
    OptionSpec("normalize", "Shift and scale both similarities by the minima over synthetic image-text pairs.",
               "bool", True),
    OptionSpec("synthetic_data", "The synthetic pairs' features for the backbone: the official "
               "dataset_1_sd_*.pkl.npy (default: download the official one for ViT-L-14/openai or "
               "ViT-L-16-SigLIP-256/webli).", "path", None),
    OptionSpec("harris_lambda", "lambda of the fusion s_t s_i - lambda (s_t + s_i)^2.", "float", 0.1, minimum=0.0),
)


@hookimpl
def register_methods(register):
    register(MethodSpec(
        name="basic",
        description="BASIC (NeurIPS 2025): centred, projected, expanded image and contextualised text "
                    "similarities, fused by Harris' corner score (training-free).",
        factory="cirbench.methods.basic_cir.model:Basic",
        downloads="cirbench.methods.basic_cir.model:downloads",
        options=OPTIONS,
        default_backbone=("ViT-L-14", "openai"),
        default_preprocess="clip",
    ))
