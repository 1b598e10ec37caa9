"""The dataset contract (`cirbench check --dataset`, `cirbench.testing.check_dataset`) on every built-in benchmark
that the suite can lay out: the real CIRR, CIRCO and FashionIQ annotation files with placeholder images, and
each other benchmark's generated folder. A perfect ranking made from the annotations must score 100 on the main
metric, a ranking with the targets last must score lower, and the per-query values must average to the reported
metrics (the bootstrap intervals and paired tests are made from them)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from annotations import ANNOTATIONS, copy_tree, needs_annotations, write_placeholder
from click.testing import CliRunner

from cirbench.cli import cli
from cirbench.hookspecs import hookimpl
from cirbench.testing import (
    DATASET_CHECKS,
    ToyDataset,
    ToyDatasetPlugin,
    check_dataset,
    registered,
    write_toy_dataset,
)
from cirbench.types import DatasetSpec


def _held(name, root=None, split=None, **options):
    held, notes = [], []
    metrics = check_dataset(name, split, root, options, report=held.append, note=notes.append)
    return held, notes, metrics


def _cirr(tmp_path):
    root = copy_tree(ANNOTATIONS / "cirr", tmp_path / "CIRR")
    names = json.loads((root / "image_splits" / "split.rc2.val.json").read_text())
    for i, rel in enumerate(names.values()):
        write_placeholder(root / rel, i)
    return root


@needs_annotations
def test_cirr_circo_and_fashioniq_keep_the_contract_on_their_official_files(tmp_path):
    held, notes, metrics = _held("cirr", _cirr(tmp_path), "val")
    assert held == list(DATASET_CHECKS) and not notes
    assert metrics["R@1"] == metrics["Rs@1"] == 100.0

    root = copy_tree(ANNOTATIONS / "circo", tmp_path / "CIRCO")
    ann = json.loads((root / "annotations" / "val.json").read_text())
    for i in sorted({q["reference_img_id"] for q in ann} | {g for q in ann for g in q["gt_img_ids"]}):
        write_placeholder(root / "COCO2017_unlabeled" / "unlabeled2017" / f"{i:012d}.jpg", i)
    held, notes, metrics = _held("circo", root, "val")
    assert held == list(DATASET_CHECKS) and not notes and metrics["mAP@5"] == metrics["mAP@50"] == 100.0

    root = copy_tree(ANNOTATIONS / "fashioniq", tmp_path / "FashionIQ")
    for i, name in enumerate(json.loads((root / "image_splits" / "split.dress.val.json").read_text())):
        write_placeholder(root / "images" / f"{name}.png", i)
    held, notes, metrics = _held("fashioniq", root, "val", category="dress")
    assert held == list(DATASET_CHECKS) and metrics["R@10"] == 100.0


def test_the_generated_benchmarks_keep_the_contract(tmp_path, monkeypatch):
    from test_domain_conversion import DOMAINS, write_benchmark
    from test_genecis import write_genecis
    from test_icir import write_icir
    from test_macir import write_macir
    from test_patterncom import write_patternnet

    from cirbench.datasets import domain_conversion

    monkeypatch.setitem(domain_conversion.BENCHMARKS, "dc-nico", (("query_files.csv", "database_files.csv"), DOMAINS,
                                                                  (2, 4)))  # the generated folder's three domains
    cases = [("shapes", None, None), ("patterncom", write_patternnet(tmp_path / "PatternNet"), None),
             ("icir", write_icir(tmp_path / "icir"), None), ("genecis", write_genecis(tmp_path / "GeneCIS"), None),
             ("macir", write_macir(tmp_path / "MACIR"), "full"), ("macir", tmp_path / "MACIR", "remove"),
             ("dc-nico", write_benchmark(tmp_path / "nico"), None)]
    for name, root, split in cases:
        held, _, metrics = _held(name, root, split)
        assert held == list(DATASET_CHECKS), (name, held)
        assert metrics, name
    # one task of a benchmark whose main metric is their mean (avg/R@1): judged by that task's own (it failed)
    held, _, metrics = _held("genecis", tmp_path / "GeneCIS", None, task="change_object")
    assert held == list(DATASET_CHECKS) and metrics["change_object/R@1"] == 100.0 and "avg/R@1" not in metrics


class _OffByOne(ToyDataset):
    """Its metric reads the gallery positions shifted (another list's order, say): every number it reports looks
    plausible, and is wrong."""

    def per_query_metrics(self, evalset, ranking):
        shifted = ranking.indices.clone()
        shifted[shifted >= 0] = (shifted[shifted >= 0] + len(evalset.gallery) // 2) % len(evalset.gallery)
        return super().per_query_metrics(evalset, dataclasses.replace(ranking, indices=shifted))


class _Unread(ToyDataset):
    """Its metric never looks at the ranking."""

    def per_query_metrics(self, evalset, ranking):
        import torch

        return {m: torch.full((len(evalset.queries),), 100.0) for m in ("R@1", "R@5", "mAP@5")}


class _Skewed(ToyDataset):
    """Reports a metric that is not the mean of its per-query values (right only where every query scores 100)."""

    def metrics(self, evalset, ranking):
        return {k: min(100.0, float(v.mean()) + 1.0) for k, v in self.per_query_metrics(evalset, ranking).items()}


class _Relative(ToyDataset):
    """Says its queries score apart, but scores each against the mean of the queries scored with it."""

    queries_score_apart = True

    def per_query_metrics(self, evalset, ranking):
        values = super().per_query_metrics(evalset, ranking)
        return {k: (v + v.mean()) / 2 for k, v in values.items()}


class _Twice(ToyDataset):
    """Lists one gallery image twice (a file joined with another that repeats it)."""

    def load(self, split):
        (es,) = super().load(split)
        return [dataclasses.replace(es, gallery=[*es.gallery, es.gallery[0]])]


class _Stray(ToyDataset):
    """Gives a query a candidate image that is not in the gallery it ranks."""

    def load(self, split):
        (es,) = super().load(split)
        queries = [dataclasses.replace(q, candidates=(*(g.id for g in es.gallery), "elsewhere.png")) if i == 2 else q
                   for i, q in enumerate(es.queries)]
        return [dataclasses.replace(es, queries=queries)]


class _SameId(ToyDataset):
    """Gives two queries one id (a file joined with another that repeats a query)."""

    def load(self, split):
        (es,) = super().load(split)
        return [dataclasses.replace(es, queries=[*es.queries, es.queries[5]])]


class _Unknown(ToyDataset):
    """Gives a query a reference that is no image of the set."""

    def load(self, split):
        (es,) = super().load(split)
        return [dataclasses.replace(es, queries=[dataclasses.replace(q, reference="elsewhere.png") if i == 3 else q
                                                 for i, q in enumerate(es.queries)])]


class _Telling(ToyDataset):
    """Carries each query's target in an extra it does not declare as an answer: methods would read it."""

    def load(self, split):
        (es,) = super().load(split)
        return [dataclasses.replace(es, queries=[dataclasses.replace(q, extra={"best": [q.targets[-1]]})
                                                 for q in es.queries])]


def _broken(cls):
    """A plugin registering the dataset class ``cls`` as ``broken``."""
    class Broken:
        @hookimpl
        def register_datasets(self, register):
            register(DatasetSpec(name="broken", description="broken on purpose", factory=cls, splits=("val",),
                                 main_metric="R@1"))

    return Broken()


@pytest.mark.parametrize(("cls", "failing", "why"), [
    (_Twice, 0, "the gallery lists image img_red_0.png twice"),
    (_SameId, 0, "two queries share the id '5'"),
    (_Unknown, 0, "query 3: its reference elsewhere.png is no image of the set"),
    (_Telling, 0, "query 0: its extra 'best' names its target, and methods see the extras"),
    (_Stray, 0, "query 2: its candidate elsewhere.png is not in the gallery"),
    (_OffByOne, 1, "a perfect ranking scores R@1 0.0000, not 100"),
    (_Unread, 2, "R@1 is 100.0000 with the targets last, as with them first"),
    (_Skewed, 3, "its per-query values average"),
    (_Relative, 3, "scored alone differs from their values scored with the whole set, yet the dataset says its "
                   "queries score apart"),
])
def test_check_dataset_catches_what_breaks_the_contract(tmp_path, cls, failing, why):
    root = write_toy_dataset(tmp_path / "toy")
    with registered(_broken(cls), "broken"):
        res = CliRunner().invoke(cli, ["check", "--dataset", "broken", "--data-root", str(root)])
    assert res.exit_code == 1, res.output
    lines = res.output.splitlines()
    assert [line.split()[0] for line in lines[1:failing + 2]] == ["ok"] * failing + ["FAIL"], res.output
    assert why in res.output


@pytest.mark.parametrize(("cls", "why"), [
    (_Twice, "the gallery lists image img_red_0.png twice"),
    (_SameId, "two queries share the id '5'"),
    (_Unknown, "query 3: its reference elsewhere.png is no image of the set"),
    (_Stray, "query 2: its candidate elsewhere.png is not in the gallery"),
])
def test_a_run_refuses_a_set_it_cannot_score_as_built(tmp_path, tiny_config, cls, why):
    """Without a contract check first, a run on such a set would merge two queries' rows, score a duplicated
    gallery image twice or stop on an internal KeyError; it stops in one line, before any result is written."""
    root = write_toy_dataset(tmp_path / "toy")
    with registered(_broken(cls), "broken"):
        res = CliRunner().invoke(cli, ["run", "--method", "image-text-sum", "--dataset", "broken", "--data-root",
                                       str(root), "--backbone", str(tiny_config), "--pretrained", "none", "--no-cache",
                                       "--quiet", "--output", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert res.output.strip() == (f"error: broken/val, set 'all': {why}; its annotation files or the loader of plugin "
                                  "'broken' are wrong (cirbench check --dataset broken), nothing was scored")
    assert not (tmp_path / "out").exists()
    ranking = tmp_path / "run.predictions.jsonl"  # a ranking file is not scored against such a set either
    ranking.write_text('{"set": "all", "query": "0", "top": ["img_red_1.png"]}\n')
    with registered(_broken(cls), "broken"):
        res = CliRunner().invoke(cli, ["score", "--dataset", "broken", "--split", "val", "--data-root", str(root),
                                       str(ranking)])
    assert res.exit_code == 2 and f"broken/val, set 'all': {why}; " in res.output, res.output


def test_check_dataset_from_the_command_line(tmp_path):
    root = write_toy_dataset(tmp_path / "toy")
    with registered(ToyDatasetPlugin(), "toy"):
        res = CliRunner().invoke(cli, ["check", "--dataset", "toy", "--data-root", str(root), "--split", "val"])
        assert res.exit_code == 0, res.output
        assert res.output.count("  ok    ") == len(DATASET_CHECKS) and "'toy' keeps the contract" in res.output
        res = CliRunner().invoke(cli, ["check", "--dataset", "toy", "--data-root", str(root), "--split", "test"])
        assert res.exit_code == 0 and "the targets of 'test' are hidden" in res.output, res.output
        res = CliRunner().invoke(cli, ["check", "--dataset", "toy", "--method", "slerp"])
        assert res.exit_code == 2 and "--method or --dataset" in res.output, res.output
