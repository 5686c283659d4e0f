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

from vitok.models.base import GridTokenizer, Model, check_image_shape
from vitok.models.frozen import freeze
from vitok.nn.attention import attention
from vitok.nn.layers import param
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


class ConvEncoder(nnx.Module):
    """images [B, H, W, C] -> features [B, H/f, W/f, out_channels] float32: ResBlocks per level,
    a stride-2 convolution between levels, a mid-block with one self-attention layer.
    ``level_attention`` adds a self-attention layer after every ResBlock of the last level
    (the taming / LlamaGen VQ layout)."""

    def __init__(
        self, channels, out_channels, widths, blocks, *, rngs, dtype, level_attention=False
    ):
        kw = dict(rngs=rngs, dtype=dtype)
        self.conv_in = Conv(channels, widths[0], **kw)
        layers, c = [], widths[0]
        for level, w in enumerate(widths):
            for _ in range(blocks):
                layers.append(ResBlock(c, w, **kw))
                c = w
                if level_attention and level == len(widths) - 1:
                    layers.append(SpatialAttention(c, **kw))
            if level < len(widths) - 1:
                layers.append(Conv(c, c, 3, 2, **kw))
        self.blocks = nnx.List(layers)
        self.mid = nnx.List([ResBlock(c, c, **kw), SpatialAttention(c, **kw), ResBlock(c, c, **kw)])
        self.norm = GroupNorm(c, rngs=rngs)
        self.conv_out = Conv(c, out_channels, **kw)

    def __call__(self, images: jax.Array) -> jax.Array:
        x = self.conv_in(images)
        for block in (*self.blocks, *self.mid):
            x = block(x)
        return self.conv_out(jax.nn.silu(self.norm(x))).astype(jnp.float32)


class ConvDecoder(nnx.Module):
    """z [B, H/f, W/f, in_channels] -> images [B, H, W, C] float32 (the encoder's mirror, one
    more ResBlock per level, nearest-neighbour upsampling; ``level_attention`` as the
    encoder's, at the first level it decodes)."""

    def __init__(
        self, in_channels, channels, widths, blocks, *, rngs, dtype, level_attention=False
    ):
        kw = dict(rngs=rngs, dtype=dtype)
        c = widths[-1]
        self.conv_in = Conv(in_channels, c, **kw)
        self.mid = nnx.List([ResBlock(c, c, **kw), SpatialAttention(c, **kw), ResBlock(c, c, **kw)])
        layers = []
        for level, w in reversed(list(enumerate(widths))):
            for _ in range(blocks + 1):
                layers.append(ResBlock(c, w, **kw))
                c = w
                if level_attention and level == len(widths) - 1:
                    layers.append(SpatialAttention(c, **kw))
            if level > 0:
                layers.append(Upsample(c, **kw))
        self.blocks = nnx.List(layers)
        self.norm = GroupNorm(c, rngs=rngs)
        self.conv_out = Conv(c, channels, **kw)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.conv_in(z)
        for block in (*self.mid, *self.blocks):
            x = block(x)
        return self.conv_out(jax.nn.silu(self.norm(x))).astype(jnp.float32)


def conv_autoencoder_flops(image_size, widths, blocks) -> float:
    """Approximate matmul FLOPs of encoder + decoder (convolutions + mid attention), one image."""
    h, w = image_size
    total, c = 0.0, widths[0]
    for level, width in enumerate(widths):
        pixels = (h // 2**level) * (w // 2**level)
        total += 2 * pixels * 9 * (c * width + (2 * blocks - 1) * width * width) * 2
        c = width
    factor = 2 ** (len(widths) - 1)
    total += 2 * transformer_flops((h // factor) * (w // factor), c, 1, 0)
    return float(total)


def _check_divisible(image_size, factor) -> None:
    if image_size[0] % factor or image_size[1] % factor:
        raise ValueError(f"image size {tuple(image_size)} is not divisible by the VAE's {factor}")


class KLAutoencoder(Model):
    """SD-style KL-regularised convolutional autoencoder.

    Args:
      image_size, channels: the images it takes.
      latent_channels: z, e.g. 4, 8 or 16.
      width, mults, blocks: base channels, per-level multipliers, ResBlocks per level.
      latent_scale: multiplies the latents a downstream model sees (unit-variance latents).
      quant_conv: 1x1 convolutions on the moments and on the latents before decoding (SD's
        ``quant_conv`` / ``post_quant_conv``; the released SD and FlexTok VAEs have them).
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
        quant_conv: bool = False,
        dtype: str | jnp.dtype = "float32",
        rngs: nnx.Rngs,
    ):
        dtype = jnp.dtype(dtype)
        self.image_size = tuple(image_size)
        self.channels = channels
        self.latent_channels = latent_channels
        self.factor = 2 ** (len(mults) - 1)
        _check_divisible(image_size, self.factor)
        self.latent_scale = float(latent_scale)
        self._widths = [width * m for m in mults]
        self._blocks = blocks
        kw = dict(rngs=rngs, dtype=dtype)
        self.encoder = ConvEncoder(channels, 2 * latent_channels, self._widths, blocks, **kw)
        self.decoder = ConvDecoder(latent_channels, channels, self._widths, blocks, **kw)
        z = latent_channels
        self.quant_conv = Conv(2 * z, 2 * z, 1, **kw) if quant_conv else None
        self.post_quant_conv = Conv(z, z, 1, **kw) if quant_conv else None

    def latent_shape(self, image_size=None) -> tuple[int, int, int]:
        h, w = image_size or self.image_size
        return (h // self.factor, w // self.factor, self.latent_channels)

    def moments(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images [B, H, W, C] in [-1, 1] -> (mean, logvar) [B, H/f, W/f, z] float32."""
        check_image_shape(images, (*self.image_size, self.channels), "the autoencoder")
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode_latents(self, z: jax.Array) -> jax.Array:
        """z [B, H/f, W/f, z] (unscaled) -> images [B, H, W, C] float32."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

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
        return conv_autoencoder_flops(self.image_size, self._widths, self._blocks)


class FSQAutoencoder(GridTokenizer):
    """The KL autoencoder's convolutional encoder and decoder with an FSQ bottleneck: an image
    becomes a grid of discrete codes, the 2D token source of the generators (NAR, raster AR).

        images [B, H, W, C] ──encoder──► z [B, h, w, len(levels)] ──FSQ──► ids [B, h, w]
        ids ──codes in [-1, 1]──► decoder ──► images

    ``levels`` sets the codebook: prod(levels) codes, e.g. (8, 5, 5, 5) = 1,000 or
    (8, 8, 8, 8, 4) = 16,384 (the size of LlamaGen's VQ-16 codebook).
    """

    def __init__(
        self,
        *,
        image_size: tuple[int, int],
        levels: tuple[int, ...],
        channels: int = 3,
        width: int = 128,
        mults: tuple[int, ...] = (1, 2, 4, 4),
        blocks: int = 2,
        dtype: str | jnp.dtype = "float32",
        rngs: nnx.Rngs,
    ):
        dtype = jnp.dtype(dtype)
        self.image_size, self.channels = tuple(image_size), channels
        self.factor = 2 ** (len(mults) - 1)
        _check_divisible(image_size, self.factor)
        self._widths, self._blocks = [width * m for m in mults], blocks
        self.quantizer = FSQ(levels)
        self.codebook_size = self.quantizer.codebook_size
        kw = dict(rngs=rngs, dtype=dtype)
        self.encoder = ConvEncoder(channels, len(levels), self._widths, blocks, **kw)
        self.decoder = ConvDecoder(len(levels), channels, self._widths, blocks, **kw)

    @property
    def decoder_patch(self) -> int:
        return self.factor

    def latents(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, C] -> pre-quantization z [B, h, w, len(levels)] float32."""
        self.check_images(images)
        return self.encoder(images)

    def tokenize(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, C] in [-1, 1] -> ids int32 [B, h, w]."""
        return self.quantizer(self.latents(images))[1]

    def detokenize(self, ids: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """ids int [B, h, w] -> images [B, H, W, C] float32."""
        if tuple(ids.shape[1:]) != self.grid:
            raise ValueError(
                f"the autoencoder decodes code grids [B, {self.grid}], got {ids.shape}"
            )
        return self.decoder(self.quantizer.ids_to_codes(ids))

    def __call__(self, images: jax.Array, rng: jax.Array | None = None):
        """-> (reconstruction [B, H, W, C], ids [B, h, w], pre-quantization z [B, h, w, d]);
        straight-through gradients."""
        z = self.latents(images)
        codes, ids = self.quantizer(z)
        return self.decoder(codes), ids, z

    def forward_flops(self) -> float:
        return conv_autoencoder_flops(self.image_size, self._widths, self._blocks)


class Upsample(nnx.Module):
    """Nearest-neighbour 2x upsampling and a 3x3 convolution."""

    def __init__(self, channels: int, *, rngs, dtype):
        self.conv = Conv(channels, channels, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


def conv_autoencoder_kwargs(config) -> dict:
    """A model config section -> the constructor's keyword arguments (sizes as tuples)."""
    kwargs = {k: v for k, v in dict(config).items() if k not in ("name", "checkpoint")}
    kwargs["image_size"] = tuple(kwargs["image_size"])
    if "mults" in kwargs:
        kwargs["mults"] = tuple(kwargs["mults"])
    return kwargs


@MODELS.register("vae")
def build_vae(config, rngs: nnx.Rngs) -> KLAutoencoder:
    return KLAutoencoder(**conv_autoencoder_kwargs(config), rngs=rngs)


@MODELS.register("fsq_ae")
def build_fsq_autoencoder(config, rngs: nnx.Rngs) -> FSQAutoencoder:
    kwargs = conv_autoencoder_kwargs(config)
    kwargs["levels"] = tuple(int(x) for x in kwargs["levels"])
    return FSQAutoencoder(**kwargs, rngs=rngs)


def build_frozen_vae(config, rngs: nnx.Rngs) -> KLAutoencoder:
    """A VAE whose weights are ``Frozen`` (loaded from ``config.checkpoint`` at the start)."""
    return freeze(build_vae(config, rngs))
