"""One ``attention`` function with pluggable backends and structured masks.

Masks are small objects rather than dense arrays, so that a backend can exploit their structure
(skip fully masked blocks, use a causal kernel). ``mask.dense(q_len, kv_len)`` is the reference
boolean matrix (True = may attend) that every backend is tested against.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vitok import sharding
from vitok.nn.flash import chunked_attention, default_chunk
from vitok.nn.layers import dropout, param, plain_layer_norm
from vitok.nn.rope import apply_rope
from vitok.registry import Registry


@dataclasses.dataclass(frozen=True)
class FullMask:
    """Every query attends to every key."""

    def allowed(self, q_pos, k_pos, q_len: int, kv_len: int):
        """Bool [len(q_pos), len(k_pos)] for absolute positions, or None for "everything"."""
        return None

    def dense(self, q_len: int, kv_len: int) -> np.ndarray:
        return _dense(self, q_len, kv_len)


@dataclasses.dataclass(frozen=True)
class CausalMask:
    """Query i attends to keys 0..i (keys aligned to the end when kv_len > q_len, as with a
    KV cache holding ``kv_len - q_len`` earlier tokens)."""

    def allowed(self, q_pos, k_pos, q_len: int, kv_len: int):
        return k_pos[None, :] <= q_pos[:, None] + (kv_len - q_len)

    def dense(self, q_len: int, kv_len: int) -> np.ndarray:
        return _dense(self, q_len, kv_len)


@dataclasses.dataclass(frozen=True)
class RegisterCausalMask:
    """FlexTok's encoder mask over ``[patches (P), registers (R)]``: patches attend to patches
    only; register i attends to every patch and to registers 0..i. So register i never sees a
    later register, and the patches never see the registers."""

    num_patches: int

    def allowed(self, q_pos, k_pos, q_len: int, kv_len: int):
        p = self.num_patches
        k_is_patch = k_pos[None, :] < p
        q_is_register = q_pos[:, None] >= p
        return k_is_patch | (q_is_register & (k_pos[None, :] <= q_pos[:, None]))

    def dense(self, q_len: int, kv_len: int) -> np.ndarray:
        return _dense(self, q_len, kv_len)


@dataclasses.dataclass(frozen=True)
class NeighbourMask:
    """NAR's proximity mask over ``[prefix (P), grid tokens in raster order]``.

    A grid token at coordinates c has "diagonal" d = sum(c) (its Manhattan distance from the
    first corner); prefix tokens (the class token) have d = -1. Query q may attend to key k when
    d(k) <= d(q): every earlier diagonal, the prefix, and its own diagonal in both directions.
    On a 1D grid this is the causal mask with the prefix in front.
    """

    grid: tuple[int, ...]
    prefix: int = 1

    def diagonal(self, pos):
        """Positions (numpy or jax ints) -> diagonal index; works on tracers and constants."""
        rel = pos - self.prefix
        total = 0
        stride = int(np.prod(self.grid))
        for dim in self.grid:
            stride //= dim
            total = total + (rel // stride) % dim
        is_prefix = pos < self.prefix
        return total * (1 - is_prefix) - is_prefix

    def allowed(self, q_pos, k_pos, q_len: int, kv_len: int):
        return self.diagonal(k_pos)[None, :] <= self.diagonal(q_pos)[:, None]

    def dense(self, q_len: int, kv_len: int) -> np.ndarray:
        return _dense(self, q_len, kv_len)


@dataclasses.dataclass(frozen=True, eq=False)
class TokenKeepMask:
    """A per-example mask from kept positions ``keep`` [B, L] (a traced array): query i may
    attend to key j when both are kept, and every position attends to itself, so a dropped
    position affects no kept one (KARL's halted tokens). Broadcast over heads, never mixed
    across examples. Dense attention only (the mask depends on the data)."""

    keep: jax.Array

    def allowed(self, q_pos, k_pos, q_len: int, kv_len: int):
        raise ValueError(
            "TokenKeepMask is a per-example mask; use attention_backend 'dense' for it"
        )

    def dense(self, q_len: int, kv_len: int) -> jax.Array:
        """-> bool [B, L, L]."""
        keep = self.keep.astype(bool)
        both = keep[:, :, None] & keep[:, None, :]
        return both | jnp.eye(keep.shape[1], dtype=bool)[None]


def _dense(mask, q_len: int, kv_len: int) -> np.ndarray:
    """The reference [q_len, kv_len] boolean matrix (True = may attend)."""
    allowed = mask.allowed(np.arange(q_len), np.arange(kv_len), q_len, kv_len)
    return np.ones((q_len, kv_len), bool) if allowed is None else np.asarray(allowed, bool)


Mask = FullMask | CausalMask | RegisterCausalMask | NeighbourMask | TokenKeepMask

Backend = Callable[..., jax.Array]
BACKENDS = Registry("attention backend")
register_backend = BACKENDS.register


def backends() -> tuple[str, ...]:
    return tuple(BACKENDS.names())


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: Mask | None = None,
    *,
    backend: str = "dense",
) -> jax.Array:
    """Scaled dot-product attention.

    q: [B, Lq, H, Dh], k/v: [B, Lk, H, Dh], returns [B, Lq, H, Dh] in q's dtype.
    """
    return BACKENDS.lookup(backend)(q, k, v, mask or FullMask())


@register_backend("dense")
def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask) -> jax.Array:
    """Materialises the [B, H, Lq, Lk] score matrix; softmax in float32."""
    allowed = None if isinstance(mask, FullMask) else mask.dense(q.shape[1], k.shape[1])
    return masked_attention(q, k, v, allowed)


def masked_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array | np.ndarray | None
) -> jax.Array:
    """Dense attention under an explicit boolean ``allowed`` [Lq, Lk] or [B, Lq, Lk] (True = may
    attend), e.g. a KV-cached decoding step whose mask depends on the step."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(scale, q.dtype), k)
    logits = logits.astype(jnp.float32)
    if allowed is not None:
        allowed = jnp.asarray(allowed)
        allowed = allowed[:, None] if allowed.ndim == 3 else allowed
        logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def _qkv_spec(shape: tuple[int, ...], mesh) -> jax.sharding.PartitionSpec:
    """The mesh axes of q/k/v [B, L, H, D] under the active rules, as ``MultiHeadAttention``
    constrains them (axes that do not divide their dimension dropped)."""
    logical = ("batch", "length", "heads", "kv")
    rules = sharding.active_rules()
    return sharding.fit_spec_to_shape(sharding.logical_to_mesh_spec(logical, rules), shape, mesh)


def per_device_batch_heads(q: jax.Array) -> int:
    """B * H of one device's share of q [B, L, H, D]: under an active mesh, jit sees global
    shapes while each device holds the batch split over its data axes and the heads split over
    ``tensor`` (as ``MultiHeadAttention`` constrains q)."""
    mesh = sharding.current_mesh()
    b, _, h, _ = q.shape
    if mesh is None:
        return b * h
    spec = _qkv_spec(q.shape, mesh)

    def ways(entry) -> int:
        axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
        return int(np.prod([mesh.shape[a] for a in axes]))

    return (b // ways(spec[0])) * (h // ways(spec[2]))


@register_backend("chunked")
def _chunked(q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask) -> jax.Array:
    """Memory-efficient online-softmax attention (pure JAX, O(N) memory, any device); block
    sizes from ``flash.default_chunk`` for one device's share of the batch and heads."""
    chunk = default_chunk(per_device_batch_heads(q))
    return chunked_attention(q, k, v, mask, q_chunk=chunk, k_chunk=chunk)


@register_backend("cudnn")
def _cudnn(q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask) -> jax.Array:
    """cuDNN flash attention through ``jax.nn.dot_product_attention`` (NVIDIA GPUs only)."""
    if jax.default_backend() != "gpu":
        raise ValueError("attention backend 'cudnn' needs a GPU; use 'chunked' or 'dense' here")
    if not isinstance(mask, (FullMask, CausalMask)):
        raise ValueError(f"attention backend 'cudnn' supports full and causal masks, not {mask}")
    causal = isinstance(mask, CausalMask)
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")


def splash_mask(mask: Mask, q_len: int, kv_len: int, num_heads: int):
    """Our mask as a Pallas splash-attention ``MultiHeadMask`` (causal and full masks keep their
    structure, so the kernel skips empty blocks without reading an [L, L] array)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    shape = (q_len, kv_len)
    if isinstance(mask, FullMask):
        head = splash.FullMask(shape)
    elif isinstance(mask, CausalMask):
        head = splash.CausalMask(shape)
    else:
        head = splash.NumpyMask(np.asarray(mask.dense(q_len, kv_len), dtype=bool))
    return splash.MultiHeadMask([head] * num_heads)


@register_backend("splash")
def _splash(q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask) -> jax.Array:
    """Pallas splash attention (TPU only): block-sparse flash attention over the mask's
    structure. Sequence lengths must be multiples of the kernel's block size (128)."""
    if jax.default_backend() != "tpu":
        raise ValueError("attention backend 'splash' needs a TPU; use 'chunked' or 'dense' here")
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    _, q_len, heads, head_dim = q.shape
    kernel = splash.make_splash_mha(
        splash_mask(mask, q_len, k.shape[1], heads), head_shards=1, q_seq_shards=1
    )
    to_heads = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [B, L, H, Dh] -> [B, H, L, Dh]
    scaled = q * jnp.asarray(head_dim**-0.5, q.dtype)
    out = jax.vmap(kernel)(to_heads(scaled), to_heads(k), to_heads(v))
    return to_heads(out).astype(q.dtype)


@register_backend("sequence_parallel")
def _sequence_parallel(q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask) -> jax.Array:
    """Queries stay sharded over the ``sequence`` mesh axis; keys and values are all-gathered
    over it and each shard runs chunked attention for its own queries (exact, O(N/S) queries
    per device). Without an active mesh (or a sequence axis of 1) it is plain chunked attention.
    """
    mesh = sharding.current_mesh()
    if mesh is None or mesh.shape["sequence"] == 1:
        return chunked_attention(q, k, v, mask)
    q_len = q.shape[1]
    if q_len % mesh.shape["sequence"] or k.shape[1] % mesh.shape["sequence"]:
        raise ValueError(
            f"sequence_parallel attention: lengths {q_len}/{k.shape[1]} are not divisible by "
            f"the sequence mesh axis ({mesh.shape['sequence']})"
        )
    spec = _qkv_spec(q.shape, mesh)
    spec = jax.sharding.PartitionSpec(spec[0], "sequence", spec[2], spec[3])

    def local(q_shard, k_shard, v_shard):
        k_full = jax.lax.all_gather(k_shard, "sequence", axis=1, tiled=True)
        v_full = jax.lax.all_gather(v_shard, "sequence", axis=1, tiled=True)
        offset = jax.lax.axis_index("sequence") * q_shard.shape[1]
        return chunked_attention(q_shard, k_full, v_full, mask, q_offset=offset, mask_q_len=q_len)

    return jax.shard_map(
        local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False
    )(q, k, v)


@dataclasses.dataclass
class KVCache:
    """The keys and values of a stack's layers, k, v: [layers, B, C, H, Dh], for decoding in
    passes over fed tokens.

    In a pass the Q fed tokens of every layer write their keys/values at slots start ..
    start + Q - 1 of that layer, then their queries attend over the layer's C slots where
    ``allowed`` [Q, C]. ``attend`` replaces ``k`` and ``v`` with the written arrays (a pure
    update; the object is the pass's handle on them), so read them after the pass.
    """

    k: jax.Array
    v: jax.Array
    start: jax.Array
    allowed: jax.Array

    def attend(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        """q, k, v of the fed tokens [B, Q, H, Dh] -> attention output [B, Q, H, Dh]."""
        at = (layer, 0, self.start, 0, 0)
        self.k = jax.lax.dynamic_update_slice(self.k, k.astype(self.k.dtype)[None], at)
        self.v = jax.lax.dynamic_update_slice(self.v, v.astype(self.v.dtype)[None], at)
        return masked_attention(q, self.k[layer], self.v[layer], self.allowed)


class MultiHeadAttention(nnx.Module):
    """Self-attention with head-sharded projections: W_qkv [D, 3, H, Dh], W_out [H, Dh, D].
    ``qk_norm``: queries and keys are layer-normalised per head (no scale or bias, eps 1e-5;
    FlexTok's)."""

    def __init__(
        self,
        width: int,
        num_heads: int,
        *,
        rngs: nnx.Rngs,
        backend: str = "dense",
        dropout: float = 0.0,
        use_bias: bool = True,
        qk_norm: bool = False,
        dtype: jnp.dtype = jnp.float32,
    ):
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        head_dim = width // num_heads
        init = nnx.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2, 3))
        zeros = nnx.initializers.zeros_init()
        self.qkv = param(
            rngs, init, (width, 3, num_heads, head_dim), ("embed", None, "heads", "kv")
        )
        self.qkv_bias = (
            param(rngs, zeros, (3, num_heads, head_dim), (None, "heads", "kv"))
            if use_bias
            else None
        )
        out_init = nnx.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2)
        self.out = param(rngs, out_init, (num_heads, head_dim, width), ("heads", "kv", "embed"))
        self.out_bias = param(rngs, zeros, (width,), ("embed",)) if use_bias else None
        self.backend = backend
        self.dropout = dropout
        self.qk_norm = qk_norm
        self.dtype = dtype

    def __call__(
        self,
        x: jax.Array,
        mask: Mask | None = None,
        *,
        dropout_rng: jax.Array | None = None,
        cache: KVCache | None = None,
        cache_layer: int = 0,
        rope: jax.Array | None = None,
    ) -> jax.Array:
        """x: [B, L, D] -> [B, L, D]. With ``cache``, x are the fed tokens of a decoding pass:
        their keys/values go into layer ``cache_layer`` of the cache and they attend over it
        (``mask`` unused: the cache's ``allowed`` masks). ``rope`` [L, Dh / 2, 2]: rotary
        (cos, sin) of the L positions, applied to queries and keys (``vitok.nn.rope``)."""
        q, k, v = self.project(x)
        if self.qk_norm:
            q, k = plain_layer_norm(q), plain_layer_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if cache is None:
            y = attention(q, k, v, mask, backend=self.backend)
        else:
            y = cache.attend(cache_layer, q, k, v)
        return dropout(self.combine(y), self.dropout, dropout_rng, 2)

    def project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x: [B, L, D] -> q, k, v: [B, L, H, Dh] (a KV cache stores the k and v)."""
        dt = self.dtype
        qkv = jnp.einsum("bld,dthk->tblhk", x.astype(dt), self.qkv[...].astype(dt))
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias[...].astype(dt)[:, None, None]
        q, k, v = (sharding.constrain(t, ("batch", "length", "heads", "kv")) for t in qkv)
        return q, k, v

    def combine(self, y: jax.Array) -> jax.Array:
        """Per-head outputs y: [B, L, H, Dh] -> [B, L, D]."""
        dt = self.dtype
        out = jnp.einsum("blhk,hkd->bld", y, self.out[...].astype(dt))
        if self.out_bias is not None:
            out = out + self.out_bias[...].astype(dt)
        return out
