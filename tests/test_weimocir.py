"""WeiMoCIR against its official scoring (whats2000/WeiMoCIR src/validate_clip.py), transcribed as an oracle."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import registered
from toy_plugin import ToyPlugin

from cirbench.backbones import load_backbone
from cirbench.cli import cli
from cirbench.encode import encode_images
from cirbench.errors import CirbenchError
from cirbench.evaluate import RunConfig, evaluate
from cirbench.generation import ReplayMiss
from cirbench.methods.weimocir.model import modification_text


def _cfg(tmp_path, tiny_config, toy_root, **options):
    return RunConfig(method="weimocir", dataset="toy", split="val", backbone=str(tiny_config), pretrained="none",
                     data_root=toy_root, output=tmp_path / "results", cache_dir=tmp_path / "cache", workers=0,
                     progress=False, method_options=options)


def _captions_file(tmp_path, toy_root, skip=()):
    """Three (or, for one image, five) captions of every toy image but those in ``skip``."""
    data = json.loads((toy_root / "queries.json").read_text())
    rows = []
    for i, name in enumerate(data["gallery"]):
        if name in skip:
            continue
        colour = name.split("_")[1]
        count = 5 if i == 0 else 3
        rows.append({"candidate": name, "captions": [f"a {colour} picture, take {j}, number {i % 5}"
                                                     for j in range(count)]})
    rows.append({"caption": "a record without a candidate, skipped as officially"})
    rows.insert(0, {"candidate": rows[3]["candidate"], "captions": ["overridden by the image's later record"] * 3})
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(rows))
    return path, {r["candidate"]: r["captions"] for r in rows if "candidate" in r}


def _official(tiny_config, toy_root, captions, alpha, beta, per_image=3):
    """The official CIRR-style scoring in float64: ``beta * mean_j(sim_j) + (1 - beta) * image_sim`` with the
    queries fused from *raw* embeddings, each side normalised, the reference removed after sorting."""
    from cirbench.types import ImageRef

    bb = load_backbone(str(tiny_config), "none", device="cpu", precision="fp32")
    data = json.loads((toy_root / "queries.json").read_text())
    names = data["gallery"]
    refs = [ImageRef(n, toy_root / "images" / n, root=toy_root) for n in names]
    with torch.no_grad():
        image_raw = encode_images(refs, lambda px: bb.model.encode_image(px).float(), bb.preprocessor("hf-clip"),
                                  workers=0, progress=False).double().numpy()

        def text_raw(texts):
            return bb.model.encode_text(bb.tokenize(texts)).double().numpy()

        caption_raw = [text_raw([captions[n][j] if n in captions else "" for n in names]) for j in range(per_image)]
        queries = data["queries"]
        mod_raw = text_raw([q["text"] for q in queries])

    def normalize(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    pos = {n: i for i, n in enumerate(names)}
    ref_idx = [pos[q["reference"]] for q in queries]
    image_sim = normalize((1 - alpha) * image_raw[ref_idx] + alpha * mod_raw) @ normalize(image_raw).T
    text_sims = [normalize(normalize((1 - alpha) * cap[ref_idx] + alpha * mod_raw)) @ normalize(cap).T
                 for cap in caption_raw]
    merged = beta * np.mean(np.stack(text_sims), axis=0) + (1 - beta) * image_sim
    return names, queries, merged


@pytest.mark.parametrize("alpha, beta", [(0.8, 0.1), (0.5, 0.6), (0.3, 0.0)])
def test_rankings_equal_the_official_scoring(tmp_path, tiny_config, toy_root, alpha, beta, monkeypatch):
    path, captions = _captions_file(tmp_path, toy_root, skip=("img_blue_2.png",))  # no captions: "" as officially
    options = {"alpha": alpha, "beta": beta, "captions": str(path)}
    with registered(ToyPlugin(), "toy") as reg:
        (out,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, **options), reg)
    names, queries, merged = _official(tiny_config, toy_root, captions, alpha, beta)
    rows = {r["query"]: r for r in map(json.loads, out.predictions_path.read_text().splitlines())}
    pos = {n: i for i, n in enumerate(names)}
    for qi, q in enumerate(queries):
        scores = merged[qi].copy()
        scores[pos[q["reference"]]] = -np.inf  # removed, as the official code removes it from the sorted list
        expected = np.sort(scores)[::-1][:10]
        ours = np.array([scores[pos[n]] for n in rows[q["id"]]["top"]])
        # the same images in the same order, up to float round-off among equal official scores
        np.testing.assert_allclose(ours, expected, atol=1e-6)
        # scores are the official ones up to a positive factor per query (the product space's normalisation)
        ratio = np.array(rows[q["id"]]["scores"]) / ours
        assert np.allclose(ratio, ratio[0], rtol=1e-4) and ratio[0] > 0
    record = json.loads(out.result_path.read_text())
    if beta:
        assert record["method"]["info"]["captions"]["images"] == len(captions)
        assert rows[queries[0]["id"]]["method"]["reference_captions"] == captions[queries[0]["reference"]][:3]
    else:
        assert record["method"]["info"] == {}  # no captions read: the file is not part of the configuration


def test_caption_features_are_encoded_once_across_runs(tmp_path, tiny_config, toy_root, monkeypatch):
    """The captions' text features are rows of the feature cache: a later command encodes none of them and
    ranks the same; under --no-cache they are encoded and nothing is written."""
    import dataclasses

    from cirbench.backbones import Backbone
    from cirbench.cache_inventory import feature_entries

    path, captions = _captions_file(tmp_path, toy_root)
    used = {c for texts in captions.values() for c in texts[:3]}
    encoded: list[str] = []
    real = Backbone._encode_texts
    monkeypatch.setattr(Backbone, "_encode_texts", lambda self, texts: encoded.extend(texts) or real(self, texts))
    cfg = _cfg(tmp_path, tiny_config, toy_root, alpha=0.5, beta=0.6, captions=str(path))
    with registered(ToyPlugin(), "toy") as reg:
        (first,) = evaluate(cfg, reg)
        assert used <= set(encoded)
        encoded.clear()
        (second,) = evaluate(cfg, reg)  # another command: a new backbone, the cache on disk
        assert not used & set(encoded) and encoded  # the queries' own texts are still encoded
        assert second.metrics == first.metrics
        assert first.record["cache"]["text_misses"] == len(used) and second.record["cache"]["text_misses"] == 0
        assert second.record["cache"]["text_hits"] > 0 and second.record["cache"]["misses"] == 0
        assert second.predictions_path.read_text() == first.predictions_path.read_text()
        texts = [e for e in feature_entries(tmp_path / "cache") if (e.key or {})["feature"]["kind"] == "text"]
        assert len(texts) == 1 and texts[0].rows == len(used) and texts[0].preprocess == "-"
        encoded.clear()
        other = tmp_path / "no-cache"
        (third,) = evaluate(dataclasses.replace(cfg, use_cache=False, cache_dir=other), reg)
        assert used <= set(encoded) and third.metrics == first.metrics
        assert not list(other.rglob("*.safetensors"))


def test_without_captions_beta_must_be_zero(tmp_path, tiny_config, toy_root):
    with registered(ToyPlugin(), "toy"):
        res = CliRunner().invoke(cli, ["run", "-m", "weimocir", "-d", "toy", "--data-root", str(toy_root),
                                       "--backbone", str(tiny_config), "--pretrained", "none", "--output",
                                       str(tmp_path / "r"), "--no-cache", "--workers", "0", "--quiet"])
    assert res.exit_code == 2 and "pass --captions FILE" in res.output and "--beta 0" in res.output, res.output
    assert "--captioner hf:MODEL" in res.output
    assert len(res.output.strip().splitlines()) == 1


@pytest.mark.parametrize("content, said", [
    ("{", "is not valid JSON"),
    ('{"candidate": "x"}', "expected a list of"),
    ('[{"candidate": 3, "captions": ["a", "b", "c"]}]', "record 0: 'candidate' must be an image id"),
    ('[{"candidate": "img_red_0.png", "captions": ["a", "b"]}]', "has 2 captions; --captions-per-image is 3"),
    (None, "does not exist"),
])
def test_bad_captions_files_are_one_line_errors(tmp_path, tiny_config, toy_root, content, said):
    path = tmp_path / "captions.json"
    if content is not None:
        path.write_text(content)
    with registered(ToyPlugin(), "toy") as reg, pytest.raises(CirbenchError, match=said):
        evaluate(_cfg(tmp_path, tiny_config, toy_root, captions=str(path)), reg)


def test_fashioniq_captions_are_one_forward_text():
    assert modification_text(("Is darker.", " has LONG sleeves ")) == "Is darker and has LONG sleeves"
    assert modification_text(("IS DARKER", "has long sleeves?")) == "Is darker and has long sleeves"
    assert modification_text(("make it red",)) == "make it red"


def test_a_gallery_that_is_not_one_normalised_row_per_image_is_refused(tmp_path, tiny_config, toy_root,
                                                                       monkeypatch):
    from cirbench.methods.weimocir.model import WeiMoCIR

    monkeypatch.setattr(WeiMoCIR, "prepare_gallery", lambda self, ids, feats: feats[:-1])
    with registered(ToyPlugin(), "toy") as reg, pytest.raises(CirbenchError, match=r"method 'weimocir' \(plugin "
                                                              r".*\): prepare_gallery returned shape \(11, \d+\), "
                                                              r"expected \(12, \d+\) \(one row per gallery image\)"):
        evaluate(_cfg(tmp_path, tiny_config, toy_root, beta=0.0), reg)
    monkeypatch.setattr(WeiMoCIR, "prepare_gallery", lambda self, ids, feats: feats * 2)
    with registered(ToyPlugin(), "toy") as reg, pytest.raises(CirbenchError, match="not L2-normalised"):
        evaluate(_cfg(tmp_path, tiny_config, toy_root, beta=0.0), reg)


@pytest.fixture(scope="module")
def blip2(tmp_path_factory):
    from generation_models import write_tiny_blip2

    return write_tiny_blip2(tmp_path_factory.mktemp("blip2"))


def _generated_captions(cache_dir, toy_root):
    """{toy image: captions} as recorded in the generation cache, found by each image's content digest."""
    from cirbench.generation.images import image_digest
    from cirbench.types import ImageRef

    by_digest = {}
    for line in (cache_dir / "generations" / "generations.jsonl").read_text().splitlines():
        entry = json.loads(line)
        by_digest[entry["request"]["image"]] = (entry["request"], entry["outputs"])
    names = json.loads((toy_root / "queries.json").read_text())["gallery"]
    found = {n: by_digest.get(image_digest(ImageRef(n, toy_root / "images" / n, root=toy_root))) for n in names}
    return {n: v for n, v in found.items() if v is not None}


def test_a_captioner_writes_the_captions_then_a_replay_reads_them(tmp_path, tiny_config, toy_root, blip2,
                                                                   monkeypatch):
    """--captioner captions every gallery image once (sampled, captions_per_image each), records them in the
    generation cache, and ranks exactly as the official scoring does with those captions; a replay run on a
    machine without the captioner ranks the same, loading no model; a missing one fails before encoding."""
    options = {"alpha": 0.6, "beta": 0.5, "captioner": f"hf:{blip2}", "captions_per_image": 2, "sampling_seed": 3}
    with registered(ToyPlugin(), "toy") as reg:
        (live,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, **options), reg)
    recorded = _generated_captions(tmp_path / "cache", toy_root)
    names = json.loads((toy_root / "queries.json").read_text())["gallery"]
    assert sorted(recorded) == sorted(names)  # every gallery image, each once
    request, _ = recorded[names[0]]
    assert request["model"] == f"hf:{blip2}" and request["params"]["n"] == 2
    assert request["params"]["sampling"]["seed"] == 3  # several captions are sampled, with the seed asked for
    captions = {n: outputs for n, (_, outputs) in recorded.items()}
    assert all(len(c) == 2 for c in captions.values())
    summary = live.record["method"]["summary"]
    assert summary["generations"] == {"cached": 0, "generated": len(names)}
    assert summary["captioned_images"] == len(names)
    assert live.record["method"]["info"]["captioner"] == f"hf:{blip2}"
    # not the paper's captions: the label says whose they are (weimocir+captions-<model>@alpha=..,beta=..)
    assert live.record["method"]["label"].startswith(f"weimocir+captions-{blip2.name}@")

    def tops(result):
        return {r["query"]: r["top"] for r in map(json.loads, result.predictions_path.read_text().splitlines())}

    # the official scoring with the recorded captions ranks as the run did
    _, queries, merged = _official(tiny_config, toy_root, captions, 0.6, 0.5, per_image=2)
    pos = {n: i for i, n in enumerate(names)}
    ours = tops(live)
    for qi, q in enumerate(queries):
        scores = merged[qi].copy()
        scores[pos[q["reference"]]] = -np.inf
        np.testing.assert_allclose([scores[pos[n]] for n in ours[q["id"]]], np.sort(scores)[::-1][:10], atol=1e-6)

    from cirbench.generation import captioner

    def no_model(*args, **kwargs):
        raise AssertionError("a replay run loaded a model")

    monkeypatch.setattr(captioner, "build_captioner", no_model)
    replay = {**options, "generation": "replay"}
    with registered(ToyPlugin(), "toy") as reg:
        (again,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, **replay), reg)
    assert tops(again) == ours
    assert again.record["method"]["summary"]["generations"] == {"cached": len(names), "generated": 0}
    assert again.record["method"]["summary"]["captions_sha256"] == summary["captions_sha256"]
    # another seed was never captioned: the replay names an image and fails before the gallery is encoded
    fresh = dataclasses.replace(_cfg(tmp_path, tiny_config, toy_root, **{**replay, "sampling_seed": 4}),
                                cache_dir=tmp_path / "fresh-cache")
    (tmp_path / "fresh-cache" / "generations").mkdir(parents=True)
    (tmp_path / "fresh-cache" / "generations" / "generations.jsonl").write_text(
        (tmp_path / "cache" / "generations" / "generations.jsonl").read_text())
    with registered(ToyPlugin(), "toy") as reg, pytest.raises(ReplayMiss, match=r"caption of image img_\w+\.png by "
                                                              rf"hf:{blip2}; {len(names)} images in all"):
        evaluate(fresh, reg)
    assert not list((tmp_path / "fresh-cache").glob("features/*/shard-*.safetensors"))


def test_captions_come_from_a_file_or_a_captioner_not_both(tmp_path, tiny_config, toy_root):
    path, _ = _captions_file(tmp_path, toy_root)
    with registered(ToyPlugin(), "toy"):
        res = CliRunner().invoke(cli, ["run", "-m", "weimocir", "-d", "toy", "--data-root", str(toy_root),
                                       "--backbone", str(tiny_config), "--pretrained", "none", "--output",
                                       str(tmp_path / "r"), "--no-cache", "--workers", "0", "--quiet",
                                       "--captions", str(path), "--captioner", "hf:some/model"])
    assert res.exit_code == 2 and "--captions FILE or --captioner MODEL, not both" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1


def test_a_sweep_reads_and_encodes_the_gallery_captions_once(tmp_path, tiny_config, toy_root, blip2, monkeypatch):
    """The values of a beta sweep share the gallery's caption features (Backbone.derived) and the images'
    digests, and each value ranks as it ranks run alone."""
    from cirbench.generation import images as generation_images
    from cirbench.methods.weimocir.model import WeiMoCIR

    reads, encoded = [], []
    read = generation_images.read_image_bytes
    monkeypatch.setattr(generation_images, "read_image_bytes", lambda ref: reads.append(ref.id) or read(ref))
    monkeypatch.setattr(generation_images, "_DIGESTS", {})
    features = WeiMoCIR._caption_features
    monkeypatch.setattr(WeiMoCIR, "_caption_features",
                        lambda self, ids, j, bar=None: encoded.append(bar is not None) or features(self, ids, j, bar))
    options = {"captioner": f"hf:{blip2}", "captions_per_image": 2}
    with registered(ToyPlugin(), "toy") as reg:
        swept = evaluate(_cfg(tmp_path, tiny_config, toy_root, beta="0.3,0.6", **options), reg)
    gallery = len(json.loads((toy_root / "queries.json").read_text())["gallery"])
    assert len(swept) == 2 and sorted(reads) == sorted(set(reads)) and len(reads) == gallery
    assert encoded.count(True) == 2  # the gallery's two caption slots, once for both values of the sweep
    for result, beta in zip(swept, (0.3, 0.6), strict=True):
        with registered(ToyPlugin(), "toy") as reg:
            cfg = _cfg(tmp_path, tiny_config, toy_root, beta=beta, **options, generation="replay")
            (alone,) = evaluate(dataclasses.replace(cfg, output=tmp_path / f"alone{beta}"), reg)
        assert alone.metrics == result.metrics
    # a file changed in place is read again, and its captions asked for again
    image = toy_root / "images" / "img_red_0.png"
    image.write_bytes(image.read_bytes() + b"\0")
    reads.clear()
    with registered(ToyPlugin(), "toy") as reg, pytest.raises(ReplayMiss, match=r"1 images in all"):
        evaluate(_cfg(tmp_path, tiny_config, toy_root, beta=0.3, **options, generation="replay"), reg)
    assert reads == ["img_red_0.png"]


def test_methods_sharing_a_backbone_get_their_own_captions_features(tmp_path, tiny_config):
    """The caption features kept on the backbone are keyed by the captions themselves: a second WeiMoCIR on the
    same backbone with other captions (another file, more captions per image) never gets the first one's."""
    from cirbench.methods.weimocir.model import WeiMoCIR

    bb = load_backbone(str(tiny_config), "none", device="cpu", precision="fp32")
    ids = ["a", "b", "c"]
    images = torch.nn.functional.normalize(torch.randn(3, bb.embed_dim), dim=-1)

    def gallery(captions, per_image=1):
        path = tmp_path / f"captions{len(list(tmp_path.iterdir()))}.json"
        path.write_text(json.dumps([{"candidate": i, "captions": c} for i, c in captions.items()]))
        method = WeiMoCIR(bb, {"alpha": 0.8, "beta": 0.5, "captions": str(path), "captions_per_image": per_image})
        return method.prepare_gallery(ids, images)

    first = gallery({"a": ["a red car", "x"], "b": ["a blue sky", "y"], "c": ["a dog", "z"]})
    assert torch.equal(gallery({"a": ["a red car", "w"], "b": ["a blue sky", "v"], "c": ["a dog", "u"]}), first)
    assert not torch.allclose(gallery({"a": ["a red car"], "b": ["a green sky"], "c": ["a dog"]}), first)
    assert gallery({"a": ["a red car", "x"], "b": ["a blue sky", "y"], "c": ["a dog", "z"]}, 2).shape[1] == \
        3 * bb.embed_dim


def test_captions_are_shared_with_the_language_model_methods(tmp_path, tiny_config, toy_root, blip2, endpoint,
                                                             monkeypatch):
    """One captioner asked the same way about the same image writes one record: CIReVL (caption per image, the
    same prompt and beam search) reads the captions WeiMoCIR's --captioner made, loading no captioner."""
    with registered(ToyPlugin(), "toy") as reg:
        evaluate(_cfg(tmp_path, tiny_config, toy_root, captioner=f"hf:{blip2}", captions_per_image=1), reg)
    recorded = {n: outputs for n, (_, outputs) in _generated_captions(tmp_path / "cache", toy_root).items()}

    from cirbench.generation import captioner

    def no_model(*args, **kwargs):
        raise AssertionError("the captions were made again")

    monkeypatch.setattr(captioner, "build_captioner", no_model)
    cirevl = dataclasses.replace(_cfg(tmp_path, tiny_config, toy_root, captioner=f"hf:{blip2}", caption_prompt="",
                                      llm="openai:gpt-test", llm_url=endpoint.url), method="cirevl", bootstrap=0)
    with registered(ToyPlugin(), "toy") as reg:
        (out,) = evaluate(cirevl, reg)
    rows = list(map(json.loads, out.predictions_path.read_text().splitlines()))
    references = {q["id"]: q["reference"] for q in json.loads((toy_root / "queries.json").read_text())["queries"]}
    assert all(r["method"]["captions"] == recorded[references[r["query"]]] for r in rows)
    assert out.record["method"]["summary"]["generations"]["generated"] == len(endpoint.requests)  # rewrites only


def test_a_chat_model_writes_sampled_captions(tmp_path, tiny_config, toy_root, endpoint):
    """--captioner openai:MODEL (the paper's captions came from a multimodal LLM): each of the captions of an
    image is its own request at temperature 1 with its own seed; a replay asks nothing."""
    options = {"captioner": "openai:gpt-4o", "captioner_url": endpoint.url, "captions_per_image": 2}
    with registered(ToyPlugin(), "toy") as reg:
        (live,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, **options), reg)
    names = json.loads((toy_root / "queries.json").read_text())["gallery"]
    assert len(endpoint.requests) == 2 * len(names)
    assert {r["temperature"] for r in endpoint.requests} == {1.0}
    seeds = [r["seed"] for r in endpoint.requests]
    recorded = _generated_captions(tmp_path / "cache", toy_root)
    for name, (request, captions) in recorded.items():
        assert request["params"] == {"n": 2, "temperature": 1.0, "max_tokens": 300, "seed": 0}
        colour = name.split("_")[1]
        first, second = captions
        assert first.startswith(f"a {colour} picture, take ") and second.startswith(f"a {colour} picture, take ")
        assert first != second  # two samples, two seeds
    # a batch's images share a sample's seed (the batch is seeded, as a transformers captioner's), each sample
    # of a batch has its own
    from cirbench.generation.images import CAPTION_BATCH

    assert len(set(seeds)) == 2 * -(-len(names) // CAPTION_BATCH)
    assert live.record["method"]["label"].startswith("weimocir+captions-gpt-4o@")
    endpoint.requests.clear()
    with registered(ToyPlugin(), "toy") as reg:
        (again,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, generation="replay", **options), reg)
    assert not endpoint.requests
    assert again.record["method"]["summary"]["captions_sha256"] == live.record["method"]["summary"]["captions_sha256"]


def test_an_unreachable_chat_captioner_names_its_option(tmp_path, tiny_config, toy_root):
    from generation_models import free_port

    options = {"captioner": "openai:gpt-4o", "captioner_url": f"http://127.0.0.1:{free_port()}/v1"}
    with registered(ToyPlugin(), "toy") as reg, pytest.raises(CirbenchError, match="unreachable.*--captioner-url"):
        evaluate(_cfg(tmp_path, tiny_config, toy_root, **options), reg)


def test_a_local_chat_model_writes_the_captions(tmp_path, tiny_config, toy_root, monkeypatch):
    """--captioner hf-chat:PATH: a local vision-language model is asked each image as a chat endpoint is (the
    prompt, then the image in its chat template's place), sampled at temperature 1 with a seed per sample; the
    captions are recorded with the weights' precision and replayed without loading a model."""
    from generation_models import write_tiny_llava

    from cirbench.generation import captioner as captioner_module
    from cirbench.generation import llm as llm_module

    llava = write_tiny_llava(tmp_path / "llava")
    seen = []
    encode = llm_module.TransformersVLM._encode

    def spy(self, prompts):
        enc = encode(self, prompts)
        seen.append((len(prompts), tuple(enc["pixel_values"].shape), self.tokenizer.decode(enc["input_ids"][-1]),
                     self.seed, self.temperature))
        return enc

    monkeypatch.setattr(llm_module.TransformersVLM, "_encode", spy)
    monkeypatch.setattr(captioner_module, "CHAT_CAPTION_TOKENS", 4)  # a random model never stops by itself
    options = {"captioner": f"hf-chat:{llava}", "captions_per_image": 2, "caption_prompt": "Say what you see."}
    with registered(ToyPlugin(), "toy") as reg:
        (live,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, **options), reg)
    names = json.loads((toy_root / "queries.json").read_text())["gallery"]
    assert sum(n for n, *_ in seen) == 2 * len(names)  # every image, once per sample
    assert all(shape == (n, 3, 28, 28) for n, shape, *_ in seen)  # one image per prompt, through the processor
    # the prompt, then the image's tokens (the processor expands its chat template's one placeholder)
    assert all(re.fullmatch(r"(<pad>)*(<s>)?user: Say what you see\.(<image>)+ \| assistant:", text)
               for _, _, text, _, _ in seen), seen[0][2]
    assert {t for *_, t in seen} == {1.0} and len({s for *_, s, _ in seen}) == len(seen)  # a seed per sample
    recorded = _generated_captions(tmp_path / "cache", toy_root)
    assert set(recorded) == set(names)
    for request, captions in recorded.values():
        assert request["model"] == f"hf-chat:{llava}"
        # the token limit it ran with (4 here) is part of the key, as the weights' precision is
        assert request["params"] == {"n": 2, "temperature": 1.0, "max_tokens": 4, "seed": 0, "precision": "fp32"}
        assert len(captions) == 2
    assert live.record["method"]["label"].startswith("weimocir+captions-llava@")

    def no_model(*args, **kwargs):
        raise AssertionError("a replay run loaded a model")

    monkeypatch.setattr(llm_module.TransformersVLM, "__init__", no_model)
    with registered(ToyPlugin(), "toy") as reg:
        (again,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, generation="replay", **options), reg)
    assert again.record["method"]["summary"]["captions_sha256"] == live.record["method"]["summary"]["captions_sha256"]


def test_an_unknown_captioner_fails_before_any_image_is_read(tmp_path, tiny_config, toy_root, monkeypatch):
    from cirbench import evaluate as evaluate_module
    from cirbench.methods.weimocir import model as weimocir_module

    def no_reading(*args, **kwargs):
        raise AssertionError("images were read")

    monkeypatch.setattr(evaluate_module, "encode_images", no_reading)
    monkeypatch.setattr(weimocir_module, "image_digests", no_reading)
    with registered(ToyPlugin(), "toy") as reg, pytest.raises(CirbenchError,
                                                              match="unknown captioner 'llava:x'.*hf-chat"):
        evaluate(_cfg(tmp_path, tiny_config, toy_root, captioner="llava:x"), reg)


def test_a_file_option_counts_by_its_contents_wherever_it_lies(tmp_path, tiny_config, toy_root, monkeypatch):
    """--captions FILE is part of the configuration by what the file holds: the same captions at another path
    (named relatively, from another folder) are the same configuration, whose rerun replaces its own result;
    other captions at the same path are another, written beside it; and `cirbench reproduce` counts no path."""
    from cirbench.reproduce import compare
    from cirbench.results import same_configuration
    from cirbench.util import file_sha256

    path, _ = _captions_file(tmp_path, toy_root)
    with registered(ToyPlugin(), "toy") as reg:
        (first,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, captions=str(path)), reg)
    assert first.record["method"]["files"] == {"captions": file_sha256(path)}
    moved = tmp_path / "elsewhere" / "caps.json"
    moved.parent.mkdir()
    path.rename(moved)
    monkeypatch.chdir(moved.parent)
    with registered(ToyPlugin(), "toy") as reg:
        (again,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, captions="caps.json"), reg)
    assert again.record["fingerprint"] == first.record["fingerprint"]
    assert again.result_path == first.result_path and again.note is None  # replaced, as a rerun is
    report = compare(first.record, first.result_path, again.record, again.result_path, 0.0)
    assert not report.configuration
    # a result written before path options were recorded by content is compared by path, as it was
    older = json.loads(json.dumps(first.record, default=str))
    for part in ("method", "dataset"):
        del older[part]["files"]
    assert same_configuration(older, first.record) and not same_configuration(older, again.record)
    rows = json.loads(moved.read_text())
    rows[1]["captions"][0] = "another caption"
    moved.write_text(json.dumps(rows))
    with registered(ToyPlugin(), "toy") as reg:
        (other,) = evaluate(_cfg(tmp_path, tiny_config, toy_root, captions="caps.json"), reg)
    assert other.record["fingerprint"] != first.record["fingerprint"]
    assert other.result_path != again.result_path and other.note and again.result_path.exists()
    report = compare(again.record, again.result_path, other.record, other.result_path, 0.0)
    assert {path for path, *_ in report.configuration} == {"method.options.captions", "method.info.captions.sha256"}
