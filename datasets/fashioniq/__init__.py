"""Built-in plugin: FashionIQ (dress, shirt, toptee).

Each category is ranked against its own gallery (``image_splits/split.<category>.<split>.json``); the
reference is not removed; Recall@10 and Recall@50 per category and their mean, as the literature reports on
``val``. ``test`` has hidden targets and no public server: the run writes per-query rankings only.
"""

from cirbench.hookspecs import hookimpl
from cirbench.types import DatasetSpec, OptionSpec

from .published import PAPER_ROWS

CATEGORIES = ("dress", "shirt", "toptee")


@hookimpl
def register_datasets(register):
    register(DatasetSpec(
        name="fashioniq",
        description="FashionIQ: fashion products, two relative captions per query; R@10/50 per category and mean.",
        factory="cirbench.datasets.fashioniq.dataset:FashionIQ",
        splits=("val", "test"),
        hidden_splits=("test",),
        default_split="val",
        options=(OptionSpec("category", "Evaluate one category only, or 'all' (each against its own gallery, "
                            "then averaged).", "str", "all", choices=("all", *CATEGORIES)),),
        main_metric="avg/R@10",
        metric_order=tuple(f"{c}/R@{k}" for c in (*CATEGORIES, "avg") for k in (10, 50)) + ("R@10", "R@50"),
        paper_rows=PAPER_ROWS,
    ))
