"""PLI (masked tuning): the port against a transcription of the official code, checkpoints, training, errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from helpers import registered
from toy_plugin import ToyPlugin

from cirbench import training
from cirbench.backbones import load_backbone
from cirbench.checkpoints import save_checkpoint
from cirbench.cli import cli
from cirbench.corpora import Batch
from cirbench.errors import CheckpointError, CirbenchError
from cirbench.evaluate import RunConfig, evaluate
from cirbench.methods._shared import towers
from cirbench.methods.pli import model as pli
from cirbench.types import Query


# -- the official code, transcribed (open_clip's transformer takes batch-first tokens where OpenAI's took LND) -----
def official_random_masking(x, mask_ratio):
    """ClipImageEncoder.random_masking."""
    N, L, D = x.shape  # noqa: N806 - the official names
    len_keep = int(L * (1 - mask_ratio))
    noise = torch.rand(N, L, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    return torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))


def official_mask_forward(visual, x, mask_ratio):
    """ClipImageEncoder.mask_forword."""
    x = visual.conv1(x)
    x = x.reshape(x.shape[0], x.shape[1], -1)
    x = x.permute(0, 2, 1)
    x = x + visual.positional_embedding[1:, :].unsqueeze(0)
    x = official_random_masking(x, mask_ratio)
    cls_token = visual.class_embedding.to(x.dtype) + visual.positional_embedding[:1, :].unsqueeze(0)
    cls_tokens = cls_token.expand(x.shape[0], -1, -1)
    x = torch.cat((cls_tokens, x), dim=1)
    x = visual.ln_pre(x)
    x = visual.transformer(x) if visual.transformer.batch_first else visual.transformer(x.permute(1, 0, 2)).permute(
        1, 0, 2)
    x = visual.ln_post(x[:, 0, :])
    return x @ visual.proj


def official_loss(model, images, tokens, mask_ratio):
    """Pretrainer.mask_forword with compositor 'None' (Identity) and BatchBasedClassificationLoss (tau 1.0): the
    image and text encoders are CLIP's, unnormalised."""
    ref_img_features = official_mask_forward(model.visual, images, mask_ratio)
    text_features = model.encode_text(tokens)
    tar_features = model.encode_image(images)
    composed_features = ref_img_features + text_features
    pred = composed_features.mm(tar_features.transpose(0, 1)) / 1.0
    return F.cross_entropy(pred, torch.arange(0, images.shape[0]).long())


def caption_post_process(s):
    """data/cirr.py and data/fashionIQ.py (CoSMo's)."""
    return s.strip().replace('.', 'dotmark').replace('?', 'questionmark').replace('&', 'andmark').replace(
        '*', 'starmark')


def official_query(model, image_features, tokens, img_weight):
    """cirr_test_submission.py / pretrainer_evaluator: img_weight * normalize(ref) + normalize(text), normalised."""
    text_features = model.encode_text(tokens).float()
    composed_embeds = img_weight * F.normalize(image_features, dim=-1) + F.normalize(text_features, dim=-1)
    return F.normalize(composed_embeds, dim=-1)


# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture()
def backbone(tiny_config):
    return load_backbone(str(tiny_config), "none", device="cpu", seed=0, training=True)


def _perturbed(model, seed=3):
    """A copy of ``model`` whose every CLIP tensor moved (as tuning moves them)."""
    tuned = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return tuned


def _official_file(path, model, compositor=None):
    """A checkpoint in the official trainer's layout: model_state_dict per model (ClipImageEncoder's visual_encoder
    and unused mask token, ClipTextEncoder's CLIP parts, the compositor), beside the optimizer's state and metrics."""
    image = {"visual_encoder." + k: v for k, v in model.visual.state_dict().items()}
    image["vision_mask_token"] = torch.randn(1, 1, 32)
    text = {k: v for k, v in model.state_dict().items() if k.split(".")[0] in towers.TEXT_PARTS}
    torch.save({"model_state_dict": {"image_encoder": image, "text_encoder": text, "compositor": compositor or {}},
                "optimizer_state_dict": {"image_encoder": {"state": {}, "param_groups": []}},
                "cirr_recall_@10": 51.2}, path)
    return path


def test_a_training_step_is_the_official_one(backbone, tiny_config):
    """Masked image (the official draw of kept patches) + caption against the whole image, raw dot products,
    temperature 1: the loss and the gradients of both towers equal the transcribed official step's."""
    before = backbone.state_token()
    trainable = pli.PLITrainable(backbone, {"mask_ratio": 0.75, "tune": "both", "tau": 1.0})
    torch.manual_seed(0)
    pixels = torch.randn(4, 3, 32, 32)
    captions = ["a red square", "a blue circle on grass", "two dogs", "a green square"]
    oracle_model = copy.deepcopy(trainable.view)
    torch.manual_seed(5)
    loss, _ = trainable.training_step(Batch(pixels, captions))
    torch.manual_seed(5)
    want = official_loss(oracle_model, pixels, backbone.tokenize(captions), 0.75)
    assert torch.allclose(loss, want, atol=1e-5), (float(loss), float(want))
    loss.backward()
    want.backward()
    ours = dict(trainable.named_trainable_parameters())
    theirs = dict(oracle_model.named_parameters())
    assert {n.split(".")[0] for n in ours} == {"visual", *[p for p in towers.TEXT_PARTS if hasattr(backbone.model, p)]}
    for name in ("visual.conv1.weight", "visual.proj", "token_embedding.weight", "text_projection"):
        assert ours[name].grad is not None and torch.allclose(ours[name].grad, theirs[name].grad, atol=1e-5), name
    assert backbone.state_token() == before  # the shared backbone: untouched, masking slot restored too
    assert not isinstance(trainable.view.visual.patch_dropout, pli.OfficialMasking)


def test_the_masking_keeps_the_class_token_and_a_quarter_of_the_patches(backbone):
    masking = pli.OfficialMasking(0.75)
    x = torch.arange(2 * 17 * 3, dtype=torch.float32).reshape(2, 17, 3)
    out = masking(x)
    assert out.shape == (2, 1 + 4, 3) and torch.equal(out[:, 0], x[:, 0])
    for row, full in zip(out, x, strict=True):  # kept tokens are distinct patch tokens of that image
        kept = {tuple(t.tolist()) for t in row[1:]}
        assert len(kept) == 4 and kept <= {tuple(t.tolist()) for t in full[1:]}


@pytest.mark.parametrize("tune", ["text", "image"])
def test_tuning_one_tower_leaves_the_other_frozen(backbone, tune):
    trainable = pli.PLITrainable(backbone, {"tune": tune})
    names = {n.split(".")[0] for n, _ in trainable.named_trainable_parameters()}
    assert names == ({"visual"} if tune == "image" else names - {"visual"}) and names
    loss, _ = trainable.training_step(Batch(torch.randn(3, 3, 32, 32), ["a", "b", "c"]))
    loss.backward()
    frozen = [p for n, p in trainable.view.named_parameters() if n.split(".")[0] not in names]
    assert frozen and all(p.grad is None for p in frozen)
    assert set(trainable.state_to_save()) == set(towers.part_state(trainable.view, pli.TUNED[tune]))


def test_queries_are_the_official_weighted_sum_on_the_tuned_towers(backbone, tmp_path):
    """The official checkpoint's towers, loaded under open_clip's names, give the gallery features and the queries of
    the transcribed evaluation: CIRR's texts post-processed, FashionIQ's "{c1} and {c2}" post-processed, CIRCO's raw."""
    tuned = _perturbed(backbone.model)
    path = _official_file(tmp_path / "best.pth", tuned)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want_gallery = F.normalize(tuned.encode_image(pixels), dim=-1)
    cases = {"cirr": [Query("q0", "r", ("has two dogs. And a cat?",)), Query("q1", "r", ("R&B * style",))],
             "fashioniq": [Query("q0", "r", ("is shiny and silver with shorter sleeves ", "fit and flare")),
                           Query("q1", "r", ("is darker.", "has a logo"))],
             "circo": [Query("q0", "r", ("is a cat. It sleeps",)), Query("q1", "r", ("shows two of them",))]}
    texts = {"cirr": [caption_post_process("has two dogs. And a cat?"), caption_post_process("R&B * style")],
             "fashioniq": [caption_post_process("is shiny and silver with shorter sleeves  and fit and flare"),
                           caption_post_process("is darker. and has a logo")],
             "circo": ["is a cat. It sleeps", "shows two of them"]}
    for dataset, queries in cases.items():
        method = pli.PLI(backbone, {"image_weight": 0.25, "checkpoint": str(path), "official_text": True}, dataset)
        gallery = method.encode_gallery(pixels)
        assert torch.allclose(gallery, want_gallery, atol=1e-5)
        refs = gallery[:2]
        with torch.no_grad():
            want = official_query(tuned, refs, backbone.tokenize(texts[dataset]), 0.25)
        assert torch.allclose(method.compose(refs, queries), want, atol=1e-5), dataset
    assert method.info()["format"] == "official" and method.info()["tuned"] == "both"
    plain = pli.PLI(backbone, {"image_weight": 0.25, "checkpoint": str(path), "official_text": False}, "cirr")
    with torch.no_grad():
        want = official_query(tuned, refs, backbone.tokenize(["has two dogs. And a cat?", "R&B * style"]), 0.25)
    assert torch.allclose(plain.compose(refs, cases["cirr"]), want, atol=1e-5)


def test_official_checkpoints_that_do_not_fit_are_one_line_errors(backbone, tmp_path):
    tuned = _perturbed(backbone.model)
    combiner = _official_file(tmp_path / "combiner.pth", tuned, compositor={"combiner_layer.weight": torch.ones(2, 2)})
    with pytest.raises(CheckpointError, match="compositor .* Combiner or Phi variant"):
        pli.PLI(backbone, {"image_weight": 0.25, "checkpoint": str(combiner)}, "cirr")
    torch.save({"model_state_dict": {"image_encoder": {"visual_encoder.x": torch.ones(1)}}}, tmp_path / "half.pth")
    with pytest.raises(CheckpointError, match="not a PLI checkpoint of CLIP"):
        pli.PLI(backbone, {"image_weight": 0.25, "checkpoint": str(tmp_path / "half.pth")}, "cirr")
    torch.save({"state_dict_img2text": {"a": torch.ones(1)}}, tmp_path / "pic2word.pt")
    with pytest.raises(CheckpointError, match="no 'model_state_dict' entry"):
        pli.PLI(backbone, {"image_weight": 0.25, "checkpoint": str(tmp_path / "pic2word.pt")}, "cirr")
    bigger = copy.deepcopy(tuned)
    bigger.text_projection = torch.nn.Parameter(torch.randn(32, 64))
    with pytest.raises(CheckpointError, match="does not fit this backbone"):
        pli.PLI(backbone, {"image_weight": 0.25, "checkpoint": str(_official_file(tmp_path / "b.pth", bigger))},
                "cirr")
    with pytest.raises(CheckpointError, match="pli needs --checkpoint"):
        pli.PLI(backbone, {"image_weight": 0.25, "checkpoint": None}, "cirr")


def test_the_lr_warms_up_once_an_epoch_as_the_official_linear_lr(tmp_path):
    """LinearLR(start_factor=0.01, total_iters=5) stepped at each epoch's end, then constant."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))], lr=1e-6)
    official = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=5)
    cfg = training.TrainConfig(output=tmp_path, lr=1e-6, schedule="constant", warmup_epochs=5, warmup_start=0.01)
    for epoch in range(8):
        for step in (epoch * 10, epoch * 10 + 9):
            assert training._lr_factor(cfg, step, epoch, 80) * 1e-6 == pytest.approx(opt.param_groups[0]["lr"])
        opt.step()
        official.step()


def _train(tiny_config, corpus, out, *extra):
    return CliRunner().invoke(cli, ["train", "--method", "pli", "--corpus", str(corpus), "--output", str(out),
                                    "--backbone", str(tiny_config), "--pretrained", "none", "--batch-size", "8",
                                    "--workers", "0", "--quiet", "--device", "cpu", *extra])


def test_training_then_evaluation_through_the_cli(tiny_config, tmp_path, toy_root):
    """`cirbench train --method pli` writes the towers it tuned, with the official schedule as its defaults; the
    folder evaluates, its gallery features its own; a sweep of --image-weight loads the towers once."""
    from test_training import make_corpus

    corpus = make_corpus(tmp_path / "c", n=16)
    out = tmp_path / "pli"
    res = _train(tiny_config, corpus, out, "--epochs", "2", "--lr", "1e-3", "--tune", "text",
                 "--log-every", "1")
    assert res.exit_code == 0, res.output
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["warmup_epochs"] == 5 and config["train"]["warmup_start"] == 0.01
    assert config["train"]["weight_decay"] == 5e-5 and config["options"]["tune"] == "text"
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert {round(e["lr"] / 1e-3, 6) for e in log if "lr" in e} == {0.01, round(0.01 + 0.99 / 5, 6)}
    res = _train(tiny_config, corpus, tmp_path / "w", "--max-steps", "2", "--warmup-steps", "1")
    assert res.exit_code == 0, res.output  # a warm-up in steps replaces the method's own
    assert json.loads((tmp_path / "w" / "config.json").read_text())["train"]["warmup_epochs"] == 0

    loads = []
    real = pli.load_towers
    cfg = RunConfig(method="pli", dataset="toy", split="val", backbone=str(tiny_config), pretrained="none",
                    data_root=toy_root, output=tmp_path / "results", cache_dir=tmp_path / "cache", workers=0,
                    progress=False, bootstrap=0, method_options={"checkpoint": str(out), "image_weight": "0,0.5"})
    with registered(ToyPlugin(), "toy") as reg:
        pli.load_towers = lambda *a: loads.append(1) or real(*a)
        try:
            outcomes = evaluate(cfg, reg)
        finally:
            pli.load_towers = real
    assert len(outcomes) == 2 and loads == [1]
    record = outcomes[0].record
    assert record["method"]["info"]["tuned"] == "text" and record["method"]["info"]["format"] == "cirbench"
    assert record["cache"]["misses"] >= 1


def test_cli_errors_are_one_line(tiny_config, tmp_path, toy_root):
    base = ["run", "--method", "pli", "--backbone", str(tiny_config), "--pretrained", "none", "--data-root",
            str(toy_root), "--dataset", "toy", "--output", str(tmp_path / "r"), "--no-cache"]
    with registered(ToyPlugin(), "toy"):
        res = CliRunner().invoke(cli, base)
        assert res.exit_code != 0 and "pli needs --checkpoint" in res.output, res.output
        (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
        res = CliRunner().invoke(cli, [*base, "--checkpoint", str(tmp_path / "junk.pth")])
        assert res.exit_code != 0 and "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1, \
            res.output
    resnet = tmp_path / "rn.json"
    resnet.write_text(json.dumps({"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1],
                                                                    "width": 16},
                                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                                               "layers": 1}}))
    bb = load_backbone(str(resnet), "none", device="cpu", seed=0, training=True)
    with pytest.raises(CirbenchError, match="ViT image tower"):
        pli.PLITrainable(bb, {})


def test_a_cirbench_checkpoint_of_another_method_or_backbone_is_refused(backbone, tmp_path):
    save_checkpoint(tmp_path / "rtd", {"x": torch.ones(1)}, {"method": "rtd", "backbone": backbone.identity()})
    with pytest.raises(CheckpointError, match="for method 'rtd', not 'pli'"):
        pli.PLI(backbone, {"image_weight": 0.25, "checkpoint": str(tmp_path / "rtd")}, "cirr")


def test_only_the_last_checkpoints_towers_stay_loaded(backbone, tmp_path):
    """A sweep shares one load; another checkpoint (training's validation loads one per step) replaces it, so that
    copies of CLIP do not pile up on the backbone."""
    first = _official_file(tmp_path / "a.pth", _perturbed(backbone.model, 1))
    second = _official_file(tmp_path / "b.pth", _perturbed(backbone.model, 2))
    a1 = pli.PLI(backbone, {"image_weight": 0.25, "checkpoint": str(first)}, "cirr")
    a2 = pli.PLI(backbone, {"image_weight": 0.5, "checkpoint": str(first)}, "cirr")
    assert a1.tuned is a2.tuned
    b = pli.PLI(backbone, {"image_weight": 0.25, "checkpoint": str(second)}, "cirr")
    assert b.tuned is not a1.tuned and len(backbone.derived("pli-towers", dict)) == 1
