"""Built-in plugin: CompoDiff (Gu, Chun et al., TMLR 2024; github.com/navervision/CompoDiff).

A latent diffusion model in CLIP's image-embedding space: a transformer denoises an image embedding conditioned on
the reference image's embedding, the text's token features and a mask, with classifier-free guidance on image and
text apart; the denoised embedding is the query. The released CompoDiff-Aesthetic (the Hugging Face hub's
navervision/CompoDiff-Aesthetic) denoises CLIP ViT-L/14 image embeddings and reads CLIP-G/14's text tower.
Evaluation only: its training triplets (SynthTriplets18M) and training code are not released.
"""

from cirbench.hookspecs import hookimpl
from cirbench.types import MethodSpec, OptionSpec


@hookimpl
def register_methods(register):
    register(MethodSpec(
        name="compodiff",
        description="CompoDiff (TMLR 2024): a diffusion model denoises the target's CLIP image embedding from the "
                    "reference's and the text's, two guidance scales; the released CompoDiff-Aesthetic weights.",
        factory="cirbench.methods.compodiff.model:CompoDiff",
        downloads="cirbench.methods.compodiff.model:downloads",
        options=(
            OptionSpec("checkpoint", "The denoiser's weights: a pytorch_model.bin / model.safetensors file or the "
                       "folder holding one, as CompoDiffModel.save_pretrained writes them (default: the Hugging Face "
                       "hub's navervision/CompoDiff-Aesthetic, for ViT-L-14/openai).", "path", None),
            OptionSpec("text_encoder", "The transformers CLIPTextModel (and its CLIPTokenizer) whose last hidden "
                       "states condition the denoiser: a hub id or a local folder (default: CLIP-G/14's, "
                       "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k, as the official build_clip).", "str", None),
            OptionSpec("steps", "DDIM sampling steps (the README's 10; the network runs steps - 1 times, as "
                       "officially).", "int", 10, minimum=2, maximum=1000),
            OptionSpec("image_scale", "Classifier-free guidance scale of the image condition (the README's and the "
                       "demo's 1.5).", "float", 1.5, sweepable=True, minimum=0.0, maximum=100.0),
            OptionSpec("text_scale", "Classifier-free guidance scale of the text condition (7.5).", "float", 7.5,
                       sweepable=True, minimum=0.0, maximum=100.0),
            OptionSpec("source_weight", "Weight of the reference's embedding mixed into the denoised one before "
                       "normalisation (the demo's 0.1).", "float", 0.1, sweepable=True, minimum=0.0, maximum=1.0),
            OptionSpec("negative_text", "The negative text of the guidance (the demo's default: empty; the README's "
                       "example: 'low quality').", "str", ""),
            OptionSpec("samples", "Samples drawn per query and averaged (num_samples_per_batch: 2).", "int", 2,
                       minimum=1, maximum=64),
            OptionSpec("sampling_seed", "Seed of the sampling noise (each query's from this seed and its id).", "int",
                       0, minimum=0, maximum=2**31 - 1),
        ),
        default_backbone=("ViT-L-14", "openai"),
        default_preprocess="hf-clip",  # build_model's CLIPImageProcessor: bicubic, shortest side 224, centre crop
    ))
