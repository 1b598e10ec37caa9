"""Built-in plugin: CIRR (Composed Image Retrieval on Real-life images), release rc2.

Splits ``val`` (4,181 queries, 2,297 gallery images) and ``test1`` (4,148 queries, hidden targets: the run
writes the two test-server files). Protocol as the official evaluator: the reference image is removed from
each ranking; Recall@{1,5,10,50} against ``target_hard``; Recall_subset@{1,2,3} within the query's
``img_set`` members (reference excluded).
"""

from cirbench.hookspecs import hookimpl
from cirbench.types import DatasetSpec, OptionSpec

from .published import PAPER_ROWS


@hookimpl
def register_datasets(register):
    register(DatasetSpec(
        name="cirr",
        description="CIRR rc2: real-life image pairs (NLVR2); reference removed; R@K and subset R@K.",
        factory="cirbench.datasets.cirr.dataset:CIRR",
        splits=("val", "test1"),
        hidden_splits=("test1",),
        default_split="val",
        main_metric="R@1",
        metric_order=("R@1", "R@5", "R@10", "R@50", "Rs@1", "Rs@2", "Rs@3"),
        paper_rows=PAPER_ROWS,
        score_inputs=(OptionSpec("subset", "The recall_subset file (test-server format) to score beside the recall "
                                 "file.", "path"),),
    ))
