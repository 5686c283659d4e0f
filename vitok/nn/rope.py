"""Rotary position embeddings over a 2D token grid, as LlamaGen's and NAR's GPTs define them.

A head's Dh channels form Dh / 2 interleaved pairs (x[2i], x[2i + 1]), each rotated by an
angle: the first Dh / 4 pairs by row * f_j, the last Dh / 4 by column * f_j, with frequencies
f_j = base^(-4j / Dh), j = 0 .. Dh / 4 - 1. Prefix tokens (the class token) get a table row of
zeros (cos = sin = 0), which zeroes their queries and keys: in the releases a prefix token is
attended with logit 0 and carries only its value.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=16)
def rope_2d_table(
    grid: tuple[int, int], head_dim: int, base: float = 10000.0, prefix: int = 1
) -> np.ndarray:
    """[prefix + rows * cols, head_dim // 2, 2] float32 (cos, sin) for the sequence
    [prefix tokens; grid tokens in raster order]."""
    if len(grid) != 2:
        raise ValueError(f"2D RoPE needs a 2D token grid, got {tuple(grid)}")
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    freqs = 1.0 / base ** (np.arange(quarter, dtype=np.float64) * 4 / head_dim)
    rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
    angles = np.concatenate(
        [rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs], axis=1
    )  # [N, head_dim // 2]
    table = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    table = np.concatenate([np.zeros((prefix, head_dim // 2, 2)), table])
    return table.astype(np.float32)


def apply_rope(x: jax.Array, table: jax.Array) -> jax.Array:
    """Rotates x [B, L, H, Dh] by the rows table [L, Dh / 2, 2] of its L positions (in
    float32, returned in x's dtype)."""
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    cos, sin = table[None, :, None, :, 0], table[None, :, None, :, 1]
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)
