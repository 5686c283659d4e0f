"""KL autoencoder training: pixel reconstruction plus a small KL to the unit Gaussian.

Config (``config.vae``): ``loss`` ("l1" or "l2") and ``kl_weight`` (SD uses about 1e-6 with a
perceptual and a GAN loss on top; with pixel losses alone a larger weight keeps latents tame).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vitok.config import section_options
from vitok.registry import TASKS


def gaussian_kl(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over latent dims, per example: [B]."""
    kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return kl.reshape(kl.shape[0], -1).sum(-1)


def pixel_loss_kind(kind: str) -> str:
    if kind not in ("l1", "l2"):
        raise ValueError(f"config.vae.loss must be 'l1' or 'l2', got {kind!r}")
    return kind


def pixel_loss(recon: jax.Array, images: jax.Array, kind: str) -> jax.Array:
    """Mean absolute ("l1") or squared ("l2") error over every pixel."""
    err = recon - images
    return jnp.mean(jnp.abs(err) if kind == "l1" else jnp.square(err))


def code_usage(ids: jax.Array, codebook_size: int) -> jax.Array:
    """The fraction of the codebook that ``ids`` use."""
    counts = jnp.zeros((codebook_size,), jnp.int32).at[ids.reshape(-1)].add(1)
    return (counts > 0).mean()


@TASKS.register("vae")
class VAETask:
    """Batches hold ``image: [B, H, W, C]`` in [-1, 1]."""

    CONFIG_KEYS = {"vae": {"loss": "l1", "kl_weight": 1e-6}}

    def __init__(self, config: Any):
        cfg = section_options(config.get("vae"), self.CONFIG_KEYS["vae"], "config.vae")
        self.loss_type = pixel_loss_kind(cfg["loss"])
        self.kl_weight = float(cfg["kl_weight"])

    def loss(self, model: nnx.Module, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
        images = batch["image"].astype(jnp.float32)
        recon, mean, logvar = model(images, rng)
        recon_loss = pixel_loss(recon, images, self.loss_type)
        kl = gaussian_kl(mean, logvar).mean() / images[0].size  # per pixel, like the recon loss
        return recon_loss + self.kl_weight * kl, {"train/recon_loss": recon_loss, "train/kl": kl}


def saturation_penalty(z: jax.Array, bound: float = 2.0) -> jax.Array:
    """mean(relu(|z| - bound)^2): keeps FSQ's inputs where tanh still has a gradient."""
    return jnp.mean(jnp.square(jax.nn.relu(jnp.abs(z.astype(jnp.float32)) - bound)))


@TASKS.register("fsq_ae")
class FSQAutoencoderTask:
    """FSQ autoencoder training: a pixel loss plus ``vae.latent_penalty`` x the saturation
    penalty on the encoder's outputs (FSQ needs no codebook or commitment loss).

    Why the penalty: Adam moves saturated pre-tanh values by ~lr per step however small their
    gradient, and without it the codes drift together into saturation (measured on the digits:
    one code of 256 in use after 30 steps). Logs ``train/code_usage``, the fraction of the
    codebook a batch uses. Batches hold ``image: [B, H, W, C]`` in [-1, 1].
    """

    CONFIG_KEYS = {"vae": {"loss": "l2", "latent_penalty": 0.1}}

    def __init__(self, config: Any):
        cfg = section_options(config.get("vae"), self.CONFIG_KEYS["vae"], "config.vae")
        self.loss_type = pixel_loss_kind(cfg["loss"])
        self.latent_penalty = float(cfg["latent_penalty"])

    def loss(self, model: nnx.Module, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
        images = batch["image"].astype(jnp.float32)
        recon, ids, z = model(images)
        recon_loss = pixel_loss(recon, images, self.loss_type)
        penalty = saturation_penalty(z)
        return recon_loss + self.latent_penalty * penalty, {
            "train/recon_loss": recon_loss,
            "train/saturation": penalty,
            "train/code_usage": code_usage(ids, model.codebook_size),
        }


@TASKS.register("vq_ae")
class VQAutoencoderTask:
    """VQ autoencoder training (VQ-VAE's objective, as LlamaGen's without its perceptual and GAN
    terms): a pixel loss, the codebook loss |z_q - sg(z)|^2 and ``vae.commit_weight`` x the
    commitment loss |sg(z_q) - z|^2 (LlamaGen's beta, 0.25). Logs ``train/code_usage``."""

    CONFIG_KEYS = {"vae": {"loss": "l2", "commit_weight": 0.25}}

    def __init__(self, config: Any):
        cfg = section_options(config.get("vae"), self.CONFIG_KEYS["vae"], "config.vae")
        self.loss_type = pixel_loss_kind(cfg["loss"])
        self.commit_weight = float(cfg["commit_weight"])

    def loss(self, model: nnx.Module, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
        images = batch["image"].astype(jnp.float32)
        recon, ids, z, z_q = model(images)
        recon_loss = pixel_loss(recon, images, self.loss_type)
        codebook_loss = jnp.mean(jnp.square(z_q - jax.lax.stop_gradient(z)))
        commit_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(z_q) - z))
        return recon_loss + codebook_loss + self.commit_weight * commit_loss, {
            "train/recon_loss": recon_loss,
            "train/codebook_loss": codebook_loss,
            "train/commit_loss": commit_loss,
            "train/code_usage": code_usage(ids, model.codebook_size),
        }
