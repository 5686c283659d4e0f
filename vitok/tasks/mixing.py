"""Batch-level Mixup and CutMix with label mixing (Zhang et al. 2018; Yun et al. 2019), as the
DeiT recipe uses them (timm's ``Mixup`` in batch mode): one mixing coefficient per batch, each
image paired with the batch's reverse. Pure functions of an RNG key, so a resumed run mixes
exactly as an uninterrupted one.

Config (``config.mixup``): ``mixup_alpha``, ``cutmix_alpha`` (Beta parameters; 0 turns one
off), ``prob`` (the chance a batch is mixed at all) and ``switch_prob`` (with both on, the
chance of CutMix rather than Mixup). DeiT: 0.8, 1.0, 1.0, 0.5.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

MIXUP_KEYS = {"mixup_alpha": 0.0, "cutmix_alpha": 0.0, "prob": 1.0, "switch_prob": 0.5}


def soft_targets(labels: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
    """labels [B] int -> [B, K] float32: one-hot, smoothed to 1 - s + s/K and s/K."""
    return optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """logits, targets [B, K] -> per-example loss [B], -sum_k t_k log softmax(logits)_k."""
    return -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1)


def cutmix_box(rng: jax.Array, lam: jax.Array, height: int, width: int) -> jax.Array:
    """A box of area about (1 - lam) of the image, centred uniformly (clipped at the edges):
    -> bool mask [H, W], True inside the box."""
    cy_rng, cx_rng = jax.random.split(rng)
    ratio = jnp.sqrt(1.0 - lam)
    cut_h = jnp.floor(height * ratio).astype(jnp.int32)
    cut_w = jnp.floor(width * ratio).astype(jnp.int32)
    cy = jax.random.randint(cy_rng, (), 0, height)
    cx = jax.random.randint(cx_rng, (), 0, width)
    top, bottom = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
    left, right = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    return (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)


def mix_batch(
    rng: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    num_classes: int,
    *,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """images [B, H, W, C], labels [B] -> (mixed images, targets [B, K] float32, lam []).

    Image b is mixed with image B-1-b: Mixup blends them as lam x + (1 - lam) x', CutMix pastes
    a box of x' whose area sets lam (corrected to the clipped box, as timm does); the targets
    mix the two smoothed one-hots with the same lam. An unmixed batch has lam = 1."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return images, soft_targets(labels, num_classes, smoothing), jnp.ones((), jnp.float32)
    apply_rng, switch_rng, mix_rng, cut_rng, box_rng = jax.random.split(rng, 5)
    _, h, w, _ = images.shape
    other = images[::-1]
    use_cutmix = cutmix_alpha > 0 and (
        mixup_alpha <= 0 or jax.random.uniform(switch_rng) < switch_prob
    )
    lam_mix = jax.random.beta(mix_rng, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else 1.0
    lam_cut = jax.random.beta(cut_rng, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else 1.0
    box = cutmix_box(box_rng, lam_cut, h, w)
    lam_box = 1.0 - box.mean()
    apply = jax.random.uniform(apply_rng) < prob
    lam = jnp.where(apply, jnp.where(use_cutmix, lam_box, lam_mix), 1.0).astype(jnp.float32)
    blended = (lam * images + (1 - lam) * other).astype(images.dtype)
    pasted = jnp.where(box[None, :, :, None], other, images)
    mixed = jnp.where(apply & use_cutmix, pasted, jnp.where(apply, blended, images))
    targets = soft_targets(labels, num_classes, smoothing)
    return mixed, lam * targets + (1 - lam) * targets[::-1], lam
