"""FlexiViT (Beyer et al. 2023): one set of patch-embedding weights at many patch sizes.

A patch x of size p x p becomes resize(x) = B x at size q x q, B the [q*q, p*p] bilinear resize
matrix. The embedding kernel w (for p) is mapped to

    w_q = pinv(B^T) w        ("PI-resize")

so that <B x, w_q> = x^T B^T pinv(B^T) w = <x, w> whenever B has full column rank, i.e. when
upsampling (q >= p): the resized model sees a resized patch exactly as the original saw the
patch. When downsampling it is the least-squares best match. Position embeddings are resized
bilinearly over the token grid.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.cache
def linear_resize_matrix(old: int, new: int, antialias: bool = True) -> np.ndarray:
    """[new, old] matrix of 1D linear interpolation with half-pixel centres, matching
    ``jax.image.resize(..., method="linear", antialias=True)``: a triangle kernel, widened by
    old/new when downsampling, with each row renormalised over the input pixels it touches.
    ``antialias=False`` keeps the kernel one pixel wide when downsampling, as
    ``tf.image.resize(..., "bilinear")`` does (big_vision's FlexiViT resizes kernels so)."""
    scale = new / old
    kernel_scale = min(scale, 1.0) if antialias else 1.0
    centres = (np.arange(new) + 0.5) / scale - 0.5  # input coordinate of each output pixel
    distance = np.abs(centres[:, None] - np.arange(old)[None, :]) * kernel_scale
    weights = np.maximum(0.0, 1.0 - distance)
    return weights / weights.sum(axis=1, keepdims=True)


@functools.cache
def patch_resize_matrix(old: int, new: int, antialias: bool = True) -> np.ndarray:
    """[new*new, old*old] matrix B with vec(resize(x)) = B vec(x) for one row-major p x p
    channel of a patch (separable: the Kronecker product of the 1D matrices)."""
    r = linear_resize_matrix(old, new, antialias)
    return np.kron(r, r)


@functools.cache
def _pinv_transpose(old: int, new: int, antialias: bool) -> np.ndarray:
    """pinv(B^T): [new*new, old*old], in float64 then float32."""
    b = patch_resize_matrix(old, new, antialias)
    return np.linalg.pinv(b.T.astype(np.float64)).astype(np.float32)


def pi_resize_patch_kernel(
    kernel: jax.Array, *, old: int, new: int, channels: int, antialias: bool = True
) -> jax.Array:
    """PI-resize of a patch-embedding kernel.

    kernel: [old*old*C, D], rows in ``patchify``'s (row, column, channel) order
    -> [new*new*C, D] in the same order. ``antialias`` chooses the resize B inverts (it
    matters only when shrinking): vitok's own antialiased one, or False for big_vision's.
    """
    if old == new:
        return kernel
    d = kernel.shape[-1]
    if kernel.shape[0] != old * old * channels:
        raise ValueError(
            f"a patch kernel for {old}x{old}x{channels} patches has {old * old * channels} rows, "
            f"got {kernel.shape[0]}"
        )
    w = kernel.reshape(old * old, channels * d)
    resize_inverse = jnp.asarray(_pinv_transpose(old, new, antialias))
    w_new = resize_inverse @ w.astype(jnp.float32)
    return w_new.reshape(new * new * channels, d).astype(kernel.dtype)


def resize_posemb(
    posemb: jax.Array, old_grid: tuple[int, int], new_grid: tuple[int, int]
) -> jax.Array:
    """posemb: [gh*gw, D] over a row-major token grid -> [gh'*gw', D], bilinear over the grid."""
    if tuple(old_grid) == tuple(new_grid):
        return posemb
    d = posemb.shape[-1]
    grid = posemb.reshape(*old_grid, d).astype(jnp.float32)
    resized = jax.image.resize(grid, (*new_grid, d), method="linear")
    return resized.reshape(new_grid[0] * new_grid[1], d).astype(posemb.dtype)
