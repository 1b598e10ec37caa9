"""Built-in plugin: Slerp (training-free) and Slerp+TAT (Slerp on a Text-Anchored-Tuned image encoder).

Slerp interpolates the normalised reference-image embedding ``v`` and the normalised embedding ``w`` of the
raw modification text on the unit sphere; ``alpha`` is the weight toward the text (0: image-only,
1: text-only). Per-dataset alpha defaults follow the paper notes (CIRR 0.9, CIRCO and FashionIQ 0.8) and the
value measured on the embedded ``shapes`` benchmark.
"""

from cirbench.hookspecs import hookimpl
from cirbench.types import MethodSpec, OptionSpec

ALPHA = OptionSpec(
    "alpha",
    "Weight toward the text on the sphere (0 = image-only, 1 = text-only). Paper-notes defaults, unconfirmed "
    "against the paper's code.",
    "float",
    0.8,
    per_dataset={"cirr": 0.9, "circo": 0.8, "fashioniq": 0.8, "shapes": 0.7},
    sweepable=True,
    minimum=0.0,
    maximum=1.0,
)
CHECKPOINT = OptionSpec("checkpoint", "Folder (or .safetensors file) of a `cirbench train --method slerp-tat` run.",
                        "path", None)

TAT_TRAIN_OPTIONS = (
    OptionSpec("lora_rank", "LoRA rank.", "int", 16, minimum=1, maximum=1024),
    OptionSpec("lora_alpha", "LoRA alpha (scaling = lora_alpha / lora_rank).", "float", 16.0, minimum=0.0),
    OptionSpec("lora_dropout", "LoRA dropout.", "float", 0.1, minimum=0.0, maximum=1.0),
    OptionSpec("lora_targets", "Comma-separated module-name suffixes of the image tower to adapt "
               "(not stated by the paper; default: both MLP projections of every block; 'attn' adds the attention "
               "in/out projections through peft's MultiheadAttention adapter, which merges into the base weights "
               "at each forward and so moves them by float round-off).", "str", "mlp.c_fc,mlp.c_proj"),
    OptionSpec("temperature", "Fixed temperature of the symmetric image-text contrastive loss "
               "(the paper fixes it; value unstated: default 0.01, CLIP's learned scale of 100).", "float", 0.01,
               minimum=1e-6),
)


@hookimpl
def register_methods(register):
    register(MethodSpec(
        name="slerp",
        description="Spherical interpolation between the reference image and raw text embeddings (training-free).",
        factory="cirbench.methods.slerp.model:Slerp",
        options=(ALPHA,),
        default_backbone=("ViT-L-14", "openai"),
        default_preprocess="clip",
    ))
    register(MethodSpec(
        name="slerp-tat",
        description="Slerp with a Text-Anchored-Tuned image encoder (LoRA on the image tower, text tower frozen).",
        factory="cirbench.methods.slerp.model:SlerpTAT",
        downloads="cirbench.checkpoints:checkpoint_required",
        options=(ALPHA, CHECKPOINT),
        default_backbone=("ViT-L-14", "openai"),
        default_preprocess="clip",
        trainer="cirbench.methods.slerp.tat:TATTrainable",
        train_options=TAT_TRAIN_OPTIONS,
    ))
