"""i-CIR: the official CSV files, one ranking per instance, and mAP / mmAP / minmAP as the official
``compute_ap``, ``map_calc_icir`` and ``save_results`` compute them (transcribed below as the oracle)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cirbench.backbones import load_backbone
from cirbench.encode import encode_images
from cirbench.errors import AnnotationError, CirbenchError
from cirbench.evaluate import RunConfig, evaluate
from cirbench.plugins import get_registry
from cirbench.retrieval import Ranking
from cirbench.types import ImageRef

INSTANCES = {"temple": ("at night", "in snow"), "teddy": ("as a drawing",), "bridge": ("at night", "in fog")}


# -- the official code, transcribed (github.com/billpsomas/icir, utils.py and utils_retrieval.py) ---------------
def official_compute_ap(ranks, nres):
    ap = 0.0
    recall_step = 1.0 / (nres + 1e-5)
    for j in range(len(ranks)):
        rank = ranks[j]
        precision_0 = 1.0 if rank == 0 else float(j) / rank
        precision_1 = float(j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * recall_step / 2.0
    return ap


def official_aps(rankings, q_instances, q_texts, db_instances, db_texts):
    """map_calc_icir's APs for one instance: ``rankings`` [Q, N] database positions, best first."""
    correct = np.zeros(rankings.shape)
    for q in range(rankings.shape[0]):
        for pos, db in enumerate(rankings[q].tolist()):
            if q_instances[q] == db_instances[db] and q_texts[q] == db_texts[db]:
                correct[q, pos] = 1.0
    return [official_compute_ap(np.where(row != 0)[0], len(np.where(row != 0)[0])) for row in correct]


def official_summary(aps_by_instance):
    """save_results: mAP over every query, mmAP over the instances' means, minmAP over their minima (x100)."""
    every = [a for aps in aps_by_instance for a in aps]
    return (np.mean(every) * 100, np.mean([np.mean(a) for a in aps_by_instance]) * 100,
            np.mean([np.min(a) for a in aps_by_instance]) * 100)


# -- a generated i-CIR folder ---------------------------------------------------------------------------------
def write_icir(root, prefix="icir/"):
    """``root`` (the icir folder) with both CSV files naming images from the folder above (``prefix``), as the
    official scripts join them to ``./data``: per instance, positives for each text, hard negatives of another
    text, and one or two query images."""
    rng = np.random.default_rng(0)
    query_rows, database_rows = [], []
    for k, (instance, texts) in enumerate(INSTANCES.items()):
        for folder, rows, count in (("query", query_rows, 2), ("database", database_rows, 9)):
            (root / folder / instance).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                name = f"{folder}/{instance}/{i}.jpg"
                colour = tuple(int(c) for c in rng.integers(0, 255, 3))
                Image.new("RGB", (24 + 4 * k, 20 + 2 * i), colour).save(root / name)
                text = texts[i % len(texts)] if folder == "query" or i < 6 else "a hard negative"
                if folder == "query" and instance == "teddy" and i == 1:
                    continue  # an instance with one query
                rows.append(f"{prefix}{name},{text},{instance}")
    (root / "query_files.csv").write_text("\n".join(query_rows) + "\n")
    (root / "database_files.csv").write_text("\n".join(database_rows) + "\n")
    return root


def _dataset(root):
    spec = get_registry().dataset("icir")
    return spec.create(root, {})


def test_the_files_become_one_ranking_per_instance(tmp_path):
    root = write_icir(tmp_path / "icir")
    (es,) = _dataset(root).load("test")
    assert es.query_galleries and len(es.gallery) == 27 and len(es.queries) == 5
    first = es.queries[0]
    assert first.reference == "icir/query/temple/0.jpg" and first.texts == ("at night",)
    assert es.images[first.reference].path == root / "query/temple/0.jpg"  # the folder's own name dropped
    assert set(first.candidates) == {f"icir/database/temple/{i}.jpg" for i in range(9)}
    assert first.targets == tuple(f"icir/database/temple/{i}.jpg" for i in (0, 2, 4))  # same instance and text
    assert {q.category for q in es.queries} == set(INSTANCES)


@pytest.mark.parametrize(("content", "message"), [
    ("icir/query/a.jpg,at night\n", "line 1: expected 'image_path,text,instance'"),
    ("icir/query/a.jpg,at night, with a comma,temple\n", "line 1: expected"),
    ("\n\n", "is empty"),
    ("icir/query/a.jpg,at night,nowhere\n", "instance 'nowhere' has no image in database_files.csv"),
])
def test_malformed_files_are_one_line_errors(tmp_path, content, message):
    root = write_icir(tmp_path / "icir")
    (root / "query_files.csv").write_text(content)
    with pytest.raises(AnnotationError, match=message):
        _dataset(root).load("test")
    (root / "query_files.csv").unlink()
    with pytest.raises(AnnotationError, match="query_files.csv is missing .*is --data-root .*icir right"):
        _dataset(root).load("test")


def test_errors_found_after_reading_name_the_files_line(tmp_path):
    """A query whose instance has no database image, or whose image is a database image: the line number counts
    the blank lines before it, as an editor shows the file."""
    root = write_icir(tmp_path / "icir")
    rows = (root / "query_files.csv").read_text().splitlines()
    (root / "query_files.csv").write_text("\n".join([rows[0], "", rows[1], "icir/query/a.jpg,at night,nowhere"]))
    with pytest.raises(AnnotationError, match=r"query_files.csv, line 4: instance 'nowhere' has no image"):
        _dataset(root).load("test")
    database = (root / "database_files.csv").read_text().splitlines()[0]
    (root / "query_files.csv").write_text("\n".join(["", "", rows[0], database]))
    with pytest.raises(AnnotationError, match=r"line 4: query image icir/database/.*0.jpg is also a database image"):
        _dataset(root).load("test")


def test_an_image_listed_twice_in_the_database_is_two_entries(tmp_path):
    """As the official loader ranks the database rows as listed: a repeated row is another entry of its instance's
    ranking (a second positive where its text matches), told apart by its id."""
    root = write_icir(tmp_path / "icir")
    rows = (root / "database_files.csv").read_text().splitlines()
    (root / "database_files.csv").write_text("\n".join([*rows, rows[0], rows[0]]) + "\n")
    (es,) = _dataset(root).load("test")
    first = rows[0].split(",")[0]
    assert [im.id for im in es.gallery[-2:]] == [f"{first}#1", f"{first}#2"]
    assert es.gallery[-1].path == es.gallery[0].path
    assert es.queries[0].targets == (first, *es.queries[0].targets[1:3], f"{first}#1", f"{first}#2")
    assert len(es.queries[0].candidates) == 11


def test_average_precision_is_the_official_one():
    """Real-shaped rankings (an instance's database of hundreds, a few positives, none for one query)."""
    from cirbench.metrics import trapezoid_ap_per_query

    gen = torch.Generator().manual_seed(3)
    hits = torch.rand(40, 700, generator=gen) < 0.01
    hits[:2] = False
    hits[1, :5] = True
    ours = trapezoid_ap_per_query(hits) / 100
    for q in range(hits.shape[0]):
        positions = np.where(hits[q].numpy())[0]
        assert ours[q].item() == pytest.approx(official_compute_ap(positions, len(positions)), abs=1e-12)
    assert ours[0] == 0 and 0.9999 < ours[1] < 1  # the 1e-5 guard, kept


def test_a_run_scores_as_the_official_evaluation(tmp_path, tiny_config):
    """image-only on a generated i-CIR: each query ranks its instance's database only; mAP, mmAP and minmAP
    equal the official code's on the same features, ranked per instance with argsort."""
    root = write_icir(tmp_path / "icir")
    cfg = RunConfig(method="image-only", dataset="icir", split="test", backbone=str(tiny_config),
                    pretrained="none", data_root=root, output=tmp_path / "results", cache_dir=tmp_path / "cache",
                    workers=0, progress=False, bootstrap=0)
    (out,) = evaluate(cfg)
    bb = load_backbone(str(tiny_config), "none", device="cpu", precision="fp32")
    (es,) = _dataset(root).load("test")
    refs = [ImageRef(g.id, g.path, root=root) for g in es.gallery] + [es.images[q.reference] for q in es.queries]
    with torch.no_grad():
        feats = encode_images(refs, bb.encode_image, bb.preprocessor(out.record["preprocess"]["kind"]), workers=0,
                              progress=False).double()
    db, queries = feats[: len(es.gallery)], feats[len(es.gallery):]
    lines = [line.split(",") for line in (root / "database_files.csv").read_text().splitlines()]
    db_texts, db_instances = [t for _, t, _ in lines], [i for _, _, i in lines]
    qlines = [line.split(",") for line in (root / "query_files.csv").read_text().splitlines()]
    aps_by_instance = []
    for instance in sorted({i for _, _, i in qlines}):
        qi = [k for k, (_, _, i) in enumerate(qlines) if i == instance]
        di = [k for k, i in enumerate(db_instances) if i == instance]
        rankings = torch.argsort(queries[qi] @ db[di].T, dim=1, descending=True).numpy()
        aps_by_instance.append(official_aps(rankings, [instance] * len(qi), [qlines[k][1] for k in qi],
                                            [db_instances[k] for k in di], [db_texts[k] for k in di]))
    expected = official_summary(aps_by_instance)
    got = out.metrics
    assert (got["mAP"], got["mmAP"], got["minmAP"]) == pytest.approx(expected, abs=1e-6)
    assert out.record["counts"]["queries"] == 5


def test_metrics_group_queries_by_instance():
    """mmAP and minmAP from a hand-made ranking: instance a's queries find their positive first and second, b's
    has none."""
    from cirbench.datasets.icir.dataset import ICIR
    from cirbench.types import EvalSet, Query

    gallery = [ImageRef(n, f"/x/{n}") for n in ("a0", "a1", "b0", "b1")]
    queries = [Query("0", "qa", ("t",), ("a0",), ("a0", "a1"), "a"),
               Query("1", "qa", ("t",), ("a0",), ("a0", "a1"), "a"),
               Query("2", "qb", ("t",), (), ("b0", "b1"), "b")]
    es = EvalSet("test", gallery, queries, {}, query_galleries=True)
    ranking = Ranking(["0", "1", "2"], [g.id for g in gallery], torch.tensor([[0, 1], [1, 0], [2, 3]]),
                      torch.zeros(3, 2))
    metrics = ICIR(None).metrics(es, ranking)
    perfect = 1 / (1 + 1e-5) * 100
    second = (0 + 1 / 2) / 2 / (1 + 1e-5) * 100  # the only positive second: precisions 0/1 before, 1/2 after
    assert metrics["mAP"] == pytest.approx((perfect + second + 0) / 3)
    assert metrics["mmAP"] == pytest.approx(((perfect + second) / 2 + 0) / 2)
    assert metrics["minmAP"] == pytest.approx((second + 0) / 2)


def test_rankings_made_elsewhere_are_scored_whole(tmp_path, tiny_config):
    """`cirbench score`: a file ranking every query's whole instance database scores as the live run did;
    a ranking cut short, or holding another instance's image, is a one-line error."""
    import json

    from click.testing import CliRunner

    from cirbench.cli import cli

    root = write_icir(tmp_path / "icir")
    (es,) = _dataset(root).load("test")
    rows = [{"query": q.id, "top": sorted(q.candidates, reverse=(int(q.id) % 2 == 0))} for q in es.queries]
    good = tmp_path / "mine.predictions.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = CliRunner().invoke(cli, ["score", "--dataset", "icir", "--split", "test", "--data-root", str(root),
                                   str(good), "--json"])
    assert res.exit_code == 0, res.output
    scored = json.loads(res.output)
    aps_by_instance: dict[str, list[float]] = {}
    for r in rows:
        q = es.queries[int(r["query"])]
        positions = [i for i, image in enumerate(r["top"]) if image in q.targets]
        aps_by_instance.setdefault(str(q.category), []).append(official_compute_ap(positions, len(positions)))
    assert (scored["mAP"], scored["mmAP"], scored["minmAP"]) == pytest.approx(
        official_summary(list(aps_by_instance.values())), abs=1e-6)
    short = [dict(r, top=r["top"][:5]) if r["query"] == "0" else r for r in rows]
    bad = tmp_path / "short.predictions.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in short))
    res = CliRunner().invoke(cli, ["score", "--dataset", "icir", "--split", "test", "--data-root", str(root),
                                   str(bad)])
    assert res.exit_code == 2 and "query 0: the ranking has 5 ids, at least 9 are needed" in res.output
    other = [dict(r, top=[*r["top"][:-1], "icir/database/teddy/0.jpg"]) if r["query"] == "0" else r for r in rows]
    bad.write_text("".join(json.dumps(r) + "\n" for r in other))
    res = CliRunner().invoke(cli, ["score", "--dataset", "icir", "--split", "test", "--data-root", str(root),
                                   str(bad)])
    assert res.exit_code == 2 and "is not in the database of the query's instance" in res.output


def test_the_clamped_product_baseline_ranks_as_icirs(tmp_path, tiny_config):
    """image-text-product --clamp is i-CIR's 'product' method: both similarities clipped at 0, multiplied."""
    import json

    root = write_icir(tmp_path / "icir")
    cfg = RunConfig(method="image-text-product", dataset="icir", split="test", backbone=str(tiny_config),
                    pretrained="none", data_root=root, output=tmp_path / "results", cache_dir=tmp_path / "cache",
                    workers=0, progress=False, bootstrap=0, method_options={"clamp": True})
    (out,) = evaluate(cfg)
    assert out.record["method"]["label"] == "image-text-product+clamped"
    bb = load_backbone(str(tiny_config), "none", device="cpu", precision="fp32")
    (es,) = _dataset(root).load("test")
    refs = [ImageRef(g.id, g.path, root=root) for g in es.gallery] + [es.images[q.reference] for q in es.queries]
    with torch.no_grad():
        feats = encode_images(refs, bb.encode_image, bb.preprocessor("clip"), workers=0, progress=False).float()
        text = bb.encode_text([q.texts[0] for q in es.queries]).float()
    db, queries = feats[: len(es.gallery)], feats[len(es.gallery):]
    rows = {r["query"]: r["top"] for r in map(json.loads, out.predictions_path.read_text().splitlines())}
    position = {g.id: i for i, g in enumerate(es.gallery)}
    for qi, q in enumerate(es.queries):
        di = [position[c] for c in sorted(q.candidates)]
        sim_img = torch.clamp(queries[qi : qi + 1] @ db[di].T, min=0)
        sim_text = torch.clamp(text[qi : qi + 1] @ db[di].T, min=0)
        score = dict(zip((es.gallery[j].id for j in di), (sim_img * sim_text)[0].tolist(), strict=True))
        # the official argsort orders equal scores (zeros, after the clip) arbitrarily: ours must be sorted
        assert sorted(rows[q.id]) == sorted(score)
        assert all(score[a] >= score[b] for a, b in zip(rows[q.id], rows[q.id][1:], strict=False))
    # two negative similarities: 0 clipped (i-CIR), a positive product as they are (FREEDOM)
    from cirbench.methods.basic.model import ImageTextProduct

    sims = torch.tensor([[[-0.5, 0.2], [-0.5, 0.3]]])
    for clamp, expected in ((True, [0.0, 0.06]), (False, [0.25, 0.06])):
        method = ImageTextProduct(bb, {"clamp": clamp})
        assert method.combine_scores(sims)[0].tolist() == pytest.approx(expected)


def test_a_run_saving_whole_rankings_scores_again_as_it_ran(tmp_path, tiny_config):
    """`run --save-top all` writes every query's whole instance database, ranked, and `cirbench score` on that
    predictions file gives the run's numbers; a run keeping fewer (`--save-top 3`) writes a file that score refuses
    rather than scoring short rankings; a count below 1 is a usage error."""
    import json

    from click.testing import CliRunner

    from cirbench.cli import cli

    root = write_icir(tmp_path / "icir")
    base = ["run", "--method", "image-only", "--dataset", "icir", "--data-root", str(root), "--backbone",
            str(tiny_config), "--pretrained", "none", "--cache-dir", str(tmp_path / "cache"), "--workers", "0",
            "--bootstrap", "0", "--no-leaderboard", "--quiet"]

    def run(top, output):
        res = CliRunner().invoke(cli, [*base, "--output", str(tmp_path / output), "--save-top", top])
        assert res.exit_code == 0, res.output
        (result,) = (tmp_path / output).glob("icir/test/*.json")
        return json.loads(result.read_text()), result.with_name(result.name[: -len(".json")] + ".predictions.jsonl")

    def score(path):
        return CliRunner().invoke(cli, ["score", "--dataset", "icir", "--split", "test", "--data-root", str(root),
                                        str(path), "--json"])

    record, whole = run("all", "all")
    assert record["predictions"]["top"] == "all" and record["predictions"]["rows"] == 5
    (es,) = _dataset(root).load("test")
    rows = [json.loads(line) for line in whole.read_text().splitlines()]
    assert [len(r["top"]) for r in rows] == [len(q.candidates) for q in es.queries]
    res = score(whole)
    assert res.exit_code == 0, res.output
    again = json.loads(res.output)
    assert {k: again[k] for k in ("mAP", "mmAP", "minmAP")} == pytest.approx(
        {k: record["metrics"][k] for k in ("mAP", "mmAP", "minmAP")}, abs=1e-6)
    from cirbench.reproduce import config_of

    assert config_of(record, output=tmp_path / "again").save_topk is None  # reproduce writes what the run wrote
    record, cut = run("3", "three")
    assert record["predictions"]["top"] == 3 and config_of(record, output=tmp_path / "again").save_topk == 3
    older = {**record, "predictions": {k: v for k, v in record["predictions"].items() if k != "top"}}
    assert config_of(older, output=tmp_path / "again").save_topk == 50  # written before the count was recorded
    edited = {**record, "predictions": {**record["predictions"], "top": "most"}}
    with pytest.raises(CirbenchError, match="predictions.top is 'most', neither a count nor 'all'"):
        config_of(edited, output=tmp_path / "again")
    assert {len(json.loads(line)["top"]) for line in cut.read_text().splitlines()} == {3}
    res = score(cut)
    assert res.exit_code == 2 and "the ranking has 3 ids, at least" in res.output
    res = CliRunner().invoke(cli, [*base, "--output", str(tmp_path / "zero"), "--save-top", "0"])
    assert res.exit_code == 2 and "'0' is neither a count of at least 1 nor 'all'" in res.output
    assert not (tmp_path / "zero").exists()


# -- WeiCom (github.com/billpsomas/rscir, utils.py norm_cdf and evaluate.py calculate_rankings), transcribed ------
def official_norm_cdf(matrix, dim=0):
    row_means = matrix.mean(dim=dim, keepdim=True)
    row_stds = matrix.std(dim=dim, keepdim=True)
    matrix = 0.5 * (1 + torch.erf((matrix - row_means) / (row_stds * torch.sqrt(torch.tensor(2.0)))))
    return matrix


def official_weicom_scores(query_features, text_features, database_features, lam=0.5):
    """calculate_rankings("Weighted Similarities Norm") for one query (1-D features), before its argsort."""
    sim_img = (query_features @ database_features.t())
    sim_text = (text_features @ database_features.t())
    sim_img = official_norm_cdf(sim_img)
    sim_text = official_norm_cdf(sim_text)
    return (1 - lam) * sim_img + lam * sim_text


@pytest.mark.parametrize("lam", [0.5, 0.3])
def test_weicom_ranks_each_instance_as_the_official_code(tmp_path, tiny_config, lam):
    """weicom on i-CIR: each query's similarities standardised over its own instance's database (not the
    union of the databases the run encodes), as the official scoring of that database alone ranks them."""
    import json

    root = write_icir(tmp_path / "icir")
    cfg = RunConfig(method="weicom", dataset="icir", split="test", backbone=str(tiny_config), pretrained="none",
                    data_root=root, output=tmp_path / "results", cache_dir=tmp_path / "cache", workers=0,
                    progress=False, bootstrap=0, method_options={"lam": lam})
    (out,) = evaluate(cfg)
    bb = load_backbone(str(tiny_config), "none", device="cpu", precision="fp32")
    (es,) = _dataset(root).load("test")
    refs = [ImageRef(g.id, g.path, root=root) for g in es.gallery] + [es.images[q.reference] for q in es.queries]
    with torch.no_grad():
        feats = encode_images(refs, bb.encode_image, bb.preprocessor("clip"), workers=0, progress=False).float()
        text = torch.nn.functional.normalize(bb.encode_text([q.texts[0] for q in es.queries]).float(), dim=-1)
    feats = torch.nn.functional.normalize(feats, dim=-1)  # extract_features.py stores unit features
    db, queries = feats[: len(es.gallery)], feats[len(es.gallery):]
    rows = {r["query"]: r for r in map(json.loads, out.predictions_path.read_text().splitlines())}
    position = {g.id: i for i, g in enumerate(es.gallery)}
    for qi, q in enumerate(es.queries):
        di = [position[c] for c in sorted(q.candidates)]
        score = official_weicom_scores(queries[qi], text[qi], db[di], lam)
        ranking = torch.argsort(score, descending=True)
        assert rows[q.id]["top"] == [es.gallery[di[j]].id for j in ranking.tolist()], q.id
        assert rows[q.id]["scores"] == pytest.approx(score[ranking].tolist(), abs=1e-5)


def test_weicom_standardises_every_query_of_a_large_set():
    """More queries than one chunk of the standardisation (256), some ranking their own candidates: every query's
    fused scores are the official ``norm_cdf`` mix over its own gallery."""
    from types import SimpleNamespace

    from cirbench.method import with_constant
    from cirbench.methods.basic.model import WeiCom
    from cirbench.types import Query

    gen = torch.Generator().manual_seed(0)

    def unit(*shape):
        return torch.nn.functional.normalize(torch.randn(*shape, generator=gen), dim=-1)

    ids = [f"g{i}" for i in range(40)]
    image, text, gallery = unit(600, 16), unit(600, 16), unit(40, 16)
    own = {qi: tuple(ids[qi % 7: qi % 7 + 9]) for qi in range(0, 600, 97)}  # a few queries with a database of 9
    queries = [Query(id=str(qi), reference="g0", texts=("x",), candidates=own.get(qi)) for qi in range(600)]
    weicom = SimpleNamespace(rows={image_id: i for i, image_id in enumerate(ids)}, options={"lam": 0.3})
    prepared = with_constant(gallery, 1.0)
    composed = with_constant(torch.stack([image, text], dim=1), 0.0)
    finalized = WeiCom.finalize_queries(weicom, queries, composed, prepared)
    for qi in range(600):
        rows = [weicom.rows[c] for c in own[qi]] if qi in own else list(range(40))
        scores = WeiCom.combine_scores(weicom, torch.einsum("kd,gd->kg", finalized[qi], prepared[rows]))
        want = official_weicom_scores(image[qi], text[qi], gallery[rows], 0.3)
        torch.testing.assert_close(scores, want, rtol=1e-4, atol=1e-5)
