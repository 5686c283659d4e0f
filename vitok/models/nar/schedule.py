"""NAR's geometry: the decode grid, which head predicts which token, and the decoding
schedule (the passes over anti-diagonals and their KV-cache slots)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

ORDERS = ("neighbour", "raster")


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
