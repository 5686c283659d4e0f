"""Time-conditioned transformer blocks with AdaLN-zero (Peebles & Xie 2023, DiT).

Each block regresses a shift, scale and gate for its attention and MLP branches from a
conditioning vector; the regression starts at zero, so every block starts as the identity and
the network as a whole starts by predicting zero.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from vitok import sharding
from vitok.nn.attention import Mask, MultiHeadAttention
from vitok.nn.layers import MLP, Dense, LayerNorm, param
from vitok.nn.transformer import make_stack, run_stack


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
    """t: [B] in [0, 1] -> [B, dim] sinusoidal features of 1000 * t (cos half, then sin half)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = 1000.0 * t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class TimeEmbedder(nnx.Module):
    """t: [B] -> [B, D] through sinusoidal features and a two-layer MLP."""

    def __init__(self, width: int, *, rngs: nnx.Rngs, frequency_dim: int = 256):
        self.fc1 = Dense(frequency_dim, width, (None, "embed"), rngs=rngs)
        self.fc2 = Dense(width, width, ("embed", None), rngs=rngs)
        self.frequency_dim = frequency_dim

    def __call__(self, t: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.silu(self.fc1(timestep_embedding(t, self.frequency_dim))))


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """x: [B, L, D], shift/scale: [B, D]."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Modulation(nnx.Module):
    """cond [B, D] -> ``n`` vectors [B, D] from SiLU + a zero-initialised linear map."""

    def __init__(self, width: int, n: int, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32):
        zeros = nnx.initializers.zeros_init()
        self.kernel = param(rngs, zeros, (width, n, width), (None, None, "embed"))
        self.bias = param(rngs, zeros, (n, width), (None, "embed"))
        self.dtype = dtype

    def __call__(self, cond: jax.Array) -> list[jax.Array]:
        h = jax.nn.silu(cond.astype(jnp.float32)).astype(self.dtype)
        out = jnp.einsum("bc,cnd->bnd", h, self.kernel[...].astype(self.dtype))
        out = out + self.bias[...].astype(self.dtype)
        return [out[:, i] for i in range(out.shape[1])]


class AdaLNBlock(nnx.Module):
    """x + g1 * Attn(mod(LN(x))); x + g2 * MLP(mod(LN(x))), shift/scale/gate from ``cond``."""

    def __init__(
        self,
        width: int,
        num_heads: int,
        mlp_dim: int,
        *,
        rngs: nnx.Rngs,
        attention_backend: str = "dense",
        dtype: jnp.dtype = jnp.float32,
    ):
        self.norm1 = LayerNorm(width, rngs=rngs, use_scale=False, use_bias=False, dtype=dtype)
        self.attn = MultiHeadAttention(
            width, num_heads, rngs=rngs, backend=attention_backend, dtype=dtype
        )
        self.norm2 = LayerNorm(width, rngs=rngs, use_scale=False, use_bias=False, dtype=dtype)
        self.mlp = MLP(width, mlp_dim, rngs=rngs, dtype=dtype)
        self.modulation = Modulation(width, 6, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, cond: jax.Array, mask: Mask | None = None) -> jax.Array:
        """x: [B, L, D], cond: [B, D] -> [B, L, D]"""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), mask)
        x = sharding.constrain(x, ("batch", "length", "embed"))
        x = x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return sharding.constrain(x, ("batch", "length", "embed"))


class AdaLNTransformer(nnx.Module):
    """``depth`` AdaLN-zero blocks and a modulated final LayerNorm."""

    def __init__(
        self,
        width: int,
        depth: int,
        num_heads: int,
        mlp_dim: int,
        *,
        rngs: nnx.Rngs,
        attention_backend: str = "dense",
        remat: bool = False,
        scan_layers: bool = False,
        dtype: jnp.dtype = jnp.float32,
    ):
        def make_block(rngs: nnx.Rngs) -> AdaLNBlock:
            return AdaLNBlock(
                width,
                num_heads,
                mlp_dim,
                rngs=rngs,
                attention_backend=attention_backend,
                dtype=dtype,
            )

        self.blocks = make_stack(make_block, depth, rngs, scan_layers)
        self.norm = LayerNorm(width, rngs=rngs, use_scale=False, use_bias=False, dtype=dtype)
        self.final_modulation = Modulation(width, 2, rngs=rngs, dtype=dtype)
        self.depth = depth
        self.mlp_dim = mlp_dim
        self.remat = remat
        self.scan_layers = scan_layers

    def __call__(
        self, x: jax.Array, cond: jax.Array, mask: Mask | None = None, *, hidden_layer: int = 0
    ) -> tuple[jax.Array, jax.Array | None]:
        """x: [B, L, D], cond: [B, D] -> (out [B, L, D], the output of block ``hidden_layer``
        (1-based) [B, L, D], or None for 0)."""
        x, hidden = run_stack(
            self.blocks,
            x,
            lambda block, h, _: block(h, cond, mask),
            depth=self.depth,
            scan_layers=self.scan_layers,
            remat=self.remat,
            hidden_layer=hidden_layer,
        )
        shift, scale = self.final_modulation(cond)
        return modulate(self.norm(x), shift, scale), hidden
