"""Built-in plugin: FashionIQ (dress, shirt, toptee).

Each category is ranked against its own gallery (``image_splits/split.<category>.<split>.json``); the
reference is not removed; Recall@10 and Recall@50 per category and their mean, as the literature reports on
``val``. ``test`` has hidden targets and no public server: the run writes per-query rankings only.

``fashioniq-pairs`` is FashionIQ under the caption-pairs protocol of VAL's and CoSMo's evaluation, which PLI
reports (see :mod:`.pairs`).
"""

from cirbench.hookspecs import hookimpl
from cirbench.types import DatasetSpec, OptionSpec

from .published import PAIRS_ROWS, PAPER_ROWS

CATEGORIES = ("dress", "shirt", "toptee")
CATEGORY = OptionSpec("category", "Evaluate one category only, or 'all' (each against its own gallery, then "
                      "averaged).", "str", "all", choices=("all", *CATEGORIES))


def _spec(**fields) -> DatasetSpec:
    """A FashionIQ protocol's spec: per category, R@10/50 and their mean, ``--category``."""
    return DatasetSpec(default_split="val", options=(CATEGORY,), main_metric="avg/R@10",
                       metric_order=tuple(f"{c}/R@{k}" for c in (*CATEGORIES, "avg") for k in (10, 50))
                       + ("R@10", "R@50"), **fields)


@hookimpl
def register_datasets(register):
    register(_spec(
        name="fashioniq",
        description="FashionIQ: fashion products, two relative captions per query; R@10/50 per category and mean.",
        factory="cirbench.datasets.fashioniq.dataset:FashionIQ",
        splits=("val", "test"), hidden_splits=("test",), paper_rows=PAPER_ROWS))
    register(_spec(
        name="fashioniq-pairs",
        description="FashionIQ under the caption-pairs protocol (VAL's, CoSMo's; PLI's): each caption order a query, "
                    "a gallery of the pairs' images, the reference never retrieved; R@10/50 per category and mean.",
        factory="cirbench.datasets.fashioniq.pairs:FashionIQPairs",
        splits=("val",), paper_rows=PAIRS_ROWS))
