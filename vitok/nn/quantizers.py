"""Quantizers: FSQ and an l2-normalised VQ (``VectorQuantizer``, below).

Finite scalar quantization (Mentzer et al. 2023): each of d channels is squashed into a bounded
range and rounded to one of ``levels[i]`` values; the codebook is the implicit product grid, of
size ``prod(levels)``, with no codebook parameters and no commitment loss.

Here channel i is mapped to ``u_i = (tanh(z_i) + 1) / 2 * (L_i - 1)`` in [0, L_i - 1] and rounded
to the integer digit ``q_i``; the code a decoder sees is ``q_i / (L_i - 1) * 2 - 1`` in [-1, 1].
Rounding passes gradients straight through. A token id is the mixed-radix number with digits q_i
(channel 0 least significant).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vitok.nn.layers import param


class FSQ:
    """A parameter-free quantizer over the last axis, of size ``len(levels)``.

    ``bound="tanh"`` (vitok's): digit u = (tanh(z) + 1) / 2 (L - 1), code 2 u / (L - 1) - 1,
    codes spread evenly over [-1, 1]. ``bound="release"`` (Mentzer et al.'s, in FlexTok's
    release): b = tanh(z + atanh(o / h)) h - o with h = (L - 1)(1 + 1e-3) / 2 and o = 1/2 for
    even L (0 for odd), digit round(b) + L // 2, code round(b) / (L // 2): for even L the codes
    are -1 .. 1 - 2 / L, not symmetric. The ids are sum(digit_i * prod(L_j, j < i)) in both.
    """

    BOUNDS = ("tanh", "release")

    def __init__(self, levels: Sequence[int], bound: str = "tanh"):
        levels = tuple(int(level) for level in levels)
        if not levels or min(levels) < 2:
            raise ValueError(f"FSQ levels must be integers >= 2, got {levels}")
        if bound not in self.BOUNDS:
            raise ValueError(f"FSQ bound must be 'tanh' or 'release', got {bound!r}")
        self.levels = levels
        self.bound = bound
        self.dim = len(levels)
        self.codebook_size = int(np.prod(levels))
        if self.codebook_size > np.iinfo(np.int32).max:
            raise ValueError(f"FSQ codebook of {self.codebook_size} codes does not fit in int32")
        self._levels = np.asarray(levels, np.float32)
        self._half = np.asarray([level // 2 for level in levels], np.float32)
        # The release's bound: tanh(z + shift) * half_l - offset.
        self._half_l = ((self._levels - 1) * (1 + 1e-3) / 2).astype(np.float32)
        self._offset = np.asarray([0.5 if level % 2 == 0 else 0.0 for level in levels], np.float32)
        self._shift = np.arctanh(self._offset / self._half_l).astype(np.float32)
        self._basis = np.cumprod((1,) + levels[:-1]).astype(np.int32)

    def digits(self, z: jax.Array) -> jax.Array:
        """z: [..., d] real -> digits [..., d] float32 in {0, ..., L_i - 1}, straight-through."""
        if z.shape[-1] != self.dim:
            raise ValueError(f"FSQ with {self.dim} levels got inputs with last axis {z.shape[-1]}")
        z = z.astype(jnp.float32)
        if self.bound == "tanh":
            u = (jnp.tanh(z) + 1) / 2 * (self._levels - 1)
        else:
            u = jnp.tanh(z + self._shift) * self._half_l - self._offset + self._half
        return u + jax.lax.stop_gradient(jnp.round(u) - u)

    def digits_to_codes(self, digits: jax.Array) -> jax.Array:
        """digits [..., d] -> the codes a decoder sees, [..., d] in [-1, 1]."""
        if self.bound == "tanh":
            return digits / (self._levels - 1) * 2 - 1
        return (digits - self._half) / self._half

    def __call__(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        """z: [..., d] -> (codes [..., d] float32 in [-1, 1], ids [...] int32)."""
        digits = self.digits(z)
        return self.digits_to_codes(digits), self.digits_to_ids(digits)

    def digits_to_ids(self, digits: jax.Array) -> jax.Array:
        """[..., d] -> [...] int32 in [0, codebook_size)."""
        q = jnp.round(jax.lax.stop_gradient(digits)).astype(jnp.int32)
        return (q * self._basis).sum(-1)

    def ids_to_codes(self, ids: jax.Array) -> jax.Array:
        """[...] int -> codes [..., d] float32 in [-1, 1]; inverse of quantizing to ``ids``."""
        digits = (ids[..., None] // self._basis) % np.asarray(self.levels, np.int32)
        return self.digits_to_codes(digits.astype(jnp.float32))


class VectorQuantizer(nnx.Module):
    """VQ with an l2-normalised codebook (ViT-VQGAN; KARL's 4096 x 12): z and every code are
    unit-normalised, the nearest code (squared distance) is chosen and passed on with a
    straight-through gradient. Loss: ``beta * |sg[q] - z|^2 + |q - sg[z]|^2`` (means), no EMA
    update; the codebook starts U(-1/K, 1/K) as in the official KARL code."""

    def __init__(self, codebook_size: int, dim: int, *, beta: float = 0.25, rngs: nnx.Rngs):
        bound = 1.0 / codebook_size

        def init(key, shape, dtype):
            return jax.random.uniform(key, shape, dtype, -bound, bound)

        self.codebook = param(rngs, init, (codebook_size, dim), ("vocab", None))
        self.codebook_size, self.dim, self.beta = int(codebook_size), int(dim), float(beta)

    def normalized_codebook(self) -> jax.Array:
        return _l2_normalize(self.codebook[...].astype(jnp.float32))

    def __call__(
        self, z: jax.Array, weights: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """z [..., dim], optional weights [...] (e.g. 1 for the tokens in use) -> (codes
        [..., dim] unit-norm (straight-through), ids [...] int32, loss scalar float32: the mean
        over entries, or the weighted mean over vectors)."""
        z = _l2_normalize(z.astype(jnp.float32))
        codebook = self.normalized_codebook()
        # |z - c|^2 = 2 - 2 z.c for unit vectors: the nearest code has the largest dot product.
        ids = jnp.argmax(jnp.einsum("...d,kd->...k", z, codebook), axis=-1).astype(jnp.int32)
        q = codebook[ids]
        per_vector = self.beta * jnp.mean(jnp.square(jax.lax.stop_gradient(q) - z), -1) + jnp.mean(
            jnp.square(q - jax.lax.stop_gradient(z)), -1
        )
        if weights is None:
            loss = jnp.mean(per_vector)
        else:
            weights = weights.astype(jnp.float32)
            loss = jnp.sum(per_vector * weights) / jnp.maximum(jnp.sum(weights), 1.0)
        return z + jax.lax.stop_gradient(q - z), ids, loss

    def ids_to_codes(self, ids: jax.Array) -> jax.Array:
        """ids [...] int -> unit-norm codes [..., dim] float32."""
        return self.normalized_codebook()[ids]


def _l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
