"""Built-in plugin: a Pic2Word-style single pseudo-word baseline.

A mapping network turns the (frozen) CLIP image embedding into one token embedding that replaces ``*`` in
"a photo of * , {caption}" (FashionIQ: "a photo of * , {cap2} and {cap1}"). Train it with
``cirbench train --method pic2word`` on images (captions unused) or load the official checkpoint.
"""

from cirbench.hookspecs import hookimpl
from cirbench.methods._shared.options import AUGMENT_RANDOM_RESIZED_CROP
from cirbench.types import MethodSpec, OptionSpec


@hookimpl
def register_methods(register):
    register(MethodSpec(
        name="pic2word",
        description="One pseudo-word from the image (Pic2Word): 'a photo of * , {caption}'.",
        factory="cirbench.methods.pic2word.model:Pic2Word",
        downloads="cirbench.checkpoints:checkpoint_required",
        options=(OptionSpec("checkpoint", "A `cirbench train --method pic2word` folder, or the official checkpoint "
                            "(.pt with state_dict_img2text).", "path", None),),
        default_backbone=("ViT-L-14", "openai"),
        default_preprocess="clip",
        trainer="cirbench.methods.pic2word.model:Pic2WordTrainable",
        train_options=(OptionSpec("middle_dim", "Hidden width of the mapping network.", "int", 512, minimum=1,
                                  maximum=65_536),
                       OptionSpec("dropout", "Dropout of the mapping network.", "float", 0.1, minimum=0.0, maximum=1.0),
                       AUGMENT_RANDOM_RESIZED_CROP),
    ))
