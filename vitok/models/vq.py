"""A vector-quantized convolutional autoencoder (VQGAN's layout, as LlamaGen's VQ-16/VQ-8).

    images [B, H, W, C] ──encoder──► [B, h, w, z] ──1x1──► z [B, h, w, d]
        ──nearest codebook entry──► ids [B, h, w]
    ids ──codebook──► [B, h, w, d] ──1x1──► [B, h, w, z] ──decoder──► images

With ``l2_normalize`` (LlamaGen's ``codebook_l2_norm``) both z and the codebook are unit
vectors before the nearest-entry search, and the decoder sees the unit codebook entries. The
encoder and decoder are ``vitok.models.vae``'s with a self-attention layer after every
ResBlock of the lowest-resolution level. ``vitok.interop.llamagen`` converts LlamaGen's
released ``vq_ds16_c2i.pt`` / ``vq_ds8_c2i.pt`` into this model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vitok.models.base import GridTokenizer
from vitok.models.vae import (
    Conv,
    ConvDecoder,
    ConvEncoder,
    _check_divisible,
    conv_autoencoder_flops,
    conv_autoencoder_kwargs,
)
from vitok.nn.layers import param
from vitok.perf import transformer_flops
from vitok.registry import MODELS


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(|x|, eps) over the last axis (torch's F.normalize)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


def nearest_entry(z: jax.Array, codebook: jax.Array) -> jax.Array:
    """z [..., d], codebook [K, d] -> ids [...] int32 of the entries at least squared distance
    (|z|^2 + |e|^2 - 2 z.e, the first on ties)."""
    flat = z.reshape(-1, z.shape[-1]).astype(jnp.float32)
    codebook = codebook.astype(jnp.float32)
    distance = (
        jnp.sum(jnp.square(flat), axis=1, keepdims=True)
        + jnp.sum(jnp.square(codebook), axis=1)
        - 2 * flat @ codebook.T
    )
    return jnp.argmin(distance, axis=1).astype(jnp.int32).reshape(z.shape[:-1])


class VQAutoencoder(GridTokenizer):
    """Args:
    image_size, channels: the images it takes.
    width, mults, blocks: base channels, per-level multipliers, ResBlocks per level
      (f = 2^(len(mults) - 1)).
    z_channels: the encoder's output width before the 1x1 projection to the codebook.
    codebook_size, codebook_dim: K entries of d dims.
    l2_normalize: search and decode with unit vectors (cosine similarity).
    """

    def __init__(
        self,
        *,
        image_size: tuple[int, int],
        codebook_size: int,
        codebook_dim: int,
        channels: int = 3,
        width: int = 128,
        mults: tuple[int, ...] = (1, 1, 2, 2, 4),
        blocks: int = 2,
        z_channels: int = 256,
        l2_normalize: bool = True,
        dtype: str | jnp.dtype = "float32",
        rngs: nnx.Rngs,
    ):
        dtype = jnp.dtype(dtype)
        self.image_size, self.channels = tuple(image_size), channels
        self.factor = 2 ** (len(mults) - 1)
        _check_divisible(image_size, self.factor)
        self.codebook_size, self.codebook_dim = int(codebook_size), int(codebook_dim)
        self.l2_normalize = bool(l2_normalize)
        self._widths, self._blocks = [width * m for m in mults], blocks
        kw = dict(rngs=rngs, dtype=dtype)
        self.encoder = ConvEncoder(
            channels, z_channels, self._widths, blocks, level_attention=True, **kw
        )
        self.quant_conv = Conv(z_channels, codebook_dim, 1, **kw)
        self.codebook = param(
            rngs, nnx.initializers.normal(1.0), (codebook_size, codebook_dim), ("vocab", None)
        )
        self.post_quant_conv = Conv(codebook_dim, z_channels, 1, **kw)
        self.decoder = ConvDecoder(
            z_channels, channels, self._widths, blocks, level_attention=True, **kw
        )

    @property
    def decoder_patch(self) -> int:
        return self.factor

    def entries(self) -> jax.Array:
        """The codebook as the search and the decoder use it, [K, d] float32."""
        codebook = self.codebook[...].astype(jnp.float32)
        return l2_normalize(codebook) if self.l2_normalize else codebook

    def latents(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, C] -> z [B, h, w, d] float32 (normalized with ``l2_normalize``)."""
        self.check_images(images)
        z = self.quant_conv(self.encoder(images)).astype(jnp.float32)
        return l2_normalize(z) if self.l2_normalize else z

    def tokenize(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, C] in [-1, 1] -> ids int32 [B, h, w]."""
        return nearest_entry(self.latents(images), self.entries())

    def decode_codes(self, codes: jax.Array) -> jax.Array:
        """codebook vectors [B, h, w, d] -> images [B, H, W, C] float32."""
        return self.decoder(self.post_quant_conv(codes))

    def detokenize(self, ids: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """ids int [B, h, w] -> images [B, H, W, C] float32."""
        if tuple(ids.shape[1:]) != self.grid:
            raise ValueError(
                f"the VQ autoencoder decodes code grids [B, {self.grid}], got {ids.shape}"
            )
        return self.decode_codes(self.entries()[ids])

    def __call__(self, images: jax.Array, rng: jax.Array | None = None):
        """-> (reconstruction [B, H, W, C], ids [B, h, w], z [B, h, w, d], its codebook vectors
        z_q); the decoder gets z + stop_gradient(z_q - z) (straight-through)."""
        z = self.latents(images)
        entries = self.entries()
        ids = nearest_entry(z, entries)
        z_q = entries[ids]
        return self.decode_codes(z + jax.lax.stop_gradient(z_q - z)), ids, z, z_q

    def forward_flops(self) -> float:
        h, w = self.grid
        c = self._widths[-1]
        level_attention = (2 * self._blocks + 1) * transformer_flops(h * w, c, 1, 0)
        return conv_autoencoder_flops(self.image_size, self._widths, self._blocks) + level_attention


@MODELS.register("vq_ae")
def build_vq_autoencoder(config, rngs: nnx.Rngs) -> VQAutoencoder:
    return VQAutoencoder(**conv_autoencoder_kwargs(config), rngs=rngs)
