"""Checkpoints of trained method parts: ``model.safetensors`` + ``config.json`` in one folder.

``config.json`` records the method, the backbone identity it was trained on, the method's training options
and the training configuration. The weights file carries the same record in its own metadata, so that the
weights and the record that describes them are written in one rename: a save cut short between the two files
leaves a ``config.json`` from another save, which loading notices and overrides with the weights' own record.
Loading checks the method and the backbone, so weights are never applied to a model they were not trained for.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from .errors import CheckpointError, CirbenchWarning
from .util import atomic_write_files, checkpoint_folder, json_loads, one_line

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
OWN_CONFIG = "cirbench_config"  # the key of the record in the weights file's metadata
#: the weights a transformers ``save_pretrained`` folder holds, in the order ``from_pretrained`` prefers them
PRETRAINED_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def pretrained_weights_in(folder: Path) -> Path | None:
    """The weights file ``from_pretrained`` would read in a ``save_pretrained`` folder (safetensors before a
    pickle, as transformers chooses), or None when the folder has neither."""
    return next((folder / name for name in PRETRAINED_WEIGHTS if (folder / name).is_file()), None)


def save_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """Write ``tensors`` and ``config`` into ``folder``: the weights (with their own copy of ``config``) and
    ``config.json`` are both staged before either replaces an earlier checkpoint's, so a full disk leaves that
    one whole."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    record = json.dumps(config, default=str)
    metadata = {"method": str(config.get("method", "")), OWN_CONFIG: record}
    atomic_write_files([(folder / WEIGHTS, save(clean, metadata=metadata)),
                        (folder / CONFIG, (json.dumps(json.loads(record), indent=2) + "\n").encode())])
    return folder


def _weights_key(weights: dict[str, Any]) -> Any:
    # a weights file is identified by its hash wherever it lives; tags and random init by what made them
    return weights.get("sha256") or (weights.get("kind"), weights.get("tag"), weights.get("seed"))


def backbone_matches(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    return (saved.get("model") == current.get("model") and saved.get("config_sha256") == current.get("config_sha256")
            and _weights_key(saved.get("weights") or {}) == _weights_key(current.get("weights") or {}))


def describe_backbone(identity: dict[str, Any]) -> str:
    weights = identity.get("weights", {})
    tag = weights.get("tag") or weights.get("path") or weights.get("kind")
    seed = f", seed {weights['seed']}" if weights.get("kind") == "random-init" else ""
    return f"{identity.get('model')} / {identity.get('pretrained')} ({tag}{seed})"


def backbone_flags(identity: dict[str, Any], model: str | None = None) -> str:
    """The ``cirbench run``/``train`` options that load the backbone ``identity`` describes (``model``: the
    name or config file as given, where known; random weights are made from ``--seed``)."""
    weights = identity.get("weights", {})
    seed = f" --seed {weights['seed']}" if weights.get("kind") == "random-init" else ""
    return f"--backbone {model or identity.get('model')} --pretrained {identity.get('pretrained')}{seed}"


def is_official_file(path: Path | str | None, suffixes: tuple[str, ...]) -> bool:
    """Whether ``path`` is a file with one of ``suffixes``: an official release's checkpoint, read by the method
    itself, rather than a ``cirbench train`` folder."""
    return path is not None and Path(path).is_file() and Path(path).suffix in suffixes


def checkpoint_required(options: dict[str, Any], model: str, pretrained: str) -> list[tuple[str, str]]:
    """``MethodSpec.downloads`` of a method that fetches nothing but cannot run without ``--checkpoint``
    (``cirbench run --dry-run`` says so before the job starts, as :func:`load_checkpoint` would after)."""
    if options.get("checkpoint") is None:
        raise CheckpointError("it needs --checkpoint (a folder written by `cirbench train`)")
    return []


def load_checkpoint(path: Path | str | None, method: str, backbone_identity: dict[str, Any] | None = None,
                    official_suffixes: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint folder (or its ``model.safetensors``); check its method and backbone.
    ``official_suffixes``: the official checkpoint files the method also takes, named in the error for others."""
    if path is None:
        raise CheckpointError(f"method '{method}' needs --checkpoint (a folder written by `cirbench train`)")
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} not found")
    if path.is_file() and path.name != WEIGHTS:
        what, official = "not a cirbench checkpoint", ""
        if official_suffixes:
            what = f"neither a cirbench checkpoint nor an official {'/'.join(official_suffixes)} file"
            official = " or the official checkpoint"
        raise CheckpointError(f"checkpoint {path} is {what}: pass the folder written by `cirbench train` (it holds "
                              f"{WEIGHTS} and {CONFIG}){official}")
    folder = checkpoint_folder(path)
    missing = [name for name in (WEIGHTS, CONFIG) if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a cirbench checkpoint: {folder} has no "
                              f"{' and no '.join(missing)} (a checkpoint is a folder written by `cirbench train`)")
    try:
        config = json_loads((folder / CONFIG).read_bytes())
        with safe_open(str(folder / WEIGHTS), framework="pt") as fh:
            own = (fh.metadata() or {}).get(OWN_CONFIG)
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
        own = None if own is None else json_loads(own)
    except (OSError, json.JSONDecodeError, SafetensorError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {folder} is corrupt: {one_line(exc)}") from None
    if own is not None and own != config:
        warnings.warn(f"checkpoint {folder}: {CONFIG} is not the record of these weights (a save was cut short "
                      f"between the two files); using the record the weights carry", CirbenchWarning, stacklevel=2)
        config = own
    bad = next((k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise CheckpointError(f"checkpoint {folder} holds non-finite values (NaN or Inf) in {bad}")
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint {folder}: {CONFIG} is not an object")
    if config.get("method") != method:
        raise CheckpointError(f"checkpoint {folder} is for method '{config.get('method')}', not '{method}'")
    saved = config.get("backbone") or {}
    if backbone_identity is not None and not backbone_matches(saved, backbone_identity):
        raise CheckpointError(
            f"checkpoint {folder} was trained on {describe_backbone(saved)}, this run uses "
            f"{describe_backbone(backbone_identity)}: pass {backbone_flags(saved)}")
    return tensors, config


def checkpoint_sha256(path: Path | str) -> str:
    from .util import file_sha256

    return file_sha256(checkpoint_folder(Path(path).expanduser()) / WEIGHTS)


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a safetensors file or a ``torch.save`` file read without running anything from it (its
    ``state_dict`` entry where it holds one, ``module.`` prefixes dropped); CheckpointError in one line otherwise."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        from .safe_unpickle import load_state_dict, load_torch_file

        raw = load_torch_file(path)
        key = "state_dict" if isinstance(raw, dict) and "state_dict" in raw else None
        return {k.removeprefix("module."): v for k, v in load_state_dict(path, key, raw).items()}
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file is one line
        raise CheckpointError(f"cannot read weights {path}: {type(exc).__name__}: {one_line(exc)}") from None


def load_module_weights(module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Load ``tensors`` into ``module`` strictly; a CheckpointError names the first mismatch."""
    own = module.state_dict()
    check_fit(own, tensors, source)
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()})


def check_fit(own: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], source: str) -> None:
    """That ``tensors`` are exactly the entries of the state ``own`` (names and shapes), all finite; a
    CheckpointError naming the first mismatch otherwise."""
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    wrong = [f"{k} {tuple(tensors[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in tensors and tensors[k].shape != own[k].shape]
    nonfinite = next((k for k, v in tensors.items() if torch.is_tensor(v) and v.is_floating_point()
                      and not bool(torch.isfinite(v).all())), None)
    if nonfinite is not None:
        raise CheckpointError(f"checkpoint {source} holds non-finite values (NaN or Inf) in {nonfinite}")
    if missing or unexpected or wrong:
        first = (wrong + [f"missing {k}" for k in missing] + [f"unexpected {k}" for k in unexpected])[0]
        raise CheckpointError(f"checkpoint {source} does not fit this backbone: {len(wrong)} mismatched, "
                              f"{len(missing)} missing, {len(unexpected)} unexpected tensors (first: {first})")
