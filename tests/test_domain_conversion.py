"""Domain conversion (FREEDOM's protocol): the official file lists, one set per domain pair, and mAP / R@K / P@K
as the official ``metrics_calc`` and ``compute_map`` compute them (transcribed below as the oracle)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_icir import official_norm_cdf

from cirbench.backbones import load_backbone
from cirbench.encode import encode_images
from cirbench.errors import AnnotationError, CirbenchError
from cirbench.evaluate import RunConfig, evaluate
from cirbench.plugins import get_registry
from cirbench.types import ImageRef

DOMAINS = {"autumn": "autumn", "dim": "dimlight", "rock": "rock"}  # three of NICO++'s, one renamed as officially
CLASSES = ("airplane", "bear", "cat")


# -- the official code, transcribed (github.com/NikosEfth/freedom, utils.py and utils_retrieval.py) --------------
def official_compute_ap(ranks, nres):
    nimgranks = len(ranks)
    ap = 0
    recall_step = 1.0 / (nres + 1e-5)
    for j in np.arange(nimgranks):
        rank = ranks[j]
        precision_0 = 1.0 if rank == 0 else float(j) / rank
        precision_1 = float(j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * recall_step / 2.0
    return ap


def official_metrics_calc(rankings, target_domain, current_query_classes, database_classes, database_domains, at):
    """metrics_calc in its composed mode, without the rounding (which cirbench leaves to display)."""
    metrics = {}
    class_id_map = {class_name: idx for idx, class_name in enumerate(database_classes)}
    domain_id_map = {domain_name: idx for idx, domain_name in enumerate(database_domains)}
    database_classes_tensor = torch.tensor([class_id_map[c] for c in database_classes])
    database_domains_tensor = torch.tensor([domain_id_map[d] for d in database_domains])
    query_classes_tensor = torch.tensor([class_id_map[c] for c in current_query_classes])
    target_domain_tensor = torch.tensor(domain_id_map[target_domain])
    match_class = (database_classes_tensor[rankings] == query_classes_tensor.unsqueeze(1)).float()
    match_domain = (database_domains_tensor[rankings] == target_domain_tensor).float()
    correct = (match_class * match_domain).numpy()
    aps = [official_compute_ap(np.where(row != 0)[0], len(np.where(row != 0)[0])) for row in correct]
    metrics["mAP"] = np.mean(aps) * 100
    correct = torch.from_numpy(correct)
    for k in at:
        correct_k = correct[:, :k]
        num_correct = torch.sum(correct_k, dim=1)
        num_predicted = torch.sum(torch.ones_like(correct_k), dim=1)
        num_total = torch.sum(correct, dim=1)
        metrics[f"R@{k}"] = torch.mean(num_correct / (num_total + 1e-5)).item() * 100
        metrics[f"P@{k}"] = torch.mean(num_correct / (torch.minimum(num_total, num_predicted) + 1e-5)).item() * 100
    return metrics


# -- a generated benchmark ---------------------------------------------------------------------------------------
def write_benchmark(root, full=False):
    """A NICO++-like folder (query and database lists), or, ``full``, one list for both (as LTLL's)."""
    rng = np.random.default_rng(0)
    rows = {"query": [], "database": []}
    for d, domain in enumerate(DOMAINS):
        for c, label in enumerate(CLASSES):
            folder = root / domain / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(4):
                name = f"{domain}/{label}/{domain}_{i}.jpg"
                colour = tuple(int(x) for x in rng.integers(0, 255, 3))
                Image.new("RGB", (20 + 4 * c, 18 + 3 * d + i), colour).save(root / name)
                rows["query" if i == 0 and not full else "database"].append(f"nico/{name} {domain} {label}")
    if full:
        (root / "full_files.csv").write_text("\n".join(rows["database"]) + "\n")
    else:
        (root / "query_files.csv").write_text("\n".join(rows["query"]) + "\n")
        (root / "database_files.csv").write_text("\n".join(rows["database"]) + "\n")
    return root


def _cfg(tmp_path, tiny_config, root, dataset="dc-nico", method="image-only", **dataset_options):
    return RunConfig(method=method, dataset=dataset, split="test", backbone=str(tiny_config), pretrained="none",
                     data_root=root, output=tmp_path / "results", cache_dir=tmp_path / "cache", workers=0,
                     progress=False, bootstrap=0, dataset_options=dataset_options)


# FREEDOM's utils_retrieval.py (commit 5df4bca), per --dataset: the domain names of its files mapped to the words
# of the text queries, and the Recall/Precision cut-offs `at` its metrics_calc reports
OFFICIAL_SETTINGS = {
    "dc-imagenet-r": ({"real": "photo", "cartoon": "cartoon", "origami": "origami", "toy": "toy",
                       "sculpture": "sculpture"}, [10, 50]),
    "dc-nico": ({"autumn": "autumn", "dim": "dimlight", "grass": "grass", "outdoor": "outdoor", "rock": "rock",
                 "water": "water"}, [50, 100]),
    "dc-minidn": ({"clipart": "clipart", "painting": "painting", "real": "photo", "sketch": "sketch"}, [50, 100]),
    "dc-ltll": ({"New": "Today", "Old": "Archive"}, [5, 10]),
}


@pytest.mark.parametrize("dataset", sorted(OFFICIAL_SETTINGS))
def test_each_benchmark_takes_the_official_domains_and_cut_offs(dataset):
    """The runs below patch the cut-offs for a tiny database: the real ones are checked here, as the metrics a
    leaderboard orders too."""
    from cirbench.datasets import domain_conversion

    domains, at = OFFICIAL_SETTINGS[dataset]
    _files, ours, ks = domain_conversion.BENCHMARKS[dataset]
    assert ours == domains and list(ks) == at
    metrics = ["mAP", *(f"R@{k}" for k in at), *(f"P@{k}" for k in at)]
    assert get_registry().dataset(dataset).metric_order == tuple(f"avg/{m}" for m in metrics)


@pytest.mark.parametrize(("dataset", "full"), [("dc-nico", False), ("dc-ltll", True)])
def test_a_run_scores_as_the_official_evaluation(tmp_path, tiny_config, monkeypatch, dataset, full):
    """image-only, text-only and their sum and product, every pair of distinct domains: each pair's metrics and
    their mean equal the
    official metrics_calc on the same features ranked over the whole database with argsort (which computes
    Recall and Precision in float32: equal to 1e-4)."""
    from cirbench.datasets import domain_conversion

    ks = (2, 4)
    monkeypatch.setitem(domain_conversion.BENCHMARKS, dataset,
                        (("full_files.csv",) if full else ("query_files.csv", "database_files.csv"), DOMAINS, ks))
    root = write_benchmark(tmp_path / "nico", full=full)
    bb = load_backbone(str(tiny_config), "none", device="cpu", precision="fp32")
    lists = ["full_files.csv"] * 2 if full else ["query_files.csv", "database_files.csv"]
    qrows, drows = ([line.split(" ") for line in (root / f).read_text().splitlines()] for f in lists)
    refs = [ImageRef(n, root / n.removeprefix("nico/"), root=root) for n, _, _ in drows]
    with torch.no_grad():
        db = encode_images(refs, bb.encode_image, bb.preprocessor("clip"), workers=0, progress=False).float()
        q = encode_images([ImageRef(n, root / n.removeprefix("nico/"), root=root) for n, _, _ in qrows],
                          bb.encode_image, bb.preprocessor("clip"), workers=0, progress=False).float()
    for method in ("image-only", "text-only", "image-text-sum", "image-text-product", "weicom"):
        (out,) = evaluate(_cfg(tmp_path, tiny_config, root, dataset, method))
        pairs = []
        for source in DOMAINS.values():
            idx = [i for i, (_, d, _) in enumerate(qrows) if DOMAINS[d] == source]
            for target in DOMAINS.values():
                if target == source:
                    continue
                # the official calculate_rankings' image, text, sum and product branches
                sim_img, sim_text = q[idx] @ db.T, (bb.encode_text([target]).float() @ db.T).expand(len(idx), -1)
                if method == "weicom":  # rscir's "Weighted Similarities Norm", lam 0.5, over the database
                    total = 0.5 * official_norm_cdf(sim_img, dim=1) + 0.5 * official_norm_cdf(sim_text, dim=1)
                else:
                    total = {"image-only": sim_img, "text-only": sim_text, "image-text-sum": sim_img + sim_text,
                             "image-text-product": torch.mul(sim_img, sim_text)}[method]
                rankings = torch.argsort(total, dim=1, descending=True)
                expected = official_metrics_calc(rankings, target, [qrows[i][2] for i in idx],
                                                 [c for _, _, c in drows], [DOMAINS[d] for _, d, _ in drows], ks)
                pairs.append(expected)
                for metric, value in expected.items():
                    assert out.metrics[f"{source}->{target}/{metric}"] == pytest.approx(value, abs=1e-4), \
                        (method, source, target, metric)
        for metric in pairs[0]:
            assert out.metrics[f"avg/{metric}"] == pytest.approx(np.mean([p[metric] for p in pairs]), abs=1e-4)
        assert len(out.record["per_set_metrics"]) == 6


def test_a_whole_gallery_ranking_too_large_at_once_is_scored_in_parts_with_the_same_numbers(tmp_path, tiny_config,
                                                                                           monkeypatch):
    """A set whose whole-gallery ranking would hold more than STREAM_ENTRIES entries is ranked and scored a part of
    its queries at a time: the metrics, per-query values and predictions are those of the set at once (WeiCom too,
    which standardises each query's similarities over the whole gallery)."""
    from cirbench import evaluate as loop
    from cirbench.datasets import domain_conversion

    monkeypatch.setitem(domain_conversion.BENCHMARKS, "dc-nico", (("query_files.csv", "database_files.csv"), DOMAINS,
                                                                  (2, 4)))
    root = write_benchmark(tmp_path / "nico")  # 27 database images; 3 queries per source domain, 6 pairs
    for method in ("image-only", "weicom"):
        (whole,) = evaluate(_cfg(tmp_path / "whole", tiny_config, root, method=method))
        with monkeypatch.context() as patch:
            patch.setattr(loop, "STREAM_ENTRIES", 2 * 27)  # parts of 2 queries
            (parts,) = evaluate(_cfg(tmp_path / "parts", tiny_config, root, method=method))
        assert parts.metrics == whole.metrics and parts.record["counts"] == whole.record["counts"]
        rows = [[json.loads(line) for line in o.predictions_path.read_text().splitlines()] for o in (whole, parts)]
        assert len(rows[0]) == len(rows[1]) == 6 * 3  # every pair's 3 queries, in order, ranked alike
        for a, b in zip(*rows, strict=True):  # a part of one query may round a score's last bit otherwise
            assert a["scores"] == pytest.approx(b["scores"], abs=2e-6)
            assert {k: v for k, v in a.items() if k != "scores"} == {k: v for k, v in b.items() if k != "scores"}
    seen, real = [], loop.rank

    def spy(queries, *args, **kwargs):
        seen.append(len(queries))
        return real(queries, *args, **kwargs)

    monkeypatch.setattr(loop, "rank", spy)
    monkeypatch.setattr(loop, "STREAM_ENTRIES", 2 * 27)
    evaluate(_cfg(tmp_path / "spy", tiny_config, root))
    assert seen == [2, 1] * 6  # each pair's 3 queries in parts of at most 2


def test_sources_and_targets_can_be_chosen_and_bad_files_are_one_line_errors(tmp_path):
    root = write_benchmark(tmp_path / "nico")
    spec = get_registry().dataset("dc-nico")
    sets = spec.create(root, {"source": "dimlight", "target": "autumn,rock"}).load("test")
    assert [s.name for s in sets] == ["dimlight->autumn", "dimlight->rock"]
    (first,) = sets[:1]
    assert all(q.texts == ("autumn",) for q in first.queries) and len(first.queries) == 3
    assert first.queries[0].reference == "nico/dim/airplane/dim_0.jpg"
    assert first.images[first.queries[0].reference].path == root / "dim/airplane/dim_0.jpg"
    assert set(first.queries[0].targets) == {f"nico/autumn/airplane/autumn_{i}.jpg" for i in (1, 2, 3)}
    with pytest.raises(CirbenchError, match="--target: dc-nico has no domain 'dim'; valid: autumn, dimlight"):
        spec.create(root, {"target": "dim"}).load("test")
    with pytest.raises(CirbenchError, match="leave no pair"):
        spec.create(root, {"source": "rock", "target": "rock"}).load("test")
    # the generated benchmark holds three of NICO++'s six domains: the whole of it is refused, not averaged short
    with pytest.raises(AnnotationError, match="has no query of domain 'grass' .*choose domains with --source"):
        spec.create(root, {}).load("test")
    (root / "query_files.csv").write_text("nico/dim/airplane/dim_0.jpg dim\n")
    with pytest.raises(AnnotationError, match="line 1: expected '<image> <domain> <class>'"):
        spec.create(root, {}).load("test")
    (root / "query_files.csv").unlink()
    with pytest.raises(AnnotationError, match="query_files.csv is missing .*is --data-root .* right"):
        spec.create(root, {}).load("test")


def test_rankings_made_elsewhere_are_scored_with_the_runs_domains(tmp_path, tiny_config):
    """`cirbench score` takes the dataset's options as `run` does (before or after the file): a run's own
    predictions over chosen domains score as the run did; the whole database must be ranked (AP reads every
    positive's rank), and without the run's domains the partial benchmark is refused as in a run."""
    import json

    from click.testing import CliRunner

    from cirbench.cli import cli

    root = write_benchmark(tmp_path / "nico")
    (out,) = evaluate(_cfg(tmp_path, tiny_config, root, source="dimlight,rock", target="autumn"))
    pred = str(out.predictions_path)
    base = ["score", "-d", "dc-nico", "-s", "test", "--data-root", str(root)]
    for args in (["--source", "dimlight,rock", pred, "--target", "autumn"],
                 ["--source=dimlight,rock", "--target", "autumn", pred], [pred, "--source", "dimlight,rock",
                                                                          "--target=autumn"]):
        res = CliRunner().invoke(cli, [*base, *args, "--json"])
        assert res.exit_code == 0, (args, res.output)
        assert json.loads(res.output) == pytest.approx(out.metrics, abs=1e-9)
    res = CliRunner().invoke(cli, [*base, pred])
    assert res.exit_code == 2 and "has no query of domain" in res.output
    res = CliRunner().invoke(cli, [*base, pred, "--source", "dimlight,rock", "--target", "autumn,dimlight"])
    assert res.exit_code == 2 and "no rankings for set rock->dimlight (a run over part of the benchmark: give " \
        "score the dataset options it ran with)" in res.output
    res = CliRunner().invoke(cli, [*base, pred, "--source", "dimlight", "--target", "autumn", "--colour", "red"])
    assert res.exit_code == 2 and "--colour" in res.output
    rows = [json.loads(line) for line in out.predictions_path.read_text().splitlines()]
    database = len(rows[0]["top"])
    short = tmp_path / "short.predictions.jsonl"
    short.write_text("".join(json.dumps(dict(r, top=r["top"][:-1]) if i == 0 else r) + "\n"
                             for i, r in enumerate(rows)))
    res = CliRunner().invoke(cli, [*base, str(short), "--source", "dimlight,rock", "--target", "autumn"])
    assert res.exit_code == 2 and f"the ranking has {database - 1} ids, at least {database} are needed" in res.output
    res = CliRunner().invoke(cli, [*base, "--source", "dimlight", str(tmp_path / "nowhere.jsonl")])
    assert res.exit_code == 2 and "ranking file" in res.output and "does not exist" in res.output


def test_the_lists_are_pinned_to_freedoms_repository_and_checked(tmp_path, monkeypatch):
    """NICO++'s and LTLL's lists are fetched from FREEDOM's repository at a pinned commit and kept only with their
    official sha256; mini-DomainNet's query list is pinned (its database list was not at hand, so nothing is
    fetched for it) and ImageNet-R's, which FREEDOM's set-up writes, is not. `cirbench data check` says which
    file in place is the official one."""
    from click.testing import CliRunner

    from cirbench.cli import cli

    def built(name, root=tmp_path):
        return get_registry().dataset(name).create(root, {})

    nico = built("dc-nico")
    assert sorted(nico.OFFICIAL_SOURCES) == ["database_files.csv", "query_files.csv"]
    assert all(url.startswith("https://raw.githubusercontent.com/NikosEfth/freedom/5df4bca6f53b365ee2bc06da7b070bcdfd"
                              "f2b516/data/nico/") for url in nico.OFFICIAL_SOURCES.values())
    assert set(nico.OFFICIAL_SHA256) == {"query_files.csv", "database_files.csv"}
    assert list(built("dc-ltll").OFFICIAL_SOURCES) == ["full_files.csv"]
    assert built("dc-minidn").OFFICIAL_SOURCES == {} and list(built("dc-minidn").OFFICIAL_SHA256) == ["query_files.csv"]
    assert built("dc-imagenet-r").OFFICIAL_SOURCES == {} == built("dc-imagenet-r").OFFICIAL_SHA256

    root = write_benchmark(tmp_path / "nico")  # lists in the official layout, not the official lists
    res = CliRunner().invoke(cli, ["data", "check", "-d", "dc-nico", "--data-root", str(root), "--sample", "0",
                                   "--source", "autumn,dimlight,rock", "--target", "autumn,dimlight,rock"])
    assert "  annotation  query_files.csv: differs from the official file" in res.output, res.output
    mirror = tmp_path / "mirror" / "dc-nico"
    mirror.mkdir(parents=True)
    for name in ("query_files.csv", "database_files.csv"):
        (mirror / name).write_bytes((root / name).read_bytes())
    monkeypatch.setenv("CIRBENCH_FETCH_MIRROR", str(tmp_path / "mirror"))
    res = CliRunner().invoke(cli, ["data", "fetch", "dc-nico", "--data-root", str(tmp_path / "empty")])
    assert res.exit_code == 2 and "query_files.csv" in res.output and "sha256" in res.output, res.output
    assert not (tmp_path / "empty" / "query_files.csv").exists()
