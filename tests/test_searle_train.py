"""Training SEARLE's Phi against transcriptions of the official src/train_phi.py and src/utils.py
(miccunifi/SEARLE), its teacher pass and cache, image-only corpora, and the trained checkpoint in a run."""

from __future__ import annotations

import json
import random

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file
from test_searle_oti import CONCEPTS, phrases_for, write_sources
from test_training import COLOURS, make_corpus

from cirbench import training
from cirbench.backbones import load_backbone
from cirbench.cli import cli
from cirbench.corpora import collate, open_corpus
from cirbench.errors import CirbenchError
from cirbench.methods._shared.textinv import encode_with_pseudo_tokens, nt_xent, token_width
from cirbench.methods.searle import oti
from cirbench.methods.searle import train as searle_train
from cirbench.preprocess import Preprocessor
from cirbench.testing import ToyDatasetPlugin, registered


# -- transcriptions of the official code --------------------------------------------------------------------
def official_contrastive_loss(v1, v2, temperature):
    """SEARLE src/utils.py contrastive_loss (device: the CPU); FTI4CIR src/utils.py has the same function."""
    v1 = torch.nn.functional.normalize(v1, dim=1)
    v2 = torch.nn.functional.normalize(v2, dim=1)
    numerator = torch.exp(torch.diag(torch.inner(v1, v2)) / temperature)
    numerator = torch.cat((numerator, numerator), 0)
    joint_vector = torch.cat((v1, v2), 0)
    pairs_product = torch.exp(torch.mm(joint_vector, joint_vector.t()) / temperature)
    denominator = torch.sum(pairs_product - pairs_product * torch.eye(joint_vector.shape[0]), 0)
    return -torch.mean(torch.log(numerator / denominator))


def official_step_loss(backbone, phi, features, oti_tokens, names, name_to_concepts, concept_to_phrases,
                       concepts_to_filter_out, lambda_distil, lambda_gpt, temperature, top_k_concepts):
    """train_phi.py train_one_epoch, one batch (autocast and the scaler left out; encode_with_pseudo_tokens is
    cirbench's first-only replacement, itself checked against the official one in test_searle_oti)."""
    batch_concepts = [random.choice(name_to_concepts[name][:top_k_concepts]) for name in names]
    while sum([concept in concepts_to_filter_out for concept in batch_concepts]) != 0:
        batch_concepts = [random.choice(name_to_concepts[name][:top_k_concepts]) for name in names]
    estimated_tokens = phi(features)
    distillation_loss = official_contrastive_loss(oti_tokens, estimated_tokens, temperature)
    reg_gpt_phrases = [random.choice(concept_to_phrases[concept]) for concept in batch_concepts]
    token_gpt_phrases = [gpt_phrase.replace(w, " $ ") for w, gpt_phrase in
                         zip(batch_concepts, reg_gpt_phrases, strict=True)]
    gpt_phrases_embeddings = backbone.encode_text(reg_gpt_phrases, memoize=False)
    gpt_pseudo = encode_with_pseudo_tokens(backbone, token_gpt_phrases, estimated_tokens, "$", normalize=False,
                                           first_only=True)
    gpt_loss = torch.nn.CosineEmbeddingLoss()(gpt_phrases_embeddings, gpt_pseudo, torch.as_tensor([1]))
    return lambda_distil * distillation_loss + lambda_gpt * gpt_loss


@pytest.fixture(scope="module")
def backbone(tiny_config):
    return load_backbone(str(tiny_config), "none", device="cpu", seed=0)


@pytest.mark.parametrize("temperature", [0.25, 1.0, 0.05])
def test_contrastive_loss_is_the_official_one(temperature):
    """SEARLE's utils.contrastive_loss, which FTI4CIR's utils.py repeats line for line: both methods train with it."""
    g = torch.Generator().manual_seed(3)
    v1, v2 = torch.randn(16, 32, generator=g), torch.randn(16, 32, generator=g)
    v2[:4] = v1[:4] + 0.01 * v2[:4]  # some near-identical pairs
    ours = nt_xent(v1, v2, temperature)
    torch.testing.assert_close(ours, official_contrastive_loss(v1, v2, temperature), rtol=1e-5, atol=1e-5)


def test_a_training_step_is_the_official_one(backbone, tmp_path):
    concepts_csv, release = write_sources(tmp_path)
    trainable = searle_train.SearleTrainable(backbone, {"concepts": concepts_csv, "phrases": release,
                                                        "lambda_distil": 1.0, "lambda_gpt": 0.75,
                                                        "temperature": 0.25, "top_k_concepts": 4})
    trainable.net.eval()  # dropout off: both sides see the same Phi
    names = oti.load_concepts(concepts_csv)
    phrases = oti.load_phrases(release)
    usable = oti.usable_concepts(phrases)
    g = torch.Generator().manual_seed(0)
    n = 6
    features = torch.randn(n, backbone.embed_dim, generator=g)
    tokens = torch.randn(n, token_width(backbone), generator=g)
    # every image's 4 nearest concepts are usable ones (then the official re-draw loop never runs again, and both
    # sides consume the same random draws); "cat " keeps its space in the official list, a repeat is kept
    usable_rows = [i for i, name in enumerate(names) if name.strip() in usable]
    nearest = torch.tensor([[usable_rows[(i + j) % len(usable_rows)] for j in range(4)] for i in range(n)])
    nearest[0, 1] = nearest[0, 0]
    keys = [f"img{i}.png" for i in range(n)]
    trainable.teacher = searle_train.Teacher(keys, features, tokens, nearest, names, usable)
    trainable.phrases = phrases
    random.seed(11)
    ours, logs = trainable.training_step(collate([{"pixels": torch.empty(0), "caption": "", "extra": {}, "key": k}
                                                  for k in keys]))
    stripped = {k.strip(): v for k, v in phrases.items()}
    random.seed(11)
    official = official_step_loss(
        backbone, trainable.net, features, tokens, keys,
        {k: [names[i].strip() for i in nearest[r].tolist()] for r, k in enumerate(keys)}, stripped,
        set(stripped) - usable, 1.0, 0.75, 0.25, 4)
    torch.testing.assert_close(ours, official, rtol=1e-5, atol=1e-6)
    assert logs["gpt"] > 0 and logs["distil"] > 0


def test_image_only_and_key_only_corpora(tmp_path):
    pre = Preprocessor("clip", size=16)
    make_corpus(tmp_path / "c", n=3)
    folder = tmp_path / "c" / "img"  # images without any .txt sidecar
    (folder / "sub").mkdir()
    Image.new("RGB", (20, 20), COLOURS["blue"]).save(folder / "sub" / "x.jpg")
    (folder / "broken.png").write_bytes(b"\x89PNG broken")
    captioned = open_corpus(folder, pre)  # a caption corpus finds no caption there: every sample is skipped
    assert collate([captioned[i] for i in range(len(captioned))]).skipped == len(captioned) == 5
    images = open_corpus(folder, pre, captions=False)
    batch = collate([images[i] for i in range(len(images))])
    assert batch.keys == ["0.png", "1.png", "2.png", "sub/x.jpg"] and batch.skipped == 1
    assert batch.pixels.shape == (4, 3, 16, 16) and batch.captions == ["", "", "", ""]
    keys_only = open_corpus(folder, images=False, captions=False)  # lists the images, reads none
    batch = collate([keys_only[i] for i in range(len(keys_only))])
    assert batch.keys == ["0.png", "1.png", "2.png", "broken.png", "sub/x.jpg"] and batch.pixels.numel() == 0
    assert [s["key"] for s in keys_only.with_images(pre) if s] == ["0.png", "1.png", "2.png", "sub/x.jpg"]
    # a CSV with an image column alone; without one, the error says what is missing
    (tmp_path / "c" / "only.csv").write_text("image\nimg/0.png\nimg/2.png\n")
    table = open_corpus(tmp_path / "c" / "only.csv", pre, captions=False)
    assert [table[i]["key"] for i in range(2)] == ["img/0.png", "img/2.png"]
    (tmp_path / "c" / "nocol.csv").write_text("caption\nhello\n")
    with pytest.raises(CirbenchError, match=r"needs an image column \(image/filepath/path/file\); found"):
        open_corpus(tmp_path / "c" / "nocol.csv", pre, captions=False)
    with pytest.raises(CirbenchError, match="needs a caption column"):
        open_corpus(tmp_path / "c" / "only.csv", pre)
    # a caption corpus keeps its captions and gets keys too
    pairs = open_corpus(tmp_path / "c" / "pairs.csv", pre)
    assert pairs[1]["key"] == "img/1.png" and pairs[1]["caption"] == "a green square"


def _train(tiny_config, corpus, out, sources, *extra):
    concepts_csv, release = sources
    return ["train", "--method", "searle", "--corpus", str(corpus), "--output", str(out), "--backbone",
            str(tiny_config), "--pretrained", "none", "--workers", "0", "--quiet", "--concepts", str(concepts_csv),
            "--phrases", str(release), "--oti-steps", "2", "--oti-batch-size", "5", "--batch-size", "4", *extra]


def test_train_caches_the_teacher_and_the_checkpoint_runs(tmp_path, tiny_config, toy_root, monkeypatch):
    monkeypatch.setenv("CIRBENCH_CACHE", str(tmp_path / "cache"))
    sources = write_sources(tmp_path)
    make_corpus(tmp_path / "c", n=12)
    folder = tmp_path / "c" / "img"
    (folder / "corrupt.png").write_bytes(b"\x89PNG broken")  # left out of the teacher, and of every step
    res = CliRunner().invoke(cli, _train(tiny_config, folder, tmp_path / "out", sources, "--epochs", "2"))
    assert res.exit_code == 0, res.output
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["method"] == "searle" and config["teacher"]["images"] == 12
    assert config["teacher"]["unreadable_images"] == 1 and config["teacher"]["oti"]["steps"] == 2
    assert config["train"]["lr"] == 1e-4 and config["train"]["schedule"] == "constant"
    assert len(list((tmp_path / "cache" / "oti").glob("*/batch-*.safetensors"))) == 3  # 12 images in 5s
    log = [e for e in map(json.loads, (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()) if "loss" in e]
    assert log[-1]["step"] == 6 and {"distil", "gpt"} <= set(log[-1])  # 13 keys, 3 a step, corrupt one dropped
    # other Phi settings on the same images: the teacher comes from the cache, no image is optimised again
    monkeypatch.setattr(oti, "invert_batch", lambda *a, **k: pytest.fail("the teacher was optimised again"))
    res = CliRunner().invoke(cli, _train(tiny_config, folder, tmp_path / "out2", sources, "--max-steps", "2",
                                         "--lambda-gpt", "0"))
    assert res.exit_code == 0, res.output
    assert not torch.equal(load_file(str(tmp_path / "out" / "model.safetensors"))["layers.0.weight"],
                           load_file(str(tmp_path / "out2" / "model.safetensors"))["layers.0.weight"])
    # the trained Phi evaluates through the searle method
    with registered(ToyDatasetPlugin(), "toy"):
        res = CliRunner().invoke(cli, ["run", "--method", "searle", "--checkpoint", str(tmp_path / "out"),
                                       "--dataset", "toy", "--data-root", str(toy_root), "--backbone",
                                       str(tiny_config), "--pretrained", "none", "--output", str(tmp_path / "r"),
                                       "--cache-dir", str(tmp_path / "cache"), "--workers", "0", "--quiet"])
    assert res.exit_code == 0, res.output
    (result,) = list((tmp_path / "r").rglob("*.json"))
    assert json.loads(result.read_text())["method"]["info"]["checkpoint"] == str(tmp_path / "out")


def test_phi_learns_the_teacher_pseudo_words(tmp_path, tiny_config, monkeypatch):
    """With the distillation loss alone, Phi's pseudo-words move toward the OTI ones of the same images."""
    monkeypatch.setenv("CIRBENCH_CACHE", str(tmp_path / "cache"))
    concepts_csv, release = write_sources(tmp_path)
    make_corpus(tmp_path / "c", n=12)
    bb = load_backbone(str(tiny_config), "none", device="cpu", seed=0, training=True)
    trainable = searle_train.SearleTrainable(bb, {"concepts": concepts_csv, "phrases": release, "oti_steps": 3,
                                                  "oti_batch_size": 6, "lambda_gpt": 0.0, "dropout": 0.0})
    trainable.name = "searle"
    corpus = open_corpus(tmp_path / "c" / "pairs.csv", images=False, captions=False)
    cfg = training.TrainConfig(output=tmp_path / "out", max_steps=60, batch_size=12, lr=3e-3, schedule="constant",
                               workers=0, progress=False, precision="fp32", device="cpu")
    trainable.prepare(corpus, cfg)
    teacher = trainable.teacher

    def agreement():
        with torch.no_grad():
            predicted = trainable.net(teacher.features)
        return torch.nn.functional.cosine_similarity(predicted, teacher.tokens).mean().item()

    before = agreement()
    training.train(trainable, corpus, cfg)
    assert agreement() > before + 0.3


def test_bad_sources_and_corpora_are_one_line_errors(tmp_path, tiny_config, monkeypatch):
    monkeypatch.setenv("CIRBENCH_CACHE", str(tmp_path / "cache"))
    sources = write_sources(tmp_path)
    make_corpus(tmp_path / "c", n=4)
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    cases = [
        (_train(tiny_config, tmp_path / "c" / "img", tmp_path / "o1", (sources[0], tmp_path / "bad.zip")),
         "cannot read the phrases file"),
        (_train(tiny_config, tmp_path / "nowhere", tmp_path / "o2", sources), "does not exist"),
        (_train(tiny_config, tmp_path / "c" / "img", tmp_path / "o3", (tmp_path / "none.csv", sources[1])),
         "is not a file"),
    ]
    for args, message in cases:
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 2 and "Traceback" not in res.output and message in res.output, res.output
    empty = tmp_path / "junk"
    empty.mkdir()
    for i in range(5):
        (empty / f"{i}.png").write_bytes(b"junk")
    res = CliRunner().invoke(cli, _train(tiny_config, empty, tmp_path / "o4", sources))
    assert res.exit_code == 2 and "no image could be read for SEARLE's teacher pass" in res.output, res.output


def test_phrase_whose_placeholder_is_cut_off_is_left_out(backbone, tmp_path):
    """A phrase longer than the text context whose concept comes late keeps no '$': it cannot carry the
    pseudo-word and is left out of the step (the official code would replace another token)."""
    concepts_csv, release = write_sources(tmp_path)
    trainable = searle_train.SearleTrainable(backbone, {"concepts": concepts_csv, "phrases": release})
    names = CONCEPTS
    long = " ".join(["word"] * 100) + " dog"
    phrases = {**phrases_for(names), "dog": [long]}
    usable = oti.usable_concepts(phrases)
    nearest = torch.tensor([[0, 0], [0, 0]])  # both images: "dog" only
    trainable.teacher = searle_train.Teacher(["a", "b"], torch.randn(2, backbone.embed_dim),
                                             torch.randn(2, token_width(backbone)), nearest, names, usable)
    trainable.phrases = phrases
    loss, logs = trainable.training_step(collate([{"pixels": torch.empty(0), "caption": "", "extra": {}, "key": k}
                                                  for k in ("a", "b")]))
    assert logs["gpt"] == 0.0 and torch.isfinite(loss)


def test_torchrun_ranks_share_the_teacher(tmp_path, tiny_config, monkeypatch):
    """Two ranks encode half the images each, gather them, optimise their share of the OTI batches and train;
    a one-process run afterwards finds the whole teacher in the cache."""
    import os
    import subprocess
    import sys

    sources = write_sources(tmp_path)
    make_corpus(tmp_path / "c", n=12)
    folder = tmp_path / "c" / "img"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CIRBENCH_LOAD_PLUGINS": "", "CIRBENCH_CACHE": str(tmp_path / "cache")}
    args = _train(tiny_config, folder, tmp_path / "two", sources, "--max-steps", "2", "--device", "cpu")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "cirbench", *args], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["teacher"]["images"] == 12 and config["step"] == 2
    assert len(list((tmp_path / "cache" / "oti").glob("*/batch-*.safetensors"))) == 3
    monkeypatch.setenv("CIRBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(oti, "invert_batch", lambda *a, **k: pytest.fail("the teacher was optimised again"))
    res = CliRunner().invoke(cli, _train(tiny_config, folder, tmp_path / "one", sources, "--max-steps", "2"))
    assert res.exit_code == 0, res.output


def test_a_resumed_run_trains_what_an_uninterrupted_one_does(tmp_path, tiny_config, monkeypatch):
    """The phrase draws come from the random state the checkpoint saves: 2 steps, then 2 more on resume, give
    the weights of 4 steps in one go (dropout on)."""
    monkeypatch.setenv("CIRBENCH_CACHE", str(tmp_path / "cache"))
    sources = write_sources(tmp_path)
    make_corpus(tmp_path / "c", n=12)
    folder = tmp_path / "c" / "img"
    for out, steps in (("whole", "4"), ("parts", "2"), ("parts", "4")):
        res = CliRunner().invoke(cli, _train(tiny_config, folder, tmp_path / out, sources, "--max-steps", steps,
                                             "--lr", "1e-2"))
        assert res.exit_code == 0, res.output
    whole = load_file(str(tmp_path / "whole" / "model.safetensors"))
    parts = load_file(str(tmp_path / "parts" / "model.safetensors"))
    assert all(torch.equal(whole[k], parts[k]) for k in whole)
    log = [e for e in map(json.loads, (tmp_path / "parts" / "train_log.jsonl").read_text().splitlines()) if "loss" in e]
    assert [e["step"] for e in log] == [2, 4] and all(e["gpt"] > 0 for e in log)


def test_a_torn_features_cache_is_made_again(tmp_path, tiny_config, monkeypatch):
    monkeypatch.setenv("CIRBENCH_CACHE", str(tmp_path / "cache"))
    sources = write_sources(tmp_path)
    make_corpus(tmp_path / "c", n=8)
    folder = tmp_path / "c" / "img"
    res = CliRunner().invoke(cli, _train(tiny_config, folder, tmp_path / "a", sources, "--max-steps", "1"))
    assert res.exit_code == 0, res.output
    (features,) = [p for p in (tmp_path / "cache" / "searle-teacher").glob("*.safetensors")
                   if not p.name.startswith(".lock-")]
    whole = load_file(str(features))["features"].clone()  # not a view of the file cut short below
    features.write_bytes(features.read_bytes()[:100])  # cut short
    res = CliRunner().invoke(cli, _train(tiny_config, folder, tmp_path / "b", sources, "--max-steps", "1"))
    assert res.exit_code == 0, res.output
    assert torch.equal(load_file(str(features))["features"], whole)


def test_train_on_webdataset_shards(tmp_path, tiny_config, monkeypatch):
    """Shards without any caption: the teacher reads their images once, the steps only their keys."""
    import io
    import tarfile

    monkeypatch.setenv("CIRBENCH_CACHE", str(tmp_path / "cache"))
    sources = write_sources(tmp_path)
    make_corpus(tmp_path / "c", n=10)
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(10):
            data = (tmp_path / "c" / "img" / f"{i}.png").read_bytes()
            info = tarfile.TarInfo(f"{i:04d}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    res = CliRunner().invoke(cli, _train(tiny_config, str(tmp_path / "shard-{000..000}.tar"), tmp_path / "out",
                                         sources, "--max-steps", "3"))
    assert res.exit_code == 0, res.output
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["teacher"]["images"] == 10 and config["step"] == 3
    corpus = open_corpus(str(tmp_path / "shard-{000..000}.tar"), images=False, captions=False)
    assert [s["key"] for s in corpus] == [f"{shard}#{i:04d}" for i in range(10)]
