"""TransAgg: the port against a transcription of the official model and training, checkpoints, triplet corpora."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F
from annotations import ANNOTATIONS, needs_annotations
from click.testing import CliRunner
from helpers import official_vit_tokens, registered
from toy_plugin import ToyPlugin

from cirbench.backbones import load_backbone
from cirbench.cli import cli
from cirbench.errors import CheckpointError, CirbenchError
from cirbench.testing import write_toy_corpus
from cirbench.types import Query


@pytest.fixture(scope="module")
def backbone(tiny_config):
    return load_backbone(str(tiny_config), "none", device="cpu", seed=0)


def random_head_state(dim: int, seed: int, layers: int = 2) -> dict[str, torch.Tensor]:
    """The official head's tensors (TransAgg minus its pretrained_model), random and large enough to matter."""
    from cirbench.methods.transagg.model import Head

    gen = torch.Generator().manual_seed(seed)
    own = Head(dim, layers).state_dict()
    state = {k: torch.randn(v.shape, generator=gen) * (0.2 if v.ndim > 1 else 0.3) for k, v in own.items()}
    for k in state:
        if k.endswith(("norm1.weight", "norm2.weight")):
            state[k] = 1 + 0.1 * torch.randn(state[k].shape, generator=gen)
    return state


# -- the official code, transcribed (model/clip/model.py, model/model.py) over the open_clip model's weights ------
def official_encode_image(model, image):
    """VisionTransformer.forward of the modified CLIP: (ln_post(x[:, 0]) @ proj, ln_post(x) @ proj)."""
    x = official_vit_tokens(model, image)
    v = model.visual
    return v.ln_post(x[:, 0, :]) @ v.proj, v.ln_post(x) @ v.proj


def official_encode_text(model, text):
    x = model.token_embedding(text) + model.positional_embedding
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ model.text_projection, x @ model.text_projection


def official_layer(w, p, x, additive):
    """nn.TransformerEncoderLayer(norm_first=True, activation='gelu', nhead=8) in eval mode, its key padding mask
    a float one: ``additive`` [B, S] is added to every head's logits."""
    def ln(t, name):
        return F.layer_norm(t, t.shape[-1:], w[f"{p}{name}.weight"], w[f"{p}{name}.bias"])

    b, s, d = x.shape
    q, k, v = F.linear(ln(x, "norm1"), w[f"{p}self_attn.in_proj_weight"], w[f"{p}self_attn.in_proj_bias"]).chunk(3, -1)
    q, k, v = (t.reshape(b, s, 8, d // 8).transpose(1, 2) for t in (q, k, v))
    logits = q @ k.transpose(-1, -2) / math.sqrt(d // 8) + additive[:, None, None, :]
    out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, s, d)
    x = x + F.linear(out, w[f"{p}self_attn.out_proj.weight"], w[f"{p}self_attn.out_proj.bias"])
    hidden = F.gelu(F.linear(ln(x, "norm2"), w[f"{p}linear1.weight"], w[f"{p}linear1.bias"]))
    return x + F.linear(hidden, w[f"{p}linear2.weight"], w[f"{p}linear2.bias"])


def official_combine_features(w, model, images, text):
    """TransAgg.combine_features (clip, eval): the mask as the official torch.cat of bool and float makes it."""
    ref, ref_total = official_encode_image(model, images)
    batch = ref.size(0)
    ref_total = ref_total.float()
    mask = text == 0
    text_features, total_text = official_encode_text(model, text)
    combined = torch.cat((total_text, w["sep_token"].repeat(batch, 1, 1), ref_total), dim=1)
    mask = torch.cat((mask, torch.zeros(batch, ref_total.size(1) + 1)), dim=1)
    assert mask.dtype == torch.float32  # the official mask is a float one: padding gets +1, it is not masked
    x = combined
    for i in range(len({k.split(".")[2] for k in w if k.startswith("fusion.layers.")})):
        x = official_layer(w, f"fusion.layers.{i}.", x, mask)
    img_rep, text_rep = x[:, 78, :], x[torch.arange(batch), text.argmax(dim=-1), :]
    f_u = F.linear(F.relu(F.linear(torch.cat((img_rep, text_rep), -1), w["combiner_layer.weight"],
                                   w["combiner_layer.bias"])), w["output_layer.weight"], w["output_layer.bias"])
    weighted = F.linear(f_u, w["weighted_layer.weight"], w["weighted_layer.bias"])
    query = weighted[:, 0:1] * text_features + weighted[:, 1:2] * f_u + weighted[:, 2:3] * ref
    return F.normalize(query, dim=-1)


def tuned_text_state(backbone, seed: int) -> dict[str, torch.Tensor]:
    """The whole CLIP's state with the text tower's weights moved (an official checkpoint tuned with encoder='text')."""
    from cirbench.methods._shared.towers import TEXT_PARTS

    gen = torch.Generator().manual_seed(seed)
    state = {k: v.detach().clone() for k, v in backbone.model.state_dict().items()}
    for k, v in state.items():
        if k.split(".", 1)[0] in TEXT_PARTS and v.is_floating_point():
            state[k] = v + 0.05 * torch.randn(v.shape, generator=gen)
    return state


def test_the_fusion_adds_the_official_float_mask_on_any_torch():
    """The official code runs nn.TransformerEncoder (pre-norm) with the float mask torch.cat makes of a bool and a
    float tensor. torch 1.12 (its requirements) takes the layer's own path there, training or not, which adds the
    mask to the logits: the padding is attended to with +1. The head does that whatever the torch version, without
    gradients too (where later versions' fast path would read the mask as a boolean one)."""
    from cirbench.methods.transagg.model import Head, official_attention

    state = random_head_state(32, 7)
    head = Head(32)
    head.load_state_dict(state)
    head.eval()
    x = torch.randn(2, 12, 32)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[0, 3:] = True
    mask = torch.cat((pad, torch.zeros(2, 7)), dim=1)
    additive = x
    for i in range(2):
        additive = official_layer(state, f"fusion.layers.{i}.", additive, mask)
    literal = head.fusion(x, src_key_padding_mask=mask).detach()  # with gradients: the layer's own path
    torch.testing.assert_close(literal, additive, atol=1e-5, rtol=1e-4)
    with torch.no_grad(), official_attention():
        torch.testing.assert_close(head.fusion(x, src_key_padding_mask=mask), additive, atol=1e-5, rtol=1e-4)
    before = torch.backends.mha.get_fastpath_enabled()
    with official_attention():
        assert not torch.backends.mha.get_fastpath_enabled()
    assert torch.backends.mha.get_fastpath_enabled() == before
    # a bool mask would drop the padding: the +1 is not the same query
    masked = x
    dropped = torch.zeros(2, 12).masked_fill(torch.cat((pad, torch.zeros(2, 7, dtype=torch.bool)), 1), float("-inf"))
    for i in range(2):
        masked = official_layer(state, f"fusion.layers.{i}.", masked, dropped)
    assert not torch.allclose(masked[0, :3], additive[0, :3], atol=1e-4)


def test_compose_is_the_official_evaluation(tmp_path, backbone):
    """The official checkpoint (the whole model's state dict, CLIP's text tower tuned) gives combine_features on
    CIRR-, FashionIQ- and CIRCO-shaped queries; the gallery is the backbone's own (its image tower untouched)."""
    from cirbench.methods.transagg.model import TransAgg

    head = random_head_state(32, 1)
    clip_state = tuned_text_state(backbone, 2)
    torch.save({**head, **{f"pretrained_model.{k}": v for k, v in clip_state.items()}}, tmp_path / "transagg.pth")
    method = TransAgg(backbone, {"checkpoint": tmp_path / "transagg.pth"}, "cirr")
    assert method.info()["tuned"] == "text" and method.gallery_feature_kind() == {"kind": "image-global"}
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    refs = method.encode_references(pixels)
    assert refs.shape == (3, 17, 32)
    official_model = load_backbone(str(backbone.model_name), "none", device="cpu", seed=0).model.eval()
    official_model.load_state_dict(clip_state)
    cases = [
        [Query("0", "r", ("has two dogs on the grass",)), Query("1", "r", ("is at night!",)),
         Query("2", "r", ("shows the same cat, sleeping",))],
        [Query("0", "r", ("is longer.", "has stripes")), Query("1", "r", ("is red", "no sleeves?")),
         Query("2", "r", ("darker", "more casual"))],
    ]
    texts = [["has two dogs on the grass", "is at night!", "shows the same cat, sleeping"],
             ["Is longer and has stripes", "Is red and no sleeves", "Darker and more casual"]]
    for queries, expected_texts in zip(cases, texts, strict=True):
        ours = method.compose(refs, queries)
        with torch.no_grad():
            expected = official_combine_features(head, official_model, pixels, backbone.tokenizer(expected_texts))
        torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)
    # the gallery is the backbone's image feature; the tuned text tower is not the backbone's
    torch.testing.assert_close(method.encode_gallery(pixels), backbone.encode_image(pixels))
    assert not torch.allclose(method.tuned.encode_text(["a dog"]), backbone.encode_text(["a dog"]), atol=1e-4)


@needs_annotations
def test_fashioniq_text_is_the_official_evaluations_on_the_real_captions():
    """``trainer.py``'s ``compute_fiq_val_metrics`` (Code-kunkun/ZS-CIR), transcribed: the captions of each
    triplet joined forward, the first through ``str.capitalize``; on every FashionIQ val triplet's captions."""
    from cirbench.methods.transagg.model import query_text

    def official(c1, c2):
        return f"{c1.strip('.?, ').capitalize()} and {c2.strip('.?, ')}"

    checked = 0
    for category in ("dress", "shirt", "toptee"):
        path = ANNOTATIONS / "fashioniq" / "captions" / f"cap.{category}.val.json"
        for record in json.loads(path.read_text()):
            assert query_text(Query("q", "r", tuple(record["captions"]))) == official(*record["captions"])
            checked += 1
    assert checked > 6000
    assert query_text(Query("q", "r", ("has two dogs",))) == "has two dogs"  # CIRR/CIRCO: as written


def test_checkpoints_say_what_they_hold(tmp_path, backbone):
    from cirbench.methods.transagg.model import TransAgg

    head = random_head_state(32, 4)
    frozen = {f"pretrained_model.{k}": v for k, v in backbone.model.state_dict().items()}
    torch.save({f"module.{k}": v for k, v in {**head, **frozen}.items()}, tmp_path / "frozen.pth")
    method = TransAgg(backbone, {"checkpoint": tmp_path / "frozen.pth"}, "cirr")
    assert method.info()["tuned"] == "neither" and method.tuned is backbone
    visual = {k: (v + 0.1 if k.startswith("pretrained_model.visual.") and v.is_floating_point() else v)
              for k, v in frozen.items()}
    torch.save({**head, **visual}, tmp_path / "both.pth")
    both = TransAgg(backbone, {"checkpoint": tmp_path / "both.pth"}, "cirr")
    assert both.info()["tuned"] == "both" and "transagg_sha256" in both.gallery_feature_kind()
    torch.save({"layers.0.0.weight": torch.zeros(4, 4)}, tmp_path / "pic2word.pth")
    with pytest.raises(CheckpointError, match="not a TransAgg checkpoint"):
        TransAgg(backbone, {"checkpoint": tmp_path / "pic2word.pth"}, "cirr")
    torch.save({**head, "pretrained_model.visual_encoder.cls_token": torch.zeros(1)}, tmp_path / "blip.pth")
    with pytest.raises(CheckpointError, match="TransAgg of BLIP"):
        TransAgg(backbone, {"checkpoint": tmp_path / "blip.pth"}, "cirr")
    wide = dict(head, **{"combiner_layer.weight": torch.zeros(256, 128)})
    torch.save({**wide, **frozen}, tmp_path / "wide.pth")
    with pytest.raises(CheckpointError, match="combiner_layer.weight"):
        TransAgg(backbone, {"checkpoint": tmp_path / "wide.pth"}, "cirr")
    with pytest.raises(CheckpointError, match="needs --checkpoint"):
        TransAgg(backbone, {}, "cirr")


def triplets(root, rows) -> str:
    path = root / "triplets.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "relative_caption", "target"])
        writer.writerows(rows)
    return str(path)


def test_triplet_corpora_read_both_images_and_skip_bad_rows(tmp_path):
    from cirbench.corpora import collate, open_corpus
    from cirbench.preprocess import Preprocessor

    write_toy_corpus(tmp_path)  # the toy images under tmp_path/images
    spec = triplets(tmp_path, [["images/img_red_0.png", "make it green", "images/img_green_0.png"],
                               ["images/img_red_1.png", "make it blue", "images/missing.png"],
                               ["images/img_blue_0.png", "make it red", "images/img_red_2.png"]])
    corpus = open_corpus(spec, Preprocessor("clip", 16), caption_columns=("relative_caption",),
                         required_columns=("target",), image_columns=("target",))
    batch = collate([corpus[i] for i in range(len(corpus))])
    assert batch is not None and batch.captions == ["make it green", "make it red"] and batch.skipped == 1
    assert batch.pixels.shape == batch.images["target"].shape == (2, 3, 16, 16)
    assert not torch.equal(batch.pixels[0], batch.images["target"][0])
    assert torch.equal(batch.images["target"][1], Preprocessor("clip", 16).from_bytes(
        (tmp_path / "images/img_red_2.png").read_bytes(), "x"))
    moved = batch.to(torch.device("cpu"))
    assert set(moved.images) == {"target"}
    (tmp_path / "pairs.csv").write_text("image,caption\nimages/img_red_0.png,make it green\n")
    with pytest.raises(CirbenchError, match="row 1 has no target"):
        open_corpus(tmp_path / "pairs.csv", None, required_columns=("target",), image_columns=("target",))
    with pytest.raises(CirbenchError, match="columns image and target of a .csv/.tsv file"):
        open_corpus(tmp_path / "images", None, image_columns=("target",))


def test_training_step_and_schedule_are_the_official_ones(backbone):
    """A step's loss is the official CE over 100 q . normalize(target) with the head's query; the towers' lr stays at
    1e-6 while the head's follows torch's CosineAnnealingWarmRestarts(T_0=epochs, eta_min=1e-6) stepped per
    iteration, as the official Config and Trainer schedule them."""
    from cirbench.corpora import Batch
    from cirbench.methods.transagg.model import TransAggTrainable
    from cirbench.training import TrainConfig, _lr_factor, build_optimizer, group_lr

    trainer = TransAggTrainable(backbone, {"tune": "text", "dropout": 0.0})
    trainer.train_mode(False)
    gen = torch.Generator().manual_seed(5)
    refs, targets = torch.randn(4, 3, 32, 32, generator=gen), torch.randn(4, 3, 32, 32, generator=gen)
    captions = ["make it red", "add a dog", "is larger", "at night"]
    loss, _ = trainer.training_step(Batch(refs, captions, images={"target": targets}))
    head = {k: v.detach() for k, v in trainer.head.state_dict().items()}
    with torch.no_grad():
        query = official_combine_features(head, trainer.view.eval(), refs, backbone.tokenizer(captions))
        target = F.normalize(official_encode_image(trainer.view, targets)[0], dim=-1)
        expected = F.cross_entropy(100 * query @ target.T, torch.arange(4))
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)
    loss.backward()
    assert trainer.view.token_embedding.weight.grad is not None  # the text tower is tuned
    assert all(p.grad is None for p in trainer.view.visual.parameters())  # the image tower is not
    assert all(p.grad is None for p in backbone.model.parameters())  # the shared backbone is never tuned

    cfg = TrainConfig(output=None, **{k: v for k, v in TransAggTrainable.defaults.items() if k != "epochs"},
                      epochs=3)
    optimizer = build_optimizer(trainer, cfg)
    used = [g for g in optimizer.param_groups if g["params"]]
    assert sorted(g["lr_scale"] for g in used) == [0.01, 1.0] and all(g["weight_decay"] == 0.05 for g in used)
    towers = next(g for g in used if g["lr_scale"] == 0.01)["params"]
    assert sum(p.numel() for p in towers) == sum(p.numel() for name, p in trainer.named_trainable_parameters()
                                                 if name.startswith("pretrained_model."))
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    official = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "lr": 1e-6}], lr=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(official, T_0=3, eta_min=1e-2 * 1e-4)
    iters = 5
    for step in range(3 * iters):
        factor = _lr_factor(cfg, step, step // iters, 3 * iters)
        assert group_lr(cfg, factor) == pytest.approx(official.param_groups[0]["lr"], rel=1e-9)
        assert group_lr(cfg, factor, 0.01) == pytest.approx(official.param_groups[1]["lr"], rel=1e-9)
        official.step()
        scheduler.step(step // iters + (step % iters + 1) / iters)


def test_trains_and_runs_through_the_cli(tmp_path, tiny_config, toy_root):
    corpus = write_toy_corpus(tmp_path / "corpus")
    out = tmp_path / "trained"
    res = CliRunner().invoke(cli, ["train", "--method", "transagg", "--corpus", str(corpus), "--backbone",
                                   str(tiny_config), "--pretrained", "none", "--max-steps", "2", "--batch-size", "4",
                                   "--workers", "0", "--output", str(out), "--quiet", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["max_grad_norm"] == 5.0 and config["train"]["min_lr"] == 1e-6
    common = ["--dataset", "toy", "--data-root", str(toy_root), "--backbone", str(tiny_config), "--pretrained", "none",
              "--no-cache", "--quiet", "--output", str(tmp_path / "res")]
    with registered(ToyPlugin(), "toy"):
        res = CliRunner().invoke(cli, ["run", "--method", "transagg", "--checkpoint", str(out), *common])
        assert res.exit_code == 0, res.output
        (result,) = (tmp_path / "res").rglob("transagg*.json")
        assert json.loads(result.read_text())["method"]["info"]["tuned"] == "text"
        res = CliRunner().invoke(cli, ["run", "--method", "transagg", *common])
        assert res.exit_code == 2 and "needs --checkpoint" in res.output and "Traceback" not in res.output
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("image,caption\nimages/a.png,a dog\n")
    res = CliRunner().invoke(cli, ["train", "--method", "transagg", "--corpus", str(pairs), "--backbone",
                                   str(tiny_config), "--pretrained", "none", "--max-steps", "1", "--output",
                                   str(tmp_path / "t2"), "--quiet"])
    assert res.exit_code == 2 and "has no target" in res.output and len(res.output.strip().splitlines()) == 1


def test_the_released_laion_cir_json_becomes_a_triplet_corpus(tmp_path, capsys):
    """scripts/laion_cir_to_csv.py writes the official records (ids, the official <id:07>.png names) as rows the
    trainer reads; a file of other records is one error line."""
    import importlib.util
    import shutil
    from pathlib import Path

    from cirbench.corpora import collate, open_corpus
    from cirbench.methods.transagg.model import TransAggTrainable
    from cirbench.preprocess import Preprocessor

    spec = importlib.util.spec_from_file_location("laion_cir_to_csv",
                                                  Path(__file__).parents[1] / "scripts" / "laion_cir_to_csv.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    write_toy_corpus(tmp_path / "toy")
    images = tmp_path / "laion" / "images"
    images.mkdir(parents=True)
    for image_id, colour in ((12, "red"), (345, "green"), (6789, "blue")):
        shutil.copy(tmp_path / "toy" / "images" / f"img_{colour}_0.png", images / f"{image_id:07d}.png")
    records = [{"ref_image_id": 12, "relative_cap": "make it green", "tgt_image_id": 345},
               {"ref_image_id": 345, "relative_cap": "make it blue", "tgt_image_id": 6789},
               {"ref_image_id": 6789, "relative_cap": "make it red", "tgt_image_id": 99}]
    (tmp_path / "info.json").write_text(json.dumps(records))
    out = tmp_path / "csv" / "combined.csv"
    assert script.main([str(tmp_path / "info.json"), "--images", str(images), "--out", str(out)]) == 0
    assert "3 triplets" in capsys.readouterr().out
    corpus = open_corpus(out, Preprocessor("targetpad", 16), caption_columns=TransAggTrainable.caption_columns,
                         required_columns=TransAggTrainable.required_columns,
                         image_columns=TransAggTrainable.image_columns)
    batch = collate([corpus[i] for i in range(len(corpus))])
    assert batch.captions == ["make it green", "make it blue"] and batch.skipped == 1  # image 99 is not there
    assert batch.images["target"].shape == (2, 3, 16, 16)
    assert script.main([str(tmp_path / "info.json"), "--images", str(images), "--out", str(out), "--only-present"]) == 0
    assert "2 triplets, 1 left out" in capsys.readouterr().out
    (tmp_path / "other.json").write_text(json.dumps([{"image": "a.png", "caption": "a dog"}]))
    assert script.main([str(tmp_path / "other.json"), "--images", str(images), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "record 0 has no ref_image_id, relative_cap, tgt_image_id" in err and len(err.strip().splitlines()) == 1
