"""Memory-efficient attention in pure JAX: online softmax over key blocks, O(N) memory.

The forward pass visits [q_chunk, k_chunk] score blocks one at a time (``lax.scan``), keeping a
running max ``m``, normaliser ``norm`` and output accumulator per query (Milakov & Gimelshein
2018; Rabe & Staats 2021; Dao et al. 2022). It saves only the output and two statistics per
query (row max and log-normaliser), and the custom backward pass recomputes each block's
probabilities from them, so neither pass ever holds an [Lq, Lk] matrix. Runs on any backend,
CPU included.

Everything stays in the caller's [B, L, H, D] layout: blocks are sliced out of the inputs and
written into the outputs in place, so no transposed or blocked copy of q, k, v is made.
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


def fit_chunk(length: int, chunk: int) -> int:
    """The block size used for ``length`` tokens, at most ``chunk``: the largest divisor of
    ``length`` in [chunk / 2, chunk] (a multiple of 8 for blocks of 64 and more), so the inputs
    need no padded copy (3,136 and 12,544 tokens -> 448); failing that, the fewest blocks of
    near-equal size, which pads by less than one alignment unit per block (577 -> 2 x 296)."""
    if length <= chunk:
        return length
    align = 8 if chunk >= 64 else 1
    for size in range(chunk - chunk % align, chunk // 2 - 1, -align):
        if length % size == 0:
            return size
    blocks = -(-length // chunk)
    size = -(-length // blocks)
    return min(chunk, -(-size // align) * align)


CPU_CHUNK = 512
# Budget for one [B, H, cq, ck] float32 score block (256 MiB). The backward keeps about four
# such blocks alive at once (scores, probabilities, their gradient, low-precision copies), so
# a call at the budget's limit needs about 1 GiB of working memory on the device.
ACCELERATOR_BLOCK_ELEMENTS = 2**26
ACCELERATOR_MAX_CHUNK = 4096


def default_chunk(batch_heads: int = 1, backend: str | None = None) -> int:
    """Largest block size for ``batch_heads`` = B * H score maps on one device of ``backend``
    (default: ``jax.default_backend()``).

    Each block pair is one step of a sequential loop. On a CPU a step costs little, and 512
    keeps the working set small. On an accelerator a step costs several unfused kernels, so
    blocks grow (powers of two up to 4,096) while one block stays within
    ``ACCELERATOR_BLOCK_ELEMENTS``; above B * H = 256 the 512 floor already exceeds it. This
    trades memory for speed: on an H100 at 50,176 tokens, B * H = 3, bfloat16, the 4,096 limit
    (3,584-blocks after fitting) ran forward+backward 2.9x faster than 512-blocks, with 3x the
    peak memory (671 vs 227 MiB).
    """
    if (backend or jax.default_backend()) == "cpu":
        return CPU_CHUNK
    chunk = CPU_CHUNK
    while (
        chunk < ACCELERATOR_MAX_CHUNK
        and batch_heads * (2 * chunk) ** 2 <= ACCELERATOR_BLOCK_ELEMENTS
    ):
        chunk *= 2
    return chunk


def _block(x: jax.Array, index: jax.Array, chunk: int) -> jax.Array:
    """Block ``index`` of ``chunk`` positions along axis 1 of [B, L, ...] (a slice, no copy of
    the whole array)."""
    return jax.lax.dynamic_slice_in_dim(x, index * chunk, chunk, axis=1)


def _set_block(x: jax.Array, value: jax.Array, index: jax.Array, chunk: int) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(x, value, index * chunk, axis=1)


def _block_scores(qb, kb, q_pos, k_pos, mask, q_len, kv_len, scale):
    """Scaled, masked scores of one block in float32: qb [B, cq, H, D], kb [B, ck, H, D] ->
    [B, H, cq, ck]. Masked keys score ``_NEG`` (a fully masked row then averages every real key,
    as the dense backend does); padding keys score -inf and never count."""
    s = jnp.einsum("bqhd,bkhd->bhqk", qb, kb, preferred_element_type=jnp.float32) * scale
    allowed = mask.allowed(q_pos, k_pos, q_len, kv_len)
    s = s if allowed is None else jnp.where(allowed, s, _NEG)
    return jnp.where((k_pos < kv_len)[None, :], s, -jnp.inf)


def _forward(q, k, v, q_offset, mask, mask_q_len, q_chunk, k_chunk):
    """q: [B, Lq, H, D], k/v: [B, Lk, H, D] -> (out [B, Lq, H, D], row max and log-normaliser
    [B, Lq, H] float32; kept apart because in a fully masked row their sum would cancel
    catastrophically against the masked scores).

    Query positions are ``q_offset + i`` and the mask is defined over ``mask_q_len`` queries:
    under sequence parallelism a shard holds queries [q_offset, q_offset + Lq) of the sequence.
    Blocks are sliced out of the inputs and written into the outputs in place, so the only
    [L]-sized arrays are the inputs, the output and the row statistics.
    """
    b, q_len, h, d = q.shape
    kv_len = k.shape[1]
    scale = d**-0.5
    qp, kp, vp = _pad_to(q, 1, q_chunk), _pad_to(k, 1, k_chunk), _pad_to(v, 1, k_chunk)
    num_k = kp.shape[1] // k_chunk

    def one_q_block(carry, qi):
        out, row_max, log_norm = carry
        qb = _block(qp, qi, q_chunk)
        q_pos = q_offset + qi * q_chunk + jnp.arange(q_chunk)

        def one_k_block(state, ki):
            m, norm, acc = state
            vb = _block(vp, ki, k_chunk)
            k_pos = ki * k_chunk + jnp.arange(k_chunk)
            s = _block_scores(
                qb, _block(kp, ki, k_chunk), q_pos, k_pos, mask, mask_q_len, kv_len, scale
            )
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            correction = jnp.exp(m - m_new)
            norm = norm * correction + p.sum(-1)
            pv = jnp.einsum(
                "bhqk,bkhd->bhqd", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32
            )
            return (m_new, norm, acc * correction[..., None] + pv), None

        init = (
            jnp.full((b, h, q_chunk), _NEG, jnp.float32),
            jnp.zeros((b, h, q_chunk), jnp.float32),
            jnp.zeros((b, h, q_chunk, d), jnp.float32),
        )
        (m, norm, acc), _ = jax.lax.scan(one_k_block, init, jnp.arange(num_k))
        out_b = (acc / norm[..., None]).astype(q.dtype).transpose(0, 2, 1, 3)  # [B, cq, H, D]
        return (
            _set_block(out, out_b, qi, q_chunk),
            _set_block(row_max, m.transpose(0, 2, 1), qi, q_chunk),  # [B, cq, H]
            _set_block(log_norm, jnp.log(norm).transpose(0, 2, 1), qi, q_chunk),
        ), None

    stats = jnp.zeros(qp.shape[:3], jnp.float32)
    init = (jnp.zeros(qp.shape, q.dtype), stats, stats)
    (out, row_max, log_norm), _ = jax.lax.scan(
        one_q_block, init, jnp.arange(qp.shape[1] // q_chunk)
    )
    return out[:, :q_len], (row_max[:, :q_len], log_norm[:, :q_len])


def _backward(q, k, v, q_offset, out, stats, dout, mask, mask_q_len, q_chunk, k_chunk):
    """Gradients (dq, dk, dv) by block-wise recomputation of the probabilities; all arrays
    [B, L, H, D] (``stats``: the forward's row max and log-normaliser [B, Lq, H]), accumulated
    in float32 buffers updated in place."""
    q_len, kv_len = q.shape[1], k.shape[1]
    scale = q.shape[-1] ** -0.5
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), -1)  # [B, Lq, H]
    qp, dop = _pad_to(q, 1, q_chunk), _pad_to(dout, 1, q_chunk)
    maxp, lognp, deltap = (_pad_to(x, 1, q_chunk) for x in (*stats, delta))
    kp, vp = _pad_to(k, 1, k_chunk), _pad_to(v, 1, k_chunk)
    num_q = qp.shape[1] // q_chunk

    def one_k_block(carry, ki):
        dq, dk, dv = carry
        kb, vb = _block(kp, ki, k_chunk), _block(vp, ki, k_chunk)
        k_pos = ki * k_chunk + jnp.arange(k_chunk)

        def one_q_block(inner, qi):
            dq, dk_b, dv_b = inner
            qb, dob = _block(qp, qi, q_chunk), _block(dop, qi, q_chunk)
            max_b, logn_b, delta_b = (
                _block(x, qi, q_chunk).transpose(0, 2, 1)[..., None]  # [B, H, cq, 1]
                for x in (maxp, lognp, deltap)
            )
            q_pos = q_offset + qi * q_chunk + jnp.arange(q_chunk)
            s = _block_scores(qb, kb, q_pos, k_pos, mask, mask_q_len, kv_len, scale)
            p = jnp.exp((s - max_b) - logn_b)  # [B, H, cq, ck], float32
            # The products take p and ds in the inputs' dtype (as the forward takes p), with
            # float32 accumulation, as FlashAttention-2 does; in float16, ds of very long rows
            # (p ~ 1/L) can underflow.
            dv_b = dv_b + jnp.einsum(
                "bhqk,bqhd->bkhd", p.astype(dob.dtype), dob, preferred_element_type=jnp.float32
            )
            dp = jnp.einsum("bqhd,bkhd->bhqk", dob, vb, preferred_element_type=jnp.float32)
            # Masked scores are constants (no gradient), which matters in fully masked rows.
            ds = jnp.where(s > _NEG, p * (dp - delta_b), 0.0) * scale
            ds = ds.astype(qb.dtype)
            dk_b = dk_b + jnp.einsum("bhqk,bqhd->bkhd", ds, qb, preferred_element_type=jnp.float32)
            dq_b = _block(dq, qi, q_chunk) + jnp.einsum(
                "bhqk,bkhd->bqhd", ds, kb, preferred_element_type=jnp.float32
            )
            return (_set_block(dq, dq_b, qi, q_chunk), dk_b, dv_b), None

        zeros = jnp.zeros(kb.shape, jnp.float32)
        (dq, dk_b, dv_b), _ = jax.lax.scan(one_q_block, (dq, zeros, zeros), jnp.arange(num_q))
        return (dq, _set_block(dk, dk_b, ki, k_chunk), _set_block(dv, dv_b, ki, k_chunk)), None

    init = (
        jnp.zeros(qp.shape, jnp.float32),
        jnp.zeros(kp.shape, jnp.float32),
        jnp.zeros(kp.shape, jnp.float32),
    )
    (dq, dk, dv), _ = jax.lax.scan(one_k_block, init, jnp.arange(kp.shape[1] // k_chunk))
    return (
        dq[:, :q_len].astype(q.dtype),
        dk[:, :kv_len].astype(k.dtype),
        dv[:, :kv_len].astype(v.dtype),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(q, k, v, q_offset, mask, mask_q_len, q_chunk, k_chunk):
    return _forward(q, k, v, q_offset, mask, mask_q_len, q_chunk, k_chunk)[0]


def _flash_fwd(q, k, v, q_offset, mask, mask_q_len, q_chunk, k_chunk):
    out, stats = _forward(q, k, v, q_offset, mask, mask_q_len, q_chunk, k_chunk)
    return out, (q, k, v, q_offset, out, stats)


def _flash_bwd(mask, mask_q_len, q_chunk, k_chunk, residuals, dout):
    q, k, v, q_offset, out, stats = residuals
    args = (mask, mask_q_len, q_chunk, k_chunk)
    dq, dk, dv = _backward(q, k, v, q_offset, out, stats, dout, *args)
    return dq, dk, dv, np.zeros(np.shape(q_offset), jax.dtypes.float0)


_flash.defvjp(_flash_fwd, _flash_bwd)


def chunked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask,
    *,
    q_chunk: int | None = None,
    k_chunk: int | None = None,
    q_offset: jax.Array | int = 0,
    mask_q_len: int | None = None,
) -> jax.Array:
    """q: [B, Lq, H, D], k/v: [B, Lk, H, D] -> [B, Lq, H, D]; memory O((Lq + Lk) * D).

    ``q_offset`` / ``mask_q_len``: absolute position of the first query and the full query
    length the mask is defined over (defaults: 0 and Lq), for sequence-sharded queries.
    Block sizes (at most ``default_chunk(B * H)`` unless given) are fitted to the lengths
    (``fit_chunk``).
    """
    chunk = default_chunk(q.shape[0] * q.shape[2])
    q_chunk = fit_chunk(q.shape[1], q_chunk or chunk)
    k_chunk = fit_chunk(k.shape[1], k_chunk or chunk)
    mask_q_len = q.shape[1] if mask_q_len is None else mask_q_len
    offset = jnp.asarray(q_offset, jnp.int32)
    return _flash(q, k, v, offset, mask, mask_q_len, q_chunk, k_chunk)
