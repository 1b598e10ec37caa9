"""Built-in plugin: PLI, masked tuning for ZS-CIR ("Pretrain like Your Inference", Chen & Lai, ICME 2025;
github.com/Chen-Junyang-cn/PLI).

Training turns image-caption pairs into CIR triplets: the reference is the image with most of its patches masked
(75 % dropped for CLIP), the modification text its caption, the target the image itself; CLIP's towers are tuned
(both, by default) so that the sum of the masked image's and the caption's embeddings retrieves the whole image
within the batch (cross-entropy over raw dot products, temperature 1). Evaluation is a weighted sum on the tuned
towers: query = normalize(text) + w x normalize(reference image) (w = 0.25, the official CLIP runs'
``--img_weight``), ranked by cosine against the tuned image tower's gallery.

Load the official checkpoint (the ViT-L/14 ``.pth`` the repository links, a dict with ``model_state_dict``) or
train with ``cirbench train --method pli --corpus pairs.csv`` on image-caption pairs (the paper's: ImageNet with
LLaVA captions, MS-COCO, Flickr30k).
"""

from cirbench.hookspecs import hookimpl
from cirbench.types import MethodSpec, OptionSpec


@hookimpl
def register_methods(register):
    register(MethodSpec(
        name="pli",
        description="PLI / masked tuning (ICME 2025): CLIP tuned to find an image from its masked self plus its "
                    "caption; query = text + w x image on the tuned towers. Needs --checkpoint.",
        factory="cirbench.methods.pli.model:PLI",
        downloads="cirbench.methods.pli.model:downloads",
        options=(
            OptionSpec("image_weight", "Weight w of the normalised reference-image embedding added to the normalised "
                       "text embedding (the official --img_weight; its CLIP runs use 0.25).", "float", 0.25,
                       sweepable=True, minimum=0.0),
            OptionSpec("checkpoint", "A `cirbench train --method pli` folder, or the official checkpoint (.pth with "
                       "model_state_dict, linked from github.com/Chen-Junyang-cn/PLI).", "path", None),
            OptionSpec("official_text", "Write CIRR's and FashionIQ's modification texts as the official evaluation "
                       "does: . ? & * spelled dotmark, questionmark, andmark, starmark (CoSMo's convention; its "
                       "CIRCO texts are left as they are).", "bool", True),
        ),
        default_backbone=("ViT-L-14", "openai"),
        default_preprocess="clip",  # the official default (--image_transforms None: CLIP's own transform)
        trainer="cirbench.methods.pli.model:PLITrainable",
        train_options=(
            OptionSpec("mask_ratio", "Share of the reference image's patch tokens dropped (the official "
                       "--mask_ratio; 0.75 in its CLIP runs).", "float", 0.75, minimum=0.0, maximum=0.99),
            OptionSpec("tune", "Which towers are tuned (the official --tuning_module).", "str", "both",
                       choices=("both", "text", "image")),
            OptionSpec("tau", "Temperature of the loss (the official loss is called without one: 1.0).", "float",
                       1.0, minimum=1e-6),
            OptionSpec("preprocess", "Training images: 'clip' (the official default) or 'targetpad' (its "
                       "--image_transforms target, ratio 1.25, which the released ViT-L/14 checkpoint used: evaluate "
                       "it with --preprocess targetpad).", "str", "clip", choices=("clip", "targetpad")),
        ),
    ))
