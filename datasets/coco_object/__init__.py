"""Built-in plugin: COCO object composition (Pic2Word's protocol, Saito et al., CVPR 2023).

The query is one object of a COCO val2017 image, cut out by its segmentation mask (the rest white) and cropped
to its box, plus the image's other object classes ("a photo of * and {object} and {others}"); the target is
the whole image, among the 4,765 images of the query file. Recall@1/5/10/50/100 as the official
``get_metrics_coco`` ("ref_to_image").

Pic2Word's ``data/coco/prepare_data.py`` picks each image's query object with an unseeded ``random.sample``,
so every run of it makes a different benchmark. cirbench ships one frozen query file
(``lists/coco_eval.csv``, sha256 ``3bad6e34...c75``, 4,765 queries: the file published in
github.com/SunTongtongtong/Benchmark-Robustness-Text-Image-Compose-Retrieval, ``data/coco/coco_eval.csv``,
made by that script; COCO annotations are CC BY 4.0) and records its checksum in every result; ``--queries``
takes another file in the same format. ``cirbench data prepare coco-object`` writes the masked images the
queries need (``val2017_masked/``) from COCO's ``instances_val2017.json``, as the official script does.
"""

from cirbench.hookspecs import hookimpl
from cirbench.types import DatasetSpec, OptionSpec

KS = (1, 5, 10, 50, 100)


@hookimpl
def register_datasets(register):
    register(DatasetSpec(
        name="coco-object",
        description="COCO object composition (Pic2Word): masked object + 'and {other classes}'; R@1/5/10/50/100.",
        factory="cirbench.datasets.coco_object.dataset:CocoObject",
        splits=("val",),
        default_split="val",
        options=(OptionSpec("queries", "A query file in the official coco_eval.csv format (default: the frozen "
                            "file cirbench ships, sha256 3bad6e34...).", "path", None),),
        main_metric="R@1",
        metric_order=tuple(f"R@{k}" for k in KS),
    ))
