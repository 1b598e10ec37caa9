"""Built-in plugin: training-free domain conversion (FREEDOM, Efthymiadis et al., WACV 2025), four benchmarks.

An image of one domain and the *name* of another ("cartoon", "photo", "Archive") retrieve the images of the
query's class in the named domain, from the benchmark's whole database. Every (source, target) pair of distinct
domains is its own evaluation set; mAP over each query's whole ranking (the instance-retrieval ``compute_ap``),
Recall@K and Precision@K as the official ``metrics_calc``, averaged over the pairs (``avg/mAP`` is the number
FREEDOM's and BASIC's tables report). The files are FREEDOM's (``<image> <domain> <class>`` lines):

* ``dc-imagenet-r``: ImageNet-R's four domains and the ImageNet photos of its 200 classes (``full_files.csv``,
  written by FREEDOM's ``set_dataset.py``; the database is every image, the queries too);
* ``dc-minidn``: mini-DomainNet, clipart, painting, photo, sketch (``query_files.csv``, ``database_files.csv``);
* ``dc-nico``: NICO++, six contexts (``query_files.csv``, ``database_files.csv``);
* ``dc-ltll``: LTLL landmarks, today and archive photos (``full_files.csv``).

Pic2Word's ImageNet-R protocol (Recall@10/50 of "a cartoon of *" over the four ImageNet-R domains) is the
``imagenet-r`` dataset, another benchmark.
"""

from cirbench.hookspecs import hookimpl
from cirbench.types import DatasetSpec, OptionSpec

from .published import PAPER_ROWS

# per benchmark: its files (queries, database), the official domain names as the files spell them mapped to the
# words the text queries use, and its Recall/Precision cut-offs
BENCHMARKS = {
    "dc-imagenet-r": (("full_files.csv",), {"real": "photo", "cartoon": "cartoon", "origami": "origami",
                                             "toy": "toy", "sculpture": "sculpture"}, (10, 50)),
    "dc-minidn": (("query_files.csv", "database_files.csv"), {"clipart": "clipart", "painting": "painting",
                                                            "real": "photo", "sketch": "sketch"}, (50, 100)),
    "dc-nico": (("query_files.csv", "database_files.csv"), {"autumn": "autumn", "dim": "dimlight", "grass": "grass",
                                                          "outdoor": "outdoor", "rock": "rock", "water": "water"},
                (50, 100)),
    "dc-ltll": (("full_files.csv",), {"New": "Today", "Old": "Archive"}, (5, 10)),
}
TITLES = {"dc-imagenet-r": "ImageNet-R", "dc-minidn": "mini-DomainNet", "dc-nico": "NICO++", "dc-ltll": "LTLL"}


def metric_names(ks: tuple[int, ...]) -> tuple[str, ...]:
    return ("mAP", *(f"R@{k}" for k in ks), *(f"P@{k}" for k in ks))


@hookimpl
def register_datasets(register):
    for name, (_files, domains, ks) in BENCHMARKS.items():
        words = ", ".join(domains.values())
        register(DatasetSpec(
            name=name,
            description=f"{TITLES[name]} domain conversion (FREEDOM's protocol): an image + a domain name ({words}); "
                        "mAP, R@K, P@K per domain pair and their mean.",
            factory="cirbench.datasets.domain_conversion.dataset:DomainConversion",
            splits=("test",),
            default_split="test",
            options=(OptionSpec("source", f"Source domains, comma-separated ({words}), or 'all'.", "str", "all"),
                     OptionSpec("target", f"Target domains, comma-separated ({words}), or 'all'.", "str", "all")),
            main_metric="avg/mAP",
            metric_order=tuple(f"avg/{m}" for m in metric_names(ks)),
            # each pair's metrics stay in the result files and `leaderboard --all-metrics`
            detail_metrics=tuple(f"{s}->{t}/" for s in domains.values() for t in domains.values() if s != t),
            paper_rows=PAPER_ROWS.get(name, ()),
        ))
