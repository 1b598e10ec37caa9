"""SEARLE-OTI against transcriptions of the official code (miccunifi/SEARLE src/image_concepts_association.py,
src/oti_inversion.py, src/encode_with_pseudo_tokens.py), its files, its cache and its errors."""

from __future__ import annotations

import json
import pickle
import random
import zipfile

import pytest
import torch
from click.testing import CliRunner

from cirbench.backbones import load_backbone
from cirbench.cli import cli
from cirbench.errors import CirbenchError
from cirbench.evaluate import RunConfig, evaluate
from cirbench.methods.searle import oti
from cirbench.testing import ToyDatasetPlugin, registered

CONCEPTS = ["dog", "red car", "tree", "Tree", "cat ", "umbrella", "sky", "house", "boat", "bird", "lamp", "bike"]


def phrases_for(names):
    out = {}
    for name in dict.fromkeys(n.strip() for n in names):
        out[name] = [f"a photo of {name} that is on the {w}" for w in ("left", "right", "table")]
    out["house"].append("a photo of a building")  # no "house" in it: the official filter drops the concept
    return out


@pytest.fixture(scope="module")
def backbone(tiny_config):
    return load_backbone(str(tiny_config), "none", device="cpu", seed=0)


# -- transcriptions of the official code, on an open_clip text tower (batch-first) -------------------------
def official_concept_table(backbone, texts):
    rows = []
    for k in range(len(texts)):
        prompts = [f"{template.format(f' {texts[k]} ')}" for template in oti.TEMPLATES]
        with torch.no_grad():
            feat = backbone.model.encode_text(backbone.tokenize(prompts)).float()
        feat /= feat.norm(dim=-1, keepdim=True)
        feat = feat.mean(dim=0)
        feat /= feat.norm()
        rows.append(feat)
    return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


def official_association(image_feats, table, texts, top_k):
    similarity = torch.nn.functional.normalize(image_feats, dim=-1).float() @ table.T
    knn = torch.topk(similarity, min(250, len(texts)), largest=True).indices
    out = []
    for row in knn:
        stripped = [str(texts[i]).strip() for i in row]
        out.append(list(dict.fromkeys(stripped))[:top_k])
    return out


def official_encode_with_pseudo_tokens(model, text, pseudo_tokens, dollar):
    """SEARLE's encode_with_pseudo_tokens (first '$' of each row replaced), on an open_clip text tower."""
    x = model.token_embedding(text)
    _, counts = torch.unique((text == dollar).nonzero(as_tuple=True)[0], return_counts=True)
    cum_sum = torch.cat((torch.zeros(1).int(), torch.cumsum(counts, dim=0)[:-1]))
    first_tokens_indexes = (text == dollar).nonzero()[cum_sum][:, 1]
    x = x.clone()
    x[torch.arange(x.shape[0]), first_tokens_indexes] = pseudo_tokens.to(x.dtype)
    x = x + model.positional_embedding
    lnd = not getattr(model.transformer, "batch_first", False)  # open_clip before 2.26, as OpenAI's CLIP: LND
    x = x.permute(1, 0, 2) if lnd else x
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = x.permute(1, 0, 2) if lnd else x
    x = model.ln_final(x)
    return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ model.text_projection


def official_oti(backbone, images, names, name_to_concepts, concept_to_phrases, steps, seed):
    """oti_inversion.py's loop for one batch (the global RNGs seeded as the batch's seed)."""
    model = backbone.model
    dollar = backbone.tokenizer(["$"])[0][1].item()
    templates = oti.TEMPLATES
    concepts_to_filter_out = set()
    for k, v in concept_to_phrases.items():
        for phrase in v:
            if "$" not in phrase.replace(k, " $ ", 1):
                concepts_to_filter_out.add(k)
    random.seed(seed)
    torch.manual_seed(seed)
    bs = len(images)
    oti_pseudo_tokens = torch.empty((bs, model.token_embedding.embedding_dim))
    torch.nn.init.normal_(oti_pseudo_tokens, std=0.02)
    batch_gpt_phrases, batch_concepts = [], []
    for name in names:
        l_phrases, l_concept_phrases = [], []
        for w in name_to_concepts[name]:
            if w in concepts_to_filter_out:
                continue
            for p in concept_to_phrases[w]:
                l_phrases.append(p)
                l_concept_phrases.append(w)
        batch_gpt_phrases.append(l_phrases)
        batch_concepts.append(l_concept_phrases)
    oti_pseudo_tokens = torch.nn.Parameter(oti_pseudo_tokens)
    ema_oti_pseudo_tokens = oti_pseudo_tokens.clone().detach()
    optimizer = torch.optim.AdamW([oti_pseudo_tokens], lr=2e-2, weight_decay=0.01)
    criterion = torch.nn.CosineEmbeddingLoss()
    target = torch.as_tensor([1])
    for _ in range(steps):
        optimizer.zero_grad()
        template_indexes = random.choices(range(len(templates)), k=bs)
        template_oti_texts = [templates[i].format(" $ ") for i in template_indexes]
        gpt_phrases_indexes = [random.choice(range(len(batch_gpt_phrases[i]))) for i in range(len(batch_gpt_phrases))]
        reg_gpt_phrases = [batch_gpt_phrases[i][rand_idx] for i, rand_idx in enumerate(gpt_phrases_indexes)]
        concepts_to_replace = [batch_concepts[i][rand_idx] for i, rand_idx in enumerate(gpt_phrases_indexes)]
        oti_gpt_phrases = [reg_text.replace(w, " $ ", 1)
                           for w, reg_text in zip(concepts_to_replace, reg_gpt_phrases, strict=True)]
        template_oti_features = official_encode_with_pseudo_tokens(
            model, backbone.tokenize(template_oti_texts), oti_pseudo_tokens, dollar)
        reg_gpt_features = model.encode_text(backbone.tokenize(reg_gpt_phrases))
        reg_oti_gpt_features = official_encode_with_pseudo_tokens(
            model, backbone.tokenize(oti_gpt_phrases), oti_pseudo_tokens, dollar)
        cosine_loss = criterion(template_oti_features, images, target)
        gpt_loss = criterion(reg_oti_gpt_features, reg_gpt_features, target)
        oti_loss = (1 * cosine_loss + 0.5 * gpt_loss) / (1 + 0.5)
        oti_loss.backward()
        optimizer.step()
        ema_oti_pseudo_tokens = 0.99 * ema_oti_pseudo_tokens + (1 - 0.99) * oti_pseudo_tokens
    return ema_oti_pseudo_tokens.detach()


PARAMS = {"steps": 12, "lr": 2e-2, "weight_decay": 0.01, "batch_size": 32, "top_k": 15, "lambda_cos": 1.0,
          "lambda_gpt": 0.5, "ema_decay": 0.99, "seed": 42}


def test_concept_association_is_the_official_one(backbone):
    texts = CONCEPTS
    images = torch.randn(5, backbone.embed_dim)
    ours = oti.concept_embeddings(backbone, texts, batch_concepts=5, progress=False)
    official = official_concept_table(backbone, texts)
    assert torch.allclose(ours, official, atol=1e-5)
    # "Tree"/"tree" and "cat " strip apart or together as officially; 4 concepts kept of 11 distinct
    assert oti.associate(images, ours, texts, 4) == official_association(images, official, texts, 4)
    assert all(len(row) == 4 for row in oti.associate(images, ours, texts, 4))


def test_concepts_whose_phrases_lack_them_are_left_out():
    phrases = phrases_for(CONCEPTS)
    usable = oti.usable_concepts(phrases)
    assert "house" not in usable and "dog" in usable and "red car" in usable
    assert oti.usable_concepts({"x": []}) == set()


def test_inversion_is_the_official_loop(backbone):
    """Same draws (templates, phrases, initialisation), same losses, AdamW and moving average: the same
    pseudo-words; a '$' of the phrase's own stays the plain word, as officially (only the first is replaced)."""
    phrases = phrases_for(CONCEPTS)
    phrases["dog"][0] = "a photo of dog that costs $ 5"
    images = torch.randn(3, backbone.embed_dim)
    names = ["a.jpg", "b.jpg", "c.jpg"]
    name_to_concepts = {"a.jpg": ["dog", "house", "tree"], "b.jpg": ["red car"], "c.jpg": ["sky", "dog"]}
    usable = oti.usable_concepts(phrases)
    pools = [[(c, p) for c in name_to_concepts[n] if c in usable for p in phrases[c]] for n in names]
    ours, loss = oti.invert_batch(backbone, images, pools, PARAMS, seed=7)
    official = official_oti(backbone, images, names, name_to_concepts, phrases, PARAMS["steps"], seed=7)
    assert loss == loss and ours.shape == (3, backbone.model.token_embedding.embedding_dim)
    assert torch.allclose(ours, official, atol=1e-5), (ours - official).abs().max()
    # and it optimises: the template prompts end nearer the images than where they started
    start, _ = oti.invert_batch(backbone, images, pools, {**PARAMS, "steps": 0}, seed=7)
    prompt = ["A photo of a  $ "] * 3

    def cos(tokens):
        from cirbench.methods._shared.textinv import encode_with_pseudo_tokens

        with torch.no_grad():
            return torch.nn.functional.cosine_similarity(
                encode_with_pseudo_tokens(backbone, prompt, tokens, "$"), images).mean()

    assert cos(ours) > cos(start)


def write_sources(tmp_path, names=CONCEPTS):
    csv_path = tmp_path / "oidv7-class-descriptions.csv"
    csv_path.write_text("LabelName,DisplayName\n" + "".join(f"/m/{i},{n}\n" for i, n in enumerate(names)))
    release = tmp_path / "GPTNeo27B.zip"
    with zipfile.ZipFile(release, "w") as z:
        z.writestr("GPTNeo27B/concept_to_phrases.pkl", pickle.dumps(phrases_for(names)))
    return csv_path, release


def test_phrase_and_concept_files(tmp_path):
    csv_path, release = write_sources(tmp_path)
    assert oti.load_concepts(csv_path) == CONCEPTS
    assert oti.load_phrases(release) == phrases_for(CONCEPTS)
    (tmp_path / "p.json").write_text(json.dumps({"dog": ["a dog"]}))
    assert oti.load_phrases(tmp_path / "p.json") == {"dog": ["a dog"]}
    (tmp_path / "c.txt").write_text("dog\n\ncat\n")
    assert oti.load_concepts(tmp_path / "c.txt") == ["dog", "cat"]

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"dog": [Evil()]}))
    with pytest.raises(CirbenchError, match="names builtins.print"):
        oti.load_phrases(tmp_path / "evil.pkl")
    (tmp_path / "bad.json").write_text(json.dumps({"dog": "not a list"}))
    with pytest.raises(CirbenchError, match="mapping of concept -> list of phrases"):
        oti.load_phrases(tmp_path / "bad.json")
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(CirbenchError, match="no DisplayName column"):
        oti.load_concepts(tmp_path / "bad.csv")
    with zipfile.ZipFile(tmp_path / "empty.zip", "w") as z:
        z.writestr("readme.txt", "x")
    with pytest.raises(CirbenchError, match="no concept_to_phrases.pkl"):
        oti.load_phrases(tmp_path / "empty.zip")


def _cfg(tmp_path, tiny_config, toy_root, **options):
    return RunConfig(method="searle-oti", dataset="toy", split="val", backbone=str(tiny_config), pretrained="none",
                     data_root=toy_root, output=tmp_path / "results", cache_dir=tmp_path / "cache", workers=0,
                     progress=False, bootstrap=0, method_options={k: str(v) for k, v in options.items()})


def test_run_inverts_each_reference_once_caches_and_resumes(tmp_path, tiny_config, toy_root):
    csv_path, release = write_sources(tmp_path)
    opts = dict(concepts=csv_path, phrases=release, oti_steps=3, oti_batch_size=5, top_k=3)
    with registered(ToyDatasetPlugin(), "toy") as reg:
        (first,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, **opts), reg)
        summary = first.record["method"]["summary"]["oti"]
        assert summary["references"] == 12 and summary["batches_optimised"] == 3  # 12 references in 5s
        assert summary["images_without_phrases"] == 0 and summary["concepts_usable"] == 11
        info = first.record["method"]["info"]
        assert info["oti"]["steps"] == 3 and len(info["phrases"]["sha256"]) == 64
        rows = [json.loads(line) for line in first.predictions_path.read_text().splitlines()]
        concepts = [r["method"]["concepts"] for r in rows]  # what regularised each reference, for the report
        assert all(1 <= len(c) <= 3 and "house" not in c and set(c) <= set(phrases_for(CONCEPTS)) for c in concepts)
        batches = sorted((tmp_path / "cache" / "oti").glob("*/batch-*.safetensors"))
        assert len(batches) == 3
        # stopped after two batches: the next run optimises only the third, and ranks exactly the same
        batches[-1].unlink()
        (again,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, **opts), reg)
        assert again.record["method"]["summary"]["oti"] == {**summary, "batches_optimised": 1,
                                                                  "batches_cached": 2}
        assert again.record["metrics"] == first.record["metrics"]
        assert again.predictions_path.read_text() == first.predictions_path.read_text()
        # served from the cache whole, a run does not even read the phrases
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(oti, "load_phrases", lambda path: pytest.fail("phrases read for a cached run"))
            (cached,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, **opts), reg)
        assert cached.record["method"]["summary"]["oti"]["batches_cached"] == 3
        assert cached.predictions_path.read_text() == first.predictions_path.read_text()
        # another seed is another cache entry, and other pseudo-words
        (other,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, oti_seed=1, **opts), reg)
        assert other.record["method"]["summary"]["oti"]["batches_optimised"] == 3


def test_missing_sources_offline_are_one_line_errors(tmp_path, tiny_config, toy_root, monkeypatch):
    from cirbench import hub

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "host_reachable", lambda host, port=443, timeout=3.0: False)
    with registered(ToyDatasetPlugin(), "toy"):
        res = CliRunner().invoke(cli, ["run", "--method", "searle-oti", "--dataset", "toy", "--data-root",
                                       str(toy_root), "--backbone", str(tiny_config), "--pretrained", "none",
                                       "--output", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c")])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert "cannot download SEARLE's concept list" in res.output and "--concepts PATH" in res.output


def test_an_image_without_usable_phrases_is_optimised_on_the_template_loss(backbone):
    """The official script stops with an error there; cirbench optimises it toward the image alone."""
    images = torch.randn(2, backbone.embed_dim)
    pools = [[], [("dog", "a photo of dog that runs")]]
    start, _ = oti.invert_batch(backbone, images, pools, {**PARAMS, "steps": 0}, seed=3)
    tokens, loss = oti.invert_batch(backbone, images, pools, PARAMS, seed=3)
    assert torch.isfinite(tokens).all() and loss == loss
    assert not torch.allclose(tokens[0], start[0]) and not torch.allclose(tokens[1], start[1])
    # with no phrase at all, only the template loss is left
    alone, _ = oti.invert_batch(backbone, images, [[], []], PARAMS, seed=3)
    assert torch.isfinite(alone).all()


def test_published_files_download_once_into_the_hub_cache(tmp_path, monkeypatch):
    """The real download path (here from a loopback server): fetched once into torch's hub cache, then read
    from there; a failed download is one line naming the URL and the option, and leaves no file behind."""
    from helpers import serving

    from cirbench import hub
    from cirbench.errors import CheckpointError

    served = tmp_path / "site"
    served.mkdir()
    (served / "concepts.csv").write_text("LabelName,DisplayName\n/m/1,dog\n")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with serving(served) as base:
        got = hub.url_file(f"{base}/concepts.csv", "a concept list", "concepts")
        assert got == tmp_path / "hub" / "checkpoints" / "concepts.csv" and oti.load_concepts(got) == ["dog"]
        (served / "concepts.csv").unlink()
        assert hub.url_file(f"{base}/concepts.csv", "a concept list", "concepts") == got  # cached: no request
        with pytest.raises(CheckpointError, match=r"cannot download a phrase file \(http.*/gone.zip\): "
                                                  r"HTTPError.*--phrases PATH"):
            hub.url_file(f"{base}/gone.zip", "a phrase file", "phrases")
        assert not (tmp_path / "hub" / "checkpoints" / "gone.zip").exists()


def test_torchrun_ranks_share_the_batches(tmp_path, monkeypatch):
    """Two ranks optimise alternate batches and read the others' from the cache: the result counts every batch
    once, and a one-process run afterwards finds them all and ranks the same."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    csv_path, release = write_sources(tmp_path)
    args = ["run", "--method", "searle-oti", "--dataset", "shapes", "--queries", "40", "--instances", "1",
            "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--workers", "0", "--concepts", str(csv_path),
            "--phrases", str(release), "--oti-steps", "2", "--oti-batch-size", "8", "--top-k", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CIRBENCH_LOAD_PLUGINS": "", "CIRBENCH_CACHE": str(tmp_path / "gen")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                           "cirbench", *args, "--output", str(tmp_path / "two")], capture_output=True, text=True,
                          timeout=400, env=env, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (two,) = (tmp_path / "two" / "shapes" / "val").glob("*__*.json")
    two = json.loads(two.read_text())
    summary = two["method"]["summary"]["oti"]
    batches = -(-summary["references"] // 8)
    assert batches >= 2 and summary["batches_optimised"] == batches and summary["batches_cached"] == 0, summary
    assert len(list((tmp_path / "cache" / "oti").glob("*/batch-*.safetensors"))) == batches
    monkeypatch.setenv("CIRBENCH_CACHE", str(tmp_path / "gen"))
    monkeypatch.setattr(oti, "invert_batch", lambda *a, **k: pytest.fail("a batch was optimised again"))
    res = CliRunner().invoke(cli, [*args, "--output", str(tmp_path / "one"), "--quiet"])
    assert res.exit_code == 0, res.output
    (one,) = (tmp_path / "one" / "shapes" / "val").glob("*__*.json")
    one = json.loads(one.read_text())
    assert one["method"]["summary"]["oti"]["batches_cached"] == batches
    assert one["metrics"] == two["metrics"]


def test_the_concept_list_is_pinned_to_a_commit_and_its_sha256(tmp_path, monkeypatch):
    """SEARLE's concept list is read at the commit that last changed it, and a file in its place that is not the
    published one (another version, a truncated download) is refused in one line, not used."""
    from cirbench import hub
    from cirbench.errors import CheckpointError
    from cirbench.methods.searle import oti

    assert f"/{oti.CONCEPTS_COMMIT}/" in oti.CONCEPTS_URL and "/main/" not in oti.CONCEPTS_URL
    other = tmp_path / "oidv7-class-descriptions.csv"
    other.write_text("LabelName,DisplayName\n/m/0,cat\n")
    monkeypatch.setattr(hub, "url_file", lambda url, what, option: other)
    with pytest.raises(CheckpointError, match="is not SEARLE's concept list published at .*9afa4f3c.*sha256 differs"):
        oti.source_files({"phrases": str(other)})
    assert oti.source_files({"concepts": str(other), "phrases": str(other)}) == (other, other)  # given: as it is


def test_nearest_concepts_in_chunks_are_the_whole_matrix_topk():
    """Images matched against the concepts a few at a time give each image's nearest concepts as one product does."""
    gen = torch.Generator().manual_seed(0)
    images, concepts = torch.randn(10, 8, generator=gen), torch.randn(30, 8, generator=gen)
    concepts = torch.nn.functional.normalize(concepts, dim=-1)
    want = torch.topk(torch.nn.functional.normalize(images, dim=-1) @ concepts.T, 5, dim=-1).indices
    for chunk in (1, 3, 1024):
        assert torch.equal(oti.nearest_concepts(images, concepts, 5, chunk=chunk), want), chunk
