"""LlamaGen's released VQ tokenizers (``vq_ds16_c2i.pt``, ``vq_ds8_c2i.pt``) -> vitok's
``vq_ae`` (``vitok.models.vq``).

The release (FoundationVision/LlamaGen, tokenizer/tokenizer_image/vq_model.py) is a torch
state dict, inside a training checkpoint's ``"ema"`` or ``"model"`` entry, read in that order
as LlamaGen's own loaders do. Its layout: ``encoder.conv_in``; ``encoder.conv_blocks.{level}``
with ``res.{i}`` ResBlocks (GroupNorm(32, eps 1e-6) ``norm1``/``norm2``, 3x3 ``conv1``/
``conv2``, a 1x1 ``nin_shortcut`` where the width changes), ``attn.{i}`` after every ResBlock
of the last level (``norm`` and 1x1 ``q``/``k``/``v``/``proj_out``) and a ``downsample.conv``
(3x3, stride 2, padded right and bottom) between levels; ``encoder.mid.{0,1,2}`` (ResBlock,
attention, ResBlock), ``encoder.norm_out``, ``encoder.conv_out`` (to z channels);
``quant_conv`` (1x1 to the codebook dim); ``quantize.embedding.weight`` [K, d] (L2-normalized
before use) and its ``codebook_used`` usage buffer (ignored); ``post_quant_conv``; the decoder
mirrored, its ``conv_blocks`` from the lowest resolution up with one more ResBlock per level
and a nearest-neighbour ``upsample.conv``. Every size is read from the file's shapes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import ml_collections
import numpy as np

from vitok.interop import CONVERTERS
from vitok.interop.files import ConversionError, check_layout
from vitok.interop.torch_files import read_state_dict

DEFAULT_PRESET = "configs/vae.py:llamagen_vq16"

# One module of the release: (torch prefix, vitok path, kind, sizes).
Module = tuple[str, tuple, str, tuple[int, ...]]


def _need(state: dict, name: str, ndim: int, where: str) -> np.ndarray:
    if name not in state:
        raise ConversionError(f"{where} has no {name!r}: is it a LlamaGen VQ checkpoint?")
    if state[name].ndim != ndim:
        raise ConversionError(f"{where}: {name} is {list(state[name].shape)}, expected {ndim} dims")
    return state[name]


def _indices(state: dict, pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for name in state if (m := re.match(pattern, name))})


def read_dims(state: dict, where: str) -> dict:
    """The architecture a VQ state dict holds, read from its shapes."""
    width, channels = _need(state, "encoder.conv_in.weight", 4, where).shape[:2]
    levels = _indices(state, r"encoder\.conv_blocks\.(\d+)\.")
    blocks = _indices(state, r"encoder\.conv_blocks\.0\.res\.(\d+)\.")
    if not levels or not blocks:
        raise ConversionError(f"{where} has no encoder.conv_blocks.0.res.0 ResBlock")
    widths = [
        _need(state, f"encoder.conv_blocks.{i}.res.0.conv2.weight", 4, where).shape[0]
        for i in levels
    ]
    decoder_widths = [
        _need(state, f"decoder.conv_blocks.{i}.res.0.conv2.weight", 4, where).shape[0]
        for i in reversed(levels)
    ]
    if decoder_widths != widths or any(w % width for w in widths):
        raise ConversionError(
            f"{where}: encoder widths {widths} and decoder widths {decoder_widths} must be equal "
            f"multiples of {width}"
        )
    codebook_size, codebook_dim = _need(state, "quantize.embedding.weight", 2, where).shape
    return dict(
        channels=int(channels), width=int(width), mults=tuple(int(w // width) for w in widths),
        blocks=len(blocks), z_channels=int(_need(state, "encoder.conv_out.weight", 4, where).shape[0]),
        codebook_size=int(codebook_size), codebook_dim=int(codebook_dim),
    )  # fmt: skip


def _resblock(prefix: str, path: tuple, cin: int, cout: int) -> Iterator[Module]:
    yield f"{prefix}.norm1", (*path, "norm1"), "norm", (cin,)
    yield f"{prefix}.conv1", (*path, "conv1"), "conv", (cout, cin, 3)
    yield f"{prefix}.norm2", (*path, "norm2"), "norm", (cout,)
    yield f"{prefix}.conv2", (*path, "conv2"), "conv", (cout, cout, 3)
    if cin != cout:
        yield f"{prefix}.nin_shortcut", (*path, "skip"), "conv", (cout, cin, 1)


def _attention(prefix: str, path: tuple, c: int) -> Iterator[Module]:
    yield prefix, path, "attention", (c,)


def modules(dims: dict) -> list[Module]:
    """Every module of the release in order, with the vitok path it becomes: the encoder's
    and decoder's ``blocks`` lists hold the ResBlocks, attention layers and resamplers in
    the order the release runs them."""
    widths = [dims["width"] * m for m in dims["mults"]]
    last, blocks, z, d = len(widths) - 1, dims["blocks"], dims["z_channels"], dims["codebook_dim"]
    out = [("encoder.conv_in", ("encoder", "conv_in"), "conv", (widths[0], dims["channels"], 3))]
    index, c = 0, widths[0]
    for level, w in enumerate(widths):
        for i in range(blocks):
            out += _resblock(
                f"encoder.conv_blocks.{level}.res.{i}", ("encoder", "blocks", index), c, w
            )
            index, c = index + 1, w
            if level == last:
                out += _attention(
                    f"encoder.conv_blocks.{level}.attn.{i}", ("encoder", "blocks", index), c
                )
                index += 1
        if level != last:
            out.append(
                (
                    f"encoder.conv_blocks.{level}.downsample.conv",
                    ("encoder", "blocks", index),
                    "conv",
                    (c, c, 3),
                )
            )
            index += 1
    for part in ("encoder", "decoder"):
        if part == "decoder":
            out.append(("decoder.conv_in", ("decoder", "conv_in"), "conv", (c, z, 3)))
        out += _resblock(f"{part}.mid.0", (part, "mid", 0), c, c)
        out += _attention(f"{part}.mid.1", (part, "mid", 1), c)
        out += _resblock(f"{part}.mid.2", (part, "mid", 2), c, c)
        if part == "encoder":
            out.append(("encoder.norm_out", ("encoder", "norm"), "norm", (c,)))
            out.append(("encoder.conv_out", ("encoder", "conv_out"), "conv", (z, c, 3)))
            out.append(("quant_conv", ("quant_conv",), "conv", (d, z, 1)))
            out.append(("post_quant_conv", ("post_quant_conv",), "conv", (z, d, 1)))
    index = 0
    for j, level in enumerate(reversed(range(len(widths)))):
        for i in range(blocks + 1):
            out += _resblock(
                f"decoder.conv_blocks.{j}.res.{i}", ("decoder", "blocks", index), c, widths[level]
            )
            index, c = index + 1, widths[level]
            if level == last:
                out += _attention(
                    f"decoder.conv_blocks.{j}.attn.{i}", ("decoder", "blocks", index), c
                )
                index += 1
        if level != 0:
            out.append(
                (
                    f"decoder.conv_blocks.{j}.upsample.conv",
                    ("decoder", "blocks", index, "conv"),
                    "conv",
                    (c, c, 3),
                )
            )
            index += 1
    out.append(("decoder.norm_out", ("decoder", "norm"), "norm", (c,)))
    out.append(("decoder.conv_out", ("decoder", "conv_out"), "conv", (dims["channels"], c, 3)))
    return out  # fmt: skip


def _tensors(kind: str, sizes: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """A module's tensors (name suffix -> torch shape)."""
    if kind == "conv":
        cout, cin, k = sizes
        return {"weight": (cout, cin, k, k), "bias": (cout,)}
    if kind == "norm":
        return {"weight": sizes, "bias": sizes}
    (c,) = sizes
    tensors = {"norm.weight": (c,), "norm.bias": (c,)}
    for name in ("q", "k", "v", "proj_out"):
        tensors |= {f"{name}.weight": (c, c, 1, 1), f"{name}.bias": (c,)}
    return tensors


def expected_layout(dims: dict) -> dict[str, tuple[int, ...]]:
    """Every name and shape a LlamaGen VQ with these dims stores (``codebook_used`` aside)."""
    layout = {
        f"{prefix}.{name}": shape
        for prefix, _, kind, sizes in modules(dims)
        for name, shape in _tensors(kind, sizes).items()
    }
    layout["quantize.embedding.weight"] = (dims["codebook_size"], dims["codebook_dim"])
    return layout


def _conv(weight: np.ndarray) -> np.ndarray:
    """torch's [out, in, kh, kw] -> HWIO."""
    return weight.transpose(2, 3, 1, 0)


def _module_params(state: dict, prefix: str, kind: str) -> dict:
    get = lambda name: state[f"{prefix}.{name}"]  # noqa: E731
    if kind == "conv":
        return {"kernel": _conv(get("weight")), "bias": get("bias")}
    if kind == "norm":
        return {"scale": get("weight"), "bias": get("bias")}
    return {
        "norm": {"scale": get("norm.weight"), "bias": get("norm.bias")},
        "qkv": {
            "kernel": np.concatenate([_conv(get(f"{n}.weight")) for n in "qkv"], axis=-1),
            "bias": np.concatenate([get(f"{n}.bias") for n in "qkv"]),
        },
        "out": {"kernel": _conv(get("proj_out.weight")), "bias": get("proj_out.bias")},
    }


def nest(flat: dict[tuple, dict]) -> dict:
    """{path tuple: value} -> the nested dict those paths describe."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


@CONVERTERS.register("llamagen_vq")
def convert(path: str, config: ml_collections.ConfigDict):
    """A LlamaGen VQ checkpoint -> (``config`` with the file's architecture, params in vitok's
    ``vq_ae`` layout as nested dicts of numpy arrays)."""
    state = read_state_dict(path, prefer=("ema", "model", "state_dict"))
    state = {k: v for k, v in state.items() if k != "quantize.codebook_used"}
    dims = read_dims(state, path)
    check_layout(state, expected_layout(dims), path)
    model = config.model
    model.name = "vq_ae"
    for key, value in dims.items():
        model[key] = value
    model.l2_normalize = True  # LlamaGen's codebook_l2_norm, on in every release
    params = {
        path_: _module_params(state, prefix, kind) for prefix, path_, kind, _ in modules(dims)
    }
    params = nest(params)
    params["codebook"] = state["quantize.embedding.weight"]
    return config, params
