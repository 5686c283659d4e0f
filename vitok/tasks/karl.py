"""KARL training: the paper's two-phase iteration in one loss (Duggal et al. 2025, §3).

Phase 1, estimate image complexity: each image gets a budget T (uniform over ``budgets``,
capped at T_max) and a near-lossless request (one of the ``phase1_bins`` lowest quality bins);
it is encoded with T tokens and decoded with them, and its achieved mean L1 error ε0 (pixels in
[0, 1]) is recorded, without gradient. Losses: reconstruction, quantizer, and a BCE pushing the
T halting probabilities to 0 (keep).

Phase 2, learn to halt: the same image is re-encoded with all T_max tokens, conditioned on the
bin of ε0, with BCE targets 0 for the first T tokens and 1 (halt) for the last T_max - T; the
two groups' BCE means are summed. It is decoded through the halting the model predicts
(ω > threshold, no gradient through the mask). Losses: reconstruction and quantizer again.
With probability ``bin_augment`` an image that used every token (T = T_max) is conditioned on a
random bin no larger than its own (a stricter request still needs every token), and one that
used the fewest (T = min budget) on a random bin no smaller (a looser request still needs no
more), as in the official code.

Config (``config.karl``):
  budgets         phase-1 budgets T (values above T_max count as T_max: the official code
                  draws from 16..368 with T_max 256, so a third of its images keep every token)
  phase1_bins     phase-1 requests: uniform over this many lowest bins (official: 5)
  bin_augment     the probability above (official: 0.45)
  recon_loss      "l2" or "l1" on the base space's patches (the paper's VAE variant: MSE)
  halt_weight     weight of both BCE terms (official: 1)
Differences from the official iteration: T is drawn per image rather than per GPU batch, the
phase-1 bin distribution is uniform (the official one decays bins the batch already beat by
0.99 per step), and the augmentation coin is per image.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vitok.config import section_options
from vitok.models.karl import QUALITY_BINS, per_image_l1, quality_bin
from vitok.registry import TASKS


def bce_with_logits(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Elementwise binary cross-entropy of sigmoid(logits) against labels (float32)."""
    logits = logits.astype(jnp.float32)
    return jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of ``values`` where ``mask``; 0 where the mask is empty."""
    mask = mask.astype(jnp.float32)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def halting_loss(logits: jax.Array, budget: jax.Array) -> jax.Array:
    """Phase-2 BCE: mean over the first T tokens (label 0) plus mean over the rest (label 1),
    each over the whole batch; logits [B, T_max], budget [B]."""
    halted = jnp.arange(logits.shape[1])[None] >= budget[:, None]
    loss = bce_with_logits(logits, halted.astype(jnp.float32))
    return masked_mean(loss, ~halted) + masked_mean(loss, halted)


def augment_bins(
    rng: jax.Array, bins: jax.Array, budget: jax.Array, t_max: int, t_min: int, num_bins: int,
    prob: float,
) -> jax.Array:  # fmt: skip
    """Phase-2 bin indices [B]: with probability ``prob``, a random bin <= the achieved one
    for images that used all t_max tokens, a random bin >= it for those that used t_min."""
    coin_rng, u_rng = jax.random.split(rng)
    coin = jax.random.bernoulli(coin_rng, prob, bins.shape)
    u = jax.random.uniform(u_rng, bins.shape)
    lower = jnp.floor(u * (bins + 1)).astype(jnp.int32)  # uniform over 0..i
    upper = bins + jnp.floor(u * (num_bins - bins)).astype(jnp.int32)  # uniform over i..last
    out = jnp.where(coin & (budget >= t_max), lower, bins)
    return jnp.where(coin & (budget <= t_min) & (budget < t_max), upper, out)


def space_loss(pred: jax.Array, target: jax.Array, kind: str) -> jax.Array:
    err = pred.astype(jnp.float32) - target
    return jnp.mean(jnp.abs(err) if kind == "l1" else jnp.square(err))


@TASKS.register("karl")
class KARLTask:
    """Batches hold ``image: [B, H, W, C]`` in [-1, 1]."""

    CONFIG_KEYS = {
        "karl": {
            "budgets": None,
            "phase1_bins": 5,
            "bin_augment": 0.45,
            "recon_loss": "l2",
            "halt_weight": 1.0,
        }
    }  # budgets None: every count 1..T_max

    def __init__(self, config: Any):
        cfg = section_options(config.get("karl"), self.CONFIG_KEYS["karl"], "config.karl")
        self.t_max = int(config.model.max_tokens)
        budgets = cfg["budgets"]
        budgets = np.asarray(np.arange(1, self.t_max + 1) if budgets is None else budgets, np.int64)
        if budgets.size == 0 or budgets.min() < 1:
            raise ValueError(f"karl.budgets must be positive token counts, got {list(budgets)}")
        self.budgets = np.minimum(budgets, self.t_max).astype(np.int32)
        self.t_min = int(self.budgets.min())
        self.bins = tuple(config.model.get("quality_bins", None) or QUALITY_BINS)
        self.phase1_bins = int(cfg["phase1_bins"])
        if not 1 <= self.phase1_bins <= len(self.bins):
            raise ValueError(f"karl.phase1_bins must be in 1..{len(self.bins)}")
        self.bin_augment = float(cfg["bin_augment"])
        self.recon_loss = cfg["recon_loss"]
        if self.recon_loss not in ("l1", "l2"):
            raise ValueError(f"karl.recon_loss must be 'l1' or 'l2', got {self.recon_loss!r}")
        self.halt_weight = float(cfg["halt_weight"])

    def sample_phase1(self, rng: jax.Array, batch: int) -> tuple[jax.Array, jax.Array]:
        """-> (budgets T [B] int32, phase-1 bin indices [B] int32)."""
        t_rng, q_rng = jax.random.split(rng)
        budget = jax.random.choice(t_rng, jnp.asarray(self.budgets), (batch,))
        index = jax.random.randint(q_rng, (batch,), 0, self.phase1_bins)
        return budget.astype(jnp.int32), index.astype(jnp.int32)

    def loss(self, model: nnx.Module, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
        images = batch["image"].astype(jnp.float32)
        b = images.shape[0]
        sample_rng, augment_rng = jax.random.split(rng)
        budget, index1 = self.sample_phase1(sample_rng, b)
        target = model.to_space(images)

        # Phase 1: encode and decode with T tokens; measure the achieved error.
        enc1 = model.encode(images, index1, budget, space=target)
        recon1 = model.decode_space(enc1["codes"], enc1["within"])
        recon1_loss = space_loss(recon1, target, self.recon_loss)
        keep_bce = masked_mean(
            bce_with_logits(enc1["halt_logits"], jnp.zeros_like(enc1["halt_logits"])),
            enc1["within"],
        )
        achieved = jax.lax.stop_gradient(per_image_l1(model.from_space(recon1), images))

        # Phase 2: all tokens, conditioned on the achieved error's bin; learn to halt past T.
        index2 = augment_bins(
            augment_rng, quality_bin(achieved, self.bins), budget, self.t_max, self.t_min,
            len(self.bins), self.bin_augment,
        )  # fmt: skip
        enc2 = model.encode(images, index2, space=target)
        halt_bce = halting_loss(enc2["halt_logits"], budget)
        keep2 = jax.lax.stop_gradient(model.token_keep(enc2["halt_logits"], self.t_max))
        recon2 = model.decode_space(enc2["codes"], keep2)
        recon2_loss = space_loss(recon2, target, self.recon_loss)

        quantizer = enc1["quantizer_loss"] + enc2["quantizer_loss"]
        usage = {}
        if model.codebook_size:
            ids = jnp.where(keep2, enc2["ids"], model.codebook_size)  # the halted: a spare bin
            counts = jnp.zeros((model.codebook_size + 1,), jnp.int32).at[ids.reshape(-1)].add(1)
            usage["train/code_usage"] = (counts[:-1] > 0).mean()
        total = recon1_loss + recon2_loss + quantizer + self.halt_weight * (keep_bce + halt_bce)
        return total, {
            "train/recon_phase1": recon1_loss,
            "train/recon_phase2": recon2_loss,
            "train/quantizer": quantizer,
            "train/keep_bce": keep_bce,
            "train/halt_bce": halt_bce,
            "train/l1_phase1": achieved.mean(),
            "train/tokens_phase2": keep2.sum(-1).astype(jnp.float32).mean(),
            "train/budget_phase1": budget.astype(jnp.float32).mean(),
            **usage,
        }
