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
from vitok.nn.layers import MLP, Dense, SwiGLU, make_norm, param
from vitok.nn.transformer import make_stack, run_stack


def timestep_embedding(
    t: jax.Array, dim: int, max_period: float = 10_000.0, scale: float = 1000.0
) -> jax.Array:
    """t: [B] in [0, 1] -> [B, dim] sinusoidal features of scale * t (cos half, then sin half)
    at frequencies max_period^(-i / half). FlexTok's release: max_period 256."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = scale * t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class TimeEmbedder(nnx.Module):
    """t: [B] -> [B, D] through sinusoidal features and a two-layer MLP."""

    def __init__(
        self,
        width: int,
        *,
        rngs: nnx.Rngs,
        frequency_dim: int = 256,
        max_period: float = 10_000.0,
        scale: float = 1000.0,
    ):
        self.fc1 = Dense(frequency_dim, width, (None, "embed"), rngs=rngs)
        self.fc2 = Dense(width, width, ("embed", None), rngs=rngs)
        self.frequency_dim = frequency_dim
        self.max_period, self.scale = float(max_period), float(scale)

    def __call__(self, t: jax.Array) -> jax.Array:
        features = timestep_embedding(t, self.frequency_dim, self.max_period, self.scale)
        return self.fc2(jax.nn.silu(self.fc1(features)))


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """x: [B, L, D], shift/scale: [B, D] (one per example) or [B, L, D] (per token)."""
    if shift.ndim == 2:
        shift, scale = shift[:, None], scale[:, None]
    return x * (1 + scale) + shift


def per_part(vectors: list[jax.Array], n: int, part_sizes: tuple[int, ...]) -> list[jax.Array]:
    """``n`` * len(part_sizes) modulation vectors [B, D] (part p's n vectors at p * n .. p * n
    + n - 1) -> n per-token vectors [B, L, D]: the tokens of part p (consecutive, in sequence
    order, ``part_sizes[p]`` of them) get part p's."""
    out = []
    for j in range(n):
        pieces = [
            jnp.broadcast_to(
                vectors[p * n + j][:, None], (vectors[0].shape[0], size, vectors[0].shape[1])
            )
            for p, size in enumerate(part_sizes)
        ]
        out.append(jnp.concatenate(pieces, axis=1))
    return out


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
    """x + g1 * Attn(mod(LN(x))); x + g2 * MLP(mod(LN(x))), shift/scale/gate from ``cond``.

    ``parts`` > 1: the sequence is made of that many consecutive parts (FlexTok's registers and
    patches) and each part gets its own shift, scale and gate (FlexTok's ``adaLN_expansion``);
    their sizes are given at the call. ``norm_eps``, ``mlp``, ``use_bias``, ``qk_norm``: the
    layers' choices as in ``vitok.nn.transformer.Block`` (norms are LayerNorms without scale or
    bias, as the modulation supplies them).
    """

    def __init__(
        self,
        width: int,
        num_heads: int,
        mlp_dim: int,
        *,
        rngs: nnx.Rngs,
        attention_backend: str = "dense",
        norm_eps: float | None = None,
        mlp: str = "gelu",
        use_bias: bool = True,
        qk_norm: bool = False,
        parts: int = 1,
        dtype: jnp.dtype = jnp.float32,
    ):
        self.norm1 = make_norm("plain", width, rngs=rngs, epsilon=norm_eps or 1e-6, dtype=dtype)
        self.attn = MultiHeadAttention(
            width,
            num_heads,
            rngs=rngs,
            backend=attention_backend,
            use_bias=use_bias,
            qk_norm=qk_norm,
            dtype=dtype,
        )
        self.norm2 = make_norm("plain", width, rngs=rngs, epsilon=norm_eps or 1e-6, dtype=dtype)
        mlps = {"gelu": MLP, "swiglu": SwiGLU}
        if mlp not in mlps:
            raise ValueError(f"unknown mlp {mlp!r}, known: {sorted(mlps)}")
        self.mlp = mlps[mlp](width, mlp_dim, rngs=rngs, use_bias=use_bias, dtype=dtype)
        self.modulation = Modulation(width, 6 * parts, rngs=rngs, dtype=dtype)
        self.parts = parts

    def __call__(
        self,
        x: jax.Array,
        cond: jax.Array,
        mask: Mask | None = None,
        part_sizes: tuple[int, ...] | None = None,
    ) -> jax.Array:
        """x: [B, L, D], cond: [B, D] -> [B, L, D]; ``part_sizes`` (summing to L) with parts."""
        vectors = self.modulation(cond)
        if self.parts > 1:
            if part_sizes is None or len(part_sizes) != self.parts or sum(part_sizes) != x.shape[1]:
                raise ValueError(
                    f"a block with {self.parts} parts needs part_sizes summing to the length "
                    f"{x.shape[1]}, got {part_sizes}"
                )
            vectors = per_part(vectors, 6, part_sizes)
        shift1, scale1, gate1, shift2, scale2, gate2 = (
            v[:, None] if v.ndim == 2 else v for v in vectors
        )
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), mask)
        x = sharding.constrain(x, ("batch", "length", "embed"))
        x = x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return sharding.constrain(x, ("batch", "length", "embed"))


class AdaLNTransformer(nnx.Module):
    """``depth`` AdaLN-zero blocks and a modulated final LayerNorm (``block_options``: the
    blocks' choices, see ``AdaLNBlock``; its ``norm_eps`` applies to the final norm too)."""

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
        block_options: dict | None = None,
        dtype: jnp.dtype = jnp.float32,
    ):
        block_options = dict(block_options or {})

        def make_block(rngs: nnx.Rngs) -> AdaLNBlock:
            return AdaLNBlock(
                width,
                num_heads,
                mlp_dim,
                rngs=rngs,
                attention_backend=attention_backend,
                dtype=dtype,
                **block_options,
            )

        self.blocks = make_stack(make_block, depth, rngs, scan_layers)
        eps = block_options.get("norm_eps") or 1e-6
        self.norm = make_norm("plain", width, rngs=rngs, epsilon=eps, dtype=dtype)
        self.final_modulation = Modulation(width, 2, rngs=rngs, dtype=dtype)
        self.depth = depth
        self.mlp_dim = mlp_dim
        self.remat = remat
        self.scan_layers = scan_layers

    def __call__(
        self,
        x: jax.Array,
        cond: jax.Array,
        mask: Mask | None = None,
        *,
        hidden_layer: int = 0,
        part_sizes: tuple[int, ...] | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        """x: [B, L, D], cond: [B, D] -> (out [B, L, D], the output of block ``hidden_layer``
        (1-based) [B, L, D], or None for 0). ``part_sizes``: for blocks with parts."""
        x, hidden = run_stack(
            self.blocks,
            x,
            lambda block, h, _: block(h, cond, mask, part_sizes),
            depth=self.depth,
            scan_layers=self.scan_layers,
            remat=self.remat,
            hidden_layer=hidden_layer,
        )
        shift, scale = self.final_modulation(cond)
        return modulate(self.norm(x), shift, scale), hidden
