"""Class-conditional token generators on one GPT backbone: NAR, raster AR and 1D AR.

Neighbouring autoregression (NAR, He et al. 2025) decodes a token grid outward from its first
corner: every token of anti-diagonal d (coordinates summing to d) is generated in one forward
pass, so an n x m grid takes n + m - 1 passes instead of n * m.

    sequence   [class token; grid tokens in raster order]            (length 1 + N, no shift)
    mask       query q sees key k when diag(k) <= diag(q)            (``NeighbourMask``)
    heads      head a predicts the next token along axis (ndim - 1 - a): head 0 (right
               neighbour) reads the last block; head a > 0 reads a extra blocks, chained
    logits     target t = mean over the heads that have a source for it: head a reads the
               token one step back along its axis; the first token reads the class token
               through every head

On a 1D grid with one head the same model is a GPT with the causal mask: the raster baseline
(``order="raster"`` flattens the 2D grid) and the GPT over FlexTok's 1D tokens. A 3D (t, n, n)
grid gets a time head and decodes in 2n + t - 2 passes.

Decoding (``sample``) runs the static ``Schedule`` in one compiled ``lax.fori_loop`` with a KV
cache: step 0 feeds the class token and emits the first token; step s feeds the tokens of
diagonal s - 1 (padded to a fixed width) and emits diagonal s.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vitok import sharding
from vitok.models.base import Model
from vitok.nn.attention import NeighbourMask, masked_attention
from vitok.nn.layers import Dense, LayerNorm, param
from vitok.nn.transformer import Block, make_stack, run_stack
from vitok.perf import transformer_flops
from vitok.registry import MODELS

ORDERS = ("neighbour", "raster")


# --- geometry: which token predicts which, and the decoding schedule -------------------------------


def decode_grid(grid: Sequence[int], order: str) -> tuple[int, ...]:
    """The grid the model decodes over: the data grid, or (N,) for raster order."""
    if order not in ORDERS:
        raise ValueError(f"model.order must be one of {ORDERS}, got {order!r}")
    grid = tuple(int(g) for g in grid)
    return grid if order == "neighbour" else (math.prod(grid),)


def head_sources(grid: Sequence[int]) -> np.ndarray:
    """Sequence position each head reads to predict each grid token: int32 [N, A], -1 = none.

    Head a steps along axis ``ndim - 1 - a``. Target 0 (the corner) reads position 0 (the
    class token) through every head; any other target reads, through head a, the token one
    step back along that axis (sequence position 1 + its raster index), if it exists.
    """
    grid = tuple(grid)
    n, ndim = math.prod(grid), len(grid)
    coords = np.stack(np.unravel_index(np.arange(n), grid), -1)  # [N, ndim]
    strides = np.asarray([math.prod(grid[i + 1 :]) for i in range(ndim)])
    sources = np.full((n, ndim), -1, np.int32)
    for a in range(ndim):
        axis = ndim - 1 - a
        has = coords[:, axis] > 0
        sources[has, a] = 1 + np.arange(n)[has] - strides[axis]
    sources[0] = 0
    return sources


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
    """The static decoding plan of a grid: one row per forward pass.

    feed:   int32 [S, Q]    sequence positions fed at each pass (padding: ``pad_position``)
    target: int32 [S, T]    grid tokens emitted at each pass (padding: N, a scratch slot)
    source: int32 [S, T, A] feed slot that head a reads for each emitted token, -1 = none
    start:  int32 [S]       KV-cache slot of each pass's first fed token
    cache_diagonal: int32 [N + 1 + Q]  diagonal of the token in each cache slot

    The KV cache holds the sequence sorted by (diagonal, position), so every pass writes one
    contiguous block of Q slots (an in-place ``dynamic_update_slice``, not a scatter). Padding
    writes land on slots of later diagonals, which nobody may read before they are rewritten.
    """

    grid: tuple[int, ...]
    feed: np.ndarray
    target: np.ndarray
    source: np.ndarray
    start: np.ndarray
    cache_diagonal: np.ndarray

    def _arrays(self) -> tuple[np.ndarray, ...]:
        return (self.feed, self.target, self.source, self.start, self.cache_diagonal)

    # Value semantics over the arrays: a model holding a Schedule is static pytree metadata,
    # which JAX and nnx compare and hash (the dataclass default would compare arrays with ==).
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Schedule):
            return NotImplemented
        return tuple(self.grid) == tuple(other.grid) and all(
            np.array_equal(a, b) for a, b in zip(self._arrays(), other._arrays(), strict=True)
        )

    def __hash__(self) -> int:
        return hash((tuple(self.grid), *(np.asarray(a).tobytes() for a in self._arrays())))

    @property
    def num_passes(self) -> int:
        return self.feed.shape[0]

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def pad_position(self) -> int:
        """The sequence position of padded feed slots. Their outputs are never read, and the
        keys they write land on cache slots of later diagonals (see ``cache_diagonal``), which
        no query may read before a later pass rewrites them."""
        return self.num_tokens + 1


def make_schedule(grid: Sequence[int]) -> Schedule:
    """Pass 0 feeds the class token and emits token 0; pass s >= 1 feeds diagonal s - 1 and
    emits diagonal s. S = sum(g - 1) + 1 passes: n + m - 1 for n x m, N for a 1D grid."""
    grid = tuple(int(g) for g in grid)
    n = math.prod(grid)
    diag = np.stack(np.unravel_index(np.arange(n), grid), -1).sum(-1)
    num_passes = int(diag.max()) + 1
    width = int(np.bincount(diag).max())
    sources = head_sources(grid)
    feed = np.full((num_passes, width), n + 1, np.int32)
    target = np.full((num_passes, width), n, np.int32)
    source = np.full((num_passes, width, len(grid)), -1, np.int32)
    feed[0, 0], target[0, 0], source[0, 0] = 0, 0, 0
    seq_diag = np.concatenate([[-1], diag])  # class token first
    cache_order = np.lexsort((np.arange(n + 1), seq_diag))
    slot = np.argsort(cache_order)
    start = np.zeros((num_passes,), np.int32)
    for s in range(1, num_passes):
        start[s] = slot[1 + np.flatnonzero(diag == s - 1)[0]]
    cache_diagonal = np.concatenate([seq_diag[cache_order], np.full((width,), 1 << 30)])
    for s in range(1, num_passes):
        fed = 1 + np.flatnonzero(diag == s - 1)  # sequence positions of diagonal s - 1
        feed[s, : len(fed)] = fed
        slot_of = {int(p): i for i, p in enumerate(fed)}
        emitted = np.flatnonzero(diag == s)
        target[s, : len(emitted)] = emitted
        for t, token in enumerate(emitted):
            for a, pos in enumerate(sources[token]):
                if pos >= 0:
                    source[s, t, a] = slot_of[int(pos)]
    return Schedule(grid, feed, target, source, start, cache_diagonal.astype(np.int32))


def pass_segments(
    schedule: Schedule, passes: int, buckets: bool | str = True
) -> list[tuple[int, int, int]]:
    """(first pass, end pass, width) runs covering passes [0, passes), one loop each.

    ``buckets``: False, one run at the full width; True (or "pow2"), maximal runs of passes
    whose fed and emitted tokens fit the same power-of-two width; "exact", maximal runs of
    passes of exactly the same width (no padded rows, but one compiled loop body per width).
    """
    full = schedule.feed.shape[1]
    if buckets is False:
        return [(0, passes, full)]
    if buckets not in (True, "pow2", "exact"):
        raise ValueError(f"buckets must be True, False, 'pow2' or 'exact', got {buckets!r}")
    used = np.maximum(
        (schedule.feed <= schedule.num_tokens).sum(1),
        (schedule.target < schedule.num_tokens).sum(1),
    )[:passes]
    if buckets == "exact":
        widths = [max(int(u), 1) for u in used]
    else:
        widths = [min(full, 1 << int(np.ceil(np.log2(max(u, 1))))) for u in used]
    runs: list[tuple[int, int, int]] = []
    for s, w in enumerate(widths):
        if runs and runs[-1][2] == w:
            runs[-1] = (runs[-1][0], s + 1, w)
        else:
            runs.append((s, s + 1, w))
    return runs


def mix_heads(head_logits: Sequence[jax.Array], sources: jax.Array) -> jax.Array:
    """The mean of the heads that predict each target.

    head_logits: A arrays [B, P, V] (head a's logits at P positions or feed slots);
    sources: int [T, A] position each head reads for each target, -1 = none -> [B, T, V] float32.
    """
    total, count = 0.0, 0.0
    for a, logits in enumerate(head_logits):
        src = sources[:, a]
        has = (src >= 0).astype(jnp.float32)
        picked = jnp.take(logits, jnp.maximum(src, 0), axis=1).astype(jnp.float32)
        total = total + picked * has[None, :, None]
        count = count + has
    return total / jnp.maximum(count, 1.0)[None, :, None]


# --- the model ----------------------------------------------------------------------------------


class TokenGenerator(Model):
    """Class-conditional GPT over a grid of discrete tokens, decoded by neighbours or in raster.

    Args:
      grid: the token grid of one example, e.g. (16, 16), (4, 16, 16) or (32,).
      vocab_size: codebook size.
      num_classes: conditioning classes; index ``num_classes`` is the null class (CFG).
      order: "neighbour" (NAR) or "raster" (flattened grid, causal, one head).
      width, depth, num_heads, mlp_dim: the backbone (``depth`` blocks before head 0).
    """

    def __init__(
        self,
        *,
        grid: Sequence[int],
        vocab_size: int,
        num_classes: int,
        order: str = "neighbour",
        width: int = 256,
        depth: int = 6,
        num_heads: int = 8,
        mlp_dim: int | None = None,
        dropout: float = 0.0,
        attention_backend: str = "dense",
        remat: bool = False,
        scan_layers: bool = False,
        dtype: str | jnp.dtype = "float32",
        rngs: nnx.Rngs,
    ):
        dtype = jnp.dtype(dtype)
        self.grid = tuple(int(g) for g in grid)
        self.order = order
        self.decode_grid = decode_grid(self.grid, order)
        self.num_tokens = math.prod(self.grid)
        self.vocab_size = int(vocab_size)
        self.num_classes = int(num_classes)
        self.num_heads_out = len(self.decode_grid)
        self.width, self.depth, self.attention_heads = width, depth, num_heads
        self.mlp_dim = mlp_dim or 4 * width
        self.remat, self.scan_layers = remat, scan_layers
        self.dtype = dtype
        normal = nnx.initializers.normal(0.02)

        self.token_embed = param(rngs, normal, (self.vocab_size, width), ("vocab", "embed"))
        self.class_embed = param(rngs, normal, (self.num_classes + 1, width), (None, "embed"))
        self.posemb = param(rngs, normal, (1 + self.num_tokens, width), (None, "embed"))

        def make_block(rngs: nnx.Rngs) -> Block:
            return Block(
                width,
                num_heads,
                self.mlp_dim,
                rngs=rngs,
                attention_backend=attention_backend,
                dropout=dropout,
                dtype=dtype,
            )

        self.blocks = make_stack(make_block, depth, rngs, scan_layers)
        # Head a > 0 reads a extra blocks, chained after the backbone (the paper's column head
        # after one extra block; a video's time head after a second).
        self.extra_blocks = nnx.List([make_block(rngs) for _ in range(self.num_heads_out - 1)])
        self.head_norms = nnx.List(
            [LayerNorm(width, rngs=rngs, dtype=dtype) for _ in range(self.num_heads_out)]
        )
        self.heads = nnx.List(
            [
                Dense(
                    width,
                    self.vocab_size,
                    ("embed", "vocab"),
                    rngs=rngs,
                    kernel_init=nnx.initializers.zeros_init() if a == 0 else normal,
                    dtype=dtype,
                )
                for a in range(self.num_heads_out)
            ]
        )
        self.mask = NeighbourMask(self.decode_grid, prefix=1)
        self.sources = head_sources(self.decode_grid)
        self.schedule = make_schedule(self.decode_grid)

    # --- inputs ---------------------------------------------------------------------------------

    def _embed(self, labels: jax.Array, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        """labels [B], tokens [B, Q] (ignored where position 0), positions [Q] -> [B, Q, D]."""
        tok = jnp.take(self.token_embed[...], jnp.clip(tokens, 0, self.vocab_size - 1), axis=0)
        cls = jnp.take(self.class_embed[...], labels, axis=0)[:, None]
        x = jnp.where((positions == 0)[None, :, None], cls, tok)
        x = x + jnp.take(self.posemb[...], jnp.minimum(positions, self.num_tokens), axis=0)
        return sharding.constrain(x.astype(self.dtype), ("batch", "length", "embed"))

    def _flatten(self, tokens: jax.Array) -> jax.Array:
        """tokens [B, *grid] -> [B, N] in raster order (a clear error for a wrong shape)."""
        if tuple(tokens.shape[1:]) != self.grid:
            raise ValueError(
                f"the generator takes token grids [B, {self.grid}], got {tuple(tokens.shape)}"
            )
        return tokens.reshape(tokens.shape[0], self.num_tokens)

    def _head_logits(self, a: int, h: jax.Array) -> jax.Array:
        return sharding.constrain(
            self.heads[a](self.head_norms[a](h)).astype(jnp.float32), ("batch", "length", "vocab")
        )

    # --- training: the whole sequence at once -------------------------------------------------

    def __call__(
        self, tokens: jax.Array, labels: jax.Array, *, dropout_rng: jax.Array | None = None
    ) -> jax.Array:
        """tokens: int [B, *grid], labels: int [B] -> logits [B, *grid, V] float32 (teacher
        forcing: the logits of every token given the tokens before it in decoding order)."""
        flat = self._flatten(tokens)
        b = flat.shape[0]
        seq = jnp.concatenate([jnp.zeros((b, 1), flat.dtype), flat], axis=1)
        x = self._embed(labels, seq, jnp.arange(1 + self.num_tokens))
        keys = (
            [None] * (1 + len(self.extra_blocks))
            if dropout_rng is None
            else list(jax.random.split(dropout_rng, 1 + len(self.extra_blocks)))
        )
        h = run_stack(
            self.blocks,
            x,
            lambda block, y, key: block(y, self.mask, dropout_rng=key),
            depth=self.depth,
            scan_layers=self.scan_layers,
            remat=self.remat,
            dropout_rng=keys[0],
        )
        head_logits = [self._head_logits(0, h)]
        for a, block in enumerate(self.extra_blocks, start=1):
            h = block(h, self.mask, dropout_rng=keys[a])
            head_logits.append(self._head_logits(a, h))
        logits = mix_heads(head_logits, jnp.asarray(self.sources))
        return logits.reshape(b, *self.grid, self.vocab_size)

    # --- decoding: one pass of the schedule with a KV cache -----------------------------------

    def init_cache(self, batch: int) -> dict:
        """Zero keys/values for the backbone [depth, B, C, H, Dh] and each extra block, C = N + 1
        + the schedule's width (slots in (diagonal, position) order, see ``Schedule``)."""
        shape = (
            batch,
            len(self.schedule.cache_diagonal),
            self.attention_heads,
            self.width // self.attention_heads,
        )
        axes = ("layers", "batch", None, "heads", "kv")
        zeros = lambda layers: sharding.constrain(  # noqa: E731
            jnp.zeros((layers, *shape), self.dtype), axes
        )
        return {
            "k": zeros(self.depth),
            "v": zeros(self.depth),
            "extra_k": zeros(len(self.extra_blocks)),
            "extra_v": zeros(len(self.extra_blocks)),
        }

    def decode_step(
        self,
        cache: dict,
        labels: jax.Array,
        tokens: jax.Array,
        feed: jax.Array,
        start: jax.Array,
        sources: jax.Array,
    ) -> tuple[dict, jax.Array]:
        """One forward pass of the schedule.

        cache: from ``init_cache``; labels [B]; tokens [B, Q] fed at sequence positions
        feed [Q] (position 0 = the class token, ``pad_position`` = padding), whose keys go to
        cache slots start .. start + Q - 1; sources [T, A]: the feed slot each head reads per
        emitted token -> (new cache, logits [B, T, V] float32).
        """
        x = self._embed(labels, tokens, feed)
        cache_diagonal = jnp.asarray(self.schedule.cache_diagonal)
        allowed = cache_diagonal[None, :] <= self.mask.diagonal(feed)[:, None]  # [Q, C]
        cache = dict(cache)
        h = x
        for i, block in enumerate(self._backbone_blocks()):
            h, cache["k"], cache["v"] = _cached_block(
                block, h, cache["k"], cache["v"], i, start, allowed
            )
        head_logits = [self._head_logits(0, h)]
        for a, block in enumerate(self.extra_blocks, start=1):
            h, cache["extra_k"], cache["extra_v"] = _cached_block(
                block, h, cache["extra_k"], cache["extra_v"], a - 1, start, allowed
            )
            head_logits.append(self._head_logits(a, h))
        return cache, mix_heads(head_logits, sources)

    def _backbone_blocks(self) -> list[Block]:
        """The backbone's blocks one by one (sliced out of the stack under ``scan_layers``).

        Decoding unrolls the layers: each layer then updates its slice of the stacked KV cache
        in place, where a scan over layers would copy the whole cache at every pass.
        """
        if not self.scan_layers:
            return list(self.blocks)
        block_def, block_state = nnx.split(self.blocks)
        return [
            nnx.merge(block_def, jax.tree.map(lambda x, i=i: x[i], block_state))
            for i in range(self.depth)
        ]

    def forward_flops(self) -> float:
        """Matmul FLOPs of one training forward pass (blocks, extra blocks and heads)."""
        length = 1 + self.num_tokens
        blocks = transformer_flops(
            length, self.width, self.depth + len(self.extra_blocks), self.mlp_dim
        )
        heads = 2 * length * self.width * self.vocab_size * self.num_heads_out
        return float(blocks + heads)


def _cached_block(
    block: Block,
    x: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer: int,
    start: jax.Array,
    allowed: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A ``Block`` over the fed tokens only: x [B, Q, D]. Their keys/values are written into
    layer ``layer`` of the stacked caches [layers, B, C, H, Dh] at slots start .. start + Q - 1;
    the queries then attend over that layer's cache under ``allowed`` [Q, C]."""
    q, k, v = block.attn.project(block.norm1(x))
    at = (layer, 0, start, 0, 0)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype)[None], at)
    v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype)[None], at)
    y = masked_attention(q, k_cache[layer], v_cache[layer], allowed)
    x = x + block.attn.combine(y)
    x = x + block.mlp(block.norm2(x))
    return x, k_cache, v_cache


# --- sampling -----------------------------------------------------------------------------------


def check_sampling_options(temperature: float, top_k: int, top_p: float, cfg_scale: float):
    """Clear errors for options that would otherwise sample garbage silently."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 keeps every token), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale must be >= 0 (1 is no guidance), got {cfg_scale}")


def check_labels(labels: np.ndarray, num_classes: int) -> None:
    """Labels must be classes 0..num_classes - 1 or the null class ``num_classes``."""
    if labels.size and (labels.min() < 0 or labels.max() > num_classes):
        raise ValueError(
            f"class labels must lie in [0, {num_classes}] ({num_classes} is the null class), "
            f"got values in [{labels.min()}, {labels.max()}]"
        )


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Keeps the ``top_k`` largest logits (0 = all; ties with the k-th are kept too) and the
    smallest set whose probability reaches ``top_p`` (1.0 = all); the rest become -inf.
    logits: [..., V] float32."""
    neg = jnp.asarray(-jnp.inf, logits.dtype)
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted entry
        kept = jnp.where(before < top_p, sorted_logits, jnp.inf).min(-1, keepdims=True)
        logits = jnp.where(logits < kept, neg, logits)
    return logits


def sample_tokens(
    rng: jax.Array, logits: jax.Array, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> jax.Array:
    """logits [..., V] -> int32 token ids [...]; temperature 0 is greedy."""
    if temperature == 0:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    filtered = filter_logits(logits / temperature, top_k, top_p)
    return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)


def guide(logits: jax.Array, scale: float) -> jax.Array:
    """Classifier-free guidance over a [cond; uncond] batch: [2B, ...] -> [B, ...]."""
    cond, uncond = jnp.split(logits, 2, axis=0)
    return uncond + scale * (cond - uncond)


def sample(
    model: TokenGenerator,
    labels: jax.Array,
    rng: jax.Array,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    cfg_scale: float = 1.0,
    num_tokens: int | None = None,
    teacher_tokens: jax.Array | None = None,
    buckets: bool | str = "exact",
) -> dict:
    """Generates token grids for ``labels`` [B] with a KV cache, compiled as ``lax.fori_loop``s.

    Every pass of ``model.schedule`` runs once (the first ``num_tokens`` passes only, for a
    prefix of a 1D sequence, e.g. k of FlexTok's coarse-to-fine tokens). With ``cfg_scale`` !=
    1 each pass runs the [cond; null] batch and guides the mixed logits. ``teacher_tokens``
    [B, *grid] replaces sampling by those tokens and also returns every pass's logits.

    ``buckets="exact"`` (default) gives every diagonal width its own loop, so no pass computes
    a padded row: on a 16 x 16 grid the 31 passes process 271 token rows, in 30 compiled loop
    bodies (NAR-B: 4.8 s an image on our 2-core CPU, 147 s to compile). ``buckets=True`` runs
    power-of-two widths (341 rows, 8 bodies; 6.6 s, 44 s), ``buckets=False`` one loop at the
    longest diagonal's width (496 rows; 8.1 s, 14 s). The sampled tokens are the same in every
    mode.

    Returns {"tokens": int32 [B, *grid] (tokens past ``num_tokens`` are 0), "passes": the
    number of forward passes run, and with teacher tokens "logits": [S, B, T, V]}.
    """
    check_sampling_options(temperature, top_k, top_p, cfg_scale)
    if labels.ndim != 1:
        raise ValueError(f"labels must have shape [B], got {labels.shape}")
    if not isinstance(labels, jax.core.Tracer):
        check_labels(np.asarray(labels), model.num_classes)
    schedule = model.schedule
    passes = schedule.num_passes
    if num_tokens is not None:
        if len(model.decode_grid) != 1 or not 1 <= num_tokens <= model.num_tokens:
            raise ValueError(
                f"num_tokens={num_tokens} needs a 1D-order model with at most "
                f"{model.num_tokens} tokens (decode grid {model.decode_grid})"
            )
        passes = num_tokens
    b = labels.shape[0]
    guided = cfg_scale != 1.0
    cond = jnp.asarray(labels, jnp.int32)
    if guided:
        cond = jnp.concatenate([cond, jnp.full((b,), model.num_classes, jnp.int32)])
    feed = jnp.asarray(schedule.feed)
    target = jnp.asarray(schedule.target)
    source = jnp.asarray(schedule.source)
    start = jnp.asarray(schedule.start)
    teacher = None
    if teacher_tokens is not None:
        teacher = jnp.concatenate(
            [model._flatten(teacher_tokens), jnp.zeros((b, 1), jnp.int32)], axis=1
        )

    graphdef, state = nnx.split(model)  # merged inside the loop: no module crosses a trace

    def one_pass(s, carry, width):
        cache, seq, key, count, all_logits = carry
        step_model = nnx.merge(graphdef, state)
        key, step_key = jax.random.split(key)
        fed_at, emit_at = feed[s, :width], target[s, :width]
        fed = jnp.take(seq, jnp.maximum(fed_at - 1, 0), axis=1)  # [B, W]; seq is raster order
        fed = jnp.concatenate([fed, fed], 0) if guided else fed
        cache, logits = step_model.decode_step(
            cache, cond, fed, fed_at, start[s], source[s, :width]
        )
        if guided:
            logits = guide(logits, cfg_scale)
        if teacher is None:
            # One key per emitted slot, so a pass's samples do not depend on its padded width.
            keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(jnp.arange(width))
            new = jax.vmap(
                lambda k, lg: sample_tokens(k, lg, temperature, top_k, top_p),
                in_axes=(0, 1),
                out_axes=1,
            )(keys, logits)
        else:
            new = jnp.take(teacher, emit_at, axis=1)
            all_logits = jax.lax.dynamic_update_slice(all_logits, logits[None], (s, 0, 0, 0))
        seq = seq.at[:, emit_at].set(new)
        return cache, seq, key, count + 1, all_logits

    max_width = schedule.target.shape[1]
    logits0 = (
        jnp.zeros((passes, b, max_width, model.vocab_size), jnp.float32)
        if teacher is not None
        else jnp.zeros((), jnp.float32)
    )
    carry = (
        model.init_cache(cond.shape[0]),
        jnp.zeros((b, model.num_tokens + 1), jnp.int32),  # + a scratch slot for padding
        rng,
        jnp.zeros((), jnp.int32),
        logits0,
    )
    for lo, hi, width in pass_segments(schedule, passes, buckets):
        carry = jax.lax.fori_loop(lo, hi, functools.partial(one_pass, width=width), carry)
    _, seq, _, count, all_logits = carry
    out = {"tokens": seq[:, : model.num_tokens].reshape(b, *model.grid), "passes": count}
    if teacher is not None:
        out["logits"] = all_logits
    return out


# --- registration -------------------------------------------------------------------------------


def _kwargs(config) -> dict:
    kwargs = {k: v for k, v in dict(config).items() if k != "name"}
    kwargs["grid"] = tuple(kwargs["grid"])
    return kwargs


@MODELS.register("nar")
def build_nar(config, rngs: nnx.Rngs) -> TokenGenerator:
    """NAR over a 2D (or 3D) token grid; ``config.order`` defaults to "neighbour"."""
    return TokenGenerator(**{"order": "neighbour", **_kwargs(config)}, rngs=rngs)


@MODELS.register("ar")
def build_ar(config, rngs: nnx.Rngs) -> TokenGenerator:
    """Raster-order AR over the same grid (or a 1D token sequence)."""
    return TokenGenerator(**{**_kwargs(config), "order": "raster"}, rngs=rngs)
