"""The ImageNet recipe's model and task parts (issue 19): stochastic depth in the ViT, batch
Mixup / CutMix with mixed labels, and the soft-target cross-entropy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import copy_scanned_into_unrolled

from vitok.models.vit import ViT
from vitok.nn.transformer import Block, drop_path, drop_path_rates
from vitok.tasks.mixing import cutmix_box, mix_batch, soft_cross_entropy, soft_targets


def _vit(**kw):
    # No head: the output is the features (a zero-initialised head would give zero logits).
    args = dict(image_size=(8, 8), patch_size=2, channels=3, width=16, depth=4, mlp_dim=32,
                num_heads=2, num_classes=0)  # fmt: skip
    return ViT(**(args | kw), rngs=nnx.Rngs(0))


# --- stochastic depth -------------------------------------------------------------------------


def test_drop_path_rates_rise_linearly_from_zero_to_the_rate():
    np.testing.assert_allclose(drop_path_rates(0.3, 4), [0.0, 0.1, 0.2, 0.3], atol=1e-7)
    np.testing.assert_allclose(drop_path_rates(0.1, 1), [0.1])


def test_drop_path_zeroes_whole_examples_and_keeps_the_expectation():
    branch = jnp.ones((20000, 3, 2))
    out = np.asarray(drop_path(branch, 0.25, jax.random.key(0)))
    per_example = out.reshape(len(out), -1)
    # Every example is all zeros or all 1 / (1 - rate): one draw per example.
    np.testing.assert_allclose(np.unique(per_example), [0.0, 1 / 0.75], rtol=1e-6)
    assert np.all(per_example.min(1) == per_example.max(1))
    assert abs((per_example[:, 0] == 0).mean() - 0.25) < 0.015  # binomial sd 0.003
    assert abs(out.mean() - 1.0) < 0.02


def test_a_block_with_drop_path_is_one_of_its_four_hand_built_outcomes():
    """Per example, each branch is dropped or kept (scaled by 1 / (1 - r)): the output must be
    one of the four combinations, computed here from the block's own sublayers."""
    block = Block(16, 2, 32, rngs=nnx.Rngs(0))
    rate = 0.5
    x = jnp.tile(jax.random.normal(jax.random.key(1), (1, 5, 16)), (64, 1, 1))
    out = np.asarray(block(x, dropout_rng=jax.random.key(2), drop_path_rate=rate))

    def branches(attn_kept: bool, mlp_kept: bool) -> np.ndarray:
        h = x[:1]
        if attn_kept:
            h = h + block.attn(block.norm1(h)) / (1 - rate)
        if mlp_kept:
            h = h + block.mlp(block.norm2(h)) / (1 - rate)
        return np.asarray(h[0])

    outcomes = {(a, m): branches(a, m) for a in (False, True) for m in (False, True)}
    seen = []
    for example in out:
        match = [k for k, v in outcomes.items() if np.allclose(example, v, atol=1e-5)]
        assert len(match) == 1, "an output that is no combination of kept and dropped branches"
        seen.append(match[0])
    assert len(set(seen)) == 4  # all four happen in 64 draws at rate 0.5
    # Without a dropout key (evaluation) nothing is dropped or scaled.
    plain = block(x[:1])
    np.testing.assert_allclose(block(x[:1], drop_path_rate=rate), plain, rtol=0, atol=0)


def test_a_vit_with_drop_path_rate_zero_or_in_evaluation_is_the_plain_vit():
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
    plain, dropping = _vit(), _vit(drop_path_rate=0.3)
    key = jax.random.key(5)
    np.testing.assert_array_equal(dropping(x), plain(x))  # evaluation: no key, no drop
    np.testing.assert_array_equal(_vit(drop_path_rate=0.0)(x, dropout_rng=key), plain(x))
    assert not np.allclose(dropping(x, dropout_rng=key), plain(x))
    with pytest.raises(ValueError, match="drop_path_rate must be in"):
        _vit(drop_path_rate=1.0)


@pytest.mark.slow  # trains or compiles long
@pytest.mark.parametrize("remat", [False, True])
def test_drop_path_is_the_same_scanned_and_unrolled(remat):
    """The rates ride through nnx.scan as a per-layer input: a scanned (and rematerialised)
    stack drops the same examples in the same blocks as the unrolled one."""
    depth = 4
    scanned = _vit(depth=depth, drop_path_rate=0.5, scan_layers=True, remat=remat)
    unrolled = _vit(depth=depth, drop_path_rate=0.5)
    copy_scanned_into_unrolled(scanned, unrolled, depth)
    x = jax.random.normal(jax.random.key(1), (8, 8, 8, 3))
    key = jax.random.key(3)
    a, b = scanned(x, dropout_rng=key), unrolled(x, dropout_rng=key)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert not np.allclose(a, scanned(x), atol=1e-3)  # something was dropped


# --- Mixup, CutMix, soft targets ---------------------------------------------------------------


def _batch(b=6, h=8, w=10):
    images = jax.random.uniform(jax.random.key(0), (b, h, w, 3))
    labels = jnp.arange(b) % 4
    return images, labels


def test_soft_cross_entropy_of_one_hot_targets_is_the_integer_label_loss():
    logits = jax.random.normal(jax.random.key(0), (5, 7))
    labels = jnp.array([0, 3, 6, 2, 2])
    np.testing.assert_allclose(
        soft_cross_entropy(logits, soft_targets(labels, 7)),
        optax.softmax_cross_entropy_with_integer_labels(logits, labels),
        rtol=1e-6,
    )
    smoothed = np.asarray(soft_targets(labels, 7, 0.1))
    np.testing.assert_allclose(smoothed.sum(1), 1.0, rtol=1e-6)
    assert np.allclose(smoothed.max(1), 0.9 + 0.1 / 7) and np.allclose(smoothed.min(1), 0.1 / 7)


def test_mixup_blends_each_image_with_the_reversed_batch_and_mixes_its_labels():
    images, labels = _batch()
    mixed, targets, lam = mix_batch(jax.random.key(1), images, labels, 4, mixup_alpha=0.8)
    lam = float(lam)
    assert 0.0 < lam < 1.0
    x = np.asarray(images)
    np.testing.assert_allclose(mixed, lam * x + (1 - lam) * x[::-1], rtol=1e-6, atol=1e-6)
    onehot = np.eye(4)[np.asarray(labels)]
    np.testing.assert_allclose(targets, lam * onehot + (1 - lam) * onehot[::-1], atol=1e-6)


def test_cutmix_pastes_a_box_of_the_paired_image_and_lam_is_its_complement_area():
    images, labels = _batch()
    found_box = False
    for seed in range(8):
        mixed, targets, lam = mix_batch(
            jax.random.key(seed), images, labels, 4, cutmix_alpha=1.0, smoothing=0.1
        )
        x, m = np.asarray(images), np.asarray(mixed)
        from_other = np.all(m == x[::-1], axis=-1) & ~np.all(x == x[::-1], axis=-1)
        unchanged = np.all(m == x, axis=-1)
        assert np.all(from_other | unchanged)  # every pixel is its own or its pair's
        area = from_other[0].mean()  # image 0 and image 5 differ everywhere
        assert float(lam) == pytest.approx(1.0 - area, abs=1e-6)
        if 0 < area < 1:
            rows, cols = np.nonzero(from_other[0])  # the pasted region is one rectangle
            assert from_other[0][rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
            found_box = True
        smooth = soft_targets(labels, 4, 0.1)
        np.testing.assert_allclose(
            targets, float(lam) * smooth + (1 - float(lam)) * smooth[::-1], atol=1e-6
        )
    assert found_box


def test_cutmix_box_area_follows_lam_away_from_the_edges():
    box = np.asarray(cutmix_box(jax.random.key(0), jnp.float32(0.75), 1000, 1000))
    assert box.sum() <= 250_000 and box.mean() > 0  # (1 - lam) of the image before clipping


def test_mixing_off_or_with_probability_zero_leaves_the_batch_and_is_deterministic():
    images, labels = _batch()
    for kw in ({}, {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "prob": 0.0}):
        mixed, targets, lam = mix_batch(jax.random.key(1), images, labels, 4, **kw)
        np.testing.assert_array_equal(mixed, images)
        np.testing.assert_allclose(targets, np.eye(4)[np.asarray(labels)])
        assert float(lam) == 1.0
    both = dict(mixup_alpha=0.8, cutmix_alpha=1.0)
    a = mix_batch(jax.random.key(2), images, labels, 4, **both)
    b = mix_batch(jax.random.key(2), images, labels, 4, **both)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)


@pytest.mark.slow  # trains or compiles long
def test_the_classification_task_trains_on_mixed_batches_with_soft_targets():
    from helpers import small_vit_config

    from vitok.tasks.classification import ClassificationTask

    config = small_vit_config()
    with config.unlocked():
        config.mixup = dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5)
        config.label_smoothing = 0.1
    task = ClassificationTask(config)
    model = _vit(image_size=(28, 28), patch_size=7, channels=1, num_classes=10)
    images = jax.random.uniform(jax.random.key(0), (8, 28, 28, 1))
    labels = jnp.arange(8)
    batch = {"image": images, "label": labels}
    loss, aux = task.loss(model, batch, jax.random.key(4))
    rng = jax.random.key(4)
    mixed, targets, lam = mix_batch(
        jax.random.fold_in(rng, 3), images, labels, 10, smoothing=0.1, **config.mixup
    )
    dropout_rng, _ = jax.random.split(rng)
    expected = soft_cross_entropy(model(mixed, dropout_rng=dropout_rng), targets).mean()
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert float(aux["train/mix_lam"]) == pytest.approx(float(lam))


# --- preprocessing: Inception crop (fused with JPEG decoding), evaluation crop, erasing ----------


def _photo_jpeg(height=375, width=500, quality=90) -> tuple[bytes, np.ndarray]:
    """A photo from scikit-image at ImageNet's typical size, as JPEG bytes and decoded."""
    import io

    import skimage.data
    from PIL import Image

    photo = Image.fromarray(skimage.data.chelsea()).resize((width, height), Image.BICUBIC)
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=quality)
    data = buffer.getvalue()
    return data, np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_inception_boxes_fit_and_follow_the_area_and_aspect_ranges():
    from vitok.data.ops import inception_box

    rng = np.random.default_rng(0)
    boxes = np.array([inception_box(rng, 375, 500) for _ in range(2000)])
    top, left, h, w = boxes.T
    assert np.all((top >= 0) & (left >= 0) & (top + h <= 375) & (left + w <= 500))
    fraction = h * w / (375 * 500)
    assert fraction.min() > 0.07 and fraction.max() <= 1.0
    assert np.all((w / h > 3 / 4 - 0.02) & (w / h < 4 / 3 + 0.02))  # rounding to pixels
    # Uniform on [0.08, 1] has mean 0.54; large boxes misfit a 4:3 image more often.
    assert 0.35 < fraction.mean() < 0.54
    # A range no box can meet falls back to the central crop with the aspect clipped.
    assert inception_box(rng, 100, 400, area=(1.0, 1.0), aspect=(1.0, 1.0)) == (0, 150, 100, 100)


def test_inception_crop_on_jpeg_bytes_decodes_only_the_crop_and_matches_the_array_path():
    from vitok.data.ops import _decode_jpeg_region, parse

    data, decoded = _photo_jpeg()
    fused = parse("inception_crop(64)")
    on_array = parse("inception_crop(64)")
    for seed in range(6):
        a = fused({"image": data}, np.random.default_rng(seed))["image"]
        b = on_array({"image": decoded}, np.random.default_rng(seed))["image"]
        assert a.shape == b.shape == (64, 64, 3) and a.dtype == np.uint8
        err = np.mean((a.astype(float) - b.astype(float)) ** 2)
        assert err < 255**2 / 10**2.8, seed  # PSNR > 28 dB: the same crop, decoded at 1/1..1/4
    # A 300x400 box for a 64x64 output decodes at a quarter of the size (DCT scaling).
    region = _decode_jpeg_region(data, lambda h, w: (20, 40, 300, 400), (64, 64), "test")
    assert region.shape == (75, 100, 3)
    np.testing.assert_array_equal(
        fused({"image": data}, np.random.default_rng(3))["image"],
        fused({"image": data}, np.random.default_rng(3))["image"],
    )
    from vitok.data.ops import BadImageError

    with pytest.raises(BadImageError, match="bad.jpg: cannot decode.*truncated or corrupt"):
        fused({"image": data[: len(data) // 3], "path": "bad.jpg"}, np.random.default_rng(0))
    # Arrays keep their layout: [H, W] stays two-dimensional, [H, W, 1] keeps its channel.
    gray = decoded[..., 0]
    assert on_array({"image": gray}, np.random.default_rng(0))["image"].shape == (64, 64)
    one = on_array({"image": gray[..., None]}, np.random.default_rng(0))["image"]
    assert one.shape == (64, 64, 1)


def test_resize_center_crop_is_resize_then_central_crop_at_the_ratio():
    from vitok.data.ops import parse

    _, decoded = _photo_jpeg()
    a = parse("resize_center_crop(224, crop_ratio=0.875)")({"image": decoded}, None)["image"]
    b = parse("resize(256)|central_crop(224)")({"image": decoded}, None)["image"]
    np.testing.assert_array_equal(a, b)


def test_random_erasing_fills_one_box_with_noise_or_leaves_the_image():
    from vitok.data.ops import parse

    image = np.full((32, 40, 3), 0.5, np.float32)
    erase = parse("random_erasing(1.0)")
    fractions = []
    for seed in range(50):
        out = erase({"image": image}, np.random.default_rng(seed))["image"]
        changed = np.any(out != image, axis=-1)
        if changed.any():
            rows, cols = np.nonzero(changed)
            box = changed[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
            assert box.mean() > 0.95  # one rectangle (a noise value may equal 0.5 by chance)
            fractions.append(box.size / changed.size)
    assert len(fractions) > 40 and 0.015 < min(fractions) and max(fractions) < 0.36
    np.testing.assert_array_equal(
        parse("random_erasing(0.0)")({"image": image}, np.random.default_rng(0))["image"], image
    )
    with pytest.raises(ValueError, match="after value_range"):
        erase({"image": np.zeros((8, 8, 3), np.uint8)}, np.random.default_rng(0))


def test_rand_augment_ops_at_their_identity_levels_and_known_properties():
    from vitok.data.ops import RAND_AUGMENT_OPS, rand_augment_op

    _, decoded = _photo_jpeg(96, 120)
    rng = np.random.default_rng(0)
    fill = (124, 116, 104)
    assert len(RAND_AUGMENT_OPS) == 15  # timm's increasing set, Cutout left to random erasing

    def run(name, level):
        return rand_augment_op(decoded, name, level, rng, fill).astype(int)

    # Level 0 leaves the image as it is for every op with a strength.
    for name in ("rotate", "solarize", "solarize_add", "color", "contrast", "brightness",
                 "sharpness", "shear_x", "shear_y", "translate_x", "translate_y"):  # fmt: skip
        np.testing.assert_array_equal(run(name, 0.0), decoded, err_msg=name)
    np.testing.assert_array_equal(run("invert", 0.5), 255 - decoded.astype(int))
    np.testing.assert_array_equal(run("solarize", 1.0), 255 - decoded.astype(int))  # all >= 0
    np.testing.assert_array_equal(run("posterize", 1.0), 0)  # 4 - 4 = 0 bits kept
    np.testing.assert_array_equal(run("posterize", 0.0), decoded & 0xF0)  # 4 bits kept
    low = decoded.astype(int) < 128
    added = np.where(low, np.minimum(decoded.astype(int) + 110, 255), decoded)
    np.testing.assert_array_equal(run("solarize_add", 1.0), added)
    # Translating by 0.45 of the width shifts the content and fills the gap with the fill.
    moved = run("translate_x", 1.0)
    shift = 54  # 0.45 x 120, a whole number of pixels
    left = np.array_equal(moved[:, : 120 - shift], decoded[:, shift:])
    right = np.array_equal(moved[:, shift:], decoded[:, : 120 - shift])
    assert left or right
    gap = moved[:, 120 - shift :] if left else moved[:, :shift]
    assert np.all(gap == np.array(fill))
    with pytest.raises(ValueError, match="unknown RandAugment op"):
        rand_augment_op(decoded, "cutout", 0.5, rng, fill)


@pytest.mark.parametrize(
    "name, amount",
    [("rotate", 25.0), ("rotate", -13.0), ("shear_x", 0.27), ("shear_y", -0.2),
     ("translate_x", 17.3), ("translate_y", -30.6)],
)  # fmt: skip
def test_rand_augment_geometry_matches_pils_transforms(name, amount):
    """The geometric ops warp with OpenCV; PIL's rotate and AFFINE transform (what timm
    calls) are the reference for the geometry. The bicubic kernels differ (a = -0.75 vs
    -0.5), so pixels agree to about a level, where half a pixel of misplacement or a wrong
    sign would cost tens."""
    from PIL import Image

    from vitok.data.ops import _affine, _rand_augment_geometry

    _, decoded = _photo_jpeg(96, 120)
    fill = (124, 116, 104)
    linear, offset = _rand_augment_geometry(name, amount, 96, 120)
    ours = _affine(decoded, linear, offset, fill).astype(int)
    pil = Image.fromarray(decoded)
    if name == "rotate":
        reference = pil.rotate(amount, resample=Image.BICUBIC, fillcolor=fill)
    else:  # the AFFINE data timm passes for each op
        data = {
            "shear_x": (1, amount, 0, 0, 1, 0),
            "shear_y": (1, 0, 0, amount, 1, 0),
            "translate_x": (1, 0, amount, 0, 1, 0),
            "translate_y": (1, 0, 0, 0, 1, amount),
        }[name]
        reference = pil.transform(pil.size, Image.AFFINE, data, Image.BICUBIC, fillcolor=fill)
    difference = np.abs(ours - np.asarray(reference).astype(int))
    assert difference.mean() < 1.5 and np.mean(difference > 8) < 0.02, difference.mean()


def test_rand_augment_is_deterministic_per_seed_and_off_at_probability_zero():
    from vitok.data.ops import parse

    _, decoded = _photo_jpeg(64, 64)
    augment = parse("rand_augment(2, 9, magnitude_std=0.5)")
    outs = [augment({"image": decoded}, np.random.default_rng(s))["image"] for s in range(12)]
    again = augment({"image": decoded}, np.random.default_rng(3))["image"]
    np.testing.assert_array_equal(outs[3], again)
    assert all(o.dtype == np.uint8 and o.shape == decoded.shape for o in outs)
    assert sum(not np.array_equal(o, decoded) for o in outs) >= 8  # 1 - 0.25 of them, roughly
    off = parse("rand_augment(probability=0.0)")
    np.testing.assert_array_equal(
        off({"image": decoded}, np.random.default_rng(0))["image"], decoded
    )
    with pytest.raises(ValueError, match="uint8 RGB"):
        augment({"image": decoded.astype(np.float32)}, np.random.default_rng(0))
