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

from collections.abc import Iterator

import ml_collections

from vitok.interop import CONVERTERS, conv_layout
from vitok.interop.conv_layout import AttentionNames, Module, attention, conv, resblock
from vitok.interop.files import ConversionError, check_layout, indices, need
from vitok.interop.torch_files import read_state_dict

DEFAULT_PRESET = "configs/vae.py:llamagen_vq16"
RELEASE = "LlamaGen VQ"


def read_dims(state: dict, where: str) -> dict:
    """The architecture a VQ state dict holds, read from its shapes."""
    width, channels = need(state, "encoder.conv_in.weight", 4, where, RELEASE).shape[:2]
    levels = indices(state, r"encoder\.conv_blocks\.(\d+)\.")
    blocks = indices(state, r"encoder\.conv_blocks\.0\.res\.(\d+)\.")
    if not levels or not blocks:
        raise ConversionError(f"{where} has no encoder.conv_blocks.0.res.0 ResBlock")
    widths = [
        need(state, f"encoder.conv_blocks.{i}.res.0.conv2.weight", 4, where, RELEASE).shape[0]
        for i in levels
    ]
    decoder_widths = [
        need(state, f"decoder.conv_blocks.{i}.res.0.conv2.weight", 4, where, RELEASE).shape[0]
        for i in reversed(levels)
    ]
    if decoder_widths != widths or any(w % width for w in widths):
        raise ConversionError(
            f"{where}: encoder widths {widths} and decoder widths {decoder_widths} must be equal "
            f"multiples of {width}"
        )
    codebook_size, codebook_dim = need(state, "quantize.embedding.weight", 2, where, RELEASE).shape
    return dict(
        channels=int(channels), width=int(width), mults=tuple(int(w // width) for w in widths),
        blocks=len(blocks), z_channels=int(need(state, "encoder.conv_out.weight", 4, where, RELEASE).shape[0]),
        codebook_size=int(codebook_size), codebook_dim=int(codebook_dim),
    )  # fmt: skip


NAMES = AttentionNames("norm", "q", "k", "v", "proj_out", conv_weights=True)


def _resblock(prefix: str, path: tuple, cin: int, cout: int) -> Iterator[Module]:
    return resblock(prefix, path, cin, cout, shortcut="nin_shortcut")


def modules(dims: dict) -> list[Module]:
    """Every module of the release in order, with the vitok path it becomes: the encoder's
    and decoder's ``blocks`` lists hold the ResBlocks, attention layers and resamplers in
    the order the release runs them."""
    widths = [dims["width"] * m for m in dims["mults"]]
    last, blocks, z, d = len(widths) - 1, dims["blocks"], dims["z_channels"], dims["codebook_dim"]
    out = [conv("encoder.conv_in", ("encoder", "conv_in"), widths[0], dims["channels"], 3)]
    index, c = 0, widths[0]
    for level, w in enumerate(widths):
        prefix = f"encoder.conv_blocks.{level}"
        for i in range(blocks):
            out += _resblock(f"{prefix}.res.{i}", ("encoder", "blocks", index), c, w)
            index, c = index + 1, w
            if level == last:
                out.append(attention(f"{prefix}.attn.{i}", ("encoder", "blocks", index), c))
                index += 1
        if level != last:
            out.append(conv(f"{prefix}.downsample.conv", ("encoder", "blocks", index), c, c, 3))
            index += 1
    for part in ("encoder", "decoder"):
        if part == "decoder":
            out.append(conv("decoder.conv_in", ("decoder", "conv_in"), c, z, 3))
        out += _resblock(f"{part}.mid.0", (part, "mid", 0), c, c)
        out.append(attention(f"{part}.mid.1", (part, "mid", 1), c))
        out += _resblock(f"{part}.mid.2", (part, "mid", 2), c, c)
        if part == "encoder":
            out += [
                ("encoder.norm_out", ("encoder", "norm"), "norm", (c,)),
                conv("encoder.conv_out", ("encoder", "conv_out"), z, c, 3),
                conv("quant_conv", ("quant_conv",), d, z, 1),
                conv("post_quant_conv", ("post_quant_conv",), z, d, 1),
            ]
    index = 0
    for j, level in enumerate(reversed(range(len(widths)))):
        prefix = f"decoder.conv_blocks.{j}"
        for i in range(blocks + 1):
            out += _resblock(f"{prefix}.res.{i}", ("decoder", "blocks", index), c, widths[level])
            index, c = index + 1, widths[level]
            if level == last:
                out.append(attention(f"{prefix}.attn.{i}", ("decoder", "blocks", index), c))
                index += 1
        if level != 0:
            path = ("decoder", "blocks", index, "conv")
            out.append(conv(f"{prefix}.upsample.conv", path, c, c, 3))
            index += 1
    out.append(("decoder.norm_out", ("decoder", "norm"), "norm", (c,)))
    out.append(conv("decoder.conv_out", ("decoder", "conv_out"), dims["channels"], c, 3))
    return out


def expected_layout(dims: dict) -> dict[str, tuple[int, ...]]:
    """Every name and shape a LlamaGen VQ with these dims stores (``codebook_used`` aside)."""
    layout = conv_layout.expected_layout(modules(dims), NAMES)
    layout["quantize.embedding.weight"] = (dims["codebook_size"], dims["codebook_dim"])
    return layout


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
    params = conv_layout.params(state, modules(dims), NAMES)
    params["codebook"] = state["quantize.embedding.weight"]
    return config, params
