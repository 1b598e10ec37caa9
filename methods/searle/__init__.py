"""Built-in plugin: SEARLE (zero-shot CIR by textual inversion, the standard baseline).

Phi maps the CLIP image embedding to the pseudo-word ``$`` in "a photo of $ that {caption}"; on FashionIQ the
forward ("c1 and c2") and reverse ("c2 and c1") prompts are encoded and their normalised features averaged.
The official weights for ViT-B/32 and ViT-L/14 (OpenAI CLIP) are downloaded from the SEARLE releases when no
``--checkpoint`` is given.

``cirbench train --method searle --corpus IMAGES`` trains Phi as the official ``train_phi.py`` does: it
distils the SEARLE-OTI pseudo-words of the corpus's images (captions are not needed), see :mod:`.train`.

``searle-oti`` (SEARLE-OTI; with ``--backbone ViT-L-14`` SEARLE-XL-OTI) needs no network: it optimises one
pseudo-word per reference image against the image and against GPT-Neo phrases about the image's concepts
(SEARLE's optimisation-based textual inversion, see :mod:`.oti`).
"""

from cirbench.hookspecs import hookimpl
from cirbench.types import MethodSpec, OptionSpec
from cirbench.util import SEED_MAX

CONCEPTS = OptionSpec("concepts", "Concept names: Open Images' oidv7-class-descriptions.csv (DisplayName column) or "
                      "a text file, one per line; default: download the one in SEARLE's repository.", "path", None)
PHRASES = OptionSpec("phrases", "GPT phrases per concept: SEARLE's GPTNeo27B.zip release, its concept_to_phrases.pkl, "
                     "or a JSON {concept: [phrase, ...]}; default: download the release.", "path", None)
# SEARLE-OTI's optimisation, with the official oti_inversion.py defaults (SEARLE's Phi training inverts its
# images with them too)
OTI_OPTIONS = (
    OptionSpec("oti_steps", "Optimisation steps per batch of reference images.", "int", 350, minimum=1,
               maximum=100_000),
    OptionSpec("oti_lr", "AdamW learning rate of the pseudo-words.", "float", 2e-2, minimum=0.0),
    OptionSpec("oti_weight_decay", "AdamW weight decay.", "float", 0.01, minimum=0.0),
    OptionSpec("oti_batch_size", "Reference images optimised together (their losses are averaged).", "int",
               32, minimum=1, maximum=4096),
    OptionSpec("top_k", "Concepts per image whose phrases regularise its pseudo-word.", "int", 15, minimum=1,
               maximum=250),
    OptionSpec("lambda_cos", "Weight of the template/image cosine loss.", "float", 1.0, minimum=0.0),
    OptionSpec("lambda_gpt", "Weight of the phrase regularisation loss.", "float", 0.5, minimum=0.0),
    OptionSpec("ema_decay", "Decay of the moving average of the pseudo-words (what is evaluated).", "float",
               0.99, minimum=0.0, maximum=1.0),
    OptionSpec("oti_seed", "Seed of the pseudo-words' initialisation and of the sampled templates and "
               "phrases (each batch derives its own).", "int", 42, minimum=0, maximum=SEED_MAX),
)


def oti_option(name: str, description: str) -> OptionSpec:
    """One of :data:`OTI_OPTIONS` with another description (the training's teacher pass uses it too)."""
    import dataclasses

    return dataclasses.replace(next(o for o in OTI_OPTIONS if o.name == name), help=description)


@hookimpl
def register_methods(register):
    register(MethodSpec(
        name="searle",
        description="SEARLE textual inversion: 'a photo of $ that {caption}' (official weights).",
        factory="cirbench.methods.searle.model:Searle",
        downloads="cirbench.methods.searle.model:downloads",
        options=(OptionSpec("checkpoint", "Official SEARLE .pt (dict with 'Phi') or a `cirbench train --method "
                            "searle` folder; default: download the official weights for the backbone.", "path", None),),
        default_backbone=("ViT-B-32", "openai"),
        default_preprocess="targetpad",
        trainer="cirbench.methods.searle.train:SearleTrainable",
        train_options=(
            CONCEPTS, PHRASES,
            oti_option("oti_steps", "OTI steps per batch of the teacher pass (the others of the official OTI "
                       "settings are fixed)."),
            oti_option("oti_batch_size", "Images optimised together in the teacher pass."),
            OptionSpec("top_k_concepts", "Nearest concepts per image whose phrases regularise Phi.", "int", 150,
                       minimum=1, maximum=100_000),
            OptionSpec("lambda_distil", "Weight of the distillation (contrastive) loss.", "float", 1.0, minimum=0.0),
            OptionSpec("lambda_gpt", "Weight of the GPT-phrase loss (the teacher's OTI keeps its own 0.5).", "float",
                       0.75, minimum=0.0),
            OptionSpec("temperature", "Temperature of the distillation loss.", "float", 0.25, minimum=1e-6),
            OptionSpec("dropout", "Dropout of Phi.", "float", 0.5, minimum=0.0, maximum=1.0),
        ),
    ))
    register(MethodSpec(
        name="searle-oti",
        description="SEARLE-OTI: a pseudo-word optimised for each reference image (no network), SEARLE's prompt.",
        factory="cirbench.methods.searle.oti:SearleOTI",
        downloads="cirbench.methods.searle.oti:downloads",
        options=(
            CONCEPTS, PHRASES,
            *OTI_OPTIONS,
        ),
        default_backbone=("ViT-B-32", "openai"),
        default_preprocess="targetpad",
    ))
