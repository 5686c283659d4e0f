"""The FID Inception-v3 (TensorFlow's 2015-12-05 graph, as pytorch-fid ports it) in JAX.

    net = InceptionFID.from_file("pt_inception-2015-12-05-6726825d.pth")
    feats = net.features(images)          # images [B, H, W, 3] in [-1, 1] -> [B, 2048]

Loads pytorch-fid's weights file (its ``FID_WEIGHTS_URL``; read without torch, see
``vitok.interop.torch_files``) and computes what pytorch-fid computes: the images taken to
[0, 1], resized to 299 x 299 bilinearly (half-pixel centres, no antialiasing: torch's
``F.interpolate(..., align_corners=False)``), scaled to [-1, 1], then torchvision's
Inception-v3 stem and blocks with pytorch-fid's FID variants (average pools that exclude the
padding; a max pool in the last block), batch norm (eps 1e-3) folded into each convolution.
``block`` picks pytorch-fid's output: 0 (64-d, first max pool), 1 (192-d), 2 (768-d), 3
(2048-d pool features, the FID standard); spatial maps are averaged as pytorch-fid does.
``logits`` adds the 1008-way classifier (softmax of it gives the Inception Score).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vitok.interop.files import ConversionError
from vitok.interop.torch_files import read_state_dict
from vitok.nn.flexi import linear_resize_matrix

BN_EPS = 1e-3
INPUT_SIZE = 299

# Every BasicConv2d of the network: name -> (stride, (pad_h, pad_w)); kernel sizes come from
# the weights. Stem first, then each Mixed block's branches.
_STEM = {
    "Conv2d_1a_3x3": (2, (0, 0)), "Conv2d_2a_3x3": (1, (0, 0)), "Conv2d_2b_3x3": (1, (1, 1)),
    "Conv2d_3b_1x1": (1, (0, 0)), "Conv2d_4a_3x3": (1, (0, 0)),
}  # fmt: skip
_A = {"branch1x1": (1, (0, 0)), "branch5x5_1": (1, (0, 0)), "branch5x5_2": (1, (2, 2)),
      "branch3x3dbl_1": (1, (0, 0)), "branch3x3dbl_2": (1, (1, 1)),
      "branch3x3dbl_3": (1, (1, 1)), "branch_pool": (1, (0, 0))}  # fmt: skip
_B = {"branch3x3": (2, (0, 0)), "branch3x3dbl_1": (1, (0, 0)), "branch3x3dbl_2": (1, (1, 1)),
      "branch3x3dbl_3": (2, (0, 0))}  # fmt: skip
_C = {"branch1x1": (1, (0, 0)), "branch7x7_1": (1, (0, 0)), "branch7x7_2": (1, (0, 3)),
      "branch7x7_3": (1, (3, 0)), "branch7x7dbl_1": (1, (0, 0)), "branch7x7dbl_2": (1, (3, 0)),
      "branch7x7dbl_3": (1, (0, 3)), "branch7x7dbl_4": (1, (3, 0)),
      "branch7x7dbl_5": (1, (0, 3)), "branch_pool": (1, (0, 0))}  # fmt: skip
_D = {"branch3x3_1": (1, (0, 0)), "branch3x3_2": (2, (0, 0)), "branch7x7x3_1": (1, (0, 0)),
      "branch7x7x3_2": (1, (0, 3)), "branch7x7x3_3": (1, (3, 0)),
      "branch7x7x3_4": (2, (0, 0))}  # fmt: skip
_E = {"branch1x1": (1, (0, 0)), "branch3x3_1": (1, (0, 0)), "branch3x3_2a": (1, (0, 1)),
      "branch3x3_2b": (1, (1, 0)), "branch3x3dbl_1": (1, (0, 0)), "branch3x3dbl_2": (1, (1, 1)),
      "branch3x3dbl_3a": (1, (0, 1)), "branch3x3dbl_3b": (1, (1, 0)),
      "branch_pool": (1, (0, 0))}  # fmt: skip
MIXED = {"Mixed_5b": _A, "Mixed_5c": _A, "Mixed_5d": _A, "Mixed_6a": _B, "Mixed_6b": _C,
         "Mixed_6c": _C, "Mixed_6d": _C, "Mixed_6e": _C, "Mixed_7a": _D, "Mixed_7b": _E,
         "Mixed_7c": _E}  # fmt: skip
CONVS = {
    **_STEM,
    **{f"{m}.{b}": spec for m, branches in MIXED.items() for b, spec in branches.items()},
}


def _fold_batch_norm(state: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    """A BasicConv2d's conv weight (OIHW) and batch norm -> {kernel HWIO, scale, shift}."""
    w = state[f"{name}.conv.weight"]
    scale = state[f"{name}.bn.weight"] / np.sqrt(state[f"{name}.bn.running_var"] + BN_EPS)
    shift = state[f"{name}.bn.bias"] - state[f"{name}.bn.running_mean"] * scale
    return {"kernel": np.transpose(w, (2, 3, 1, 0)), "scale": scale, "shift": shift}


def expected_keys(state: dict[str, np.ndarray]) -> list[str]:
    keys = ["fc.weight", "fc.bias"]
    for name in CONVS:
        keys += [f"{name}.conv.weight"] + [
            f"{name}.bn.{k}" for k in ("weight", "bias", "running_mean", "running_var")
        ]
    return keys


def params_from_state_dict(state: dict[str, np.ndarray], where: str) -> dict:
    """pytorch-fid's state dict -> {conv name: folded conv, "fc": {kernel, bias}} float32."""
    missing = [k for k in expected_keys(state) if k not in state]
    allowed = set(expected_keys(state)) | {f"{n}.bn.num_batches_tracked" for n in CONVS}
    unexpected = [k for k in state if k not in allowed]
    if missing or unexpected:
        listed = [f"missing {k}" for k in missing[:6]] + [f"unexpected {k}" for k in unexpected[:6]]
        raise ConversionError(
            f"{where} is not pytorch-fid's Inception-v3 weights: " + "; ".join(listed)
        )
    params = {name: _fold_batch_norm(state, name) for name in CONVS}
    params["fc"] = {"kernel": state["fc.weight"].T, "bias": state["fc.bias"]}
    return jax.tree.map(lambda a: np.asarray(a, np.float32), params)


def _conv(p: dict, x: jax.Array, name: str) -> jax.Array:
    stride, (ph, pw) = CONVS[name]
    y = jax.lax.conv_general_dilated(
        x, p[name]["kernel"], (stride, stride), [(ph, ph), (pw, pw)],
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST,
    )  # fmt: skip
    return jax.nn.relu(y * p[name]["scale"] + p[name]["shift"])


def _max_pool(x: jax.Array, stride: int, pad: int = 0) -> jax.Array:
    pads = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), pads
    )


def _avg_pool_excluding_padding(x: jax.Array) -> jax.Array:
    """3x3, stride 1, pad 1, each mean over the window's pixels inside the image."""
    pads = ((0, 0), (1, 1), (1, 1), (0, 0))
    window = ((1, 3, 3, 1), (1, 1, 1, 1), pads)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, *window)
    count = jax.lax.reduce_window(jnp.ones_like(x[:1, :, :, :1]), 0.0, jax.lax.add, *window)
    return total / count


def _mixed(p: dict, x: jax.Array, name: str) -> jax.Array:
    c = lambda branch, y: _conv(p, y, f"{name}.{branch}")  # noqa: E731
    kind = MIXED[name]
    if kind is _A:
        b5 = c("branch5x5_2", c("branch5x5_1", x))
        b3 = c("branch3x3dbl_3", c("branch3x3dbl_2", c("branch3x3dbl_1", x)))
        pool = c("branch_pool", _avg_pool_excluding_padding(x))
        return jnp.concatenate([c("branch1x1", x), b5, b3, pool], -1)
    if kind is _B:
        b3 = c("branch3x3", x)
        bd = c("branch3x3dbl_3", c("branch3x3dbl_2", c("branch3x3dbl_1", x)))
        return jnp.concatenate([b3, bd, _max_pool(x, 2)], -1)
    if kind is _C:
        b7 = c("branch7x7_3", c("branch7x7_2", c("branch7x7_1", x)))
        bd = x
        for i in range(1, 6):
            bd = c(f"branch7x7dbl_{i}", bd)
        pool = c("branch_pool", _avg_pool_excluding_padding(x))
        return jnp.concatenate([c("branch1x1", x), b7, bd, pool], -1)
    if kind is _D:
        b3 = c("branch3x3_2", c("branch3x3_1", x))
        b7 = x
        for i in range(1, 5):
            b7 = c(f"branch7x7x3_{i}", b7)
        return jnp.concatenate([b3, b7, _max_pool(x, 2)], -1)
    b3 = c("branch3x3_1", x)
    b3 = jnp.concatenate([c("branch3x3_2a", b3), c("branch3x3_2b", b3)], -1)
    bd = c("branch3x3dbl_2", c("branch3x3dbl_1", x))
    bd = jnp.concatenate([c("branch3x3dbl_3a", bd), c("branch3x3dbl_3b", bd)], -1)
    # pytorch-fid: the first E block average-pools (padding excluded), the last max-pools.
    pooled = _avg_pool_excluding_padding(x) if name == "Mixed_7b" else _max_pool(x, 1, 1)
    return jnp.concatenate([c("branch1x1", x), b3, bd, c("branch_pool", pooled)], -1)


def resize_to_input(images01: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, 299, 299, C]: torch's bilinear ``F.interpolate`` (align_corners
    False, no antialiasing), as separable matrices."""
    _, h, w, _ = images01.shape
    rows = jnp.asarray(linear_resize_matrix(h, INPUT_SIZE, False))
    cols = jnp.asarray(linear_resize_matrix(w, INPUT_SIZE, False))
    hp = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,bhwc->bowc", rows, images01, precision=hp)
    return jnp.einsum("pw,bowc->bopc", cols, x, precision=hp)


def forward(params: dict, images: jax.Array, block: int = 3, logits: bool = False):
    """images [B, H, W, 3] (or grey [B, H, W, 1], repeated to RGB) in [-1, 1] -> pytorch-fid's
    features [B, 64|192|768|2048] at ``block`` (or, with ``logits``, the pair (pool features
    [B, 2048], the 1008 classifier logits [B, 1008]))."""
    if images.shape[-1] == 1:
        images = jnp.repeat(images, 3, axis=-1)
    x = (images.astype(jnp.float32) + 1) / 2  # pytorch-fid's input range
    x = 2 * resize_to_input(x) - 1
    for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
        x = _conv(params, x, name)
    x = _max_pool(x, 2)
    if block >= 1:
        x = _max_pool(_conv(params, _conv(params, x, "Conv2d_3b_1x1"), "Conv2d_4a_3x3"), 2)
    if block >= 2:
        for name in list(MIXED)[:8]:
            x = _mixed(params, x, name)
    if block >= 3:
        for name in list(MIXED)[8:]:
            x = _mixed(params, x, name)
    pooled = x.mean(axis=(1, 2))
    if logits:
        return pooled, pooled @ params["fc"]["kernel"] + params["fc"]["bias"]
    return pooled


class InceptionFID:
    """pytorch-fid's Inception-v3 with loaded weights; ``features`` / ``logits`` are jitted."""

    def __init__(self, params: dict, block: int = 3):
        if block not in (0, 1, 2, 3):
            raise ValueError(f"pytorch-fid's output blocks are 0..3, got {block}")
        self.params = jax.tree.map(jnp.asarray, params)
        self.block = block
        self.dims = (64, 192, 768, 2048)[block]
        self._features = jax.jit(functools.partial(forward, block=block))
        self._logits = jax.jit(functools.partial(forward, block=3, logits=True))

    @classmethod
    def from_file(cls, path: str, block: int = 3) -> InceptionFID:
        return cls(params_from_state_dict(read_state_dict(path), path), block)

    def features(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, 3] in [-1, 1] -> [B, dims] float32."""
        return self._features(self.params, images)

    def logits(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, 3] in [-1, 1] -> the 1008 classifier logits [B, 1008]."""
        return self._logits(self.params, images)[1]

    def pool_and_logits(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One pass: (pool features [B, 2048], logits [B, 1008])."""
        return self._logits(self.params, images)


def inception_score(logits: np.ndarray, splits: int = 10) -> float:
    """Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))) of the 1008-way
    softmax, computed on each of ``splits`` equal parts and averaged, as the standard
    implementations report it."""
    logits = np.asarray(logits, np.float64)
    if len(logits) < splits:
        raise ValueError(f"the Inception Score over {splits} splits needs at least {splits} images")
    scores = []
    for part in np.array_split(logits, splits):
        log_p = part - part.max(1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
        p = np.exp(log_p)
        with np.errstate(divide="ignore"):
            log_marginal = np.log(p.mean(0))
        terms = np.where(p > 0, p * (log_p - log_marginal), 0.0)  # 0 log 0 = 0
        kl = terms.sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def reference_statistics(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of a reference set from an .npz with ``mu`` and ``sigma`` (pytorch-fid's
    saved statistics; ADM's reference batches, e.g. VIRTUAL_imagenet256_labeled.npz)."""
    try:
        with np.load(path) as f:
            mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
    except FileNotFoundError:
        raise ValueError(f"FID reference statistics {path!r} not found") from None
    except KeyError:
        raise ValueError(f"{path} holds no 'mu' and 'sigma' FID statistics") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable .npz of FID statistics ({e})") from None
    if mu.shape != (2048,) or sigma.shape != (2048, 2048):
        raise ValueError(
            f"{path}: FID statistics of pool features are mu [2048], sigma [2048, 2048]; got "
            f"{list(mu.shape)}, {list(sigma.shape)}"
        )
    return mu, sigma
