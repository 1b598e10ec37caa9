"""``cirbench new method|dataset NAME``: write a plugin file to start from, which works as written (it keeps the
contract that ``cirbench check`` checks) and runs with ``cirbench --plugin FILE`` without packaging anything."""

from __future__ import annotations

import re
from pathlib import Path
from string import Template

import click

EPILOG = """\b
Examples:
  cirbench new method my-method        # writes my_method.py
  cirbench --plugin my_method.py check --method my-method
  cirbench new dataset my-bench --output plugins/my_bench.py
  cirbench --plugin plugins/my_bench.py check --dataset my-bench --data-root data/my-bench
"""

METHOD = Template('''"""$name: a cirbench method plugin (from `cirbench new method $name`).

Run it without installing anything:

    cirbench --plugin $file check --method $name   # the contract, offline
    cirbench --plugin $file run --method $name     # on the embedded shapes
    cirbench --plugin $file run --method $name --weight 0.5:2:0.5 \\
        --dataset circo --data-root data/CIRCO

Result files record the sha256 of this file. When it is done, package it (an entry
point in the group "cirbench"; see examples/cirbench-example-plugin).
"""

import torch
from cirbench import Method, MethodSpec, OptionSpec, hookimpl


class $cls(Method):
    """normalize(image + weight * text).

    ``compose`` is the one method to write; ``cirbench.Method`` documents those a
    method may override (encode_gallery, prepare, prepare_references,
    prepare_gallery, finalize_queries, query_details, ...).
    """

    def compose(self, references, queries):
        # references: [B, D] unit-norm features of the reference images (cached);
        # queries: the B Query objects (q.text, q.texts, q.reference; no targets)
        text = self.backbone.encode_text([q.text for q in queries]).to(references)
        mixed = references + self.options["weight"] * text
        return torch.nn.functional.normalize(mixed, dim=-1)


$register''')

DATASET = Template('''"""$name: a cirbench dataset plugin (from `cirbench new dataset $name`).

The data root holds ``images/`` and ``queries.json``::

    {"gallery": ["a.jpg", "b.jpg", ...],
     "queries": [{"id": "0", "reference": "a.jpg", "text": "make it red",
                  "targets": ["b.jpg"]}, ...]}

Check it, then run methods on it, without installing anything:

    cirbench --plugin $file check --dataset $name --data-root DATA
    cirbench --plugin $file run --method slerp,image-only \\
        --dataset $name --data-root DATA
"""

from pathlib import Path

from cirbench import AnnotationError, Dataset, DatasetSpec, EvalSet, Query, hookimpl

KS = (1, 5, 10)
IMAGES = Path("images")


class $cls(Dataset):
    """One set: the queries rank the whole gallery, less their reference (CIRR)."""

    # each query's metrics read its own ranking alone, so a very large set may be scored a part at a time
    # (cirbench check --dataset verifies it)
    queries_score_apart = True

    def load(self, split):
        self.check_split(split)
        path = self.data_root / "queries.json"
        data = self.read_json(path)  # a missing or malformed file: one line naming it
        if not isinstance(data, dict) or not {"gallery", "queries"} <= data.keys():
            expected = "an object with 'gallery' and 'queries'"
            raise AnnotationError(f"{path}: expected {expected}")
        images = {n: self.image(n, IMAGES / n) for n in data["gallery"]}
        gallery = list(images.values())
        queries = []
        for i, q in enumerate(data["queries"]):
            self.require_fields(q, ("id", "reference", "text", "targets"), path, i)
            ref = q["reference"]
            images.setdefault(ref, self.image(ref, IMAGES / ref))
            queries.append(Query(str(q["id"]), ref, (q["text"],), tuple(q["targets"])))
        return [EvalSet(split, gallery, queries, images, exclude_reference=True,
                        topk=max(KS))]

    def annotation_files(self, split):
        return [self.data_root / "queries.json"]  # their sha256 is in every result

    def per_query_metrics(self, evalset, ranking):
        from cirbench.metrics import ap_per_query, hits_matrix, recall_per_query

        targets = [q.targets for q in evalset.queries]
        hits = hits_matrix(ranking.indices, ranking.target_positions(targets))
        out = {f"R@{k}": v for k, v in recall_per_query(hits, KS).items()}
        relevant = [len(t) for t in targets]
        for k, v in ap_per_query(hits, relevant, (max(KS),)).items():
            out[f"mAP@{k}"] = v
        return out


$register''')

# the hook that registers the plugin's class, the same in both files but for the spec and its fields
REGISTER = Template('''@hookimpl
def register_${kind}s(register):
    register($spec(
        name="$name",
        description="$description (a local plugin)",
        factory=$cls,
$fields    ))
''')
FIELDS = {
    "method": ("MethodSpec", "normalize(image + weight * text)",
               '''        options=(OptionSpec("weight", "Weight of the text feature.", "float", 1.0,
                            sweepable=True, minimum=0.0, maximum=100.0),),
        default_backbone=("ViT-L-14", "openai"),
        default_preprocess="clip",
'''),
    "dataset": ("DatasetSpec", "queries.json + images/",
                '''        splits=("val",),
        main_metric="R@1",
        metric_order=(*(f"R@{k}" for k in KS), f"mAP@{max(KS)}"),
'''),
}


@click.command(name="new", epilog=EPILOG)
@click.argument("kind", type=click.Choice(["method", "dataset"]))
@click.argument("name")
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None,
              help="The file to write (default: NAME.py in this folder, '-' in NAME becoming '_').")
def command(kind, name, output):
    """Write a plugin file for a new method or dataset NAME that works as written: `cirbench --plugin FILE check`
    passes, `cirbench --plugin FILE run` runs it. An existing file is never overwritten."""
    from ..errors import CirbenchError

    if not re.fullmatch(r"[a-z][a-z0-9]*(?:[-_.][a-z0-9]+)*", name):
        raise CirbenchError(f"'{name}' is no plugin name: lower-case letters and digits, joined by '-', '_' or '.'")
    path = Path(output) if output else Path(f"{re.sub(r'[-.]', '_', name)}.py")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", path.stem) or path.suffix != ".py":
        raise CirbenchError(f"{path}: a plugin file is a .py file named as a Python module (letters, digits, _)")
    if path.exists():
        raise CirbenchError(f"{path} exists already: it is left as it is (give another --output)")
    # what `check` would refuse: a name another plugin registers, a file named as an installed module
    from ..plugins import get_registry, shadowed_module

    registry = get_registry(third_party=True)
    taken = registry.methods if kind == "method" else registry.datasets
    if name in taken:
        raise CirbenchError(f"{kind} '{name}' is registered already (by {taken[name].plugin}): choose another name")
    if (other := shadowed_module(path.stem)) is not None:
        raise CirbenchError(f"{path}: a module named '{path.stem}' is installed already (at {other}) and the "
                            "plugin would stand in for it: give another NAME or --output")
    if not path.parent.is_dir():
        raise CirbenchError(f"{path.parent} is not a folder")
    cls = "".join(part.capitalize() for part in re.split(r"[-_.]", name))
    spec, description, fields = FIELDS[kind]
    register = REGISTER.substitute(kind=kind, spec=spec, name=name, description=description, cls=cls, fields=fields)
    text = (METHOD if kind == "method" else DATASET).substitute(name=name, cls=cls, file=path.as_posix(),
                                                                 register=register)
    try:
        with open(path, "x", encoding="utf-8") as handle:  # "x": never over a file made meanwhile
            handle.write(text)
    except OSError as exc:
        raise CirbenchError(f"cannot write {path}: {exc.strerror or exc}") from None
    flag = "--method" if kind == "method" else "--dataset"
    root = "" if kind == "method" else " --data-root DATA"
    click.echo(f"wrote {path}\nnext:  cirbench --plugin {path} check {flag} {name}{root}")
