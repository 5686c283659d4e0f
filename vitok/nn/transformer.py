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


def make_stack(make_block, depth: int, rngs: nnx.Rngs, scan_layers: bool):
    """``depth`` blocks: stacked on a leading ``layers`` axis (for ``nnx.scan``) or a list."""
    if scan_layers:
        stacked = nnx.vmap(
            make_block, in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"}
        )
        return nnx.split_rngs(splits=depth)(stacked)(rngs)
    return nnx.List([make_block(rngs) for _ in range(depth)])


def run_stack(
    blocks,
    x: jax.Array,
    apply,
    *,
    depth: int,
    scan_layers: bool,
    remat: bool,
    dropout_rng: jax.Array | None = None,
    return_hidden: int = 0,
):
    """Applies ``apply(block, h, key) -> h`` through a stack built by ``make_stack``.

    ``remat=True`` recomputes each block's activations in the backward pass instead of storing
    them; ``key`` is the block's own dropout key (None without dropout). ``return_hidden=j > 0``
    returns ``(out, hidden)`` with ``hidden`` the output of block j (1-based).
    """
    keys = (
        jax.random.split(dropout_rng, depth)
        if dropout_rng is not None
        else jnp.zeros((depth,), jnp.uint32)
    )
    use_key = dropout_rng is not None

    def body(h, block, key):
        h = apply(block, h, key if use_key else None)
        return h, (h if return_hidden else None)

    if remat:
        body = nnx.remat(body)
    if scan_layers:
        x, hiddens = nnx.scan(body, in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0))(
            x, blocks, keys
        )
        hidden = hiddens[return_hidden - 1] if return_hidden else None
    else:
        hidden = None
        for i, block in enumerate(blocks):
            x, h = body(x, block, keys[i])
            if i + 1 == return_hidden:
                hidden = h
    return (x, hidden) if return_hidden else x


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

        self.blocks = make_stack(make_block, depth, rngs, scan_layers)
        self.norm = LayerNorm(width, rngs=rngs, dtype=dtype)
        self.depth = depth
        self.mlp_dim = mlp_dim
        self.remat = remat
        self.scan_layers = scan_layers

    def __call__(
        self, x: jax.Array, mask: Mask | None = None, *, dropout_rng: jax.Array | None = None
    ) -> jax.Array:
        """x: [B, L, D] -> [B, L, D]"""

        def apply(block: Block, h: jax.Array, key: jax.Array | None) -> jax.Array:
            return block(h, mask, dropout_rng=key)

        x = run_stack(
            self.blocks,
            x,
            apply,
            depth=self.depth,
            scan_layers=self.scan_layers,
            remat=self.remat,
            dropout_rng=dropout_rng,
        )
        return self.norm(x)
