"""Seeded random weights in released checkpoints' layouts (names, shapes, dtypes), for the
converters' tests and for making their golden files with the reference implementations."""

from __future__ import annotations

import numpy as np

# A small big_vision FlexiViT: 24 px RGB, 8x8 stored kernel, 3x3 stored posemb grid.
FLEXIVIT_TINY = dict(width=32, depth=2, heads=2, mlp=64, kernel=8, grid=3, channels=3, classes=5)


def flexivit_arrays(seed: int = 0, dims: dict = FLEXIVIT_TINY) -> dict[str, np.ndarray]:
    """{big_vision name: float32 array} of a FlexiViT (pool "tok", unscanned blocks); every
    value random (the head too, which big_vision initialises at zero)."""
    rng = np.random.default_rng(seed)
    d, h, m = dims["width"], dims["heads"], dims["mlp"]
    dh = d // h

    def normal(*shape, scale=None):
        scale = scale if scale is not None else 1 / np.sqrt(shape[0])
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    out = {
        "embedding/kernel": normal(dims["kernel"], dims["kernel"], dims["channels"], d, scale=0.05),
        "embedding/bias": normal(d, scale=0.1),
        "pos_embedding": normal(1, dims["grid"] ** 2, d, scale=0.5),
        "cls": normal(1, 1, d, scale=0.5),
        "Transformer/encoder_norm/scale": 1 + normal(d, scale=0.1),
        "Transformer/encoder_norm/bias": normal(d, scale=0.1),
        "head/kernel": normal(d, dims["classes"]),
        "head/bias": normal(dims["classes"], scale=0.1),
    }
    for i in range(dims["depth"]):
        b = f"Transformer/encoderblock_{i}/"
        for n in ("LayerNorm_0", "LayerNorm_1"):
            out[b + n + "/scale"] = 1 + normal(d, scale=0.1)
            out[b + n + "/bias"] = normal(d, scale=0.1)
        a = b + "MultiHeadDotProductAttention_0/"
        for n in ("query", "key", "value"):
            out[a + n + "/kernel"] = normal(d, h, dh)
            out[a + n + "/bias"] = normal(h, dh, scale=0.1)
        out[a + "out/kernel"] = normal(h, dh, d, scale=1 / np.sqrt(d))
        out[a + "out/bias"] = normal(d, scale=0.1)
        out[b + "MlpBlock_0/Dense_0/kernel"] = normal(d, m)
        out[b + "MlpBlock_0/Dense_0/bias"] = normal(m, scale=0.1)
        out[b + "MlpBlock_0/Dense_1/kernel"] = normal(m, d)
        out[b + "MlpBlock_0/Dense_1/bias"] = normal(d, scale=0.1)
    return out


def flexivit_images(seed: int = 1, n: int = 2, size: int = 24) -> np.ndarray:
    """float32 [n, size, size, 3] in [-1, 1] (big_vision's value_range)."""
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def inception_state_dict(
    shapes: dict[str, tuple[int, ...]], seed: int = 0
) -> dict[str, np.ndarray]:
    """Random pytorch-fid Inception-v3 weights for a {name: shape} table (the golden file's):
    He-scaled convolutions, batch norms near identity, so activations stay O(1) through the
    network."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        if name.endswith("num_batches_tracked"):
            out[name] = np.zeros(shape, np.int64)
        elif name.endswith("conv.weight"):
            fan_in = int(np.prod(shape[1:]))
            out[name] = (rng.standard_normal(shape) * np.sqrt(2 / fan_in)).astype(np.float32)
        elif name.endswith("running_var"):
            out[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif name.endswith("bn.weight"):
            out[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif name == "fc.weight":
            out[name] = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
        else:  # biases, running means
            out[name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    return out


def fid_images(seed: int, n: int, size: int) -> np.ndarray:
    """float32 [n, size, size, 3] in [0, 1]: smooth random colour fields plus noise, a
    distribution the seed shifts."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 1, (n, 4, 4, 3))
    up = np.kron(coarse, np.ones((1, size // 4, size // 4, 1)))
    return np.clip(up + 0.1 * rng.standard_normal(up.shape), 0, 1).astype(np.float32)
