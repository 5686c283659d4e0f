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
    """A stack of ``depth`` blocks followed by a final LayerNorm.

    ``scan_layers=True`` stores the blocks' parameters stacked on a leading ``layers`` axis and
    applies them with ``nnx.scan``: one compiled block instead of ``depth`` copies, which compiles
    faster and (on CPU, measured) runs a 12-layer ViT-S step about 2x faster. ``remat=True``
    recomputes each block's activations in the backward pass instead of storing them.
    """

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
        scan_layers: bool = False,
        dtype: jnp.dtype = jnp.float32,
    ):
        def make_block(rngs: nnx.Rngs) -> Block:
            return Block(
                width,
                num_heads,
                mlp_dim,
                rngs=rngs,
                attention_backend=attention_backend,
                dropout=dropout,
                dtype=dtype,
            )

        if scan_layers:
            stacked = nnx.vmap(
                make_block, in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"}
            )
            self.blocks = nnx.split_rngs(splits=depth)(stacked)(rngs)
        else:
            self.blocks = nnx.List([make_block(rngs) for _ in range(depth)])
        self.norm = LayerNorm(width, rngs=rngs, dtype=dtype)
        self.depth = depth
        self.mlp_dim = mlp_dim
        self.remat = remat
        self.scan_layers = scan_layers

    def __call__(
        self, x: jax.Array, mask: Mask | None = None, *, dropout_rng: jax.Array | None = None
    ) -> jax.Array:
        """x: [B, L, D] -> [B, L, D]"""
        keys = None if dropout_rng is None else jax.random.split(dropout_rng, self.depth)

        def apply(block: Block, h: jax.Array, key: jax.Array | None) -> jax.Array:
            return block(h, mask, dropout_rng=key)

        if self.remat:
            apply = nnx.remat(apply)
        if self.scan_layers:
            if keys is None:
                body = nnx.scan(
                    lambda h, blk: apply(blk, h, None), in_axes=(nnx.Carry, 0), out_axes=nnx.Carry
                )
                x = body(x, self.blocks)
            else:
                body = nnx.scan(
                    lambda h, blk, k: apply(blk, h, k),
                    in_axes=(nnx.Carry, 0, 0),
                    out_axes=nnx.Carry,
                )
                x = body(x, self.blocks, keys)
        else:
            for i, block in enumerate(self.blocks):
                x = apply(block, x, None if keys is None else keys[i])
        return self.norm(x)
