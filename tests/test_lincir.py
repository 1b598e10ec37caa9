"""LinCIR: keyword masking against a transcription of the official loader (tokenized by an HF CLIPTokenizer with
the official ``[$]`` special token), the SEARLE protocol with LinCIR weights, demo-weight labelling and its
offline error, and language-only training (loss, noise, checkpoints loaded back)."""

from __future__ import annotations

import csv
import json
import random

import pytest
import torch
from click.testing import CliRunner

from cirbench.backbones import load_backbone
from cirbench.cli import cli
from cirbench.errors import CheckpointError, CirbenchError
from cirbench.methods._shared import textinv
from cirbench.methods._shared.textinv import Phi, encode_with_pseudo_tokens
from cirbench.methods.lincir import model as lincir
from cirbench.types import Query


@pytest.fixture(scope="module")
def backbone(tiny_config):
    return load_backbone(str(tiny_config), "none", device="cpu", seed=0)


# -- a transcription of navervision/lincir loader.py (CaptionDataset.__getitem__), masking part ---------------
def official_extract(tagged):
    sequences, current = [], []
    for text, pos in tagged:
        if pos in ["NOUN", "PROPN", "ADJ", "DET"]:
            current.append(text)
        else:
            if current:
                sequences.append(" ".join(current))
                current = []
    if current:
        sequences.append(" ".join(current))
    return sequences


def official_replace(caption, keywords):
    replaced_caption = caption
    if len(keywords) == 0:
        keywords = [""]
    for keyword in keywords:
        if keyword != "" and keyword in caption:
            replaced_caption = replaced_caption.replace(keyword, "[$]")
        else:
            tmp_keywords = caption.split(" ")
            if len(tmp_keywords) > 0:
                selected_keywords = random.sample(tmp_keywords, k=min(int(len(tmp_keywords) * 1.0), 1))
                for selected_keyword in selected_keywords:
                    replaced_caption = replaced_caption.replace(selected_keyword, "[$]")
            else:
                replaced_caption = f"a photo of [$] that {caption}"
            break
    return replaced_caption


@pytest.fixture(scope="module")
def hf_clip_tokenizer(tmp_path_factory):
    """An HF CLIPTokenizer on open_clip's own BPE with LinCIR's added special token ``[$]`` (id 49408)."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    st = SimpleTokenizer()
    folder = tmp_path_factory.mktemp("hf_tok")
    (folder / "vocab.json").write_text(json.dumps(st.encoder))
    merges = sorted(st.bpe_ranks.items(), key=lambda kv: kv[1])
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for (a, b), _ in merges))
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!",
                        bos_token="<start_of_text>", eos_token="<end_of_text>", unk_token="<end_of_text>")
    tok.add_special_tokens({"additional_special_tokens": ["[$]"]})
    return tok


TAGGED = [
    [("a", "DET"), ("red", "ADJ"), ("dog", "NOUN"), ("runs", "VERB"), ("on", "ADP"), ("the", "DET"), ("grass", "NOUN")],
    [("two", "NUM"), ("cats", "NOUN"), ("sleep", "VERB")],
    [("running", "VERB"), ("fast", "ADV")],  # no keyword: one random word
    [("the", "DET"), ("category", "NOUN"), ("of", "ADP"), ("cat", "NOUN"), ("toys", "NOUN")],  # substring replace
    [("hello", "INTJ"), ("", "SPACE"), ("world", "NOUN")],
]


@pytest.mark.parametrize("tagged", TAGGED)
def test_masking_equals_the_official_loader_token_for_token(tagged, backbone, hf_clip_tokenizer):
    caption = " ".join(w for w, _ in tagged)
    keywords = lincir.keyword_runs(tagged)
    assert keywords == official_extract(tagged)
    for seed in range(5):
        random.seed(seed)
        official = official_replace(caption, official_extract(tagged))
        ours = lincir.mask_caption(caption, keywords, random.Random(seed))
        ids = hf_clip_tokenizer(text=official, padding="max_length", truncation=True, max_length=77)["input_ids"]
        expected = [259 if i == 49408 else i for i in ids]  # the official code swaps [$] for "$</w>" (259)
        assert backbone.tokenize([ours])[0].tolist() == expected, (official, ours)


def test_clean_caption_is_the_official_cleaning(backbone):
    assert textinv.clean_caption("<PERSON> holds a $5 Note ", backbone.tokenizer) == "person holds a 5 note"
    long = " ".join(["word"] * 100)
    cleaned = textinv.clean_caption(long, backbone.tokenizer)
    assert len(backbone.tokenizer.encode(cleaned)) == 75  # the official code keeps 75 BPE tokens


# -- evaluation --------------------------------------------------------------------------------------------
def test_lincir_weights_follow_the_searle_protocol(tmp_path, backbone):
    phi = Phi(32, 128, 32)
    path = tmp_path / "lincir_tiny.pt"
    torch.save({"Phi": phi.state_dict()}, path)
    method = lincir.LinCIR(backbone, {"checkpoint": path}, "circo")
    refs = torch.randn(2, 32)
    got = method.compose(refs, [Query("0", "r", ("is red",)), Query("1", "s", ("has a hat",))])
    tokens = phi.eval()(refs)
    want = encode_with_pseudo_tokens(backbone, ["a photo of $ that is red", "a photo of $ that has a hat"], tokens, "$")
    assert torch.allclose(got, want, atol=1e-6)
    assert method.label_tag() is None and method.info()["sha256"]
    fiq = method.compose(refs[:1], [Query("0", "r", ("is red.", "has short sleeves"))])
    fwd = method.compose(refs[:1], [Query("0", "r", ("is red and has short sleeves",))])
    rev = method.compose(refs[:1], [Query("0", "r", ("has short sleeves and is red",))])
    assert torch.allclose(fiq, torch.nn.functional.normalize(fwd + rev, dim=-1), atol=1e-5)


def test_reference_pixels_reach_the_image_tower_as_fp16_as_officially(tmp_path, backbone):
    """LinCIR's evaluation feeds reference images as ``images.half()`` to its float32 vision tower (which casts
    them back): the reference embedding is that of fp16-rounded pixels, cached apart from SEARLE's."""
    from cirbench.methods._shared.textinv import raw_image_features

    path = tmp_path / "lincir_tiny.pt"
    torch.save({"Phi": Phi(32, 128, 32).state_dict()}, path)
    method = lincir.LinCIR(backbone, {"checkpoint": path}, "circo")
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        official = backbone.model.encode_image(pixels.half().to(torch.float32))  # transformers casts to the weights'
    got = method.encode_references(pixels)
    assert torch.equal(got, official.float())
    assert not torch.equal(got, raw_image_features(backbone, pixels))
    assert method.reference_feature_kind() == {"kind": "image-global-raw", "pixels": "fp16"}


def test_demo_weights_are_labelled_and_offline_is_one_clear_line(tmp_path, backbone, monkeypatch):
    with pytest.raises(CheckpointError, match="demo weights are for ViT-L-14/openai.*--checkpoint"):
        lincir.LinCIR(backbone, {"checkpoint": None}, "cirr")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(CheckpointError) as info:
        textinv.LINCIR_DEMO[0].fetch("LinCIR's demo weights")
    message = str(info.value)
    assert "\n" not in message and "lincir_large.pt" in message and "--checkpoint PATH" in message
    # a demo file in the hub cache is used without the network, and the run is labelled as demo weights
    phi = Phi(32, 128, 32)
    demo = tmp_path / "lincir_large.pt"
    torch.save({"Phi": phi.state_dict()}, demo)
    monkeypatch.setattr("cirbench.hub.hub_file", lambda *a, **kw: demo)
    monkeypatch.setattr(textinv, "LINCIR_DEMO", (textinv.LINCIR_DEMO[0], (backbone.model_name, backbone.pretrained)))
    method = lincir.LinCIR(backbone, {"checkpoint": None}, "cirr")
    assert method.label_tag() == "demo-weights" and "not the paper's" in method.info()["weights"]


# -- language-only training ---------------------------------------------------------------------------------
def _captions(path, n=48, column=False):
    colours, things = ["red", "green", "blue", "yellow"], ["dog", "car", "house", "tree", "cup", "shoe"]
    rows = [(f"a {colours[i % 4]} {things[i % 6]} on the table", f"a {colours[i % 4]} {things[i % 6]}|the table")
            for i in range(n)]
    if column:
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["caption", "keywords"])
            writer.writerows(rows)
    else:
        path.write_text("".join(c + "\n" for c, _ in rows) + "\n\n")
    return path


def _train(tiny_config, corpus, out, *extra):
    return CliRunner().invoke(cli, ["train", "--method", "lincir", "--corpus", str(corpus), "--output", str(out),
                                    "--backbone", str(tiny_config), "--pretrained", "none", "--batch-size", "16",
                                    "--workers", "0", "--quiet", "--log-every", "1", *extra])


@pytest.mark.parametrize("caption, keywords", [
    ("a red dog sits on a mat", ["red", "cat", "mat"]),  # a keyword not in the caption: one random word, then stop
    ("a red dog sits on a mat", ["a red dog", "sofa"]),
    ("two cups", ["bowl", "two"]),
])
def test_keywords_of_a_corpus_column_missing_from_the_caption_stop_the_masking(caption, keywords, backbone,
                                                                                hf_clip_tokenizer):
    """--keywords column: keywords need not be in the caption; the first one that is not ends the loop with one
    random word masked, whatever keywords follow (the official loader's ``break``)."""
    for seed in range(8):
        random.seed(seed)
        official = official_replace(caption, keywords)
        ours = lincir.mask_caption(caption, keywords, random.Random(seed))
        ids = hf_clip_tokenizer(text=official, padding="max_length", truncation=True, max_length=77)["input_ids"]
        assert backbone.tokenize([ours])[0].tolist() == [259 if i == 49408 else i for i in ids], (official, ours)


def test_a_caption_whose_mask_is_cut_off_falls_back_to_a_photo_of(tiny_config):
    """A mask past the text context leaves no "$": the prompt is then "a photo of $" (the official loader's
    fallback), and the batch's shares say so."""
    bb = load_backbone(str(tiny_config), "none", device="cpu", seed=0, training=True)
    trainable = lincir.LinCIRTrainable(bb, {"keywords": "column", "noise": 1.0, "dropout": 0.0})
    long = " ".join(["word"] * 90) + " lamp"
    prompts, shares = trainable.masked_prompts([long, "a red lamp"], [["lamp"], ["lamp"]])
    assert prompts == ["a photo of $", "a red $"]
    assert shares == {"masked_by_keywords": 1.0, "kept_placeholder": 0.5}


def test_training_step_is_the_official_loss(tiny_config, tmp_path):
    bb = load_backbone(str(tiny_config), "none", device="cpu", seed=0, training=True)
    trainable = lincir.LinCIRTrainable(bb, {"keywords": "random", "noise": 1.0, "dropout": 0.0})
    from cirbench.corpora import Batch

    captions = ["a red dog on the table", "A blue $car", "two cups"]
    torch.manual_seed(3)
    random.seed(3)
    loss, logs = trainable.training_step(Batch(torch.empty(3, 0), captions))
    # the same step written out: cleaned captions, masked prompts, noised raw text embeddings, MSE
    torch.manual_seed(3)
    random.seed(3)
    clean = ["a red dog on the table", "a blue car", "two cups"]
    prompts = [lincir.mask_caption(c, [], random) for c in clean]
    with torch.no_grad():
        original = bb.model.encode_text(bb.tokenize(clean)).float()
    noised = original + torch.rand(3).unsqueeze(-1) * torch.randn(original.shape)
    pseudo = trainable.net(noised)
    counts = [p.split().count("$") for p in prompts]
    rows = [pseudo[i].unsqueeze(0).expand(n, -1) for i, n in enumerate(counts)]
    want = torch.nn.functional.mse_loss(encode_with_pseudo_tokens(bb, prompts, rows, "$", normalize=False), original)
    assert torch.allclose(loss, want, atol=1e-6)
    # --keywords random: every caption masked by a random word (none by keywords), each keeping its "$"
    assert logs == {"masked_by_keywords": 0.0, "kept_placeholder": 1.0}
    assert all(not p.requires_grad for p in bb.model.parameters())


def test_language_only_training_lowers_the_loss_and_loads_back(tiny_config, tmp_path, backbone):
    corpus = _captions(tmp_path / "captions.csv", column=True)
    out = tmp_path / "lincir"
    res = _train(tiny_config, corpus, out, "--keywords", "column", "--max-steps", "30", "--lr", "3e-3")
    assert res.exit_code == 0, res.output
    log = [e for e in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "loss" in e]
    assert len(log) == 30 and all(e["masked_by_keywords"] == e["kept_placeholder"] == 1.0 for e in log)
    first, last = sum(e["loss"] for e in log[:5]) / 5, sum(e["loss"] for e in log[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "lincir" and config["keywords"] == "column" and config["train"]["schedule"] == "constant"
    method = lincir.LinCIR(backbone, {"checkpoint": out}, "cirr")  # same tiny backbone (seed 0)
    assert method.compose(torch.randn(1, 32), [Query("0", "r", ("is red",))]).shape == (1, 32)
    # LinCIR's Phi is SEARLE's, tensor for tensor: its weights would load into searle, and give numbers labelled
    # searle; the checkpoint's record refuses that
    from cirbench.errors import CheckpointError
    from cirbench.methods.searle.model import Searle

    with pytest.raises(CheckpointError, match="is for method 'lincir', not 'searle'"):
        Searle(backbone, {"checkpoint": out}, "cirr")
    # a plain caption file (one per line) trains too, with the random-word rule
    res = _train(tiny_config, _captions(tmp_path / "captions.txt"), tmp_path / "txt", "--keywords", "random",
                 "--max-steps", "2")
    assert res.exit_code == 0, res.output


def test_lincir_runs_with_its_own_preprocessing(tiny_config, tmp_path, toy_root):
    """By default LinCIR's images go through its own preprocessing (transformers' CLIPImageProcessor, ``hf-clip``),
    recorded in the result and kept apart from other recipes in the feature cache."""
    from helpers import registered
    from toy_plugin import ToyPlugin

    corpus = _captions(tmp_path / "captions.txt")
    assert _train(tiny_config, corpus, tmp_path / "phi", "--keywords", "random", "--max-steps", "2").exit_code == 0
    common = ["--method", "lincir", "--checkpoint", str(tmp_path / "phi"), "--dataset", "toy", "--split", "val",
              "--backbone", str(tiny_config), "--pretrained", "none", "--data-root", str(toy_root), "--workers", "0",
              "--cache-dir", str(tmp_path / "cache"), "--quiet", "--no-leaderboard"]
    runner = CliRunner()
    with registered(ToyPlugin(), "toy"):
        for kind, out in ((None, "own"), ("clip", "clip")):
            extra = ["--preprocess", kind] if kind else []
            res = runner.invoke(cli, ["run", *common, "--output", str(tmp_path / out), *extra])
            assert res.exit_code == 0, res.output
    own, clip = (json.loads(next((tmp_path / out / "toy" / "val").glob("lincir*.json")).read_text())
                 for out in ("own", "clip"))
    assert own["preprocess"]["kind"] == "hf-clip" and own["preprocess"]["crop"] == "center-floor"
    assert clip["preprocess"]["kind"] == "clip" and clip["cache"]["misses"] == own["cache"]["misses"] > 0


def test_training_input_errors_are_one_line(tiny_config, tmp_path):
    corpus = _captions(tmp_path / "captions.txt")
    res = _train(tiny_config, corpus, tmp_path / "a", "--keywords", "column", "--max-steps", "1")
    assert res.exit_code != 0 and "needs a 'keywords' column" in res.output
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    res = _train(tiny_config, empty, tmp_path / "b", "--keywords", "random", "--max-steps", "1")
    assert res.exit_code != 0 and "is empty" in res.output
    try:
        import spacy

        spacy.load("en_core_web_sm")
    except (ImportError, OSError):  # the default keyword rule without its model: how to get it, in one line
        res = _train(tiny_config, corpus, tmp_path / "c", "--max-steps", "1")
        assert res.exit_code != 0 and "en_core_web_sm" in res.output and "--keywords random" in res.output
        assert "Traceback" not in res.output
    with pytest.raises(CirbenchError):
        lincir.LinCIRTrainable(load_backbone(str(tiny_config), "none", device="cpu"), {"keywords": "column"}
                               ).keywords(["x"], {})
