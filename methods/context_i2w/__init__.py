"""Built-in plugin: Context-I2W (Tang et al., AAAI 2024), a context-dependent Pic2Word.

The pseudo-word depends on the query's text: CLIP's feature of the prompt itself rotates and gates the reference
image's vision tokens (Intent View Selector), 4 learned latents attend over them (Visual Target Extractor), and
the mapped word replaces ``*`` in Pic2Word's prompts ("a photo of * , {caption}"). Load the official checkpoint
(Google Drive, from github.com/Pter61/context-i2w) or train with ``cirbench train --method context-i2w`` on
image-caption pairs whose subject is masked.
"""

from cirbench.hookspecs import hookimpl
from cirbench.methods._shared.options import AUGMENT_RANDOM_RESIZED_CROP
from cirbench.types import MethodSpec, OptionSpec


@hookimpl
def register_methods(register):
    register(MethodSpec(
        name="context-i2w",
        description="Context-dependent pseudo-word (Context-I2W): the prompt's own text selects what of the image "
                    "becomes '*'.",
        factory="cirbench.methods.context_i2w.model:ContextI2W",
        downloads="cirbench.checkpoints:checkpoint_required",
        options=(OptionSpec("checkpoint", "A `cirbench train --method context-i2w` folder, or the official checkpoint "
                            "(.pt with state_dict_img2text, linked from github.com/Pter61/context-i2w).", "path",
                            None),),
        default_backbone=("ViT-L-14", "openai"),
        default_preprocess="clip",
        trainer="cirbench.methods.context_i2w.model:ContextI2WTrainable",
        train_options=(OptionSpec("middle_dim", "Hidden width of the two mapping MLPs.", "int", 512, minimum=1,
                                  maximum=65_536),
                       OptionSpec("dropout", "Dropout of the mapping MLPs.", "float", 0.1, minimum=0.0, maximum=1.0),
                       AUGMENT_RANDOM_RESIZED_CROP),
    ))
