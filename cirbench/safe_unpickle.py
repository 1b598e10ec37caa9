"""Reading tensors out of a checkpoint saved with ``torch.save(module)`` without executing pickled code.

Official FTI4CIR checkpoints pickle the whole module, whose classes live in that project's own source.
``torch.load`` would import and run them (and anything else the pickle names). This reader parses torch's
zip format itself: every global the pickle names resolves to an inert stand-in, except a short allow-list
of tensor-rebuilding functions and plain containers; a pickle that tries to *call* anything else (the
``__reduce__`` trick behind malicious checkpoints) is refused before the call happens. The result is a flat
``{dotted.name: tensor}`` dict of the module tree's parameters and buffers.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
_CALLABLE = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,  # protocol-2 pickles name builtins this way
    ("__builtin__", "frozenset"): frozenset,
    ("torch", "Size"): torch.Size,
}


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _Inert:
    """Stand-in for any class the pickle names: it can be created (NEWOBJ) and given state (BUILD)."""

    _origin = "?"

    def __new__(cls, *args, **kwargs):  # NEWOBJ passes no args for modules
        return object.__new__(cls)

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state


class RefusedPickle(CheckpointError):
    """The pickle tried to call something outside the allow-list."""


def _stub(module: str, name: str) -> type:
    origin = f"{module}.{name}"

    class Stub(_Inert):
        _origin = origin

        def __init__(self, *args, **kwargs):
            raise RefusedPickle(f"refusing to unpickle: the checkpoint calls {origin}{args!r:.80} (not a tensor "
                                "or module state); it may be malicious")

    Stub.__name__ = name
    return Stub


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str):
        if (module, name) in _CALLABLE:
            return _CALLABLE[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        return _stub(module, name)

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or pid[0] != "storage":
            raise CheckpointError(f"unsupported persistent id in checkpoint: {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        dtype = storage_type.dtype if isinstance(storage_type, _StorageType) else torch.float32
        raw = self.archive.read(f"{self.prefix}data/{key}")
        untyped = torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8) if raw else torch.UntypedStorage(0)
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)


def _walk(obj: Any, prefix: str, out: dict[str, torch.Tensor], seen: set[int]) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        out[prefix.rstrip(".")] = obj.detach().clone()
        return
    if isinstance(obj, _Inert):
        state = obj.__dict__.get("_state")
        if isinstance(state, dict):
            for group in ("_parameters", "_buffers"):
                for name, value in (state.get(group) or {}).items():
                    if isinstance(value, torch.Tensor):
                        out[prefix + name] = value.detach().clone()
            for name, child in (state.get("_modules") or {}).items():
                _walk(child, f"{prefix}{name}.", out, seen)
        return
    if isinstance(obj, dict):
        for name, value in obj.items():
            _walk(value, f"{prefix}{name}.", out, seen)


def load_pickled_module_tensors(path: Path | str) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a module saved with ``torch.save(module)`` (or a state dict)."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"checkpoint {path} is not a torch zip checkpoint: {exc}") from None
    with archive:
        pkl = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
        if pkl is None:
            raise CheckpointError(f"checkpoint {path} has no data.pkl")
        prefix = pkl[: -len("data.pkl")]
        try:
            root = _Unpickler(archive.read(pkl), archive, prefix).load()
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - anything odd in the pickle is a bad checkpoint
            raise CheckpointError(f"checkpoint {path} could not be read safely: {type(exc).__name__}: {exc}") from None
    tensors: dict[str, torch.Tensor] = {}
    _walk(root, "", tensors, set())
    if not tensors:
        raise CheckpointError(f"checkpoint {path} holds no tensors")
    return tensors
