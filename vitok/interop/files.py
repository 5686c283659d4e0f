"""Reading released weight files and checking them against a release's layout."""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Mapping

import numpy as np

MAX_LISTED = 8  # mismatches named in one error


class ConversionError(ValueError):
    """A checkpoint is missing, unreadable, or not in the layout its converter reads."""


def read_npz(path: str, strip_prefix: str = "") -> dict[str, np.ndarray]:
    """A .npz of named arrays (big_vision's "a/b/c" names) -> {name: array}; a leading
    ``strip_prefix`` (e.g. "params/") is removed from every name that has it."""
    if not os.path.isfile(path):
        raise ConversionError(f"checkpoint {path!r} not found")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {name: np.asarray(f[name]) for name in f.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise ConversionError(f"{path} is not a readable .npz file ({e})") from None
    if strip_prefix and all(name.startswith(strip_prefix) for name in arrays):
        arrays = {name[len(strip_prefix) :]: a for name, a in arrays.items()}
    return arrays


def check_layout(
    found: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]], where: str
) -> None:
    """Raises ConversionError naming the first mismatches (a missing name, an unexpected one,
    a wrong shape) between a file's arrays and the layout its release has; silent if equal."""
    problems = [
        f"missing {name} {list(shape)}" for name, shape in expected.items() if name not in found
    ]
    problems += [
        f"{name} is {list(found[name].shape)}, expected {list(shape)}"
        for name, shape in expected.items()
        if name in found and tuple(found[name].shape) != tuple(shape)
    ]
    problems += [
        f"unexpected {name} {list(a.shape)}" for name, a in found.items() if name not in expected
    ]
    if problems:
        more = f" (and {len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
        raise ConversionError(
            f"{where} does not match the layout it should have: "
            + "; ".join(problems[:MAX_LISTED])
            + more
        )


def need(arrays: Mapping[str, np.ndarray], name: str, ndim: int, where: str, release: str):
    """``arrays[name]``, which must exist with ``ndim`` dims; else a ConversionError asking
    whether ``where`` is a ``release`` checkpoint at all (a missing name) or naming the shape."""
    if name not in arrays:
        raise ConversionError(f"{where} has no {name!r}: is it a {release} checkpoint?")
    if arrays[name].ndim != ndim:
        raise ConversionError(
            f"{where}: {name} is {list(arrays[name].shape)}, expected {ndim} dims"
        )
    return arrays[name]


def indices(names, pattern: str) -> list[int]:
    """The sorted distinct integers ``pattern``'s first group matches at the start of
    ``names`` (block numbers in a layout)."""
    return sorted({int(m.group(1)) for name in names if (m := re.match(pattern, name))})
