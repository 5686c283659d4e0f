"""A ViT-VQGAN-style tokenizer with an FSQ bottleneck (``model.name = "fsq_vit"``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vitok.models.base import GridTokenizer
from vitok.models.vit import patchify, unpatchify
from vitok.nn.layers import Dense
from vitok.nn.posemb import sincos_2d
from vitok.nn.quantizers import FSQ
from vitok.nn.transformer import Encoder
from vitok.perf import transformer_flops
from vitok.registry import MODELS


class ViTFSQAutoencoder(GridTokenizer):
    """A ViT-VQGAN-style (Yu et al. 2022) tokenizer with an FSQ bottleneck: p x p patches ->
    transformer encoder -> FSQ code per patch -> transformer decoder -> pixels per patch.

        images [B, H, W, C] ──patches──► encoder ──► FSQ ids [B, H/p, W/p] ──► decoder ──► images

    The same interface as ``FSQAutoencoder`` (``tokenize``, ``detokenize``, ``grid``), and much
    cheaper on a CPU than convolutions at full resolution.
    """

    def __init__(
        self,
        *,
        image_size: tuple[int, int],
        channels: int = 3,
        patch_size: int = 4,
        levels: tuple[int, ...] = (8, 8, 4),
        width: int = 128,
        depth: int = 2,
        num_heads: int = 4,
        dtype: str | jnp.dtype = "float32",
        rngs: nnx.Rngs,
    ):
        dtype = jnp.dtype(dtype)
        self.image_size, self.channels, self.patch_size = tuple(image_size), channels, patch_size
        if image_size[0] % patch_size or image_size[1] % patch_size:
            raise ValueError(f"image size {image_size} is not divisible by patch {patch_size}")
        self.quantizer = FSQ(levels)
        self.codebook_size = self.quantizer.codebook_size
        pixels = patch_size * patch_size * channels
        kw = dict(rngs=rngs, dtype=dtype)
        self.embed_in = Dense(pixels, width, ("patch", "embed"), **kw)
        self.encoder = Encoder(width, depth, num_heads, 4 * width, **kw)
        self.to_code = Dense(width, len(levels), ("embed", None), **kw)
        self.from_code = Dense(len(levels), width, (None, "embed"), **kw)
        self.decoder = Encoder(width, depth, num_heads, 4 * width, **kw)
        # Zero-init output: with random outputs the first updates push every code the same way
        # into tanh saturation (measured: one code left after 10 steps); from zero they do not.
        self.to_pixels = Dense(
            width, pixels, ("embed", "patch"), kernel_init=nnx.initializers.zeros_init(), **kw
        )
        self.posemb = nnx.Variable(jnp.asarray(sincos_2d(*self.grid, width)))
        self._width, self._depth = width, depth

    @property
    def decoder_patch(self) -> int:
        return self.patch_size

    def _latents(self, images: jax.Array) -> jax.Array:
        self.check_images(images)
        x = self.embed_in(patchify(images, self.patch_size)) + self.posemb[...]
        return self.to_code(self.encoder(x)).astype(jnp.float32)

    def _decode_codes(self, codes: jax.Array) -> jax.Array:
        x = self.from_code(codes) + self.posemb[...]
        patches = self.to_pixels(self.decoder(x)).astype(jnp.float32)
        return unpatchify(patches, self.grid, self.patch_size)

    def tokenize(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, C] in [-1, 1] -> ids int32 [B, h, w]."""
        return self.quantizer(self._latents(images))[1].reshape(images.shape[0], *self.grid)

    def detokenize(self, ids: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """ids int [B, h, w] -> images [B, H, W, C] float32."""
        if tuple(ids.shape[1:]) != self.grid:
            raise ValueError(f"the tokenizer decodes code grids [B, {self.grid}], got {ids.shape}")
        codes = self.quantizer.ids_to_codes(ids.reshape(ids.shape[0], -1))
        return self._decode_codes(codes)

    def __call__(self, images: jax.Array, rng: jax.Array | None = None):
        """-> (reconstruction [B, H, W, C], ids [B, h, w], pre-quantization z [B, h*w, d]);
        straight-through gradients."""
        z = self._latents(images)
        codes, ids = self.quantizer(z)
        return self._decode_codes(codes), ids.reshape(images.shape[0], *self.grid), z

    def forward_flops(self) -> float:
        tokens = self.grid[0] * self.grid[1]
        return 2 * transformer_flops(tokens, self._width, self._depth, 4 * self._width)


@MODELS.register("fsq_vit")
def build_vit_fsq_autoencoder(config, rngs: nnx.Rngs) -> ViTFSQAutoencoder:
    kwargs = {k: v for k, v in dict(config).items() if k != "name"}
    kwargs["image_size"] = tuple(kwargs["image_size"])
    kwargs["levels"] = tuple(int(x) for x in kwargs["levels"])
    return ViTFSQAutoencoder(**kwargs, rngs=rngs)
