"""torch.distributed helpers shared by training (DDP) and sharded gallery encoding.

Runs started with ``torchrun`` set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``;
:func:`init_from_env` joins the process group (NCCL on CUDA, gloo on CPU). Single-process runs need no setup:
every helper here degrades to the identity when the world size is 1.

Timeouts: collectives keep torch's default (``CIRBENCH_DIST_TIMEOUT_S`` sets another), so that a hung rank
is found; :func:`long_barrier`, where ranks wait for long work that is not theirs (rank 0 alone: an LLM method
generating its captions and rewrites; every rank, ending unevenly: shares of SEARLE's OTI), runs on a gloo
group whose timeout is ``CIRBENCH_DIST_WAIT_S`` (default 24 hours), so that NCCL's watchdog does not abort the
waiting ranks.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import CirbenchError
from .util import launched_by_torchrun, speaks  # noqa: F401  (torch-free, so that the CLI can ask early)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


_wait_group: dist.ProcessGroup | None = None  # the gloo group of long_barrier


def _seconds(variable: str, default: float | None) -> timedelta | None:
    value = os.environ.get(variable)
    if not value:
        return None if default is None else timedelta(seconds=default)
    try:
        return timedelta(seconds=float(value))
    except ValueError:
        raise CirbenchError(f"{variable}={value!r} is not a number of seconds") from None


def init_from_env(device: str = "auto") -> torch.device:
    """Join the process group if launched by torchrun; return this rank's device."""
    global _wait_group
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if launched_by_torchrun() and not is_distributed():
        timeout = _seconds("CIRBENCH_DIST_TIMEOUT_S", None)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timeout)  # None: torch's default
        group = dist.new_group(backend="gloo", timeout=_seconds("CIRBENCH_DIST_WAIT_S", 24 * 3600))
        _wait_group = group if isinstance(group, dist.ProcessGroup) else None  # every rank is a member
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def long_barrier() -> None:
    """A barrier that may wait for hours (see the module docstring): where the other ranks wait while rank 0 alone
    works (every rank calls it, rank 0 when its work is done), and after work on every rank that may end unevenly."""
    if is_distributed():
        dist.barrier(group=_wait_group)  # a process group joined elsewhere: its default group and timeout


def shutdown() -> None:
    """Leave the process group at the end of a command that succeeded: the ranks wait for each other on the
    long-timeout group (rank 0 may still be writing results), then the group is destroyed, so that no rank tears
    its connections down under another's last collective and NCCL has nothing to warn about at exit."""
    global _wait_group
    if is_distributed():
        long_barrier()
        dist.destroy_process_group()
        _wait_group = None


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the summed gradient of its own slice. The ranks may hold
    different numbers of rows (a batch that lost an unreadable sample): the rows are padded to the largest
    count for the collective and cut back after it."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        parts = all_gather_rows(tensor)
        ctx.sizes = [part.shape[0] for part in parts]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[: rank()])
        return grad[start : start + ctx.sizes[rank()]]


def all_gather_rows(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (rank order; a one-element list when not distributed), on ``tensor``'s device. The
    ranks may hold different numbers of rows, zero included: the rows are padded to the largest count for the
    collective and cut back after it. Trailing shape and dtype must be the same on every rank."""
    if world_size() == 1:
        return [tensor]
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.empty_like(count) for _ in range(world_size())]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded.contiguous())
    return [part[:size] for part, size in zip(parts, sizes, strict=True)]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank (rank order), keeping gradients (identity when not distributed)."""
    if world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


def average_gradients(params, stop: bool = False) -> bool:
    """Average the gradients of ``params`` over ranks (what DDP does) in one all-reduce per dtype and device
    rather than one per tensor; return whether any rank asked to ``stop``. The flag rides on the same
    all-reduce, so every rank learns at the same step that one of them was interrupted, for free."""
    if world_size() == 1:
        return stop
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    if groups:
        device = next(iter(groups))[1]
    else:  # no gradient anywhere this step: the flag alone, on a device the backend can reduce
        device = collective_device()
    flag = torch.tensor([float(stop)], device=device)
    if not groups:
        groups[(flag.dtype, flag.device)] = []
    asked = None
    for i, ((dtype, _device), grads) in enumerate(groups.items()):
        parts = [g.reshape(-1) for g in grads] + ([flag.to(dtype)] if i == 0 else [])
        flat = torch.cat(parts)
        dist.all_reduce(flat)
        if i == 0:
            asked = flat[-1:]
            flat = flat[:-1]
        flat /= world_size()
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
    return bool(asked is not None and asked.item() > 0)


def collective_device() -> torch.device:
    """Where a tensor made only for a collective must live: this rank's GPU under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_ranks_each(*flags: bool) -> tuple[bool, ...]:
    """For each of ``flags``, whether it holds on every rank: one collective for all of them."""
    if world_size() == 1:
        return tuple(bool(f) for f in flags)
    agreed = torch.tensor([1 if f else 0 for f in flags], device=collective_device())
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    return tuple(bool(v) for v in agreed.tolist())


def all_gather_object(obj):
    """Every rank's ``obj``, in rank order (a one-element list when not distributed)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def shard(items: list, rank_: int | None = None, world: int | None = None) -> list:
    """This rank's strided share of ``items`` (``items[rank::world]``)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return items[r::w]


def gather_sharded_rows(local: torch.Tensor | None, total: int) -> torch.Tensor:
    """Reassemble rows encoded as strided shards (:func:`shard`) on every rank into the original order.

    A rank that had nothing to encode (fewer images than ranks) passes ``None``; the row shape and dtype are
    taken from the ranks that did, so every rank joins the same collective with same-shaped tensors.
    """
    w = world_size()
    if w == 1:
        return local if local is not None else torch.empty(0)
    described = all_gather_object(None if local is None else (tuple(local.shape[1:]), str(local.dtype)))
    known = next((d for d in described if d is not None), None)
    if known is None:
        return torch.empty(0)
    trailing, dtype_name = known
    dtype = getattr(torch, dtype_name.removeprefix("torch."))
    if local is None:
        local = torch.empty((0, *trailing), dtype=dtype)
    per_rank = -(-total // w)
    device = collective_device()
    padded = torch.zeros((per_rank, *trailing), dtype=dtype, device=device)
    padded[: local.shape[0]] = local.to(device)
    parts = [torch.empty_like(padded) for _ in range(w)]
    dist.all_gather(parts, padded)
    out = torch.empty((total, *trailing), dtype=dtype)
    for r, part in enumerate(parts):
        n = len(range(r, total, w))
        out[r::w] = part[:n].cpu()
    return out
