"""FlexTok training: rectified-flow loss on the decoder, nested dropout on the registers.

Config (``config.flextok``):
  nested_dropout   "pow2" (k in {1, 2, 4, ..., N}) or "uniform" (k in 1..N)
  cfg_dropout      probability of the null condition (every register masked), for guidance
  loss_space       "velocity" (the published loss) or "x0" (velocity error times sigma^2)
  uniform_sigma    fraction of each batch whose noise level is uniform in [0, 1] instead of
                   the shifted logit-normal (0: the published sampling)
  repa_weight      weight of the REPA alignment loss (0: off; needs model.repa_dim > 0 and a
                   frozen ``model.repa_encoder``)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vitok.config import section_options
from vitok.models.flextok import floored_sigma, keep_count_choices, keep_mask, shift_sigma
from vitok.registry import TASKS


def noise_images(x0: jax.Array, noise: jax.Array, sigma: jax.Array) -> jax.Array:
    """x_t = sigma * noise + (1 - sigma) * x0; x0/noise [B, ...], sigma [B]."""
    s = sigma.reshape((-1,) + (1,) * (x0.ndim - 1))
    return s * noise + (1 - s) * x0


def flow_loss(v_pred: jax.Array, v_target: jax.Array, weight: jax.Array | None = None):
    """Mean squared error of the predicted velocity against its target (float32 scalar);
    ``weight`` [B] scales each example's error."""
    err = jnp.square(v_pred.astype(jnp.float32) - v_target)
    if weight is not None:
        err = err * weight.reshape((-1,) + (1,) * (err.ndim - 1))
    return jnp.mean(err)


def loss_weight(sigma: jax.Array, space: str) -> jax.Array | None:
    """Per-example weight of the velocity error that measures it in ``space``: "velocity"
    (none) or "x0" (sigma^2: the error of the implied clean estimate x_t - sigma v, floored
    like x0-prediction). The x0 weighting moves the loss towards high noise, where only the
    tokens tell the decoder what the image is."""
    if space == "velocity":
        return None
    if space == "x0":
        return jnp.square(floored_sigma(sigma))
    raise ValueError(f"flextok.loss_space must be 'velocity' or 'x0', got {space!r}")


def sample_keep_counts(rng: jax.Array, batch: int, choices, cfg_dropout: float) -> jax.Array:
    """[B] int32 token counts: uniform over ``choices``, or 0 (null condition) w.p. cfg_dropout."""
    k_rng, null_rng = jax.random.split(rng)
    counts = jax.random.choice(k_rng, jnp.asarray(choices, jnp.int32), (batch,))
    null = jax.random.bernoulli(null_rng, cfg_dropout, (batch,))
    return jnp.where(null, 0, counts)


def cosine_alignment(hidden: jax.Array, target: jax.Array) -> jax.Array:
    """REPA loss: minus the mean cosine similarity of [B, P, D] tokens with their targets."""
    h = hidden / jnp.maximum(jnp.linalg.norm(hidden, axis=-1, keepdims=True), 1e-6)
    t = target / jnp.maximum(jnp.linalg.norm(target, axis=-1, keepdims=True), 1e-6)
    return -jnp.mean(jnp.sum(h * t, axis=-1))


def sample_sigma(rng: jax.Array, b: int, shift: float, uniform_fraction: float) -> jax.Array:
    """[B] training noise levels: the logit-normal of Esser et al. 2024 moved up by ``shift``
    (``shift_sigma``); each is, with probability ``uniform_fraction``, uniform in [0, 1] instead,
    so the low noise levels (sigma < 0.3: 1.3% of draws at shift 4) are trained too."""
    sigma = shift_sigma(jax.nn.sigmoid(jax.random.normal(rng, (b,), jnp.float32)), shift)
    if not uniform_fraction:
        return sigma
    pick_rng, uniform_rng = jax.random.split(jax.random.fold_in(rng, 1))
    uniform = jax.random.uniform(uniform_rng, (b,), jnp.float32)
    return jnp.where(jax.random.uniform(pick_rng, (b,)) < uniform_fraction, uniform, sigma)


@TASKS.register("flextok")
class FlexTokTask:
    """Batches hold ``image: [B, H, W, C]`` in [-1, 1]."""

    CONFIG_KEYS = {
        "flextok": {
            "nested_dropout": "pow2", "cfg_dropout": 0.1, "loss_space": "velocity",
            "repa_weight": 0.0, "uniform_sigma": 0.0,
        }
    }  # fmt: skip

    def __init__(self, config: Any):
        cfg = section_options(config.get("flextok"), self.CONFIG_KEYS["flextok"], "config.flextok")
        self.num_registers = int(config.model.num_registers)
        self.choices = keep_count_choices(self.num_registers, cfg["nested_dropout"])
        self.cfg_dropout = float(cfg["cfg_dropout"])
        self.repa_weight = float(cfg["repa_weight"])
        self.loss_space = cfg["loss_space"]
        self.uniform_sigma = float(cfg["uniform_sigma"])
        if not 0.0 <= self.uniform_sigma <= 1.0:
            raise ValueError(f"flextok.uniform_sigma must be in [0, 1], got {self.uniform_sigma}")
        loss_weight(jnp.ones(()), self.loss_space)  # validates the name
        if self.repa_weight and not int(config.model.get("repa_dim", 0)):
            raise ValueError("flextok.repa_weight > 0 needs model.repa_dim > 0")

    def loss(self, model: nnx.Module, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
        images = batch["image"]
        b = images.shape[0]
        k_rng, noise_rng, sigma_rng = jax.random.split(rng, 3)
        codes, _ = model.encode(images)
        counts = sample_keep_counts(k_rng, b, self.choices, self.cfg_dropout)
        keep = keep_mask(counts, self.num_registers)
        registers = model.condition(codes, keep)
        linear = model.linear_estimate(codes, keep)

        x0 = model.to_space(images)
        noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
        sigma = sample_sigma(sigma_rng, b, model.time_shift, self.uniform_sigma)
        x_t = noise_images(x0, noise, sigma)
        aligned = None
        if self.repa_weight:  # __init__ checked that the model has REPA's projection
            v_pred, aligned = model.velocity_and_alignment(x_t, sigma, registers, linear)
        else:
            v_pred = model.velocity(x_t, sigma, registers, linear)
        target = model.velocity_target(x_t, x0, noise, sigma)
        loss = flow_loss(v_pred, target, loss_weight(sigma, self.loss_space))
        if aligned is None:
            return loss, {}
        repa = cosine_alignment(aligned, model.repa_target(images))
        metrics = {"train/flow_loss": loss, "train/repa_loss": repa}
        return loss + self.repa_weight * repa, metrics
