"""SD-style KL autoencoders, the latent spaces of FlexTok's full-scale presets.

Presets:
  tiny          f4, 4 latent channels on 32x32 crops of the scikit-image photos; CPU, minutes.
  tiny_vq       a VQ autoencoder (LlamaGen's layout and objective) at that size, 8x8 codes.
  imagenet256_f8c4 / _f8c8 / _f8c16
                f8 autoencoders (channel mults 1,2,4,4; 2 ResBlocks per level; base width 128)
                with 4/8/16 latent channels on ImageNet 256; TPU/GPU pods. FlexTok's presets
                use the c16 one (point ``model.vae.checkpoint`` at its workdir).
  mnist_fsq     FSQ autoencoder, digits -> 7x7 codes (256-entry codebook): the 2D token source
                of the NAR / raster AR digits presets (configs/nar.py); CPU, minutes.
  imagenet256_fsq16
                FSQ autoencoder, ImageNet 256 -> 16x16 codes, 16,384-entry codebook (f16).
  llamagen_vq16 / llamagen_vq8
                LlamaGen's VQ-16 / VQ-8 (the released tokenizers load into them).

    python -m vitok.train --config=configs/vae.py:tiny --workdir=workdirs/vae_tiny
"""

import ml_collections

from vitok.config import (
    adamw_section,
    init_from_section,
    mesh_section,
    sharding_section,
    unknown_preset,
)


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.init_from = init_from_section()  # workdir of a run to start from (fine-tuning)
    c.task = "vae"
    c.total_steps = 1000
    c.batch_size = 32
    c.log_every = 50
    c.eval_every = 500
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.async_checkpoints = True
    c.peak_flops_per_device = 0.0

    c.model = ml_collections.ConfigDict()
    c.model.name = "vae"
    c.model.image_size = (32, 32)
    c.model.channels = 3
    c.model.latent_channels = 4
    c.model.width = 32
    c.model.mults = (1, 2, 2)
    c.model.blocks = 1
    c.model.latent_scale = 1.0
    c.model.dtype = "float32"

    c.vae = ml_collections.ConfigDict({"loss": "l1", "kl_weight": 1e-4})

    c.data = ml_collections.ConfigDict()
    c.data.source = "photo_crops"
    c.data.split = "train"
    c.data.crop_size = 32
    c.data.pp = "decode(channels=3)|flip_lr|value_range(-1, 1)"
    c.data.skip_bad = False
    c.data.num_threads = 4
    c.data.prefetch = 32

    c.evals = ml_collections.ConfigDict()
    c.evals.recon = ml_collections.ConfigDict()
    c.evals.recon.type = "autoencoder"
    c.evals.recon.prefix = "eval"
    c.evals.recon.batch_size = 128
    c.evals.recon.max_examples = 256
    c.evals.recon.grid_rows = 8
    c.evals.recon.data = ml_collections.ConfigDict()
    c.evals.recon.data.source = "photo_crops"
    c.evals.recon.data.split = "test"
    c.evals.recon.data.crop_size = 32
    c.evals.recon.data.num_examples = 256
    c.evals.recon.data.pp = "decode(channels=3)|value_range(-1, 1)"
    c.evals.recon.data.num_threads = 4

    c.optim = adamw_section(1e-3, b2=0.99, weight_decay=0.0, warmup_steps=100)
    c.mesh = mesh_section()  # data parallel over every device
    c.sharding = sharding_section()
    return c


def tiny() -> ml_collections.ConfigDict:
    return base()


def _imagenet256_f8(latent_channels: int) -> ml_collections.ConfigDict:
    c = base()
    c.total_steps = 500_000
    c.batch_size = 256
    c.log_every = 100
    c.eval_every = 10_000
    c.checkpoint_every = 5000
    c.model.image_size = (256, 256)
    c.model.latent_channels = latent_channels
    c.model.width = 128
    c.model.mults = (1, 2, 4, 4)
    c.model.blocks = 2
    c.model.dtype = "bfloat16"
    c.vae.kl_weight = 1e-6
    c.data = ml_collections.ConfigDict()  # a fresh section: no photo_crops keys left behind
    c.data.source = "tfds"
    c.data.name = "imagenet2012"
    c.data.split = "train"
    c.data.data_dir = ""
    c.data.skip_bad = False
    c.data.pp = "decode(channels=3)|resize(256)|random_crop(256)|flip_lr|value_range(-1, 1)"
    c.data.num_threads = 32
    c.data.prefetch = 256
    c.evals.recon.data = ml_collections.ConfigDict(
        {
            "source": "tfds",
            "name": "imagenet2012",
            "split": "validation",
            "data_dir": "",
            "pp": "decode(channels=3)|resize(256)|central_crop(256)|value_range(-1, 1)",
            "num_threads": 32,
        }
    )
    c.evals.recon.max_examples = 10_000
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 5000
    c.optim.ema_decay = 0.9999
    c.mesh = mesh_section(data=1, fsdp=-1)
    return c


def _fsq(c: ml_collections.ConfigDict, levels: tuple[int, ...]) -> ml_collections.ConfigDict:
    """Turns a KL preset into an FSQ autoencoder (discrete codes for the generators)."""
    c.task = "fsq_ae"
    c.model.name = "fsq_ae"
    c.model.levels = levels
    del c.model.latent_channels
    del c.model.latent_scale
    del c.vae.kl_weight
    c.vae.loss = "l2"
    c.vae.latent_penalty = 0.1
    return c


def mnist_fsq() -> ml_collections.ConfigDict:
    """28x28 digits -> 7x7 codes from a 256-entry FSQ codebook (8 x 8 x 4) with a small ViT
    tokenizer over 4x4 patches (convolutions at 28x28 take ~2 s a step on 2 CPU cores); CPU,
    minutes. The 2D token source of configs/nar.py's digits presets."""
    c = _fsq(base(), (8, 8, 4))
    c.total_steps = 1200
    c.batch_size = 64
    c.eval_every = 600
    c.optim.lr = 3e-4
    c.model = ml_collections.ConfigDict(
        {
            "name": "fsq_vit",
            "image_size": (28, 28),
            "channels": 1,
            "patch_size": 4,
            "levels": (8, 8, 4),
            "width": 128,
            "depth": 2,
            "num_heads": 4,
            "dtype": "float32",
        }
    )
    c.data.source = "mnist5k"
    c.data.num_threads = 0  # in-memory digits: threads only contend (see configs/vit.py)
    c.data.pp = "decode(channels=1)|value_range(-1, 1)"
    del c.data.crop_size
    c.evals.recon.data = ml_collections.ConfigDict(
        {"source": "mnist5k", "split": "test", "pp": "decode(channels=1)|value_range(-1, 1)",
         "num_threads": 0}
    )  # fmt: skip
    c.evals.recon.max_examples = 1000
    return c


def imagenet256_fsq16() -> ml_collections.ConfigDict:
    """ImageNet 256 -> 16x16 codes from a 16,384-entry FSQ codebook (8, 8, 8, 8, 4): the grid
    and codebook size of LlamaGen's VQ-16, the tokenizer NAR's ImageNet results use."""
    c = _fsq(_imagenet256_f8(4), (8, 8, 8, 8, 4))
    c.model.mults = (1, 1, 2, 2, 4)
    return c


def tiny_vq() -> ml_collections.ConfigDict:
    """``llamagen_vq``'s model and objective at the tiny preset's size: 32x32 photo crops ->
    8x8 codes of a 256-entry L2-normalized codebook; CPU, minutes."""
    c = base()
    c.task = "vq_ae"
    c.model = ml_collections.ConfigDict(
        {"name": "vq_ae", "image_size": (32, 32), "channels": 3, "width": 32, "mults": (1, 2, 2),
         "blocks": 1, "z_channels": 32, "codebook_size": 256, "codebook_dim": 8,
         "l2_normalize": True, "dtype": "float32"}
    )  # fmt: skip
    c.vae = ml_collections.ConfigDict({"loss": "l2", "commit_weight": 0.25})
    return c


def llamagen_vq(mults: tuple[int, ...]) -> ml_collections.ConfigDict:
    """LlamaGen's VQ tokenizers (Sun et al. 2024): VQ-16 = mults (1, 1, 2, 2, 4), 256px ->
    16x16 codes, 72M params; VQ-8 = (1, 2, 2, 4), 32x32 codes. 16,384 L2-normalized 8-dim
    codebook entries, base width 128, 2 ResBlocks per level, z 256, attention after every
    ResBlock of the lowest level. Their released ``vq_ds16_c2i.pt`` / ``vq_ds8_c2i.pt`` convert
    into this model (``vitok.tools.convert --from=llamagen_vq``); NAR's ImageNet generators
    model VQ-16's codes. Training here differs from theirs: a pixel loss with the codebook and
    commitment terms only (no perceptual or GAN loss) and this file's f8 optimizer recipe."""
    c = _imagenet256_f8(4)
    c.task = "vq_ae"
    c.model = ml_collections.ConfigDict(
        {"name": "vq_ae", "image_size": (256, 256), "channels": 3, "width": 128,
         "mults": tuple(mults), "blocks": 2, "z_channels": 256, "codebook_size": 16384,
         "codebook_dim": 8, "l2_normalize": True, "dtype": "bfloat16"}
    )  # fmt: skip
    c.vae = ml_collections.ConfigDict({"loss": "l2", "commit_weight": 0.25})
    return c


PRESETS = {
    "tiny": tiny,
    "tiny_vq": tiny_vq,
    "llamagen_vq16": lambda: llamagen_vq((1, 1, 2, 2, 4)),
    "llamagen_vq8": lambda: llamagen_vq((1, 2, 2, 4)),
    "mnist_fsq": mnist_fsq,
    "imagenet256_fsq16": imagenet256_fsq16,
    "imagenet256_f8c4": lambda: _imagenet256_f8(4),
    "imagenet256_f8c8": lambda: _imagenet256_f8(8),
    "imagenet256_f8c16": lambda: _imagenet256_f8(16),
}


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    if preset not in PRESETS:
        raise unknown_preset("vae", preset, PRESETS)
    return PRESETS[preset]()
