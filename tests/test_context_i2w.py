"""Context-I2W: the port against a transcription of the official code, checkpoints, training, errors."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from helpers import official_vit_tokens, registered
from toy_plugin import ToyPlugin

from cirbench.backbones import load_backbone
from cirbench.checkpoints import save_checkpoint
from cirbench.cli import cli
from cirbench.errors import CheckpointError, CirbenchError
from cirbench.types import Query

REPLACE_ID = 49405  # the official tokenizer's <|replace|> (vocab_size - 3), the BPE merge "jekyll</w>" in CLIP's


@pytest.fixture(scope="module")
def backbone(tiny_config):
    return load_backbone(str(tiny_config), "none", device="cpu", seed=0)


def random_official_state(backbone, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict in the official IM2TEXT_OWM_Attn's names, random values (the gate non-zero, so the local branch
    counts)."""
    from cirbench.methods.context_i2w.model import build_net

    gen = torch.Generator().manual_seed(seed)
    own = build_net(backbone, {}).state_dict()
    state = {k: torch.randn(v.shape, generator=gen) * (0.5 if v.ndim > 1 else 1.0) for k, v in own.items()}
    state["local_gate"] = torch.tensor([0.7])
    return state


# -- the official code, transcribed (model/model.py, src/eval_utils.py) over the open_clip model's weights ------
def official_encode_text(model, text):
    x = model.token_embedding(text) + model.positional_embedding
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    collect_ind = (text == text.max()).nonzero()[:, 1]  # end_id: the highest id in each sequence
    return x[torch.arange(x.size(0)), collect_ind] @ model.text_projection


def official_encode_text_img_retrieval(model, text, img_tokens, split_ind):
    """repeat=False: the position of the first row's <|replace|> takes each row's token."""
    b_size = img_tokens.shape[0]
    x = model.token_embedding(text)
    collect_ind = (text == text.max()).nonzero()[:, 1]
    ind_insert = (text[0] == split_ind).nonzero()[0]
    x = torch.cat([x[:, :ind_insert], img_tokens.view(b_size, 1, -1), x[:, ind_insert + 1:]], dim=1)
    x = x + model.positional_embedding
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    return x[torch.arange(x.size(0)), collect_ind] @ model.text_projection


def official_im2text_owm_attn(w, c, x, heads=8):
    """IM2TEXT_OWM_Attn.forward (eval: dropout off), from its state dict ``w``."""
    def ln(t, name):
        return F.layer_norm(t.float(), t.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"])

    def mlp(t, prefix, out):
        for i in range(2):
            t = F.relu(F.linear(t, w[f"{prefix}.{i}.0.weight"], w[f"{prefix}.{i}.0.bias"]))
        return F.linear(t, w[f"{out}.weight"], w[f"{out}.bias"])

    c = (c @ w["to_c.weight"].T).unsqueeze(1)
    x = x @ torch._weight_norm(w["W_R.weight_v"], w["W_R.weight_g"], 0).T  # torch.nn.utils.weight_norm(dim=0)
    x = torch.mul(x, c)
    # VisualTargetExtractor(x[:, 1:, :].unsqueeze(1)): shapes (b, T=1, n, D)
    media = x[:, 1:, :].unsqueeze(1)
    b, T = media.shape[:2]
    latents = w["VT_Extractor.latents"].unsqueeze(0).unsqueeze(0).expand(b, T, -1, -1)
    depth = len({k.split(".")[2] for k in w if k.startswith("VT_Extractor.layers.")})
    for i in range(depth):
        p = f"VT_Extractor.layers.{i}"
        xm, lat = ln(media, f"{p}.0.norm_media"), ln(latents, f"{p}.0.norm_latents")
        q = lat @ w[f"{p}.0.to_q.weight"].T
        k, v = (torch.cat((xm, lat), dim=-2) @ w[f"{p}.0.to_kv.weight"].T).chunk(2, dim=-1)
        q, k, v = (t.reshape(b, T, t.shape[2], heads, -1).permute(0, 3, 1, 2, 4) for t in (q, k, v))  # b h t n d
        q = q * (q.shape[-1] ** -0.5)
        sim = torch.einsum("... i d, ... j d  -> ... i j", q, k)
        sim = sim - sim.amax(dim=-1, keepdim=True).detach()
        out = torch.einsum("... i j, ... j d -> ... i d", sim.softmax(dim=-1), v)
        out = out.permute(0, 2, 3, 1, 4).reshape(b, T, out.shape[3], -1) @ w[f"{p}.0.to_out.weight"].T
        latents = out + latents
        ff = ln(latents, f"{p}.1.0") @ w[f"{p}.1.1.weight"].T
        latents = F.gelu(ff) @ w[f"{p}.1.3.weight"].T + latents
    x_local = ln(latents, "VT_Extractor.norm")
    x_local = torch.nn.AvgPool2d(kernel_size=(4, 1))(x_local).squeeze(1).squeeze(1)
    x_global = mlp(ln(x[:, 0, :], "ln_post") @ w["proj"], "layers", "fc_out")
    x_local = mlp(ln(x_local, "ln_post_local") @ w["proj_local"], "layers_local", "fc_out_local")
    return x_global + (x_local * w["local_gate"].tanh())


def official_tokens(backbone, texts):
    """The official tokenizer's ids for texts holding <|replace|>: CLIP's, with 49405 there (see the module doc)."""
    return backbone.tokenizer([t.replace("<|replace|>", "jekyll") for t in texts])


def test_compose_is_the_official_evaluation(tmp_path, backbone):
    """evaluate_cirr / evaluate_fashion, transcribed: c = encode_text(text_with_blank); token =
    img2text(c, encode_image_tokens(ref)); composed = encode_text_img_retrieval(text_with_blank, token), normalised.
    The port, loading the official checkpoint layout, computes the same features on CIRR- and FashionIQ-shaped
    queries and on a benchmark's own prompt (ImageNet-R's "a {domain} of *")."""
    from cirbench.methods._shared.textinv import vision_tokens
    from cirbench.methods.context_i2w.model import ContextI2W

    state = random_official_state(backbone)
    official = tmp_path / "context-i2w.pt"
    torch.save({"state_dict_img2text": {f"module.{k}": v for k, v in state.items()}, "epoch": 1,
                "state_dict": {}}, official)
    method = ContextI2W(backbone, {"checkpoint": official}, "cirr")
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randn(3, 3, 32, 32, generator=gen)
    refs = vision_tokens(backbone, pixels)[1]
    model = backbone.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(refs, official_vit_tokens(model, pixels))
    cases = [
        ([Query("0", "r", ("has two dogs on the grass",)), Query("1", "r", ("is at night",)),
          Query("2", "r", ("shows the same cat, sleeping",))],
         ["a photo of <|replace|> , has two dogs on the grass", "a photo of <|replace|> , is at night",
          "a photo of <|replace|> , shows the same cat, sleeping"]),
        ([Query("0", "r", ("is longer", "has stripes")), Query("1", "r", ("is red", "no sleeves")),
          Query("2", "r", ("darker", "more casual"))],
         ["a photo of <|replace|> , has stripes and is longer", "a photo of <|replace|> , no sleeves and is red",
          "a photo of <|replace|> , more casual and darker"]),
        ([Query(str(i), "r", ("a sketch of ",), prompt="a sketch of *") for i in range(3)],
         ["a sketch of <|replace|>"] * 3),
    ]
    for queries, texts in cases:
        ours = method.compose(refs, queries)
        text = official_tokens(backbone, texts)
        assert (text == REPLACE_ID).sum(dim=1).tolist() == [1, 1, 1]
        with torch.no_grad():
            c = official_encode_text(model, text)
            token = official_im2text_owm_attn(state, c, refs)
            expected = official_encode_text_img_retrieval(model, text, token, REPLACE_ID)
        torch.testing.assert_close(ours, F.normalize(expected, dim=-1), atol=2e-5, rtol=1e-4)
    # the local branch and the context both count: another caption or a closed gate changes the query
    other = method.compose(refs, [Query("0", "r", ("is at night",))] * 3)
    assert not torch.allclose(other[0], method.compose(refs[:1], cases[0][0][:1])[0], atol=1e-4)
    assert torch.allclose(other[1], method.compose(refs[1:2], cases[0][0][1:2])[0], atol=1e-5)


def test_cirbench_and_official_checkpoints_agree_and_wrong_ones_say_why(tmp_path, backbone):
    from cirbench.methods.context_i2w.model import ContextI2W, build_net

    state = random_official_state(backbone, seed=3)
    official = tmp_path / "official.pt"
    torch.save({"state_dict_img2text": {f"module.{k}": v for k, v in state.items()}}, official)
    net = build_net(backbone, {})
    net.load_state_dict(state)
    save_checkpoint(tmp_path / "ours", net.state_dict(), {"method": "context-i2w", "backbone": backbone.identity(),
                                                         "options": {"middle_dim": 512}})
    refs = torch.randn(2, 17, 32)
    queries = [Query("0", "r", ("make it red",)), Query("1", "r", ("is longer", "has stripes"))]
    a = ContextI2W(backbone, {"checkpoint": official}, "cirr").compose(refs, queries)
    b = ContextI2W(backbone, {"checkpoint": tmp_path / "ours"}, "cirr").compose(refs, queries)
    assert a.shape == (2, 32) and torch.allclose(a, b, atol=1e-6)
    # weight-normalised W_R saved through torch.nn.utils.parametrizations loads as the same module
    renamed = {("W_R.parametrizations.weight.original0" if k == "W_R.weight_g" else
                "W_R.parametrizations.weight.original1" if k == "W_R.weight_v" else k): v for k, v in state.items()}
    torch.save({"state_dict_img2text": renamed}, tmp_path / "param.pt")
    c = ContextI2W(backbone, {"checkpoint": tmp_path / "param.pt"}, "cirr").compose(refs, queries)
    assert torch.allclose(a, c, atol=1e-6)
    # a Pic2Word checkpoint (no context) says so; a network of another width names the mismatch
    torch.save({"state_dict_img2text": {"layers.0.0.weight": torch.zeros(512, 32)}}, tmp_path / "p2w.pt")
    with pytest.raises(CheckpointError, match="Pic2Word checkpoint.*--method pic2word"):
        ContextI2W(backbone, {"checkpoint": tmp_path / "p2w.pt"}, "cirr")
    state["to_c.weight"] = torch.zeros(32, 99)
    torch.save({"state_dict_img2text": state}, tmp_path / "wide.pt")
    with pytest.raises(CheckpointError, match="to_c.weight"):
        ContextI2W(backbone, {"checkpoint": tmp_path / "wide.pt"}, "cirr")


def test_run_through_the_cli_and_a_wrong_checkpoint_is_one_line(tmp_path, backbone, tiny_config, toy_root):
    state = random_official_state(backbone)
    official = tmp_path / "context-i2w.pt"
    torch.save({"state_dict_img2text": state}, official)
    common = ["--dataset", "toy", "--data-root", str(toy_root), "--backbone", str(tiny_config), "--pretrained", "none",
              "--no-cache", "--quiet", "--output", str(tmp_path / "res")]
    with registered(ToyPlugin(), "toy"):
        res = CliRunner().invoke(cli, ["run", "--method", "context-i2w", "--checkpoint", str(official), *common])
        assert res.exit_code == 0, res.output
        (result,) = (tmp_path / "res").rglob("context-i2w*.json")
        record = json.loads(result.read_text())
        assert record["method"]["name"] == "context-i2w", record["method"]
        assert record["method"]["info"]["architecture"]["depth"] == 6
        bad = tmp_path / "bad.pt"
        bad.write_bytes(b"not a checkpoint")
        res = CliRunner().invoke(cli, ["run", "--method", "context-i2w", "--checkpoint", str(bad), *common])
        assert res.exit_code == 2 and "Traceback" not in res.output
        assert len(res.output.strip().splitlines()) == 1, res.output
        res = CliRunner().invoke(cli, ["run", "--method", "context-i2w", *common])
        assert res.exit_code == 2 and "needs --checkpoint" in res.output


def _masked_corpus(root, masked: bool):
    from test_training import make_corpus

    corpus = make_corpus(root)
    rows = list(csv.DictReader(open(corpus, newline="")))
    with open(corpus, "w", newline="") as fh:
        fields = ["image", "caption"] + (["masked_caption"] if masked else [])
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            row = {"image": r["image"], "caption": r["caption"]}
            if masked:
                row["masked_caption"] = r["caption"].replace("square", "<|replace|>")
            writer.writerow(row)
    return corpus


def test_training_step_is_the_official_loss(tmp_path, backbone):
    """get_loss_img2text_replace_token, transcribed: c = encode_text(replaced caption); token = img2text(c, image
    tokens); text = encode_text_img("a photo of", token) (the token before the end); CLIP's symmetric loss at its
    logit scale."""
    from cirbench.corpora import Batch
    from cirbench.methods.context_i2w.model import ContextI2WTrainable, masked_prompt

    assert masked_prompt("a red square", "a red <|replace|>") == "a red *"
    assert masked_prompt("a red square", "a red * on a table") == "a red * on a table"
    with pytest.raises(CirbenchError, match=r"'a red \[MASK\]' marks no subject"):
        masked_prompt("a red square", "a red [MASK]")
    trainable = ContextI2WTrainable(backbone, {"dropout": 0.0})
    state = random_official_state(backbone, seed=5)
    trainable.net.load_state_dict(state)
    gen = torch.Generator().manual_seed(2)
    pixels = torch.randn(4, 3, 32, 32, generator=gen)
    captions = ["a red square", "a blue circle on grass", "two dogs", "a green square"]
    replaced = ["a red <|replace|>", "a blue <|replace|> on grass", "two <|replace|>", "a green <|replace|>"]
    batch = Batch(pixels, captions, {"masked_caption": replaced}, 0, [], [str(i) for i in range(4)])
    loss, _ = trainable.training_step(batch)
    model = backbone.model.eval()
    with torch.no_grad():
        image = model.encode_image(pixels)
        tokens = official_vit_tokens(model, pixels)
        c = official_encode_text(model, official_tokens(backbone, replaced))
        token = official_im2text_owm_attn(state, c, tokens)
        text = backbone.tokenizer(["a photo of"] * 4)  # encode_text_img: the token goes where the end token was
        end = (text == text.max()).nonzero()[:, 1]
        x = model.token_embedding(text)
        x = torch.cat([x[:, : end[0]], token.view(4, 1, -1), x[:, end[0]:-1]], dim=1) + model.positional_embedding
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
        text_features = x[torch.arange(4), end + 1] @ model.text_projection
        i, t = F.normalize(image, dim=-1), F.normalize(text_features, dim=-1)
        scale = model.logit_scale.exp()
        truth = torch.arange(4)
        expected = (F.cross_entropy(scale * i @ t.T, truth) + F.cross_entropy(scale * t @ i.T, truth)) / 2
    torch.testing.assert_close(loss.detach(), expected, atol=1e-4, rtol=1e-4)
    loss.backward()
    assert trainable.net.local_gate.grad is not None and trainable.net.to_c.weight.grad.abs().sum() > 0
    # a caption whose mask lies beyond the 77-token context: the official tokenizer cuts <|replace|> off with the
    # rest, and c is the cut caption's feature; the step goes on
    long = "a very long caption that goes on " * 12 + "about a <|replace|>"
    batch = Batch(pixels[:2], ["x", "a red square"], {"masked_caption": [long, "a red <|replace|>"]}, 0, [],
                  ["0", "1"])
    loss, _ = trainable.training_step(batch)
    assert torch.isfinite(loss)
    from cirbench.methods.context_i2w.model import context_features

    with torch.no_grad():
        ours = context_features(backbone, [masked_prompt("x", long), "a red *"])
        official = official_encode_text(model, official_tokens(backbone, [long, "a red <|replace|>"]))
    torch.testing.assert_close(ours, official, atol=2e-5, rtol=1e-4)


def test_trains_from_the_cli_and_without_masks_says_what_is_missing(tmp_path, tiny_config, toy_root):
    common = ["--backbone", str(tiny_config), "--pretrained", "none", "--workers", "0", "--quiet", "--batch-size", "8",
              "--warmup-steps", "0", "--lr", "1e-3", "--schedule", "constant", "--max-steps", "3"]
    corpus = _masked_corpus(tmp_path / "c", masked=True)
    out = tmp_path / "ci2w"
    res = CliRunner().invoke(cli, ["train", "--method", "context-i2w", "--corpus", str(corpus), "--output", str(out),
                                   *common])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "config.json").read_text())["method"] == "context-i2w"
    with registered(ToyPlugin(), "toy"):
        res = CliRunner().invoke(cli, ["run", "--method", "context-i2w", "--checkpoint", str(out), "--dataset", "toy",
                                       "--data-root", str(toy_root), "--backbone", str(tiny_config), "--pretrained",
                                       "none", "--no-cache", "--quiet", "--output", str(tmp_path / "res")])
    assert res.exit_code == 0, res.output
    from cirbench.methods._shared import captions

    if captions.english_parser() is None:  # without spaCy's English model, unmasked captions are one clear line
        plain = _masked_corpus(tmp_path / "p", masked=False)
        res = CliRunner().invoke(cli, ["train", "--method", "context-i2w", "--corpus", str(plain), "--output",
                                       str(tmp_path / "no"), *common])
        assert res.exit_code == 2, res.output
        assert "masked_caption" in res.output and len(res.output.strip().splitlines()) == 1, res.output


def test_a_tower_without_vision_tokens_is_refused():
    from types import SimpleNamespace

    from cirbench.methods.context_i2w.model import build_net

    resnet = SimpleNamespace(model=SimpleNamespace(visual=SimpleNamespace()), model_name="RN50")
    with pytest.raises(CirbenchError, match="ViT image tower; RN50 has none"):
        build_net(resnet, {})


class _Token:
    def __init__(self, i, text, pos, ws):
        self.i, self.text, self.pos_, self.whitespace_ = i, text, pos, ws
        self.text_with_ws = text + ws


class _Span:
    def __init__(self, tokens):
        self.tokens = tokens
        self.text_with_ws = "".join(t.text_with_ws for t in tokens)
        self.text = self.text_with_ws.strip()


class _Doc(_Span):
    def __iter__(self):
        return iter(self.tokens)

    def __getitem__(self, key):
        return _Span(self.tokens[key])


def _tagger(tags):
    """A stand-in for spaCy's pipeline: whitespace tokens, the part of speech from ``tags`` (else DET)."""
    def nlp(text):
        words = text.split(" ")
        return _Doc([_Token(i, w, tags.get(w, "DET"), " " if i < len(words) - 1 else "")
                     for i, w in enumerate(words)])
    return nlp


def test_the_subject_spacy_finds_is_what_gets_masked(monkeypatch):
    """With an English parser, the caption's first noun is the masked subject (Context-I2W) and ends FTI4CIR's
    subject phrase; the rest of the caption stays as it was."""
    from cirbench.methods._shared import captions
    from cirbench.methods.context_i2w.model import masked_prompt

    monkeypatch.setitem(captions._SPACY, "nlp", _tagger({"dog": "NOUN", "couch": "NOUN", "running": "VERB"}))
    assert captions.mask_subject("a brown dog running on a couch", "*") == "a brown * running on a couch"
    assert captions.split_subject_attribute("a brown dog running on a couch") == ("a brown dog",
                                                                                  "running on a couch")
    assert masked_prompt("a brown dog running on a couch", None) == "a brown * running on a couch"
    with pytest.raises(CirbenchError, match="spaCy finds no noun"):
        masked_prompt("running fast", None)
