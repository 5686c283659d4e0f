"""big_vision's FlexiViT (and plain ViT) .npz checkpoints -> vitok's ViT.

The release (big_vision/models/proj/flexi/vit.py; flexivit_{s,b,l}_i1k.npz and the i21k
ones) stores the patch kernel as HWIO ``embedding/kernel`` [s, s, C, D] at one size s, the
learned ``pos_embedding`` [1, g*g, D] on a g x g grid, both resized to the grid of every call
(the kernel by PI-resize of tf.image.resize's bilinear, the embedding with
jax.image.resize "linear"), adds the embedding before concatenating ``cls``, and runs pre-norm
blocks ``Transformer/encoderblock_{i}`` (or one scanned ``encoderblock`` with a leading layers
axis) with flax's LayerNorm (eps 1e-6) and tanh GELU, a final ``encoder_norm`` and a ``head``.
vitok's ViT takes each of those as an option (kernel_size, posemb_grid,
kernel_resize="bilinear"), so the converted model is the release's at every patch size.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from vitok.interop import CONVERTERS
from vitok.interop.files import ConversionError, check_layout, indices, need, read_npz

DEFAULT_PRESET = "configs/vit.py:flexivit_i1k"

_BLOCK = "Transformer/encoderblock"
RELEASE = "big_vision ViT"


def _fix_old_layouts(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Older big_vision ViTs kept the position embedding inside ``Transformer`` and, before
    2022, as one g*g + 1 table whose first row was the class token's; both become the current
    layout (the class token's row folded into ``cls``, as big_vision's loader does)."""
    arrays = dict(arrays)
    for old in ("Transformer/posembed_input/pos_embedding", "Transformer/pos_embedding"):
        if old in arrays:
            arrays["pos_embedding"] = arrays.pop(old)
    posemb = arrays.get("pos_embedding")
    if posemb is not None and posemb.ndim == 3:
        g = int(np.sqrt(posemb.shape[1] - 1))
        if g * g + 1 == posemb.shape[1] and "cls" in arrays:
            arrays["cls"] = arrays["cls"] + posemb[:, :1]
            arrays["pos_embedding"] = posemb[:, 1:]
    return arrays


def read_dims(arrays: dict[str, np.ndarray], where: str) -> dict:
    """The architecture the file holds, read from its shapes."""
    unsupported = [n for n in arrays if n.startswith(("MAPHead_0", "pre_logits"))]
    if unsupported:
        raise ConversionError(
            f"{where} has {unsupported[0]!r}: MAP-head and pre-logits ViTs are not supported"
        )
    s, s2, channels, width = need(arrays, "embedding/kernel", 4, where, RELEASE).shape
    if s != s2:
        raise ConversionError(f"{where}: embedding/kernel is {s}x{s2}; square kernels only")
    length = need(arrays, "pos_embedding", 3, where, RELEASE).shape[1]
    g = int(round(np.sqrt(length)))
    if g * g != length:
        raise ConversionError(f"{where}: pos_embedding has {length} rows, not a square grid")
    scanned = f"{_BLOCK}/LayerNorm_0/scale" in arrays
    if scanned:
        depth = arrays[f"{_BLOCK}/LayerNorm_0/scale"].shape[0]
        prefix = f"{_BLOCK}/"
        query = need(
            arrays, f"{prefix}MultiHeadDotProductAttention_0/query/kernel", 4, where, RELEASE
        )[0]
        mlp_dim = need(arrays, f"{prefix}MlpBlock_0/Dense_0/kernel", 3, where, RELEASE).shape[-1]
    else:
        found = indices(arrays, rf"{_BLOCK}_(\d+)/")
        depth = max(found) + 1 if found else 0
        if depth == 0:
            raise ConversionError(f"{where} has no {_BLOCK}_0 blocks")
        prefix = f"{_BLOCK}_0/"
        query = need(
            arrays, f"{prefix}MultiHeadDotProductAttention_0/query/kernel", 3, where, RELEASE
        )
        mlp_dim = need(arrays, f"{prefix}MlpBlock_0/Dense_0/kernel", 2, where, RELEASE).shape[-1]
    _, heads, head_dim = query.shape
    num_classes = arrays["head/kernel"].shape[-1] if "head/kernel" in arrays else 0
    return dict(
        kernel_size=int(s), channels=int(channels), width=int(width), posemb_grid=(g, g),
        depth=int(depth), num_heads=int(heads), head_dim=int(head_dim), mlp_dim=int(mlp_dim),
        num_classes=int(num_classes), pool="cls" if "cls" in arrays else "gap", scanned=scanned,
    )  # fmt: skip


def expected_layout(dims: dict) -> dict[str, tuple[int, ...]]:
    """Every name and shape a big_vision ViT with these dims stores."""
    d, h, dh, m = dims["width"], dims["num_heads"], dims["head_dim"], dims["mlp_dim"]
    s, g = dims["kernel_size"], dims["posemb_grid"][0]
    block = {
        "LayerNorm_0/scale": (d,), "LayerNorm_0/bias": (d,),
        "LayerNorm_1/scale": (d,), "LayerNorm_1/bias": (d,),
        "MlpBlock_0/Dense_0/kernel": (d, m), "MlpBlock_0/Dense_0/bias": (m,),
        "MlpBlock_0/Dense_1/kernel": (m, d), "MlpBlock_0/Dense_1/bias": (d,),
        "MultiHeadDotProductAttention_0/out/kernel": (h, dh, d),
        "MultiHeadDotProductAttention_0/out/bias": (d,),
    }  # fmt: skip
    for name in ("query", "key", "value"):
        block[f"MultiHeadDotProductAttention_0/{name}/kernel"] = (d, h, dh)
        block[f"MultiHeadDotProductAttention_0/{name}/bias"] = (h, dh)
    layout = {
        "embedding/kernel": (s, s, dims["channels"], d),
        "embedding/bias": (d,),
        "pos_embedding": (1, g * g, d),
        "Transformer/encoder_norm/scale": (d,),
        "Transformer/encoder_norm/bias": (d,),
    }
    if dims["scanned"]:
        layout |= {f"{_BLOCK}/{k}": (dims["depth"], *v) for k, v in block.items()}
    else:
        for i in range(dims["depth"]):
            layout |= {f"{_BLOCK}_{i}/{k}": v for k, v in block.items()}
    if dims["pool"] == "cls":
        layout["cls"] = (1, 1, d)
    if dims["num_classes"]:
        layout |= {"head/kernel": (d, dims["num_classes"]), "head/bias": (dims["num_classes"],)}
    return layout


def _block_params(arrays: dict[str, np.ndarray], dims: dict, i: int) -> dict:
    """Block i's weights in vitok's layout (an unrolled model's ``encoder/blocks/i``)."""
    if dims["scanned"]:
        get = lambda name: arrays[f"{_BLOCK}/{name}"][i]  # noqa: E731
    else:
        get = lambda name: arrays[f"{_BLOCK}_{i}/{name}"]  # noqa: E731
    attn = "MultiHeadDotProductAttention_0"
    qkv = ("query", "key", "value")
    return {
        "norm1": {"scale": get("LayerNorm_0/scale"), "bias": get("LayerNorm_0/bias")},
        "norm2": {"scale": get("LayerNorm_1/scale"), "bias": get("LayerNorm_1/bias")},
        "attn": {
            "qkv": np.stack([get(f"{attn}/{n}/kernel") for n in qkv], axis=1),  # [D, 3, H, Dh]
            "qkv_bias": np.stack([get(f"{attn}/{n}/bias") for n in qkv]),  # [3, H, Dh]
            "out": get(f"{attn}/out/kernel"),
            "out_bias": get(f"{attn}/out/bias"),
        },
        "mlp": {
            "fc1": {"kernel": get("MlpBlock_0/Dense_0/kernel"), "bias": get("MlpBlock_0/Dense_0/bias")},
            "fc2": {"kernel": get("MlpBlock_0/Dense_1/kernel"), "bias": get("MlpBlock_0/Dense_1/bias")},
        },
    }  # fmt: skip


@CONVERTERS.register("flexivit")
def convert(path: str, config: ml_collections.ConfigDict):
    """A big_vision ViT .npz -> (``config`` with the file's architecture, params in vitok's
    layout as nested dicts of float32 numpy arrays)."""
    arrays = _fix_old_layouts(read_npz(path, strip_prefix="params/"))
    dims = read_dims(arrays, path)
    check_layout(arrays, expected_layout(dims), path)
    model = config.model
    model.name = "vit"
    for key in ("kernel_size", "channels", "width", "depth", "mlp_dim", "num_heads"):
        model[key] = dims[key]
    model.posemb_grid = dims["posemb_grid"]
    model.posemb = "learn"
    model.pool = dims["pool"]
    model.num_classes = dims["num_classes"]
    model.kernel_resize = "bilinear"  # big_vision's PI-resize
    model.scan_layers = False
    s, c, d = dims["kernel_size"], dims["channels"], dims["width"]
    params = {
        "embed": {
            "kernel": arrays["embedding/kernel"].reshape(s * s * c, d),  # rows (y, x, channel)
            "bias": arrays["embedding/bias"],
        },
        "posemb": arrays["pos_embedding"][0],
        "encoder": {
            "blocks": {i: _block_params(arrays, dims, i) for i in range(dims["depth"])},
            "norm": {
                "scale": arrays["Transformer/encoder_norm/scale"],
                "bias": arrays["Transformer/encoder_norm/bias"],
            },
        },
    }
    if dims["pool"] == "cls":
        params["cls"] = arrays["cls"][0]
    if dims["num_classes"]:
        params["head"] = {"kernel": arrays["head/kernel"], "bias": arrays["head/bias"]}
    return config, params
