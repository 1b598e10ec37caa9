"""Built-in plugin: SEARLE (zero-shot CIR by textual inversion, the standard baseline).

Phi maps the CLIP image embedding to the pseudo-word ``$`` in "a photo of $ that {caption}"; on FashionIQ the
forward ("c1 and c2") and reverse ("c2 and c1") prompts are encoded and their normalised features averaged.
The official weights for ViT-B/32 and ViT-L/14 (OpenAI CLIP) are downloaded from the SEARLE releases when no
``--checkpoint`` is given.
"""

from cirbench.hookspecs import hookimpl
from cirbench.types import MethodSpec, OptionSpec


@hookimpl
def register_methods(register):
    register(MethodSpec(
        name="searle",
        description="SEARLE textual inversion: 'a photo of $ that {caption}' (official weights).",
        factory="cirbench.methods.searle.model:Searle",
        options=(OptionSpec("checkpoint", "Official SEARLE .pt (dict with 'Phi') or a folder with model.safetensors "
                            "+ config.json; default: download the official weights for the backbone.", "path", None),),
        default_backbone=("ViT-B-32", "openai"),
        default_preprocess="targetpad",
    ))
