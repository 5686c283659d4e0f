"""Memory-efficient attention in pure JAX: online softmax over key blocks, O(N) memory.

The forward pass visits [q_chunk, k_chunk] score blocks one at a time (``lax.scan``), keeping a
running max ``m``, normaliser ``norm`` and output accumulator per query (Milakov & Gimelshein 2018;
Rabe & Staats 2021; Dao et al. 2022). It saves only the output and the log-sum-exp per query, and
the custom backward pass recomputes each block's probabilities from them, so neither pass ever
holds an [Lq, Lk] matrix. Runs on any backend, CPU included.

Layout inside this module is [B, H, L, D]; ``attention`` takes and returns [B, L, H, D].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_NEG = -1e30  # finite "minus infinity": fully masked rows stay NaN-free


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    pad = -x.shape[axis] % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _blocks(x: jax.Array, chunk: int) -> jax.Array:
    """[B, H, L, D] (L a multiple of chunk) -> [L // chunk, B, H, chunk, D]."""
    b, h, n, d = x.shape
    return x.reshape(b, h, n // chunk, chunk, d).transpose(2, 0, 1, 3, 4)


def _unblock(x: jax.Array) -> jax.Array:
    """[nb, B, H, chunk, ...] -> [B, H, nb * chunk, ...]."""
    nb, b, h, c = x.shape[:4]
    return x.transpose(1, 2, 0, 3, *range(4, x.ndim)).reshape(b, h, nb * c, *x.shape[4:])


def _block_scores(qb, kb, q_pos, k_pos, mask, q_len, kv_len, scale):
    """Scaled, masked scores of one block in float32: [B, H, cq, ck]."""
    s = jnp.einsum("bhqd,bhkd->bhqk", qb, kb, preferred_element_type=jnp.float32) * scale
    valid = (k_pos < kv_len)[None, :]
    allowed = mask.allowed(q_pos, k_pos, q_len, kv_len)
    valid = valid if allowed is None else valid & allowed
    return jnp.where(valid, s, _NEG)


def _forward(q, k, v, q_offset, mask, mask_q_len, q_chunk, k_chunk):
    """q: [B, H, Lq, D], k/v: [B, H, Lk, D] -> (out [B, H, Lq, D], lse [B, H, Lq] float32).

    Query positions are ``q_offset + i`` and the mask is defined over ``mask_q_len`` queries:
    under sequence parallelism a shard holds queries [q_offset, q_offset + Lq) of the sequence.
    """
    q_len, kv_len = q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5
    qs = _blocks(_pad_to(q, 2, q_chunk), q_chunk)
    ks = _blocks(_pad_to(k, 2, k_chunk), k_chunk)
    vs = _blocks(_pad_to(v, 2, k_chunk), k_chunk)
    b, h, _, d = q.shape

    def one_q_block(_, inputs):
        qb, qi = inputs
        q_pos = q_offset + qi * q_chunk + jnp.arange(q_chunk)

        def one_k_block(carry, kv):
            m, norm, acc = carry
            kb, vb, ki = kv
            k_pos = ki * k_chunk + jnp.arange(k_chunk)
            s = _block_scores(qb, kb, q_pos, k_pos, mask, mask_q_len, kv_len, scale)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            correction = jnp.exp(m - m_new)
            norm = norm * correction + p.sum(-1)
            pv = jnp.einsum(
                "bhqk,bhkd->bhqd", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32
            )
            return (m_new, norm, acc * correction[..., None] + pv), None

        init = (
            jnp.full((b, h, q_chunk), _NEG, jnp.float32),
            jnp.zeros((b, h, q_chunk), jnp.float32),
            jnp.zeros((b, h, q_chunk, d), jnp.float32),
        )
        (m, norm, acc), _ = jax.lax.scan(one_k_block, init, (ks, vs, jnp.arange(ks.shape[0])))
        return None, ((acc / norm[..., None]).astype(q.dtype), m + jnp.log(norm))

    _, (out, lse) = jax.lax.scan(one_q_block, None, (qs, jnp.arange(qs.shape[0])))
    return _unblock(out)[:, :, :q_len], _unblock(lse[..., None])[..., 0][:, :, :q_len]


def _backward(q, k, v, q_offset, out, lse, dout, mask, mask_q_len, q_chunk, k_chunk):
    """Gradients (dq, dk, dv) by block-wise recomputation of the probabilities."""
    q_len, kv_len = q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), -1)  # [B, H, Lq]
    qs = _blocks(_pad_to(q, 2, q_chunk), q_chunk)
    dos = _blocks(_pad_to(dout, 2, q_chunk), q_chunk)
    lses = _blocks(_pad_to(lse[..., None], 2, q_chunk), q_chunk)[..., 0]
    deltas = _blocks(_pad_to(delta[..., None], 2, q_chunk), q_chunk)[..., 0]
    ks = _blocks(_pad_to(k, 2, k_chunk), k_chunk)
    vs = _blocks(_pad_to(v, 2, k_chunk), k_chunk)
    q_index = jnp.arange(qs.shape[0])

    def one_k_block(dq_blocks, kv):
        kb, vb, ki = kv
        k_pos = ki * k_chunk + jnp.arange(k_chunk)

        def one_q_block(carry, inputs):
            dk, dv = carry
            qb, dob, lseb, deltab, qi = inputs
            q_pos = q_offset + qi * q_chunk + jnp.arange(q_chunk)
            s = _block_scores(qb, kb, q_pos, k_pos, mask, mask_q_len, kv_len, scale)
            p = jnp.exp(s - lseb[..., None])  # [B, H, cq, ck], float32
            dv = dv + jnp.einsum("bhqk,bhqd->bhkd", p, dob.astype(jnp.float32))
            dp = jnp.einsum("bhqd,bhkd->bhqk", dob, vb, preferred_element_type=jnp.float32)
            ds = p * (dp - deltab[..., None]) * scale
            dk = dk + jnp.einsum("bhqk,bhqd->bhkd", ds, qb.astype(jnp.float32))
            dq = jnp.einsum("bhqk,bhkd->bhqd", ds, kb.astype(jnp.float32))
            return (dk, dv), dq

        zeros = jnp.zeros(kb.shape, jnp.float32)
        (dk, dv), dq = jax.lax.scan(one_q_block, (zeros, zeros), (qs, dos, lses, deltas, q_index))
        return dq_blocks + dq, (dk, dv)

    dq0 = jnp.zeros(qs.shape, jnp.float32)
    dq, (dk, dv) = jax.lax.scan(one_k_block, dq0, (ks, vs, jnp.arange(ks.shape[0])))
    dq = _unblock(dq)[:, :, :q_len].astype(q.dtype)
    dk = _unblock(dk)[:, :, :kv_len].astype(k.dtype)
    dv = _unblock(dv)[:, :, :kv_len].astype(v.dtype)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(q, k, v, q_offset, mask, mask_q_len, q_chunk, k_chunk):
    return _forward(q, k, v, q_offset, mask, mask_q_len, q_chunk, k_chunk)[0]


def _flash_fwd(q, k, v, q_offset, mask, mask_q_len, q_chunk, k_chunk):
    out, lse = _forward(q, k, v, q_offset, mask, mask_q_len, q_chunk, k_chunk)
    return out, (q, k, v, q_offset, out, lse)


def _flash_bwd(mask, mask_q_len, q_chunk, k_chunk, residuals, dout):
    q, k, v, q_offset, out, lse = residuals
    args = (mask, mask_q_len, q_chunk, k_chunk)
    dq, dk, dv = _backward(q, k, v, q_offset, out, lse, dout, *args)
    return dq, dk, dv, np.zeros(np.shape(q_offset), jax.dtypes.float0)


_flash.defvjp(_flash_fwd, _flash_bwd)


def chunked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask,
    *,
    q_chunk: int = 512,
    k_chunk: int = 512,
    q_offset: jax.Array | int = 0,
    mask_q_len: int | None = None,
) -> jax.Array:
    """q: [B, Lq, H, D], k/v: [B, Lk, H, D] -> [B, Lq, H, D]; memory O((Lq + Lk) * D).

    ``q_offset`` / ``mask_q_len``: absolute position of the first query and the full query
    length the mask is defined over (defaults: 0 and Lq), for sequence-sharded queries.
    """
    q_chunk = min(q_chunk, q.shape[1])
    k_chunk = min(k_chunk, k.shape[1])
    mask_q_len = q.shape[1] if mask_q_len is None else mask_q_len
    offset = jnp.asarray(q_offset, jnp.int32)
    out = _flash(
        _heads_first(q),
        _heads_first(k),
        _heads_first(v),
        offset,
        mask,
        mask_q_len,
        q_chunk,
        k_chunk,
    )
    return _heads_first(out)


def _heads_first(x: jax.Array) -> jax.Array:
    """[B, L, H, D] <-> [B, H, L, D]."""
    return x.transpose(0, 2, 1, 3)
