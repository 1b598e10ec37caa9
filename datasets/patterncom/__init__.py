"""Built-in plugin: PatternCom, composed image retrieval for remote sensing (Psomas et al., IGARSS 2024).

The gallery is PatternNet (38 land-use classes, 800 aerial images each). A query is a PatternNet image and the
*value* of an attribute its class shows another way: "red" for a tennis court of another colour, "sparse" for
dense housing, "two" for one storage tank. Six attributes (colour, context, density, existence, quantity,
shape), each a file of annotated images: every annotated image queries every other value its class group has,
and the positives are the annotated images of the query's class with that value. AP over the whole ranking
(the query image stays in it), Precision@K and Recall@K (K = 5, 10, 15, 20), averaged over the queries of each
attribute; ``avg/`` is the mean over the attributes, the "Avg" of the paper's table. Protocol as the official
``evaluate.py`` (github.com/billpsomas/rscir): its class merges (dense and sparse residential are one class,
bridge and overpass another, ...) included.
"""

from cirbench.hookspecs import hookimpl
from cirbench.types import DatasetSpec, OptionSpec

from .protocol import ATTRIBUTES, KS
from .published import PAPER_ROWS


@hookimpl
def register_datasets(register):
    listed = ", ".join(ATTRIBUTES)
    register(DatasetSpec(
        name="patterncom",
        description="PatternCom (IGARSS 2024): remote-sensing CIR on PatternNet, an aerial image + an attribute "
                    f"value ({listed}); mAP, P@K, R@K per attribute and their mean.",
        factory="cirbench.datasets.patterncom.dataset:PatternCom",
        splits=("test",),
        default_split="test",
        options=(OptionSpec("attribute", f"Attributes, comma-separated ({listed}), or 'all'.", "str", "all"),),
        main_metric="avg/mAP",
        metric_order=("avg/mAP", *(f"{a}/mAP" for a in ATTRIBUTES), *(f"avg/R@{k}" for k in KS),
                      *(f"avg/P@{k}" for k in KS)),
        # each attribute's mAP is a column of the paper's table; its R@K and P@K stay in the result files and
        # `leaderboard --all-metrics`
        detail_metrics=tuple(f"{a}/{m}@" for a in ATTRIBUTES for m in ("R", "P")),
        paper_rows=PAPER_ROWS,
    ))
