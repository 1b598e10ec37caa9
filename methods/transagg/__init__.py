"""Built-in plugin: TransAgg (Liu et al., "Zero-shot Composed Text-Image Retrieval", BMVC 2023;
github.com/Code-kunkun/ZS-CIR).

A 2-layer transformer reads the text's token features, a separator and the reference image's token features (CLIP's
own, projected); from its outputs at the image's class token and the text's end token an MLP makes a fused feature,
and a linear layer weighs three features into the query: ``w1 text + w2 fused + w3 image``. Trained on automatically
made triplets (reference image, relative caption, target image: the Laion-CIR sets) with CLIP's image tower frozen
and its text tower tuned slowly; zero-shot on CIRR and FashionIQ. Load the released checkpoint (a ``.pth`` state
dict, from the Google Drive folder the official README links) or train with ``cirbench train --method transagg
--corpus triplets.csv``.
"""

from cirbench.hookspecs import hookimpl
from cirbench.types import MethodSpec, OptionSpec


@hookimpl
def register_methods(register):
    register(MethodSpec(
        name="transagg",
        description="TransAgg (BMVC 2023): a transformer over the text's and the reference image's CLIP tokens "
                    "weighs text, fused and image features into the query. Needs --checkpoint.",
        factory="cirbench.methods.transagg.model:TransAgg",
        downloads="cirbench.methods.transagg.model:downloads",
        options=(OptionSpec("checkpoint", "A `cirbench train --method transagg` folder, or the official checkpoint "
                            "(a .pth state dict of the whole model, from the Google Drive folder linked by "
                            "github.com/Code-kunkun/ZS-CIR).", "path", None),),
        default_backbone=("ViT-L-14", "openai"),
        default_preprocess="targetpad",  # the official Config: transform 'targetpad', target_ratio 1.25
        trainer="cirbench.methods.transagg.model:TransAggTrainable",
        train_options=(
            OptionSpec("tune", "Which of CLIP's towers are tuned beside the head (the official --encoder: 'text' by "
                       "default; 'both', 'neither').", "str", "text", choices=("text", "both", "neither")),
            OptionSpec("layers", "Layers of the fusion transformer (the official num_layers).", "int", 2, minimum=1,
                       maximum=64),
            OptionSpec("dropout", "Dropout of the fusion transformer and the combiner (the official 0.5).", "float",
                       0.5, minimum=0.0, maximum=0.99),
            OptionSpec("clip_lr_scale", "The tuned towers' learning rate as a multiple of --lr (the official 1e-6 "
                       "beside the head's 1e-4: 0.01).", "float", 0.01, minimum=0.0, maximum=1.0),
        ),
    ))
