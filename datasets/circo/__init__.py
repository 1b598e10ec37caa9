"""Built-in plugin: CIRCO (Composed Image Retrieval on Common Objects in context).

Splits ``val`` (220 queries) and ``test`` (800 queries, hidden targets: the run writes the server file). The
gallery is COCO 2017 unlabeled (123,403 images). Protocol as the official evaluator: the reference is NOT
removed; mAP@{5,10,25,50} over all ground truths with denominator min(#GT, K); Recall@K on the single
``target_img_id``; semantic-aspect mAP@10 as extra metrics.
"""

from cirbench.hookspecs import hookimpl
from cirbench.types import DatasetSpec

from .published import PAPER_ROWS


@hookimpl
def register_datasets(register):
    register(DatasetSpec(
        name="circo",
        description="CIRCO: COCO-2017-unlabeled gallery, several ground truths per query; mAP@K, R@K.",
        factory="cirbench.datasets.circo.dataset:CIRCO",
        splits=("val", "test"),
        hidden_splits=("test",),
        default_split="val",
        main_metric="mAP@5",
        metric_order=("mAP@5", "mAP@10", "mAP@25", "mAP@50", "R@5", "R@10", "R@25", "R@50"),
        detail_metrics=("aspect/",),
        paper_rows=PAPER_ROWS,
    ))
