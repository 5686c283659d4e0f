"""KARL (Duggal et al. 2025, "Single-pass Adaptive Image Tokenization for Minimum Program
Search"): one encoder pass gives an image as many 1D tokens as a requested quality needs.

    [quality token ; P 2D tokens ; T latent tokens] ──encoder (full attention)──►
        latent outputs ──LN, Dense──► code_dim ──VQ (l2-normalised) / FSQ / continuous──► tokens
                       ──LN, Dense, tanh, Dense──► halting probability ω per token
    [P mask tokens ; kept tokens] ──decoder (halted tokens excluded from attention)──► 2D tokens

The quality token is a learned embedding of the requested L1 error's bin (``quality_bins``,
the smallest bin >= the request), initialised to the constant bin value as in the official code.
A token halts when ω > ``halt_threshold`` (0.75); the image's token count is T minus its halted
tokens. The 2D tokens are p x p patches of the base space: pixels, or the latents of a frozen
KL autoencoder trained with our trainer (``base``; the paper uses a frozen KL-16 VAE or VQGAN).
The decoder regresses the P patches of that space (the paper's VAE variant regresses latents).

A budget T < T_max is applied by excluding the latent tokens past T from the encoder's attention
(``TokenKeepMask``), which gives the same outputs as an encoder over only T tokens, but one
compiled shape for every T and a different T for every image (phase 1 of training samples one
per image; the official code takes one per GPU batch).

Tokenizer interface (``vitok.models.base``): ``tokenize(images, quality=, budget=)`` gives int32
ids [B, max_tokens] with ``PAD_ID`` at halted positions and past the budget, so ``(ids != -1)``
counts each image's tokens; halted tokens may sit between kept ones, so KARL's ids are not a
contiguous prefix (``contiguous_ids = False``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vitok import sharding
from vitok.models.base import PAD_ID, Tokenizer
from vitok.models.flextok import constant_init, dct_basis, normal_fan_in
from vitok.models.vit import overlap_unpatchify, patchify, unpatchify
from vitok.nn.attention import TokenKeepMask
from vitok.nn.layers import Dense, LayerNorm, param
from vitok.nn.posemb import sincos_2d
from vitok.nn.quantizers import FSQ, VectorQuantizer
from vitok.nn.transformer import Encoder
from vitok.perf import transformer_flops
from vitok.registry import MODELS

# The official code's 19 L1 bins (images in [0, 1]) and halting threshold.
QUALITY_BINS = (
    0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.09, 0.10,
    0.12, 0.14, 0.16, 0.18, 0.20, 0.24, 0.28, 0.32, 0.38,
)  # fmt: skip
HALT_THRESHOLD = 0.75


def quality_bin(quality: jax.Array, bins: Sequence[float]) -> jax.Array:
    """Requested L1 errors [B] -> bin indices [B] int32: the smallest bin >= the request, the
    last bin above it (so 0 maps to the first bin)."""
    edges = jnp.asarray(bins, jnp.float32)
    index = jnp.searchsorted(edges, jnp.asarray(quality, jnp.float32), side="left")
    return jnp.minimum(index, len(bins) - 1).astype(jnp.int32)


def per_image_l1(recon: jax.Array, images: jax.Array) -> jax.Array:
    """[B, H, W, C] images in [-1, 1] -> the mean absolute error [B] measured on [0, 1] (the
    paper's ε), both clipped to the range."""
    a = jnp.clip((recon.astype(jnp.float32) + 1) / 2, 0, 1)
    b = jnp.clip((images.astype(jnp.float32) + 1) / 2, 0, 1)
    return jnp.mean(jnp.abs(a - b), axis=(1, 2, 3))


def budget_mask(budget: jax.Array | int, num_tokens: int, batch: int) -> jax.Array:
    """Budget T (scalar or [B]) -> bool [B, num_tokens]: the first T positions."""
    budget = jnp.broadcast_to(jnp.asarray(budget), (batch,))
    return jnp.arange(num_tokens)[None] < budget[:, None]


def halting_targets(budget: jax.Array | int, num_tokens: int, batch: int) -> jax.Array:
    """Phase-2 BCE labels [B, num_tokens] float32: 0 (keep) for the first T tokens, 1 (halt)
    for the rest."""
    return (~budget_mask(budget, num_tokens, batch)).astype(jnp.float32)


def decoder_keep(token_keep: jax.Array, num_patches: int) -> jax.Array:
    """Kept latent tokens [B, T] -> kept positions of the decoder's [P mask tokens ; T tokens]
    sequence [B, P + T] (the P mask tokens are always kept)."""
    patches = jnp.ones((token_keep.shape[0], num_patches), bool)
    return jnp.concatenate([patches, token_keep.astype(bool)], axis=1)


class KARL(Tokenizer):
    """Args:
    image_size, channels, patch_size: the images and their 2D tokens (p x p pixel patches).
    max_tokens: T_max, the number of learned latent tokens (the full budget).
    encoder, decoder: dicts of width, depth, num_heads, mlp_dim.
    quantizer: "vq" (``codebook_size`` x ``code_dim``, l2-normalised), "fsq" (``fsq_levels``)
      or "continuous" (``code_dim`` floats; ``tokenize`` is then unavailable).
    quality_bins, halt_threshold, halt_hidden: the halting mechanism.
    token_mixing: a learned linear route between latent-token slots and patch positions in both
      directions ([T, P] into the encoder's latent tokens, [P, T] into the decoder's patch
      tokens; halted tokens do not enter), as FlexTok's ``register_mixing``. ``mixing_init``
      "dct" starts slot t at the t-th 2D DCT basis function (coarse to fine), "normal" random.
      Attention learns where to read only slowly; on the CPU presets' few photos this route is
      what lets the tokenizer generalise to new ones (without it a tiny model memorises its
      training photos). Full-scale presets leave it off.
    decoder_patches: "disjoint" (each decoder token writes its p x p patch) or "overlap_out"
      (each writes a 2p x 2p tile blended with its neighbours': no seam at every patch border).
    base: None (pixel patches) or a frozen autoencoder with ``encode``/``decode``/``latent_shape``
      whose latents are the 2D base space (``pretrained`` names its workdir).
    """

    ordered = True
    contiguous_ids = False

    def __init__(
        self,
        *,
        image_size: tuple[int, int],
        channels: int = 3,
        patch_size: int = 4,
        max_tokens: int = 32,
        encoder: dict,
        decoder: dict,
        quantizer: str = "vq",
        codebook_size: int = 4096,
        code_dim: int = 12,
        vq_beta: float = 0.25,
        fsq_levels: Sequence[int] = (8, 5, 5, 5),
        quality_bins: Sequence[float] = QUALITY_BINS,
        halt_threshold: float = HALT_THRESHOLD,
        halt_hidden: int = 512,
        token_mixing: bool = False,
        mixing_init: str = "dct",
        decoder_patches: str = "disjoint",
        remat: bool = False,
        scan_layers: bool = False,
        dtype: str | jnp.dtype = "float32",
        base: Any = None,
        pretrained: dict | None = None,
        rngs: nnx.Rngs,
    ):
        dtype = jnp.dtype(dtype)
        if quantizer not in ("vq", "fsq", "continuous"):
            raise ValueError(f"quantizer must be 'vq', 'fsq' or 'continuous', got {quantizer!r}")
        self.image_size, self.channels, self.patch_size = tuple(image_size), channels, patch_size
        self.base = base
        self.pretrained = dict(pretrained or {})
        space = base.latent_shape(self.image_size) if base is not None else (*image_size, channels)
        h, w, space_channels = space
        if h % patch_size or w % patch_size:
            raise ValueError(f"patch_size {patch_size} does not divide the base grid {h}x{w}")
        self.grid = (h // patch_size, w // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.patch_dim = patch_size * patch_size * space_channels
        self.pixel_patch = self.image_size[0] // self.grid[0]
        self.max_tokens = int(max_tokens)
        self.quality_bins = tuple(float(b) for b in quality_bins)
        self.halt_threshold = float(halt_threshold)
        self.quantizer_kind = quantizer
        if quantizer == "fsq":
            self.fsq = FSQ(fsq_levels)
            code_dim = self.fsq.dim
        self.vq = (
            VectorQuantizer(int(codebook_size), int(code_dim), beta=vq_beta, rngs=rngs)
            if quantizer == "vq"
            else None
        )
        self.code_dim = int(code_dim)
        if quantizer == "vq":
            self._codebook_size = int(codebook_size)
        elif quantizer == "fsq":
            self._codebook_size = self.fsq.codebook_size
        else:  # continuous: no ids
            self._codebook_size = 0

        if decoder_patches not in ("disjoint", "overlap_out"):
            raise ValueError(
                f"decoder_patches must be 'disjoint' or 'overlap_out', got {decoder_patches!r}"
            )
        self.decoder_patches = decoder_patches
        we, wd = int(encoder["width"]), int(decoder["width"])
        self.enc_width, self.dec_width = we, wd
        kw = dict(rngs=rngs, dtype=dtype)
        stack = dict(kw, remat=remat, scan_layers=scan_layers)
        token_init = nnx.initializers.normal(stddev=we**-0.5)
        self.patch_embed = Dense(self.patch_dim, we, ("patch", "embed"), **kw)
        self.latent_tokens = param(rngs, token_init, (self.max_tokens, we), (None, "embed"))
        bins = np.asarray(self.quality_bins, np.float32)
        self.quality_embed = param(
            rngs,
            lambda key, shape, dtype: jnp.broadcast_to(jnp.asarray(bins)[:, None], shape),
            (len(bins), we),
            (None, "embed"),
        )
        self.encoder = Encoder(
            we, int(encoder["depth"]), int(encoder["num_heads"]), int(encoder["mlp_dim"]), **stack
        )
        self.to_code = Dense(we, self.code_dim, ("embed", None), **kw)
        self.halt_norm = LayerNorm(we, rngs=rngs, dtype=dtype)
        self.halt_hidden = Dense(we, int(halt_hidden), ("embed", "mlp"), **kw)
        self.halt_out = Dense(int(halt_hidden), 1, ("mlp", None), **kw)

        dec_init = nnx.initializers.normal(stddev=wd**-0.5)
        self.from_code = Dense(self.code_dim, wd, (None, "embed"), **kw)
        self.token_posemb = param(rngs, dec_init, (self.max_tokens, wd), (None, "embed"))
        self.mask_token = param(rngs, dec_init, (wd,), ("embed",))
        self.decoder = Encoder(
            wd, int(decoder["depth"]), int(decoder["num_heads"]), int(decoder["mlp_dim"]), **stack
        )
        self.out_hidden = Dense(wd, 2 * wd, ("embed", "mlp"), **kw)
        out_dim = self.patch_dim * (4 if decoder_patches == "overlap_out" else 1)
        self.out = Dense(2 * wd, out_dim, ("mlp", "patch"), **kw)
        t, p = self.max_tokens, self.num_patches
        if mixing_init == "dct":
            basis = dct_basis(self.grid, t)  # [T, P], low frequencies first
            enc_init, dec_init = constant_init(basis), constant_init(basis.T)
        elif mixing_init == "normal":
            enc_init, dec_init = normal_fan_in(p), normal_fan_in(t)
        else:
            raise ValueError(f"mixing_init must be 'dct' or 'normal', got {mixing_init!r}")
        self.enc_token_mix = param(rngs, enc_init, (t, p), (None, None)) if token_mixing else None
        self.dec_patch_mix = param(rngs, dec_init, (p, t), (None, None)) if token_mixing else None

    # --- the Tokenizer interface -----------------------------------------------------------------

    @property
    def token_shape(self) -> tuple[int]:
        return (self.max_tokens,)

    @property
    def codebook_size(self) -> int:
        return self._codebook_size

    @property
    def decoder_patch(self) -> int:
        return self.pixel_patch

    @property
    def tokenize_options(self) -> dict:
        return {"quality": 0.05, "budget": self.max_tokens}

    def pretrained_workdirs(self) -> dict[str, str]:
        return self.pretrained

    # --- the base space --------------------------------------------------------------------------

    def to_space(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, C] in [-1, 1] -> 2D tokens' content [B, P, patch_dim] float32."""
        x = images.astype(jnp.float32)
        if self.base is not None:
            x = jax.lax.stop_gradient(self.base.encode(x).astype(jnp.float32))
        return patchify(x, self.patch_size)

    def from_space(self, x: jax.Array) -> jax.Array:
        """[B, P, patch_dim] -> images [B, H, W, C] float32 (about [-1, 1])."""
        x = unpatchify(x.astype(jnp.float32), self.grid, self.patch_size)
        return self.base.decode(x).astype(jnp.float32) if self.base is not None else x

    # --- encoder ---------------------------------------------------------------------------------

    def check_budget(self, budget: Any) -> None:
        if isinstance(budget, (int, np.integer)) and not 1 <= budget <= self.max_tokens:
            raise ValueError(f"budget must be in 1..{self.max_tokens}, got {budget}")

    def encode(
        self,
        images: jax.Array,
        quality_index: jax.Array,
        budget: jax.Array | int | None = None,
        space: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """images [B, H, W, C] in [-1, 1], quality_index [B] int, budget T (int or [B]; None:
        all T_max tokens) -> over all T_max positions: ``codes`` [B, T_max, code_dim]
        (straight-through), ``ids`` [B, T_max] int32 (-1 for continuous), ``halt_logits``
        [B, T_max] float32, ``within`` [B, T_max] bool (position < T), ``quantizer_loss``
        (mean over the positions within the budget). Positions past T do not touch the others.
        ``space``: the images' ``to_space`` if already computed."""
        self.check_images(images)
        self.check_budget(budget)
        b = images.shape[0]
        x = self.patch_embed(self.to_space(images) if space is None else space)
        x = x + jnp.asarray(sincos_2d(*self.grid, self.enc_width)).astype(x.dtype)[None]
        quality = self.quality_embed[...][quality_index].astype(x.dtype)[:, None]
        t = self.max_tokens
        latents = jnp.broadcast_to(self.latent_tokens[...].astype(x.dtype), (b, t, self.enc_width))
        if self.enc_token_mix is not None:
            latents = latents + jnp.einsum(
                "tp,bpd->btd", self.enc_token_mix[...].astype(x.dtype), x
            )
        x = jnp.concatenate([quality, x, latents], axis=1)
        within = budget_mask(t if budget is None else budget, t, b)
        mask = None
        if budget is not None:
            prefix = jnp.ones((b, 1 + self.num_patches), bool)
            mask = TokenKeepMask(jnp.concatenate([prefix, within], axis=1))
        x = self.encoder(sharding.constrain(x, ("batch", "length", "embed")), mask)
        h = x[:, 1 + self.num_patches :]
        z = self.to_code(h).astype(jnp.float32)
        halt = self.halt_out(jnp.tanh(self.halt_hidden(self.halt_norm(h))))
        out = {"halt_logits": halt[..., 0].astype(jnp.float32), "within": within}
        if self.quantizer_kind == "vq":
            out["codes"], out["ids"], out["quantizer_loss"] = self.vq(z, within)
        elif self.quantizer_kind == "fsq":
            out["codes"], out["ids"] = self.fsq(z)
            out["quantizer_loss"] = jnp.zeros((), jnp.float32)
        else:
            out["codes"], out["ids"] = z, jnp.full(z.shape[:2], PAD_ID, jnp.int32)
            out["quantizer_loss"] = jnp.zeros((), jnp.float32)
        return out

    def token_keep(self, halt_logits: jax.Array, budget: jax.Array | int) -> jax.Array:
        """[B, T] -> bool [B, T]: not halted (ω <= threshold) and within the budget."""
        not_halted = jax.nn.sigmoid(halt_logits) <= self.halt_threshold
        return not_halted & budget_mask(budget, halt_logits.shape[1], halt_logits.shape[0])

    # --- decoder ---------------------------------------------------------------------------------

    def decode_space(self, codes: jax.Array, keep: jax.Array | None = None) -> jax.Array:
        """codes [B, T, code_dim], keep [B, T] bool (None: all) -> the base space's patches
        [B, P, patch_dim] float32. Tokens that are not kept take no part in attention (nor does
        anything attend to them)."""
        b, t, _ = codes.shape
        tokens = self.from_code(codes) + self.token_posemb[...][:t].astype(codes.dtype)[None]
        patches = jnp.broadcast_to(self.mask_token[...], (b, self.num_patches, self.dec_width))
        patches = patches + jnp.asarray(sincos_2d(*self.grid, self.dec_width))[None]
        patches = patches.astype(tokens.dtype)
        if self.dec_patch_mix is not None:
            kept = tokens if keep is None else tokens * keep[..., None].astype(tokens.dtype)
            mix = self.dec_patch_mix[...][:, :t].astype(tokens.dtype)
            patches = patches + jnp.einsum("pt,btd->bpd", mix, kept)
        x = jnp.concatenate([patches, tokens], axis=1)
        mask = None if keep is None else TokenKeepMask(decoder_keep(keep, self.num_patches))
        h = self.decoder(sharding.constrain(x, ("batch", "length", "embed")), mask)
        out = self.out(jnp.tanh(self.out_hidden(h[:, : self.num_patches]))).astype(jnp.float32)
        if self.decoder_patches == "overlap_out":
            blended = overlap_unpatchify(out, self.grid, self.patch_size)
            out = patchify(blended, self.patch_size)
        return out

    def decode(self, codes: jax.Array, keep: jax.Array | None = None) -> jax.Array:
        """codes [B, T, code_dim], keep [B, T] bool (None: all) -> images [B, H, W, C] float32."""
        return self.from_space(self.decode_space(codes, keep))

    def ids_to_codes(self, ids: jax.Array) -> jax.Array:
        safe = jnp.where(ids == PAD_ID, 0, ids)
        return self.vq.ids_to_codes(safe) if self.vq is not None else self.fsq.ids_to_codes(safe)

    def tokenize(self, images: jax.Array, *, quality: Any = 0.05, budget: Any = None) -> jax.Array:
        """images [B, H, W, C] in [-1, 1] -> ids [B, max_tokens] int32, PAD_ID where halted or
        past ``budget``: one encoder pass at the requested mean L1 error ``quality`` (on [0, 1]
        images; a float or [B]). ``budget``: T (int or [B]; None: max_tokens)."""
        if self.quantizer_kind == "continuous":
            raise ValueError("a continuous KARL has no token ids; use encode() for its codes")
        out, keep = self.encode_request(images, quality, budget)
        return jnp.where(keep, out["ids"], PAD_ID)

    def encode_request(
        self, images: jax.Array, quality: Any, budget: Any
    ) -> tuple[dict[str, jax.Array], jax.Array]:
        """One encoder pass at the requested ``quality`` (float or [B]) within ``budget`` (int,
        [B] or None) -> (``encode``'s outputs, kept tokens bool [B, max_tokens])."""
        if isinstance(quality, (int, float)) and not 0.0 <= float(quality) <= 1.0:
            raise ValueError(f"quality is a mean L1 error in [0, 1], got {quality}")
        index = jnp.broadcast_to(quality_bin(quality, self.quality_bins), (images.shape[0],))
        if isinstance(budget, (int, np.integer)) and int(budget) == self.max_tokens:
            budget = None  # the full budget needs no mask (any attention backend)
        out = self.encode(images, index, budget)
        keep = self.token_keep(out["halt_logits"], self.max_tokens if budget is None else budget)
        return out, keep

    def tokenize_at_budget(self, images: jax.Array, k: jax.Array | int) -> jax.Array:
        """Fixed-budget ids for reconstruction from k tokens: the budget k at the lowest
        quality bin (the paper's fixed-count evaluation, ε = 0), halting as predicted."""
        return self.tokenize(images, quality=0.0, budget=k)

    def reconstruct(
        self, images: jax.Array, quality: Any = 0.05, budget: Any = None
    ) -> tuple[jax.Array, jax.Array]:
        """One encoder and one decoder pass at the requested ``quality`` (float or [B]) and
        ``budget`` -> (images [B, H, W, C], token counts [B] int32); any quantizer, continuous
        included."""
        out, keep = self.encode_request(images, quality, budget)
        return self.decode(out["codes"], keep), keep.sum(-1).astype(jnp.int32)

    def reconstruct_at_budget(
        self, images: jax.Array, k: jax.Array | int, rng: jax.Array | None = None
    ) -> jax.Array:
        return self.reconstruct(images, quality=0.0, budget=k)[0]

    def detokenize(self, ids: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """ids [B, k] (k <= max_tokens; PAD_ID for halted tokens) -> images [B, H, W, C]."""
        keep = ids != PAD_ID
        return self.decode(self.ids_to_codes(ids), keep)

    def forward_flops(self) -> float:
        """Matmul FLOPs of one phase's forward pass (encoder + decoder at the full budget)."""
        t, p = self.max_tokens, self.num_patches
        we, wd = self.enc_width, self.dec_width
        base = self.base.forward_flops() if self.base is not None else 0.0
        enc = transformer_flops(1 + p + t, we, self.encoder.depth, self.encoder.mlp_dim)
        dec = transformer_flops(p + t, wd, self.decoder.depth, self.decoder.mlp_dim)
        heads = 2 * p * self.patch_dim * we + 2 * p * (wd * 2 * wd + 2 * wd * self.patch_dim)
        latent = 2 * t * (we * self.code_dim + self.code_dim * wd)
        if self.enc_token_mix is not None:
            latent += 2 * t * p * (we + wd)
        if self.decoder_patches == "overlap_out":
            heads += 2 * p * 2 * wd * 3 * self.patch_dim
        return float(enc + dec + heads + latent + base)


@MODELS.register("karl")
def build_karl(config, rngs: nnx.Rngs) -> KARL:
    kwargs = {k: v for k, v in dict(config).items() if k != "name"}
    kwargs["image_size"] = tuple(kwargs["image_size"])
    kwargs["encoder"], kwargs["decoder"] = dict(kwargs["encoder"]), dict(kwargs["decoder"])
    for key in ("fsq_levels", "quality_bins"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    base_config = kwargs.pop("base", None)
    base, pretrained = None, {}
    if base_config is not None and base_config.get("name"):
        from vitok.models.vae import build_frozen_vae

        if base_config["name"] != "vae":
            raise ValueError(
                f"model.base.name must be '' (pixels) or 'vae', got {base_config['name']!r}"
            )
        base = build_frozen_vae(base_config, rngs)
        pretrained["base"] = base_config.get("checkpoint", "")
    return KARL(**kwargs, base=base, pretrained=pretrained, rngs=rngs)
