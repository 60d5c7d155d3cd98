"""Read the tensors of a TorchScript archive (`torch.jit.save`) without torch and without
running arbitrary pickle code.

A TorchScript `.pt` is a zip: `<root>/data.pkl` pickles the module tree, whose tensors point
("persistent ids") at raw little-endian storages `<root>/data/<key>`. Unpickling it with the
standard `pickle` would import and call whatever globals the file names, so this module uses an
unpickler that knows only the handful of globals a plain module tree needs and refuses the rest.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from imgclf.errors import UserError

# torch storage classes -> numpy dtypes (every torch storage is little-endian on disk).
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class UnsafePickleError(UserError, pickle.UnpicklingError):
    """The archive's pickle names a global outside the allow-list (it could run code)."""


class ScriptObject:
    """Inert stand-in for a scripted `__torch__.*` module: only its attributes are kept."""

    qualname = "__torch__"

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"<{self.qualname} {sorted(k for k in self.__dict__ if not k.startswith('_'))}>"


_SCRIPT_CLASSES: dict[str, type[ScriptObject]] = {}


def _script_class(qualname: str) -> type[ScriptObject]:
    # One subclass per scripted class name, so the tree still says what each node was.
    if qualname not in _SCRIPT_CLASSES:
        _SCRIPT_CLASSES[qualname] = type(
            qualname.rsplit(".", 1)[-1], (ScriptObject,), {"qualname": qualname}
        )
    return _SCRIPT_CLASSES[qualname]


class _StorageType:
    def __init__(self, name: str) -> None:
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


def _rebuild_tensor_v2(
    storage: np.ndarray,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> np.ndarray:
    """A tensor is a strided view into its storage: copy it out as a contiguous array."""
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or storage_offset < 0 or any(s < 0 for s in (*size, *stride)):
        raise pickle.UnpicklingError(f"bad tensor layout: size={size} stride={stride}")
    if 0 in size:
        return np.empty(size, dtype=storage.dtype)
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= storage.size:
        raise pickle.UnpicklingError(
            f"tensor of size {size} stride {stride} offset {storage_offset} reads past its "
            f"storage of {storage.size} elements: the archive is truncated or corrupt"
        )
    view = np.lib.stride_tricks.as_strided(
        storage[storage_offset:],
        shape=size,
        strides=tuple(s * storage.itemsize for s in stride),
        writeable=False,
    )
    return np.array(view, order="C")  # own, contiguous, writable copy


def _rebuild_parameter(data: np.ndarray, requires_grad: bool, backward_hooks: Any) -> np.ndarray:
    return data


def _build_intlist(values: list[int]) -> list[int]:
    return list(values)


# (module, name) -> what the unpickler gets instead. Nothing here imports or runs user code.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.jit._pickle", "build_intlist"): _build_intlist,
    ("collections", "OrderedDict"): OrderedDict,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript `data.pkl` into numpy arrays and inert `ScriptObject`s.

    `load_storage(key, dtype, numel)` supplies the raw storage for a persistent id.
    """

    def __init__(
        self, file: BinaryIO, load_storage: Callable[[str, np.dtype, int], np.ndarray], source: str
    ) -> None:
        super().__init__(file)
        self._load_storage = load_storage
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        # Scripted classes are only ever instantiated empty and given a dict of attributes.
        if module == "__torch__" or module.startswith("__torch__."):
            return _script_class(f"{module}.{name}")
        raise UnsafePickleError(
            f"{self._source}: refusing to load the global {module}.{name}: only tensors, "
            "storages and scripted module trees are allowed. The file is not a plain "
            "TorchScript weights archive (or it was tampered with); do not load it with torch."
        )

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"{self._source}: unknown persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"{self._source}: bad storage type {storage_type!r}")
        return self._load_storage(str(key), storage_type.dtype, int(numel))


def _archive_root(names: list[str], source: str) -> str:
    roots = [n[: -len("data.pkl")] for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if len(roots) != 1:
        raise ValueError(f"{source}: not a TorchScript archive (no single <root>/data.pkl)")
    return roots[0]


def load_torchscript(archive: str | Path | bytes) -> Any:
    """Unpickle a TorchScript archive (a path or its bytes) into a tree of `ScriptObject`s
    whose tensor attributes are numpy arrays."""
    source = "<bytes>" if isinstance(archive, bytes) else str(archive)
    with zipfile.ZipFile(io.BytesIO(archive) if isinstance(archive, bytes) else archive) as zf:
        root = _archive_root(zf.namelist(), source)
        storages: dict[str, np.ndarray] = {}

        def load_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
            if key not in storages:
                member = f"{root}data/{key}"
                try:
                    raw = zf.read(member)
                except KeyError:
                    raise pickle.UnpicklingError(f"{source}: missing storage {member}") from None
                if len(raw) < numel * dtype.itemsize:
                    raise pickle.UnpicklingError(
                        f"{source}: {member} holds {len(raw)} bytes, expected "
                        f"{numel * dtype.itemsize} ({numel} x {dtype})"
                    )
                storages[key] = np.frombuffer(raw, dtype=dtype, count=numel)
            return storages[key]

        pickled = io.BytesIO(zf.read(f"{root}data.pkl"))
        return SafeUnpickler(pickled, load_storage, source).load()


def named_tensors(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """Flatten a module tree into {"a.b.weight": array}, in the archive's attribute order."""
    out: dict[str, np.ndarray] = {}
    items = tree.items() if isinstance(tree, dict) else vars(tree).items()
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, np.ndarray):
            out[name] = value
        elif isinstance(value, ScriptObject | dict):
            out.update(named_tensors(value, f"{name}."))
    return out


def load_torchscript_tensors(archive: str | Path | bytes) -> dict[str, np.ndarray]:
    """Every tensor of a TorchScript archive by dotted attribute path."""
    return named_tensors(load_torchscript(archive))
