"""Image classification: softmax cross-entropy on integer labels."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from vitok.config import section_options
from vitok.registry import TASKS
from vitok.tasks.mixing import MIXUP_KEYS, mix_batch, soft_cross_entropy, soft_targets


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """logits: [B, K] float32, labels: [B] int -> per-example loss [B]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


FLEXIVIT_KEYS = {"patch_sizes": ()}  # config.flexivit


def train_patch_sizes(config: Any) -> tuple[int, ...]:
    """``config.flexivit.patch_sizes``: the patch sizes a FlexiViT run samples from, one per step
    (empty: the model's native size only)."""
    flexi = section_options(config.get("flexivit"), FLEXIVIT_KEYS, "config.flexivit")
    sizes = tuple(int(p) for p in flexi["patch_sizes"])
    if any(p < 1 for p in sizes):
        raise ValueError(f"config.flexivit.patch_sizes must be positive, got {sizes}")
    return sizes


def call_at_sampled_patch_size(
    fn: Callable[[int | None], jax.Array], patch_sizes: Sequence[int], rng: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Runs ``fn(patch_size)`` at a patch size drawn uniformly from ``patch_sizes`` by ``rng``.

    All sizes live in one compiled step (``lax.switch``), so a run compiles once however many
    sizes it samples. Returns (fn's output, the patch size used as an int32 scalar). With no
    sizes it runs ``fn(None)`` (the native size) and reports 0.
    """
    if not patch_sizes:
        return fn(None), jnp.zeros((), jnp.int32)
    index = jax.random.randint(rng, (), 0, len(patch_sizes))
    out = jax.lax.switch(index, [lambda p=p: fn(p) for p in patch_sizes])
    return out, jnp.asarray(patch_sizes, jnp.int32)[index]


@TASKS.register("classification")
class ClassificationTask:
    """Batches hold ``image: [B, H, W, C]`` and ``label: [B]``. With
    ``config.flexivit.patch_sizes`` each step runs the model at one size drawn from the list."""

    CONFIG_KEYS = {"label_smoothing": 0.0, "flexivit": FLEXIVIT_KEYS, "mixup": MIXUP_KEYS}

    def __init__(self, config: Any):
        self.label_smoothing = float(
            config.get("label_smoothing", self.CONFIG_KEYS["label_smoothing"])
        )
        self.patch_sizes = train_patch_sizes(config)
        self.mixup = section_options(config.get("mixup"), MIXUP_KEYS, "config.mixup")
        self.mixing = self.mixup["mixup_alpha"] > 0 or self.mixup["cutmix_alpha"] > 0
        self.num_classes = int(config.model.get("num_classes", 0))
        if self.mixing and self.num_classes < 1:
            raise ValueError("config.mixup needs a classifier (config.model.num_classes > 0)")

    def loss(self, model: nnx.Module, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
        dropout_rng, size_rng = jax.random.split(rng)
        images, labels = batch["image"], batch["label"]
        targets = None
        if self.mixing:  # a key of its own: the other keys stay as without mixing
            images, targets, lam = mix_batch(
                jax.random.fold_in(rng, 3), images, labels, self.num_classes,
                smoothing=self.label_smoothing, **self.mixup,
            )  # fmt: skip
        logits, patch_size = call_at_sampled_patch_size(
            lambda p: model(images, patch_size=p, dropout_rng=dropout_rng),
            self.patch_sizes,
            size_rng,
        )
        if targets is None and self.label_smoothing:
            targets = soft_targets(labels, logits.shape[-1], self.label_smoothing)
        if targets is not None:
            losses = soft_cross_entropy(logits, targets)
        else:
            losses = cross_entropy(logits, labels)
        accuracy = (logits.argmax(-1) == labels).mean()
        aux = {"train/accuracy": accuracy}
        if self.mixing:
            aux["train/mix_lam"] = lam
        if self.patch_sizes:
            aux["train/patch_size"] = patch_size
        return losses.mean(), aux
