"""Semantic segmentation with a ViT's per-token linear head: per-pixel softmax cross-entropy."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from vitok.registry import TASKS
from vitok.tasks.classification import (
    FLEXIVIT_KEYS,
    call_at_sampled_patch_size,
    cross_entropy,
    train_patch_sizes,
)


def pixel_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """logits: [B, H, W, K], labels: [B, H, W] int -> per-example mean over pixels [B]."""
    b, h, w, k = logits.shape
    losses = cross_entropy(logits.reshape(b * h * w, k), labels.reshape(-1))
    return losses.reshape(b, h * w).mean(axis=1)


@TASKS.register("segmentation")
class SegmentationTask:
    """Batches hold ``image: [B, H, W, C]`` and ``segmentation: [B, H, W]`` (class per pixel);
    the model's ``dense`` head gives per-pixel logits. ``config.flexivit.patch_sizes`` samples a
    patch size per step, as for classification."""

    CONFIG_KEYS = {"flexivit": FLEXIVIT_KEYS}

    def __init__(self, config: Any):
        self.patch_sizes = train_patch_sizes(config)

    def loss(self, model: nnx.Module, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
        dropout_rng, size_rng = jax.random.split(rng)
        logits, patch_size = call_at_sampled_patch_size(
            lambda p: model.dense(batch["image"], patch_size=p, dropout_rng=dropout_rng),
            self.patch_sizes,
            size_rng,
        )
        labels = batch["segmentation"]
        aux = {"train/pixel_accuracy": (logits.argmax(-1) == labels).mean()}
        if self.patch_sizes:
            aux["train/patch_size"] = patch_size
        return pixel_cross_entropy(logits, labels).mean(), aux
