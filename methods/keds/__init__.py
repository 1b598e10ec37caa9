"""Built-in plugin: KEDs, Knowledge-Enhanced Dual-stream ZS-CIR (Suo et al., CVPR 2024; github.com/suoych/KEDs).

A Pic2Word mapping network turns the reference image's CLIP embedding into a pseudo-word; a database of image-caption
pairs (0.5M from CC3M, as CLIP features) lends it knowledge: the reference's 16 nearest database images and 16 nearest
captions, mapped by the same network, are attended to by the pseudo-word (two 3-layer cross-attention stacks, the
Bi-modality Knowledge-guided Projection), and the three words ``[from the images, from the captions, the word itself]``
go where Pic2Word's one goes ("a photo of * * * , {caption}"). Two such streams are trained apart (image-only
contrastive, and aligned with textual concepts); the query is their normalised features mixed. Evaluation only: the
released streams and database (ViT-L/14, the Hugging Face hub's LionheartzzZ/KEDs) are fetched by default.
"""

from cirbench.hookspecs import hookimpl
from cirbench.types import MethodSpec, OptionSpec


def _file(name: str, what: str) -> OptionSpec:
    return OptionSpec(name, f"{what} (default: the released file for ViT-L-14/openai from the Hugging Face hub's "
                      "LionheartzzZ/KEDs).", "path", None)


@hookimpl
def register_methods(register):
    register(MethodSpec(
        name="keds",
        description="KEDs (CVPR 2024): three pseudo-words from the image and its nearest database images and "
                    "captions, two streams mixed; the released ViT-L/14 streams and CC3M database.",
        factory="cirbench.methods.keds.model:KEDs",
        downloads="cirbench.methods.keds.model:downloads",
        options=(
            OptionSpec("text_stream_weight", "Weight of the textual-concept stream's normalised feature in the mix "
                       "(the other: the image stream's); the official CIRR evaluation uses 0.5, its ImageNet-R and "
                       "COCO loops sweep it.", "float", 0.5, sweepable=True, minimum=0.0, maximum=1.0),
            OptionSpec("neighbours", "Nearest database images and captions retrieved for each reference (the "
                       "official topk).", "int", 16, minimum=1, maximum=4096),
            _file("image_stream", "The image stream's checkpoint: a .pt with state_dict_img2text, "
                  "state_dict_retrieval_fuse and state_dict_text_condition (image_stream.pt)"),
            _file("text_stream", "The textual-concept stream's checkpoint, in the same layout (text_stream.pt)"),
            _file("image_database", "The database's image features, one row per pair: a tensor in a .pt, .npy or "
                  ".safetensors file (cc_image_databases.pt)"),
            _file("text_database", "The database's caption features, row for row with --image-database "
                  "(cc_text_databases.pt)"),
        ),
        default_backbone=("ViT-L-14", "openai"),
        default_preprocess="clip",  # the official eval_retrieval.py: CLIP's own transform (--target-pad off)
    ))
