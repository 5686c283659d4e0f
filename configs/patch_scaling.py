"""Patch-size scaling (Wang et al. 2025, "An Image Is Worth 50,176 Tokens"): one recipe, many
patch sizes, down to 1x1 pixel tokens.

Presets (P is the patch size):
  digits_pP        ViT (width 64, depth 4) classifying the embedded 28x28 MNIST digits at patch
                   P in {14, 7, 4, 2, 1}; the CPU study (experiments/patch_scaling/run.py).
  digits_seg_pP    the same ViT with the decoder-free per-token head segmenting the digits
                   (background + 10 classes per pixel), scored by mIoU.
  digits_fg_pP     the same, foreground vs background only (2 classes): how finely the
                   per-token head can draw the stroke at each patch size.
  photos_pP        the same ViT telling which of 7 training photos of scikit-image a 32x32
                   RGB crop (random position, 1-100% of the area) comes from; test crops are
                   new crops of those photos (so: recognising seen photos, not new ones).
                   P in {16, 8, 4, 2, 1}: 4 to 1,024 tokens.
  photos_gray_pP   the same with 10 photos (brick, grass, gravel, coins ... included) in
                   grayscale: colour no longer names the photo.
  deit_b_64px_pP   the paper's DeiT-B on ImageNet at 64x64 (tfds imagenet_resized/64x64),
                   P in {16, 8, 4, 2, 1}, 300 epochs at batch 1024; TPU/GPU pods.
  deit_b_224px_p1  DeiT-B on 224x224 ImageNet with 1x1 patches: 50,176 tokens per image, the
                   sequence sharded over the mesh's `sequence` axis (sequence-parallel
                   attention), layers scanned and rematerialised; a TPU pod.
  deit_b_224px_p1_sK  the paper's progressive-resolution recipe for it, stage K in {1, 2, 3}:
                   300 epochs at 128x128 (16,384 tokens), 100 epochs at 224x224 started from
                   stage 1, a 20-epoch low-lr fine-tune started from stage 2. Each stage names
                   the previous one's workdir in ``init_from.workdir`` (override it).
  digits_progressive_sK  the same recipe shrunk to the CPU at patch 2: stage 1 at 14x14 (49
                   tokens, 300 steps), stage 2 at 28x28 (196 tokens, 100 steps) from stage 1.

    python -m vitok.train --config=configs/patch_scaling.py:digits_p2 --workdir=workdirs/p2

Every digits preset shares the recipe (steps, batch, optimiser, augmentation): only the patch
size, and with it the sequence length, changes.
"""

import importlib.util
import os
import re

import ml_collections

from vitok.config import init_from_section, mesh_section, unknown_preset

DIGIT_PATCHES = (14, 7, 4, 2, 1)
IMAGENET64_PATCHES = (16, 8, 4, 2, 1)
PHOTO_PATCHES = (16, 8, 4, 2, 1)
STUDY_STEPS = 300


def _vit_module():
    """configs/vit.py, loaded by path (config files are not a package)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vit.py")
    spec = importlib.util.spec_from_file_location("vitok_configs_vit", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _vit_config(preset: str) -> ml_collections.ConfigDict:
    return _vit_module().get_config(preset)


def _study_recipe(c: ml_collections.ConfigDict, patch_size: int) -> ml_collections.ConfigDict:
    """The one CPU recipe every digits study preset shares; only the patch size varies."""
    c.total_steps = c.eval_every = c.checkpoint_every = STUDY_STEPS
    c.batch_size = 64
    c.model.patch_size = patch_size
    c.model.pool = "gap"  # no class token: the sequence is exactly the pixels / patches
    return c


def digits(patch_size: int) -> ml_collections.ConfigDict:
    return _study_recipe(_vit_config("tiny"), patch_size)


def digits_seg(patch_size: int) -> ml_collections.ConfigDict:
    return _study_recipe(_vit_config("tiny_seg"), patch_size)


def digits_fg(patch_size: int) -> ml_collections.ConfigDict:
    c = digits_seg(patch_size)
    c.model.dense_classes = 2
    c.data.pp = "decode(channels=1)|digit_segmentation(0.5, binary=True)|value_range(0, 1)"
    c.evals.test.data.pp = c.data.pp
    return c


def photos(patch_size: int) -> ml_collections.ConfigDict:
    """Photo-of-origin classification on natural crops: texture and colour at 32x32."""
    from vitok.data.sources import PHOTO_SPLITS

    c = digits(patch_size)
    # motorcycle_right is the other half of motorcycle_left's stereo pair: left out as a class.
    names = [n for n in PHOTO_SPLITS["train"] if n != "motorcycle_right.png"]
    train_photos = ",".join(names)
    c.model.image_size = (32, 32)
    c.model.channels = 3
    c.model.num_classes = len(names)
    c.data = ml_collections.ConfigDict(
        dict(source="photo_crops", split="train", crop_size=32, photos=train_photos, min_scale=0.01,
             num_examples=50_000, pp="decode(channels=3)|flip_lr|value_range(-1, 1)",
             skip_bad=False, num_threads=4, prefetch=32)
    )  # fmt: skip
    c.evals.test.data = c.data.copy_and_resolve_references()
    c.evals.test.data.split = "test"  # new crops (another seed) of the same photos
    c.evals.test.data.num_examples = 1024
    c.evals.test.data.pp = "decode(channels=3)|value_range(-1, 1)"
    return c


GRAY_PHOTOS = ("astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png",
               "coins.png", "grass.png", "gravel.png", "moon.png", "rocket.jpg")  # fmt: skip


def photos_gray(patch_size: int) -> ml_collections.ConfigDict:
    """The harder photo task: 10 photos (textures included) seen in grayscale, so colour gives
    nothing away and the crop's texture and structure must."""
    c = photos(patch_size)
    c.model.channels = 1
    c.model.num_classes = len(GRAY_PHOTOS)
    for data in (c.data, c.evals.test.data):
        data.photos = ",".join(GRAY_PHOTOS)
        data.pp = data.pp.replace("decode(channels=3)", "decode(channels=1)")
    return c


def deit_b_64px(patch_size: int) -> ml_collections.ConfigDict:
    """DeiT-B recipe (Touvron et al. 2021, Table 9; timm's deit_base_patch16_224 command line)
    at 64x64: AdamW, lr 5e-4 x batch / 512, 5 warm-up epochs, cosine, weight decay 0.05, label
    smoothing 0.1, stochastic depth 0.1, Mixup 0.8 and CutMix 1.0 on every batch (switch 0.5),
    Inception crop (area 0.08-1), flip, RandAugment rand-m9-mstd0.5-inc1 and random erasing
    0.25 (after value_range: noise on the [-1, 1] scale, where timm's is on the normalised
    one), repeated augmentation 3x. Its analytic cost per step: README, "Running on TPUs and
    GPUs"."""
    c = _vit_config("i1k_b16")  # with DeiT's augmentation and regularisation
    epochs, batch, examples = 300, 1024, 1_281_167
    c.batch_size = batch
    c.total_steps = epochs * examples // batch
    c.optim.lr = 5e-4 * batch / 512
    c.optim.warmup_steps = 5 * examples // batch
    c.model.image_size = (64, 64)
    c.model.patch_size = patch_size
    c.model.pool = "gap"
    c.model.remat = patch_size <= 2  # 1,024 and 4,096 tokens
    c.model.attention_backend = "chunked" if patch_size <= 2 else "dense"
    c.data.name = "imagenet_resized/64x64"
    c.data.pp = _vit_module().DEIT_TRAIN_PP.format(size=64)
    c.evals.test.data.name = "imagenet_resized/64x64"
    c.evals.test.data.pp = "decode(channels=3)|value_range(-1, 1)"
    return c


def deit_b_224px_p1() -> ml_collections.ConfigDict:
    """50,176 pixel tokens per image. The sequence is sharded 8 ways (each device holds 6,272
    tokens of every image); attention gathers K/V over the `sequence` axis."""
    c = deit_b_64px(1)
    c.model.image_size = (224, 224)
    c.model.remat = True
    c.model.scan_layers = True
    c.model.attention_backend = "sequence_parallel"
    c.data.name = "imagenet2012"
    c.data.encoded = True
    c.data.pp = _vit_module().DEIT_TRAIN_PP.format(size=224)
    c.evals.test.data.name = "imagenet2012"
    c.evals.test.data.encoded = True
    c.evals.test.data.pp = _vit_module().DEIT_EVAL_PP.format(size=224)
    c.evals.test.batch_size = 256
    c.mesh = mesh_section(data=1, fsdp=-1, sequence=8)
    return c


def digits_progressive(stage: int) -> ml_collections.ConfigDict:
    """Stage 1: the study's recipe at 14x14 (digits downsampled); stage 2: 28x28 for a third of
    the steps, started from stage 1's weights (patch kernel unchanged, sincos posemb recomputed
    for the larger grid)."""
    c = digits(2)
    if stage == 1:
        c.model.image_size = (14, 14)
        c.data.pp = "decode(channels=1)|resize(16)|random_crop(14)|value_range(0, 1)"
        c.evals.test.data.pp = "decode(channels=1)|resize(16)|central_crop(14)|value_range(0, 1)"
    else:
        c.total_steps = c.eval_every = c.checkpoint_every = STUDY_STEPS // 3
        c.optim.warmup_steps = 10
        c.init_from = init_from_section("workdirs/patch_scaling/digits_progressive_s1")
    return c


def deit_b_224px_p1_stage(stage: int) -> ml_collections.ConfigDict:
    """The multi-stage recipe of the paper's public training scripts (there for ViT/Adventurer
    at patch 16; here at patch 1): (1) 128px, 300 epochs, lr 5e-4 x batch/512, wd 0.05, no
    label smoothing; (2) 224px, 100 epochs, same optimiser, from stage 1; (3) 224px, 20 epochs,
    batch 512, lr 1e-5 (not scaled), wd 0.1, label smoothing 0.1, from stage 2. The public
    scripts raise drop-path per stage (0.1 / 0.4 / 0.6), as here; they also switch
    augmentations per stage, which is not reproduced (every stage uses the DeiT transform)."""
    c = deit_b_224px_p1()
    examples = 1_281_167
    c.label_smoothing = 0.0
    c.model.drop_path_rate = {1: 0.1, 2: 0.4, 3: 0.6}[stage]
    if stage == 1:
        c.model.image_size = (128, 128)
        c.data.pp = _vit_module().DEIT_TRAIN_PP.format(size=128)
        c.evals.test.data.pp = _vit_module().DEIT_EVAL_PP.format(size=128)
        return c
    epochs = 100 if stage == 2 else 20
    if stage == 3:
        c.batch_size = 512
        c.optim.lr = 1e-5
        c.optim.weight_decay = 0.1
        c.label_smoothing = 0.1
    c.total_steps = epochs * examples // c.batch_size
    c.optim.warmup_steps = 5 * examples // c.batch_size if stage == 2 else 0
    c.init_from = init_from_section(f"workdirs/deit_b_224px_p1_s{stage - 1}")
    return c


# The CPU study's tasks: preset ``<task>_p<P>`` for each patch size P.
STUDY_TASKS = {
    "digits": (digits, DIGIT_PATCHES),
    "digits_seg": (digits_seg, DIGIT_PATCHES),
    "digits_fg": (digits_fg, DIGIT_PATCHES),
    "photos": (photos, PHOTO_PATCHES),
    "photos_gray": (photos_gray, PHOTO_PATCHES),
}

_PATTERNS = {
    **{rf"{task}_p(\d+)": entry for task, entry in STUDY_TASKS.items()},
    r"deit_b_64px_p(\d+)": (deit_b_64px, IMAGENET64_PATCHES),
    r"deit_b_224px_p1_s(\d+)": (deit_b_224px_p1_stage, (1, 2, 3)),
    r"digits_progressive_s(\d+)": (digits_progressive, (1, 2)),
}


def presets() -> list[str]:
    names = [
        pattern.replace(r"(\d+)", str(p)) for pattern, (_, ps) in _PATTERNS.items() for p in ps
    ]
    return names + ["deit_b_224px_p1"]


def get_config(preset: str = "digits_p4") -> ml_collections.ConfigDict:
    if preset == "deit_b_224px_p1":
        return deit_b_224px_p1()
    for pattern, (build, patch_sizes) in _PATTERNS.items():
        match = re.fullmatch(pattern, preset)
        if match and int(match.group(1)) in patch_sizes:
            return build(int(match.group(1)))
    raise unknown_preset("patch_scaling", preset, presets())
