"""The shared training loop through TAT: corpora, what changes, checkpoints, resume, torchrun DDP."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import tarfile
import types
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import record_training
from PIL import Image
from safetensors.torch import load_file

from cirbench import training
from cirbench.backbones import load_backbone
from cirbench.cli import cli
from cirbench.corpora import collate, open_corpus
from cirbench.errors import CirbenchError
from cirbench.preprocess import Preprocessor

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
REPO = Path(__file__).resolve().parent.parent


def make_corpus(root: Path, n: int = 32, bad: bool = False) -> Path:
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        name = list(COLOURS)[i % 4]
        Image.new("RGB", (24 + i % 5, 20), COLOURS[name]).save(root / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "caption": f"a {name} square", "subject": "square", "attribute": name})
    if bad:
        rows.append({"image": "img/missing.png", "caption": "gone", "subject": "", "attribute": ""})
        (root / "img" / "corrupt.png").write_bytes(b"\x89PNG broken")
        rows.append({"image": "img/corrupt.png", "caption": "corrupt", "subject": "", "attribute": ""})
        rows.append({"image": "img/0.png", "caption": "   ", "subject": "", "attribute": ""})
    with open(root / "pairs.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "caption", "subject", "attribute"])
        writer.writeheader()
        writer.writerows(rows)
    return root / "pairs.csv"


def make_shard(path: Path, corpus_root: Path) -> Path:
    """A webdataset shard of the images and captions of a corpus made by :func:`make_corpus`."""
    import io

    with open(corpus_root / "pairs.csv", newline="") as fh, tarfile.open(path, "w") as tar:
        for i, row in enumerate(csv.DictReader(fh)):
            for ext, data in (("png", (corpus_root / row["image"]).read_bytes()), ("txt", row["caption"].encode())):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_corpus_images_over_the_pixel_limit_are_skipped_before_decoding(tmp_path, monkeypatch):
    """LAION-sized corpora hold a few enormous images: their declared size is checked from the header, as
    evaluation does, so no decoder allocates them."""
    import dataclasses

    from cirbench import images

    decoded = []
    real, real_open_pil = images.tensor_decoder(), images.open_pil
    monkeypatch.setattr(images, "tensor_decoder", lambda: dataclasses.replace(
        real, jpeg=lambda data, device: decoded.append("jpeg") or real.jpeg(data, device)))
    monkeypatch.setattr(images, "open_pil", lambda *a: decoded.append("pil") or real_open_pil(*a))
    for name, size in [("big.png", (40, 30)), ("big.jpg", (40, 30)), ("small.png", (8, 8)), ("small.jpg", (8, 8))]:
        Image.new("RGB", size, COLOURS["blue"]).save(tmp_path / name)
    (tmp_path / "pairs.csv").write_text("image,caption\nbig.png,a\nbig.jpg,b\nsmall.png,c\nsmall.jpg,d\n")
    corpus = open_corpus(tmp_path / "pairs.csv", Preprocessor("clip", size=8, max_pixels=1000))
    assert corpus[0] is None and corpus[1] is None
    assert corpus[2]["caption"] == "c" and corpus[3]["caption"] == "d"
    assert decoded == ["pil", "jpeg"]  # the small images only, the JPEG through the tensor decoder


def test_batches_are_pinned_by_the_loaders_pinning_thread(tmp_path, monkeypatch):
    """On a GPU the training loaders pin their batches (torch's pinning calls ``Batch.pin_memory``; without it a
    Batch would pass unpinned and each copy to the GPU would be synchronous). Pinning is faked: no GPU here."""
    from torch.utils.data._utils.pin_memory import pin_memory

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a, **k: pinned.append(t) or t.clone())
    corpus = open_corpus(make_corpus(tmp_path / "c", n=4), Preprocessor("clip", size=32))
    batch = collate([corpus[i] for i in range(len(corpus))])
    out = pin_memory(batch)
    assert isinstance(out, type(batch)) and len(pinned) == 1 and pinned[0] is batch.pixels
    assert torch.equal(out.pixels, batch.pixels) and out.captions == batch.captions and out.keys == batch.keys
    cfg = training.TrainConfig(output=tmp_path, workers=0)
    for source in (corpus, open_corpus(_shards(tmp_path / "s", [4, 4]), Preprocessor("clip", size=32))):
        map_style = hasattr(source, "__len__")
        assert training._loader(source, map_style, 2, cfg, 0, 1, 0, 0, torch.device("cuda")).pin_memory
        assert not training._loader(source, map_style, 2, cfg, 0, 1, 0, 0, torch.device("cpu")).pin_memory


def test_corpus_readers_count_bad_samples(tmp_path, monkeypatch):
    from cirbench.preprocess import RandomResizedCrop

    pre = Preprocessor("clip", size=32)
    csv_path = make_corpus(tmp_path / "c", n=4, bad=True)
    corpus = open_corpus(csv_path, pre)
    batch = collate([corpus[i] for i in range(len(corpus))])
    assert len(batch) == 4 and batch.skipped == 3
    # the same through the training augmentation, and an image PIL opens but will not resample (a mode it
    # cannot resize) is skipped as well
    corpus.preprocessor = RandomResizedCrop(pre)
    assert collate([corpus[i] for i in range(len(corpus))]).skipped == 3
    real = RandomResizedCrop.__call__

    def refuse_green(self, image, key):
        if image.getpixel((0, 0))[:3] == COLOURS["green"]:
            raise ValueError("image has wrong mode")
        return real(self, image, key)

    monkeypatch.setattr(RandomResizedCrop, "__call__", refuse_green)
    refused = collate([corpus[i] for i in range(len(corpus))])
    assert refused.skipped == 4 and "a green square" not in refused.captions
    monkeypatch.undo()
    assert batch.extra["attribute"] == ["red", "green", "blue", "yellow"]
    folder = tmp_path / "f"
    folder.mkdir()
    for i, name in enumerate(["red", "blue"]):
        Image.new("RGB", (20, 20), COLOURS[name]).save(folder / f"{i}.jpg")
        (folder / f"{i}.txt").write_text(f"a {name} thing")
    Image.new("RGB", (20, 20)).save(folder / "nocaption.jpg")
    corpus = open_corpus(folder, pre)
    batch = collate([corpus[i] for i in range(len(corpus))])
    assert batch.captions == ["a red thing", "a blue thing"] and batch.skipped == 1
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, name in enumerate(["red", "green", "blue"]):
            for ext, data in (("png", (tmp_path / "c" / "img" / f"{i}.png").read_bytes()), ("txt", name.encode())):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                import io

                tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("0003.jpg")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"junk"))
    samples = list(open_corpus(str(tmp_path / "shard-{000..000}.tar"), pre))
    assert [s["caption"] for s in samples if s] == ["red", "green", "blue"] and samples.count(None) == 1
    with pytest.raises(CirbenchError, match="is empty"):
        empty = tmp_path / "empty.csv"
        empty.write_text("image,caption\n")
        open_corpus(empty, pre)


def test_shard_captions_come_from_txt_else_the_json_caption(tmp_path):
    """img2dataset writes each sample's caption as .txt and in its .json; a shard with the .json alone is read from
    its "caption" (bytes decoded as UTF-8); a .json without one, or one that is not JSON, is a sample without a
    caption (dropped, as an empty caption is), never an error."""
    import io
    import json

    pre = Preprocessor("clip", size=16)
    image = io.BytesIO()
    Image.new("RGB", (20, 20), COLOURS["red"]).save(image, format="PNG")
    members = [("0000", {"png": image.getvalue(), "txt": b"from the txt", "json": b'{"caption": "no"}'}),
               ("0001", {"png": image.getvalue(), "json": json.dumps({"caption": "caf\u00e9 au lait"}).encode()}),
               ("0002", {"png": image.getvalue(), "json": b'{"url": "http://x"}'}),
               ("0003", {"png": image.getvalue(), "json": b"not json"})]
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        for key, files in members:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    samples = list(open_corpus(str(tmp_path / "shard-000.tar"), pre))
    assert [s["caption"] if s else None for s in samples] == ["from the txt", "café au lait", None, None]


def test_tsv_corpora_and_shard_globs(tmp_path, monkeypatch):
    """A ``.tsv`` corpus is tab-separated (its captions keep their commas, as in CC3M's); a glob of shards is read
    in name order, whatever order the file system lists them in."""
    import glob as globmod

    from cirbench.corpora import _shard_urls

    pre = Preprocessor("clip", size=8)
    Image.new("RGB", (12, 12), COLOURS["red"]).save(tmp_path / "a.png")
    (tmp_path / "pairs.tsv").write_text("filepath\ttitle\na.png\ta red, round thing\n")  # open_clip's columns
    sample = open_corpus(tmp_path / "pairs.tsv", pre)[0]
    assert sample is not None and sample["caption"] == "a red, round thing"
    names = [str(tmp_path / f"s-{i}.tar") for i in (2, 0, 1)]
    for name in names:
        Path(name).write_bytes(b"")
    monkeypatch.setattr(globmod, "glob", lambda pattern: list(names))  # the file system's own order
    assert _shard_urls(str(tmp_path / "s-*.tar")) == sorted(names)


def _train_args(tiny_config, corpus, out, *extra):
    return ["train", "--method", "slerp-tat", "--corpus", str(corpus), "--output", str(out), "--backbone",
            str(tiny_config), "--pretrained", "none", "--batch-size", "8", "--workers", "0", "--quiet",
            "--lora-rank", "4", "--lr", "1e-2", "--schedule", "constant", *extra]


def official_cosine_lr(base_lr, warmup_length, steps):
    """Pic2Word's third_party/open_clip/scheduler.py cosine_lr (called with each step's index before the step)."""
    def _lr_adjuster(step):
        if step < warmup_length:
            return base_lr * (step + 1) / warmup_length
        e = step - warmup_length
        es = steps - warmup_length
        return 0.5 * (1 + math.cos(math.pi * e / es)) * base_lr
    return _lr_adjuster


def official_fti4cir_lrs(lr, lr_decay, lr_div, epochs, steps_per_epoch):
    """FTI4CIR src/train.py: at the start of epoch ``lr_decay`` every group's lr is multiplied by ``lr_div``."""
    lrs = []
    for epoch in range(epochs):
        if epoch == lr_decay:
            lr *= lr_div
        lrs += [lr] * steps_per_epoch
    return lrs


def test_learning_rate_schedules_are_the_official_ones(tmp_path, tiny_config):
    """Each step's learning rate, as the run logs it and gives it to the optimizer: Pic2Word's warm-up and cosine
    (from its scheduler, over the run's steps), FTI4CIR's tenfold drop at epoch 10, and a constant rate."""
    cosine = official_cosine_lr(1e-2, 3, 8)
    cfg = training.TrainConfig(output=tmp_path, lr=1e-2, warmup_steps=3, schedule="cosine")
    assert [1e-2 * training._lr_factor(cfg, s, 0, 8) for s in range(8)] == pytest.approx([cosine(s) for s in range(8)])
    cfg = training.TrainConfig(output=tmp_path, lr=4e-5, schedule="step", step_epochs=(10,), step_gamma=0.1)
    steps = [(epoch, epoch * 2 + i) for epoch in range(13) for i in range(2)]
    assert [4e-5 * training._lr_factor(cfg, s, e, 26) for e, s in steps] == \
        pytest.approx(official_fti4cir_lrs(4e-5, 10, 0.1, 13, 2))
    cfg = training.TrainConfig(output=tmp_path, lr=1e-4, schedule="constant")
    assert {training._lr_factor(cfg, s, s // 3, 9) for s in range(9)} == {1.0}
    # PLI's per-epoch warm-up: torch's LinearLR from 0.01 over 5 epochs, stepped once an epoch, then constant
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1e-6)
    linear = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=5)
    official = []
    for _epoch in range(8):
        official.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        linear.step()
    cfg = training.TrainConfig(output=tmp_path, lr=1e-6, schedule="constant", warmup_epochs=5, warmup_start=0.01)
    assert [1e-6 * training._lr_factor(cfg, 3 * e + 1, e, 24) for e in range(8)] == pytest.approx(official)

    # the loop: the rate it logs for each step is the one the optimizer stepped with
    seen = []
    real_step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    corpus = make_corpus(tmp_path / "c")
    args = [a if a != "constant" else "cosine" for a in _train_args(tiny_config, corpus, tmp_path / "o", "--max-steps",
                                                                     "8", "--warmup-steps", "3", "--log-every", "1")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.AdamW, "step", spy)
        res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    logged = [e["lr"] for e in map(json.loads, (tmp_path / "o" / "train_log.jsonl").read_text().splitlines())
              if "lr" in e]
    assert logged == pytest.approx([cosine(s) for s in range(8)]) and seen == pytest.approx(logged)


def test_weight_decay_falls_on_matrices_and_never_on_biases_or_norms(tmp_path):
    """The default parameter groups (as open_clip's and the official trainers' ``exclude``): decay on weight
    matrices; biases, LayerNorm gains and other vectors in a group of their own without it."""

    class Net(training.TrainableMethod):
        def __init__(self):
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))

        def named_trainable_parameters(self):
            return list(self.net.named_parameters())

    net = Net()
    names = {id(p): n for n, p in net.named_trainable_parameters()}
    optimizer = training.build_optimizer(net, training.TrainConfig(output=tmp_path, weight_decay=0.2))
    groups = {g["weight_decay"]: sorted(names[id(p)] for p in g["params"]) for g in optimizer.param_groups}
    assert groups == {0.2: ["0.weight", "2.weight"], 0.0: ["0.bias", "1.bias", "1.weight", "2.bias"]}


def test_tat_changes_only_lora_and_round_trips(tmp_path, tiny_config):
    corpus = make_corpus(tmp_path / "c", bad=True)
    res = CliRunner().invoke(cli, _train_args(tiny_config, corpus, tmp_path / "tat", "--max-steps", "6",
                                              "--max-grad-norm", "5"))
    assert res.exit_code == 0, res.output
    out = tmp_path / "tat"
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "slerp-tat" and config["step"] == 6 and config["skipped_samples"] >= 3
    assert config["train"]["max_grad_norm"] == 5
    env = config["environment"]  # which versions and machine trained these weights
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["world_size"] == 1 and "git" in env
    assert env["method_plugin_source"] == {"kind": "built-in"}
    assert config["backbone"]["weights"] == {"kind": "random-init", "seed": 0}
    lora = load_file(str(out / "model.safetensors"))
    assert lora and all("lora_" in k for k in lora)
    assert any(float(v.abs().sum()) > 0 for k, v in lora.items() if "lora_B" in k)  # B starts at zero: it moved
    assert config["trainable_parameters"] < 0.5 * config["image_tower_parameters"]

    from cirbench.methods.slerp.tat import load_tat_image_encoder

    base = load_backbone(str(tiny_config), "none", device="cpu")
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    visual, info = load_tat_image_encoder(base, out)
    after = base.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # text tower and base image weights untouched
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(visual(x), base.model.visual(x))
    assert len(info["sha256"]) == 64


def test_tat_lora_options_reach_every_adapter(tiny_config):
    """--lora-rank/--lora-alpha/--lora-dropout set every injected adapter (peft scales by alpha / rank); the
    plugin's defaults are the paper's rank 16, alpha 16, dropout 0.1."""
    from peft.tuners.lora import LoraLayer

    from cirbench.methods.slerp.tat import TATTrainable
    from cirbench.plugins import get_registry

    bb = load_backbone(str(tiny_config), "none", device="cpu")
    defaults = {o.name: o.default for o in get_registry().method("slerp-tat").train_options}
    for given, (rank, scaling, dropout) in [({}, (16, 1.0, 0.1)),
                                            ({"lora_rank": 4, "lora_alpha": 8.0, "lora_dropout": 0.25},
                                             (4, 2.0, 0.25))]:
        visual = TATTrainable(bb, {**defaults, **given}).visual
        layers = [m for m in visual.modules() if isinstance(m, LoraLayer)]
        assert layers
        for m in layers:
            assert (m.r["default"], m.scaling["default"], m.lora_dropout["default"].p) == (rank, scaling, dropout)


def test_training_leaves_frozen_weights_bit_identical(tmp_path, tiny_config):
    from cirbench.methods.slerp.tat import TATTrainable
    from cirbench.training import TrainConfig, train

    corpus = make_corpus(tmp_path / "c")
    bb = load_backbone(str(tiny_config), "none", device="cpu")
    frozen = {k: v.clone() for k, v in bb.model.state_dict().items()}
    trainable = TATTrainable(bb, {"lora_rank": 4, "lora_alpha": 4, "lora_dropout": 0.0,
                                  "lora_targets": "mlp.c_fc,mlp.c_proj", "temperature": 0.05})
    base_visual = {k: v.clone() for k, v in trainable.visual.state_dict().items() if "lora_" not in k}
    losses = []
    orig = trainable.training_step

    def spy(batch):
        loss, logs = orig(batch)
        losses.append(float(loss.detach()))
        return loss, logs

    trainable.training_step = spy
    train(trainable, corpus, TrainConfig(output=tmp_path / "o", max_steps=12, batch_size=16, lr=5e-3,
                                         schedule="constant", workers=0, progress=False))
    assert all(torch.equal(frozen[k], v) for k, v in bb.model.state_dict().items())
    assert all(torch.equal(base_visual[k], v) for k, v in trainable.visual.state_dict().items() if "lora_" not in k)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # the loss goes down


@pytest.mark.parametrize("stop", [3, 4])  # 4: the last step of an epoch (32 pairs, 8 a step)
def test_resume_continues_where_it_stopped(tmp_path, tiny_config, stop):
    corpus = make_corpus(tmp_path / "c")
    runner = CliRunner()
    straight = _train_args(tiny_config, corpus, tmp_path / "straight", "--max-steps", "6", "--lora-dropout", "0.1")
    assert runner.invoke(cli, straight).exit_code == 0
    first = _train_args(tiny_config, corpus, tmp_path / "resumed", "--max-steps", str(stop), "--lora-dropout", "0.1")
    assert runner.invoke(cli, first).exit_code == 0
    latest = tmp_path / "resumed" / "checkpoint-latest"
    assert {p.name for p in latest.iterdir()} >= {"train_state.safetensors", "train_state.json"}
    assert not list(latest.glob("*.pt"))  # nothing pickled: resuming can never run code
    second = _train_args(tiny_config, corpus, tmp_path / "resumed", "--max-steps", "6", "--lora-dropout", "0.1",
                         "--log-every", "1")
    res = runner.invoke(cli, second)
    assert res.exit_code == 0, res.output
    assert "resuming from" in res.output and f"at step {stop}" in res.output  # not a restart from step 0
    lines = (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()
    log = [e for e in map(json.loads, lines) if "loss" in e]
    assert [e["step"] for e in log] == list(range(stop, 7))  # the second run did steps stop+1..6 only
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert json.loads((tmp_path / "resumed" / "config.json").read_text())["step"] == 6


@pytest.fixture
def terminal_ctrl_c():
    """Ctrl-C as a terminal's foreground job has it, even when the suite itself runs in the background (the shell
    then starts it with SIGINT ignored, which the training loop respects)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_ctrl_c_finishes_the_step_saves_and_the_same_command_resumes(tmp_path, tiny_config, monkeypatch,
                                                                     terminal_ctrl_c):
    corpus = make_corpus(tmp_path / "c")
    runner = CliRunner()
    straight = _train_args(tiny_config, corpus, tmp_path / "straight", "--max-steps", "6")
    assert runner.invoke(cli, straight).exit_code == 0
    real_step, calls = training._optimizer_step, []

    def step_then_ctrl_c(*args, **kwargs):
        out = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # arrives while step 3 is still being counted
        return out

    monkeypatch.setattr(training, "_optimizer_step", step_then_ctrl_c)
    args = _train_args(tiny_config, corpus, tmp_path / "cut", "--max-steps", "6")
    res = runner.invoke(cli, args)
    assert res.exit_code == 130 and "interrupted at step 3: saved" in res.output, res.output
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    monkeypatch.setattr(training, "_optimizer_step", real_step)
    res = runner.invoke(cli, args)
    assert res.exit_code == 0 and "at step 3" in res.output, res.output
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # as if never interrupted
    # started with Ctrl-C ignored (nohup, a script's background job): a Ctrl-C changes nothing
    monkeypatch.setattr(training, "_optimizer_step", step_then_ctrl_c)
    calls.clear()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    res = runner.invoke(cli, _train_args(tiny_config, corpus, tmp_path / "background", "--max-steps", "6"))
    assert res.exit_code == 0 and len(calls) == 6 and "interrupted" not in res.output, res.output
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_a_diverging_loss_stops_in_one_line_and_keeps_the_last_checkpoint(tmp_path, tiny_config, monkeypatch):
    """A loss that turns NaN or infinite stops training before its gradients touch the weights: one line naming
    the method and suggesting a lower --lr, exit 2, and the checkpoint of the last good step as it was."""
    from cirbench.methods.slerp.tat import TATTrainable

    corpus = make_corpus(tmp_path / "c")
    out = tmp_path / "run"
    runner = CliRunner()
    assert runner.invoke(cli, _train_args(tiny_config, corpus, out, "--max-steps", "2")).exit_code == 0
    before = {p.name: p.read_bytes() for p in (out / "checkpoint-latest").iterdir()}
    real_step = TATTrainable.training_step
    for bad in (float("nan"), float("inf")):
        def diverges(self, batch, _bad=bad):
            loss, logs = real_step(self, batch)
            return loss * _bad, logs

        monkeypatch.setattr(TATTrainable, "training_step", diverges)
        res = runner.invoke(cli, _train_args(tiny_config, corpus, out, "--max-steps", "4", "--save-every", "1"))
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
        assert res.output.strip().splitlines()[0] == (
            f"error: the slerp-tat loss became {bad}: training diverged (lower --lr?)"), res.output
        assert {p.name: p.read_bytes() for p in (out / "checkpoint-latest").iterdir()} == before


def test_a_save_cut_short_keeps_the_previous_checkpoint_whole(tmp_path, tiny_config, monkeypatch):
    """checkpoint-latest is written into a new folder and renamed into place: stopped half-way (here, between its
    weights and its optimizer state), the previous step's checkpoint stays, whole; stopped between the two
    renames, the next run puts the previous one back."""
    corpus = make_corpus(tmp_path / "c")
    out = tmp_path / "run"
    runner = CliRunner()
    assert runner.invoke(cli, _train_args(tiny_config, corpus, out, "--max-steps", "2")).exit_code == 0
    latest = out / "checkpoint-latest"
    before = {p.name: p.read_bytes() for p in latest.iterdir()}

    def cut(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_train_state", cut)
    res = runner.invoke(cli, _train_args(tiny_config, corpus, out, "--max-steps", "4", "--save-every", "1"))
    assert res.exit_code == 130
    assert {p.name: p.read_bytes() for p in latest.iterdir()} == before  # step 2's files, all of them
    monkeypatch.undo()
    latest.rename(out / "checkpoint-latest.previous")  # as if stopped between the two renames
    (out / "checkpoint-latest.partial-0123abcd").mkdir()
    res = runner.invoke(cli, _train_args(tiny_config, corpus, out, "--max-steps", "4"))
    assert res.exit_code == 0 and "at step 2" in res.output, res.output
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-latest"]


def test_weights_carry_their_own_record_so_a_cut_final_save_is_harmless(tmp_path, tiny_config):
    """The final model.safetensors + config.json pair is written file by file: cut between the two, the folder
    holds new weights beside the previous save's config.json. The weights' own record wins, with a warning;
    weights written before they carried a record still load from config.json."""
    from safetensors.torch import save_file

    from cirbench.checkpoints import load_checkpoint

    corpus = make_corpus(tmp_path / "c")
    out = tmp_path / "run"
    runner = CliRunner()
    assert runner.invoke(cli, _train_args(tiny_config, corpus, out, "--max-steps", "2")).exit_code == 0
    old_config = (out / "config.json").read_bytes()
    assert runner.invoke(cli, _train_args(tiny_config, corpus, out, "--max-steps", "3")).exit_code == 0
    (out / "config.json").write_bytes(old_config)  # as if stopped after the weights' rename
    with pytest.warns(UserWarning, match="config.json is not the record of these weights") as said:
        tensors, config = load_checkpoint(out, "slerp-tat")
    assert len(said) == 1 and config["step"] == 3 and config["train"]["max_steps"] == 3
    save_file(tensors, str(out / "model.safetensors"), metadata={"method": "slerp-tat"})  # an older cirbench's
    _, config = load_checkpoint(out, "slerp-tat")
    assert config["step"] == 2  # no record in the weights: config.json is all there is


def test_fp16_training_scales_its_loss_and_a_resume_keeps_the_scale(tmp_path, tiny_config):
    """fp16 autocast runs under a GradScaler (small gradients survive fp16; a step whose gradients overflow is
    skipped and the scale lowered); checkpoint-latest keeps the scale, so a resumed run continues exactly. fp16
    needs CUDA from the command line: here the backbone is switched to fp16 autocast on the CPU."""
    from cirbench.methods.pic2word.model import Pic2WordTrainable
    from cirbench.training import TrainConfig, train

    corpus = make_corpus(tmp_path / "c")

    def run(out, steps):
        backbone = load_backbone(str(tiny_config), "none", device="cpu", seed=0, training=True)
        backbone.precision = "fp16"
        trainable = Pic2WordTrainable(backbone, {"middle_dim": 16, "dropout": 0.0, "augment": "none"})
        train(trainable, corpus, TrainConfig(output=tmp_path / out, max_steps=steps, batch_size=8, lr=1e-3,
                                             schedule="constant", workers=0, progress=False, precision="fp16"))
        state = json.loads((tmp_path / out / "checkpoint-latest" / "train_state.json").read_text())
        return load_file(str(tmp_path / out / "model.safetensors")), state["grad_scaler"]

    straight, scale = run("straight", 5)
    assert scale is not None and scale["scale"] <= 65536.0  # torch's initial scale, lowered after an overflow
    run("resumed", 2)
    resumed, resumed_scale = run("resumed", 5)
    assert resumed_scale == scale
    assert all(torch.allclose(straight[k], resumed[k], atol=1e-6) for k in straight)


def test_resume_refuses_other_settings_and_allows_a_longer_run(tmp_path, tiny_config):
    corpus = make_corpus(tmp_path / "c")
    out = tmp_path / "run"
    runner = CliRunner()
    assert runner.invoke(cli, _train_args(tiny_config, corpus, out, "--max-steps", "2")).exit_code == 0
    before = (out / "model.safetensors").read_bytes()
    # what decides the samples of a step or the update it makes: refused, naming the saved and the asked values
    for extra, said in [(("--lr", "2e-2"), "--lr 0.01; this run asks --lr 0.02: pass the same to resume it, "
                                           "--no-resume to start over, or another --output"),
                        (("--batch-size", "16"), "--batch-size 8; this run asks --batch-size 16"),
                        (("--lora-rank", "8"), "--lora-rank 4; this run asks --lora-rank 8"),
                        # random weights are made from the seed: the backbone differs, and the hint says so
                        (("--seed", "3"), "(random-init, seed 0), this run uses cirbench-tiny-test / none "
                                          "(random-init, seed 3): pass --backbone cirbench-tiny-test --pretrained "
                                          "none --seed 0")]:
        # a later value of an option given twice counts (_train_args gives --lr and --batch-size)
        res = runner.invoke(cli, _train_args(tiny_config, corpus, out, "--max-steps", "4", *extra))
        assert res.exit_code == 2 and said in res.output and "Traceback" not in res.output, res.output
    smaller = make_corpus(tmp_path / "c2", n=24)
    res = runner.invoke(cli, _train_args(tiny_config, smaller, out, "--max-steps", "4"))
    assert res.exit_code == 2 and "a corpus of 32 samples; this run asks a corpus of 24 samples" in res.output
    assert (out / "model.safetensors").read_bytes() == before  # the refused runs wrote nothing
    # the length and how the run is carried out may change
    res = runner.invoke(cli, _train_args(tiny_config, corpus, out, "--max-steps", "3", "--log-every", "1"))
    assert res.exit_code == 0 and "at step 2" in res.output, res.output
    config = json.loads((out / "config.json").read_text())
    assert config["step"] == 3 and config["corpus"] == {"source": str(corpus.resolve()), "samples": 32}


def test_a_pickled_training_state_is_never_loaded(tmp_path, tiny_config):
    corpus = make_corpus(tmp_path / "c")
    runner = CliRunner()
    assert runner.invoke(cli, _train_args(tiny_config, corpus, tmp_path / "o", "--max-steps", "2")).exit_code == 0
    latest = tmp_path / "o" / "checkpoint-latest"
    for name in ("train_state.safetensors", "train_state.json"):
        (latest / name).unlink()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"optimizer": Evil()}, latest / "train_state.pt")
    res = runner.invoke(cli, _train_args(tiny_config, corpus, tmp_path / "o", "--max-steps", "4"))
    assert res.exit_code == 2 and "not read" in res.output and "--no-resume" in res.output
    assert not marker.exists()
    state = json.loads((tmp_path / "o" / "config.json").read_text())
    assert state["step"] == 2


def test_a_damaged_training_state_is_a_one_line_error_and_the_checkpoint_stays(tmp_path, tiny_config):
    """Resuming from a training state that is missing, unreadable, not an object, torn between two saves, or made
    for other parameters says so in one line (with --no-resume as the way out) and changes nothing."""
    corpus = make_corpus(tmp_path / "c")
    runner = CliRunner()
    out = tmp_path / "o"
    assert runner.invoke(cli, _train_args(tiny_config, corpus, out, "--max-steps", "2")).exit_code == 0
    latest = out / "checkpoint-latest"
    meta, blob = (latest / "train_state.json").read_bytes(), (latest / "train_state.safetensors").read_bytes()
    weights = (out / "model.safetensors").read_bytes()
    other_params = json.loads(meta)
    other_params["optimizer"]["param_groups"][0]["params"] = other_params["optimizer"]["param_groups"][0][
        "params"][:-1]
    short_rng = json.loads(meta)  # the shape of a state, Python's generator cut short (a hand edit, a damaged disk)
    short_rng["rng"][0]["python"][1] = short_rng["rng"][0]["python"][1][:10]
    no_group = json.loads(meta)
    no_group["optimizer"]["param_groups"][0] = "lr"
    no_step = json.loads(meta)
    no_step["position"]["step"] = "2"
    cases = [({"train_state.json": None, "train_state.safetensors": None}, "has no train_state.json: cannot resume"),
             ({"train_state.json": json.dumps(short_rng).encode()}, "does not fit this run (state vector is the wrong "
                                                                    "size)"),
             ({"train_state.json": json.dumps(no_group).encode()},
              "is malformed (train_state.json: field 'optimizer.param_groups.0': Input should be an object)"),
             ({"train_state.json": json.dumps(no_step).encode()},
              "is malformed (train_state.json: field 'position.step': Input should be a valid integer)"),
             ({"train_state.safetensors": None}, "is unreadable"),
             ({"train_state.json": b"{torn"}, "is unreadable"),
             ({"train_state.json": b"[1, 2]"}, "is unreadable"),
             ({"train_state.safetensors": blob[:-8] + b"00000000"}, "is inconsistent"),
             ({"train_state.json": json.dumps(other_params).encode()}, "does not fit this run")]
    for files, said in cases:
        for name, data in files.items():
            if data is None:
                (latest / name).unlink()
            else:
                (latest / name).write_bytes(data)
        res = runner.invoke(cli, _train_args(tiny_config, corpus, out, "--max-steps", "4"))
        assert res.exit_code == 2 and said in res.output and "--no-resume" in res.output, (said, res.output)
        assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output, res.output
        assert (out / "model.safetensors").read_bytes() == weights
        (latest / "train_state.json").write_bytes(meta)
        (latest / "train_state.safetensors").write_bytes(blob)
    res = runner.invoke(cli, _train_args(tiny_config, corpus, out, "--max-steps", "4"))
    assert res.exit_code == 0 and json.loads((out / "config.json").read_text())["step"] == 4, res.output


def test_json_files_of_a_run_that_hold_no_object_are_passed_over(tmp_path):
    """A training log line, a best/validation.json or an output's config.json that parses as JSON but is no object
    (a hand edit, another tool's file) is treated as unreadable: dropped, ignored, never an internal error."""
    from cirbench.training import TrainLog, check_not_resumable_elsewhere

    lines = ['{"step": 1, "loss": 2.0}', "[1, 2]", "3", '{"step": 2, "loss": 1.5}', '{"step": 3, "loss": 1.0}',
             '{"step": "2", "loss": 1.2}', '{"loss": 1.1}']  # and no step of a number
    damaged = b'{"step": 2, "lo\xf2ss": 1.4}'  # a byte flipped on disk: not UTF-8 (UnicodeDecodeError before)
    (tmp_path / "train_log.jsonl").write_bytes("\n".join(lines).encode() + b"\n" + damaged + b"\n")
    log = TrainLog(tmp_path, resumed_step=2, enabled=True)
    assert log.kept == [lines[0], lines[3]]
    from cirbench.plots import _log_entries, _validation_series

    assert [e["step"] for e in _log_entries(tmp_path / "train_log.jsonl")] == [1, 2, 3]
    assert _validation_series([{"step": 1, "validation": ["cirr:val"]}, {"step": 2, "validation": {"cirr:val": {
        "run": {"R@1": "high"}}}}, {"step": 3, "validation": {"cirr:val": {"run": {"R@1": 20.5}}}}]) == {
        "cirr:val R@1": [(3, 20.5)]}  # the report's plot reads the numbers and passes over the rest
    log.write({"step": 3, "loss": 0.9})
    assert [json.loads(line)["step"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3]
    for content in ("[1]", '"searle"', "null"):
        (tmp_path / "config.json").write_text(content)
        check_not_resumable_elsewhere(tmp_path, "pic2word")  # nothing says whose it is: not refused
    from types import SimpleNamespace

    (tmp_path / "best").mkdir()
    trainer = SimpleNamespace(output=tmp_path, cfg=SimpleNamespace(validate="cirr:val"), state=SimpleNamespace(step=9))
    for content, best in (('{"validate": "cirr:val", "step": 4, "value": 31.5}', 31.5), ("[31.5]", None)):
        (tmp_path / "best" / "validation.json").write_text(content)
        assert training._Trainer._best_so_far(trainer) == best


def test_torchrun_two_processes_match_one(tmp_path, tiny_config):
    """The same global batch of 8, as 1 process, as 2 ranks of 4, and as 2 ranks of 2 micro-batches of 2: the
    contrastive loss sees all 8 samples each time, so the weights trained are the same."""
    corpus = make_corpus(tmp_path / "c")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CIRBENCH_LOAD_PLUGINS": ""}
    common = ["-m", "cirbench", *_train_args(tiny_config, corpus, "OUT", "--max-steps", "3", "--lora-dropout", "0",
                                             "--device", "cpu")]
    outs = {}
    for n, accum in ((1, 1), (2, 1), (2, 2)):
        out = tmp_path / f"n{n}-accum{accum}"
        args = [a if a != "OUT" else str(out) for a in common] + ["--accum-steps", str(accum)]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[n, accum] = load_file(str(out / "model.safetensors"))
    for run in ((2, 1), (2, 2)):
        assert all(torch.allclose(outs[1, 1][k], outs[run][k], atol=1e-5) for k in outs[1, 1]), run
    assert any(float(v.abs().sum()) > 0 for k, v in outs[2, 1].items() if "lora_B" in k)


def test_accumulated_micro_batches_train_what_the_whole_batch_trains(tmp_path, tiny_config):
    """--accum-steps 4 (micro-batches of 2) against one batch of 8: the same losses and weights (the contrastive loss
    compares the 8 samples either way: over micro-batches of 2 alone its value would be far lower)."""
    corpus = make_corpus(tmp_path / "c")
    runner = CliRunner()
    weights, logs = {}, {}
    for accum in (1, 4):
        out = tmp_path / f"accum{accum}"
        args = [a for a in _train_args(tiny_config, corpus, out, "--max-steps", "3", "--lora-dropout", "0",
                                       "--accum-steps", str(accum), "--log-every", "1") if a != "--quiet"]
        res = runner.invoke(cli, args)
        assert res.exit_code == 0, res.output
        assert ("3 steps of 8 (in 4 micro-batches of 2)," in res.output) == (accum == 4)
        weights[accum] = load_file(str(out / "model.safetensors"))
        logs[accum] = [e["loss"] for e in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())
                       if "loss" in e]
    assert len(logs[1]) == 3 and logs[1] == pytest.approx(logs[4], rel=1e-4)
    assert all(torch.allclose(weights[1][k], weights[4][k], atol=1e-5) for k in weights[1])


def _torchrun(tiny_config, corpus, out, *extra, script=None):
    """``torchrun --nproc-per-node=2`` of ``cirbench train`` (or of ``script``, which runs the CLI itself)."""
    args = [*(["-m", "cirbench"] if script is None else [str(script)]),
            *_train_args(tiny_config, corpus, out, "--lora-dropout", "0", "--device", "cpu", *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CIRBENCH_LOAD_PLUGINS": ""}
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args], env


RANK_1_CTRL_C = """
import os, signal, sys
from cirbench import training
from cirbench.cli import main

real_step, calls = training._optimizer_step, []

def step_then_ctrl_c(*args, **kwargs):
    out = real_step(*args, **kwargs)
    calls.append(1)
    if len(calls) == 2 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGINT)  # rank 1 alone, after step 2's all-reduce
    return out

training._optimizer_step = step_then_ctrl_c
sys.exit(main())
"""


def test_ctrl_c_under_torchrun_stops_every_rank_after_one_step_and_resumes(tmp_path, tiny_config):
    """Only rank 1 is interrupted, after step 2 has been agreed: rank 0 learns it through step 3's all-reduce,
    both save step 3's state together, and the same command resumes as if never stopped."""
    corpus = make_corpus(tmp_path / "c")
    straight = _train_args(tiny_config, corpus, tmp_path / "straight", "--max-steps", "5", "--lora-dropout", "0",
                           "--device", "cpu")
    assert CliRunner().invoke(cli, straight).exit_code == 0
    script = tmp_path / "rank1_ctrl_c.py"
    script.write_text(RANK_1_CTRL_C)
    out = tmp_path / "cut"
    cmd, env = _torchrun(tiny_config, corpus, out, "--max-steps", "5", script=script)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode != 0, proc.stderr[-3000:]
    said = proc.stdout + proc.stderr
    assert said.count("interrupted at step 3: saved") == 1, said[-3000:]  # said once, by rank 0
    assert json.loads((out / "checkpoint-latest" / "config.json").read_text())["step"] == 3
    cmd, env = _torchrun(tiny_config, corpus, out, "--max-steps", "5")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0 and "at step 3" in proc.stderr + proc.stdout, proc.stderr[-3000:]
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(out / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)  # as if never interrupted


def test_ctrl_c_to_torchrun_saves_and_stops_every_rank(tmp_path, tiny_config):
    """The real signal path: torchrun forwards SIGINT to each worker's process group (readers included) and
    kills what is left 30 s later; the workers agree on a step, save it whole and stop within that time."""
    import time

    corpus = make_corpus(tmp_path / "c")
    out = tmp_path / "run"
    cmd, env = _torchrun(tiny_config, corpus, out, "--max-steps", "100000", "--log-every", "1",
                         "--workers", "1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        log = out / "train_log.jsonl"
        deadline = time.monotonic() + 240
        while not (log.is_file() and log.read_text().count("\n") >= 2) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0
    said = [line for line in (stdout + stderr).splitlines() if "interrupted at step" in line]
    assert len(said) == 1 and "saved" in said[0], (stdout + stderr)[-3000:]
    step = int(said[0].split("interrupted at step ")[1].split(":")[0])
    assert "forcefully exiting" not in stderr  # stopped by itself, not killed
    saved = json.loads((out / "checkpoint-latest" / "config.json").read_text())
    assert saved["step"] == step >= 2
    assert (out / "checkpoint-latest" / "train_state.safetensors").is_file()


def test_slerp_tat_runs_and_caches_under_its_own_identity(tmp_path, tiny_config, toy_root):
    from helpers import registered
    from toy_plugin import ToyPlugin

    corpus = make_corpus(tmp_path / "c")
    runner = CliRunner()
    assert runner.invoke(cli, _train_args(tiny_config, corpus, tmp_path / "tat", "--max-steps", "2")).exit_code == 0
    common = ["--dataset", "toy", "--split", "val", "--backbone", str(tiny_config), "--pretrained", "none",
              "--data-root", str(toy_root), "--output", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "cache"),
              "--workers", "0", "--quiet", "--no-leaderboard"]
    with registered(ToyPlugin(), "toy"):
        assert runner.invoke(cli, ["run", "--method", "slerp", *common]).exit_code == 0
        res = runner.invoke(cli, ["run", "--method", "slerp-tat", "--checkpoint", str(tmp_path / "tat"), *common])
        assert res.exit_code == 0, res.output
        rec = json.loads(next((tmp_path / "r" / "toy" / "val").glob("slerp-tat@alpha=*__*.json")).read_text())
        assert rec["cache"]["misses"] == 12  # never the base encoder's cached features
        assert rec["method"]["info"]["checkpoint"]["sha256"]
        # a checkpoint for another backbone is one line, exit 2
        other = ["--backbone", str(tiny_config), "--pretrained", "none", "--seed", "5"]
        res = runner.invoke(cli, ["run", "--method", "slerp-tat", "--checkpoint", str(tmp_path / "tat"),
                                  *common[:4], *other, *common[8:]])
        assert res.exit_code == 2 and "was trained on" in res.output and "Traceback" not in res.output
        res = runner.invoke(cli, ["run", "--method", "slerp-tat", *common])
        assert res.exit_code == 2 and "needs --checkpoint" in res.output


@pytest.mark.parametrize("extra, message", [
    (["--lr", "nan"], "'nan' is not a finite number"),
    (["--weight-decay", "inf"], "'inf' is not a finite number"),
    (["--lora-rank", "99999999999999999999"], "above its maximum 1024"),
    (["--lora-targets", "nothing.here"], "'nothing.here' matches no module of the image tower; the adaptable "
                                         "modules of a block are: attn, mlp.c_fc, mlp.c_proj"),
    (["--lora-targets", "ln_1"], "ln_1 is a LayerNorm, which LoRA does not adapt here"),
    (["--lora-targets", "attn.out_proj"], "attn.out_proj sits inside a MultiheadAttention"),
])
def test_bad_training_values_are_one_line_errors(tmp_path, tiny_config, extra, message):
    """Each used to end in an internal error (a ValueError of torch or peft, an overflow), or for attn.out_proj in
    a failed backward: the fused attention call never reads the adapter, so nothing had a gradient."""
    corpus = make_corpus(tmp_path / "c")
    res = CliRunner().invoke(cli, _train_args(tiny_config, corpus, tmp_path / "o", "--max-steps", "1", *extra))
    assert res.exit_code == 2 and message in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "o").exists()


def test_bad_training_input(tmp_path, tiny_config):
    empty = tmp_path / "empty.csv"
    empty.write_text("image,caption\n")
    res = CliRunner().invoke(cli, _train_args(tiny_config, empty, tmp_path / "o", "--max-steps", "1"))
    assert res.exit_code == 2 and "is empty" in res.output
    res = CliRunner().invoke(cli, _train_args(tiny_config, tmp_path / "nope.csv", tmp_path / "o"))
    assert res.exit_code == 2 and "does not exist" in res.output
    res = CliRunner().invoke(cli, ["train", "--method", "slerp", "--corpus", str(empty), "--output", str(tmp_path)])
    assert res.exit_code == 2 and "needs no training" in res.output
    unusable = make_corpus(tmp_path / "bad", n=0, bad=True)  # three rows, none of them usable
    res = CliRunner().invoke(cli, _train_args(tiny_config, unusable, tmp_path / "never", "--max-steps", "1",
                                              "--batch-size", "2"))
    assert res.exit_code == 2 and "yielded no usable batch" in res.output, res.output
    assert not (tmp_path / "never").exists()  # a run that fails before its first step leaves nothing
    # a shard that is no tar file: named with its reason (not webdataset's warning), skipped, recorded
    (tmp_path / "bad-000.tar").write_bytes(bytes(range(256)) * 20)
    res = CliRunner().invoke(cli, _train_args(tiny_config, tmp_path / "bad-{000..000}.tar", tmp_path / "never",
                                              "--max-steps", "1", "--batch-size", "2"))
    assert res.exit_code == 2 and f"unreadable shard {tmp_path / 'bad-000.tar'}: ReadError" in res.output, res.output
    assert "UserWarning" not in res.output
    shard = make_shard(tmp_path / "good-000.tar", make_corpus(tmp_path / "g", n=4).parent)
    res = CliRunner().invoke(cli, _train_args(tiny_config, f"{tmp_path}/{{bad,good}}-000.tar", tmp_path / "mixed",
                                              "--max-steps", "5", "--batch-size", "2"))  # three epochs
    assert res.exit_code == 0, res.output
    assert res.output.count(f"corpus shard {tmp_path / 'bad-000.tar'} is unreadable") == 1  # once, not per epoch
    recorded = json.loads((tmp_path / "mixed" / "config.json").read_text())["unreadable_shards"]
    assert list(recorded) == [str(tmp_path / "bad-000.tar")] and shard.is_file()
    # a bad decoder setting is one line from the main process, not an error caught in a reader process
    from cirbench import images

    images.tensor_decoder.cache_clear()
    try:
        res = CliRunner(env={"CIRBENCH_IMAGE_DECODER": "torchcodc"}).invoke(
            cli, _train_args(tiny_config, shard, tmp_path / "never", "--max-steps", "1", "--workers", "2"))
    finally:
        images.tensor_decoder.cache_clear()
    assert res.exit_code == 2 and "unknown image decoder (CIRBENCH_IMAGE_DECODER) 'torchcodc'" in res.output, res.output
    # a missing, malformed or empty corpus is found before the backbone is loaded (or downloaded: offline here,
    # that would fail first), for image and language-only methods
    no_caption = tmp_path / "no_caption.csv"
    no_caption.write_text("image,label\na.jpg,x\n")
    empty_folder = tmp_path / "empty_folder"
    empty_folder.mkdir()
    cases = [("pic2word", tmp_path / "nope.csv", "does not exist"),
             ("pic2word", tmp_path / "shards-{000..003}.tar", "does not exist"),
             ("pic2word", no_caption, "needs a caption column"), ("lincir", no_caption, "a caption column"),
             ("pic2word", empty, "is empty"), ("lincir", empty_folder, "is empty")]
    for method, corpus, message in cases:
        res = CliRunner().invoke(cli, ["train", "--method", method, "--corpus", str(corpus), "--output",
                                       str(tmp_path / "o"), "--backbone", "ViT-B-32", "--pretrained", "openai"])
        assert res.exit_code == 2 and message in res.output and "download" not in res.output, res.output


class _CtrlCInReader(torch.utils.data.Dataset):
    """Eight samples; reading the third sends Ctrl-C to the reader process itself, as a terminal's Ctrl-C (sent
    to the whole process group) reaches every reader."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        if i == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return {"pixels": torch.full((1,), float(i)), "caption": str(i), "extra": {}, "key": str(i)}


def test_readers_leave_ctrl_c_to_the_main_process(tmp_path, terminal_ctrl_c):
    """The main process finishes its step and saves after Ctrl-C; the readers must go on reading meanwhile,
    not die with the signal (which the loader would report as a crashed worker)."""
    cfg = training.TrainConfig(output=tmp_path, workers=1, seed=0)
    loader = training._loader(_CtrlCInReader(), True, 2, cfg, 0, 1, 0, 0, torch.device("cpu"))
    seen = sorted(c for batch in loader for c in batch.captions)
    assert seen == [str(i) for i in range(8)]
    # the same readers without the guard: the signal ends the reader, and the loader fails (how depends on
    # when: "worker exited unexpectedly", or a tensor it sent that can no longer be fetched: an OSError, or an
    # EOFError when the reader's socket closed before the main process asked for the shared memory)
    loader.worker_init_fn = None
    with pytest.raises((RuntimeError, OSError, EOFError)):
        list(loader)


def test_validation_during_training_logs_metrics_and_changes_nothing(tmp_path, tiny_config, toy_root, monkeypatch):
    """--validate evaluates the weights of the step through the method's --checkpoint (every --validate-every
    steps and at the end), with the training's own backbone in fp32 (no second copy is loaded), scoring what
    `cirbench run` scores; the training's random draws (LoRA dropout here) go on as without it."""
    from cirbench import evaluate
    from cirbench.cache_inventory import feature_entries
    from cirbench.checkpoints import checkpoint_sha256
    from cirbench.testing import ToyDatasetPlugin, registered

    def second_copy(*_args, **_kwargs):
        raise AssertionError("validation loaded a second backbone")

    corpus = make_corpus(tmp_path / "c", n=16)
    with registered(ToyDatasetPlugin(), "toy"):
        res = CliRunner().invoke(cli, _train_args(tiny_config, corpus, tmp_path / "plain", "--max-steps", "4",
                                                  "--lora-dropout", "0.5"))
        assert res.exit_code == 0, res.output
        validating = _train_args(tiny_config, corpus, tmp_path / "val", "--max-steps", "4", "--lora-dropout", "0.5",
                                 "--validate", "toy:val", "--validate-data-root", str(toy_root), "--validate-every",
                                 "3")
        shared_cache = Path(os.environ["CIRBENCH_CACHE"]) / "features"
        before = sorted(shared_cache.glob("*")) if shared_cache.is_dir() else []
        with monkeypatch.context() as patched:
            patched.setattr(evaluate, "load_backbone", second_copy)
            res = CliRunner().invoke(cli, [a for a in validating if a != "--quiet"])
        assert res.exit_code == 0, res.output
        assert "validate on toy:val every 3 steps" in res.output
        # the features validation encodes stay with the run, the last validation's alone (TAT adapts the gallery)
        assert (sorted(shared_cache.glob("*")) if shared_cache.is_dir() else []) == before
        final = checkpoint_sha256(tmp_path / "val")
        kept = feature_entries(tmp_path / "val" / "validation" / "cache")
        assert kept and all(e.key["feature"]["tat_lora_sha256"] == final for e in kept)
        for args, message in ((["--validate", "nosuch"], "unknown dataset 'nosuch'"),
                              (["--validate", "toy:train"], "--validate toy:train: unknown split of toy 'train'"),
                              (["--validate", "toy:test"], "are hidden"),
                              (["--validate", "toy", "--validate-data-root", str(tmp_path / "nowhere")],
                               "--validate toy: annotation file")):
            res = CliRunner().invoke(cli, _train_args(tiny_config, corpus, tmp_path / "bad", *args))
            assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "bad").exists()
    plain = load_file(str(tmp_path / "plain" / "model.safetensors"))
    validated = load_file(str(tmp_path / "val" / "model.safetensors"))
    assert plain.keys() == validated.keys() and all(torch.equal(plain[k], validated[k]) for k in plain)
    log = [json.loads(line) for line in (tmp_path / "val" / "train_log.jsonl").read_text().splitlines()]
    checks = [entry for entry in log if "validation" in entry]
    assert [e["step"] for e in checks] == [3, 4]
    (benchmark,) = checks[0]["validation"]
    (label,) = checks[0]["validation"][benchmark]  # the method's sweep label follows (slerp-tat@step3@alpha=0.8)
    assert benchmark == "toy:val" and label.startswith("slerp-tat@step3") and "R@1" in checks[0]["validation"][
        benchmark][label]
    results = sorted(p.name for p in (tmp_path / "val" / "validation" / "toy" / "val").glob("*.json"))
    assert len(results) == 2 and any("step3" in r for r in results) and any("step4" in r for r in results)
    # the best-scoring weights (toy's main metric, R@1) are kept apart, with the step and score they had
    best = json.loads((tmp_path / "val" / "best" / "validation.json").read_text())
    scores = {e["step"]: next(iter(e["validation"]["toy:val"].values()))["R@1"] for e in checks}
    assert best["metric"] == "R@1" and best["value"] == max(scores.values())
    assert best["step"] == min(step for step, score in scores.items() if score == best["value"])
    with registered(ToyDatasetPlugin(), "toy"):  # evaluated again, the kept weights score what was recorded
        res = CliRunner().invoke(cli, ["run", "--method", "slerp-tat", "--checkpoint", str(tmp_path / "val" / "best"),
                                       "--dataset", "toy", "--data-root", str(toy_root), "--backbone", str(tiny_config),
                                       "--pretrained", "none", "--output", str(tmp_path / "again"), "--workers", "0",
                                       "--quiet", "--bootstrap", "0"])
    assert res.exit_code == 0, res.output
    (again,) = (tmp_path / "again" / "toy" / "val").glob("*.json")
    assert json.loads(again.read_text())["metrics"]["R@1"] == pytest.approx(best["value"], abs=1e-4)
    # a run started over (--no-resume) does not compete with the weights of the run it replaces
    with registered(ToyDatasetPlugin(), "toy"):
        res = CliRunner().invoke(cli, [*validating[:-2], "--validate-every", "1", "--max-steps", "1", "--no-resume"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "val" / "best" / "validation.json").read_text())["step"] == 1


def test_validation_on_several_benchmarks(tmp_path, tiny_config):
    """--validate toy:val,toy2:val with a --validate-data-root NAME=DIR each: every validation evaluates both (a
    result file each, both in the log); the best weights follow the first benchmark's main metric. Roots that do
    not say which benchmark is theirs, or a root without --validate, are one-line errors before training."""
    from cirbench.hookspecs import hookimpl
    from cirbench.testing import ToyDataset, ToyDatasetPlugin, registered, write_toy_dataset
    from cirbench.types import DatasetSpec

    class Toy2:
        @hookimpl
        def register_datasets(self, register):
            register(DatasetSpec(name="toy2", description="the toy data again", factory=ToyDataset, splits=("val",),
                                 main_metric="mAP@5"))

    first, second = write_toy_dataset(tmp_path / "a"), write_toy_dataset(tmp_path / "b")
    corpus = make_corpus(tmp_path / "c", n=16)

    def train(out, *args):
        with registered(ToyDatasetPlugin(), "toy") as reg:
            reg.register_plugin(Toy2(), name="toy2")
            return CliRunner().invoke(cli, _train_args(tiny_config, corpus, out, "--max-steps", "2", *args))

    roots = ["--validate-data-root", f"toy={first}", "--validate-data-root", f"toy2={second}"]
    res = train(tmp_path / "o", "--validate", "toy:val,toy2:val", *roots, "--validate-every", "1")
    assert res.exit_code == 0, res.output
    log = [json.loads(line) for line in (tmp_path / "o" / "train_log.jsonl").read_text().splitlines()]
    checks = [e for e in log if "validation" in e]
    assert [e["step"] for e in checks] == [1, 2] and all(set(e["validation"]) == {"toy:val", "toy2:val"}
                                                         for e in checks)
    for name in ("toy", "toy2"):
        assert len(list((tmp_path / "o" / "validation" / name / "val").glob("*.json"))) == 2
    best = json.loads((tmp_path / "o" / "best" / "validation.json").read_text())
    assert best["validate"] == "toy:val,toy2:val" and best["metric"] == "R@1"
    from cirbench.plots import read_validation  # what `cirbench report` plots beside the loss: each main metric

    with registered(ToyDatasetPlugin(), "toy") as reg:
        reg.register_plugin(Toy2(), name="toy2")
        curves = read_validation(tmp_path / "o" / "train_log.jsonl")
    assert {name: [s for s, _ in points] for name, points in curves.items()} == {"toy:val R@1": [1, 2],
                                                                                 "toy2:val mAP@5": [1, 2]}

    for args, message in ((["--validate", "toy:val,toy2:val", "--validate-data-root", str(first)],
                           "give each its folder as --validate-data-root NAME=DIR"),
                          (["--validate", "toy:val,toy2:val", "--validate-data-root", f"toy={first}"],
                           "--validate toy2:val: "),
                          (["--validate-data-root", str(first)], "give --validate too")):
        res = train(tmp_path / "bad", *args)
        assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "bad").exists()



SKIP_TOGETHER = """
import json, sys, types
import torch
from cirbench import distributed as d, training

d.init_from_env("cpu")

class Recorder(training.NetTrainable):
    name = "recorder"
    needs_images = False

    def __init__(self):
        backbone = types.SimpleNamespace(precision="fp32", device=torch.device("cpu"), identity=lambda: {})
        super().__init__(backbone, {})
        self.net = torch.nn.Linear(1, 1)
        self.steps = []

    def training_step(self, batch):
        self.steps.append(batch.captions)
        return self.net(torch.ones(len(batch), 1)).pow(2).mean(), {}

t = Recorder()
training.train(t, sys.argv[1], training.TrainConfig(output=sys.argv[2], max_steps=7, batch_size=2, workers=0,
                                                     progress=False, precision="fp32", device="cpu", seed=0))
print(json.dumps({"rank": d.rank(), "steps": t.steps}))
d.shutdown()
"""


def test_a_csv_corpus_is_reshuffled_each_epoch_and_steps_are_the_same_on_any_ranks():
    """The EpochSampler: a new permutation each epoch (seeded by --seed and the epoch), dealt to ranks so that step s
    is the same set of samples on 1, 2 or 4 ranks, and a resume part-way through an epoch goes on in place."""
    def steps(world, per_rank, epoch):
        shares = []
        for rank in range(world):
            sampler = training.EpochSampler(48, 3, rank, world, per_rank)
            sampler.set_position(epoch, 0)
            shares.append(list(sampler))
        return [sorted(x for share in shares for x in share[s * per_rank : (s + 1) * per_rank])
                for s in range(48 // (world * per_rank))]

    first, second = steps(1, 8, 0), steps(1, 8, 1)
    assert sorted(x for step in first for x in step) == list(range(48)) == sorted(x for step in second for x in step)
    assert first != second  # another order in the next epoch
    assert steps(2, 4, 1) == steps(4, 2, 1) == second
    sampler = training.EpochSampler(48, 3, 0, 1, 8)
    sampler.set_position(1, 0)
    whole = list(sampler)
    sampler.set_position(1, 16)
    assert list(sampler) == whole[16:] and len(sampler) == 32


def test_torchrun_ranks_skip_an_empty_batch_together(tmp_path):
    """One sample a rank, one blank caption in the corpus: the rank that draws it has an empty batch, and every rank
    skips that place in the epoch, so each step pairs the ranks' batches of one place (before, the other rank
    went on alone and the ranks' batches drifted apart by one place from then on)."""
    from test_distributed_encode import _torchrun_script

    rows = ["caption"] + [f"c{i}" if i != 5 else " " for i in range(16)]
    (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n")
    script = tmp_path / "skip.py"
    script.write_text(SKIP_TOGETHER)
    _, ranks = _torchrun_script(script, str(tmp_path / "captions.csv"), str(tmp_path / "out"),
                                env={"CIRBENCH_LOAD_PLUGINS": ""})
    # where each rank's samples sit in its share of the epoch (the EpochSampler's order, 1 a rank)
    share = {r: [f"c{i}" for i in training.EpochSampler(16, 0, r, 2, 1)._mine()] for r in (0, 1)}
    blank = next(r for r in (0, 1) if "c5" in share[r])
    assert "c5" in share[blank] and share[blank].index("c5") < 7  # the blank falls inside the 7 steps
    places = {r: [share[r].index(step[0]) for step in ranks[r]["steps"]] for r in (0, 1)}
    assert len(places[0]) == len(places[1]) == 7 and places[0] == places[1]
    assert share[blank].index("c5") not in places[0]


def _shards(tmp_path: Path, sizes: list[int]) -> str:
    """Shards ``shard-000.tar``... of ``sizes`` samples each; their brace spec."""
    for i, n in enumerate(sizes):
        make_shard(tmp_path / f"shard-{i:03d}.tar", make_corpus(tmp_path / f"part{i}", n=n).parent)
    return str(tmp_path / f"shard-{{000..{len(sizes) - 1:03d}}}.tar")


def test_shards_are_shuffled_each_epoch_and_a_resumed_epoch_goes_on_in_place(tmp_path):
    """Training reads shards as open_clip does (shard order and a sample buffer shuffled per epoch), and a run
    resumed after an odd number of batches with two readers meets the rest of the epoch in the same order."""
    spec = _shards(tmp_path, [5, 5, 5, 5])
    corpus = open_corpus(spec, images=False, captions=False)
    in_order = [s["key"] for s in corpus]
    assert len(in_order) == 20 and in_order == sorted(in_order)  # outside training: read in order
    cfg = training.TrainConfig(output=tmp_path, workers=2, seed=0)

    def keys(epoch, epoch_step=0, seed=0):
        cfg.seed = seed
        loader = training._loader(corpus, False, 2, cfg, 0, 1, epoch, epoch_step, torch.device("cpu"))
        return [k for batch in loader for k in batch.keys]

    first = keys(0)
    assert sorted(first) == in_order and first != in_order  # every sample once, shuffled
    assert keys(0) == first and keys(1) != first and keys(0, seed=1) != first  # named by seed and epoch
    assert sorted(keys(1)) == in_order
    for done in (1, 3, 4):  # batches trained on before the stop (odd: the readers' turns are rotated)
        assert keys(0, done) == first[2 * done:], done


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")  # three readers on two cores
def test_a_resumed_epoch_goes_on_where_each_reader_was_after_one_ran_out(tmp_path, tiny_config):
    """Three readers of uneven shards: the short ones run out first, and the long one then gives every batch. A
    resume after that meets the rest of the epoch in the order it would have met it, because the checkpoint counts
    the batches each reader gave and whose turn came next (the turns used to be assumed to go round all readers,
    so the long reader passed over too few of its samples and repeated some)."""
    spec = _shards(tmp_path, [10, 2, 4])
    corpus = open_corpus(spec, images=False, captions=False)
    cfg = training.TrainConfig(output=tmp_path, workers=3, seed=0)

    def batches(stop=0, counts=None, turn=None):
        loader = training._loader(corpus, False, 2, cfg, 0, 1, 0, stop, torch.device("cpu"), counts, turn)
        return [(b.reader, b.keys) for b in loader]

    whole = batches()
    assert sorted(len([r for r, _ in whole if r == reader]) for reader in range(3)) == [1, 2, 5]
    old_way_differs = False
    for stop in range(1, len(whole)):
        counts = [0, 0, 0]
        for reader, _ in whole[:stop]:  # an epoch's first loader: reader r reads part r
            counts[reader] += 1
        rest = [k for _, keys in whole[stop:] for k in keys]
        turn = (whole[stop - 1][0] + 1) % 3
        assert [k for _, keys in batches(stop, counts, turn) for k in keys] == rest, stop
        old_way_differs |= [k for _, keys in batches(stop) for k in keys] != rest
    assert old_way_differs  # the turns-go-round guess goes wrong once a reader ran out
    # what a checkpoint keeps: for each rank, a count a reader and the reader whose turn is next
    res = CliRunner().invoke(cli, _train_args(tiny_config, spec, tmp_path / "o", "--max-steps", "3", "--batch-size",
                                              "2", "--workers", "3"))
    assert res.exit_code == 0, res.output
    position = json.loads((tmp_path / "o" / "checkpoint-latest" / "train_state.json").read_text())["position"]
    (counts,), (turn,) = position["reader_batches"], position["next_reader"]
    assert len(counts) == 3 and sum(counts) == 3 and turn in range(3)


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_a_shard_run_resumed_after_a_reader_ran_out_trains_the_same_weights(tmp_path, tiny_config, monkeypatch):
    """The whole chain (counts saved, read back, handed to the readers): stopped after step 6, once two of the three
    readers ran out, and resumed, a run meets the same samples at the same steps and ends with the same weights."""
    spec = _shards(tmp_path, [10, 2, 4])

    def train(out, steps):
        epochs, output = _record_epochs(monkeypatch, _train_args(tiny_config, spec, out, "--max-steps", str(steps),
                                                                 "--batch-size", "2", "--workers", "3",
                                                                 "--lora-dropout", "0.1"))
        assert output.startswith("exit 0:"), output
        return [step for epoch in epochs for step in epoch]

    straight = train(tmp_path / "straight", 8)
    resumed = train(tmp_path / "resumed", 6) + train(tmp_path / "resumed", 8)
    assert resumed == straight and len(straight) == 8
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.filterwarnings("ignore:This DataLoader will create 2 worker processes")
def test_a_shard_run_resumed_with_other_micro_batches_reads_each_sample_once(tmp_path, tiny_config, monkeypatch):
    """Resumed on a smaller machine with --accum-steps 2, the readers' batches are half as large: the batches each
    reader gave are counted again in the new size, so the rest of the epoch is each sample not yet met, once."""
    spec = _shards(tmp_path, [8, 8])

    def train(steps, accum):
        epochs, output = _record_epochs(monkeypatch, _train_args(tiny_config, spec, tmp_path / "o", "--max-steps",
                                                                 str(steps), "--batch-size", "4", "--workers", "2",
                                                                 "--accum-steps", str(accum)))
        assert output.startswith("exit 0:"), output
        return [key for epoch in epochs for step in epoch for key in step]

    keys = train(2, 1) + train(4, 2)
    assert len(keys) == 16 and len(set(keys)) == 16


def test_shard_readers_drop_their_last_partial_batch(tmp_path, tiny_config, monkeypatch):
    """As open_clip batches shards for training (partial=False), each reader's short last batch is dropped, so that
    every step is a whole --batch-size; a corpus left with no whole batch says why."""
    spec = _shards(tmp_path, [5, 4])
    epochs, output = _record_epochs(monkeypatch, _train_args(tiny_config, spec, tmp_path / "r", "--max-steps",
                                                                       "8", "--batch-size", "2", "--workers", "2"))
    assert [[len(step) for step in steps] for steps in epochs] == [[2] * 4] * 2, output  # the 5th sample's batch: out
    res = CliRunner().invoke(cli, _train_args(tiny_config, spec, tmp_path / "o", "--max-steps", "1", "--batch-size",
                                              "6", "--workers", "2"))
    assert res.exit_code == 2 and "no usable batch (0 samples skipped; each of the 2 reader(s) of a rank drops its " \
        "last batch short of 6 samples" in res.output, res.output


def test_a_checkpoint_that_read_shards_in_order_is_resumed_with_a_warning(tmp_path, tiny_config):
    """The checkpoint records how its shards were read; one from a version that read them in order resumes
    (its weights are good) but says that the rest of its epoch is read another way."""
    spec = _shards(tmp_path, [8, 8])
    out = tmp_path / "run"
    res = CliRunner().invoke(cli, _train_args(tiny_config, spec, out, "--max-steps", "1"))
    assert res.exit_code == 0, res.output
    config = out / "checkpoint-latest" / "config.json"
    saved = json.loads(config.read_text())
    assert saved["corpus"]["read"] == training.SHARD_READING
    res = CliRunner().invoke(cli, _train_args(tiny_config, spec, out, "--max-steps", "2"))
    assert res.exit_code == 0 and "resuming" in res.output and "warning" not in res.output, res.output
    from cirbench.checkpoints import save_checkpoint

    saved = json.loads(config.read_text())
    del saved["corpus"]["read"]  # as an earlier version wrote it (weights and config.json agreeing)
    save_checkpoint(config.parent, load_file(str(config.parent / "model.safetensors")), saved)
    res = CliRunner().invoke(cli, _train_args(tiny_config, spec, out, "--max-steps", "3"))
    assert res.exit_code == 0 and "read its shards in order, this version reads them shuffled per epoch" in res.output


def test_too_few_shards_for_the_ranks_is_refused(tmp_path):
    """Each rank reads whole shards: one shard for two ranks would leave a rank with nothing to read."""
    spec = _shards(tmp_path, [4])
    language_only = types.SimpleNamespace(needs_images=False, needs_captions=True,
                                          caption_columns=training.CAPTION_COLUMNS, required_columns=(),
                                          image_columns=())
    cfg = training.TrainConfig(output=tmp_path, batch_size=2, max_steps=1)
    assert training._setup(language_only, spec, cfg, 1)[1].total_steps == 1
    with pytest.raises(CirbenchError, match=r"has 1 shard\(s\) for 2 ranks: .* at least 2"):
        training._setup(language_only, spec, cfg, 2)


UNEVEN_EPOCHS = f"""
import json, os, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from helpers import record_training
from cirbench.cli import main

events = []
record_training(events)
try:
    sys.exit(main())
finally:
    with open(os.environ["EVENTS"] + os.environ["RANK"], "w") as fh:
        json.dump(events, fh)
"""


def test_torchrun_ranks_with_uneven_shards_end_each_epoch_together(tmp_path, tiny_config):
    """Two ranks, three shards of 12, 4 and 4 samples: one rank has more batches per epoch than the other. The
    epoch ends for both when the shorter one runs out, so that every step's global batch is one place of one
    epoch (as the checkpoint's position says), and no rank starts its next epoch while the other is in the last."""
    spec = _shards(tmp_path, [12, 4, 4])
    script = tmp_path / "record.py"
    script.write_text(UNEVEN_EPOCHS)
    cmd, env = _torchrun(tiny_config, spec, tmp_path / "out", "--max-steps", "5", script=script)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**env, "EVENTS": str(tmp_path / "events")}, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"events{r}").read_text()) for r in (0, 1)]
    shape = [[kind if kind == "step" else value for kind, value in events] for events in ranks]
    assert shape[0] == shape[1], shape  # the same epochs, begun at the same steps
    epochs = [v for v in shape[0] if v != "step"]
    assert epochs == list(range(len(epochs))) and len(epochs) >= 2 and shape[0].count("step") == 5
    for events in ranks:  # per step 4 samples of each rank; within an epoch no sample twice
        seen: list[str] = []
        for kind, value in events:
            seen = [] if kind == "epoch" else seen + value
            assert kind == "epoch" or len(value) == 4
            assert len(seen) == len(set(seen))


def test_shard_sizes_are_read_as_open_clip_reads_them(tmp_path):
    """``sizes.json`` (shard name -> samples, numbers or strings of them) or ``__len__`` beside the shards gives
    an epoch's length; a file that cannot say it is a one-line error, not a guess."""
    from cirbench.corpora import shard_sizes

    spec = _shards(tmp_path, [3, 2])
    urls = [str(tmp_path / "shard-000.tar"), str(tmp_path / "shard-001.tar")]
    assert open_corpus(spec, images=False).num_samples is None and shard_sizes(urls) is None
    (tmp_path / "__len__").write_text("5\n")
    assert shard_sizes(urls) == 5
    (tmp_path / "sizes.json").write_text(json.dumps({"shard-000.tar": 3, "shard-001.tar": "2", "other.tar": 9}))
    assert shard_sizes(urls) == 5 and shard_sizes(urls[:1]) == 3  # sizes.json first; only the shards named
    assert open_corpus(spec, images=False).num_samples == 5
    assert shard_sizes(["https://host/data/shard-000.tar"]) is None  # nothing to read beside remote shards
    for text, message in [('{"shard-000.tar": 3}', "no size for shard-001.tar (1 of 2 shards missing)"),
                          ('{"shard-000.tar": 3, "shard-001.tar": -2}', "-2 is not a sample count"),
                          ('{"shard-000.tar": 3, "shard-001.tar": null}', "None is not a sample count"),
                          ("[3, 2]", "not an object"), ("{3: 2", "sizes.json")]:
        (tmp_path / "sizes.json").write_text(text)
        with pytest.raises(CirbenchError, match=re.escape(message)):
            shard_sizes(urls)
    (tmp_path / "sizes.json").unlink()
    (tmp_path / "__len__").write_text("import os")
    with pytest.raises(CirbenchError, match="__len__"):
        shard_sizes(urls)


def test_a_folder_of_shards_is_read_as_shards(tmp_path):
    """A folder that holds .tar shards alone is a shard corpus (with its sizes.json); one with images of its own
    stays a folder of images and captions."""
    from cirbench.corpora import PairsCorpus, ShardCorpus

    folder = tmp_path / "shards"
    folder.mkdir()
    _shards(tmp_path, [3, 2])
    for shard in tmp_path.glob("*.tar"):
        shard.rename(folder / shard.name)
    (folder / "sizes.json").write_text(json.dumps({"shard-000.tar": 3, "shard-001.tar": 2}))
    for mode in ({}, {"images": False}, {"captions": False}):
        corpus = open_corpus(folder, **mode)
        assert isinstance(corpus, ShardCorpus) and corpus.num_samples == 5, mode
        assert [Path(u).name for u in corpus.urls] == ["shard-000.tar", "shard-001.tar"]
    assert len(list(open_corpus(folder, images=False, captions=False))) == 5
    Image.new("RGB", (8, 8)).save(folder / "extra.png")
    assert isinstance(open_corpus(folder, captions=False), PairsCorpus)


def _record_epochs(monkeypatch, args) -> tuple[list[list[int]], str]:
    """Run ``cirbench train args`` in this process; the keys of the samples of each step, grouped by epoch, and
    ``exit CODE: OUTPUT``."""
    events: list[list] = []
    with monkeypatch.context() as patch:  # the loop as it was after each run, however many a test makes
        record_training(events, patch.setattr)
        res = CliRunner().invoke(cli, args)
    epochs: dict[int, list] = {}
    current = None
    for kind, value in events:
        if kind == "epoch":
            current = value
            epochs.setdefault(current, [])
        else:
            epochs[current].append(value)
    return [epochs[e] for e in sorted(epochs)], f"exit {res.exit_code}: {res.output}"


def test_shards_of_a_stated_size_train_for_epochs(tmp_path, tiny_config, monkeypatch):
    """With the shards' size known (sizes.json, or --train-num-samples as in open_clip) --epochs works on shards:
    an epoch is that many samples (a smaller count cuts each epoch short, each epoch reshuffled), or one pass when
    the shards turn out to hold fewer, which is said, and the run still ends after --epochs."""
    spec = _shards(tmp_path, [8, 8])
    out = tmp_path / "o"
    base = _train_args(tiny_config, spec, out, "--no-resume")
    res = CliRunner().invoke(cli, [*base, "--epochs", "2"])
    assert res.exit_code == 2 and "pass --max-steps, or --train-num-samples for --epochs" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and not out.exists()

    (tmp_path / "sizes.json").write_text(json.dumps({"shard-000.tar": 8, "shard-001.tar": 8}))
    epochs, output = _record_epochs(monkeypatch, [*base, "--epochs", "2"])
    assert [len(e) for e in epochs] == [2, 2], output  # 16 samples a pass, batch 8
    for steps in epochs:
        keys = [k for step in steps for k in step]
        assert len(keys) == len(set(keys)) == 16
    assert json.loads((out / "config.json").read_text())["corpus"]["samples"] == 16

    epochs, output = _record_epochs(monkeypatch, [*base, "--epochs", "3", "--train-num-samples", "8"])
    assert [len(e) for e in epochs] == [1, 1, 1], output  # each epoch cut after 8 samples
    assert len({tuple(e[0]) for e in epochs}) == 3  # not the same first 8 each time
    assert json.loads((out / "config.json").read_text())["step"] == 3

    epochs, output = _record_epochs(monkeypatch, [*base, "--epochs", "2", "--train-num-samples", "40"])
    assert [len(e) for e in epochs] == [2, 2], output  # the shards ran out after 2 of the stated 5 steps
    assert "--epochs 2 ended at step 4 of the 10 planned from 40 samples an epoch" in output
    assert json.loads((out / "config.json").read_text())["step"] == 4
    ends = [e for e in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "epoch_steps" in e]
    assert ends == [{"step": 2, "epoch": 0, "epoch_steps": 2}, {"step": 4, "epoch": 1, "epoch_steps": 2}]

    # the stated size fixes the epochs' places: a resume with another one is refused
    res = CliRunner().invoke(cli, _train_args(tiny_config, spec, out, "--epochs", "3", "--train-num-samples", "24"))
    assert res.exit_code == 2 and "a corpus of 40 samples; this run asks a corpus of 24 samples" in res.output, \
        res.output
    res = CliRunner().invoke(cli, [*base, "--train-num-samples", "4"])
    assert res.exit_code == 2 and "has 4 samples (--train-num-samples), fewer than one global batch (8)" in res.output
    csv_corpus = make_corpus(tmp_path / "c", n=8)
    res = CliRunner().invoke(cli, _train_args(tiny_config, csv_corpus, tmp_path / "p", "--train-num-samples", "8"))
    assert res.exit_code == 2 and "--train-num-samples is for webdataset shards" in res.output
