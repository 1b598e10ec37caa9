"""Built-in plugin: LinCIR (language-only training of zero-shot CIR, navervision/lincir, CVPR 2024).

Evaluation is the SEARLE protocol ("a photo of $ that {caption}", FashionIQ forward/reverse averaged) with a
SEARLE-shaped Phi and LinCIR's own preprocessing, transformers' ``CLIPImageProcessor`` (``hf-clip``).
Weights: a ``cirbench train --method lincir`` folder, a LinCIR ``.pt`` (dict with ``Phi``), or, by default on
ViT-L/14 (OpenAI), the authors' *demo* weights from the Hugging Face hub (``navervision/zeroshot-cir-models``,
``lincir_large.pt``). The paper's own weights were not released: results from the demo weights are labelled
``lincir+demo-weights``.

Training is language-only: ``cirbench train --method lincir --corpus captions.txt`` masks the keywords of each
caption with ``$`` and teaches Phi to map the caption's (noised) text embedding to the pseudo-word that makes
the masked caption embed like the original (self-masking projection).
"""

from cirbench.hookspecs import hookimpl
from cirbench.types import MethodSpec, OptionSpec


@hookimpl
def register_methods(register):
    register(MethodSpec(
        name="lincir",
        description="LinCIR: SEARLE protocol, Phi trained on text only (demo weights by default on ViT-L/14).",
        factory="cirbench.methods.lincir.model:LinCIR",
        downloads="cirbench.methods.lincir.model:downloads",
        options=(OptionSpec("checkpoint", "A `cirbench train --method lincir` folder or a LinCIR .pt (dict with "
                            "'Phi'); default: the authors' demo weights for ViT-L-14/openai from the HF hub.",
                            "path", None),),
        default_backbone=("ViT-L-14", "openai"),
        default_preprocess="hf-clip",  # models.build_text_encoder: CLIPImageProcessor, used by validate.py
        trainer="cirbench.methods.lincir.model:LinCIRTrainable",
        train_options=(
            OptionSpec("keywords", "How keywords to mask are found: 'spacy' (the official rule: runs of NOUN, "
                       "PROPN, ADJ, DET tags from en_core_web_sm), 'column' (a 'keywords' column of the corpus, "
                       "'|'-separated), 'random' (one random word, the official fallback).", "str", "spacy",
                       choices=("spacy", "column", "random")),
            OptionSpec("noise", "Scale of the input noise: x + noise * U(0,1) * N(0, I) per caption.", "float", 1.0,
                       minimum=0.0),
            OptionSpec("dropout", "Dropout of Phi.", "float", 0.5, minimum=0.0, maximum=1.0),
        ),
    ))
