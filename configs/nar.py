"""Token generators: NAR (He et al. 2025, next-neighbour decoding) and the raster AR baseline on
the same backbone, trained on pre-extracted 2D codes.

Presets:
  digits_nar / digits_raster
        class-conditional NAR / raster AR over the 7x7 codes (256-entry FSQ codebook) of the
        embedded MNIST-5k digits; CPU, minutes. experiments/nar/run.py builds what they read:
        the tokenizer (configs/vae.py:mnist_fsq), the codes (vitok.tools.extract_codes) and a
        ViT classifier that judges the samples.
  photos_flextok_gpt
        a GPT (raster AR on a 1D grid) over the 32 coarse-to-fine tokens of FlexTok tiny
        (configs/flextok.py:tiny), conditioned on which of its 11 training photos a crop comes
        from; samples any first k tokens and decodes them with FlexTok's flow decoder.
  imagenet256_flextok_gpt_{b,l}
        the same over the 256 tokens of configs/flextok.py:imagenet256_d18 (64,000 codes).
  imagenet256_nar_{b,m,l,xl} / imagenet256_raster_{b,l,xl}
        the paper's NAR-B/M/L/XL and LlamaGen-B/L/XL shapes on 16x16 ImageNet-256 codes with a
        16,384-entry codebook (LlamaGen's VQ-16 converted, configs/vae.py:llamagen_vq16; or an
        imagenet256_fsq16 run), class dropout 0.1, AdamW
        (0.9, 0.95), lr 1e-4, wd 0.05, clip 1.0, batch 256, 300 epochs; NAR's lr steps x0.2 at
        50/67/83% of training, raster keeps it constant (as LlamaGen); TPU/GPU pods.

    python -m vitok.train --config=configs/nar.py:digits_nar --workdir=workdirs/nar_digits/nar

Backbone: the ImageNet presets are the papers' models, LlamaGen's LLaMA blocks (RMSNorm,
SwiGLU of width 8D/3 rounded up to 256, no biases) with its 2D RoPE; NAR-B has 130M parameters,
LlamaGen-B 111M, and the released checkpoints convert into them (``vitok.tools.convert
--from=nar`` / ``--from=llamagen_gpt``). The GPTs over FlexTok's 1D tokens keep that block with a
learned position embedding (no grid for a 2D RoPE). The CPU presets (digits_*,
photos_flextok_gpt) use pre-LayerNorm GELU blocks with a learned position embedding.
"""

import ml_collections

from vitok.config import (
    adamw_section,
    init_from_section,
    mesh_section,
    sharding_section,
    unknown_preset,
)
from vitok.data.sources import PHOTO_SPLITS
from vitok.nn.layers import swiglu_hidden

DIGITS_ROOT = "workdirs/nar_digits"
IMAGENET_EPOCH_STEPS = 1_281_167 // 256


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.init_from = init_from_section()  # workdir of a run to start from (fine-tuning)
    c.task = "generation"
    c.total_steps = 2000  # ~0.4 s a step on 2 CPU cores: ~14 minutes per generator
    c.batch_size = 64
    c.log_every = 50
    c.eval_every = 1000
    c.checkpoint_every = 1000
    c.keep_checkpoints = 2
    c.async_checkpoints = True
    c.peak_flops_per_device = 0.0

    c.model = ml_collections.ConfigDict()
    c.model.name = "nar"  # "ar": raster order on the same backbone
    c.model.grid = (7, 7)
    c.model.vocab_size = 256
    c.model.num_classes = 10
    c.model.width = 64
    c.model.depth = 4
    c.model.num_heads = 4
    c.model.mlp_dim = 256
    c.model.dropout = 0.1
    c.model.attention_backend = "dense"
    c.model.remat = False
    c.model.scan_layers = False
    c.model.dtype = "float32"

    c.generation = ml_collections.ConfigDict({"class_dropout": 0.1})

    c.data = ml_collections.ConfigDict()
    c.data.source = "codes"
    c.data.path = f"{DIGITS_ROOT}/codes/mnist_{{split}}.npz"
    c.data.split = "train"
    c.data.pp = ""
    c.data.skip_bad = False
    c.data.num_threads = 2
    c.data.prefetch = 16

    c.evals = ml_collections.ConfigDict()
    c.evals.samples = ml_collections.ConfigDict()
    c.evals.samples.type = "generation"
    c.evals.samples.prefix = "samples"
    c.evals.samples.tokenizer_workdir = f"{DIGITS_ROOT}/tokenizer"
    c.evals.samples.classifier_workdir = f"{DIGITS_ROOT}/classifier"
    c.evals.samples.classifier_range = (0.0, 1.0)
    c.evals.samples.samples_per_class = 100
    c.evals.samples.batch_size = 100
    c.evals.samples.temperature = 1.0
    c.evals.samples.top_k = 0
    c.evals.samples.top_p = 1.0
    c.evals.samples.cfg_scale = 2.0
    c.evals.samples.data = ml_collections.ConfigDict(
        {"source": "mnist5k", "split": "test", "pp": "decode(channels=1)|value_range(-1, 1)"}
    )

    c.optim = adamw_section(1e-3, b2=0.95, weight_decay=0.05, warmup_steps=100)
    c.mesh = mesh_section()  # data parallel over every device
    c.sharding = sharding_section()
    return c


def digits_nar() -> ml_collections.ConfigDict:
    return base()


def digits_raster() -> ml_collections.ConfigDict:
    c = base()
    c.model.name = "ar"
    return c


def flextok_tiny_split() -> str:
    """The photo_crops split configs/flextok.py:tiny trains on (its codes' labels index it)."""
    from configs import flextok

    return flextok.get_config("tiny").data.split


def photos_flextok_gpt() -> ml_collections.ConfigDict:
    c = base()
    c.model.name = "ar"
    c.model.grid = (32,)
    c.model.vocab_size = 8 * 5 * 5 * 5  # FlexTok tiny's FSQ levels (8, 5, 5, 5)
    c.model.num_classes = len(PHOTO_SPLITS[flextok_tiny_split()])  # the label: a crop's photo
    c.data.path = "workdirs/flextok_gpt/codes/photos_{split}.npz"
    s = c.evals.samples
    s.tokenizer_workdir = "workdirs/flextok_tiny"
    s.classifier_workdir = ""
    s.num_tokens = 0  # 0: all 32; k: the first k, coarse to fine
    s.decode_steps = 10
    s.samples_per_class = 8
    s.batch_size = 64
    s.grid_columns = 8
    return c


# (width, depth, heads) of the paper's models; NAR adds one extra block and a second head.
SIZES = {"b": (768, 12, 12), "m": (1024, 18, 16), "l": (1024, 24, 16), "xl": (1280, 36, 20)}


def _imagenet256(name: str, size: str) -> ml_collections.ConfigDict:
    c = base()
    width, depth, heads = SIZES[size]
    c.total_steps = 300 * IMAGENET_EPOCH_STEPS
    c.batch_size = 256
    c.log_every = 100
    c.eval_every = 50 * IMAGENET_EPOCH_STEPS
    c.checkpoint_every = 5000
    c.model.name = name
    c.model.grid = (16, 16)
    c.model.vocab_size = 16384
    c.model.num_classes = 1000
    c.model.width, c.model.depth, c.model.num_heads = width, depth, heads
    # LlamaGen's block (NAR's too): RMSNorm, SwiGLU, no biases, 2D RoPE.
    c.model.norm, c.model.mlp, c.model.use_bias, c.model.posemb = "rms", "swiglu", False, "rope2d"
    c.model.mlp_dim = swiglu_hidden(width)
    c.model.scan_layers = True
    c.model.dtype = "bfloat16"
    c.data.path = "codes/imagenet256_{split}.npz"  # vitok.tools.extract_codes --flip
    c.data.num_threads = 16
    c.data.prefetch = 64
    s = c.evals.samples
    # The paper's tokenizer: LlamaGen's VQ-16 converted (README "Using the released models");
    # an imagenet256_fsq16 run of configs/vae.py has the same grid and codebook size.
    s.tokenizer_workdir = "workdirs/llamagen_vq16"
    s.classifier_workdir = ""  # a ViT ImageNet classifier run gives accuracy and feature FID
    s.inception_weights = ""  # pytorch-fid's .pth: the standard FID and IS
    s.fid_reference = ""  # ADM's VIRTUAL_imagenet256_labeled.npz (the papers' reference batch)
    s.samples_per_class = 50
    s.batch_size = 250
    s.data = ml_collections.ConfigDict(
        {
            "source": "tfds",
            "name": "imagenet2012",
            "split": "validation",
            "data_dir": "",
            "pp": "decode(channels=3)|resize(256)|central_crop(256)|value_range(-1, 1)",
        }
    )
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 0
    c.optim.schedule = "step" if name == "nar" else "constant"
    c.mesh = mesh_section(data=1, fsdp=-1)
    return c


def _imagenet256_flextok_gpt(size: str) -> ml_collections.ConfigDict:
    c = _imagenet256("ar", size)
    c.model.grid = (256,)
    c.model.vocab_size = 8 * 8 * 8 * 5 * 5 * 5  # FlexTok d18's FSQ codebook: 64,000
    c.model.posemb = "learned"  # 1D ordered tokens: no grid for a 2D RoPE
    c.data.path = "codes/imagenet256_flextok_d18_{split}.npz"
    c.evals.samples.tokenizer_workdir = "workdirs/flextok_imagenet256_d18"
    c.evals.samples.decode_steps = 25
    return c


PRESETS = {
    "digits_nar": digits_nar,
    "digits_raster": digits_raster,
    "photos_flextok_gpt": photos_flextok_gpt,
    "imagenet256_flextok_gpt_b": lambda: _imagenet256_flextok_gpt("b"),
    "imagenet256_flextok_gpt_l": lambda: _imagenet256_flextok_gpt("l"),
    **{f"imagenet256_nar_{s}": (lambda s=s: _imagenet256("nar", s)) for s in SIZES},
    **{f"imagenet256_raster_{s}": (lambda s=s: _imagenet256("ar", s)) for s in ("b", "l", "xl")},
}


def get_config(preset: str = "digits_nar") -> ml_collections.ConfigDict:
    if preset not in PRESETS:
        raise unknown_preset("nar", preset, PRESETS)
    return PRESETS[preset]()
