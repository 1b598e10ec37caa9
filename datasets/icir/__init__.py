"""Built-in plugin: i-CIR, instance-level composed image retrieval (Psomas et al., NeurIPS 2025).

Each of the 202 instances (a particular object: the Temple of Poseidon, a given toy) has its own database of
positives and hard negatives (visual, textual and composed); a query (an image of the instance and a text such
as "at night") ranks its instance's database only, and the images of that instance shown as its text says are
its positives. mAP over the whole ranking, with the official ``compute_ap`` (trapezoidal precision, recall step
``1 / (positives + 1e-5)``), averaged over the queries; ``mmAP`` averages each instance's mean and ``minmAP``
each instance's worst query, as ``run_retrieval.py`` reports them.
"""

from cirbench.hookspecs import hookimpl
from cirbench.types import DatasetSpec

from .published import PAPER_ROWS


@hookimpl
def register_datasets(register):
    register(DatasetSpec(
        name="icir",
        description="i-CIR (NeurIPS 2025): instance-level CIR, each query ranks its instance's database of hard "
                    "negatives; mAP, mmAP, minmAP.",
        factory="cirbench.datasets.icir.dataset:ICIR",
        splits=("test",),
        default_split="test",
        main_metric="mAP",
        metric_order=("mAP", "mmAP", "minmAP"),
        paper_rows=PAPER_ROWS,
    ))
