"""FlexTok (Bachmann et al. 2025): an image becomes 1..N ordered tokens, coarse to fine.

    images [B, H, W, C] ──patchify──► patch tokens [B, P, p*p*C]
        encoder: ViT over [patches ; N registers], RegisterCausalMask
        registers [B, N, De] ──linear──► FSQ ──► codes [B, N, d], ids [B, N] int32
    decoder (rectified flow): velocity(x_t [B, P, p*p*C], sigma [B], codes, keep [B, N])
        the first k codes are kept, the rest become one learned mask token (nested dropout);
        AdaLN-zero on sigma; full attention over [registers ; noised patches]

Training (``vitok.tasks.flextok``): x_t = sigma * noise + (1 - sigma) * x0 with
sigma = sigmoid(N(0, 1)) and the velocity target noise - x0. Sampling integrates from sigma = 1
(pure noise) to 0 with Euler steps in one compiled ``lax.fori_loop``, with classifier-free
guidance against the null condition (all registers masked) and optional APG.

The flow runs on images in [-1, 1] (pixel space, CPU presets) or on the latents of a frozen
autoencoder (``vae``, full-scale presets).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vitok import sharding
from vitok.models.base import PAD_ID, Tokenizer, check_image_shape, pad_ids
from vitok.models.vit import overlap_patchify, overlap_unpatchify, patchify, unpatchify
from vitok.nn.adaln import AdaLNTransformer, TimeEmbedder
from vitok.nn.attention import RegisterCausalMask
from vitok.nn.layers import Dense, param, plain_layer_norm
from vitok.nn.posemb import sincos_2d
from vitok.nn.quantizers import FSQ
from vitok.nn.transformer import Encoder
from vitok.perf import transformer_flops
from vitok.registry import MODELS


@dataclasses.dataclass(frozen=True)
class StackSpec:
    """The size of a transformer stack (FlexTok's encoder or decoder)."""

    width: int
    depth: int
    num_heads: int
    mlp_dim: int

    @classmethod
    def of(cls, spec: Mapping[str, Any] | StackSpec) -> StackSpec:
        if isinstance(spec, StackSpec):
            return spec
        return cls(*(int(spec[k]) for k in ("width", "depth", "num_heads", "mlp_dim")))


@dataclasses.dataclass(frozen=True)
class Compute:
    """How the stacks run: attention backend, rematerialisation, scanned layers, dtype."""

    attention_backend: str = "dense"
    remat: bool = False
    scan_layers: bool = False
    dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class FlowOptions:
    """The decoder's research switches, each at the published model's setting by default (what
    each does: ``FlexTok``'s docstring)."""

    prediction: str = "velocity"
    time_shift: float = 1.0
    decoder_patches: str = "disjoint"
    adaln_registers: bool = False
    register_mixing: bool = False
    mixing_init: str = "normal"
    repa_layer: int = 0
    repa_dim: int = 0
    linear_route: bool = False
    linear_fit_examples: int = 8192
    # Definitions where FlexTok's release differs from vitok's own (a converted release sets
    # them all; see ``FlexTok``'s docstring).
    block_style: str = "vit"
    adaln_parts: int = 1
    posemb: str = "sincos"
    fsq_bound: str = "tanh"
    fsq_input_norm: bool = False
    mask_posemb: bool = True
    null_condition: str = "mask"
    time_max_period: float = 10_000.0
    time_scale: float = 1000.0
    apg_space: str = "x0"
    apg_momentum: float = 0.0

    def __post_init__(self):
        choices = {
            "prediction": ("velocity", "x0", "x0_skip"),
            "decoder_patches": ("disjoint", "overlap_out", "overlap"),
            "mixing_init": ("normal", "dct"),
            "block_style": ("vit", "flextok"),
            "posemb": ("sincos", "learned"),
            "fsq_bound": FSQ.BOUNDS,
            "null_condition": ("mask", "zeros", "learned"),
            "apg_space": ("x0", "velocity"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                known = ", ".join(map(repr, allowed[:-1])) + f" or {allowed[-1]!r}"
                raise ValueError(f"{key} must be {known}, got {getattr(self, key)!r}")
        if self.time_shift < 1.0:
            raise ValueError(f"time_shift must be >= 1, got {self.time_shift}")
        if self.adaln_parts not in (1, 2):
            raise ValueError(f"adaln_parts must be 1 or 2, got {self.adaln_parts}")
        if self.apg_momentum and self.apg_space != "velocity":
            raise ValueError("apg_momentum needs apg_space='velocity' (x0-space APG has none)")
        if self.linear_route and self.prediction != "x0":
            raise ValueError("linear_route adds to the clean estimate: it needs prediction='x0'")
        if self.linear_route and self.fsq_bound != "tanh":
            raise ValueError("linear_route reads codes through the tanh bound's inverse: it needs "
                             "fsq_bound='tanh'")  # fmt: skip

    def block_options(self) -> dict:
        """The encoder's ``Block`` options: FlexTok's release has LayerNorms without scale or
        bias (eps 1e-5), QK-norm, SwiGLU and no biases in its blocks."""
        if self.block_style == "vit":
            return {}
        return dict(norm="plain", mlp="swiglu", use_bias=False, qk_norm=True)

    def adaln_options(self) -> dict:
        """The decoder's ``AdaLNBlock`` options (the same choices; ``adaln_parts``)."""
        options = {"parts": self.adaln_parts}
        if self.block_style == "flextok":
            options |= dict(norm_eps=1e-5, mlp="swiglu", use_bias=False, qk_norm=True)
        return options


# config.model's keys that are not FlexTok's own arguments but fill its parts.
_COMPUTE_KEYS = tuple(f.name for f in dataclasses.fields(Compute))
_OPTION_KEYS = tuple(f.name for f in dataclasses.fields(FlowOptions))


class FlexTok(Tokenizer):
    """Adaptive-length 1D tokenizer with a rectified-flow decoder.

    Args:
      image_size: (H, W) of the images.
      channels: C of the images.
      patch_size: p over the flow space (pixels, or latents when ``vae`` is given).
      num_registers: N, the most tokens an image becomes.
      fsq_levels: FSQ levels per channel; the codebook has prod(levels) entries.
      encoder / decoder: ``StackSpec`` (or a dict with width, depth, num_heads, mlp_dim).
      compute: ``Compute``, how the stacks run.
      vae: an optional frozen autoencoder (``vitok.models.vae.FrozenVAE``) whose latents the flow
        models instead of pixels.
      repa_encoder: the frozen ViT whose patch features REPA aligns to (``repa_target``).
      pretrained: {attribute: workdir} of the frozen sub-models, loaded when training starts.
      options: ``FlowOptions``, the decoder's research switches:

    FlowOptions:
      repa_layer / repa_dim: if repa_dim > 0, ``velocity_and_alignment`` also gives the
        decoder's hidden patch tokens after block ``repa_layer`` projected to repa_dim (REPA).
      adaln_registers: also add the mean of the register tokens to the AdaLN conditioning
        vector (besides attending to them), a direct global path that small decoders pick up
        faster; it depends on the first k tokens only, like the attention path.
      time_shift: s >= 1 moves noise levels towards pure noise, sigma -> s sigma / (1 + (s - 1)
        sigma) (Esser et al. 2024), in training and in the sampling schedule alike. The decoder
        needs the tokens most at high noise, so a shift makes it learn to use them sooner.
      register_mixing: add a learned linear map between register slots and patch positions in
        both directions: each encoder register starts from its learned embedding plus a learned
        weighted sum of the patch embeddings [N, P], and each decoder patch token gets a learned
        weighted sum of the register tokens [P, N] (dropped registers enter as the mask token, so
        only the first k tokens inform the image). Attention learns where to read only slowly;
        this linear path (a linear autoencoder, which nested dropout orders like PCA) carries
        spatial layout from the first steps. A CPU-budget option; full-scale presets leave it off.
      mixing_init: how the two mixing maps start: "normal" (random, N(0, 1/fan_in)) or "dct"
        (register i reads, and writes back, the i-th 2D DCT basis function over the patch grid,
        lowest frequencies first). "dct" starts the route at the ordering nested dropout asks
        for (register 1 the mean, then ever finer detail); training then adapts it.
      decoder_patches: how the decoder reads and writes the flow-space image: "disjoint" (each
        token embeds and writes its own p x p patch, the published model), "overlap_out" (each
        token writes a 2p x 2p tile centred on its patch, and neighbouring tiles are blended
        with a tent, ``overlap_unpatchify``: a small decoder cannot leave a seam at every patch
        border), or "overlap" (as "overlap_out", and each token also embeds the 2p x 2p window
        around its patch, ``overlap_patchify``, so every token that writes a pixel has seen it).
      prediction: what the decoder's output layer predicts: "velocity" (noise - x0, the
        published model) or "x0" (the clean patches; the velocity is then (x_t - x0) / sigma,
        Li & He 2025, who argue for it when a pixel patch is large next to the width: a velocity
        makes the network carry the noise through to its output), or "x0_skip": x0 =
          c_skip(sigma) x_t + c_out(sigma) F with the skip and output scale of Karras et al. 2022
          for rectified flow (``skip_coefficients``): at sigma = 1 the clean estimate is all
          network (no noise to carry through, as with "x0"), towards sigma = 0 it is mostly x_t
          itself, so fine detail already in x_t is kept instead of re-predicted by a small
          network through its patch bottleneck.

      linear_route: a linear code beside the transformers. Each register's FSQ input gets a
        linear function of the whole flow-space image (``enc_linear``: [P * patch_dim, N * d]),
        and the decoder's clean estimate gets a linear function of the kept codes read back in
        the FSQ bound's pre-image, atanh(LINEAR_READ * code) (``dec_linear``; a dropped
        register reads 0, so only the first k tokens inform it). ``data_init`` starts both at
        the training images' PCA: register n's d inputs are principal components n*d ..
        n*d + d - 1 in units of LINEAR_SCALE standard deviations, and the decoder map is the
        least-squares fit of the images on the codes that gives (``linear_fit_examples``
        training images); both then stay fixed, like a frozen VAE (``Frozen`` variables). At step 0 the model is then
        a linear transform code with the FSQ's levels and nested dropout's order (the
        encoder's own projection ``to_fsq`` starts at zero, the decoder's output layer
        already does); training adds what the transformers find beyond it. Needs
        prediction "x0". A CPU-budget option: its maps grow with the image, so full-scale
        presets leave it off.

      The release's definitions (``vitok.interop.flextok`` sets them when it converts a
      checkpoint; vitok's own presets keep the defaults):
      block_style: "vit" (LayerNorm with scale and bias, GELU MLP, biases, a final encoder
        LayerNorm) or "flextok" (LayerNorms without scale or bias at eps 1e-5, QK-norm, SwiGLU,
        no biases, no final encoder norm: the release's FlexTransformer).
      adaln_parts: 2 gives the decoder's registers and patches their own AdaLN modulations
        (the release's ``adaLN_expansion``); 1 shares one.
      posemb: "sincos" (computed) or "learned" (a stored table per stack, as the release keeps
        its sincos tables in the checkpoint).
      fsq_bound: "tanh" or "release" (``vitok.nn.quantizers.FSQ``).
      fsq_input_norm: LayerNorm (no scale or bias) on the registers before the FSQ projection.
      mask_posemb: the register posemb is added after the mask token replaces the dropped
        registers (True) or before, so mask tokens carry none (False, the release).
      null_condition: an example with no kept register (guidance's null condition, cfg
        dropout) gets every register masked ("mask"), zeros ("zeros") or one learned token in
        every slot ("learned"), the last two the release's ZeroNullCond / LearnedNullCond.
      time_max_period, time_scale: the time embedding's sinusoid (``timestep_embedding``;
        the release: 256 and 1000 / max_timestep).
      apg_space, apg_momentum: APG on the denoised estimates ("x0") or on the velocities
        themselves ("velocity", the release), with the guidance difference kept as a running
        sum diff + momentum * previous (the release: -0.5; 0 keeps none).
    """

    def __init__(
        self,
        *,
        image_size: tuple[int, int],
        channels: int = 3,
        patch_size: int = 4,
        num_registers: int = 32,
        fsq_levels: tuple[int, ...] = (8, 5, 5, 5),
        encoder: StackSpec | Mapping[str, Any],
        decoder: StackSpec | Mapping[str, Any],
        compute: Compute = Compute(),
        options: FlowOptions = FlowOptions(),
        vae: Any = None,
        repa_encoder: Any = None,
        pretrained: dict | None = None,
        rngs: nnx.Rngs,
    ):
        encoder, decoder = StackSpec.of(encoder), StackSpec.of(decoder)
        if options.repa_dim and not 1 <= options.repa_layer <= decoder.depth:
            raise ValueError(f"repa_layer must be in 1..{decoder.depth}, got {options.repa_layer}")
        dtype = jnp.dtype(compute.dtype)
        self.image_size = tuple(image_size)
        self.channels = channels
        self.vae = vae
        space_shape = (
            vae.latent_shape(self.image_size) if vae is not None else (*image_size, channels)
        )
        h, w, c = space_shape
        if h % patch_size or w % patch_size:
            raise ValueError(f"patch_size {patch_size} does not divide the flow space {h}x{w}")
        self.space_shape = space_shape
        self.patch_size = patch_size
        self.grid = (h // patch_size, w // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.num_registers = num_registers
        self.fsq = FSQ(fsq_levels, options.fsq_bound)
        self.posemb_kind = options.posemb
        self.fsq_input_norm = bool(options.fsq_input_norm)
        self.mask_posemb = bool(options.mask_posemb)
        self.null_kind = options.null_condition
        self.adaln_parts = int(options.adaln_parts)
        self.apg_space, self.apg_momentum = options.apg_space, float(options.apg_momentum)
        self.mlp_matmuls = 3 if options.block_style == "flextok" else 2
        self.dtype = dtype
        self.patch_dim = patch_size * patch_size * c
        self.time_shift = float(options.time_shift)
        self.prediction = options.prediction
        self.decoder_patches = options.decoder_patches
        self.repa_layer = int(options.repa_layer)
        self.linear_fit_examples = int(options.linear_fit_examples)
        self.repa_encoder = repa_encoder
        self.pretrained = dict(pretrained or {})
        # Parameters are created in this order (encoder side, the mixing maps, decoder side):
        # the order fixes what each draws from ``rngs``.
        self._init_encoder(encoder, compute, options, rngs)
        self._init_decoder(decoder, compute, options, rngs)

    def _init_encoder(
        self, spec: StackSpec, compute: Compute, options: FlowOptions, rngs: nnx.Rngs
    ) -> None:
        """Patch embedding, registers, both register-mixing maps, the encoder, the FSQ input."""
        dtype = self.dtype
        we = self.enc_width = spec.width
        self.enc_patch_embed = Dense(self.patch_dim, we, ("patch", "embed"), rngs=rngs, dtype=dtype)
        # Unit-scale registers: with small ones, every register reads the same patch average in
        # the first block and they all quantize to the same few codes (measured at init).
        unit = nnx.initializers.normal(stddev=1.0)
        self.enc_registers = param(rngs, unit, (self.num_registers, we), (None, "embed"))
        self.enc_posemb = self._posemb_param(we, rngs, options)
        p, n = self.num_patches, self.num_registers
        if options.mixing_init == "normal":
            enc_mix_init, dec_mix_init = normal_fan_in(p), normal_fan_in(n)
        else:  # "dct"
            basis = dct_basis(self.grid, n)  # [N, P], orthonormal rows, low frequencies first
            enc_mix_init, dec_mix_init = constant_init(basis), constant_init(basis.T)
        mixing = options.register_mixing
        self.enc_register_mix = param(rngs, enc_mix_init, (n, p), (None, None)) if mixing else None
        self.dec_patch_mix = param(rngs, dec_mix_init, (p, n), (None, None)) if mixing else None
        self.encoder = Encoder(
            we,
            spec.depth,
            spec.num_heads,
            spec.mlp_dim,
            rngs=rngs,
            dtype=dtype,
            attention_backend=compute.attention_backend,
            remat=compute.remat,
            scan_layers=compute.scan_layers,
            final_norm=options.block_style == "vit",
            block_options=options.block_options(),
        )
        # Small projections keep tanh inside FSQ unsaturated at the start.
        small = nnx.initializers.variance_scaling(0.1, "fan_in", "normal")
        if options.linear_route:  # the linear code alone at step 0 (see ``data_init``)
            small = nnx.initializers.zeros_init()
        self.to_fsq = Dense(
            we, self.fsq.dim, ("embed", None), rngs=rngs, kernel_init=small, dtype=dtype
        )

    def _init_decoder(
        self, spec: StackSpec, compute: Compute, options: FlowOptions, rngs: nnx.Rngs
    ) -> None:
        """Token inputs, patch embedding, time embedding, the AdaLN decoder, its output layer
        and REPA's projection."""
        dtype = self.dtype
        wd = self.dec_width = spec.width
        normal = nnx.initializers.normal(stddev=0.02)
        self.from_fsq = Dense(self.fsq.dim, wd, (None, "embed"), rngs=rngs, dtype=dtype)
        self.mask_token = param(rngs, normal, (1, wd), (None, "embed"))
        self.dec_register_posemb = param(rngs, normal, (self.num_registers, wd), (None, "embed"))
        self.null_token = (
            param(rngs, normal, (1, wd), (None, "embed"))
            if options.null_condition == "learned"
            else None
        )
        self.dec_posemb = self._posemb_param(wd, rngs, options)
        read_dim = self.patch_dim * (4 if self.decoder_patches == "overlap" else 1)
        tile_dim = self.patch_dim * (1 if self.decoder_patches == "disjoint" else 4)
        self.dec_patch_embed = Dense(read_dim, wd, ("patch", "embed"), rngs=rngs, dtype=dtype)
        self.time_embed = TimeEmbedder(
            wd, rngs=rngs, max_period=options.time_max_period, scale=options.time_scale
        )
        self.adaln_registers = (
            Dense(wd, wd, ("embed", None), rngs=rngs, dtype=dtype)
            if options.adaln_registers
            else None
        )
        self.decoder = AdaLNTransformer(
            wd,
            spec.depth,
            spec.num_heads,
            spec.mlp_dim,
            rngs=rngs,
            dtype=dtype,
            attention_backend=compute.attention_backend,
            remat=compute.remat,
            scan_layers=compute.scan_layers,
            block_options=options.adaln_options(),
        )
        zeros = nnx.initializers.zeros_init()
        self.dec_out = Dense(wd, tile_dim, ("embed", "patch"), rngs=rngs, kernel_init=zeros)
        self.repa_proj = (
            Dense(wd, int(options.repa_dim), ("embed", None), rngs=rngs, dtype=dtype)
            if options.repa_dim
            else None
        )
        # float32 maps [P * patch_dim] <-> [N * d], set by data_init and then fixed (Frozen:
        # trained with Adam at the transformers' rate, they lost 1.4 dB of the fitted code's
        # PSNR in 400 steps).
        space, code = self.num_patches * self.patch_dim, self.num_registers * self.fsq.dim
        from vitok.models.frozen import freeze

        linear = options.linear_route
        self.enc_linear = freeze(Dense(space, code, (None, None), rngs=rngs)) if linear else None
        self.dec_linear = freeze(Dense(code, space, (None, None), rngs=rngs)) if linear else None

    def _posemb_param(self, width: int, rngs: nnx.Rngs, options: FlowOptions):
        """A stored patch posemb [P, width] (``posemb="learned"``), or None (sincos)."""
        if options.posemb != "learned":
            return None
        table = nnx.initializers.normal(stddev=0.02)
        return param(rngs, table, (self.num_patches, width), (None, "embed"))

    def _patch_posemb(self, table, width: int, dtype) -> jax.Array:
        """[P, width]: the stored table, or the computed sincos one."""
        if table is not None:
            return table[...].astype(dtype)
        return jnp.asarray(sincos_2d(*self.grid, width)).astype(dtype)

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any],
        *,
        vae: Any = None,
        repa_encoder: Any = None,
        pretrained: dict | None = None,
        rngs: nnx.Rngs,
    ) -> FlexTok:
        """From ``config.model``'s flat keys (``name``, ``vae`` and ``repa_encoder`` aside): the
        compute and option keys fill ``Compute`` and ``FlowOptions``."""
        kwargs = {k: v for k, v in dict(config).items() if k not in ("name", "vae", "repa_encoder")}
        compute = Compute(**{k: kwargs.pop(k) for k in _COMPUTE_KEYS if k in kwargs})
        options = FlowOptions(**{k: kwargs.pop(k) for k in _OPTION_KEYS if k in kwargs})
        kwargs["image_size"] = tuple(kwargs["image_size"])
        if "fsq_levels" in kwargs:
            kwargs["fsq_levels"] = tuple(kwargs["fsq_levels"])
        return cls(
            **kwargs,
            compute=compute,
            options=options,
            vae=vae,
            repa_encoder=repa_encoder,
            pretrained=pretrained,
            rngs=rngs,
        )

    def pretrained_workdirs(self) -> dict[str, str]:
        return self.pretrained

    @property
    def data_init_examples(self) -> int:
        return self.linear_fit_examples if self.enc_linear is not None else 0

    def data_init(self, images: np.ndarray) -> dict:
        """The linear route at the PCA of training ``images`` [M, H, W, C] in [-1, 1]."""
        if self.enc_linear is None:
            return {}
        x0 = np.concatenate([np.asarray(self.to_space(images[i : i + 512])) for i in
                             range(0, len(images), 512)])  # fmt: skip
        return linear_route_init(x0, self.fsq, self.num_registers)

    # --- the Tokenizer interface (vitok.models.base) ---------------------------------------------

    ordered = True
    decode_options = {
        "steps": 25, "guidance": 1.0, "apg": False, "apg_eta": 0.0, "apg_norm_threshold": 2.5
    }  # fmt: skip
    # One unguided Euler step from pure noise is the decoder's estimate of E[x0 | tokens].
    mean_decode_options = {"steps": 1, "guidance": 1.0}

    @property
    def token_shape(self) -> tuple[int]:
        return (self.num_registers,)

    @property
    def codebook_size(self) -> int:
        return self.fsq.codebook_size

    @property
    def decoder_patch(self) -> int:
        """Pixels per decoder patch (the VAE's factor included)."""
        return self.image_size[0] // self.grid[0]

    def repa_target(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, C] -> the frozen encoder's patch features on the decoder's patch grid,
        [B, P, D_enc] float32 (bilinearly resized when the grids differ)."""
        if self.repa_encoder is None:
            raise ValueError("REPA needs model.repa_encoder (a frozen ViT) in the config")
        enc = self.repa_encoder
        x = images.astype(jnp.float32)
        h, w = enc.image_size
        if x.shape[1:3] != (h, w):
            x = jax.image.resize(x, (x.shape[0], h, w, x.shape[3]), "bilinear", antialias=True)
        tokens = enc.tokens(x)
        tokens = tokens[:, 1:] if enc.pool == "cls" else tokens
        gh, gw = enc.grid
        grid = tokens.reshape(tokens.shape[0], gh, gw, -1).astype(jnp.float32)
        if (gh, gw) != self.grid:
            grid = jax.image.resize(grid, (grid.shape[0], *self.grid, grid.shape[-1]), "bilinear")
        return jax.lax.stop_gradient(grid.reshape(grid.shape[0], self.num_patches, -1))

    # --- shapes and spaces ---------------------------------------------------------------------

    def check_images(self, images) -> None:
        check_image_shape(images, self.image_shape, "FlexTok")

    def to_space(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, C] in [-1, 1] -> flow-space patches x0 [B, P, patch_dim] (fp32)."""
        x = images.astype(jnp.float32)
        if self.vae is not None:
            x = jax.lax.stop_gradient(self.vae.encode(x))
        return patchify(x, self.patch_size)

    def from_space(self, x: jax.Array) -> jax.Array:
        """flow-space patches [B, P, patch_dim] -> images [B, H, W, C] (fp32, about [-1, 1])."""
        x = unpatchify(x.astype(jnp.float32), self.grid, self.patch_size)
        return self.vae.decode(x) if self.vae is not None else x

    # --- encoder -------------------------------------------------------------------------------

    def encoder_inputs(self, images: jax.Array) -> tuple[jax.Array, RegisterCausalMask]:
        """images [B, H, W, C] -> (the encoder's input tokens [B, P + N, De] = [patches ;
        registers], its attention mask)."""
        self.check_images(images)
        return self.encoder_inputs_from_space(self.to_space(images))

    def encoder_inputs_from_space(self, x0: jax.Array) -> tuple[jax.Array, RegisterCausalMask]:
        """Flow-space patches x0 [B, P, patch_dim] -> ``encoder_inputs``."""
        x = self.enc_patch_embed(x0)
        x = x + self._patch_posemb(self.enc_posemb, self.enc_width, x.dtype)[None]
        registers = jnp.broadcast_to(
            self.enc_registers[...].astype(x.dtype), (x.shape[0], *self.enc_registers.shape)
        )
        if self.enc_register_mix is not None:
            mix = self.enc_register_mix[...].astype(x.dtype)
            registers = registers + jnp.einsum("np,bpd->bnd", mix, x)
        x = jnp.concatenate([x, registers], axis=1)
        return sharding.constrain(x, ("batch", "length", "embed")), RegisterCausalMask(
            self.num_patches
        )

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images [B, H, W, C] in [-1, 1] -> (codes [B, N, d] float32, ids [B, N] int32).

        ``codes`` carry straight-through gradients to the encoder.
        """
        self.check_images(images)
        return self.encode_space(self.to_space(images))

    def encode_space(self, x0: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Flow-space patches x0 [B, P, patch_dim] (the VAE's latents, patchified) -> ``encode``."""
        x = self.encoder(*self.encoder_inputs_from_space(x0))
        registers = x[:, self.num_patches :]
        if self.fsq_input_norm:
            registers = plain_layer_norm(registers)
        z = self.to_fsq(registers)
        if self.enc_linear is not None:
            linear = self.enc_linear(x0.reshape(x0.shape[0], -1).astype(jnp.float32))
            z = z.astype(jnp.float32) + linear.reshape(z.shape)
        return self.fsq(z)

    def tokenize(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, C] in [-1, 1] -> token ids [B, N] int32, ordered coarse to fine."""
        return self.encode(images)[1]

    # --- decoder -------------------------------------------------------------------------------

    def condition(self, codes: jax.Array, keep: jax.Array) -> jax.Array:
        """codes [B, N, d], keep [B, N] bool -> register tokens [B, N, Dd]; the registers that are
        not kept become the learned mask token (nested dropout). An example with none kept is
        the null condition (``null_condition``: all masked, zeros or the learned null token)."""
        tokens = self.from_fsq(codes)
        mask_token = self.mask_token[...].astype(tokens.dtype)[None]
        posemb = self.dec_register_posemb[...].astype(tokens.dtype)[None]
        if self.mask_posemb:
            tokens = jnp.where(keep[..., None], tokens, mask_token) + posemb
        else:
            tokens = jnp.where(keep[..., None], tokens + posemb, mask_token)
        if self.null_kind == "mask":
            return tokens
        null = (
            jnp.zeros_like(tokens[:1])
            if self.null_token is None
            else jnp.broadcast_to(self.null_token[...].astype(tokens.dtype)[None], tokens[:1].shape)
        )
        return jnp.where(keep.any(axis=1)[:, None, None], tokens, null)

    def linear_estimate(self, codes: jax.Array, keep: jax.Array) -> jax.Array | None:
        """codes [B, N, d], keep [B, N] -> the linear route's clean estimate [B, P, patch_dim]
        float32 from the kept codes alone (None without ``linear_route``)."""
        if self.dec_linear is None:
            return None
        codes = codes.astype(jnp.float32)
        read = jnp.where(keep[..., None], jnp.arctanh(LINEAR_READ * codes), 0.0)
        x0 = self.dec_linear(read.reshape(read.shape[0], -1))
        return x0.reshape(x0.shape[0], self.num_patches, self.patch_dim)

    def velocity(
        self,
        x_t: jax.Array,
        sigma: jax.Array,
        registers: jax.Array,
        linear: jax.Array | None = None,
    ) -> jax.Array:
        """x_t [B, P, patch_dim], sigma [B] in [0, 1], registers [B, N, Dd] (from ``condition``)
        and, with ``linear_route``, linear [B, P, patch_dim] (``linear_estimate`` of the same
        codes and keep) -> predicted velocity (noise - x0) [B, P, patch_dim] float32."""
        h, _ = self._decode(x_t, sigma, registers, repa=False)
        return self._to_velocity(h, x_t, sigma, linear)

    def velocity_and_alignment(
        self,
        x_t: jax.Array,
        sigma: jax.Array,
        registers: jax.Array,
        linear: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """``velocity`` and, in the same pass, REPA's projection of the decoder's hidden patch
        tokens at ``repa_layer`` [B, P, repa_dim] float32 (needs ``repa_dim`` > 0)."""
        if self.repa_proj is None:
            raise ValueError("velocity_and_alignment needs a model built with repa_dim > 0")
        h, hidden = self._decode(x_t, sigma, registers, repa=True)
        aligned = self.repa_proj(hidden[:, self.num_registers :]).astype(jnp.float32)
        return self._to_velocity(h, x_t, sigma, linear), aligned

    def _decode(
        self, x_t: jax.Array, sigma: jax.Array, registers: jax.Array, *, repa: bool
    ) -> tuple[jax.Array, jax.Array | None]:
        """The decoder over [registers; patch tokens of x_t] -> its output tokens [B, N + P, Dd]
        and, when ``repa``, its hidden tokens at ``repa_layer`` (else None)."""
        if self.decoder_patches == "overlap":
            image = unpatchify(x_t.astype(jnp.float32), self.grid, self.patch_size)
            x = self.dec_patch_embed(overlap_patchify(image, self.patch_size).astype(x_t.dtype))
        else:
            x = self.dec_patch_embed(x_t)
        x = x + self._patch_posemb(self.dec_posemb, self.dec_width, x.dtype)[None]
        registers = registers.astype(x.dtype)
        if self.dec_patch_mix is not None:
            x = x + jnp.einsum("pn,bnd->bpd", self.dec_patch_mix[...].astype(x.dtype), registers)
        x = jnp.concatenate([registers, x], axis=1)
        x = sharding.constrain(x, ("batch", "length", "embed"))
        cond = self.time_embed(sigma)
        if self.adaln_registers is not None:
            cond = cond + self.adaln_registers(registers.mean(axis=1)).astype(cond.dtype)
        parts = (self.num_registers, self.num_patches) if self.adaln_parts > 1 else None
        return self.decoder(x, cond, hidden_layer=self.repa_layer if repa else 0, part_sizes=parts)

    def velocity_target(self, x_t, x0, noise, sigma) -> jax.Array:
        """The velocity ``velocity`` is trained to output, [B, P, patch_dim] float32: noise - x0,
        which x0-prediction reaches as (x_t - x0) / sigma, with the same sigma floor."""
        if self.prediction == "velocity":
            return (noise - x0).astype(jnp.float32)
        return (x_t - x0).astype(jnp.float32) / floored_sigma(sigma)[:, None, None]

    def _to_velocity(
        self, h: jax.Array, x_t: jax.Array, sigma: jax.Array, linear: jax.Array | None
    ) -> jax.Array:
        """Decoder output tokens [B, N + P, Dd] (and the linear route's estimate) -> velocity
        [B, P, patch_dim] float32."""
        if (linear is None) != (self.dec_linear is None):
            raise ValueError(
                "a model with linear_route needs the linear_estimate of its codes, and only "
                "such a model takes one"
            )
        out = self.dec_out(h[:, self.num_registers :]).astype(jnp.float32)
        if self.decoder_patches != "disjoint":
            tiles = overlap_unpatchify(out, self.grid, self.patch_size)
            out = patchify(tiles, self.patch_size)
        if self.prediction == "velocity":
            return out
        x_t = x_t.astype(jnp.float32)
        x0 = out
        if self.prediction == "x0_skip":
            skip, scale = skip_coefficients(sigma)
            x0 = skip[:, None, None] * x_t + scale[:, None, None] * out
        if linear is not None:
            x0 = x0 + linear
        # x0-prediction: v = (x_t - x0) / sigma, with sigma floored as the division blows up
        # the error near the data end (the floor's value as in Li & He 2025).
        return (x_t - x0) / floored_sigma(sigma)[:, None, None]

    def sample(self, codes: jax.Array, keep: jax.Array, rng: jax.Array, **options) -> jax.Array:
        """codes [B, N, d], keep [B, N] -> images [B, H, W, C] in [-1, 1] (``sample_space``,
        decoded by the VAE in latent space)."""
        return self.from_space(self.sample_space(codes, keep, rng, **options))

    def sample_space(
        self,
        codes: jax.Array,
        keep: jax.Array,
        rng: jax.Array,
        *,
        steps: int = 25,
        guidance: float = 1.0,
        apg: bool = False,
        apg_eta: float = 0.0,
        apg_norm_threshold: float = 2.5,
        noise: jax.Array | None = None,
    ) -> jax.Array:
        """codes [B, N, d], keep [B, N] -> flow-space patches x0 [B, P, patch_dim] float32.

        Euler integration of dx/dsigma = v from sigma = 1 to 0 in ``steps`` steps (equal steps
        of the unshifted time, see ``time_shift``), all in one ``lax.fori_loop``. ``guidance`` w
        != 1 mixes v = v_null + w (v_cond - v_null), the null condition masking every register;
        ``apg`` applies adaptive projected guidance (Sadat et al. 2024) instead, on the denoised
        estimates or the velocities (``apg_space``, ``apg_momentum``); with ``linear_route`` the
        null condition's linear estimate is the route's bias (no code kept). ``noise`` [B, P,
        patch_dim] replaces the draw from ``rng`` (the starting point at sigma = 1).
        """
        b = codes.shape[0]
        registers = self.condition(codes, keep)
        linear = self.linear_estimate(codes, keep)
        guided = guidance != 1.0
        if guided:
            null = self.condition(codes, jnp.zeros_like(keep))
            registers = jnp.concatenate([registers, null], axis=0)
            if linear is not None:
                null_linear = self.linear_estimate(codes, jnp.zeros_like(keep))
                linear = jnp.concatenate([linear, null_linear], axis=0)
        shape = (b, self.num_patches, self.patch_dim)
        if noise is None:
            noise = jax.random.normal(rng, shape, jnp.float32)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
        sigmas = shift_sigma(jnp.linspace(1.0, 0.0, steps + 1), self.time_shift)

        # The module's state rides in the loop carry and the body rebuilds the module from it:
        # NNX transforms inside the body (scanned layers) cannot use outer-level variables.
        graphdef, state = nnx.split(self)

        def step(i, carry):
            x, running, state = carry
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            x_in = jnp.concatenate([x, x], axis=0) if guided else x
            model = nnx.merge(graphdef, state)
            v = model.velocity(x_in, jnp.full((x_in.shape[0],), sigma), registers, linear)
            if guided:
                v_cond, v_null = v[:b], v[b:]
                if apg and self.apg_space == "velocity":
                    running = (v_cond - v_null) + self.apg_momentum * running
                    v = apg_update(v_cond, running, guidance, apg_eta, apg_norm_threshold)
                elif apg:
                    v = apg_velocity(
                        x, sigma, v_cond, v_null, guidance, apg_eta, apg_norm_threshold
                    )
                else:
                    v = v_null + guidance * (v_cond - v_null)
            return x + (sigma_next - sigma) * v, running, state

        x = noise.astype(jnp.float32)
        x0, _, _ = jax.lax.fori_loop(0, steps, step, (x, jnp.zeros_like(x), state))
        return x0

    def detokenize(
        self, ids: jax.Array, rng: jax.Array, *, steps: int = 25, guidance: float = 1.0, **kw
    ) -> jax.Array:
        """ids [B, k] int32 (1 <= k <= N; PAD_ID past an image's own length) -> images
        [B, H, W, C]: each image decodes from its first tokens, the rest masked."""
        k = ids.shape[1]
        if not 1 <= k <= self.num_registers:
            raise ValueError(f"detokenize takes 1 to {self.num_registers} tokens, got k={k}")
        padded = pad_ids(ids, self.num_registers)
        keep = padded != PAD_ID
        codes = self.fsq.ids_to_codes(jnp.where(keep, padded, 0))
        return self.sample(codes, keep, rng, steps=steps, guidance=guidance, **kw)

    def forward_flops(self) -> float:
        """Matmul FLOPs of one training forward pass for one image (encoder + one decoder call)."""
        length = self.num_patches + self.num_registers
        enc, dec = self.encoder, self.decoder
        we, wd = self.enc_width, self.dec_width
        read_dim = self.dec_patch_embed.kernel.shape[0]  # patch_dim, or 4x with windows
        tile_dim = self.dec_out.kernel.shape[-1]  # patch_dim, or 4x with overlapping tiles
        embed = 2 * self.num_patches * (self.patch_dim * we + (read_dim + tile_dim) * wd)
        matmuls = dict(mlp_matmuls=self.mlp_matmuls)
        encoder = transformer_flops(length, we, enc.depth, enc.mlp_dim, **matmuls)
        decoder = transformer_flops(length, wd, dec.depth, dec.mlp_dim, **matmuls)
        modulation = 2 * wd * wd * (6 * self.adaln_parts * dec.depth + 2)
        mixing = 2 * self.num_patches * self.num_registers * (we + wd)
        mixing *= self.enc_register_mix is not None
        linear = 2 * 2 * self.num_patches * self.patch_dim * self.num_registers * self.fsq.dim
        linear *= self.enc_linear is not None
        return float(embed + encoder + decoder + modulation + mixing + linear)


# The linear route (``linear_route``): its encoder map writes principal component i as
# coefficient / (LINEAR_SCALE * its std) into the FSQ's tanh, so +-1.5 std spans most levels;
# the decoder reads a code back as atanh(LINEAR_READ * code), finite at the outer levels. On the
# tiny preset's crops, the linear code this gives scores 19.7 dB at k = 32 (held-out PSNR with
# the least-squares read-out), 0.5 dB above reading the codes linearly.
LINEAR_SCALE = 1.5
LINEAR_READ = 0.9


def linear_route_init(x0: np.ndarray, fsq: FSQ, num_registers: int) -> dict:
    """Flow-space training images x0 [M, S] -> the linear route's parameters
    {(module, "kernel" | "bias"): array} at their PCA (see ``FlowOptions.linear_route``)."""
    from vitok.evaluators.linear_code import principal_components

    x = x0.reshape(len(x0), -1).astype(np.float64)
    n = num_registers * fsq.dim
    mean, rows = principal_components(x, n)  # signs fixed: every process fits the same maps
    components = rows.T  # [S, n], by decreasing variance
    coefficients = (x - mean) @ components
    scale = LINEAR_SCALE * np.maximum(coefficients.std(axis=0), 1e-8)
    enc_kernel = components / scale
    z = (coefficients / scale).reshape(len(x), num_registers, fsq.dim)
    codes = np.asarray(fsq(jnp.asarray(z, jnp.float32))[0], np.float64)
    read = np.arctanh(LINEAR_READ * codes).reshape(len(x), n)
    design = np.concatenate([read, np.ones((len(x), 1))], axis=1)
    # The least-squares decoder of the images from those codes (a little ridge for stability).
    fit = np.linalg.solve(design.T @ design + 1e-3 * np.eye(n + 1), design.T @ x)
    values = {
        ("enc_linear", "kernel"): enc_kernel,
        ("enc_linear", "bias"): -mean @ enc_kernel,
        ("dec_linear", "kernel"): fit[:-1],
        ("dec_linear", "bias"): fit[-1],
    }
    return {path: value.astype(np.float32) for path, value in values.items()}


X0_SIGMA_FLOOR = 0.05


def floored_sigma(sigma: jax.Array) -> jax.Array:
    """sigma [B] -> max(sigma, X0_SIGMA_FLOOR) float32: the divisor that turns an x0 error into
    a velocity error."""
    return jnp.maximum(sigma.astype(jnp.float32), X0_SIGMA_FLOOR)


SIGMA_DATA = 0.5  # the standard deviation of images in [-1, 1], roughly


def skip_coefficients(sigma: jax.Array) -> tuple[jax.Array, jax.Array]:
    """sigma [B] -> (c_skip, c_out) [B] float32 for x_t = (1 - sigma) x0 + sigma noise: c_skip
    x_t is the MMSE estimate of x0 for Gaussian data of std SIGMA_DATA, and c_out the std of
    what remains, so the network's target has unit scale at every noise level (Karras et al.
    2022, their eq. 7 rewritten for the rectified-flow path)."""
    s = sigma.astype(jnp.float32)
    d2 = SIGMA_DATA**2
    total = (1 - s) ** 2 * d2 + s**2
    return (1 - s) * d2 / total, s * SIGMA_DATA / jnp.sqrt(total)


def dct_basis(grid: tuple[int, int], count: int) -> np.ndarray:
    """The first ``count`` orthonormal 2D DCT-II basis functions over a gh x gw grid, ordered
    coarse to fine (by u + v, then by max(u, v), then u): [count, gh*gw] float32. Rows past the
    gh*gw available ones are zero."""
    gh, gw = grid
    pairs = sorted(
        ((u, v) for u in range(gh) for v in range(gw)), key=lambda t: (sum(t), max(t), t)
    )

    def dct_1d(n: int, u: int) -> np.ndarray:
        scale = np.sqrt((1.0 if u == 0 else 2.0) / n)
        return scale * np.cos(np.pi * (2 * np.arange(n) + 1) * u / (2 * n))

    basis = np.zeros((count, gh * gw), np.float32)
    for row, (u, v) in enumerate(pairs[:count]):
        basis[row] = np.outer(dct_1d(gh, u), dct_1d(gw, v)).reshape(-1)
    return basis


def constant_init(value: np.ndarray):
    """An initializer that returns ``value`` (its shape must match)."""

    def init(key, shape, dtype=jnp.float32):
        if tuple(shape) != value.shape:
            raise ValueError(f"constant init of shape {value.shape} asked for {tuple(shape)}")
        return jnp.asarray(value, dtype)

    return init


def normal_fan_in(fan_in: int):
    """N(0, 1 / fan_in): a mixing matrix that keeps the scale of what it sums (a random linear
    sketch at init, already informative)."""
    return nnx.initializers.normal(stddev=float(fan_in) ** -0.5)


def shift_sigma(sigma: jax.Array, shift: float) -> jax.Array:
    """Monotone map of [0, 1] onto itself that moves noise levels up for shift > 1."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def apg_velocity(x, sigma, v_cond, v_null, scale, eta, norm_threshold):
    """Adaptive projected guidance on the denoised estimates x0 = x - sigma v, per image.

    The guidance difference is clipped to ``norm_threshold`` and split into components parallel
    and orthogonal to the conditional estimate; the parallel one (which oversaturates) is scaled
    by ``eta``. Returns the velocity that leads to the guided x0.
    """
    axes = tuple(range(1, x.ndim))
    x0_cond, x0_null = x - sigma * v_cond, x - sigma * v_null
    diff = x0_cond - x0_null
    norm = jnp.sqrt(jnp.sum(diff**2, axis=axes, keepdims=True))
    diff = diff * jnp.minimum(1.0, norm_threshold / jnp.maximum(norm, 1e-12))
    unit = x0_cond / jnp.maximum(jnp.sqrt(jnp.sum(x0_cond**2, axis=axes, keepdims=True)), 1e-12)
    parallel = jnp.sum(diff * unit, axis=axes, keepdims=True) * unit
    update = (diff - parallel) + eta * parallel
    x0 = x0_cond + (scale - 1.0) * update
    # v = (x - x0) / sigma; at sigma = 0 the step length is zero anyway.
    return (x - x0) / jnp.maximum(sigma, 1e-6)


def apg_update(pred, diff, scale, eta, norm_threshold):
    """Adaptive projected guidance on a prediction itself (FlexTok's release: the velocity),
    per image: the guidance difference ``diff`` [B, ...] clipped to ``norm_threshold``, its
    component parallel to ``pred`` scaled by ``eta``, added (scale - 1) times."""
    axes = tuple(range(1, pred.ndim))
    norm = jnp.sqrt(jnp.sum(diff**2, axis=axes, keepdims=True))
    diff = diff * jnp.minimum(1.0, norm_threshold / jnp.maximum(norm, 1e-12))
    unit = pred / jnp.maximum(jnp.sqrt(jnp.sum(pred**2, axis=axes, keepdims=True)), 1e-12)
    parallel = jnp.sum(diff * unit, axis=axes, keepdims=True) * unit
    return pred + (scale - 1.0) * ((diff - parallel) + eta * parallel)


def keep_mask(counts: jax.Array, num_registers: int) -> jax.Array:
    """counts [B] int -> [B, N] bool, True for the first counts[b] registers."""
    return jnp.arange(num_registers)[None, :] < counts[:, None]


def keep_count_choices(num_registers: int, mode: str) -> np.ndarray:
    """The token counts k that nested dropout samples from: 1..N, or the powers of two up to N
    (plus N itself)."""
    if mode == "uniform":
        return np.arange(1, num_registers + 1)
    if mode == "none":  # every register, always (an ablation: no nested dropout)
        return np.asarray([num_registers])
    if mode == "pow2":
        powers = 2 ** np.arange(int(np.log2(num_registers)) + 1)
        return np.unique(np.append(powers, num_registers))
    raise ValueError(f"nested_dropout must be 'uniform', 'pow2' or 'none', got {mode!r}")


@MODELS.register("flextok")
def build_flextok(config, rngs: nnx.Rngs) -> FlexTok:
    vae_config, repa_config = config.get("vae"), config.get("repa_encoder")
    pretrained, vae, repa_encoder = {}, None, None
    if vae_config is not None and vae_config.get("name"):
        from vitok.models.vae import build_frozen_vae

        vae = build_frozen_vae(vae_config, rngs)
        pretrained["vae"] = vae_config.get("checkpoint", "")
    if repa_config is not None and repa_config.get("name"):
        repa_encoder = build_frozen_encoder(repa_config, rngs)
        pretrained["repa_encoder"] = repa_config.get("checkpoint", "")
    return FlexTok.from_config(
        config, vae=vae, repa_encoder=repa_encoder, pretrained=pretrained, rngs=rngs
    )


def build_frozen_encoder(config, rngs: nnx.Rngs) -> nnx.Module:
    """A frozen ViT (its head dropped) from a model config with a ``checkpoint`` workdir."""
    from vitok.models.frozen import freeze

    model_config = {k: v for k, v in dict(config).items() if k != "checkpoint"}
    model_config["num_classes"] = 0
    return freeze(MODELS.lookup(model_config["name"])(model_config, rngs))
