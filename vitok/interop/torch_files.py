"""Reading a PyTorch ``torch.save`` state dict without torch.

Both of torch's formats: the zip archive (torch >= 1.6: ``<name>/data.pkl`` plus one file per
storage under ``<name>/data/``) and the legacy stream (a magic number, protocol, system info,
the pickle, the storage keys, then each storage's bytes preceded by its int64 length). Only
the pickle opcodes and globals a state dict of tensors needs are accepted; anything else is a
ConversionError, so no code in the file runs.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile

import numpy as np

from vitok.interop.files import ConversionError

_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}  # fmt: skip
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _Storage:
    """A storage's dtype and bytes; ``array`` is its flat numpy view."""

    def __init__(self, dtype, data: bytes | None = None):
        self.dtype = np.dtype(dtype)
        self.data = data

    def array(self) -> np.ndarray:
        return np.frombuffer(self.data, dtype=self.dtype)


class _Tensor:
    """A tensor waiting for its storage's bytes (the legacy format stores them after the
    pickle)."""

    def __init__(self, storage: _Storage, offset: int, size, stride):
        self.storage, self.offset, self.size, self.stride = (
            storage,
            offset,
            tuple(size),
            tuple(stride),
        )

    def numpy(self) -> np.ndarray:
        flat = self.storage.array()
        if not self.size:
            return flat[self.offset].copy()
        item = flat.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :], shape=self.size, strides=[s * item for s in self.stride]
        )
        return np.array(view)


def _rebuild_tensor(storage, offset, size, stride, *_):
    return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(tensor, *_):
    return tensor


class _Record:
    """A stand-in for a saved plain object (a training script's ``argparse.Namespace``): its
    attributes are restored as data, no code of the original class runs."""


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, file, load_storage):
        super().__init__(file)
        self._load_storage = load_storage

    def find_class(self, module: str, name: str):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]
        if module == "argparse" and name == "Namespace":
            return _Record
        raise ConversionError(f"unsupported object {module}.{name} in a PyTorch state dict")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise ConversionError(f"unsupported persistent id {pid!r} in a PyTorch state dict")
        _, dtype, key, _location, numel, *_ = pid
        return self._load_storage(str(key), dtype, int(numel))


def _read_zip(path: str) -> dict:
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pickles:
            raise ConversionError(f"{path} is a zip file without a PyTorch data.pkl")
        root = pickles[0][: -len("data.pkl")]
        storages: dict[str, _Storage] = {}

        def load_storage(key, dtype, numel):
            if key not in storages:
                data = archive.read(f"{root}data/{key}")
                storages[key] = _Storage(dtype, data[: numel * np.dtype(dtype).itemsize])
            return storages[key]

        obj = _StateDictUnpickler(io.BytesIO(archive.read(pickles[0])), load_storage).load()
    return obj


def _read_legacy(path: str) -> dict:
    with open(path, "rb") as f:
        if pickle.load(f) != _LEGACY_MAGIC:
            raise ConversionError(f"{path} is not a PyTorch checkpoint (bad magic number)")
        pickle.load(f)  # protocol version
        pickle.load(f)  # system info
        storages: dict[str, _Storage] = {}

        def load_storage(key, dtype, numel):
            return storages.setdefault(key, _Storage(dtype))

        obj = _StateDictUnpickler(f, load_storage).load()
        for key in pickle.load(f):
            (numel,) = struct.unpack("<q", f.read(8))
            storage = storages[str(key)]
            nbytes = numel * storage.dtype.itemsize
            storage.data = f.read(nbytes)
            if len(storage.data) != nbytes:
                raise ConversionError(f"{path} is truncated (storage {key})")
    return obj


def read_state_dict(path: str, prefer: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """A ``torch.save``d state dict (``{name: tensor}``) -> ``{name: numpy array}``. A training
    checkpoint (a dict holding state dicts beside other things) gives its entry under the
    first of the keys ``prefer`` it has, e.g. ("ema", "model") as a release's own loader."""
    if not os.path.isfile(path):
        raise ConversionError(f"checkpoint {path!r} not found")
    try:
        obj = _read_zip(path) if zipfile.is_zipfile(path) else _read_legacy(path)
    except ConversionError:
        raise
    except (
        pickle.UnpicklingError,
        EOFError,
        KeyError,
        ValueError,
        struct.error,
        zipfile.BadZipFile,
    ) as e:
        raise ConversionError(f"{path} is not a readable PyTorch checkpoint ({e})") from None
    state = _state_dict_in(obj, prefer)
    if state is None:
        what = f"top-level keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict) else "no dict"
        wanted = f" under any of {list(prefer)}" if prefer else ""
        raise ConversionError(f"{path} does not hold a state dict of tensors{wanted} ({what})")
    return {name: tensor.numpy() for name, tensor in state.items()}


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, _Tensor) for v in obj.values())


def _state_dict_in(obj, prefer: tuple[str, ...]) -> dict | None:
    if _is_state_dict(obj):
        return obj
    if isinstance(obj, dict):
        for key in prefer:
            if _is_state_dict(obj.get(key)):
                return obj[key]
    return None
