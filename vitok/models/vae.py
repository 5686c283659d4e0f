"""An SD-style KL autoencoder (Rombach et al. 2022): convolutional ResNet encoder and decoder,
a diagonal-Gaussian latent at 1 / 2^(levels - 1) of the resolution, trained with a pixel loss
plus a small KL term (``vitok.tasks.vae``). FlexTok's full-scale presets model its latents.

    images [B, H, W, C] ──encoder──► mean, logvar [B, H/f, W/f, z] ──sample──► decoder ──► images

Channel widths are ``width * mult`` per level; f = 2^(len(mults) - 1), e.g. mults (1, 2, 4, 4)
give the SD "f8" autoencoder. The mid-block has one self-attention layer over all positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vitok.models.frozen import freeze
from vitok.nn.attention import attention
from vitok.nn.layers import Dense, param
from vitok.nn.quantizers import FSQ
from vitok.perf import transformer_flops
from vitok.registry import MODELS


class Conv(nnx.Module):
    """Same-padded 2D convolution, NHWC; kernel [k, k, in, out]."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, *, rngs, dtype):
        init = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2))
        self.kernel = param(rngs, init, (kernel, kernel, cin, cout), (None, None, None, "conv"))
        self.bias = param(rngs, nnx.initializers.zeros_init(), (cout,), ("conv",))
        self.stride = stride
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel.shape[0]
        if self.stride == 1:
            padding = "SAME"
        else:  # SD's downsampling pads right/bottom only, so H/2 exactly.
            padding = ((0, k - self.stride), (0, k - self.stride))
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            (self.stride, self.stride),
            padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + self.bias[...].astype(self.dtype)


class GroupNorm(nnx.Module):
    """GroupNorm over [B, H, W, C] in float32 (``min(32, C)`` groups)."""

    def __init__(self, channels: int, *, rngs, epsilon: float = 1e-6):
        self.groups = min(32, channels)
        while channels % self.groups:
            self.groups -= 1
        self.scale = param(rngs, nnx.initializers.ones_init(), (channels,), ("conv",))
        self.bias = param(rngs, nnx.initializers.zeros_init(), (channels,), ("conv",))
        self.epsilon = epsilon

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        g = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
        mean = g.mean((1, 2, 4), keepdims=True)
        var = jnp.square(g - mean).mean((1, 2, 4), keepdims=True)
        g = (g - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (g.reshape(b, h, w, c) * self.scale[...] + self.bias[...]).astype(x.dtype)


class ResBlock(nnx.Module):
    """x -> skip(x) + conv(silu(norm(conv(silu(norm(x))))))."""

    def __init__(self, cin: int, cout: int, *, rngs, dtype):
        self.norm1 = GroupNorm(cin, rngs=rngs)
        self.conv1 = Conv(cin, cout, rngs=rngs, dtype=dtype)
        self.norm2 = GroupNorm(cout, rngs=rngs)
        self.conv2 = Conv(cout, cout, rngs=rngs, dtype=dtype)
        self.skip = Conv(cin, cout, 1, rngs=rngs, dtype=dtype) if cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return (x if self.skip is None else self.skip(x)) + h


class SpatialAttention(nnx.Module):
    """Single-head self-attention over the H*W positions, with a residual."""

    def __init__(self, channels: int, *, rngs, dtype):
        self.norm = GroupNorm(channels, rngs=rngs)
        self.qkv = Conv(channels, 3 * channels, 1, rngs=rngs, dtype=dtype)
        self.out = Conv(channels, channels, 1, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        q, k, v = jnp.split(self.qkv(self.norm(x)).reshape(b, h * w, 1, 3 * c), 3, axis=-1)
        y = attention(q, k, v).reshape(b, h, w, c)
        return x + self.out(y)


class KLAutoencoder(nnx.Module):
    """SD-style KL-regularised convolutional autoencoder.

    Args:
      image_size, channels: the images it takes.
      latent_channels: z, e.g. 4, 8 or 16.
      width, mults, blocks: base channels, per-level multipliers, ResBlocks per level.
      latent_scale: multiplies the latents a downstream model sees (unit-variance latents).
    """

    def __init__(
        self,
        *,
        image_size: tuple[int, int],
        channels: int = 3,
        latent_channels: int = 4,
        width: int = 128,
        mults: tuple[int, ...] = (1, 2, 4, 4),
        blocks: int = 2,
        latent_scale: float = 1.0,
        dtype: str | jnp.dtype = "float32",
        rngs: nnx.Rngs,
    ):
        dtype = jnp.dtype(dtype)
        self.image_size = tuple(image_size)
        self.channels = channels
        self.latent_channels = latent_channels
        self.factor = 2 ** (len(mults) - 1)
        if image_size[0] % self.factor or image_size[1] % self.factor:
            raise ValueError(f"image size {image_size} is not divisible by the VAE's {self.factor}")
        self.latent_scale = float(latent_scale)
        widths = [width * m for m in mults]
        kw = dict(rngs=rngs, dtype=dtype)

        self.enc_in = Conv(channels, widths[0], **kw)
        enc, c = [], widths[0]
        for level, w in enumerate(widths):
            for _ in range(blocks):
                enc.append(ResBlock(c, w, **kw))
                c = w
            if level < len(widths) - 1:
                enc.append(Conv(c, c, 3, 2, **kw))
        self.enc_blocks = nnx.List(enc)
        self.enc_mid = nnx.List(
            [ResBlock(c, c, **kw), SpatialAttention(c, **kw), ResBlock(c, c, **kw)]
        )
        self.enc_norm = GroupNorm(c, rngs=rngs)
        self.enc_out = Conv(c, 2 * latent_channels, **kw)

        self.dec_in = Conv(latent_channels, c, **kw)
        self.dec_mid = nnx.List(
            [ResBlock(c, c, **kw), SpatialAttention(c, **kw), ResBlock(c, c, **kw)]
        )
        dec = []
        for level, w in reversed(list(enumerate(widths))):
            for _ in range(blocks + 1):
                dec.append(ResBlock(c, w, **kw))
                c = w
            if level > 0:
                dec.append(Upsample(c, **kw))
        self.dec_blocks = nnx.List(dec)
        self.dec_norm = GroupNorm(c, rngs=rngs)
        self.dec_out = Conv(c, channels, **kw)
        self._widths = widths
        self._blocks = blocks

    def latent_shape(self, image_size=None) -> tuple[int, int, int]:
        h, w = image_size or self.image_size
        return (h // self.factor, w // self.factor, self.latent_channels)

    def moments(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images [B, H, W, C] in [-1, 1] -> (mean, logvar) [B, H/f, W/f, z] float32."""
        mean, logvar = jnp.split(self.encoder_features(images), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def encoder_features(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, C] -> the encoder's output [B, H/f, W/f, enc_out channels] float32."""
        expected = (*self.image_size, self.channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"the autoencoder expects images [B, {expected}], got {tuple(images.shape)}"
            )
        x = self.enc_in(images)
        for block in (*self.enc_blocks, *self.enc_mid):
            x = block(x)
        return self.enc_out(jax.nn.silu(self.enc_norm(x))).astype(jnp.float32)

    def decode_latents(self, z: jax.Array) -> jax.Array:
        """z [B, H/f, W/f, z] (unscaled) -> images [B, H, W, C] float32."""
        x = self.dec_in(z)
        for block in (*self.dec_mid, *self.dec_blocks):
            x = block(x)
        return self.dec_out(jax.nn.silu(self.dec_norm(x))).astype(jnp.float32)

    def __call__(self, images: jax.Array, rng: jax.Array | None = None):
        """-> (reconstruction [B, H, W, C], mean, logvar); samples z when ``rng`` is given."""
        mean, logvar = self.moments(images)
        z = (
            mean
            if rng is None
            else mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
        )
        return self.decode_latents(z), mean, logvar

    # The interface a latent-space model (FlexTok) uses: scaled latents in and out.
    def encode(self, images: jax.Array) -> jax.Array:
        return self.moments(images)[0] * self.latent_scale

    def decode(self, latents: jax.Array) -> jax.Array:
        return self.decode_latents(latents / self.latent_scale)

    def forward_flops(self) -> float:
        """Approximate matmul FLOPs of one forward pass (convolutions + mid attention)."""
        h, w = self.image_size
        total, c = 0.0, self._widths[0]
        for level, width in enumerate(self._widths):
            pixels = (h // 2**level) * (w // 2**level)
            total += 2 * pixels * 9 * (c * width + (2 * self._blocks - 1) * width * width) * 2
            c = width
        tokens = (h // self.factor) * (w // self.factor)
        total += 2 * transformer_flops(tokens, c, 1, 0)
        return float(total)


class FSQAutoencoder(KLAutoencoder):
    """The same convolutional encoder and decoder with an FSQ bottleneck: an image becomes a
    grid of discrete codes, the 2D token source of the generators (NAR, raster AR).

        images [B, H, W, C] ──encoder──► z [B, h, w, len(levels)] ──FSQ──► ids [B, h, w]
        ids ──codes in [-1, 1]──► decoder ──► images

    ``levels`` sets the codebook: prod(levels) codes, e.g. (8, 5, 5, 5) = 1,000 or
    (8, 8, 8, 8, 4) = 16,384 (the size of LlamaGen's VQ-16 codebook).
    """

    def __init__(self, *, levels: tuple[int, ...], rngs: nnx.Rngs, **kwargs):
        super().__init__(latent_channels=len(levels), rngs=rngs, **kwargs)
        self.quantizer = FSQ(levels)
        self.codebook_size = self.quantizer.codebook_size
        # One output channel per FSQ level (the KL encoder's head outputs mean and logvar).
        widths = self._widths
        self.enc_out = Conv(widths[-1], len(levels), rngs=rngs, dtype=self.enc_in.dtype)

    @property
    def grid(self) -> tuple[int, int]:
        """The code grid (h, w) of one image."""
        return self.latent_shape()[:2]

    def tokenize(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, C] in [-1, 1] -> ids int32 [B, h, w]."""
        return self.quantizer(self.encoder_features(images))[1]

    def moments(self, images: jax.Array):
        raise ValueError(
            "an FSQ autoencoder has discrete codes, not a Gaussian latent: use tokenize"
        )

    def encode(self, images: jax.Array):
        raise ValueError("an FSQ autoencoder has discrete codes, not a latent space: use tokenize")

    def detokenize(self, ids: jax.Array) -> jax.Array:
        """ids int [B, h, w] -> images [B, H, W, C] float32."""
        if tuple(ids.shape[1:]) != self.grid:
            raise ValueError(
                f"the autoencoder decodes code grids [B, {self.grid}], got {ids.shape}"
            )
        return self.decode_latents(self.quantizer.ids_to_codes(ids))

    def __call__(self, images: jax.Array, rng: jax.Array | None = None):
        """-> (reconstruction [B, H, W, C], ids [B, h, w], pre-quantization z [B, h, w, d]);
        straight-through gradients."""
        z = self.encoder_features(images)
        codes, ids = self.quantizer(z)
        return self.decode_latents(codes), ids, z


class Upsample(nnx.Module):
    """Nearest-neighbour 2x upsampling and a 3x3 convolution."""

    def __init__(self, channels: int, *, rngs, dtype):
        self.conv = Conv(channels, channels, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


def _vae_kwargs(config) -> dict:
    kwargs = {k: v for k, v in dict(config).items() if k not in ("name", "checkpoint")}
    kwargs["image_size"] = tuple(kwargs["image_size"])
    if "mults" in kwargs:
        kwargs["mults"] = tuple(kwargs["mults"])
    return kwargs


@MODELS.register("vae")
def build_vae(config, rngs: nnx.Rngs) -> KLAutoencoder:
    return KLAutoencoder(**_vae_kwargs(config), rngs=rngs)


@MODELS.register("fsq_ae")
def build_fsq_autoencoder(config, rngs: nnx.Rngs) -> FSQAutoencoder:
    kwargs = _vae_kwargs(config)
    kwargs["levels"] = tuple(int(x) for x in kwargs["levels"])
    return FSQAutoencoder(**kwargs, rngs=rngs)


def build_frozen_vae(config, rngs: nnx.Rngs) -> KLAutoencoder:
    """A VAE whose weights are ``Frozen`` (loaded from ``config.checkpoint`` at the start)."""
    return freeze(build_vae(config, rngs))


class ViTFSQAutoencoder(nnx.Module):
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
        from vitok.nn.posemb import sincos_2d
        from vitok.nn.transformer import Encoder

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
    def grid(self) -> tuple[int, int]:
        return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)

    def _latents(self, images: jax.Array) -> jax.Array:
        from vitok.models.vit import patchify

        expected = (*self.image_size, self.channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"the tokenizer expects images [B, {expected}], got {images.shape}")
        x = self.embed_in(patchify(images, self.patch_size)) + self.posemb[...]
        return self.to_code(self.encoder(x)).astype(jnp.float32)

    def _decode_codes(self, codes: jax.Array) -> jax.Array:
        from vitok.models.vit import unpatchify

        x = self.from_code(codes) + self.posemb[...]
        patches = self.to_pixels(self.decoder(x)).astype(jnp.float32)
        return unpatchify(patches, self.grid, self.patch_size)

    def tokenize(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, C] in [-1, 1] -> ids int32 [B, h, w]."""
        return self.quantizer(self._latents(images))[1].reshape(images.shape[0], *self.grid)

    def detokenize(self, ids: jax.Array) -> jax.Array:
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
