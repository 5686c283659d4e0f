"""ViT classification.

Presets:
  tiny      ViT on the 5,000 embedded MNIST digits (4,000 train / 1,000 held out); CPU, minutes.
  tiny_flexi   FlexiViT on the digits: one set of weights trained at patch sizes 2, 4 and 7
            (one sampled per step), evaluated at each.
  tiny_seg  decoder-free segmentation of the digits (background + 10 digit classes per pixel)
            with a linear per-token head; mIoU on held-out digits.
  i1k_b16   ViT-B/16 on ImageNet-1k (tfds imagenet2012), 300 epochs at batch 4096 with DeiT's
            augmentation and regularisation (Touvron et al. 2021, Table 9: Inception crop,
            flip, RandAugment m9-mstd0.5, random erasing 0.25, Mixup 0.8, CutMix 1.0, label
            smoothing 0.1, drop path 0.1, repeated augmentation 3x); TPU/GPU pods, bf16,
            FSDP. Should reach DeiT-B's 81.8 top-1 (its batch is 1024).
  flexivit_i1k   FlexiViT-B as released by big_vision (240 px, any patch size 8-48), for
            converted checkpoints: python -m vitok.tools.convert --from=flexivit ...
  tiny_rgb, tiny_recipe   the digits in three channels, without and with the same recipe
            (no flip for digits, crop area 0.35-1): experiments/recipes/digits.py.

    python -m vitok.train --config=configs/vit.py:tiny --workdir=/tmp/vit_tiny
"""

import ml_collections

from vitok.config import (
    adamw_section,
    init_from_section,
    mesh_section,
    sharding_section,
    unknown_preset,
)

# DeiT's training transform (timm's create_transform: RandomResizedCrop, flip,
# rand-m9-mstd0.5-inc1, normalise, RandomErasing 0.25 "pixel"; here the erasing noise is on the
# [-1, 1] scale) and evaluation's resize to size / 0.875 and centre crop.
DEIT_TRAIN_PP = (
    "inception_crop({size})|flip_lr|rand_augment(2, 9, magnitude_std=0.5)|value_range(-1, 1)"
    "|random_erasing(0.25)"
)
DEIT_EVAL_PP = "decode(channels=3)|resize_center_crop({size}, crop_ratio=0.875)|value_range(-1, 1)"


def deit_regularisation(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """DeiT-B's (Touvron et al. 2021, Table 9): stochastic depth 0.1, Mixup 0.8 and CutMix 1.0
    on every batch (switch 0.5), label smoothing 0.1, repeated augmentation 3x."""
    c.model.drop_path_rate = 0.1
    c.data.repeated_augmentation = 3
    c.mixup = ml_collections.ConfigDict(
        {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "prob": 1.0, "switch_prob": 0.5}
    )
    c.label_smoothing = 0.1
    return c


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.init_from = init_from_section()  # workdir of a run to start from (fine-tuning)
    c.task = "classification"
    c.total_steps = 1000
    c.batch_size = 128
    c.log_every = 50
    c.eval_every = 200
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.async_checkpoints = True
    c.peak_flops_per_device = 0.0  # 0: measure a matmul at start-up
    c.label_smoothing = 0.0
    # Batch Mixup / CutMix with mixed labels (vitok.tasks.mixing); alphas 0: off.
    c.mixup = ml_collections.ConfigDict(
        {"mixup_alpha": 0.0, "cutmix_alpha": 0.0, "prob": 1.0, "switch_prob": 0.5}
    )

    c.model = ml_collections.ConfigDict()
    c.model.name = "vit"
    c.model.image_size = (28, 28)
    c.model.channels = 1
    c.model.patch_size = 4
    c.model.width = 64
    c.model.depth = 4
    c.model.mlp_dim = 128
    c.model.num_heads = 4
    c.model.num_classes = 10
    c.model.dense_classes = 0  # > 0: a per-token segmentation head (ViT.dense)
    c.model.posemb = "sincos2d"
    c.model.pool = "cls"
    # Where the weights are stored, apart from the native patch size (FlexiViT's layout):
    c.model.kernel_size = 0  # stored patch-kernel size; 0: the native patch size
    c.model.posemb_grid = ()  # stored learned posemb grid; (): the native token grid
    c.model.kernel_resize = "antialias"  # or "bilinear": big_vision's PI-resize
    c.model.dropout = 0.0
    c.model.drop_path_rate = 0.0  # stochastic depth, 0 at the first block to this at the last
    c.model.attention_backend = "dense"
    c.model.remat = False
    c.model.scan_layers = False
    c.model.dtype = "float32"

    c.flexivit = ml_collections.ConfigDict()
    c.flexivit.patch_sizes = ()  # e.g. (2, 4, 7): one drawn per step; (): the native size

    c.data = ml_collections.ConfigDict()
    c.data.source = "mnist5k"
    c.data.split = "train"
    c.data.pp = "decode(channels=1)|resize(32)|random_crop(28)|value_range(0, 1)"
    c.data.skip_bad = False
    # In-memory digits: per-example numpy work holds the GIL, so reader threads only contend
    # (digits_p14 on the 2-core CPU: 24 steps/s with 4 threads, 40 with none). Photo crops,
    # whose PIL resizes release the GIL, and file-backed datasets do gain from threads.
    c.data.num_threads = 0
    c.data.prefetch = 32
    c.data.repeated_augmentation = 1  # DeiT's 3x in deit_regularisation

    c.evals = ml_collections.ConfigDict()
    c.evals.test = ml_collections.ConfigDict()
    c.evals.test.type = "classification"
    c.evals.test.prefix = "eval"
    c.evals.test.batch_size = 256
    c.evals.test.max_examples = 0  # 0: the whole split
    c.evals.test.data = ml_collections.ConfigDict()
    c.evals.test.data.source = "mnist5k"
    c.evals.test.data.split = "test"
    c.evals.test.data.pp = "decode(channels=1)|resize(32)|central_crop(28)|value_range(0, 1)"
    c.evals.test.data.num_threads = 0

    c.optim = adamw_section(2e-3, b2=0.999, weight_decay=0.05, warmup_steps=100)
    c.mesh = mesh_section()  # data parallel over every device
    c.sharding = sharding_section()
    return c


def tiny() -> ml_collections.ConfigDict:
    return base()


def tiny_flexi() -> ml_collections.ConfigDict:
    c = base()
    c.model.patch_size = 4  # the stored kernel's size; other sizes are PI-resized from it
    c.flexivit.patch_sizes = (2, 4, 7)
    test = c.evals.test
    del c.evals["test"]
    for p in c.flexivit.patch_sizes:
        ev = ml_collections.ConfigDict(test.to_dict())
        ev.prefix = f"eval_p{p}"
        ev.patch_size = p
        c.evals[f"test_p{p}"] = ev
    return c


def as_segmentation(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A digits classification config turned into decoder-free digit segmentation: the task,
    the per-token head (background + digits 0..9), GAP pooling, the labelling op, the
    evaluator; the classification keys go (the per-pixel loss reads neither)."""
    with c.unlocked():
        c.task = "segmentation"
        del c.label_smoothing, c.mixup
        c.model.num_classes = 0
        c.model.dense_classes = 11  # background + digits 0..9
        c.model.pool = "gap"
        c.data.pp = "decode(channels=1)|digit_segmentation(0.5)|value_range(0, 1)"
        c.evals.test.type = "segmentation"
        c.evals.test.data.pp = c.data.pp
    return c


def tiny_seg() -> ml_collections.ConfigDict:
    c = as_segmentation(base())
    c.total_steps = 600
    return c


def i1k_b16() -> ml_collections.ConfigDict:
    c = deit_regularisation(base())
    c.total_steps = 300 * 1_281_167 // 4096
    c.batch_size = 4096
    c.log_every = 100
    c.eval_every = 2500
    c.checkpoint_every = 2500
    c.peak_flops_per_device = 0.0
    c.model.image_size = (224, 224)
    c.model.channels = 3
    c.model.patch_size = 16
    c.model.width, c.model.depth, c.model.mlp_dim, c.model.num_heads = 768, 12, 3072, 12
    c.model.num_classes = 1000
    c.model.posemb = "learn"
    c.model.dropout = 0.0
    c.model.dtype = "bfloat16"
    c.model.scan_layers = True
    c.data.source = "tfds"
    c.data.name = "imagenet2012"
    c.data.split = "train"
    c.data.data_dir = ""
    c.data.encoded = True  # JPEG bytes: inception_crop decodes only the crop, at reduced scale
    c.data.pp = DEIT_TRAIN_PP.format(size=224)
    c.data.num_threads = 32
    c.data.prefetch = 256
    c.evals.test.data.source = "tfds"
    c.evals.test.data.name = "imagenet2012"
    c.evals.test.data.split = "validation"
    c.evals.test.data.data_dir = ""
    c.evals.test.data.encoded = True
    c.evals.test.data.pp = DEIT_EVAL_PP.format(size=224)
    c.evals.test.batch_size = 1024
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 10_000
    c.optim.weight_decay = 0.05
    c.optim.b2 = 0.999
    c.optim.ema_decay = 0.0
    c.mesh = mesh_section(data=1, fsdp=-1)
    return c


def flexivit_i1k() -> ml_collections.ConfigDict:
    """FlexiViT-B as big_vision released it (Beyer et al. 2023): 240 px, a 32x32 stored kernel
    and a 7x7 stored position embedding resized to every patch size (big_vision's bilinear
    PI-resize), class token; evaluated on ImageNet-1k validation at patch sizes 8, 16 and 30
    (30x30, 15x15 and 8x8 tokens) with big_vision's resize(274) | central_crop(240) |
    value_range(-1, 1) (a bicubic PIL resize here, bilinear TF there). ``vitok.tools.convert
    --from=flexivit`` fills the model's sizes in from the checkpoint it converts."""
    c = i1k_b16()
    c.model.image_size = (240, 240)
    c.model.patch_size = 16
    c.model.kernel_size = 32
    c.model.posemb_grid = (7, 7)
    c.model.kernel_resize = "bilinear"
    c.model.drop_path_rate = 0.0
    c.model.scan_layers = False
    c.evals.test.data.pp = (
        "decode(channels=3)|resize((274, 274))|central_crop(240)|value_range(-1, 1)"
    )
    for patch in (8, 30):
        c.evals[f"test_p{patch}"] = ml_collections.ConfigDict(c.evals.test.to_dict())
        c.evals[f"test_p{patch}"].prefix = f"eval_p{patch}"
        c.evals[f"test_p{patch}"].patch_size = patch
    return c


def tiny_rgb() -> ml_collections.ConfigDict:
    """``tiny`` with the digits in three channels: the baseline of ``tiny_recipe``."""
    c = base()
    c.model.channels = 3
    c.data.pp = "decode(channels=3)|resize(32)|random_crop(28)|value_range(0, 1)"
    c.evals.test.data.pp = "decode(channels=3)|resize(32)|central_crop(28)|value_range(0, 1)"
    return c


def tiny_recipe() -> ml_collections.ConfigDict:
    """``tiny_rgb`` with DeiT's augmentation and regularisation, adapted to digits: no flip (it
    changes a digit), an Inception crop of area 0.35-1 (0.08 leaves too little of a digit), no
    repeated augmentation (it would cut the distinct digits per step to a third, and at the
    1,000 steps of experiments/recipes the recipe already underfits)."""
    c = deit_regularisation(tiny_rgb())
    c.data.repeated_augmentation = 1
    c.data.pp = (
        "decode(channels=3)|inception_crop(28, area=(0.35, 1.0))"
        "|rand_augment(2, 9, magnitude_std=0.5)|value_range(0, 1)|random_erasing(0.25)"
    )
    return c


PRESETS = {
    "tiny": tiny, "tiny_flexi": tiny_flexi, "tiny_seg": tiny_seg, "i1k_b16": i1k_b16,
    "flexivit_i1k": flexivit_i1k, "tiny_rgb": tiny_rgb, "tiny_recipe": tiny_recipe,
}  # fmt: skip


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    if preset not in PRESETS:
        raise unknown_preset("vit", preset, PRESETS)
    return PRESETS[preset]()
