"""Built-in plugin: GeneCIS (Vaze et al., CVPR 2023), the four conditional-similarity tasks.

``change_attribute`` / ``focus_attribute`` (Visual Genome 1.2 object crops) and ``change_object`` /
``focus_object`` (COCO 2017 val images). Each template ranks its own gallery, the target and 14 distractors;
Recall@1/2/3 per task and their mean over the tasks (``avg/R@1`` is the number the paper reports). Protocol
as the official ``eval/evaluate.py``: the reference is not removed (it is not in the galleries), attribute
crops are the object's box dilated by 0.7 and padded square with black.
"""

from cirbench.hookspecs import hookimpl
from cirbench.types import DatasetSpec, OptionSpec

from .published import PAPER_ROWS

TASKS = ("focus_attribute", "change_attribute", "focus_object", "change_object")
KS = (1, 2, 3)


@hookimpl
def register_datasets(register):
    register(DatasetSpec(
        name="genecis",
        description="GeneCIS: focus/change an attribute/object, per-template galleries of 15; R@1/2/3 and mean.",
        factory="cirbench.datasets.genecis.dataset:GeneCIS",
        splits=("test",),
        default_split="test",
        options=(OptionSpec("task", "Evaluate one task only, or 'all' (the four, then averaged as the paper "
                            "reports).", "str", "all", choices=("all", *TASKS)),),
        main_metric="avg/R@1",
        metric_order=tuple(f"{t}/R@{k}" for t in (*TASKS, "avg") for k in KS),
        paper_rows=PAPER_ROWS,
    ))
