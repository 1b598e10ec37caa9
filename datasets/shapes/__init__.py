"""Built-in plugin: ``shapes``, an embedded, procedurally generated composed-retrieval benchmark.

It needs no download: images are generated (deterministically from ``--generator-seed``) into the cirbench cache on
first use, and every method runs on the small CLIP bundled with cirbench unless ``--backbone`` says
otherwise. See ``generator.py`` for the attribute world and ``dataset.py`` for the splits and metrics.
"""

from cirbench.hookspecs import hookimpl
from cirbench.types import DatasetSpec, OptionSpec
from cirbench.util import SEED_MAX

# what each split is generated from, with the defaults (a split made with other values gets its own folder)
QUERY_SPLIT_OPTIONS = {"queries": 400, "instances": 3}
CORPUS_OPTIONS = {"train_size": 5000}


@hookimpl
def register_datasets(register):
    register(DatasetSpec(
        name="shapes",
        description="Embedded synthetic CIR benchmark (shapes x colours x sizes x positions x backgrounds); "
                    "offline, deterministic, several ground truths per query (mAP@K and R@K).",
        factory="cirbench.datasets.shapes.dataset:Shapes",
        splits=("val", "test", "train"),
        default_split="val",
        options=(
            OptionSpec("generator_seed", "Generator seed (same seed, same images and queries; `run --seed` seeds "
                       "the run, not the data).", "int", 0, minimum=0, maximum=SEED_MAX),
            # the ceilings keep a mistyped value from filling the disk with generated images
            OptionSpec("queries", "Number of queries per evaluation split (at most 100,000).", "int",
                       QUERY_SPLIT_OPTIONS["queries"], minimum=1, maximum=100_000),
            OptionSpec("instances", "Rendered instances of every attribute combination in a gallery (432 "
                       "combinations; at most 100).", "int", QUERY_SPLIT_OPTIONS["instances"], minimum=1, maximum=100),
            OptionSpec("train_size", "Image-caption pairs in the train corpus (at most 1,000,000).", "int",
                       CORPUS_OPTIONS["train_size"], minimum=1, maximum=1_000_000),
        ),
        default_backbone=("cirbench-shapes-clip", "bundled"),
        main_metric="mAP@5",
        metric_order=("mAP@5", "mAP@10", "mAP@25", "R@1", "R@5", "R@10"),
    ))
