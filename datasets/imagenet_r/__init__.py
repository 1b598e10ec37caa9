"""Built-in plugin: ImageNet-R domain conversion (Pic2Word's protocol, Saito et al., CVPR 2023).

A real ImageNet validation image and a domain ("a cartoon of *", origami, toy, sculpture) retrieve ImageNet-R
images of the same class in that domain, from a gallery of the 6,983 ImageNet-R images of the four domains
plus the 10,000 query images themselves (which are never relevant), as the official lists
``imgnet_real_query.txt`` / ``imgnet_targets.txt`` (shipped here) define it. Recall@K as the official
``get_metrics_imgnet`` computes it: the relevant images found in the top K over the relevant images (+1e-5),
averaged over the 10,000 queries of each domain (a query whose class has no image in that domain counts 0).
"""

from cirbench.hookspecs import hookimpl
from cirbench.types import DatasetSpec, OptionSpec

DOMAINS = ("cartoon", "origami", "toy", "sculpture")
KS = (10, 50)


@hookimpl
def register_datasets(register):
    register(DatasetSpec(
        name="imagenet-r",
        description="ImageNet-R domain conversion (Pic2Word): real image + 'a {domain} of *'; R@10/50 per domain.",
        factory="cirbench.datasets.imagenet_r.dataset:ImageNetR",
        splits=("test",),
        default_split="test",
        options=(OptionSpec("domain", "Evaluate one domain only, or 'all' (each, then averaged as Pic2Word reports).",
                            "str", "all", choices=("all", *DOMAINS)),),
        main_metric="avg/R@10",
        metric_order=tuple(f"{d}/R@{k}" for d in (*DOMAINS, "avg") for k in KS),
    ))
