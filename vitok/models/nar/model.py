"""The class-conditional GPT backbone of NAR, raster AR and the GPT over 1D tokens: training
forward over the whole sequence and KV-cached decoding passes; registered as models
``nar`` and ``ar``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vitok import sharding
from vitok.models.base import Model
from vitok.models.nar.schedule import decode_grid, head_sources, make_schedule, mix_heads
from vitok.nn.attention import KVCache, NeighbourMask
from vitok.nn.layers import Dense, make_norm, param, swiglu_hidden
from vitok.nn.rope import rope_2d_table
from vitok.nn.transformer import Block, make_stack, run_stack
from vitok.perf import transformer_flops
from vitok.registry import MODELS


class TokenGenerator(Model):
    """Class-conditional GPT over a grid of discrete tokens, decoded by neighbours or in raster.

    Args:
      grid: the token grid of one example, e.g. (16, 16), (4, 16, 16) or (32,).
      vocab_size: codebook size.
      num_classes: conditioning classes; index ``num_classes`` is the null class (CFG).
      order: "neighbour" (NAR) or "raster" (flattened grid, causal, one head).
      width, depth, num_heads, mlp_dim: the backbone (``depth`` blocks before head 0).
      norm, norm_eps, mlp, use_bias: the blocks' and heads' layers (``vitok.nn.transformer.
        Block``); "rms", "swiglu", False are LlamaGen's and NAR's.
      posemb: "learned" (an embedding per sequence position, added to the input) or "rope2d"
        (LlamaGen's 2D rotary embedding of each token's grid coordinates in every attention
        layer, the class token's queries and keys zeroed; 2D grids only, raster order too).
      rope_base: the rotary frequencies' base.
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
        norm: str = "layer",
        norm_eps: float | None = None,
        mlp: str = "gelu",
        use_bias: bool = True,
        posemb: str = "learned",
        rope_base: float = 10000.0,
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
        self.mlp_dim = mlp_dim or (swiglu_hidden(width) if mlp == "swiglu" else 4 * width)
        self.mlp_kind = mlp
        self.remat, self.scan_layers = remat, scan_layers
        self.dtype = dtype
        normal = nnx.initializers.normal(0.02)

        self.token_embed = param(rngs, normal, (self.vocab_size, width), ("vocab", "embed"))
        self.class_embed = param(rngs, normal, (self.num_classes + 1, width), (None, "embed"))
        if posemb not in ("learned", "rope2d"):
            raise ValueError(f"unknown posemb {posemb!r}, known: 'learned', 'rope2d'")
        self.posemb_kind = posemb
        self.rope_base = float(rope_base)
        if posemb == "learned":
            self.posemb = param(rngs, normal, (1 + self.num_tokens, width), (None, "embed"))
        else:
            rope_2d_table(self.grid, width // num_heads, self.rope_base)  # checks the shapes

        def make_block(rngs: nnx.Rngs) -> Block:
            return Block(
                width,
                num_heads,
                self.mlp_dim,
                rngs=rngs,
                attention_backend=attention_backend,
                dropout=dropout,
                norm=norm,
                norm_eps=norm_eps,
                mlp=mlp,
                use_bias=use_bias,
                dtype=dtype,
            )

        self.blocks = make_stack(make_block, depth, rngs, scan_layers)
        # Head a > 0 reads a extra blocks, chained after the backbone (the paper's column head
        # after one extra block; a video's time head after a second).
        self.extra_blocks = nnx.List([make_block(rngs) for _ in range(self.num_heads_out - 1)])
        self.head_norms = nnx.List(
            [
                make_norm(norm, width, rngs=rngs, epsilon=norm_eps, dtype=dtype)
                for _ in range(self.num_heads_out)
            ]
        )
        self.heads = nnx.List(
            [
                Dense(
                    width,
                    self.vocab_size,
                    ("embed", "vocab"),
                    rngs=rngs,
                    kernel_init=nnx.initializers.zeros_init() if a == 0 else normal,
                    use_bias=use_bias,
                    dtype=dtype,
                )
                for a in range(self.num_heads_out)
            ]
        )
        self.mask = NeighbourMask(self.decode_grid, prefix=1)
        self.schedule = make_schedule(self.decode_grid)

    # --- inputs ---------------------------------------------------------------------------------

    def _embed(self, labels: jax.Array, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        """labels [B], tokens [B, Q] (ignored where position 0), positions [Q] -> [B, Q, D]."""
        tok = jnp.take(self.token_embed[...], jnp.clip(tokens, 0, self.vocab_size - 1), axis=0)
        cls = jnp.take(self.class_embed[...], labels, axis=0)[:, None]
        x = jnp.where((positions == 0)[None, :, None], cls, tok)
        if self.posemb_kind == "learned":
            x = x + jnp.take(self.posemb[...], jnp.minimum(positions, self.num_tokens), axis=0)
        return sharding.constrain(x.astype(self.dtype), ("batch", "length", "embed"))

    def _rope(self, positions: jax.Array) -> jax.Array | None:
        """positions [Q] -> the rotary table rows [Q, Dh / 2, 2] (None without RoPE)."""
        if self.posemb_kind != "rope2d":
            return None
        table = jnp.asarray(
            rope_2d_table(self.grid, self.width // self.attention_heads, self.rope_base)
        )
        return jnp.take(table, jnp.minimum(positions, self.num_tokens), axis=0)

    def _flatten(self, tokens: jax.Array) -> jax.Array:
        """tokens [B, *grid] -> [B, N] in raster order (a clear error for a wrong shape)."""
        if tuple(tokens.shape[1:]) != self.grid:
            raise ValueError(
                f"the generator takes token grids [B, {self.grid}], got {tuple(tokens.shape)}"
            )
        return tokens.reshape(tokens.shape[0], self.num_tokens)

    @property
    def sources(self) -> np.ndarray:
        """[T, A] int32: the sequence position each head reads per target (``head_sources``);
        a constant of the grid, not state."""
        return head_sources(self.decode_grid)

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
        positions = jnp.arange(1 + self.num_tokens)
        x = self._embed(labels, seq, positions)
        rope = self._rope(positions)
        keys = (
            [None] * (1 + len(self.extra_blocks))
            if dropout_rng is None
            else list(jax.random.split(dropout_rng, 1 + len(self.extra_blocks)))
        )
        h, _ = run_stack(
            self.blocks,
            x,
            lambda block, y, key: block(y, self.mask, dropout_rng=key, rope=rope),
            depth=self.depth,
            scan_layers=self.scan_layers,
            remat=self.remat,
            dropout_rng=keys[0],
        )
        head_logits = [self._head_logits(0, h)]
        for a, block in enumerate(self.extra_blocks, start=1):
            h = block(h, self.mask, dropout_rng=keys[a], rope=rope)
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
        rope = self._rope(feed)
        cache_diagonal = jnp.asarray(self.schedule.cache_diagonal)
        allowed = cache_diagonal[None, :] <= self.mask.diagonal(feed)[:, None]  # [Q, C]
        backbone = KVCache(cache["k"], cache["v"], start, allowed)
        extra = KVCache(cache["extra_k"], cache["extra_v"], start, allowed)
        h = x
        for i, block in enumerate(self._backbone_blocks()):
            h = block(h, cache=backbone, cache_layer=i, rope=rope)
        head_logits = [self._head_logits(0, h)]
        for a, block in enumerate(self.extra_blocks, start=1):
            h = block(h, cache=extra, cache_layer=a - 1, rope=rope)
            head_logits.append(self._head_logits(a, h))
        cache = {"k": backbone.k, "v": backbone.v, "extra_k": extra.k, "extra_v": extra.v}
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
            length,
            self.width,
            self.depth + len(self.extra_blocks),
            self.mlp_dim,
            mlp_matmuls=3 if self.mlp_kind == "swiglu" else 2,
        )
        heads = 2 * length * self.width * self.vocab_size * self.num_heads_out
        return float(blocks + heads)


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
