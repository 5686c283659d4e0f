"""Basic layers with logical-axis annotations on every parameter.

Parameters are stored in float32; ``dtype`` is the compute dtype that inputs and kernels are
cast to for matmuls. Normalisations and losses stay in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vitok import sharding

Initializer = Callable[..., jax.Array]


def param(
    rngs: nnx.Rngs,
    init: Initializer,
    shape: Sequence[int],
    axes: Sequence[str | None],
) -> nnx.Param:
    """A float32 parameter annotated with logical axis names (sharding is applied by the trainer)."""
    if len(axes) != len(shape):
        raise ValueError(f"param of shape {tuple(shape)} got {len(axes)} axis names {tuple(axes)}")
    value = init(rngs.params(), tuple(shape), jnp.float32)
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


class Dense(nnx.Module):
    """``y = x @ W + b`` over the last axis; ``W: [in, out]`` with logical names ``axes``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        axes: tuple[str | None, str | None],
        *,
        rngs: nnx.Rngs,
        use_bias: bool = True,
        kernel_init: Initializer = nnx.initializers.xavier_uniform(),
        bias_init: Initializer = nnx.initializers.zeros_init(),
        dtype: jnp.dtype = jnp.float32,
    ):
        self.kernel = param(rngs, kernel_init, (in_features, out_features), axes)
        self.bias = param(rngs, bias_init, (out_features,), axes[1:]) if use_bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., in] -> [..., out]"""
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def plain_layer_norm(x: jax.Array, epsilon: float = 1e-5) -> jax.Array:
    """LayerNorm over the last axis without scale or bias, computed in float32, returned in
    x's dtype (FlexTok's QK-norm and its norm before the FSQ projection)."""
    y = x.astype(jnp.float32)
    y = y - y.mean(-1, keepdims=True)
    return (y * jax.lax.rsqrt(jnp.square(y).mean(-1, keepdims=True) + epsilon)).astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, computed in float32, returned in the compute dtype."""

    def __init__(
        self,
        features: int,
        *,
        rngs: nnx.Rngs,
        epsilon: float = 1e-6,
        use_scale: bool = True,
        use_bias: bool = True,
        dtype: jnp.dtype = jnp.float32,
    ):
        ones, zeros = nnx.initializers.ones_init(), nnx.initializers.zeros_init()
        self.scale = param(rngs, ones, (features,), ("embed",)) if use_scale else None
        self.bias = param(rngs, zeros, (features,), ("embed",)) if use_bias else None
        self.epsilon = epsilon
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., D] -> [..., D]"""
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
        if self.scale is not None:
            y = y * self.scale[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(self.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis (LLaMA): x / sqrt(mean(x^2) + eps) * scale, in float32."""

    def __init__(
        self,
        features: int,
        *,
        rngs: nnx.Rngs,
        epsilon: float = 1e-5,
        dtype: jnp.dtype = jnp.float32,
    ):
        self.scale = param(rngs, nnx.initializers.ones_init(), (features,), ("embed",))
        self.epsilon = epsilon
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., D] -> [..., D]"""
        x = x.astype(jnp.float32)
        y = x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + self.epsilon)
        return (y * self.scale[...]).astype(self.dtype)


NORMS = ("layer", "plain", "rms")


def make_norm(kind: str, features: int, *, rngs: nnx.Rngs, epsilon: float | None, dtype):
    """``kind`` "layer" (LayerNorm, eps 1e-6 by default), "plain" (LayerNorm without scale or
    bias, eps 1e-5: FlexTok's) or "rms" (RMSNorm, eps 1e-5)."""
    if kind == "layer":
        return LayerNorm(features, rngs=rngs, epsilon=epsilon or 1e-6, dtype=dtype)
    if kind == "plain":
        return LayerNorm(
            features,
            rngs=rngs,
            epsilon=epsilon or 1e-5,
            use_scale=False,
            use_bias=False,
            dtype=dtype,
        )
    if kind == "rms":
        return RMSNorm(features, rngs=rngs, epsilon=epsilon or 1e-5, dtype=dtype)
    raise ValueError(f"unknown norm {kind!r}, known: {', '.join(map(repr, NORMS))}")


class MLP(nnx.Module):
    """Transformer feed-forward block: Dense -> GELU -> Dense (dropout after each)."""

    def __init__(
        self,
        width: int,
        mlp_dim: int,
        *,
        rngs: nnx.Rngs,
        dropout: float = 0.0,
        use_bias: bool = True,
        dtype: jnp.dtype = jnp.float32,
    ):
        self.fc1 = Dense(
            width, mlp_dim, ("embed", "mlp"), rngs=rngs, use_bias=use_bias, dtype=dtype
        )
        self.fc2 = Dense(
            mlp_dim, width, ("mlp", "embed"), rngs=rngs, use_bias=use_bias, dtype=dtype
        )
        self.dropout = dropout

    def __call__(self, x: jax.Array, *, dropout_rng: jax.Array | None = None) -> jax.Array:
        """x: [B, L, D] -> [B, L, D]"""
        h = jax.nn.gelu(self.fc1(x))
        h = sharding.constrain(h, ("batch", "length", "mlp"))
        h = dropout(h, self.dropout, dropout_rng, 0)
        return dropout(self.fc2(h), self.dropout, dropout_rng, 1)


class SwiGLU(nnx.Module):
    """Gated feed-forward block (LLaMA): down(silu(gate(x)) * up(x)), dropout after it."""

    def __init__(
        self,
        width: int,
        mlp_dim: int,
        *,
        rngs: nnx.Rngs,
        dropout: float = 0.0,
        use_bias: bool = False,
        dtype: jnp.dtype = jnp.float32,
    ):
        kw = dict(rngs=rngs, use_bias=use_bias, dtype=dtype)
        self.gate = Dense(width, mlp_dim, ("embed", "mlp"), **kw)
        self.up = Dense(width, mlp_dim, ("embed", "mlp"), **kw)
        self.down = Dense(mlp_dim, width, ("mlp", "embed"), **kw)
        self.dropout = dropout

    def __call__(self, x: jax.Array, *, dropout_rng: jax.Array | None = None) -> jax.Array:
        """x: [B, L, D] -> [B, L, D]"""
        h = jax.nn.silu(self.gate(x)) * self.up(x)
        h = sharding.constrain(h, ("batch", "length", "mlp"))
        return dropout(self.down(h), self.dropout, dropout_rng, 1)


def swiglu_hidden(width: int, multiple_of: int = 256) -> int:
    """LLaMA's SwiGLU width for a block of ``width``: 8 * width / 3 rounded up to a multiple
    of ``multiple_of`` (768 -> 2048, 1024 -> 2816, 1280 -> 3584)."""
    hidden = int(2 * 4 * width / 3)
    return -(-hidden // multiple_of) * multiple_of


def dropout(x: jax.Array, rate: float, rng: jax.Array | None, salt: int) -> jax.Array:
    """Inverted dropout with an explicit key; identity when ``rng`` is None or ``rate`` is 0."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(jax.random.fold_in(rng, salt), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
