"""Built-in plugin: MA-CIR, the Multimodal Arithmetic benchmark for CIR (Byun et al., ICCV 2025).

Queries add, remove or replace something in a reference image (the ``condition_type``) across eight
``composition_type`` categories (left/right, top/bottom, spatial reasoning, size, action, colour, object
reasoning, naive object); edited images of the same source are hard negatives of each other. Protocol as the
official ``eval.py`` (github.com/jaeseokbyun/MACIR): Recall@1 per composition type, the reference image removed
from every ranking. Split ``full`` is its ``--eval_level full`` (the whole gallery; ``full_splits``' breakdown
by condition is kept as detail metrics); splits ``add``, ``remove`` and ``replace`` are its ``restricted``
level: a query ranks only the images named after its reference's source, and a query with fewer than two
such images is not counted.
"""

from cirbench.hookspecs import hookimpl
from cirbench.types import DatasetSpec

#: the official evaluator's order of its composition types and conditions (``unique_composition_types``, ...)
COMPOSITION_TYPES = ("left_right", "top_bottom", "spatial_reasoning", "size", "action", "color", "object_reasoning",
                     "naive_object")
CONDITIONS = ("add", "remove", "replace")


@hookimpl
def register_datasets(register):
    register(DatasetSpec(
        name="macir",
        description="MA-CIR (ICCV 2025): add/remove/replace edits with hard negatives; Recall@1 per composition "
                    "type, on the whole gallery (full) or among a reference's edits (add, remove, replace).",
        factory="cirbench.datasets.macir.dataset:MACIR",
        splits=("full", *CONDITIONS),
        default_split="full",
        main_metric="R@1",
        metric_order=("R@1", *(f"R@1/{t}" for t in COMPOSITION_TYPES)),
        detail_metrics=("by-condition/",),
    ))
