"""Image classification: softmax cross-entropy on integer labels."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from vitok.registry import TASKS


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """logits: [B, K] float32, labels: [B] int -> per-example loss [B]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


@TASKS.register("classification")
class ClassificationTask:
    """Batches hold ``image: [B, H, W, C]`` and ``label: [B]``."""

    def __init__(self, config: Any):
        self.label_smoothing = float(config.get("label_smoothing", 0.0))

    def loss(self, model: nnx.Module, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
        logits = model(batch["image"], dropout_rng=rng)
        labels = batch["label"]
        if self.label_smoothing:
            targets = optax.smooth_labels(
                jax.nn.one_hot(labels, logits.shape[-1]), self.label_smoothing
            )
            losses = optax.softmax_cross_entropy(logits, targets)
        else:
            losses = cross_entropy(logits, labels)
        accuracy = (logits.argmax(-1) == labels).mean()
        return losses.mean(), {"train/accuracy": accuracy}
