"""LlamaGen's class-conditional GPTs (``c2i_{B,L,XL,XXL,3B}_{256,384}.pt``) and NAR's
(``nar_{b,m,l,xl,xxl}.pt``, ThisisBillhe/NAR) -> vitok's ``ar`` and ``nar`` generators.

Both releases are torch state dicts of one LLaMA-style decoder (LlamaGen's
autoregressive/models/gpt.py; NAR's copy of it adds a block and a head), inside a training
checkpoint's ``"model"`` (DDP), ``"module"`` (DeepSpeed) or ``"state_dict"`` entry or bare
(FSDP), read in that order as their sampling scripts do. The layout, Linear weights stored
[out, in] and no biases anywhere:

    cls_embedding.embedding_table.weight   [classes + 1, D]   (the last row: the null class)
    tok_embeddings.weight                  [V, D]
    layers.{i}.attention_norm.weight, layers.{i}.ffn_norm.weight   [D]   RMSNorm, eps 1e-5
    layers.{i}.attention.wqkv.weight       [3D, D]   rows q, k, v, each head-major
    layers.{i}.attention.wo.weight         [D, D]
    layers.{i}.feed_forward.w1 / w3 / w2   SwiGLU: w2(silu(w1 x) * w3 x)
    norm.weight, output.weight             the final RMSNorm and the logits [V, D]
  NAR only:
    layers.{depth}                         one more block after the backbone
    medusa_norm.weight, medusa_output.weight   the second head, read after that block

Position is a 2D rotary embedding of each token's grid coordinates (no weights; the class
token's queries and keys are zeroed), so the grid is not in the file: it is the preset's
(16 x 16 for the 256-pixel releases; ``--config.model.grid='(24, 24)'`` for 384). Heads are
not in the file either: every release has heads of 64 channels, but LlamaGen's 3B (32 heads
of 100). ``output`` is NAR's right-neighbour head (vitok's head 0), ``medusa_output`` the
lower-neighbour head read after the extra block (head 1); the logits of a token with both
neighbours decoded are the mean of the two heads, as in NAR.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from vitok.interop import CONVERTERS
from vitok.interop.files import ConversionError, check_layout, indices, need
from vitok.interop.torch_files import read_state_dict
from vitok.nn.layers import swiglu_hidden

DEFAULT_PRESET = "configs/nar.py:imagenet256_nar_b"
PREFER = ("model", "module", "state_dict")

# Every release has 64-channel heads but LlamaGen's 3B (width 3200, 32 heads of 100).
HEAD_DIM = 64
HEADS = {(3200, 24): 32}

# Buffers some checkpoints carry beside the weights; derived, never read.
DERIVED = ("freqs_cis", "causal_mask", "proximity_mask")


def read_dims(state: dict, where: str, release: str, extra_blocks: int) -> dict:
    """The architecture a GPT state dict holds, read from its shapes."""
    vocab_size, width = need(state, "tok_embeddings.weight", 2, where, release).shape
    classes = need(state, "cls_embedding.embedding_table.weight", 2, where, release).shape[0]
    layers = indices(state, r"layers\.(\d+)\.")
    if not layers or layers != list(range(len(layers))):
        raise ConversionError(f"{where}: the blocks layers.N must be numbered 0..N-1, got {layers}")
    depth = len(layers) - extra_blocks
    num_heads = HEADS.get((width, depth), width // HEAD_DIM)
    if not num_heads or width % num_heads or width // num_heads % 4:
        raise ConversionError(
            f"{where}: width {width} does not split into {release}'s heads of {HEAD_DIM} channels"
        )
    mlp_dim = need(state, "layers.0.feed_forward.w1.weight", 2, where, release).shape[0]
    return dict(
        width=int(width),
        depth=int(depth),
        num_heads=num_heads,
        mlp_dim=int(mlp_dim),
        vocab_size=int(vocab_size),
        num_classes=int(classes) - 1,
    )


def expected_layout(dims: dict, extra_blocks: int) -> dict[str, tuple[int, ...]]:
    """Every name and shape a release of these dims stores (derived buffers aside)."""
    d, f, v = dims["width"], dims["mlp_dim"], dims["vocab_size"]
    layout = {
        "cls_embedding.embedding_table.weight": (dims["num_classes"] + 1, d),
        "tok_embeddings.weight": (v, d),
        "norm.weight": (d,),
        "output.weight": (v, d),
    }
    for i in range(dims["depth"] + extra_blocks):
        layout |= {
            f"layers.{i}.attention_norm.weight": (d,),
            f"layers.{i}.ffn_norm.weight": (d,),
            f"layers.{i}.attention.wqkv.weight": (3 * d, d),
            f"layers.{i}.attention.wo.weight": (d, d),
            f"layers.{i}.feed_forward.w1.weight": (f, d),
            f"layers.{i}.feed_forward.w3.weight": (f, d),
            f"layers.{i}.feed_forward.w2.weight": (d, f),
        }
    if extra_blocks:
        layout |= {"medusa_norm.weight": (d,), "medusa_output.weight": (v, d)}
    return layout


def block_params(state: dict, i: int, num_heads: int) -> dict:
    """Block ``layers.{i}`` in vitok's ``Block`` layout (norm="rms", mlp="swiglu", no bias)."""
    get = lambda name: state[f"layers.{i}.{name}.weight"]  # noqa: E731
    wqkv = get("attention.wqkv")  # [3D, D], rows (q|k|v, head, channel)
    d = wqkv.shape[1]
    return {
        "norm1": {"scale": get("attention_norm")},
        "norm2": {"scale": get("ffn_norm")},
        "attn": {
            "qkv": wqkv.T.reshape(d, 3, num_heads, d // num_heads),
            "out": get("attention.wo").T.reshape(num_heads, d // num_heads, d),
        },
        "mlp": {
            "gate": {"kernel": get("feed_forward.w1").T},
            "up": {"kernel": get("feed_forward.w3").T},
            "down": {"kernel": get("feed_forward.w2").T},
        },
    }


def convert_gpt(path: str, config: ml_collections.ConfigDict, *, name: str, release: str):
    """A LlamaGen (``name="ar"``) or NAR (``name="nar"``) checkpoint -> (config, params)."""
    extra_blocks = 1 if name == "nar" else 0
    state = read_state_dict(path, prefer=PREFER)
    state = {k: v for k, v in state.items() if k not in DERIVED}
    if name == "ar" and "medusa_output.weight" in state:
        raise ConversionError(f"{path} has NAR's second head: convert it with --from=nar")
    if name == "nar" and "medusa_output.weight" not in state:
        raise ConversionError(
            f"{path} has no medusa_output (NAR's second head): a LlamaGen GPT converts with "
            "--from=llamagen_gpt"
        )
    dims = read_dims(state, path, release, extra_blocks)
    check_layout(state, expected_layout(dims, extra_blocks), path)
    if dims["mlp_dim"] != swiglu_hidden(dims["width"]):
        raise ConversionError(
            f"{path}: SwiGLU width {dims['mlp_dim']} is not LLaMA's "
            f"{swiglu_hidden(dims['width'])} for width {dims['width']}"
        )
    model = config.model
    model.name = name
    for key, value in dims.items():
        model[key] = value
    grid = tuple(model.grid)
    if len(grid) != 2:
        raise ConversionError(f"a {release} GPT decodes a 2D token grid, the config has {grid}")
    model.norm, model.mlp, model.use_bias, model.posemb = "rms", "swiglu", False, "rope2d"
    model.norm_eps, model.rope_base = 1e-5, 10000.0
    model.scan_layers = False
    depth, heads = dims["depth"], dims["num_heads"]
    params = {
        "token_embed": state["tok_embeddings.weight"],
        "class_embed": state["cls_embedding.embedding_table.weight"],
        "blocks": {i: block_params(state, i, heads) for i in range(depth)},
        "extra_blocks": {a: block_params(state, depth + a, heads) for a in range(extra_blocks)},
        "head_norms": {0: {"scale": state["norm.weight"]}},
        "heads": {0: {"kernel": state["output.weight"].T}},
    }
    if extra_blocks:
        params["head_norms"][1] = {"scale": state["medusa_norm.weight"]}
        params["heads"][1] = {"kernel": state["medusa_output.weight"].T}
    return config, as_float32(params)


def as_float32(tree):
    """Nested dicts of contiguous float32 numpy arrays (transposes copied once here)."""
    if isinstance(tree, dict):
        return {k: as_float32(v) for k, v in tree.items()}
    return np.ascontiguousarray(tree, dtype=np.float32)


@CONVERTERS.register("nar")
def convert_nar(path: str, config: ml_collections.ConfigDict):
    """A NAR c2i checkpoint -> vitok's ``nar`` generator (2 heads, one extra block)."""
    return convert_gpt(path, config, name="nar", release="NAR")


@CONVERTERS.register("llamagen_gpt")
def convert_llamagen_gpt(path: str, config: ml_collections.ConfigDict):
    """A LlamaGen c2i GPT checkpoint -> vitok's ``ar`` generator (raster order, 1 head)."""
    return convert_gpt(path, config, name="ar", release="LlamaGen GPT")


convert_llamagen_gpt.default_preset = "configs/nar.py:imagenet256_raster_b"
