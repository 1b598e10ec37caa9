"""Resumable training state in formats that cannot carry code: ``train_state.safetensors`` (tensors: optimizer
moments, RNG states) and ``train_state.json`` (everything else: step, epoch, data position, optimizer
hyperparameters, scheduler counters). Nothing is unpickled when a run resumes.

``train_state.json`` is written last and names the sha256 of the tensors file, so a state whose two halves
come from different saves is refused rather than half-applied.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError
from .util import atomic_write_bytes, atomic_write_json, json_loads, sha256_bytes

TENSORS = "train_state.safetensors"
META = "train_state.json"
LEGACY = "train_state.pt"
FORMAT = 1


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and JSON values; with CUDA in use, also its device's generator
    (dropout on a GPU draws from it)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    assert isinstance(keys, np.ndarray)  # the legacy form: (kind, keys, pos, has_gauss, cached_gaussian)
    state = {"torch": torch.get_rng_state(), "python": [version, list(mt), gauss],
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))


def save_train_state(folder: Path, optimizer: torch.optim.Optimizer, scheduler: Any, position: dict[str, Any],
                     rngs: list[dict[str, Any]], scaler: torch.amp.GradScaler | None = None) -> None:
    """Write the state of an interrupted run (see the module docstring); ``scaler``: fp16 training's loss
    scale, which a resumed run must start from."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    opt = optimizer.state_dict()
    opt_meta: dict[str, Any] = {"param_groups": opt["param_groups"], "state": {}}
    for pid, values in opt["state"].items():
        entry = {}
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{pid}.{name}"] = value.detach().contiguous().cpu()
                entry[name] = "tensor"
            else:
                entry[name] = value
        opt_meta["state"][str(pid)] = entry
    rng_meta = []
    for r, state in enumerate(rngs):
        tensors[f"rng.{r}.torch"] = state["torch"].contiguous()
        tensors[f"rng.{r}.numpy_keys"] = state["numpy"]["keys"].contiguous()
        if state.get("cuda") is not None:
            tensors[f"rng.{r}.cuda"] = state["cuda"].contiguous()
        rng_meta.append({"python": state["python"],
                         "numpy": {k: v for k, v in state["numpy"].items() if k != "keys"}})
    blob = save(tensors)
    atomic_write_bytes(Path(folder) / TENSORS, blob)
    meta = {"format": FORMAT, "tensors_sha256": sha256_bytes(blob), "position": position, "optimizer": opt_meta,
            "scheduler": scheduler.state_dict(), "rng": rng_meta,
            "grad_scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None}
    atomic_write_json(Path(folder) / META, meta)


def load_train_state(folder: Path, optimizer: torch.optim.Optimizer, scheduler: Any, rank: int,
                     scaler: torch.amp.GradScaler | None = None) -> dict[str, Any]:
    """Restore optimizer, scheduler, loss scale and this rank's RNG; return the saved position (step, epoch,
    ...)."""
    from safetensors.torch import load

    folder = Path(folder)
    if not (folder / META).is_file():
        if (folder / LEGACY).is_file():
            raise CheckpointError(f"{folder / LEGACY} is a pickled training state from an older cirbench; it is not "
                                  "read (a pickle can run code). Start over with --no-resume")
        raise CheckpointError(f"{folder} has no {META}: cannot resume (start over with --no-resume)")
    try:
        raw = (folder / META).read_bytes()
        meta = json_loads(raw)
        blob = (folder / TENSORS).read_bytes()
        if not isinstance(meta, dict):
            raise ValueError(f"{META} holds a {type(meta).__name__}, not an object")
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"training state in {folder} is unreadable ({exc}); start over with --no-resume"
                              ) from None
    if meta.get("format") != FORMAT or sha256_bytes(blob) != meta.get("tensors_sha256"):
        raise CheckpointError(f"training state in {folder} is inconsistent (its two files come from different "
                              "saves); start over with --no-resume")
    from .schema import train_state_problem

    if (problem := train_state_problem(raw)) is not None:
        raise CheckpointError(f"training state in {folder} is malformed ({META}: {problem}); start over with "
                              "--no-resume")
    tensors = load(blob)
    opt_meta = meta["optimizer"]
    try:
        state = {}
        for pid, entry in opt_meta["state"].items():
            state[int(pid)] = {name: tensors[f"optimizer.{pid}.{name}"] if value == "tensor" else value
                               for name, value in entry.items()}
        groups = opt_meta["param_groups"]
        for group in groups:
            if isinstance(group.get("betas"), list):
                group["betas"] = tuple(group["betas"])
        optimizer.load_state_dict({"state": state, "param_groups": groups})
        scheduler.load_state_dict(meta["scheduler"])
        if scaler is not None and scaler.is_enabled() and meta.get("grad_scaler"):
            scaler.load_state_dict(meta["grad_scaler"])
        rngs = meta["rng"]
        r = rank if rank < len(rngs) else 0
        set_rng_state({"torch": tensors[f"rng.{r}.torch"], "python": rngs[r]["python"],
                       "numpy": {**rngs[r]["numpy"], "keys": tensors[f"rng.{r}.numpy_keys"]},
                       "cuda": tensors.get(f"rng.{r}.cuda")})
    except (ValueError, KeyError, RuntimeError, TypeError, IndexError) as exc:
        raise CheckpointError(f"training state in {folder} does not fit this run ({exc}); start over with "
                              "--no-resume") from None
    return meta["position"]
