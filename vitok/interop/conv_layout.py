"""Torch convolutional autoencoders (SD's and VQGAN's layouts) as ordered lists of modules.

A converter walks its release's names once, as ``Module`` entries (torch prefix, vitok path,
kind, sizes); this module turns that list into the release's expected names and shapes and
into vitok's params (``vitok.models.vae``'s Conv, GroupNorm, ResBlock and SpatialAttention).
Releases differ in how they name a ResBlock's shortcut and the attention layer's parts, and in
whether its projections are 1x1 convolutions or linear layers (``AttentionNames``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

# (torch prefix, vitok path, kind: "conv" | "norm" | "attention", sizes)
Module = tuple[str, tuple, str, tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class AttentionNames:
    """How a release names a single-head spatial attention layer's tensors."""

    norm: str
    q: str
    k: str
    v: str
    out: str
    conv_weights: bool  # [c, c, 1, 1] 1x1 convolutions (else [c, c] linear layers)


def conv(prefix: str, path: tuple, cout: int, cin: int, kernel: int) -> Module:
    return prefix, path, "conv", (cout, cin, kernel)


def resblock(prefix: str, path: tuple, cin: int, cout: int, shortcut: str) -> Iterator[Module]:
    """norm1, conv1 (3x3), norm2, conv2 (3x3) and, where the width changes, a 1x1 shortcut."""
    yield f"{prefix}.norm1", (*path, "norm1"), "norm", (cin,)
    yield conv(f"{prefix}.conv1", (*path, "conv1"), cout, cin, 3)
    yield f"{prefix}.norm2", (*path, "norm2"), "norm", (cout,)
    yield conv(f"{prefix}.conv2", (*path, "conv2"), cout, cout, 3)
    if cin != cout:
        yield conv(f"{prefix}.{shortcut}", (*path, "skip"), cout, cin, 1)


def attention(prefix: str, path: tuple, channels: int) -> Module:
    return prefix, path, "attention", (channels,)


def _tensors(kind: str, sizes: tuple[int, ...], names: AttentionNames) -> dict:
    """A module's tensors: name suffix -> torch shape."""
    if kind == "conv":
        cout, cin, k = sizes
        return {"weight": (cout, cin, k, k), "bias": (cout,)}
    if kind == "norm":
        return {"weight": sizes, "bias": sizes}
    (c,) = sizes
    weight = (c, c, 1, 1) if names.conv_weights else (c, c)
    tensors = {f"{names.norm}.weight": (c,), f"{names.norm}.bias": (c,)}
    for part in (names.q, names.k, names.v, names.out):
        tensors |= {f"{part}.weight": weight, f"{part}.bias": (c,)}
    return tensors


def expected_layout(modules: list[Module], names: AttentionNames) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape the modules store."""
    return {
        f"{prefix}.{suffix}": shape
        for prefix, _, kind, sizes in modules
        for suffix, shape in _tensors(kind, sizes, names).items()
    }


def _hwio(weight: np.ndarray) -> np.ndarray:
    """torch's [out, in, kh, kw] (or a linear layer's [out, in]) -> HWIO."""
    return (weight[:, :, None, None] if weight.ndim == 2 else weight).transpose(2, 3, 1, 0)


def _module_params(state: dict, prefix: str, kind: str, names: AttentionNames) -> dict:
    get = lambda suffix: state[f"{prefix}.{suffix}"]  # noqa: E731
    if kind == "conv":
        return {"kernel": _hwio(get("weight")), "bias": get("bias")}
    if kind == "norm":
        return {"scale": get("weight"), "bias": get("bias")}
    qkv = (names.q, names.k, names.v)
    return {
        "norm": {"scale": get(f"{names.norm}.weight"), "bias": get(f"{names.norm}.bias")},
        "qkv": {  # one 1x1 convolution to [q; k; v]
            "kernel": np.concatenate([_hwio(get(f"{n}.weight")) for n in qkv], axis=-1),
            "bias": np.concatenate([get(f"{n}.bias") for n in qkv]),
        },
        "out": {"kernel": _hwio(get(f"{names.out}.weight")), "bias": get(f"{names.out}.bias")},
    }


def params(state: dict, modules: list[Module], names: AttentionNames) -> dict:
    """The modules' weights in vitok's layout, as the nested dict their paths describe."""
    tree: dict = {}
    for prefix, path, kind, _ in modules:
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = _module_params(state, prefix, kind, names)
    return tree
