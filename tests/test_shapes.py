"""The embedded shapes benchmark and the bundled backbone: deterministic, meaningful, offline."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cirbench.backbones import load_backbone
from cirbench.cli import cli
from cirbench.datasets.shapes.dataset import FORMAT_VERSION
from cirbench.encode import encode_images
from cirbench.errors import CirbenchError
from cirbench.plugins import get_registry

SLERP_RESULT = "slerp@alpha=0.7__cirbench-shapes-clip-bundled.json"  # `cirbench run`'s default Slerp result


def shapes(root, **options):
    spec = get_registry().dataset("shapes")
    opts = {o.name: o.default for o in spec.options}
    opts.update(options)
    return spec.create(root, opts)


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def val_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    shapes(root).load("val")
    return root


def test_generation_is_deterministic_and_seeded(tmp_path, val_root):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for root, seed in ((a, 0), (b, 0), (c, 1)):
        shapes(root, generator_seed=seed, queries=20, instances=1).load("test")
    folder = "test-queries20-instances1"  # not the defaults: a folder of their own
    assert _digest(a / folder) == _digest(b / folder)
    assert _digest(a / folder) != _digest(c / folder)
    assert not list(tmp_path.glob("a/.test-*"))  # no half-written folders left behind


def test_other_generation_options_are_never_served_from_anothers_folder(tmp_path):
    """A run that asks 20 queries gets 20, whatever was generated before under the same seed; a folder
    stamped with other options (an older cirbench kept one folder per seed) is made again."""
    (small,) = shapes(tmp_path, queries=20, instances=1).load("val")
    (other,) = shapes(tmp_path, queries=30, instances=1).load("val")
    (again,) = shapes(tmp_path, queries=20, instances=1).load("val")
    assert (len(small.queries), len(other.queries), len(again.queries)) == (20, 30, 20)
    assert len(small.gallery) == 432
    stale = tmp_path / "val-queries20-instances1" / ".complete"
    stale.write_text(json.dumps({"version": "v1", "options": {"generator_seed": 0, "queries": 7, "instances": 1}}))
    (remade,) = shapes(tmp_path, queries=20, instances=1).load("val")
    assert len(remade.queries) == 20 and json.loads(stale.read_text())["options"]["queries"] == 20


def test_processes_generating_at_once_take_turns(tmp_path, monkeypatch):
    """torchrun ranks (or parallel jobs on one cache) that ask for the same split at once: one generates, the
    others wait and read its folder; none deletes the folder another is reading."""
    import threading
    import time

    from cirbench.datasets.shapes.dataset import Shapes

    made, write = [], Shapes._write_queries

    def slow_write(self, split, folder):
        made.append(folder)
        time.sleep(0.5)  # long enough for the other maker to arrive while this one writes
        write(self, split, folder)

    monkeypatch.setattr(Shapes, "_write_queries", slow_write)
    start, results, errors = threading.Barrier(3), [], []

    def load():
        start.wait()
        try:
            results.append(shapes(tmp_path, queries=10, instances=1).load("val")[0])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(made) == 1
    assert all(len(r.queries) == 10 and all(Path(g.path).is_file() for g in r.gallery) for r in results)


def test_queries_change_one_or_two_attributes_and_have_distractors(val_root):
    (es,) = shapes(val_root).load("val")
    gallery = {g["id"]: tuple(g["attributes"].values())
               for g in json.loads((val_root / "val" / "gallery.json").read_text())}
    combos = set(gallery.values())
    assert len(es.gallery) == 432 * 3 and len(es.queries) == 400
    for q in es.queries:
        ref, tgt = q.extra["reference_attributes"], q.extra["target_attributes"]
        changed = [k for k in ref if ref[k] != tgt[k]]
        assert 1 <= len(changed) <= 2
        assert len(q.targets) == 3 and all(gallery[t] == tuple(tgt.values()) for t in q.targets)
        # every attribute of the target has a distractor that differs in that attribute only
        tv = tuple(tgt.values())
        for i in range(5):
            assert any(c[i] != tv[i] and all(c[j] == tv[j] for j in range(5) if j != i) for c in combos)


def test_train_split_is_a_corpus(tmp_path):
    ds = shapes(tmp_path, train_size=10)
    with pytest.raises(CirbenchError, match="training corpus.*train.csv"):
        ds.load("train")
    rows = (tmp_path / "train-trainsize10" / "train.csv").read_text().splitlines()
    assert ds.corpus_path() == tmp_path / "train-trainsize10" / "train.csv"
    assert rows[0] == "image,caption,subject,attribute" and len(rows) == 11


def test_bundled_backbone_loads_offline_and_retrieves_captions(val_root):
    bb = load_backbone("cirbench-shapes-clip", "bundled", device="cpu")
    assert bb.identity()["weights"]["kind"] == "bundled"
    (es,) = shapes(val_root).load("val")
    attrs = {g["id"]: g["attributes"] for g in json.loads((val_root / "val" / "gallery.json").read_text())}
    images = encode_images(es.gallery, bb.encode_image, bb.preprocessor("clip"), batch_size=256, workers=0,
                           progress=False)
    combos = {}
    for g in es.gallery:
        combos.setdefault(tuple(attrs[g.id].values()), g.id)
    captions = [f"a {s} {c} {sh} on the {p} on a {b} background" for sh, c, s, p, b in combos]
    top1 = (bb.encode_text(captions) @ images.T).argmax(dim=1)
    hits = sum(tuple(attrs[es.gallery[int(i)].id].values()) == key for i, key in zip(top1, combos, strict=True))
    chance = 3 / len(es.gallery)
    assert hits / len(combos) > 40 * chance  # measured: 32.6% against 0.23% chance


def test_slerp_clearly_beats_both_baselines_and_is_repeatable(tmp_path, val_root):
    runner = CliRunner()
    common = ["--dataset", "shapes", "--data-root", str(val_root), "--output", str(tmp_path / "r"), "--cache-dir",
              str(tmp_path / "c"), "--workers", "0", "--quiet", "--no-leaderboard"]
    metrics = {}
    for method in ("image-only", "text-only", "slerp"):
        res = runner.invoke(cli, ["run", "--method", method, *common])
        assert res.exit_code == 0, res.output
        label = "slerp@alpha=0.7" if method == "slerp" else method
        path = tmp_path / "r" / "shapes" / "val" / f"{label}__cirbench-shapes-clip-bundled.json"
        metrics[method] = json.loads(path.read_text())["metrics"]
    assert metrics["slerp"]["mAP@5"] > 3 * metrics["image-only"]["mAP@5"]
    assert metrics["slerp"]["mAP@5"] > 10 * metrics["text-only"]["mAP@5"]
    assert metrics["slerp"]["R@10"] > metrics["image-only"]["R@10"] + 30
    res = runner.invoke(cli, ["run", "--method", "slerp", "--no-cache", *common])
    assert res.exit_code == 0, res.output
    again = json.loads((tmp_path / "r" / "shapes" / "val" / SLERP_RESULT).read_text())
    assert again["cache"]["enabled"] is False
    assert again["cache"]["misses"] == again["counts"]["gallery"]  # encoded again
    assert again["metrics"] == metrics["slerp"]  # identical across runs (and with a cold cache)
    # the run's rankings, scored as any code's would be, give its numbers; a ranking holding the query's own
    # reference (which the protocol removes) or a non-JSONL file is refused
    predictions = tmp_path / "r" / "shapes" / "val" / SLERP_RESULT.replace(".json", ".predictions.jsonl")
    score = ["score", "--dataset", "shapes", "--split", "val", "--data-root", str(val_root)]
    res = runner.invoke(cli, [*score, "--json", str(predictions)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == pytest.approx(metrics["slerp"], abs=1e-3)
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    rows[0]["top"][3] = rows[0]["reference"]
    bad = tmp_path / "bad.predictions.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = runner.invoke(cli, [*score, str(bad)])
    assert res.exit_code == 2 and rows[0]["query"] in res.output and "reference" in res.output, res.output
    bad.with_suffix(".json").write_text("{}")
    res = runner.invoke(cli, [*score, str(bad.with_suffix(".json"))])
    assert res.exit_code == 2 and "per-query ranking files" in res.output, res.output


def test_plain_cirbench_run_is_slerp_and_baselines_on_shapes_with_the_bundled_backbone(tmp_path, val_root, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CIRBENCH_CACHE", str(tmp_path / "cache"))
    # the default data root, in the cache, is the folder generated once for this module
    (tmp_path / "cache" / "shapes").mkdir(parents=True)
    (tmp_path / "cache" / "shapes" / f"{FORMAT_VERSION}-seed0").symlink_to(val_root)
    res = CliRunner().invoke(cli, ["run", "--quiet", "--workers", "0"])
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "results" / "shapes" / "val" / SLERP_RESULT).read_text())
    assert rec["method"]["options"] == {"alpha": 0.7}
    assert rec["backbone"]["weights"]["kind"] == "bundled" and rec["preprocess"]["size"] == 64
    assert "### shapes / val" in res.output  # the leaderboard is printed
    # beside the two baselines, so the first table shows what composing image and text buys
    folder = tmp_path / "results" / "shapes" / "val"
    baselines = {m: json.loads((folder / f"{m}__cirbench-shapes-clip-bundled.json").read_text())["metrics"]["mAP@5"]
                 for m in ("image-only", "text-only")}
    assert rec["metrics"]["mAP@5"] > max(baselines.values())
    board = res.output[res.output.index("### shapes / val"):]
    assert board.index("slerp@alpha=0.7") < board.index("image-only") < board.index("text-only")
    # the generated files' checksums are recorded; the same data named through --data-root is the same
    # configuration: the rerun replaces the result
    digests = {hashlib.sha256((val_root / "val" / f).read_bytes()).hexdigest() for f in ("gallery.json",
                                                                                        "queries.json")}
    assert set(rec["dataset"]["annotations"].values()) == digests
    assert sorted(rec["dataset"]["annotations"]) == ["val/gallery.json", "val/queries.json"]
    assert rec["dataset"]["data_root"] == str(val_root.resolve())  # where the data was generated
    res = CliRunner().invoke(cli, ["run", "--quiet", "--workers", "0", "--method", "slerp", "--data-root",
                                   str(val_root), "--no-leaderboard"])
    assert res.exit_code == 0, res.output
    again = json.loads((folder / SLERP_RESULT).read_text())
    assert sorted(again["dataset"]["annotations"]) == ["val/gallery.json", "val/queries.json"]
    assert again["fingerprint"] == rec["fingerprint"] and again["created"] != rec["created"]
    assert sorted(p.name for p in folder.glob("slerp*.json")) == [SLERP_RESULT]


def test_the_triplets_benchmark_script_reads_the_attributes_back_and_pairs_real_targets(tmp_path, capsys):
    """benchmarks/shapes_triplets.py (TransAgg's shapes corpus): the attributes it parses from the corpus's subject
    and attribute columns are the generator's own, for every combination; each triplet's target shows the
    combination the generator's query asks for, and its text is that query's."""
    import csv
    import importlib.util
    import random

    from cirbench.datasets.shapes import generator as G

    spec = importlib.util.spec_from_file_location("shapes_triplets",
                                                  Path(__file__).parents[1] / "benchmarks" / "shapes_triplets.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    combos = G.all_combinations()
    assert all(script.attributes(*G.subject_attribute(a)) == a for a in combos)
    rng = random.Random(1)
    chosen = [rng.choice(combos[:12]) for _ in range(60)]  # a few combinations, several images each
    with open(tmp_path / "train.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "caption", "subject", "attribute"])
        for i, a in enumerate(chosen):
            writer.writerow([f"images/train-{i:06d}.png", "a caption", *G.subject_attribute(a)])
    script.main([str(tmp_path / "train.csv"), str(tmp_path / "triplets.csv"), "--seed", "3"])
    with open(tmp_path / "triplets.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    attrs_of = {str(tmp_path / f"images/train-{i:06d}.png"): a for i, a in enumerate(chosen)}
    replay = random.Random(3)
    expected = []
    for i, a in enumerate(chosen):  # the script's own draws, replayed
        target, text = G.make_query(a, replay)
        found = [p for p, b in attrs_of.items() if b == target]
        if found:
            expected.append((str(tmp_path / f"images/train-{i:06d}.png"), text, target))
            replay.choice(found)
    assert 0 < len(rows) == len(expected) < len(chosen)  # targets the corpus lacks are left out
    for row, (image, text, target) in zip(rows, expected, strict=True):
        assert (row["image"], row["relative_caption"]) == (image, text) and attrs_of[row["target"]] == target
    assert f"{len(rows)} triplets of 60 references" in capsys.readouterr().out
