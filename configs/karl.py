"""KARL single-pass adaptive tokenizer (Duggal et al. 2025).

Presets:
  tiny              pixel-space KARL on 32x32 crops of the scikit-image photos (train and
                    held-out crops from different photos): 64 2D tokens (4x4 patches), up to 32
                    1D tokens, VQ 1024 x 12 (l2-normalised), width-64 encoder and decoder of
                    depth 4, 800 steps; CPU, about 13 minutes. The quality bins and the 0.75
                    halting threshold are the paper's; token_mixing and overlap_out decoder
                    patches are CPU-budget options the paper does not have (FlexTok tiny's).
  karl_small        the paper's released model size on ImageNet 256 (stage 1, "latent
                    distillation pretrain"): encoder and decoder 1024 wide, 8 layers, 8 heads;
                    256 1D tokens; VQ 4096 x 12; budgets 16..368 step 16; AdamW (0.9, 0.95),
                    wd 0.05, lr 1e-4 x 512 / 256, 200 epochs with 20 warmup, grad clip 3.0;
                    RandomResizedCrop(256, 0.8-1) + flip. The base space is the frozen
                    configs/vae.py:imagenet256_f8c16 autoencoder's 32x32x16 latents in 2x2
                    patches (256 2D tokens, as the paper's KL-16 VAE gives): train that preset
                    first and set ``model.base.checkpoint`` to its workdir. TPU/GPU pods, bf16.
  karl_small_continuous   the same with continuous 12-d tokens (the paper's best FID).

    python -m vitok.train --config=configs/karl.py:tiny --workdir=workdirs/karl_tiny
"""

import ml_collections

from vitok.config import (
    adamw_section,
    frozen_kl_vae_section,
    init_from_section,
    mesh_section,
    sharding_section,
    unknown_preset,
)
from vitok.models.karl import HALT_THRESHOLD, QUALITY_BINS


def _transformer(width: int, depth: int, heads: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {"width": width, "depth": depth, "num_heads": heads, "mlp_dim": 4 * width}
    )


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.init_from = init_from_section()
    c.task = "karl"
    c.total_steps = 800
    c.batch_size = 64
    c.log_every = 50
    c.eval_every = 400
    c.checkpoint_every = 400
    c.keep_checkpoints = 3
    c.async_checkpoints = True
    c.peak_flops_per_device = 0.0

    c.model = ml_collections.ConfigDict()
    c.model.name = "karl"
    c.model.image_size = (32, 32)
    c.model.channels = 3
    c.model.patch_size = 4
    c.model.max_tokens = 32
    c.model.encoder = _transformer(64, 4, 4)
    c.model.decoder = _transformer(64, 4, 4)
    c.model.quantizer = "vq"
    c.model.codebook_size = 1024
    c.model.code_dim = 12
    c.model.vq_beta = 0.25
    c.model.quality_bins = QUALITY_BINS
    c.model.halt_threshold = HALT_THRESHOLD
    c.model.halt_hidden = 64
    # CPU-budget options (see vitok.models.karl.KARL); held-out PSNR at 32 tokens after 400
    # steps: 14.0 dB without them (it memorises the eight training photos), 17.8 dB with them.
    c.model.token_mixing = True
    c.model.mixing_init = "dct"
    c.model.decoder_patches = "overlap_out"
    c.model.remat = False
    c.model.scan_layers = False
    c.model.dtype = "float32"
    c.model.base = ml_collections.ConfigDict({"name": ""})  # "": pixel patches

    c.karl = ml_collections.ConfigDict()
    # As the official 16..368 with T_max 256, a third of the draws keep every token.
    c.karl.budgets = tuple(range(1, 48))
    c.karl.phase1_bins = 5
    c.karl.bin_augment = 0.45
    c.karl.recon_loss = "l2"
    c.karl.halt_weight = 1.0

    c.data = ml_collections.ConfigDict()
    c.data.source = "photo_crops"
    c.data.split = "train"
    c.data.crop_size = 32
    c.data.photos = ""
    c.data.pp = "decode(channels=3)|flip_lr|random_hue(30)|value_range(-1, 1)"
    c.data.skip_bad = False
    c.data.num_threads = 4
    c.data.prefetch = 32

    held_out = ml_collections.ConfigDict(
        {
            "source": "photo_crops",
            "split": "test",
            "crop_size": 32,
            "photos": "",
            "num_examples": 256,
            "pp": "decode(channels=3)|value_range(-1, 1)",
            "num_threads": 4,
        }
    )
    c.evals = ml_collections.ConfigDict()
    # Fixed budgets (every image k tokens, the lowest quality bin), beside the linear code.
    c.evals.recon = ml_collections.ConfigDict()
    c.evals.recon.type = "reconstruction"
    c.evals.recon.prefix = "eval"
    c.evals.recon.batch_size = 128
    c.evals.recon.max_examples = 256
    c.evals.recon.token_counts = "pow2"
    c.evals.recon.seed = 0
    c.evals.recon.grid_rows = 8
    c.evals.recon.baseline_examples = 8192
    c.evals.recon.data = held_out
    # Requested qualities: achieved error, share above the request, token counts.
    c.evals.adaptive = ml_collections.ConfigDict()
    c.evals.adaptive.type = "adaptive_length"
    c.evals.adaptive.prefix = "adaptive"
    c.evals.adaptive.batch_size = 128
    c.evals.adaptive.max_examples = 256
    c.evals.adaptive.qualities = (0.03, 0.05, 0.07, 0.09, 0.12, 0.16)
    c.evals.adaptive.grid_rows = 8
    c.evals.adaptive.data = ml_collections.ConfigDict(held_out)

    c.optim = adamw_section(2e-3, b2=0.99, weight_decay=0.01, warmup_steps=100)
    c.mesh = mesh_section()
    c.sharding = sharding_section()
    return c


def tiny() -> ml_collections.ConfigDict:
    return base()


def _karl_small(quantizer: str) -> ml_collections.ConfigDict:
    c = base()
    epoch = 1_281_167 // 512
    c.total_steps = 200 * epoch
    c.batch_size = 512  # 8 GPUs x 64 in the official stage-1 script
    c.log_every = 100
    c.eval_every = 10 * epoch
    c.checkpoint_every = 5000
    c.model.image_size = (256, 256)
    c.model.patch_size = 2  # over the 32x32x16 latents: 256 2D tokens
    c.model.max_tokens = 256
    c.model.encoder = _transformer(1024, 8, 8)
    c.model.decoder = _transformer(1024, 8, 8)
    c.model.quantizer = quantizer
    c.model.codebook_size = 4096
    c.model.code_dim = 12
    c.model.halt_hidden = 512
    c.model.token_mixing = False
    c.model.decoder_patches = "disjoint"
    c.model.scan_layers = True
    c.model.dtype = "bfloat16"
    # The frozen latent space: configs/vae.py:imagenet256_f8c16's model; set its "checkpoint" to
    # the workdir of that run.
    c.model.base = frozen_kl_vae_section(16)
    c.karl.budgets = tuple(range(16, 384, 16))  # official: arange(16, 384, 16)
    c.data = ml_collections.ConfigDict()
    c.data.source = "tfds"
    c.data.name = "imagenet2012"
    c.data.split = "train"
    c.data.data_dir = ""
    c.data.skip_bad = False
    c.data.pp = "decode(channels=3)|resize(292)|random_crop(256)|flip_lr|value_range(-1, 1)"  # the official RandomResizedCrop(256, scale 0.8-1) needs the Inception crop (issue 19)
    c.data.num_threads = 32
    c.data.prefetch = 256
    val = ml_collections.ConfigDict(
        {
            "source": "tfds",
            "name": "imagenet2012",
            "split": "validation",
            "data_dir": "",
            "pp": "decode(channels=3)|resize(256)|central_crop(256)|value_range(-1, 1)",
            "num_threads": 32,
        }
    )
    c.evals.recon.batch_size = 256
    c.evals.recon.max_examples = 10_000
    c.evals.recon.data = val
    c.evals.adaptive.batch_size = 256
    c.evals.adaptive.max_examples = 10_000
    c.evals.adaptive.qualities = (0.03, 0.05, 0.07, 0.09, 0.11)
    c.evals.adaptive.data = ml_collections.ConfigDict(val)
    # lr = blr 1e-4 x 512 / 256; 20 warmup epochs, cosine to 0; grad clip 3.0.
    c.optim = adamw_section(
        2e-4, b2=0.95, weight_decay=0.05, warmup_steps=20 * epoch, clip_norm=3.0
    )
    c.mesh = mesh_section(data=1, fsdp=-1)
    return c


def _continuous(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    c.evals.recon.baseline_examples = 0  # no codebook: no bit budget for the linear code
    return c


PRESETS = {
    "tiny": tiny,
    "karl_small": lambda: _karl_small("vq"),
    "karl_small_continuous": lambda: _continuous(_karl_small("continuous")),
}


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    if preset not in PRESETS:
        raise unknown_preset("karl", preset, PRESETS)
    return PRESETS[preset]()
