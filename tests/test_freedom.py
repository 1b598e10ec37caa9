"""FREEDOM against a transcription of the official ``calculate_rankings`` (``--method freedom``) and its helpers
(github.com/NikosEfth/freedom, utils.py and utils_retrieval.py), on generated domain-conversion benchmarks."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from test_domain_conversion import DOMAINS, official_metrics_calc, write_benchmark

from cirbench.backbones import load_backbone
from cirbench.encode import encode_images
from cirbench.errors import CirbenchError
from cirbench.evaluate import RunConfig, evaluate
from cirbench.types import ImageRef

VOCABULARY = ["'Nduja", "airplane", "bear", "cat", "dog", "boat", "tree", "rock", "leaf", "snow", "lamp", "chair",
              "guitar", "clock", "castle", "bridge", "temple", "car", "bus", "horse", "", "flower", "fish", "bird"]


# -- the official helpers, transcribed ------------------------------------------------------------------------
def keep_k_most_frequent(nested_list_of_text, miu):
    labels, weights = [], []
    for query in nested_list_of_text:
        text_counts = {}
        for query_neighbors in query:
            for text in query_neighbors:
                if text in text_counts:
                    text_counts[text] += 1
                else:
                    text_counts[text] = 1
                if text == "":
                    text_counts[text] = 0
        most_common_texts = sorted(text_counts.keys(), key=lambda x: text_counts[x], reverse=True)[:miu]
        values = [text_counts[key] for key in most_common_texts]
        values = [x / max(max(values), 0.0001) for x in values]
        labels.append(most_common_texts)
        weights.append(values)
    max_len_text = max(len(x) for x in labels)
    max_len_weights = max(len(x) for x in weights)
    labels = [x + [""] * (max_len_text - len(x)) for x in labels]
    weights = [x + [0] * (max_len_weights - len(x)) for x in weights]
    return labels, weights


def invert_levels(input_list):
    d1, d2 = len(input_list), len(input_list[0])
    return [[input_list[i][j] for i in range(d1)] for j in range(d2)]


def text_to_multi(text_list_from_text, text_list_from_img):
    text = [[] for _ in range(len(text_list_from_img))]
    for idx in range(len(text_list_from_text)):
        for domain in text_list_from_text[idx]:
            for clas in text_list_from_img[idx]:
                text[idx].append(clas + " " + domain)
    return invert_levels(text)


def official_freedom(image_features, real_text, database_features, corpus_features, corpus_text, encode, kappa, miu,
                     ni):
    sim_img = image_features @ database_features.t()
    _, ranks_img = torch.topk(sim_img, kappa, dim=1, largest=True, sorted=True)
    image_and_neighbor_features = database_features[ranks_img]
    if torch.min(torch.max(sim_img, 1)[0]).item() < 0.98:
        image_and_neighbor_features = torch.cat((image_features.unsqueeze(1),
                                                 image_and_neighbor_features[:, 0:-1, :]), 1)
    sim = torch.matmul(image_and_neighbor_features, corpus_features.t())
    _, top_indices = torch.topk(sim, ni, dim=2, largest=True, sorted=True)
    indexes_np = np.transpose(top_indices.numpy(), (1, 0, 2))
    text_list_from_img = corpus_text[indexes_np].tolist()
    text_list_from_img = [[text_list_from_img[j][i] for j in range(len(text_list_from_img))]
                          for i in range(len(text_list_from_img[0]))]
    text_list_from_img, weights = keep_k_most_frequent(text_list_from_img, miu)
    multi_texts = text_to_multi([[x] for x in real_text], text_list_from_img)
    current_miu = len(weights[0])
    weights = torch.tensor(weights).view(-1, 1)
    multi_texts = invert_levels(multi_texts)
    multi_texts = [item for sublist in multi_texts for item in sublist]
    all_features = encode(multi_texts)
    fused_queries = (all_features * weights).reshape(-1, current_miu, all_features.shape[1]).sum(dim=1)
    return torch.argsort(fused_queries @ database_features.t(), descending=True), text_list_from_img


@pytest.mark.parametrize(("dataset", "full"), [("dc-nico", False), ("dc-ltll", True)])
def test_freedom_ranks_as_the_official_code(tmp_path, tiny_config, monkeypatch, dataset, full):
    """Queries outside the gallery (the image joins its neighbours) and inside it (it is its own neighbour); their
    neighbours named by words three queries at a time (every chunk boundary crossed)."""
    from cirbench.datasets import domain_conversion
    from cirbench.methods.freedom import model as freedom

    monkeypatch.setattr(freedom, "WORD_CHUNK", 3)

    ks = (2, 4)
    monkeypatch.setitem(domain_conversion.BENCHMARKS, dataset,
                        (("full_files.csv",) if full else ("query_files.csv", "database_files.csv"), DOMAINS, ks))
    root = write_benchmark(tmp_path / "nico", full=full)
    vocabulary = tmp_path / "words.csv"
    with open(vocabulary, "w", newline="") as fh:
        csv.writer(fh).writerows([[w] for w in VOCABULARY])
    options = {"vocabulary": str(vocabulary), "kappa": 5, "ni": 3, "miu": 4}
    cfg = RunConfig(method="freedom", dataset=dataset, split="test", backbone=str(tiny_config), pretrained="none",
                    data_root=root, output=tmp_path / "results", cache_dir=tmp_path / "cache", workers=0,
                    progress=False, bootstrap=0, method_options=options)
    (out,) = evaluate(cfg)
    bb = load_backbone(str(tiny_config), "none", device="cpu", precision="fp32")

    def encode(texts):
        with torch.no_grad():
            return torch.nn.functional.normalize(bb.model.encode_text(bb.tokenize(texts)).float(), dim=-1)

    lists = ["full_files.csv"] * 2 if full else ["query_files.csv", "database_files.csv"]
    qrows, drows = ([line.split(" ") for line in (root / f).read_text().splitlines()] for f in lists)

    def feats(rows):
        refs = [ImageRef(n, root / n.removeprefix("nico/"), root=root) for n, _, _ in rows]
        with torch.no_grad():
            return torch.nn.functional.normalize(encode_images(refs, bb.encode_image, bb.preprocessor("clip"),
                                                               workers=0, progress=False).float(), dim=-1)

    db, q = feats(drows), feats(qrows)
    corpus = torch.cat([encode([w]) for w in VOCABULARY])  # one at a time, as save_corpus_features encodes them
    rows = [json.loads(line) for line in out.predictions_path.read_text().splitlines()]
    for source in DOMAINS.values():
        idx = [i for i, (_, d, _) in enumerate(qrows) if DOMAINS[d] == source]
        for target in DOMAINS.values():
            if target == source:
                continue
            rankings, words = official_freedom(q[idx], [target] * len(idx), db, corpus, np.array(VOCABULARY), encode,
                                               5, 4, 3)
            expected = official_metrics_calc(rankings, target, [qrows[i][2] for i in idx], [c for _, _, c in drows],
                                             [DOMAINS[d] for _, d, _ in drows], ks)
            for metric, value in expected.items():
                assert out.metrics[f"{source}->{target}/{metric}"] == pytest.approx(value, abs=1e-4), \
                    (source, target, metric)
            mine = {r["query"]: r for r in rows if r["set"] == f"{source}->{target}"}
            for k, i in enumerate(idx):
                assert mine[str(i)]["top"] == [drows[j][0] for j in rankings[k].tolist()]
                # the official pads a query's words to the longest list with "" (weight 0, no part in the query)
                assert [w for w in mine[str(i)]["method"]["words"] if w] == [w for w in words[k] if w]


def test_freedom_fails_clearly(tmp_path, tiny_config, monkeypatch):
    root = write_benchmark(tmp_path / "nico")
    monkeypatch.setattr("cirbench.hub.host_reachable", lambda *a, **k: False)
    monkeypatch.setattr("torch.hub.get_dir", lambda: str(tmp_path / "hub"))
    cfg = RunConfig(method="freedom", dataset="dc-nico", split="test", backbone=str(tiny_config), pretrained="none",
                    data_root=root, output=tmp_path / "results", cache_dir=tmp_path / "cache", workers=0,
                    progress=False, bootstrap=0, dataset_options={"source": "autumn,rock", "target": "dimlight"})
    with pytest.raises(CirbenchError, match=r"cannot download FREEDOM's vocabulary .*raw.githubusercontent.com/"
                                            r"NikosEfth/freedom/5df4bca.*no network.*--vocabulary PATH"):
        evaluate(cfg)
    (tmp_path / "empty.csv").write_text("")
    cfg.method_options = {"vocabulary": str(tmp_path / "empty.csv")}
    with pytest.raises(CirbenchError, match="holds no words"):
        evaluate(cfg)


def test_freedom_keeps_the_method_contract(tmp_path):
    from cirbench.testing import ToyDatasetPlugin, check_method, registered

    vocabulary = tmp_path / "words.csv"
    vocabulary.write_text("\n".join(w for w in VOCABULARY if w) + "\n")
    with registered(ToyDatasetPlugin(), "toy") as reg:  # the toy dataset for this test alone
        (outcome,) = check_method("freedom", tmp_path / "check", options={"vocabulary": str(vocabulary), "kappa": 4},
                                  registry=reg)
    assert outcome.metrics
