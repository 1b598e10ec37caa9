"""Built-in plugin: FTI4CIR (fine-grained textual inversion: a subject word plus 1..12 attribute words).

The subject pseudo-word comes from the global image embedding; attribute pseudo-words come from 24 learned
queries attending over the last vision block's patch tokens, of which those with softmax weight > 0.05 are
kept (at most 12, at least 1, in their original order). Inference prompt:
"a photo of * with * ... * but {caption}". Train with ``cirbench train --method fti4cir`` on image-caption
pairs, or load the official checkpoint (a pickled module, read without running pickled code).
"""

from cirbench.hookspecs import hookimpl
from cirbench.types import MethodSpec, OptionSpec

ARCH = (
    OptionSpec("num_queries", "Learned attribute queries.", "int", 24, minimum=1, maximum=1024),
    OptionSpec("max_attributes", "At most this many attribute words per image (at most 32, and what the "
               "backbone's text context holds).", "int", 12, minimum=1, maximum=32),
    OptionSpec("threshold", "Keep attribute queries whose softmax weight exceeds this.", "float", 0.05, minimum=0.0,
               maximum=1.0),
    OptionSpec("layers", "Layers of the attribute transformer.", "int", 3, minimum=1, maximum=48),
)


@hookimpl
def register_methods(register):
    register(MethodSpec(
        name="fti4cir",
        description="Fine-grained textual inversion: subject + 1..12 attribute pseudo-words from patch features.",
        factory="cirbench.methods.fti4cir.model:FTI4CIR",
        downloads="cirbench.checkpoints:checkpoint_required",
        options=(OptionSpec("checkpoint", "A `cirbench train --method fti4cir` folder, or the official checkpoint "
                            "(a module saved with torch.save).", "path", None),),
        default_backbone=("ViT-L-14", "openai"),
        default_preprocess="targetpad",
        trainer="cirbench.methods.fti4cir.model:FTI4CIRTrainable",
        train_options=ARCH + (
            OptionSpec("temperature", "Temperature of the image/pseudo-sentence contrastive loss.", "float", 0.2,
                       minimum=1e-6),
            OptionSpec("reg_weight", "Weight of the three caption-based regularisers.", "float", 1.4, minimum=0.0),
        ),
    ))
