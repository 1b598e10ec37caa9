"""Gradient accumulation is exact: a step of K micro-batches has the gradient of the whole global batch, for the
loss terms that compare samples (their negatives come from every micro-batch) as for the terms of each sample."""

from __future__ import annotations

import random
import types

import pytest
import torch

from cirbench import global_batch, training
from cirbench.corpora import Batch
from cirbench.errors import CirbenchError
from cirbench.methods._shared.textinv import nt_xent


class Toy(training.NetTrainable):
    """A loss with every kind of term the built-in methods have: symmetric InfoNCE (TAT, Pic2Word), NT-Xent
    (SEARLE, FTI4CIR), a per-sample regulariser (FTI4CIR), and, with ``dropout``/``noise``, random draws."""

    name = "toy"

    def __init__(self, dropout: float = 0.0, noise: float = 0.0, contrast: bool = True):
        backbone = types.SimpleNamespace(precision="fp32", device=torch.device("cpu"), identity=lambda: {})
        super().__init__(backbone, {})
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Dropout(dropout), torch.nn.Linear(5, 4))
        self.noise, self.contrast = noise, contrast
        self.text = torch.randn(64, 4)

    def training_step(self, batch):
        rows = [int(k) for k in batch.keys]
        inputs = batch.pixels + self.noise * torch.randn(batch.pixels.shape)
        out = self.net(inputs)
        regulariser = (out - 1).pow(2).sum(dim=1).mean()
        if not self.contrast:
            return regulariser, {}
        text = self.text[rows]
        return training.contrastive_loss(out, text, 0.1) + nt_xent(out, text, 0.25) + 0.3 * regulariser, {}


def _batches(n: int = 8, parts: int = 1) -> list[Batch]:
    torch.manual_seed(1)
    return _split(Batch(pixels=torch.randn(n, 6), captions=[""] * n, keys=[str(k) for k in range(n)]), parts)


def _split(batch: Batch, parts: int) -> list[Batch]:
    """``batch`` as ``parts`` micro-batches of equal size, in order."""
    size = len(batch) // parts
    return [Batch(pixels=batch.pixels[i : i + size], captions=batch.captions[i : i + size],
                  extra={k: v[i : i + size] for k, v in batch.extra.items()}, keys=batch.keys[i : i + size])
            for i in range(0, len(batch), size)]


def _step(toy: training.TrainableMethod, micro: list[Batch], seed: int = 5, dropout: bool = True,
          **settings) -> tuple[float, dict[str, torch.Tensor]]:
    """One optimizer step through the loop's own code; the loss and the gradients it left."""
    toy.train_mode(dropout)
    params = toy.trainable_parameters()
    optimizer = torch.optim.SGD(params, lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _s: 1.0)
    cfg = training.TrainConfig(output="unused", accum_steps=len(micro), batch_size=8, lr=0.0,  # weights stay put
                               **settings)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    torch.manual_seed(seed)
    random.seed(seed)
    loss, _logs, _stop = training._optimizer_step(toy, optimizer, scheduler, micro, cfg, 1.0, params,
                                                  torch.device("cpu"), False, scaler)
    return loss, {n: p.grad.clone() for n, p in toy.named_trainable_parameters()}


@pytest.mark.parametrize("parts", [2, 4, 8])
def test_an_accumulated_step_has_the_whole_batchs_loss_and_gradient(parts):
    whole_loss, whole = _step(Toy(), _batches())
    loss, grads = _step(Toy(), _batches(parts=parts))
    assert loss == pytest.approx(whole_loss, rel=1e-6)
    for name, grad in whole.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7)


def test_max_grad_norm_clips_the_global_norm_of_the_steps_gradients():
    _, free = _step(Toy(), _batches(parts=2))
    norm = float(torch.cat([g.flatten() for g in free.values()]).norm())
    _, clipped = _step(Toy(), _batches(parts=2), max_grad_norm=norm / 4)
    for name, grad in free.items():  # the same direction, a quarter of the length
        torch.testing.assert_close(clipped[name], grad / 4, rtol=1e-4, atol=1e-7)


def test_a_micro_batch_runs_again_with_the_draws_of_its_first_run():
    """With dropout and noise, the second run of each micro-batch must draw what its first run drew: the step is
    then the gradient of the whole-batch loss over the rows the micro-batches drew one after the other."""
    micro = _batches(parts=2)
    loss, grads = _step(Toy(dropout=0.5, noise=0.1), micro, seed=5)
    next_draw = torch.rand(1)  # the step leaves the generators where drawing once for each micro-batch leaves them

    toy = Toy(dropout=0.5, noise=0.1)
    toy.train_mode(True)
    torch.manual_seed(5)
    outs = [toy.net(mb.pixels + 0.1 * torch.randn(mb.pixels.shape)) for mb in micro]
    assert torch.equal(torch.rand(1), next_draw)
    out = torch.cat(outs)
    text = toy.text[:8]
    regulariser = sum((o - 1).pow(2).sum(dim=1).mean() for o in outs) / 2
    expected = training.contrastive_loss(out, text, 0.1) + nt_xent(out, text, 0.25) + 0.3 * regulariser
    expected.backward()
    assert loss == pytest.approx(float(expected.detach()), rel=1e-6)
    for name, p in toy.named_trainable_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-7)


def test_a_step_that_compares_nothing_runs_each_micro_batch_once_more_at_most():
    """Terms of each sample alone need no first pass: it stops after the first micro-batch, whose draws are put
    back, so the step is plain accumulation (each micro-batch's mean loss over K)."""
    calls = []
    toy = Toy(noise=0.1, contrast=False)
    real = toy.training_step
    toy.training_step = lambda batch: calls.append(torch.is_grad_enabled()) or real(batch)
    micro = _batches(parts=4)
    loss, grads = _step(toy, micro)
    assert calls == [False, True, True, True, True]

    ref = Toy(noise=0.1, contrast=False)
    torch.manual_seed(5)
    total = sum(ref.training_step(mb)[0] for mb in micro) / 4
    total.backward()
    assert loss == pytest.approx(float(total.detach()), rel=1e-6)
    for name, p in ref.named_trainable_parameters():
        torch.testing.assert_close(grads[name], p.grad)


def test_a_step_that_computes_something_else_the_second_time_is_a_one_line_error():
    toy = Toy()
    real, seen = toy.training_step, []

    def fickle(batch):  # keeps state between calls: its second run of a batch gathers fewer rows
        seen.append(1)
        if len(seen) > 2:
            batch = Batch(pixels=batch.pixels[:2], captions=batch.captions[:2], keys=batch.keys[:2])
        return real(batch)

    toy.training_step = fickle
    with pytest.raises(CirbenchError, match="micro-batch 0 .* shape \\(4, 4\\) the first time and \\(2, 4\\)"):
        _step(toy, _batches(parts=2))


@pytest.mark.parametrize("when, said", [
    # the second run of micro-batch 0 gathers once where its first run gathered twice
    ("second", "micro-batch 0 gathered 2 tensor\\(s\\) the first time and 1 the second"),
    # micro-batch 1 gathers once where micro-batch 0 gathered twice
    ("first", "micro-batches of a step gathered different numbers of tensors \\(\\[2, 1\\]\\)"),
])
def test_a_step_that_gathers_a_different_number_of_tensors_is_a_one_line_error(when, said):
    toy = Toy()
    runs = []

    def uneven(batch):
        runs.append(batch.keys[0])
        out = toy.net(batch.pixels)
        rows = global_batch.gather(out)
        again = len(runs) == 1 if when == "first" else len(runs) != 3  # the 3rd run: micro-batch 0's second
        extra = global_batch.gather(out * 2).sum() if again else 0.0
        return rows.pow(2).mean() + extra, {}

    toy.training_step = uneven
    with pytest.raises(CirbenchError, match=said):
        _step(toy, _batches(parts=2))


def test_gather_is_the_identity_outside_a_step():
    rows = torch.randn(3, 2)
    assert global_batch.gather(rows) is rows


def _searle(backbone, tmp_path):
    from test_searle_oti import write_sources

    from cirbench.methods._shared.textinv import token_width
    from cirbench.methods.searle import oti
    from cirbench.methods.searle import train as searle_train

    concepts_csv, release = write_sources(tmp_path)
    # lambda_gpt 0: the phrases are drawn batch by batch (as officially), so they differ between 1 and 2 batches
    trainable = searle_train.SearleTrainable(backbone, {"concepts": concepts_csv, "phrases": release,
                                                        "lambda_gpt": 0.0, "top_k_concepts": 4})
    names, phrases = oti.load_concepts(concepts_csv), oti.load_phrases(release)
    g = torch.Generator().manual_seed(0)
    keys = [f"img{i}.png" for i in range(8)]
    trainable.teacher = searle_train.Teacher(keys, torch.randn(8, backbone.embed_dim, generator=g),
                                             torch.randn(8, token_width(backbone), generator=g),
                                             torch.arange(32).reshape(8, 4) % len(names), names,
                                             oti.usable_concepts(phrases))
    trainable.phrases = phrases
    return trainable


def _trainable(name: str, tiny_config, tmp_path) -> training.TrainableMethod:
    from cirbench.backbones import load_backbone

    backbone = load_backbone(str(tiny_config), "none", device="cpu", seed=0, training=True)
    if name == "slerp-tat":
        from cirbench.methods.slerp.tat import TATTrainable

        return TATTrainable(backbone, {"lora_rank": 4, "lora_alpha": 4, "lora_dropout": 0.0,
                                       "lora_targets": "mlp.c_fc,mlp.c_proj", "temperature": 0.05})
    if name == "pic2word":
        from cirbench.methods.pic2word.model import Pic2WordTrainable

        return Pic2WordTrainable(backbone, {"middle_dim": 16, "dropout": 0.0})
    if name == "fti4cir":
        from cirbench.methods.fti4cir.model import FTI4CIRTrainable

        return FTI4CIRTrainable(backbone, {"num_queries": 24, "max_attributes": 12, "threshold": 0.05, "layers": 1,
                                           "temperature": 0.2, "reg_weight": 1.4})
    if name == "context-i2w":
        from cirbench.methods.context_i2w.model import ContextI2WTrainable

        return ContextI2WTrainable(backbone, {"middle_dim": 16, "dropout": 0.0})
    if name == "lincir":
        from cirbench.methods.lincir.model import LinCIRTrainable

        return LinCIRTrainable(backbone, {"keywords": "random", "noise": 0.0, "dropout": 0.0})
    if name == "pli":
        from cirbench.methods.pli.model import PLITrainable

        # nothing masked: the masks of 8 images are not drawn as those of 2 x 4 are (the kept patches are then all,
        # in a shuffled order, which the class token does not see)
        return PLITrainable(backbone, {"mask_ratio": 0.0, "tune": "both", "tau": 1.0})
    return _searle(backbone, tmp_path)


@pytest.mark.parametrize("name", ["slerp-tat", "pic2word", "context-i2w", "fti4cir", "searle", "lincir", "pli"])
def test_every_built_in_trainer_accumulates_to_the_whole_batch(name, tiny_config, tmp_path):
    """Each built-in loss, one batch of 8 against 2 micro-batches of 4: the same loss and gradients. Its terms that
    compare samples must take their rows from global_batch.gather (a method that compared its samples among
    themselves would see 4 where the whole batch has 8)."""
    trainable = _trainable(name, tiny_config, tmp_path)
    size = trainable.backbone.preprocessor(trainable.preprocess_kind).size
    subjects = ["a dog", "two cups", "a red car", "a cat", "the sky", "a man", "a boat", "three birds"]
    attributes = ["on a couch", "of tea", "in the rain", "asleep", "at dusk", "with a hat", "at sea", "in a tree"]
    whole = Batch(pixels=torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(1)),
                  captions=[f"{s} {a}" for s, a in zip(subjects, attributes, strict=True)],
                  extra={"subject": subjects, "attribute": attributes,
                         "masked_caption": [f"<|replace|> {a}" for a in attributes]},
                  keys=[f"img{i}.png" for i in range(8)])
    results = [_step(trainable, micro, dropout=False) for micro in ([whole], _split(whole, 2))]
    (loss, grads), (acc_loss, acc_grads) = results
    assert acc_loss == pytest.approx(loss, rel=1e-5)
    assert any(float(g.abs().sum()) > 0 for g in grads.values())
    atol = 1e-5 if name == "pli" else 1e-6  # PLI's patch tokens come in a shuffled order: sums in another order
    for key, grad in grads.items():
        torch.testing.assert_close(acc_grads[key], grad, rtol=1e-4, atol=atol)
