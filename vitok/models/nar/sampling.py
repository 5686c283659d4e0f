"""Sampling from a ``TokenGenerator``: option checks, top-k / top-p filtering, classifier-free
guidance and the compiled pass loop over the schedule."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vitok.models.nar.model import TokenGenerator
from vitok.models.nar.schedule import pass_segments


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
