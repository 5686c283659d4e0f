"""Pre-norm transformer blocks and encoder stacks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vitok import sharding
from vitok.nn.attention import Mask, MultiHeadAttention
from vitok.nn.layers import MLP, LayerNorm


class Block(nnx.Module):
    """x + Attn(LN(x)); x + MLP(LN(x))."""

    def __init__(
        self,
        width: int,
        num_heads: int,
        mlp_dim: int,
        *,
        rngs: nnx.Rngs,
        attention_backend: str = "dense",
        dropout: float = 0.0,
        dtype: jnp.dtype = jnp.float32,
    ):
        self.norm1 = LayerNorm(width, rngs=rngs, dtype=dtype)
        self.attn = MultiHeadAttention(
            width, num_heads, rngs=rngs, backend=attention_backend, dropout=dropout, dtype=dtype
        )
        self.norm2 = LayerNorm(width, rngs=rngs, dtype=dtype)
        self.mlp = MLP(width, mlp_dim, rngs=rngs, dropout=dropout, dtype=dtype)

    def __call__(
        self, x: jax.Array, mask: Mask | None = None, *, dropout_rng: jax.Array | None = None
    ) -> jax.Array:
        """x: [B, L, D] -> [B, L, D]"""
        rng_attn, rng_mlp = (None, None) if dropout_rng is None else jax.random.split(dropout_rng)
        x = x + self.attn(self.norm1(x), mask, dropout_rng=rng_attn)
        x = sharding.constrain(x, ("batch", "length", "embed"))
        x = x + self.mlp(self.norm2(x), dropout_rng=rng_mlp)
        return sharding.constrain(x, ("batch", "length", "embed"))


class Encoder(nnx.Module):
    """A stack of ``depth`` blocks followed by a final LayerNorm."""

    def __init__(
        self,
        width: int,
        depth: int,
        num_heads: int,
        mlp_dim: int,
        *,
        rngs: nnx.Rngs,
        attention_backend: str = "dense",
        dropout: float = 0.0,
        remat: bool = False,
        dtype: jnp.dtype = jnp.float32,
    ):
        self.blocks = nnx.List(
            [
                Block(
                    width,
                    num_heads,
                    mlp_dim,
                    rngs=rngs,
                    attention_backend=attention_backend,
                    dropout=dropout,
                    dtype=dtype,
                )
                for _ in range(depth)
            ]
        )
        self.norm = LayerNorm(width, rngs=rngs, dtype=dtype)
        self.remat = remat

    def __call__(
        self, x: jax.Array, mask: Mask | None = None, *, dropout_rng: jax.Array | None = None
    ) -> jax.Array:
        """x: [B, L, D] -> [B, L, D]"""
        for i, block in enumerate(self.blocks):
            rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
            if self.remat:
                x = nnx.remat(lambda blk, h, r: blk(h, mask, dropout_rng=r))(block, x, rng)
            else:
                x = block(x, mask, dropout_rng=rng)
        return self.norm(x)
