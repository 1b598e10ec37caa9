"""The global batch of a training step, for the loss terms that compare samples with each other.

A contrastive loss takes its negatives from the rest of the batch, so its value depends on which samples share a
batch. ``--batch-size`` is the *global* batch: under ``torchrun`` it is spread over the ranks, and with
``--accum-steps K`` over K micro-batches per rank, each run through the model on its own. A loss term that
compares samples takes their rows from :func:`gather`, which hands it the rows of the whole global batch: every
rank's (with gradients, as open_clip's ``gather_with_grad``), and, under accumulation, every micro-batch's.

Accumulation follows open_clip's ``--accum-freq``: a first pass runs each micro-batch without gradients and keeps
the rows it gathered; then each micro-batch runs again with gradients, its own rows live and the other
micro-batches' rows from the first pass. So the step's gradient is the gradient of the loss over the global batch,
whatever K, as if it had fit in memory at once; it costs one forward pass without gradients per micro-batch. The
random states are put back before each micro-batch's second run, so its dropout and noise draw what its first run
drew. Unlike open_clip's, the loss may also hold terms of each sample alone (a regulariser, a mean over the
micro-batch): the loop divides each micro-batch's loss by K, as plain accumulation does, and the gradient that
reaches a micro-batch's gathered rows is multiplied by K, so that both kinds of term get the gradient they have
over the global batch. A step that gathers nothing (LinCIR's loss is per sample) needs no first pass: it is
dropped after the first micro-batch.

A :class:`~cirbench.training.TrainableMethod` whose ``training_step`` gathers must therefore compute the same
rows when it runs a micro-batch twice: draw its randomness from torch's, Python's and numpy's global generators,
and change no state in a step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from . import distributed
from .errors import CirbenchError
from .train_state import rng_state, set_rng_state

_active: Accumulation | None = None


def gather(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` of this rank's (micro-)batch, extended to the whole global batch: every rank's rows (rank order,
    with gradients; identity in one process) and, during an accumulated step, every micro-batch's (see the
    module docstring). The order of the rows is the same for every tensor gathered in a step, so row i of one
    gathered tensor and row i of another belong to the same sample."""
    ranks = distributed.all_gather_with_grad(rows)
    return ranks if _active is None else _active.take(ranks)


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the gradient multiplied by ``factor`` on the way back."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, factor: float) -> torch.Tensor:  # type: ignore[override]
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad * ctx.factor, None


class Accumulation:
    """The micro-batches of one optimizer step (see the module docstring). Call :meth:`first_pass` once with a
    function that runs micro-batch j's training step, then run each micro-batch with gradients inside
    :meth:`second_pass`."""

    def __init__(self, micro_batches: int):
        self.count = micro_batches
        self.rows: list[list[torch.Tensor]] = []  # [micro-batch][gather call]: the first pass's rows
        self.states: list[dict[str, Any]] = []  # the random states each micro-batch's first run started from
        self._micro = 0
        self._calls = 0
        self._recording = False

    @property
    def exact(self) -> bool:
        """Whether the second pass substitutes rows (several micro-batches whose step gathers)."""
        return len(self.rows) == self.count > 1 and bool(self.rows[0])

    def first_pass(self, run_micro: Callable[[int], object]) -> None:
        if self.count == 1:
            return
        for j in range(self.count):
            self.states.append(rng_state())
            self.rows.append([])
            with torch.no_grad(), self._in(j, recording=True):
                run_micro(j)
            if not self.rows[0]:
                return  # nothing gathered: plain accumulation (the first micro-batch's draws are put back)
        if len({len(calls) for calls in self.rows}) > 1:
            raise CirbenchError(f"the micro-batches of a step gathered different numbers of tensors "
                                f"({[len(calls) for calls in self.rows]}): a training step that compares samples "
                                "must gather the same tensors for every batch (or train with --accum-steps 1)")

    @contextlib.contextmanager
    def second_pass(self, j: int) -> Iterator[None]:
        if j < len(self.states):
            set_rng_state(self.states[j])
        if not self.exact:
            yield
            return
        with self._in(j, recording=False):
            yield
        if self._calls != len(self.rows[j]):
            raise self._differs(f"gathered {len(self.rows[j])} tensor(s) the first time and {self._calls} the second")

    @contextlib.contextmanager
    def _in(self, j: int, recording: bool) -> Iterator[None]:
        global _active
        if _active is not None:
            raise RuntimeError("accumulated steps do not nest")
        _active, self._micro, self._calls, self._recording = self, j, 0, recording
        try:
            yield
        finally:
            _active = None

    def take(self, ranks: torch.Tensor) -> torch.Tensor:
        j, call = self._micro, self._calls
        self._calls += 1
        if self._recording:
            self.rows[j].append(ranks.detach())
            return ranks
        if call >= len(self.rows[j]) or self.rows[j][call].shape != ranks.shape:
            first = tuple(self.rows[j][call].shape) if call < len(self.rows[j]) else "nothing"
            raise self._differs(f"its gathered tensor {call} had shape {first} the first time and "
                                f"{tuple(ranks.shape)} the second")
        parts = [self.rows[m][call] for m in range(self.count)]
        parts[j] = _ScaleGradient.apply(ranks, float(self.count))
        return torch.cat(parts)

    def _differs(self, what: str) -> CirbenchError:
        return CirbenchError(f"under --accum-steps the training step runs each micro-batch twice and must compute the "
                             f"same thing both times, but micro-batch {self._micro} {what} (a third-party method's "
                             "training_step must draw its randomness from the global generators and change no state; "
                             "or train with --accum-steps 1)")
