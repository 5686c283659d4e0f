"""Finite scalar quantization (Mentzer et al. 2023): each of d channels is squashed into a bounded
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


class FSQ:
    """A parameter-free quantizer over the last axis, of size ``len(levels)``."""

    def __init__(self, levels: Sequence[int]):
        levels = tuple(int(level) for level in levels)
        if not levels or min(levels) < 2:
            raise ValueError(f"FSQ levels must be integers >= 2, got {levels}")
        self.levels = levels
        self.dim = len(levels)
        self.codebook_size = int(np.prod(levels))
        if self.codebook_size > np.iinfo(np.int32).max:
            raise ValueError(f"FSQ codebook of {self.codebook_size} codes does not fit in int32")
        self._levels = np.asarray(levels, np.float32)
        self._basis = np.cumprod((1,) + levels[:-1]).astype(np.int32)

    def digits(self, z: jax.Array) -> jax.Array:
        """z: [..., d] real -> digits [..., d] float32 in {0, ..., L_i - 1}, straight-through."""
        if z.shape[-1] != self.dim:
            raise ValueError(f"FSQ with {self.dim} levels got inputs with last axis {z.shape[-1]}")
        u = (jnp.tanh(z.astype(jnp.float32)) + 1) / 2 * (self._levels - 1)
        return u + jax.lax.stop_gradient(jnp.round(u) - u)

    def digits_to_codes(self, digits: jax.Array) -> jax.Array:
        """digits [..., d] -> the codes a decoder sees, [..., d] in [-1, 1]."""
        return digits / (self._levels - 1) * 2 - 1

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

    def check_ids(self, ids) -> None:
        """Raises a clear error for ids outside the codebook (host-side check, numpy input)."""
        ids = np.asarray(ids)
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"token ids must be integers, got dtype {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.codebook_size):
            raise ValueError(
                f"token ids must lie in [0, {self.codebook_size}) for FSQ levels {self.levels}; "
                f"got values in [{ids.min()}, {ids.max()}]"
            )
