"""Built-in plugin: MagicLens (Zhang et al., ICML 2024; github.com/google-deepmind/magiclens).

A CLIP (ViT-B/16 or ViT-L/14, its weights MagicLens's own) embeds the reference image and the instruction; a small
transformer over the two embeddings, then attention pooling, makes the query embedding; every gallery image is
embedded the same way with the empty instruction. Trained on 36.7M web image pairs whose relation an LMM and an LLM
wrote as an instruction; its weights are released (JAX), and read here without JAX. Zero-shot on every benchmark.
"""

from cirbench.hookspecs import hookimpl
from cirbench.types import MethodSpec, OptionSpec


@hookimpl
def register_methods(register):
    register(MethodSpec(
        name="magiclens",
        description="MagicLens (ICML 2024): a transformer over the CLIP embeddings of image and instruction, "
                    "gallery embedded with the empty instruction; the released JAX weights (--checkpoint .pkl).",
        factory="cirbench.methods.magiclens.model:MagicLens",
        downloads="cirbench.methods.magiclens.model:downloads",
        options=(OptionSpec("checkpoint", "MagicLens's released weights: magic_lens_clip_large.pkl (CLIP ViT-L/14) "
                            "or magic_lens_clip_base.pkl (--backbone ViT-B-16), from gs://gresearch/magiclens/models "
                            "or the Google Drive folder the official README links.", "path", None),),
        default_backbone=("ViT-L-14", "openai"),
        default_preprocess="magiclens",  # data_utils.process_img + MagicLens._preprocess_images
    ))
