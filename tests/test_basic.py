"""BASIC against a transcription of the official ``calculate_rankings`` (``--method basic``) and
``contextualize`` (github.com/billpsomas/icir, utils_retrieval.py and utils_features.py), on a generated i-CIR
with the tiny backbone, and its files, options and errors."""

from __future__ import annotations

import csv
import pickle

import numpy as np
import pytest
import torch
from test_icir import official_aps, official_summary, write_icir

from cirbench.backbones import load_backbone
from cirbench.encode import encode_images
from cirbench.errors import CirbenchError
from cirbench.evaluate import RunConfig, evaluate

WORDS = ["object_name", "Abacus", "Temple", "Teddy bear", "Bridge", "Lamp", "Chair", "Guitar", "Boat", "Clock",
         "Tree", "Castle"]
STYLES = ["watercolor painting", "oil painting", "charcoal sketch", "at night", "in snow", "in fog", "as a lego"]


def official_rankings(args, image_features, text_features, database_features, corpus_pos, corpus_neg, laion_mean,
                      synthetic):
    """calculate_rankings' basic branch, transcribed (the corpora's features already normalised, as read_corpus
    returns them; the eigen-decomposition in float64, as cirbench runs it)."""
    image_features = image_features / image_features.norm(dim=1, keepdim=True)
    text_features = text_features / text_features.norm(dim=1, keepdim=True)
    database_features = database_features / database_features.norm(dim=1, keepdim=True)
    mean_img = database_features.mean(0, keepdim=True)
    if laion_mean is not None:  # args.use_laion_mean
        mean_img = laion_mean
    mean_txt = corpus_pos.mean(0, keepdim=True)
    centered_database_features = database_features - mean_img
    centered_image_features = image_features - mean_img
    centered_corpus_pos_features = corpus_pos - mean_txt
    centered_corpus_neg_features = corpus_neg - mean_txt
    centered_text_features = text_features - mean_txt
    aa = args["aa"]
    A, B = centered_corpus_pos_features.double(), centered_corpus_neg_features.double()
    Sa = A.T @ A / (A.size(0) - 1)
    Sb = B.T @ B / (B.size(0) - 1)
    C = (1 - aa) * (Sa) - aa * Sb + 1e-5
    L, Vy_t2 = torch.linalg.eigh(C)
    L = L.flip(dims=[0])
    Vy_t = -Vy_t2.flip(dims=[1]).T
    Nc = int(args["num_principal_components_for_projection"])
    mask_l = L > 0
    Nc = min(Nc, sum(mask_l).item())
    Vy_t = Vy_t[:Nc]
    projection_matrix = (Vy_t.T @ Vy_t).float()
    proj_image_features = centered_image_features @ projection_matrix
    proj_database_features = centered_database_features
    if args["do_query_expansion"]:
        extra_features = centered_database_features
        init_sim_img = proj_image_features @ extra_features.t()
        top_values, top_indices = torch.topk(init_sim_img, args["k"])
        top_features = (centered_database_features).cpu()[top_indices.cpu()]
        top_features = torch.cat((top_features, centered_image_features.unsqueeze(1).cpu()), dim=1)
        top_values = torch.cat((top_values, torch.ones((top_values.shape[0], 1))), dim=1)
        top_values = torch.exp(.1 * top_values)
        top_values = top_values / top_values.sum(dim=1).unsqueeze(-1)
        top_features = top_features * top_values.unsqueeze(-1).cpu()
        top_features = top_features.sum(dim=1)
        proj_image_features = (top_features) @ projection_matrix
    sim_img = (proj_image_features) @ (proj_database_features).t()
    sim_text = centered_text_features @ (centered_database_features).t()
    image_features_generated = torch.Tensor(synthetic["image_features"])
    text_features_generated = torch.Tensor(synthetic["text_features"])
    image_features_generated = image_features_generated / image_features_generated.norm(dim=1, keepdim=True)
    text_features_generated = text_features_generated / text_features_generated.norm(dim=1, keepdim=True)
    image_features_generated -= mean_img
    text_features_generated -= mean_txt
    sim_img_gen = image_features_generated @ image_features_generated.t()
    sim_text_gen = text_features_generated @ image_features_generated.t()
    sim_img_min, sim_text_min = sim_img_gen.cpu().min(), sim_text_gen.cpu().min()
    sim_text = (sim_text - sim_text_min) / sim_img_min.abs()
    sim_img = (sim_img - sim_img_min) / sim_img_min.abs()
    sim_text = torch.clamp(sim_text, min=0)
    sim_img = torch.clamp(sim_img, min=0)
    sim_all = sim_text * sim_img - args["harris_lambda"] * (sim_text + sim_img) ** 2
    return torch.argsort(sim_all, descending=True)


def official_contextualize(encode, real_text, corpus, number):
    """contextualize(): "{word} {text}" and "{text} {word}" for the corpus's first words, averaged."""
    number = min(number, len(corpus))
    f1 = encode([f"{corpus[i]} {real_text[j]}" for j in range(len(real_text)) for i in range(number)])
    f2 = encode([f"{real_text[j]} {corpus[i]}" for j in range(len(real_text)) for i in range(number)])
    dim = f1.shape[1]
    both = torch.cat([f1.view(len(real_text), number, dim), f2.view(len(real_text), number, dim)], dim=1)
    return both.mean(dim=1)


def write_files(folder, dim):
    """The corpora as the official CSVs (a header row in the objects', none in the styles'), a LAION mean
    pickled as the official file is (``pickle.dump`` of a dict holding a [1, D] tensor), and synthetic features
    as the official ``.pkl.npy`` (``np.save`` of a dict)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "subjects.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([[w] for w in WORDS])
    with open(folder / "styles.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([[w] for w in STYLES])
    gen = torch.Generator().manual_seed(1)
    mean = torch.nn.functional.normalize(torch.randn(1, dim, generator=gen), dim=-1) * 0.6
    with open(folder / "laion_1m_mean_clip.pkl", "wb") as fh:
        pickle.dump({"laion_1m_mean": mean}, fh)
    synthetic = {"image_features": torch.randn(12, dim, generator=gen).numpy(),
                 "text_features": torch.randn(12, dim, generator=gen).numpy()}
    np.save(folder / "dataset_1_sd_clip.pkl.npy", synthetic)
    return {"corpus": str(folder / "subjects.csv"), "negative_corpus": str(folder / "styles.csv"),
            "laion_mean_file": str(folder / "laion_1m_mean_clip.pkl"),
            "synthetic_data": str(folder / "dataset_1_sd_clip.pkl.npy")}, mean, synthetic


def _cfg(tmp_path, tiny_config, root, **options):
    return RunConfig(method="basic", dataset="icir", split="test", backbone=str(tiny_config), pretrained="none",
                     data_root=root, output=tmp_path / "results", cache_dir=tmp_path / "cache", workers=0,
                     progress=False, bootstrap=0, method_options=options)


@pytest.mark.parametrize("expansion,use_laion", [(True, True), (False, True), (True, False)])
def test_basic_ranks_as_the_official_code(tmp_path, tiny_config, expansion, use_laion, monkeypatch):
    """Without the LAION mean, each instance is centred by its own database's mean (the gallery the loop
    prepared is all instances' databases). Queries are mapped two at a time, so that every chunk boundary of
    an instance's queries is crossed."""
    import json

    from cirbench import method

    monkeypatch.setattr(method, "QUERY_CHUNK", 2)

    root = write_icir(tmp_path / "icir")
    bb = load_backbone(str(tiny_config), "none", device="cpu", precision="fp32")
    files, laion, synthetic = write_files(tmp_path / "files", bb.embed_dim)
    options = {**files, "components": 6, "expansion_k": 3, "context_words": 5, "query_expansion": expansion,
               "laion_mean": use_laion}
    (out,) = evaluate(_cfg(tmp_path, tiny_config, root, **options))
    label = "basic" + ("" if expansion else "+no-query-expansion") + ("" if use_laion else "+no-laion-mean")
    assert out.record["method"]["label"] == label

    def encode(texts):
        with torch.no_grad():
            return torch.nn.functional.normalize(bb.model.encode_text(bb.tokenize(texts)).float(), dim=-1)

    def rows(name):
        return [line.split(",") for line in (root / name).read_text().splitlines()]

    qrows, drows = rows("query_files.csv"), rows("database_files.csv")
    from cirbench.types import ImageRef

    refs = [ImageRef(n, root / n.removeprefix("icir/"), root=root) for n, _, _ in drows + qrows]
    with torch.no_grad():
        feats = encode_images(refs, bb.encode_image, bb.preprocessor("clip"), workers=0, progress=False).float()
    db, queries = feats[: len(drows)], feats[len(drows):]
    corpus_pos, corpus_neg = encode(WORDS), encode(STYLES)
    args = {"aa": 0.2, "num_principal_components_for_projection": 6, "do_query_expansion": expansion, "k": 3,
            "harris_lambda": 0.1}
    predictions = {r["query"]: r["top"] for r in map(json.loads, out.predictions_path.read_text().splitlines())}
    aps_by_instance = []
    for instance in sorted({i for _, _, i in qrows}):
        qi = [k for k, (_, _, i) in enumerate(qrows) if i == instance]
        di = [k for k, (_, _, i) in enumerate(drows) if i == instance]
        text = official_contextualize(encode, [qrows[k][1] for k in qi], WORDS, 5)
        ranking = official_rankings(args, queries[qi], text, db[di], corpus_pos, corpus_neg,
                                    laion if use_laion else None, synthetic)
        for row, k in zip(ranking.tolist(), qi, strict=True):
            assert predictions[str(k)] == [drows[di[j]][0] for j in row], (instance, k)
        aps_by_instance.append(official_aps(ranking.numpy(), [instance] * len(qi), [qrows[k][1] for k in qi],
                                            [instance] * len(di), [drows[k][1] for k in di]))
    expected = official_summary(aps_by_instance)
    assert (out.metrics["mAP"], out.metrics["mmAP"], out.metrics["minmAP"]) == pytest.approx(expected, abs=1e-6)
    info = out.record["method"]["info"]
    assert info["corpus"]["sha256"] and info["synthetic_data"]["sha256"]
    summary = out.record["method"]["summary"]
    assert summary["principal_components"] == 6
    if use_laion:  # one mean: one pair of minima
        assert len(summary["normalisation_minima"]) == 2
    else:  # a mean per instance: as many pairs
        assert summary["normalisation_minima"]["galleries"] == len({i for _, _, i in qrows}) > 1


def test_basic_runs_with_every_component_off_as_the_product_baseline(tmp_path, tiny_config):
    """All off and lambda 0: the official 'product' baseline, clamp(s_i) x clamp(s_t) on normalised features."""
    import json

    root = write_icir(tmp_path / "icir")
    off = {name: False for name in ("contextualize", "standardize", "project", "query_expansion", "normalize")}
    (out,) = evaluate(_cfg(tmp_path, tiny_config, root, **off, harris_lambda=0.0))
    assert out.record["method"]["label"] == "basic+no-contextualize+no-standardize+no-project+" \
                                            "no-query-expansion+no-normalize"
    assert out.record["method"]["info"] == {"components": {**off, "laion_mean": True}}  # nothing downloaded
    assert out.metrics["mAP"] >= 0 and out.predictions_path.read_text().count("\n") == 5
    assert all(len(json.loads(line)["top"]) == 9 for line in out.predictions_path.read_text().splitlines())


def test_basic_files_fail_clearly(tmp_path, tiny_config, monkeypatch):
    """Offline, the official files are named with their URL and the option that replaces them; on a backbone
    the official LAION mean was not made for, the error says what to pass; a foreign pickle is refused."""
    from cirbench.methods.basic_cir import model

    root = write_icir(tmp_path / "icir")
    monkeypatch.setattr("cirbench.hub.host_reachable", lambda *a, **k: False)
    monkeypatch.setattr("torch.hub.get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(CirbenchError, match=r"cannot download BASIC's object names \(https://raw.githubusercontent"
                                            r".com/billpsomas/icir/463cc1d.*/corpora/generic_subjects.csv\): no "
                                            r"network.*--corpus PATH"):
        evaluate(_cfg(tmp_path, tiny_config, root))
    files, _, _ = write_files(tmp_path / "files", 32)
    only_corpora = {k: files[k] for k in ("corpus", "negative_corpus")}
    with pytest.raises(CirbenchError, match="LAION-1M mean is published for ViT-L-14/openai and ViT-L-16-SigLIP-256/"
                                            "webli only.*--laion-mean-file FILE or --no-laion-mean"):
        evaluate(_cfg(tmp_path, tiny_config, root, **only_corpora))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "evil.pkl", "wb") as fh:
        pickle.dump({"laion_1m_mean": Evil()}, fh)
    with pytest.raises(CirbenchError, match="refusing to unpickle: the file names builtins.print"):
        evaluate(_cfg(tmp_path, tiny_config, root, **{**files, "laion_mean_file": str(tmp_path / "evil.pkl")}))
    np.save(tmp_path / "wrong.npy", {"image_features": np.zeros((3, 5))})
    with pytest.raises(CirbenchError, match="hold no 'image_features' and 'text_features'"):
        evaluate(_cfg(tmp_path, tiny_config, root, **{**files, "synthetic_data": str(tmp_path / "wrong.npy")}))
    assert model.official_kind(type("B", (), {"model_name": "ViT-L-14", "pretrained": "openai"})()) == "clip"


def test_basic_keeps_the_method_contract_on_a_shared_gallery(tmp_path, tiny_config):
    """On a benchmark with one gallery for every query (the toy one), BASIC expands within the whole gallery;
    it is deterministic and shares the backbone well (cirbench.testing.check_method)."""
    from cirbench.testing import ToyDatasetPlugin, check_method, registered

    bb = load_backbone(str(tiny_config), "none", device="cpu", precision="fp32")
    files, _, _ = write_files(tmp_path / "files", bb.embed_dim)
    with registered(ToyDatasetPlugin(), "toy") as reg:  # the toy dataset for this test alone
        (outcome,) = check_method("basic", tmp_path / "check", options={**files, "components": 4, "expansion_k": 2},
                                  registry=reg)
    assert outcome.metrics and outcome.record["method"]["summary"]["principal_components"] == 4
