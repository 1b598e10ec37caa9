"""Reading torch checkpoints (``torch.save`` zip files) without executing anything from the file.

Official FTI4CIR checkpoints pickle the whole module, whose classes live in that project's own source;
SEARLE and Pic2Word checkpoints are dicts of state dicts. ``torch.load`` would import and run whatever the
pickle names. This reader parses torch's zip format itself, with a pure-Python unpickler whose every door is
guarded:

* every global the pickle names resolves to an inert stand-in, except a short allow-list of tensor-rebuilding
  functions (cirbench's own, validating versions) and plain containers; *calling* anything else (the
  ``__reduce__`` trick behind malicious checkpoints) is refused before the call happens;
* ``BUILD`` (which sets attributes) only applies to the stand-ins and fresh ``OrderedDict``s, never to an
  allow-listed function or class (a pickle could otherwise set attributes on torch functions in the running
  process);
* nesting and the number of tensors and containers walked are bounded (no recursion bombs, no containers
  shared at every level); the pickle and every storage are size-checked from the zip
  directory *before* they are read: storages must be stored uncompressed (torch never compresses them) and
  exactly as long as their header claims (a shorter storage would be silently resized and read uninitialised
  memory); a tensor view may not reach past its storage nor have more elements than it (stride-0 views that
  turn a few bytes into gigabytes); the byte order must be little-endian.

:func:`load_torch_file` returns the unpickled object (tensors, containers, stand-ins);
:func:`load_state_dict` a flat ``{name: tensor}``; :func:`load_pickled_module_tensors` the parameters and
buffers of a pickled module tree.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .util import one_line

MAX_PICKLE_BYTES = 256 << 20  # data.pkl of a checkpoint (module structure and names, not tensors)
MAX_DEPTH = 64  # nesting of containers/modules when collecting tensors
MAX_ENTRIES = 1_000_000

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class RefusedPickle(CheckpointError):
    """The pickle tried to do something outside what a checkpoint needs."""


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _Storage:
    """A storage read from the archive: its bytes and the element type its header names."""

    def __init__(self, untyped: torch.UntypedStorage, dtype: torch.dtype, numel: int):
        self.untyped, self.dtype, self.numel = untyped, dtype, numel


class _Inert:
    """Stand-in for any class the pickle names: it can be created (NEWOBJ) and given state (BUILD)."""

    _origin = "?"

    def __new__(cls, *args, **kwargs):  # NEWOBJ passes no args for modules
        return object.__new__(cls)

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state


def _stub(module: str, name: str) -> type:
    origin = f"{module}.{name}"

    class Stub(_Inert):
        _origin = origin

        def __init__(self, *args, **kwargs):
            raise RefusedPickle(f"refusing to unpickle: the checkpoint calls {origin} (not a tensor or module "
                                "state); it may be malicious")

    Stub.__name__ = name
    return Stub


def _as_index_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list, torch.Size)) or len(value) > 64:
        raise RefusedPickle(f"tensor {what} {value!r:.60} is not a short tuple of integers")
    out = tuple(value)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in out):
        raise RefusedPickle(f"tensor {what} {out!r:.60} holds negative or non-integer values")
    return out


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *_rest: Any) -> torch.Tensor:
    """torch's ``_rebuild_tensor_v2``, refusing views that reach past their storage or repeat its elements."""
    if not isinstance(storage, _Storage):
        raise RefusedPickle("a tensor's storage is not a storage")
    if not isinstance(storage_offset, int) or isinstance(storage_offset, bool) or storage_offset < 0:
        raise RefusedPickle(f"tensor storage offset {storage_offset!r:.40} is not a non-negative integer")
    size, stride = _as_index_tuple(size, "size"), _as_index_tuple(stride, "stride")
    if len(size) != len(stride):
        raise RefusedPickle(f"tensor size {size} and stride {stride} differ in length")
    available = storage.numel
    numel = math.prod(size)
    if numel:
        extent = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) + 1
        if extent > available:
            raise CheckpointError(f"a tensor of size {size} reaches element {extent} of a storage of {available}: "
                                  "the checkpoint is truncated or corrupt")
        if numel > available:
            raise CheckpointError(f"a tensor of size {size} has more elements than its storage ({available}); "
                                  "repeating (stride-0) views are refused")
    tensor = torch.empty((0,), dtype=storage.dtype)
    return tensor.set_(storage.untyped, storage_offset, size, stride)


def _rebuild_parameter(data: Any, *_rest: Any) -> Any:
    if not isinstance(data, torch.Tensor):
        raise RefusedPickle("a parameter's data is not a tensor")
    return data


def _rebuild_from_type_v2(func: Any, _new_type: Any, args: Any, _state: Any) -> Any:
    if func not in (_rebuild_tensor, _rebuild_parameter) or not isinstance(args, tuple):
        raise RefusedPickle("a tensor subclass is rebuilt with a function outside the allow-list")
    return func(*args)


_CALLABLE = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,  # protocol-2 pickles name builtins this way
    ("__builtin__", "frozenset"): frozenset,
    ("torch", "Size"): torch.Size,
}


class _Unpickler(pickle._Unpickler):  # the pure-Python unpickler: its opcodes can be guarded one by one
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, source: Path):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.source = archive, prefix, source
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        if (module, name) in _CALLABLE:
            return _CALLABLE[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        return _stub(module, name)

    def load_build(self):
        stack = self.stack  # type: ignore[attr-defined]  # the pure-Python unpickler's own state
        inst = stack[-2] if len(stack) >= 2 else None
        if not isinstance(inst, (_Inert, collections.OrderedDict)):
            raise RefusedPickle(f"refusing to unpickle: the checkpoint sets attributes on {type(inst).__name__} "
                                f"{getattr(inst, '__qualname__', '')}; it may be malicious")
        super().load_build()  # type: ignore[misc]

    dispatch[pickle.BUILD[0]] = load_build  # type: ignore[assignment]  # pickle's own table, typed for its class

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage":
            raise RefusedPickle(f"unsupported persistent id in checkpoint: {pid!r:.60}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise RefusedPickle(f"unsupported storage type in checkpoint: {storage_type!r:.60}")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise RefusedPickle("malformed storage reference in checkpoint")
        if key in self.storages:
            return self.storages[key]
        name = f"{self.prefix}data/{key}"
        try:
            info = self.archive.getinfo(name)
        except KeyError:
            raise CheckpointError(f"checkpoint {self.source} lacks storage {key}: it is truncated or corrupt") from None
        itemsize = torch.empty((), dtype=storage_type.dtype).element_size()
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"checkpoint {self.source}: storage {key} is compressed (torch never compresses "
                                  "storages); refused")
        if info.file_size != numel * itemsize:
            raise CheckpointError(f"checkpoint {self.source}: storage {key} holds {info.file_size} bytes but its "
                                  f"header claims {numel} x {itemsize}; the file is truncated or corrupt")
        raw = self.archive.read(name)
        untyped = torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8) if raw else torch.UntypedStorage(0)
        storage = _Storage(untyped, storage_type.dtype, numel)
        self.storages[key] = storage
        return storage


def _open(path: Path) -> tuple[zipfile.ZipFile, str]:
    try:
        archive = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except (OSError, zipfile.BadZipFile) as exc:
        with open(path, "rb") as fh:
            head = fh.read(2)
        if head[:1] == b"\x80":
            raise CheckpointError(f"checkpoint {path} is in torch's legacy (pre-1.6) format, which cirbench does not "
                                  "read; re-save it with a current torch") from None
        raise CheckpointError(f"checkpoint {path} is not a torch checkpoint: {exc}") from None
    names = archive.namelist()
    if len(names) > MAX_ENTRIES:
        raise CheckpointError(f"checkpoint {path} has {len(names)} entries; refused")
    pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
    if pkl is None:
        hint = " (a TorchScript archive: pass an open_clip tag such as --pretrained openai)" if any(
            n.endswith("constants.pkl") for n in names) else ""
        raise CheckpointError(f"checkpoint {path} has no data.pkl{hint}")
    prefix = pkl[: -len("data.pkl")]
    order = f"{prefix}byteorder"
    if order in names and archive.read(order).strip() not in (b"little", b""):
        raise CheckpointError(f"checkpoint {path} was saved big-endian; refused")
    return archive, pkl


def load_torch_file(path: Path | str) -> Any:
    """The object a ``torch.save`` zip file holds, rebuilt without running anything from it (see above)."""
    path = Path(path)
    archive, pkl = _open(path)
    with archive:
        info = archive.getinfo(pkl)
        if info.file_size > MAX_PICKLE_BYTES or info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"checkpoint {path}: data.pkl is {info.file_size} bytes"
                                  f"{' and compressed' if info.compress_type != zipfile.ZIP_STORED else ''}; refused")
        data = archive.read(pkl)
        return _load(_Unpickler(data, archive, pkl[: -len("data.pkl")], path), f"checkpoint {path}",
                     "could not be read safely")


def _load(unpickler: pickle._Unpickler, source: str, unreadable: str) -> Any:
    """What ``unpickler`` holds; CheckpointError naming ``source`` for a refused, too deep or broken pickle."""
    try:
        return unpickler.load()
    except CheckpointError:
        raise
    except RecursionError:
        raise CheckpointError(f"{source} nests objects too deeply; refused") from None
    except Exception as exc:  # noqa: BLE001 - anything odd in the pickle is a bad file
        raise CheckpointError(f"{source} {unreadable}: {type(exc).__name__}: {str(exc)[:200]}") from None


class _Collected:
    """The tensors :func:`_walk` found, by name: a tensor reached under several names (tied weights, a shared
    submodule) is kept under each, as ``torch.load`` keeps it, cloned once."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.clones: dict[int, torch.Tensor] = {}
        self.ancestors: set[int] = set()  # the containers being walked: a container inside itself is a cycle
        self.visits = 0

    def visit(self) -> None:
        """Count one tensor or container walked (plain values are not counted): containers shared at every level
        would otherwise be walked 2**depth times."""
        self.visits += 1
        if self.visits > MAX_ENTRIES:
            raise CheckpointError(f"checkpoint names more than {MAX_ENTRIES:,} tensors and containers; refused")

    def put(self, name: str, tensor: torch.Tensor) -> None:
        clone = self.clones.get(id(tensor))
        if clone is None:
            clone = self.clones[id(tensor)] = tensor.detach().clone()
        self.tensors[name] = clone


def _walk(obj: Any, prefix: str, out: _Collected, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise CheckpointError(f"checkpoint nests modules or containers deeper than {MAX_DEPTH} levels; refused")
    if isinstance(obj, torch.Tensor):
        out.visit()
        out.put(prefix.rstrip("."), obj)
        return
    if id(obj) in out.ancestors or not isinstance(obj, (_Inert, dict)):
        return
    out.visit()
    out.ancestors.add(id(obj))
    if isinstance(obj, _Inert):
        state = obj.__dict__.get("_state")
        if isinstance(state, dict):
            for group in ("_parameters", "_buffers"):
                for name, value in (state.get(group) or {}).items():
                    if isinstance(value, torch.Tensor):
                        out.visit()
                        out.put(prefix + str(name), value)
            for name, child in (state.get("_modules") or {}).items():
                _walk(child, f"{prefix}{name}.", out, depth + 1)
    else:
        for name, value in obj.items():
            _walk(value, f"{prefix}{name}.", out, depth + 1)
    out.ancestors.discard(id(obj))


def _tensors(root: Any, path: Path) -> dict[str, torch.Tensor]:
    collected = _Collected()
    _walk(root, "", collected, 0)
    tensors = collected.tensors
    if not tensors:
        raise CheckpointError(f"checkpoint {path} holds no tensors")
    checked: set[int] = set()
    for name, t in tensors.items():
        if id(t) in checked:  # a tied tensor, checked under its first name
            continue
        checked.add(id(t))
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"checkpoint {path} holds non-finite values (NaN or Inf) in {name}")
    return tensors


def load_pickled_module_tensors(path: Path | str) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a module saved with ``torch.save(module)`` (or a state dict)."""
    return _tensors(load_torch_file(path), Path(path))


def load_state_dict(path: Path | str, key: str | None = None, obj: Any = None) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` from a ``torch.save`` file holding a state dict, or a dict holding one under
    ``key`` (SEARLE's ``"Phi"``, Pic2Word's ``"state_dict_img2text"``); CheckpointError naming what is wrong.
    ``obj`` is the file's content when :func:`load_torch_file` already read it."""
    path = Path(path)
    obj = load_torch_file(path) if obj is None else obj
    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            raise CheckpointError(f"checkpoint {path} has no '{key}' entry")
        obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a state dict")
    return _tensors(obj, path)


class _SelfContained(pickle._Unpickler):
    """An unpickler for files that hold everything themselves: a reference to anything outside is refused."""

    def persistent_load(self, pid):
        raise RefusedPickle("refusing to unpickle: the file references external objects")


class _DataUnpickler(_SelfContained):
    """Plain data only (dicts, lists, strings, numbers): a pickle that names any global is refused."""

    def find_class(self, module: str, name: str):
        raise RefusedPickle(f"refusing to unpickle: the file names {module}.{name}, but plain data needs no class; "
                            "it may be malicious")


def load_data_pickle(data: bytes, source: str) -> Any:
    """The plain data (containers, strings, numbers) a pickle holds, e.g. a dict of generated phrases, read
    without resolving or calling anything it names."""
    if len(data) > MAX_PICKLE_BYTES:
        raise CheckpointError(f"{source} is {len(data)} bytes; refused")
    return _load(_DataUnpickler(io.BytesIO(data)), source, "is not a readable pickle")


def load_bytes_pickle(path: Path | str) -> bytes:
    """The one bytes object a pickle file holds (MagicLens's ``.pkl``: ``pickle.dump`` of flax's serialized
    weights, gigabytes), read from the file as plain data (no size cap: it is bytes, not structure); a
    CheckpointError when the file holds anything else or names a global."""
    path = Path(path)
    with open(path, "rb") as fh:
        obj = _load(_DataUnpickler(fh), f"checkpoint {path}", "is not a readable pickle")
    if not isinstance(obj, (bytes, bytearray)):
        raise CheckpointError(f"checkpoint {path} holds a pickled {type(obj).__name__}, not the bytes of serialized "
                              "weights")
    return bytes(obj)


class _TensorPickleUnpickler(_SelfContained):
    """A plain ``pickle.dump`` of containers holding torch tensors (their storages saved by ``torch.save`` into
    the pickle, as a tensor pickles itself): the storages are read by torch's own restricted loader
    (``weights_only``), the tensors rebuilt from them; any other global is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return torch._utils._rebuild_tensor_v2
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _storage_from_bytes
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise RefusedPickle(f"refusing to unpickle: the file names {module}.{name}, which a pickle of tensors "
                            "needs not; it may be malicious")


def _storage_from_bytes(data: bytes) -> Any:
    if not isinstance(data, bytes):
        raise RefusedPickle("refusing to unpickle: a tensor storage that is not bytes")
    try:
        return torch.load(io.BytesIO(data), weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch's restricted loader refusing, or a corrupt storage
        raise CheckpointError(f"a tensor storage in the file is unreadable ({type(exc).__name__})") from None


def load_tensor_pickle(path: Path | str) -> Any:
    """What a plain pickle of tensors holds (BASIC's LAION means: ``{"laion_1m_mean": tensor}``), read as
    :class:`_TensorPickleUnpickler` allows."""
    data = Path(path).read_bytes()
    if len(data) > MAX_PICKLE_BYTES:
        raise CheckpointError(f"{path} is {len(data)} bytes; refused")
    return _load(_TensorPickleUnpickler(io.BytesIO(data)), str(path), "is not a readable pickle")


_NUMPY_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                  ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
                  ("numpy._core.multiarray", "scalar")}


class _NumpyUnpickler(_SelfContained):
    """Numpy arrays in plain containers (what ``np.save`` writes for an object array): numpy's own array and
    dtype rebuilders only."""

    def find_class(self, module: str, name: str):
        if (module, name) in _NUMPY_GLOBALS:
            import importlib

            return getattr(importlib.import_module(module), name)
        raise RefusedPickle(f"refusing to unpickle: the file names {module}.{name}, which numpy arrays need not; "
                            "it may be malicious")


def load_object_npy(path: Path | str) -> Any:
    """The object an ``.npy`` file of one pickled object holds (``np.save(path, {...})``, read back by
    ``np.load(allow_pickle=True).item()``), unpickled as :class:`_NumpyUnpickler` allows."""
    import numpy as np

    path = Path(path)
    with open(path, "rb") as fh:
        try:
            version = np.lib.format.read_magic(fh)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f"npy format version {version}")
            _shape, _fortran, dtype = read_header(fh)
        except ValueError as exc:
            raise CheckpointError(f"{path} is not a readable .npy file ({one_line(exc)[:120]})") from None
        if not dtype.hasobject:
            return np.lib.format.read_array(fh, allow_pickle=False)
        data = fh.read(MAX_PICKLE_BYTES + 1)
    if len(data) > MAX_PICKLE_BYTES:
        raise CheckpointError(f"{path} holds more than {MAX_PICKLE_BYTES} bytes of pickled objects; refused")
    array = _load(_NumpyUnpickler(io.BytesIO(data)), str(path), "is not a readable .npy file")
    return array.item() if getattr(array, "shape", None) == () else array
