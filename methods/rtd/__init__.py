"""Built-in plugin: RTD, Reducing Task Discrepancy of text encoders for CIR (Byun et al., ICCV 2025;
github.com/jaeseokbyun/RTD).

A post-hoc, text-only step after a projection-based method: LinCIR's Phi stays frozen and a copy of CLIP's text
tower is tuned so that "a photo of $ that {conditioning text}", $ being Phi of the (noised) reference caption's
embedding, embeds as the target caption does under the frozen tower (frozen-target text contrastive learning,
the NT-Xent of SEARLE's training at temperature 0.07). Its two refinements: each batch also holds "a photo of $"
against the reference caption itself (refined batch sampling), and $ comes from the reference caption through
Phi as at evaluation it comes from the image (refined concatenation). Evaluation is LinCIR's, the prompts encoded
by the tuned tower, the gallery by the untouched image tower (so its cached features are shared).

The authors released code, not weights: ``cirbench train --method rtd --corpus triplets.jsonl`` (records with
``reference_caption``, ``conditioning_caption`` and ``target_caption``, as CompoDiff's LLM triplets the paper
trains on) writes the checkpoint ``--method rtd --checkpoint`` evaluates.
"""

from cirbench.hookspecs import hookimpl
from cirbench.types import MethodSpec, OptionSpec


@hookimpl
def register_methods(register):
    register(MethodSpec(
        name="rtd",
        description="RTD (ICCV 2025): LinCIR's protocol with a text tower tuned post hoc on text triplets "
                    "(frozen-target contrastive); needs a `cirbench train --method rtd` checkpoint.",
        factory="cirbench.methods.rtd.model:RTD",
        downloads="cirbench.methods.rtd.model:downloads",
        options=(OptionSpec("checkpoint", "A `cirbench train --method rtd` folder (the tuned text tower and the "
                            "Phi it was tuned with).", "path", None),),
        default_backbone=("ViT-L-14", "openai"),
        default_preprocess="hf-clip",  # LinCIR's validate.py, which RTD's is
        trainer="cirbench.methods.rtd.model:RTDTrainable",
        train_options=(
            OptionSpec("phi", "The frozen Phi: a `cirbench train --method lincir` folder or a LinCIR .pt (dict with "
                       "'Phi'); default: LinCIR's demo weights for ViT-L-14/openai from the HF hub.", "path", None),
            OptionSpec("noise", "Scale of the noise on the reference caption's embedding: x + noise * U(0,1) * "
                       "N(0, I) per caption (the official --noise_scale).", "float", 0.5, minimum=0.0),
            OptionSpec("tau", "Temperature of the contrastive loss (the official --tau).", "float", 0.07,
                       minimum=1e-6),
        ),
    ))
