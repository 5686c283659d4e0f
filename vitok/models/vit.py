"""Vision Transformer with any patch size that divides the image, down to 1x1 pixel tokens.

One set of weights runs at any patch size (FlexiViT): ``model(images, patch_size=q)`` PI-resizes
the patch-embedding kernel and resizes learned position embeddings (``vitok.nn.flexi``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vitok import sharding
from vitok.models.base import Model, check_image_shape
from vitok.nn.flexi import patch_resize_matrix, pi_resize_patch_kernel, resize_posemb
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


def triangle_window(patch_size: int) -> np.ndarray:
    """[2p] float32 weights of a tent over 2p pixels; shifted by p, two tents sum to 1."""
    t = np.arange(2 * patch_size, dtype=np.float32)
    return np.minimum(t + 0.5, 2 * patch_size - t - 0.5) / patch_size


def _fold_quadrants(x: jax.Array, patch_size: int):
    """x [B, gh, gw, 2p, 2p, C] -> the sum of its windows on a canvas [B, (gh+1)p, (gw+1)p, C]:
    window (i, j) covers canvas rows [ip, ip + 2p) and columns [jp, jp + 2p)."""
    b, gh, gw, _, _, c = x.shape
    p = patch_size
    canvas = 0
    for a in (0, 1):
        for d in (0, 1):
            quad = x[:, :, :, a * p : (a + 1) * p, d * p : (d + 1) * p]
            img = quad.transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * p, gw * p, c)
            canvas = canvas + jnp.pad(
                img, ((0, 0), (a * p, (1 - a) * p), (d * p, (1 - d) * p), (0, 0))
            )
    return canvas


def overlap_patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """images [B, gh*p, gw*p, C] -> [B, gh*gw, (2p)^2 C]: the 2p x 2p window centred on each
    p x p patch (the image edge-padded by p/2), laid out as ``overlap_unpatchify`` reads tiles."""
    b, h, w, c = images.shape
    p = patch_size
    gh, gw = h // p, w // p
    o = p // 2
    padded = jnp.pad(images, ((0, 0), (o, p - o), (o, p - o), (0, 0)), mode="edge")
    blocks = padded.reshape(b, gh + 1, p, gw + 1, p, c).transpose(0, 1, 3, 2, 4, 5)
    rows = [
        jnp.concatenate([blocks[:, a : a + gh, d : d + gw] for d in (0, 1)], axis=4) for a in (0, 1)
    ]  # each [B, gh, gw, p, 2p, C]
    windows = jnp.concatenate(rows, axis=3)  # [B, gh, gw, 2p, 2p, C]
    return windows.reshape(b, gh * gw, 4 * p * p * c)


def overlap_unpatchify(patches: jax.Array, grid: tuple[int, int], patch_size: int) -> jax.Array:
    """patches [B, gh*gw, (2p)^2 C] -> images [B, gh*p, gw*p, C]: window (i, j) is a 2p x 2p
    tile centred on patch (i, j) of the p x p grid, and overlapping tiles are blended with a
    separable tent (each pixel a convex combination of the 2 x 2 tiles over it; at the image
    border, of those that reach it). Neighbouring patches share pixels, so a decoder that writes
    through it cannot leave a seam at every patch border."""
    b, _, d = patches.shape
    gh, gw = grid
    p = patch_size
    c = d // (4 * p * p)
    window = triangle_window(p)
    tile = jnp.asarray(np.outer(window, window)[:, :, None])  # [2p, 2p, 1]
    x = patches.reshape(b, gh, gw, 2 * p, 2 * p, c) * tile
    weight = _fold_quadrants(jnp.broadcast_to(tile, (1, gh, gw, 2 * p, 2 * p, 1)), p)
    canvas = _fold_quadrants(x, p) / weight
    o = p // 2
    return canvas[:, o : o + gh * p, o : o + gw * p]


class ViT(Model):
    """Pre-norm ViT classifier.

    Args:
      image_size: (H, W) of the input images.
      patch_size: p, must divide H and W; p = 1 gives one token per pixel.
      channels: C of the input images.
      posemb: "sincos2d" (fixed) or "learn".
      pool: "cls" (a class token) or "gap" (mean over patch tokens).
      num_classes: classifier outputs; 0 gives no head (``__call__`` returns features).
      dense_classes: if > 0, a linear per-token head (``dense``) that predicts the p*p pixels'
        classes of each patch token ("decoder-free" segmentation).
      drop_path_rate: stochastic depth when training, 0 at the first block rising linearly to
        this rate at the last (DeiT-B: 0.1).

    Every call takes an optional ``patch_size`` (default: the native ``patch_size``) that must
    divide H and W; the weights are resized to it (FlexiViT). Where the weights are kept is
    separate from the native patch size, as in big_vision's FlexiViT:
      kernel_size: the stored patch-embedding kernel is kernel_size^2 * C x D (default: the
        native patch size), PI-resized to every call's patch size.
      posemb_grid: the grid of the stored learned position embedding (default: the native
        token grid), resized to every call's grid.
      kernel_resize: the resize the PI-resize inverts: "antialias" (vitok's) or "bilinear"
        (tf.image.resize's, without antialiasing when shrinking: big_vision's).
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
        dense_classes: int = 0,
        posemb: str = "sincos2d",
        pool: str = "cls",
        kernel_size: int | None = None,
        posemb_grid: tuple[int, int] | None = None,
        kernel_resize: str = "antialias",
        dropout: float = 0.0,
        drop_path_rate: float = 0.0,
        attention_backend: str = "dense",
        remat: bool = False,
        scan_layers: bool = False,
        dtype: str | jnp.dtype = "float32",
        rngs: nnx.Rngs,
    ):
        h, w = image_size
        if posemb not in ("sincos2d", "learn"):
            raise ValueError(f"posemb must be 'sincos2d' or 'learn', got {posemb!r}")
        if pool not in ("cls", "gap"):
            raise ValueError(f"pool must be 'cls' or 'gap', got {pool!r}")
        if kernel_resize not in ("antialias", "bilinear"):
            raise ValueError(
                f"kernel_resize must be 'antialias' or 'bilinear', got {kernel_resize!r}"
            )
        dtype = jnp.dtype(dtype)
        self.image_size = (h, w)
        self.patch_size = patch_size
        self.channels = channels
        self.grid = self.grid_for(patch_size)  # checks that patch_size divides the image
        self.kernel_size = kernel_size or patch_size
        self.posemb_grid = tuple(posemb_grid) if posemb_grid else self.grid
        self.kernel_antialias = kernel_resize == "antialias"
        self.pool = pool
        self.dtype = dtype
        self.dropout = dropout

        patch_dim = self.kernel_size * self.kernel_size * channels
        self.embed = Dense(patch_dim, width, ("patch", "embed"), rngs=rngs, dtype=dtype)
        num_patches = self.posemb_grid[0] * self.posemb_grid[1]
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
            drop_path_rate=drop_path_rate,
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
        self.dense_classes = dense_classes
        self.dense_head = (
            Dense(
                width,
                patch_size * patch_size * dense_classes,
                ("embed", "classes"),
                rngs=rngs,
                kernel_init=zeros,
                dtype=dtype,
            )
            if dense_classes
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
            dense_classes=self.dense_classes,
        )

    def check_images(self, images: jax.Array) -> None:
        check_image_shape(images, (*self.image_size, self.channels), "ViT")

    def adapt_pretrained(self, path: tuple[str, ...], value: jax.Array, source) -> jax.Array | None:
        """A weight of another model (``source``) for this ViT when the two differ in patch or
        image size, else None (see ``vitok.models.transfer``): the patch kernel is PI-resized to
        this patch size, a learned position embedding is resized to this token grid, and the
        dense head's per-pixel outputs are resized to this patch."""
        if not isinstance(source, ViT):
            return None
        new_patch = source.patch_size != self.patch_size
        new_kernel = source.kernel_size != self.kernel_size
        if path == ("embed", "kernel") and new_kernel and source.channels == self.channels:
            return pi_resize_patch_kernel(
                value,
                old=source.kernel_size,
                new=self.kernel_size,
                channels=self.channels,
                antialias=self.kernel_antialias,
            )
        if (
            path == ("posemb",)
            and self.posemb is not None
            and source.posemb_grid != self.posemb_grid
        ):
            return resize_posemb(value, source.posemb_grid, self.posemb_grid)
        if (
            path[0] == "dense_head"
            and new_patch
            and self.dense_head is not None
            and source.dense_classes == self.dense_classes
        ):
            return _resize_pixel_outputs(
                value, source.patch_size, self.patch_size, self.dense_classes
            )
        return None

    def grid_for(self, patch_size: int) -> tuple[int, int]:
        h, w = self.image_size
        if patch_size < 1 or h % patch_size or w % patch_size:
            raise ValueError(f"patch_size {patch_size} does not divide the image size {h}x{w}")
        return h // patch_size, w // patch_size

    def embed_patches(self, images: jax.Array, patch_size: int) -> jax.Array:
        """images: [B, H, W, C] -> patch embeddings plus position embeddings [B, L, D] at
        ``patch_size`` (L = H*W / patch_size^2); weights resized from their stored sizes."""
        grid = self.grid_for(patch_size)
        kernel = pi_resize_patch_kernel(
            self.embed.kernel[...],
            old=self.kernel_size,
            new=patch_size,
            channels=self.channels,
            antialias=self.kernel_antialias,
        )
        patches = patchify(images, patch_size).astype(self.dtype)
        x = jnp.dot(patches, kernel.astype(self.dtype)) + self.embed.bias[...].astype(self.dtype)
        if self.posemb is None:
            posemb = jnp.asarray(sincos_2d(*grid, self.width))
        else:
            posemb = resize_posemb(self.posemb[...], self.posemb_grid, grid)
        return x + posemb.astype(x.dtype)[None]

    def tokens(
        self,
        images: jax.Array,
        *,
        patch_size: int | None = None,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """images: [B, H, W, C] -> encoded tokens [B, (1 +) L, D] (class token first if any)."""
        self.check_images(images)
        x = self.embed_patches(images, patch_size or self.patch_size)
        if self.pool == "cls":
            cls = jnp.broadcast_to(self.cls[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
            x = jnp.concatenate([cls, x], axis=1)
        x = sharding.constrain(x, ("batch", "length", "embed"))
        return self.encoder(x, dropout_rng=dropout_rng)

    def features(
        self,
        images: jax.Array,
        *,
        patch_size: int | None = None,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """images: [B, H, W, C] -> pooled features [B, D] (the class token, or the mean)."""
        x = self.tokens(images, patch_size=patch_size, dropout_rng=dropout_rng)
        return x[:, 0] if self.pool == "cls" else x.mean(axis=1)

    def __call__(
        self,
        images: jax.Array,
        *,
        patch_size: int | None = None,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """images: [B, H, W, C] -> logits [B, num_classes] in float32 (features if no head)."""
        pooled = self.features(images, patch_size=patch_size, dropout_rng=dropout_rng)
        if self.head is None:
            return pooled
        return self.head(pooled).astype(jnp.float32)

    def dense(
        self,
        images: jax.Array,
        *,
        patch_size: int | None = None,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """images: [B, H, W, C] -> per-pixel logits [B, H, W, dense_classes] in float32.

        Each patch token predicts its own p*p pixels through one linear layer (no decoder). At
        another patch size q the head's p*p outputs per class are resized to q*q bilinearly.
        """
        if self.dense_head is None:
            raise ValueError("this ViT has no dense head; build it with dense_classes > 0")
        q = patch_size or self.patch_size
        grid = self.grid_for(q)
        x = self.tokens(images, patch_size=q, dropout_rng=dropout_rng)
        x = x[:, 1:] if self.pool == "cls" else x
        kernel = self.dense_head.kernel[...]
        bias = self.dense_head.bias[...]
        if q != self.patch_size:
            kernel, bias = (
                _resize_pixel_outputs(t, self.patch_size, q, self.dense_classes)
                for t in (kernel, bias)
            )
        logits = jnp.dot(x, kernel.astype(x.dtype)) + bias.astype(x.dtype)
        return unpatchify(logits, grid, q).astype(jnp.float32)


def _resize_pixel_outputs(x: jax.Array, old: int, new: int, classes: int) -> jax.Array:
    """[..., old*old*classes] outputs laid out as (row, column, class) for an old x old patch
    -> [..., new*new*classes], each class map resized bilinearly (a linear map, so it applies
    to a per-token head's kernel and bias alike)."""
    r = jnp.asarray(patch_resize_matrix(old, new))  # [new*new, old*old]
    x = x.reshape(*x.shape[:-1], old * old, classes)
    return jnp.einsum("no,...oc->...nc", r, x).reshape(*x.shape[:-2], new * new * classes)


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
    if kwargs.get("posemb_grid"):
        kwargs["posemb_grid"] = tuple(kwargs["posemb_grid"])
    return ViT(**kwargs, rngs=rngs)


def vit_forward_flops(
    *,
    image_size,
    patch_size,
    channels,
    width,
    depth,
    mlp_dim,
    num_classes,
    pool="cls",
    dense_classes=0,
    **_,
) -> float:
    """Analytic matmul FLOPs of one forward pass for one image (2 FLOPs per multiply-add)."""
    n = (image_size[0] // patch_size) * (image_size[1] // patch_size)
    length = n + (pool == "cls")
    embed = 2 * n * patch_size * patch_size * channels * width
    head = 2 * width * num_classes + 2 * n * width * patch_size * patch_size * dense_classes
    return float(embed + transformer_flops(length, width, depth, mlp_dim) + head)
