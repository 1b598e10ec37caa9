"""Built-in plugin: WeiMoCIR (Wu, Lin and Yang, "Training-free Zero-shot Composed Image Retrieval via Weighted
Modality Fusion and Similarity", TAAI 2024; github.com/whats2000/WeiMoCIR, ``src/validate_clip.py``).

Training-free. The query is the weighted sum of the *raw* (unnormalised) reference-image and modification-text
embeddings, normalised: ``q = normalize((1 - alpha) * image + alpha * text)``. Each gallery image is scored by
its image feature and by the captions a multimodal LLM wrote of it (``--captions``, the official
``[{"candidate": id, "captions": [...]}, ...]`` file; the repository ships CIRR's): for caption ``j`` the query
is ``normalize((1 - alpha) * caption_j(reference) + alpha * text)`` against ``caption_j(gallery image)``, and the
score is ``beta * mean_j(caption similarity) + (1 - beta) * image similarity``. An image the file lacks has the
empty caption, as officially. FashionIQ's two captions are one text, ``"{c1, capitalised} and {c2}"``.

Where no captions file exists (CIRCO, or the FashionIQ file that the repository keeps in Git LFS),
``--captioner`` writes them: every gallery and reference image gets ``captions_per_image`` sampled captions from
any transformers image-to-text model (``hf:``) or multimodal chat model (``openai:MODEL``); the paper's came from
a multimodal LLM it does not name, so numbers made this way are the method with another captioner, not the
paper's. They go through the generation
cache, so a rerun, or ``--generation replay`` on a machine without the captioner, reads the same texts.
"""

from cirbench.generation.options import captioner_options, generation_downloads, generation_options
from cirbench.hookspecs import hookimpl
from cirbench.types import MethodSpec, OptionSpec


@hookimpl
def register_methods(register):
    register(MethodSpec(
        name="weimocir",
        description="WeiMoCIR: weighted sum of raw image and text embeddings; gallery scored by image and captions "
                    "(training-free).",
        factory="cirbench.methods.weimocir.model:WeiMoCIR",
        options=(
            OptionSpec("alpha", "Weight of the text in the query, (1 - alpha) * image + alpha * text (raw embeddings; "
                       "0.8: the official CLIP runs).", "float", 0.8, sweepable=True, minimum=0.0, maximum=1.0),
            OptionSpec("beta", "Weight of the caption similarities in the score (0: the image similarity alone, no "
                       "captions needed; 0.1: the official CLIP runs).", "float", 0.1, sweepable=True, minimum=0.0,
                       maximum=1.0),
            OptionSpec("captions", "JSON file of captions of the benchmark's images: [{\"candidate\": id, "
                       "\"captions\": [...]}, ...] (the official repository ships CIRR's, "
                       "cirr_dataset/cirr_labeled_images_cir_cleaned.json); this or --captioner is needed when "
                       "beta > 0.", "path", None),
            OptionSpec("captions_per_image", "How many captions of each image are used (the first ones; official: 3).",
                       "int", 3, minimum=1, maximum=64),
            *captioner_options(None, "", when=": caption every gallery and reference image with it instead of "
                               "reading --captions (--captions-per-image sampled captions each; recorded in the "
                               "generation cache and shared with every method asking the same)"),
            *generation_options("captioner", "captions"),
        ),
        default_backbone=("ViT-L-14", "laion2b_s32b_b82k"),  # laion/CLIP-ViT-L-14-laion2B-s32B-b82K
        default_preprocess="hf-clip",  # validate_clip.py's default transform: transformers' CLIPImageProcessor
        downloads="cirbench.methods.weimocir:downloads",
    ))


def downloads(options, model, pretrained):
    """The captioner ``--captioner`` names, when the gallery is scored by captions (beta > 0) it writes."""
    if not options.get("beta") or not options.get("captioner"):
        return []
    return generation_downloads(options, model, pretrained)
