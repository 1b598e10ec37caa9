"""Textual inversion: pseudo-word substitution, Pic2Word, SEARLE, FTI4CIR, safe loading of pickled modules."""

from __future__ import annotations

import functools
import json
import os
import pickletools
import re
import sys
import types
import warnings
import zipfile

import pytest
import torch
from annotations import ANNOTATIONS, needs_annotations
from click.testing import CliRunner

from cirbench.backbones import load_backbone
from cirbench.checkpoints import save_checkpoint
from cirbench.cli import cli
from cirbench.errors import CheckpointError, CirbenchError, CirbenchWarning
from cirbench.methods._shared.textinv import encode_with_pseudo_tokens, token_embedding_module
from cirbench.safe_unpickle import load_pickled_module_tensors
from cirbench.types import Query


def fashioniq_val_records() -> list[dict]:
    """Every FashionIQ val query of the real annotation files (the three categories)."""
    records = [r for f in sorted((ANNOTATIONS / "fashioniq" / "captions").glob("cap.*.val.json"))
               for r in json.loads(f.read_text())]
    assert len(records) == 6016
    return records


@pytest.fixture(scope="module")
def backbone(tiny_config):
    return load_backbone(str(tiny_config), "none", device="cpu", seed=0)


def test_substituting_a_real_word_embedding_equals_encoding_the_word(backbone):
    words = ["dog", "red", "umbrella"]
    emb = token_embedding_module(backbone.model)
    ids = [backbone.tokenizer([w])[0][1] for w in words]
    pseudo = [emb.weight[i].unsqueeze(0) for i in ids]
    ours = encode_with_pseudo_tokens(backbone, [f"a photo of * that is {w}" for w in words], pseudo, "*")
    real = backbone.encode_text([f"a photo of {w} that is {w}" for w in words])
    assert torch.allclose(ours, real, atol=1e-5)
    # several placeholders per prompt, different counts per prompt
    two = [torch.stack([emb.weight[ids[0]], emb.weight[ids[1]]]), emb.weight[ids[2]].unsqueeze(0)]
    ours = encode_with_pseudo_tokens(backbone, ["a * and a * thing", "a * thing"], two, "*")
    real = backbone.encode_text(["a dog and a red thing", "a umbrella thing"])
    assert torch.allclose(ours, real, atol=1e-5)
    with pytest.raises(ValueError, match="placeholders"):
        encode_with_pseudo_tokens(backbone, ["no placeholder here"], [emb.weight[ids[0]].unsqueeze(0)], "*")


def test_a_placeholder_character_in_a_caption_is_text_not_a_second_pseudo_word(backbone):
    """Real captions hold the placeholders' characters ("sh*t" in FashionIQ's, prices with "$"): the prompts keep
    one placeholder, for the image, and encode as the caption with that character made a space."""
    from cirbench.methods._shared.textinv import pic2word_prompt, searle_prompt
    from cirbench.types import Query

    word = token_embedding_module(backbone.model).weight[backbone.tokenizer(["dog"])[0][1]].unsqueeze(0)
    for prompt, placeholder, plain in (
            (pic2word_prompt(Query("1", "r", ("a shirt saying sh*t",))), "*", "a photo of dog , a shirt saying sh t"),
            (pic2word_prompt(Query("2", "r", ("is *red", "has a * on it"))), "*",
             "a photo of dog , has a   on it and is  red"),
            (searle_prompt("costs $5 less", "$"), "$", "a photo of dog that costs  5 less")):
        assert prompt.count(placeholder) == 1, prompt
        ours = encode_with_pseudo_tokens(backbone, [prompt], [word], placeholder)
        assert torch.allclose(ours, backbone.encode_text([plain]), atol=1e-5), prompt


def test_gradients_flow_into_pseudo_words(backbone):
    pseudo = torch.randn(2, backbone.model.token_embedding.weight.shape[1], requires_grad=True)
    encode_with_pseudo_tokens(backbone, ["a photo of *", "a photo of * ,  red"], pseudo, "*").sum().backward()
    assert pseudo.grad is not None and pseudo.grad.abs().sum() > 0


def test_mapping_networks_compute_as_the_official_modules():
    """Released weights load by name into cirbench's mapping networks; the names alone do not fix what runs
    between the layers. Loaded with random weights in the official names, each computes what the official
    forward does: SEARLE's Phi (phi.py, which FTI4CIR and LinCIR copy) Linear-GELU-Dropout-Linear-GELU-Dropout-
    Linear; Pic2Word's IM2TEXT (model/model.py) Linear-Dropout-ReLU twice, then fc_out. Dropout is off in
    evaluation."""
    from torch.nn.functional import gelu, linear, relu

    from cirbench.methods._shared.textinv import Img2Text, Phi

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 16, generator=gen)

    def load_random_weights(module):
        """Random weights under the module's (the official) names; a Linear layer of them by name."""
        w = {k: torch.randn(v.shape, generator=gen) for k, v in module.state_dict().items()}
        module.load_state_dict(w)
        return lambda h, name: linear(h, w[f"{name}.weight"], w[f"{name}.bias"])

    phi = Phi(16, 64, 24)
    fc = load_random_weights(phi)
    torch.testing.assert_close(phi.eval()(x), fc(gelu(fc(gelu(fc(x, "layers.0")), "layers.3")), "layers.6"))
    im2text = Img2Text(16, 32, 24)
    fc = load_random_weights(im2text)
    torch.testing.assert_close(im2text.eval()(x), fc(relu(fc(relu(fc(x, "layers.0.0")), "layers.1.0")), "fc_out"))


# -- Pic2Word --------------------------------------------------------------------------------------------
def test_pic2word_official_layout_loads_and_matches(tmp_path, backbone):
    from cirbench.methods.pic2word.model import Pic2Word, build_net

    net = build_net(backbone, {"middle_dim": 16, "dropout": 0.1})
    save_checkpoint(tmp_path / "ours", net.state_dict(), {"method": "pic2word", "backbone": backbone.identity(),
                                                         "options": {"middle_dim": 16, "dropout": 0.1}})
    official = tmp_path / "pic2word_model.pt"
    torch.save({"state_dict_img2text": {f"module.{k}": v for k, v in net.state_dict().items()}, "epoch": 30}, official)
    queries = [Query("0", "r", ("make it red",)), Query("1", "r", ("is longer", "has stripes"))]
    refs = torch.randn(2, 32)
    a = Pic2Word(backbone, {"checkpoint": tmp_path / "ours"}, "cirr").compose(refs, queries)
    b = Pic2Word(backbone, {"checkpoint": official}, "cirr").compose(refs, queries)
    assert a.shape == (2, 32) and torch.allclose(a, b, atol=1e-6)


def test_pic2word_loss_is_the_official_one():
    """Pic2Word's trainer.py get_loss_img2text (one process): features normalised, logits scaled by CLIP's
    logit_scale.exp() both ways, the two cross-entropies averaged; cirbench's contrastive loss with temperature
    1 / logit_scale.exp() (as Pic2WordTrainable passes it) is that number."""
    from cirbench.training import contrastive_loss

    def official(image_features, text_features, logit_scale):  # transcribed, the non-distributed branch
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        ground_truth = torch.arange(len(image_features)).long()
        logits_per_image = logit_scale * image_features @ text_features.t()
        loss_img_val = torch.nn.CrossEntropyLoss()(logits_per_image, ground_truth)
        logits_per_text = logit_scale * text_features @ image_features.t()
        loss_txt_val = torch.nn.CrossEntropyLoss()(logits_per_text, ground_truth)
        return (loss_img_val + loss_txt_val) / 2

    gen = torch.Generator().manual_seed(0)
    image, text = torch.randn(8, 16, generator=gen) * 3, torch.randn(8, 16, generator=gen)
    text[:4] += 2 * image[:4]  # some pairs close, so that the two directions differ
    scale = torch.tensor(4.6052).exp()  # CLIP's trained logit scale, 100
    torch.testing.assert_close(contrastive_loss(image, text, 1.0 / float(scale)), official(image, text, scale))


@pytest.mark.parametrize("method", ["pic2word", "context-i2w"])
def test_pic2word_family_steps_take_their_temperature_from_the_backbones_logit_scale(method, tiny_config, monkeypatch):
    """The step's temperature is 1 / logit_scale.exp() of the CLIP it trains on (100 for a trained CLIP; a random
    initialisation's 1 / 0.07 would hide a fixed 0.07)."""
    from cirbench.corpora import Batch
    from cirbench.methods._shared import textinv
    from cirbench.methods.context_i2w.model import ContextI2WTrainable
    from cirbench.methods.pic2word.model import Pic2WordTrainable

    bb = load_backbone(str(tiny_config), "none", device="cpu", seed=0, training=True)
    with torch.no_grad():
        bb.model.logit_scale.fill_(4.6052)
    seen, real = [], textinv.contrastive_loss
    monkeypatch.setattr(textinv, "contrastive_loss", lambda i, t, temperature: seen.append(temperature) or real(
        i, t, temperature))
    trainable = (Pic2WordTrainable if method == "pic2word" else ContextI2WTrainable)(bb, {"middle_dim": 32,
                                                                                       "dropout": 0.0})
    size = bb.preprocessor("clip").size
    batch = Batch(torch.randn(4, 3, size, size), ["a red square"] * 4, {"masked_caption": ["a red <|replace|>"] * 4})
    loss, _ = trainable.training_step(batch)
    assert torch.isfinite(loss) and seen == [pytest.approx(1 / torch.tensor(4.6052).exp().item())]


def test_pic2word_training_lowers_the_loss(tmp_path, tiny_config):
    from test_training import make_corpus

    from cirbench.methods.pic2word.model import Pic2WordTrainable
    from cirbench.training import TrainConfig, train

    trainable = Pic2WordTrainable(load_backbone(str(tiny_config), "none", device="cpu"),
                                  {"middle_dim": 16, "dropout": 0.0})
    losses, step = [], trainable.training_step
    trainable.training_step = lambda b: (lambda out: (losses.append(float(out[0].detach())), out)[1])(step(b))
    train(trainable, make_corpus(tmp_path / "c"), TrainConfig(output=tmp_path / "o", max_steps=12, batch_size=16,
                                                              lr=3e-3, schedule="constant", workers=0, progress=False))
    assert sum(losses[-3:]) < sum(losses[:3])


def test_pic2word_trains_and_mismatch_is_one_line(tmp_path, tiny_config):
    from test_training import make_corpus

    corpus = make_corpus(tmp_path / "c")
    common = ["--backbone", str(tiny_config), "--pretrained", "none", "--workers", "0", "--quiet", "--batch-size", "8",
              "--warmup-steps", "0", "--lr", "1e-3", "--schedule", "constant", "--middle-dim", "16"]
    with warnings.catch_warnings(record=True) as quiet:
        warnings.simplefilter("always")
        res = CliRunner().invoke(cli, ["train", "--method", "pic2word", "--corpus", str(corpus), "--output",
                                       str(tmp_path / "p2w"), "--max-steps", "3", *common])
    assert res.exit_code == 0, res.output
    assert not [w for w in quiet if "warm-up" in str(w.message)]  # --warmup-steps 0
    # Pic2Word's own warm-up (10,000 steps) in a 3-step run: said, in one line, with what the lr ends at
    at = common.index("--warmup-steps")
    short = [a for a in common[:at] + common[at + 2:] if a != "--quiet"]
    said = re.escape("the warm-up (--warmup-steps 10000) is as long as the whole run (3 steps): the learning rate "
                     "never reaches --lr 0.001 (it ends at 3e-07)")
    with pytest.warns(CirbenchWarning, match=said) as warned:
        res = CliRunner().invoke(cli, ["train", "--method", "pic2word", "--corpus", str(corpus), "--output",
                                       str(tmp_path / "warm"), "--max-steps", "3", *short])
    assert res.exit_code == 0, res.output
    assert len([w for w in warned if "warm-up" in str(w.message)]) == 1
    # without --quiet the run first says what it will do
    plan = (f"train pic2word on 32 samples: 3 steps of 8, lr 0.001 constant, 10,000 warm-up steps, fp32; images: "
            f"random-resized-crop; checkpoint every 500 steps in {tmp_path / 'warm' / 'checkpoint-latest'}")
    assert plan in res.output
    assert json.loads((tmp_path / "p2w" / "config.json").read_text())["method"] == "pic2word"
    # a checkpoint whose tensors do not fit the backbone: one line naming the mismatch, exit 2
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict_img2text": {"layers.0.0.weight": torch.zeros(16, 99)}}, bad)
    from cirbench.methods.pic2word.model import Pic2Word

    with pytest.raises(CheckpointError, match="does not fit this backbone.*layers.0.0.weight"):
        Pic2Word(load_backbone(str(tiny_config), "none", device="cpu"), {"checkpoint": bad}, "cirr")


def official_pic2word_train_transform(n_px=224):
    """Pic2Word's ``model/clip.py`` ``_transform(n_px, is_train=True)``, transcribed."""
    from torchvision.transforms import Compose, InterpolationMode, Normalize, RandomResizedCrop, ToTensor

    return Compose([RandomResizedCrop(n_px, scale=(0.9, 1.0), interpolation=InterpolationMode.BICUBIC),
                    lambda image: image.convert("RGB"), ToTensor(),
                    Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])


def test_pic2word_training_crops_are_the_official_transform_drawn_per_sample(tmp_path):
    """Each sample's crop is torchvision's RandomResizedCrop as Pic2Word's training transform composes it, drawn
    under a seed of its own: the same (seed, epoch, sample) gives the same crop, another epoch or sample another,
    and the global random state (dropout's) is left as it was."""
    from PIL import Image
    from test_parity import MODES, _make

    from cirbench.preprocess import Preprocessor, RandomResizedCrop

    aug = RandomResizedCrop(Preprocessor("clip", 224), scale=(0.9, 1.0), seed=3)
    official = official_pic2word_train_transform()
    varied = []
    for i, (mode, (w, h)) in enumerate(zip(MODES, [(640, 427), (500, 375), (480, 640), (1024, 683), (612, 612),
                                                    (375, 500), (800, 533)], strict=True)):
        image = Image.open(_make(tmp_path / f"{i}.{mode.split('-')[1]}", w, h, mode, i))
        torch.manual_seed(aug.sample_seed(f"0:{i}"))
        expected = official(image)
        state = torch.get_rng_state()
        assert torch.equal(aug(image, f"0:{i}"), expected), mode
        assert torch.equal(torch.get_rng_state(), state)
        assert torch.equal(aug(image, f"0:{i}"), expected)
        varied.append(not torch.equal(aug(image, f"1:{i}"), expected)  # the next epoch
                      and not torch.equal(aug(image, f"0:{i + 100}"), expected))  # another row of the same image
    # not every image: many draws end in RandomResizedCrop's fallback, one centre crop whatever was drawn (with a
    # scale of at least 0.9 and a ratio of at most 4:3 few boxes fit a 3:2 image), as in the official training
    assert sum(varied) >= 3, varied


def test_pic2word_augmented_training_does_not_depend_on_readers_or_resuming(tmp_path, tiny_config):
    from test_parity import _make
    from test_training import make_corpus

    corpus = make_corpus(tmp_path / "c")
    for i, image in enumerate(sorted((tmp_path / "c" / "img").glob("*.png"))):  # textured, so that crops differ
        _make(image, 40 + i % 7, 36, "RGB-png", i)
    common = ["--backbone", str(tiny_config), "--pretrained", "none", "--quiet", "--batch-size", "8",
              "--warmup-steps", "0", "--lr", "1e-3", "--schedule", "constant", "--middle-dim", "16", "--dropout", "0"]
    runner = CliRunner()

    def train(out, *extra):
        res = runner.invoke(cli, ["train", "--method", "pic2word", "--corpus", str(corpus), "--output",
                                  str(tmp_path / out), *common, *extra])
        assert res.exit_code == 0, res.output
        return load_file(str(tmp_path / out / "model.safetensors"))

    from safetensors.torch import load_file

    straight = train("straight", "--max-steps", "6", "--workers", "0")  # 4 steps an epoch: two epochs
    readers = train("readers", "--max-steps", "6", "--workers", "2")
    train("resumed", "--max-steps", "3", "--workers", "0")
    resumed = train("resumed", "--max-steps", "6", "--workers", "2")
    plain = train("plain", "--max-steps", "6", "--workers", "0", "--augment", "none")
    for other in (readers, resumed):
        assert all(torch.allclose(straight[k], other[k], atol=1e-6) for k in straight)
    assert not all(torch.allclose(straight[k], plain[k], atol=1e-6) for k in straight)
    config = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert config["train_preprocess"]["kind"] == "random-resized-crop" and config["train_preprocess"]["scale"] == [
        0.9, 1.0]
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["train_preprocess"]["kind"] == "clip"


@needs_annotations
@pytest.mark.parametrize("name", ["cirr", "fashioniq"])
def test_pic2word_prompts_tokenize_as_the_official_strings(name):
    """Pic2Word's data.py: CIRR "a photo of * , {caption}", FashionIQ "a photo of * , {cap2} and {cap1}" (the
    second caption first); on every val query of the real annotation files, read through the dataset plugin, the
    prompts give the official tokens."""
    import open_clip

    from cirbench.methods.pic2word.model import prompt
    from cirbench.plugins import get_registry

    spec = get_registry().dataset(name)
    data = spec.create(ANNOTATIONS / name, {o.name: o.default for o in spec.options})
    queries = [q for set_ in data.load("val") for q in set_.queries]
    raw = {"cirr": lambda r: [r["caption"]], "fashioniq": lambda r: r["captions"]}[name]
    files = sorted((ANNOTATIONS / name / "captions").glob("cap.*val.json"))
    official = {}
    for f in files:
        for r in json.loads(f.read_text()):
            caps = raw(r)  # official: 'a photo of * , {}'.format(cap), '... , {} and {}'.format(cap2, cap1)
            official[tuple(caps)] = f"a photo of * , {caps[0]}" if len(caps) == 1 else \
                f"a photo of * , {caps[1]} and {caps[0]}"
    assert len(queries) == {"cirr": 4181, "fashioniq": 6016}[name]
    ours = [prompt(q, name) for q in queries]
    theirs = [official[tuple(q.texts)] for q in queries]
    assert torch.equal(open_clip.tokenize(ours), open_clip.tokenize(theirs))


# -- SEARLE ---------------------------------------------------------------------------------------------
def test_searle_official_weights_file_and_fashioniq_averaging(tmp_path, backbone):
    from cirbench.methods._shared.textinv import Phi
    from cirbench.methods.searle.model import Searle

    phi = Phi(32, 128, 32)
    official = tmp_path / "SEARLE_tiny.pt"
    torch.save({"Phi": phi.state_dict()}, official)
    method = Searle(backbone, {"checkpoint": official}, "fashioniq")
    refs = torch.randn(1, 32)
    two = method.compose(refs, [Query("0", "r", ("is red.", "has short sleeves"))])
    fwd = method.compose(refs, [Query("0", "r", ("is red and has short sleeves",))])
    rev = method.compose(refs, [Query("0", "r", ("has short sleeves and is red",))])
    assert torch.allclose(two, torch.nn.functional.normalize(fwd + rev, dim=-1), atol=1e-5)


@needs_annotations
def test_searle_fashioniq_prompts_are_the_official_strings():
    """SEARLE's validate.py: each caption stripped of '.?, ' at both ends, joined forward and reversed, each in
    "a photo of $ that {}"; on every real FashionIQ val query the prompts give the official tokens (the strings
    differ only in whitespace, which CLIP's tokenizer collapses, where a caption is empty)."""
    import open_clip

    from cirbench.method import caption_variants
    from cirbench.methods._shared.textinv import searle_prompt

    def official(c1, c2):  # transcribed from SEARLE src/validate.py
        return [f"a photo of $ that {c1.strip('.?, ')} and {c2.strip('.?, ')}",
                f"a photo of $ that {c2.strip('.?, ')} and {c1.strip('.?, ')}"]

    records = fashioniq_val_records()
    ours = [searle_prompt(v) for r in records for v in caption_variants(tuple(r["captions"]))]
    theirs = [s for r in records for s in official(*r["captions"])]
    assert torch.equal(open_clip.tokenize(ours), open_clip.tokenize(theirs))


def test_searle_without_weights_offline_is_a_clear_error(backbone, monkeypatch, tmp_path):
    from cirbench.methods.searle import model

    with pytest.raises(CheckpointError, match="ViT-B-32 and ViT-L-14"):
        model.Searle(backbone, {"checkpoint": None}, "cirr")  # no official weights for this backbone at all
    # an OpenAI ViT-B-32 whose official weights are not cached, with no network: the offline branch
    official = types.SimpleNamespace(model_name="ViT-B-32", pretrained="openai")
    from cirbench import hub

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    calls = []

    def offline(*args, **kwargs):
        calls.append(args)
        raise OSError("network unreachable")

    monkeypatch.setattr(hub.socket, "create_connection", offline)
    hub.host_reachable.cache_clear()
    monkeypatch.setattr(hub, "host_reachable", functools.cache(hub.host_reachable.__wrapped__))
    with pytest.raises(CirbenchError, match="no network.*--checkpoint"):
        model.official_weights(official)
    assert calls and calls[0][0] == ("github.com", 443)
    cached = tmp_path / "hub" / "checkpoints" / "SEARLE_ViT-B32.pt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert model.official_weights(official) == cached  # a cached file needs no network


# -- FTI4CIR ----------------------------------------------------------------------------------------------
@needs_annotations
def test_fti4cir_fashioniq_captions_are_the_official_strings():
    """FTI4CIR's evaluate.py joins the two captions forward (the first through ``str.capitalize``) and reversed;
    on the real FashionIQ captions (136 of them hold capitals past their first letter) the strings are equal."""
    from cirbench.methods.fti4cir.model import caption_variants_fti4cir

    def official(c1, c2):  # transcribed from FTI4CIR src/evaluate.py
        return [f"{c1.strip('.?, ').capitalize()} and {c2.strip('.?, ')}",
                f"{c2.strip('.?, ')} and {c1.strip('.?, ')}"]

    records = fashioniq_val_records()
    for r in records:
        assert caption_variants_fti4cir(tuple(r["captions"])) == official(*r["captions"]), r["captions"]


@needs_annotations
def test_fti4cir_prompts_tokenize_as_the_official_strings():
    """FTI4CIR's i2t_model.py composes f"a photo of * with {'* ' * n}but " + caption (n attribute words); on every
    real CIRR val caption, with 0 to 12 attribute words, the prompts give the official tokens."""
    import open_clip

    from cirbench.methods.fti4cir.model import inference_prompt

    captions = [r["caption"] for r in json.loads((ANNOTATIONS / "cirr" / "captions" / "cap.rc2.val.json").read_text())]
    counts = [i % 13 for i in range(len(captions))]
    ours = [inference_prompt(n, c) for n, c in zip(counts, captions, strict=True)]
    theirs = [f"a photo of * with {'* ' * n}but " + c for n, c in zip(counts, captions, strict=True)]
    assert torch.equal(open_clip.tokenize(ours), open_clip.tokenize(theirs))


def test_fti4cir_forward_shapes_and_token_bounds(backbone):
    from cirbench.methods.fti4cir.model import build_net, pseudo_words

    net = build_net(backbone, {"num_queries": 24, "max_attributes": 12, "threshold": 0.05, "layers": 3}).eval()
    pixels = torch.randn(5, 3, 32, 32)
    subject, attrs, counts, global_feat, selected = pseudo_words(net, backbone, pixels)
    # the official module keeps the 12 highest-weighted of the 24 queries (the orthogonality loss sees these)
    assert subject.shape == (5, 32) and attrs.shape == (5, 12, 32) and selected.shape == (5, 12, 32)
    assert all(1 <= r <= 12 for r in counts)
    net.threshold = 0.0  # everything passes: capped at 12
    assert pseudo_words(net, backbone, pixels)[2] == [12] * 5
    net.threshold = 1.0  # nothing passes: at least 1
    assert pseudo_words(net, backbone, pixels)[2] == [1] * 5


def test_fti4cir_words_that_do_not_fit_the_text_context_are_one_line_errors(tmp_path):
    """A short text context (here 24 tokens) cannot hold 'a photo of * with' and 32 attribute words: refused when the
    network is built, with the largest count that fits; a prompt cut short later says so instead of a ValueError."""
    import json

    from cirbench.methods.fti4cir.model import build_net
    from cirbench.testing import TINY_CLIP

    short = {**TINY_CLIP, "text_cfg": {**TINY_CLIP["text_cfg"], "context_length": 24}}
    (tmp_path / "cirbench-tiny-short.json").write_text(json.dumps(short))
    backbone = load_backbone(str(tmp_path / "cirbench-tiny-short.json"), "none", device="cpu", seed=0)
    with pytest.raises(CirbenchError, match=r"--max-attributes 32: .* keeps 18 of its 33 .* --max-attributes 17 or"):
        build_net(backbone, {"max_attributes": 32})
    assert build_net(backbone, {"max_attributes": 17}).max_attributes == 17
    with pytest.raises(CirbenchError, match=r"keeps 1 of its 2 pseudo-words .* text context of 24 tokens"):
        encode_with_pseudo_tokens(backbone, ["word " * 21 + "* *"], [torch.zeros(2, 32)])


def _official_selection(latent_local_feats, img_global_feat, topk, epsilon):
    """Transcription of FTI4CIR's ``IMG2TEXT.get_img_local_attr_feats`` (i2t_model.py) after the transformer."""
    attention_weights = torch.matmul(latent_local_feats, img_global_feat.unsqueeze(dim=2)).squeeze(dim=2)
    attention_weights = torch.nn.functional.softmax(attention_weights, dim=1)
    local_attr_num = []
    sorted_indices = torch.argsort(attention_weights, dim=1, descending=True)
    sorted_indices = sorted_indices[:, :topk]
    selected_local_feats = []
    for i in range(latent_local_feats.shape[0]):
        mask = attention_weights[i] > epsilon
        non_indices = torch.nonzero(mask).squeeze()
        num_r = non_indices.numel() if non_indices.numel() < topk else topk
        if num_r < 1:
            num_r = 1
        select_indices = sorted_indices[i][:num_r]
        select_indices = torch.sort(select_indices, dim=0).values
        select_id = torch.cat((select_indices, sorted_indices[i][num_r:]), dim=0)
        local_attr_num.append(num_r)
        selected_local_feats.append(latent_local_feats[i, select_id, :])
    return torch.nn.functional.normalize(torch.stack(selected_local_feats, dim=0), dim=-1), local_attr_num


@pytest.mark.parametrize("scale", [0.1, 3.0, 30.0])
def test_fti4cir_selection_equals_the_official_code(backbone, scale):
    from cirbench.methods.fti4cir.model import build_net

    net = build_net(backbone, {"num_queries": 24, "max_attributes": 12, "threshold": 0.05, "layers": 1})
    gen = torch.Generator().manual_seed(int(scale * 10))
    local = torch.rand(6, 24, 32, generator=gen)
    global_feat = torch.randn(6, 32, generator=gen) * scale  # small scale: many kept; large: few
    ours, counts = net.select(local, global_feat)
    official, official_counts = _official_selection(local, global_feat, 12, 0.05)
    assert counts == official_counts and torch.equal(ours, official)


def _official_latent_local_features(sd, patches, num_k, layers, heads=1):
    """IMG2TEXT.get_latent_local_attributes_feats over MHTransformer.Transformer (FTI4CIR src/), transcribed as
    functions of the state dict: pre-LN layers, attention without q/kv biases scaled by head_dim ** -0.5, ReLU
    MLP, then Linear + Sigmoid on the first num_k outputs."""
    F = torch.nn.functional

    def ln(x, p):
        return F.layer_norm(x, (x.shape[-1],), sd[p + ".weight"], sd[p + ".bias"])

    def attn(x, p):
        b, n, c = x.shape
        queries = F.linear(x, sd[p + ".to_queries.weight"]).reshape(b, n, heads, c // heads)
        keys_values = F.linear(x, sd[p + ".to_keys_values.weight"]).reshape(b, n, 2, heads, c // heads)
        keys, values = keys_values[:, :, 0], keys_values[:, :, 1]
        attention = torch.einsum("bnhd,bmhd->bnmh", queries, keys) * (c // heads) ** -0.5
        attention = attention.softmax(dim=2)
        out = torch.einsum("bnmh,bmhd->bnhd", attention, values).reshape(b, n, c)
        return F.linear(out, sd[p + ".project.weight"], sd[p + ".project.bias"])

    def mlp(x, p):
        hidden = F.relu(F.linear(x, sd[p + ".fc1.weight"], sd[p + ".fc1.bias"]))
        return F.linear(hidden, sd[p + ".fc2.weight"], sd[p + ".fc2.bias"])

    x = torch.cat([sd["templates"].expand(patches.shape[0], num_k, patches.shape[2]), patches], dim=1)
    for i in range(layers):
        x = x + attn(ln(x, f"transformer.layers.{i}.norm1"), f"transformer.layers.{i}.attn")
        x = x + mlp(ln(x, f"transformer.layers.{i}.norm2"), f"transformer.layers.{i}.mlp")
    return torch.sigmoid(F.linear(x[:, :num_k], sd["local_atte_fc.0.weight"], sd["local_atte_fc.0.bias"]))


def test_fti4cir_local_features_equal_the_official_transformer(backbone):
    """The attribute queries through the 3-layer transformer and the sigmoid projection, as the official module
    computes them from the same weights (the names are the official ones: its checkpoint loads by name)."""
    from cirbench.methods.fti4cir.model import build_net

    net = build_net(backbone, {"num_queries": 24, "max_attributes": 12, "threshold": 0.05, "layers": 3}).eval()
    width = net.templates.shape[-1]
    patches = torch.randn(3, 17, width, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(net.local_features(patches),
                                   _official_latent_local_features(net.state_dict(), patches, 24, 3))


def test_optimizers_follow_the_official_settings(backbone, tmp_path):
    from cirbench.methods.fti4cir.model import FTI4CIRTrainable
    from cirbench.methods.pic2word.model import Pic2WordTrainable
    from cirbench.training import TrainConfig, build_optimizer

    cfg = TrainConfig(output=tmp_path, weight_decay=0.1)
    p2w = build_optimizer(Pic2WordTrainable(backbone, {"middle_dim": 16, "dropout": 0.1}), cfg)
    assert p2w.defaults["betas"] == (0.9, 0.98) and p2w.defaults["eps"] == 1e-6
    decayed, plain = p2w.param_groups
    assert all(p.ndim == 2 for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])  # biases
    assert plain["weight_decay"] == 0.0
    fti = FTI4CIRTrainable(backbone, {"num_queries": 4, "max_attributes": 2, "threshold": 0.05, "layers": 1})
    opt = build_optimizer(fti, cfg)
    assert sum(p.numel() for p in opt.param_groups[0]["params"]) == sum(p.numel() for p in fti.net.parameters())
    assert opt.param_groups[1]["params"] == [] and opt.defaults["betas"] == (0.9, 0.999)
    assert FTI4CIRTrainable.defaults["epochs"] == 80


def _official_module(net):
    """Rebuild the official FTI4CIR module layout (classes from modules named like the official ones)."""
    i2t = types.ModuleType("i2t_model")
    mht = types.ModuleType("MHTransformer")
    sys.modules["i2t_model"], sys.modules["MHTransformer"] = i2t, mht

    class Transformer(torch.nn.Module):
        pass

    class IMG2TEXT(torch.nn.Module):
        pass

    Transformer.__module__, IMG2TEXT.__module__ = "MHTransformer", "i2t_model"
    Transformer.__qualname__, IMG2TEXT.__qualname__ = "Transformer", "IMG2TEXT"
    mht.Transformer, i2t.IMG2TEXT = Transformer, IMG2TEXT
    module = IMG2TEXT()
    module.templates = net.templates
    module.transformer = Transformer()
    module.transformer.layers = net.transformer.layers
    module.local_atte_fc, module.phi_s, module.phi_a = net.local_atte_fc, net.phi_s, net.phi_a
    module.criterion_target = torch.as_tensor([1])
    return module


def test_fti4cir_official_pickled_module_loads_without_its_code(tmp_path, backbone):
    from cirbench.methods.fti4cir.model import FTI4CIR, build_net

    net = build_net(backbone, {"layers": 2})
    official = tmp_path / "fti4cir_official.pt"
    torch.save(_official_module(net), official)
    del sys.modules["i2t_model"], sys.modules["MHTransformer"]  # the official code is not importable
    save_checkpoint(tmp_path / "ours", net.state_dict(), {"method": "fti4cir", "backbone": backbone.identity(),
                                                         "options": {"layers": 2}})
    a = FTI4CIR(backbone, {"checkpoint": tmp_path / "ours"}, "circo")
    b = FTI4CIR(backbone, {"checkpoint": official}, "circo")
    pixels = torch.randn(3, 3, 32, 32)
    ra, rb = a.encode_references(pixels), b.encode_references(pixels)
    assert torch.allclose(ra, rb, atol=1e-6)
    queries = [Query(str(i), "r", ("make it red",)) for i in range(3)]
    assert torch.allclose(a.compose(ra, queries), b.compose(rb, queries), atol=1e-6)


class _Malicious:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['CIRBENCH_SENTINEL']}",))


def test_malicious_pickle_is_refused_without_running(tmp_path, monkeypatch):
    sentinel = tmp_path / "pwned"
    monkeypatch.setenv("CIRBENCH_SENTINEL", str(sentinel))
    bad = tmp_path / "evil.pt"
    torch.save({"weights": torch.zeros(2), "payload": _Malicious()}, bad)
    with zipfile.ZipFile(bad) as zf:  # the file really holds a call of os.system (so the test can fail)
        data = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(data)]
    assert ("GLOBAL", f"{os.system.__module__} system") in ops and any(name == "REDUCE" for name, _ in ops)
    with pytest.raises(CheckpointError, match="refusing to unpickle.*system"):
        load_pickled_module_tensors(bad)
    assert not sentinel.exists()


def test_fti4cir_training_step_is_the_official_loss(tiny_config):
    """FTI4CIR's i2t_model.py getLoss, transcribed over cirbench's pseudo words (their selection is checked against
    the official code above, the token replacement in test_searle_oti): the contrastive loss between the global
    image feature and the pseudo sentence, the orthogonality of the kept local features, and reg_weight times the
    three cosine regularisers against the real caption "a photo of {subject} with {attribute}"."""
    from test_searle_train import official_contrastive_loss

    from cirbench.corpora import Batch
    from cirbench.methods.fti4cir.model import FTI4CIRTrainable, pseudo_words

    bb = load_backbone(str(tiny_config), "none", device="cpu", seed=0, training=True)
    trainable = FTI4CIRTrainable(bb, {"num_queries": 24, "max_attributes": 12, "threshold": 0.05, "layers": 1,
                                      "temperature": 0.2, "reg_weight": 1.4})
    size = bb.preprocessor("targetpad").size
    pixels = torch.randn(6, 3, size, size, generator=torch.Generator().manual_seed(1))
    subjects = ["a dog", "two cups", "a red car", "a cat", "the sky", "a man"]
    attributes = ["on a couch", "of tea", "in the rain", "asleep", "at dusk", "with a hat"]
    batch = Batch(pixels, [f"{s} {a}" for s, a in zip(subjects, attributes, strict=True)],
                  extra={"subject": subjects, "attribute": attributes})
    torch.manual_seed(5)
    loss, _ = trainable.training_step(batch)

    def cosine_loss(x, y):  # nn.CosineEmbeddingLoss with target 1
        return torch.nn.CosineEmbeddingLoss()(y, x, torch.ones(len(x)))

    torch.manual_seed(5)
    subject, attrs, counts, global_feat, selected = pseudo_words(trainable.net, bb, pixels)
    words = [torch.cat([subject[i : i + 1], attrs[i, :r]]) for i, r in enumerate(counts)]
    pseudo_word_based_feat = encode_with_pseudo_tokens(bb, [f"a photo of * with {'* ' * r}" for r in counts], words,
                                                       "*", normalize=False)
    img_text_loss = official_contrastive_loss(global_feat, pseudo_word_based_feat, 0.2)
    feats = torch.nn.functional.normalize(selected, p=2, dim=-1)
    cosine_score = feats @ feats.permute(0, 2, 1)
    ortho_loss = torch.nn.MSELoss()(cosine_score, torch.eye(feats.shape[1]).unsqueeze(0).repeat(len(feats), 1, 1))
    with torch.no_grad():
        t_both_feat = bb.model.encode_text(bb.tokenize([f"a photo of {s} with {a}" for s, a in zip(
            subjects, attributes, strict=True)]))
    t_subject_feat = encode_with_pseudo_tokens(bb, [f"a photo of * with {a}" for a in attributes], subject, "*",
                                               normalize=False)
    t_attribute_feat = encode_with_pseudo_tokens(
        bb, [f"a photo of {s} with {'* ' * r}" for s, r in zip(subjects, counts, strict=True)],
        [attrs[i, :r] for i, r in enumerate(counts)], "*", normalize=False)
    reg_loss = (cosine_loss(t_subject_feat, t_both_feat) + cosine_loss(t_attribute_feat, t_both_feat)
                + cosine_loss(pseudo_word_based_feat, t_both_feat))
    torch.testing.assert_close(loss, img_text_loss + ortho_loss + 1.4 * reg_loss, rtol=1e-5, atol=1e-5)


def test_fti4cir_trains_and_loss_goes_down(tmp_path, tiny_config):
    from test_training import make_corpus

    from cirbench.methods.fti4cir.model import FTI4CIRTrainable, split_subject_attribute
    from cirbench.training import TrainConfig, train

    assert split_subject_attribute("a dog sitting on a red couch") == ("a dog", "sitting on a red couch")
    corpus = make_corpus(tmp_path / "c")
    bb = load_backbone(str(tiny_config), "none", device="cpu")
    trainable = FTI4CIRTrainable(bb, {"num_queries": 24, "max_attributes": 12, "threshold": 0.05, "layers": 1,
                                      "temperature": 0.2, "reg_weight": 1.4})
    losses = []
    step = trainable.training_step
    trainable.training_step = lambda b: (lambda out: (losses.append(float(out[0].detach())), out)[1])(step(b))
    train(trainable, corpus, TrainConfig(output=tmp_path / "o", max_steps=10, batch_size=16, lr=1e-3,
                                         schedule="constant", workers=0, progress=False))
    assert sum(losses[-3:]) < sum(losses[:3])
    assert (tmp_path / "o" / "model.safetensors").exists()
    assert not bb._text_memo  # the corpus's phrases are not kept on the device for the run
