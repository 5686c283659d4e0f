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


class MLP(nnx.Module):
    """Transformer feed-forward block: Dense -> GELU -> Dense (dropout after each)."""

    def __init__(
        self,
        width: int,
        mlp_dim: int,
        *,
        rngs: nnx.Rngs,
        dropout: float = 0.0,
        dtype: jnp.dtype = jnp.float32,
    ):
        self.fc1 = Dense(width, mlp_dim, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.fc2 = Dense(mlp_dim, width, ("mlp", "embed"), rngs=rngs, dtype=dtype)
        self.dropout = dropout

    def __call__(self, x: jax.Array, *, dropout_rng: jax.Array | None = None) -> jax.Array:
        """x: [B, L, D] -> [B, L, D]"""
        h = jax.nn.gelu(self.fc1(x))
        h = sharding.constrain(h, ("batch", "length", "mlp"))
        h = dropout(h, self.dropout, dropout_rng, 0)
        return dropout(self.fc2(h), self.dropout, dropout_rng, 1)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None, salt: int) -> jax.Array:
    """Inverted dropout with an explicit key; identity when ``rng`` is None or ``rate`` is 0."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(jax.random.fold_in(rng, salt), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
