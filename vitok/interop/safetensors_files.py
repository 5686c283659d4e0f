"""Reading a ``.safetensors`` file with numpy only.

The format: an unsigned little-endian int64 N, N bytes of JSON (``{name: {"dtype", "shape",
"data_offsets": [begin, end]}}`` plus an optional ``"__metadata__"`` of strings), then the
tensors' bytes, offsets counted from the end of the header. Nothing in the file is executed.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from vitok.interop.files import ConversionError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}  # fmt: skip
_MAX_HEADER = 100 * 2**20


def read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """-> ({name: array}, the ``__metadata__`` strings ({} when absent)); bfloat16 and
    float16 tensors are returned as float32."""
    if not os.path.isfile(path):
        raise ConversionError(f"checkpoint {path!r} not found")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ConversionError(f"{path} is not a safetensors file (shorter than its header)")
        (length,) = struct.unpack("<Q", head)
        if length > min(_MAX_HEADER, size - 8):
            raise ConversionError(f"{path} is not a safetensors file (header of {length} bytes)")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConversionError(f"{path} is not a safetensors file ({e})") from None
        data = f.read()
    metadata = header.pop("__metadata__", None) or {}
    arrays = {}
    for name, entry in header.items():
        try:
            dtype = np.dtype(_DTYPES[entry["dtype"]])
            begin, end = (int(x) for x in entry["data_offsets"])
            shape = tuple(int(x) for x in entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise ConversionError(
                f"{path}: tensor {name!r} has an unreadable entry {entry}"
            ) from None
        if end > len(data) or end - begin != int(np.prod(shape)) * dtype.itemsize:
            raise ConversionError(f"{path} is truncated or corrupt (tensor {name!r})")
        array = np.frombuffer(data, dtype, count=int(np.prod(shape)), offset=begin).reshape(shape)
        if dtype in (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)):
            array = array.astype(np.float32)
        arrays[name] = array
    return arrays, dict(metadata)
