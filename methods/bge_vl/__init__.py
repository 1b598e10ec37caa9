"""Built-in plugin: BGE-VL-CLIP, the CLIPs trained on MegaPairs (Zhou et al., ACL 2025;
github.com/VectorSpaceLab/MegaPairs).

CLIP ViT-B/16 and ViT-L/14 fine-tuned on 26M synthetic (image, instruction, target) triplets; the query is the sum
of the reference image's and the instruction's raw CLIP embeddings, normalised, the gallery the images' normalised
embeddings. The weights are published in transformers' layout (the Hugging Face hub's BAAI/BGE-VL-base and
BAAI/BGE-VL-large) and load into open_clip through ``--pretrained hf:REPO``.
"""

from cirbench.hookspecs import hookimpl
from cirbench.types import MethodSpec


@hookimpl
def register_methods(register):
    register(MethodSpec(
        name="bge-vl",
        description="BGE-VL-CLIP (MegaPairs, ACL 2025): normalize(raw image + raw instruction embedding) on the "
                    "MegaPairs-trained CLIP (--pretrained hf:BAAI/BGE-VL-base, or BGE-VL-large on ViT-L-14).",
        factory="cirbench.methods.bge_vl.model:BGEVL",
        options=(),
        default_backbone=("ViT-B-16", "hf:BAAI/BGE-VL-base"),
        default_preprocess="hf-clip",  # the evaluation's CLIPImageProcessor.from_pretrained(model_name)
    ))
