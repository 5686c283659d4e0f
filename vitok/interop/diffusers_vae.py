"""FlexTok's released VAEs (EPFL-VILAB/flextok_vae_c4, _c8, _c16 on the Hugging Face hub) ->
vitok's KL autoencoder (``vitok.models.vae``, model ``vae`` with ``quant_conv``).

They are diffusers ``AutoencoderKL`` models (apple/ml-flextok, flextok/vae_wrapper.py: SD's
layout, block widths 128/256/512/512, 2 ResBlocks per level, 32 GroupNorm groups): a
``diffusion_pytorch_model.safetensors`` beside a ``config.json`` that holds the
``scaling_factor`` FlexTok multiplies the latents by. The converter reads every size from the
tensors' shapes and the scaling factor from that config.json (or ``--config.model.latent_scale``
when the file stands alone). Layout: ``encoder.conv_in``; ``encoder.down_blocks.{i}`` with
``resnets.{j}`` (``norm1``, ``conv1``, ``norm2``, ``conv2``, a 1x1 ``conv_shortcut`` where the
width changes) and, but for the last level, ``downsamplers.0.conv`` (stride 2, padded right
and bottom); ``encoder.mid_block`` (``resnets.0``, ``attentions.0`` with ``group_norm`` and
linear ``to_q``/``to_k``/``to_v``/``to_out.0``, ``resnets.1``); ``encoder.conv_norm_out``,
``encoder.conv_out``; ``quant_conv``, ``post_quant_conv`` (1x1); the decoder mirrored with
``up_blocks`` from the lowest resolution up, one more ResBlock each and ``upsamplers.0.conv``.
Older diffusers files name the attention ``query``/``key``/``value``/``proj_attn``; those
are read too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import ml_collections

from vitok.interop import CONVERTERS, conv_layout
from vitok.interop.conv_layout import AttentionNames, Module, attention, conv, resblock
from vitok.interop.files import ConversionError, check_layout, indices, need
from vitok.interop.safetensors_files import read_safetensors

DEFAULT_PRESET = "configs/vae.py:imagenet256_f8c16"
RELEASE = "diffusers AutoencoderKL"

_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _modern_names(state: dict) -> dict:
    """Old diffusers attention names -> today's (the weights are the same)."""
    out = {}
    for name, value in state.items():
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in _OLD_ATTENTION and "attentions" in parts:
            name = ".".join([*parts[:-2], _OLD_ATTENTION[parts[-2]], parts[-1]])
        out[name] = value
    return out


def read_dims(state: dict, where: str) -> dict:
    """The architecture an AutoencoderKL state dict holds, read from its shapes."""
    width, channels = need(state, "encoder.conv_in.weight", 4, where, RELEASE).shape[:2]
    levels = indices(state, r"encoder\.down_blocks\.(\d+)\.")
    blocks = indices(state, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")
    if not levels or not blocks:
        raise ConversionError(f"{where} has no encoder.down_blocks.0.resnets.0")
    widths = [
        need(state, f"encoder.down_blocks.{i}.resnets.0.conv2.weight", 4, where, RELEASE).shape[0]
        for i in levels
    ]
    if any(w % width for w in widths):
        raise ConversionError(f"{where}: block widths {widths} are not multiples of {width}")
    latent = need(state, "decoder.conv_in.weight", 4, where, RELEASE).shape[1]
    return dict(
        channels=int(channels), width=int(width), mults=tuple(int(w // width) for w in widths),
        blocks=len(blocks), latent_channels=int(latent),
    )  # fmt: skip


NAMES = AttentionNames("group_norm", "to_q", "to_k", "to_v", "to_out.0", conv_weights=False)


def _resblock(prefix: str, path: tuple, cin: int, cout: int) -> Iterator[Module]:
    return resblock(prefix, path, cin, cout, shortcut="conv_shortcut")


def _mid(part: str, c: int) -> Iterator[Module]:
    yield from _resblock(f"{part}.mid_block.resnets.0", (part, "mid", 0), c, c)
    yield attention(f"{part}.mid_block.attentions.0", (part, "mid", 1), c)
    yield from _resblock(f"{part}.mid_block.resnets.1", (part, "mid", 2), c, c)


def modules(dims: dict) -> list[Module]:
    """Every module of the release in order, with the vitok path it becomes."""
    widths = [dims["width"] * m for m in dims["mults"]]
    last, blocks, z = len(widths) - 1, dims["blocks"], dims["latent_channels"]
    out = [conv("encoder.conv_in", ("encoder", "conv_in"), widths[0], dims["channels"], 3)]
    index, c = 0, widths[0]
    for level, w in enumerate(widths):
        prefix = f"encoder.down_blocks.{level}"
        for j in range(blocks):
            out += _resblock(f"{prefix}.resnets.{j}", ("encoder", "blocks", index), c, w)
            index, c = index + 1, w
        if level != last:
            path = ("encoder", "blocks", index)
            out.append(conv(f"{prefix}.downsamplers.0.conv", path, c, c, 3))
            index += 1
    out += _mid("encoder", c)
    out += [
        ("encoder.conv_norm_out", ("encoder", "norm"), "norm", (c,)),
        conv("encoder.conv_out", ("encoder", "conv_out"), 2 * z, c, 3),
        conv("quant_conv", ("quant_conv",), 2 * z, 2 * z, 1),
        conv("post_quant_conv", ("post_quant_conv",), z, z, 1),
        conv("decoder.conv_in", ("decoder", "conv_in"), c, z, 3),
    ]
    out += _mid("decoder", c)
    index = 0
    for j, level in enumerate(reversed(range(len(widths)))):
        prefix = f"decoder.up_blocks.{j}"
        for i in range(blocks + 1):
            out += _resblock(
                f"{prefix}.resnets.{i}", ("decoder", "blocks", index), c, widths[level]
            )
            index, c = index + 1, widths[level]
        if level != 0:
            path = ("decoder", "blocks", index, "conv")
            out.append(conv(f"{prefix}.upsamplers.0.conv", path, c, c, 3))
            index += 1
    out.append(("decoder.conv_norm_out", ("decoder", "norm"), "norm", (c,)))
    out.append(conv("decoder.conv_out", ("decoder", "conv_out"), dims["channels"], c, 3))
    return out


def expected_layout(dims: dict) -> dict[str, tuple[int, ...]]:
    """Every name and shape an AutoencoderKL with these dims stores."""
    return conv_layout.expected_layout(modules(dims), NAMES)


def scaling_factor(path: str, given: float) -> float:
    """The latent scale: the ``scaling_factor`` of the config.json beside ``path`` (the hub
    repository's layout), else ``given`` (the config's ``model.latent_scale``)."""
    config_path = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    if not os.path.isfile(config_path):
        return float(given)
    try:
        with open(config_path) as f:
            value = json.load(f).get("scaling_factor")
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"{config_path} is not a readable diffusers config ({e})") from None
    return float(given) if value is None else float(value)


def convert_state(
    state: dict, model: ml_collections.ConfigDict, where: str, latent_scale: float
) -> dict:
    """An AutoencoderKL state dict -> params in vitok's ``vae`` layout; fills ``model`` (a
    ``config.model``) with its architecture and ``latent_scale``."""
    state = _modern_names(state)
    projections = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")
    state = {  # SD's original checkpoints stored them as 1x1 convolutions
        n: v[:, :, 0, 0] if n.endswith(projections) and v.ndim == 4 else v for n, v in state.items()
    }
    dims = read_dims(state, where)
    check_layout(state, expected_layout(dims), where)
    model.name = "vae"
    for key, value in dims.items():
        model[key] = value
    model.quant_conv = True
    model.latent_scale = float(latent_scale)
    return conv_layout.params(state, modules(dims), NAMES)


@CONVERTERS.register("flextok_vae")
def convert(path: str, config: ml_collections.ConfigDict):
    """A diffusers AutoencoderKL .safetensors -> (``config`` with its architecture and latent
    scale, params in vitok's ``vae`` layout as nested dicts of numpy arrays)."""
    state, _ = read_safetensors(path)
    scale = scaling_factor(path, config.model.get("latent_scale", 1.0))
    return config, convert_state(state, config.model, path, scale)
