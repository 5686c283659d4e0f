"""Vision Transformer with any patch size that divides the image, down to 1x1 pixel tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vitok import sharding
from vitok.nn.layers import Dense, param
from vitok.nn.posemb import sincos_2d
from vitok.nn.transformer import Encoder
from vitok.perf import transformer_flops
from vitok.registry import MODELS

# Width, depth, MLP width and heads of the standard ViT sizes (Dosovitskiy et al., DeiT).
VIT_SIZES = {
    "mu": (64, 4, 256, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
}


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """images: [B, H, W, C] -> patches [B, (H/p)*(W/p), p*p*C], row-major over the patch grid."""
    b, h, w, c = images.shape
    p = patch_size
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: jax.Array, grid: tuple[int, int], patch_size: int) -> jax.Array:
    """patches: [B, gh*gw, p*p*C] -> images [B, gh*p, gw*p, C]; inverse of ``patchify``."""
    b, _, d = patches.shape
    gh, gw = grid
    p = patch_size
    c = d // (p * p)
    x = patches.reshape(b, gh, gw, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, gh * p, gw * p, c)


class ViT(nnx.Module):
    """Pre-norm ViT classifier.

    Args:
      image_size: (H, W) of the input images.
      patch_size: p, must divide H and W; p = 1 gives one token per pixel.
      channels: C of the input images.
      posemb: "sincos2d" (fixed) or "learn".
      pool: "cls" (a class token) or "gap" (mean over patch tokens).
      num_classes: classifier outputs; 0 gives no head (``__call__`` returns features).
    """

    def __init__(
        self,
        *,
        image_size: tuple[int, int],
        patch_size: int,
        channels: int = 3,
        width: int = 384,
        depth: int = 12,
        mlp_dim: int = 1536,
        num_heads: int = 6,
        num_classes: int = 1000,
        posemb: str = "sincos2d",
        pool: str = "cls",
        dropout: float = 0.0,
        attention_backend: str = "dense",
        remat: bool = False,
        scan_layers: bool = False,
        dtype: str | jnp.dtype = "float32",
        rngs: nnx.Rngs,
    ):
        h, w = image_size
        if h % patch_size or w % patch_size:
            raise ValueError(f"patch_size {patch_size} does not divide the image size {h}x{w}")
        if posemb not in ("sincos2d", "learn"):
            raise ValueError(f"posemb must be 'sincos2d' or 'learn', got {posemb!r}")
        if pool not in ("cls", "gap"):
            raise ValueError(f"pool must be 'cls' or 'gap', got {pool!r}")
        dtype = jnp.dtype(dtype)
        self.image_size = (h, w)
        self.patch_size = patch_size
        self.channels = channels
        self.grid = (h // patch_size, w // patch_size)
        self.pool = pool
        self.dtype = dtype
        self.dropout = dropout

        patch_dim = patch_size * patch_size * channels
        self.embed = Dense(patch_dim, width, ("patch", "embed"), rngs=rngs, dtype=dtype)
        num_patches = self.grid[0] * self.grid[1]
        init = nnx.initializers.normal(stddev=1 / width**0.5)
        self.posemb = (
            param(rngs, init, (num_patches, width), ("length", "embed"))
            if posemb == "learn"
            else None
        )
        self.width = width
        if pool == "cls":
            self.cls = param(rngs, nnx.initializers.zeros_init(), (1, width), (None, "embed"))
        self.encoder = Encoder(
            width,
            depth,
            num_heads,
            mlp_dim,
            rngs=rngs,
            attention_backend=attention_backend,
            dropout=dropout,
            remat=remat,
            scan_layers=scan_layers,
            dtype=dtype,
        )
        zeros = nnx.initializers.zeros_init()
        self.head = (
            Dense(
                width, num_classes, ("embed", "classes"), rngs=rngs, kernel_init=zeros, dtype=dtype
            )
            if num_classes
            else None
        )

    def forward_flops(self) -> float:
        """Analytic matmul FLOPs of one forward pass for one image."""
        return vit_forward_flops(
            image_size=self.image_size,
            patch_size=self.patch_size,
            channels=self.channels,
            width=self.width,
            depth=self.encoder.depth,
            mlp_dim=self.encoder.mlp_dim,
            num_classes=0 if self.head is None else self.head.kernel.shape[1],
            pool=self.pool,
        )

    def check_images(self, images: jax.Array) -> None:
        expected = (*self.image_size, self.channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"ViT expects images of shape [B, {expected[0]}, {expected[1]}, {expected[2]}], "
                f"got {tuple(images.shape)}"
            )

    def tokens(self, images: jax.Array, *, dropout_rng: jax.Array | None = None) -> jax.Array:
        """images: [B, H, W, C] -> encoded tokens [B, (1 +) N, D] (class token first if any)."""
        self.check_images(images)
        x = self.embed(patchify(images, self.patch_size))
        posemb = sincos_2d(*self.grid, self.width) if self.posemb is None else self.posemb[...]
        x = x + jnp.asarray(posemb).astype(x.dtype)[None]
        if self.pool == "cls":
            cls = jnp.broadcast_to(self.cls[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
            x = jnp.concatenate([cls, x], axis=1)
        x = sharding.constrain(x, ("batch", "length", "embed"))
        return self.encoder(x, dropout_rng=dropout_rng)

    def __call__(self, images: jax.Array, *, dropout_rng: jax.Array | None = None) -> jax.Array:
        """images: [B, H, W, C] -> logits [B, num_classes] in float32 (features if no head)."""
        x = self.tokens(images, dropout_rng=dropout_rng)
        pooled = x[:, 0] if self.pool == "cls" else x.mean(axis=1)
        if self.head is None:
            return pooled
        return self.head(pooled).astype(jnp.float32)


@MODELS.register("vit")
def build_vit(config, rngs: nnx.Rngs) -> ViT:
    """Builds a ViT from ``config.model`` (variant "S/16" sets width/depth/heads/patch)."""
    kwargs = dict(config)
    variant = kwargs.pop("variant", None)
    kwargs.pop("name", None)
    if variant:
        size, patch = variant.split("/")
        if size not in VIT_SIZES:
            raise ValueError(
                f"unknown ViT size {size!r} in variant {variant!r}; known: {VIT_SIZES}"
            )
        width, depth, mlp_dim, heads = VIT_SIZES[size]
        kwargs = (
            dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads, patch_size=int(patch))
            | kwargs
        )
    kwargs["image_size"] = tuple(kwargs["image_size"])
    return ViT(**kwargs, rngs=rngs)


def vit_forward_flops(
    *, image_size, patch_size, channels, width, depth, mlp_dim, num_classes, pool="cls", **_
) -> float:
    """Analytic matmul FLOPs of one forward pass for one image (2 FLOPs per multiply-add)."""
    n = (image_size[0] // patch_size) * (image_size[1] // patch_size)
    length = n + (pool == "cls")
    embed = 2 * n * patch_size * patch_size * channels * width
    head = 2 * width * num_classes
    return float(embed + transformer_flops(length, width, depth, mlp_dim) + head)
