"""FlexiViT resize, training at sampled patch sizes, the dense head and its mIoU evaluator."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import small_vit_config

from vitok import train
from vitok.data import ops
from vitok.evaluators.segmentation import confusion_matrix, mean_iou
from vitok.models.vit import ViT, patchify, unpatchify
from vitok.nn import flexi
from vitok.tasks.classification import call_at_sampled_patch_size


@pytest.mark.parametrize("old,new", [(4, 8), (3, 5), (7, 14), (8, 4), (7, 2)])
def test_resize_matrix_matches_jax_image_resize(old, new):
    x = np.random.default_rng(old * new).normal(size=(old, old)).astype(np.float32)
    reference = jax.image.resize(jnp.asarray(x), (new, new), method="linear")
    ours = (flexi.patch_resize_matrix(old, new) @ x.reshape(-1)).reshape(new, new)
    np.testing.assert_allclose(ours, reference, atol=1e-6)


@pytest.mark.parametrize("old,new,channels", [(4, 8, 3), (3, 5, 1), (2, 7, 2)])
def test_pi_resize_preserves_the_token_when_upsampling(old, new, channels):
    """<resize(x), w_new> == <x, w_old> for a random kernel and patch (the FlexiViT property)."""
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(old * old * channels, 6)).astype(np.float32)
    patch = rng.normal(size=(old, old, channels)).astype(np.float32)
    resized_kernel = flexi.pi_resize_patch_kernel(
        jnp.asarray(kernel), old=old, new=new, channels=channels
    )
    resized_patch = jax.image.resize(jnp.asarray(patch), (new, new, channels), method="linear")
    np.testing.assert_allclose(
        resized_patch.reshape(-1) @ resized_kernel, patch.reshape(-1) @ kernel, rtol=1e-4, atol=1e-4
    )


def test_plain_resize_of_the_kernel_does_not_preserve_the_token():
    """The reason for the pseudo-inverse: resizing the kernel like an image changes the token."""
    rng = np.random.default_rng(1)
    kernel = rng.normal(size=4 * 4).astype(np.float32)
    patch = rng.normal(size=(4, 4)).astype(np.float32)
    naive = flexi.patch_resize_matrix(4, 8) @ kernel
    upsampled = flexi.patch_resize_matrix(4, 8) @ patch.reshape(-1)
    assert abs(float(upsampled @ naive) - float(patch.reshape(-1) @ kernel)) > 0.1


def test_resize_posemb_is_identity_at_the_same_grid_and_bilinear_otherwise():
    posemb = jnp.arange(4 * 4 * 2, dtype=jnp.float32).reshape(16, 2)
    assert flexi.resize_posemb(posemb, (4, 4), (4, 4)) is posemb
    resized = flexi.resize_posemb(posemb, (4, 4), (8, 8))
    expected = jax.image.resize(posemb.reshape(4, 4, 2), (8, 8, 2), method="linear")
    np.testing.assert_allclose(resized, expected.reshape(64, 2), atol=1e-6)


def _vit(**kwargs):
    args = dict(
        image_size=(16, 16), patch_size=4, channels=3, width=32, depth=1, mlp_dim=64,
        num_heads=2, num_classes=5, posemb="learn", pool="gap",
    )  # fmt: skip
    return ViT(**(args | kwargs), rngs=nnx.Rngs(0))


def test_vit_embeds_any_patch_size_from_the_native_kernel():
    model = _vit()
    images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    np.testing.assert_allclose(model(images, patch_size=4), model(images), atol=1e-6)
    # At patch 8 each token is <patch, PI-resized kernel> + bias + the resized position grid.
    kernel = flexi.pi_resize_patch_kernel(model.embed.kernel[...], old=4, new=8, channels=3)
    posemb = jax.image.resize(model.posemb[...].reshape(4, 4, 32), (2, 2, 32), method="linear")
    expected = patchify(images, 8) @ kernel + model.embed.bias[...] + posemb.reshape(4, 32)
    np.testing.assert_allclose(model.embed_patches(images, 8), expected, atol=1e-5)
    with pytest.raises(ValueError, match="patch_size 5 does not divide the image size 16x16"):
        model(images, patch_size=5)


@pytest.mark.slow
def test_sampled_patch_size_gives_the_gradient_of_the_size_it_drew():
    model = _vit()
    images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    graphdef, params = nnx.split(model)

    def sampled_loss(params, rng):
        m = nnx.merge(graphdef, params)
        return call_at_sampled_patch_size(
            lambda p: (m(images, patch_size=p) ** 2).sum(), sizes, rng
        )

    def direct_loss(params, patch_size):
        return (nnx.merge(graphdef, params)(images, patch_size=patch_size) ** 2).sum()

    sizes = (2, 4, 8)
    sampled = jax.jit(jax.grad(sampled_loss, has_aux=True))
    direct = jax.jit(jax.grad(direct_loss), static_argnums=1)
    drawn = set()
    for seed in range(32):
        grads, size = sampled(params, jax.random.key(seed))
        if int(size) in drawn:
            continue
        drawn.add(int(size))
        reference = direct(params, int(size))
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(reference), strict=True):
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)
    assert drawn == set(sizes)


def test_dense_head_predicts_each_patch_pixels_from_its_own_token():
    model = _vit(num_classes=0, dense_classes=3)
    model.dense_head.kernel[...] = jax.random.normal(jax.random.key(2), (32, 4 * 4 * 3))
    images = jax.random.normal(jax.random.key(3), (2, 16, 16, 3))
    logits = model.dense(images)
    assert logits.shape == (2, 16, 16, 3)
    tokens = model.tokens(images)  # [2, 16 tokens, 32]
    per_token = tokens @ model.dense_head.kernel[...] + model.dense_head.bias[...]
    # pixel (5, 9) lies in patch row 1, column 2 (token 6), at offset (1, 1) within it.
    np.testing.assert_allclose(
        logits[:, 5, 9], per_token[:, 6].reshape(2, 4, 4, 3)[:, 1, 1], rtol=1e-5, atol=1e-5
    )
    # At patch 8 the head's 4x4 output maps are resized to 8x8 (bilinear).
    logits8 = model.dense(images, patch_size=8)
    tokens8 = model.tokens(images, patch_size=8)
    maps = (tokens8 @ model.dense_head.kernel[...] + model.dense_head.bias[...]).reshape(
        2, 4, 4, 4, 3
    )
    maps8 = jax.image.resize(maps, (2, 4, 8, 8, 3), method="linear").reshape(2, 4, 8 * 8 * 3)
    np.testing.assert_allclose(logits8, unpatchify(maps8, (2, 2), 8), rtol=1e-4, atol=1e-5)


def test_confusion_matrix_and_miou_match_a_per_class_count():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=(3, 5, 5))
    preds = np.where(rng.random((3, 5, 5)) < 0.6, labels, rng.integers(0, 4, size=(3, 5, 5)))
    preds[preds == 3] = 2  # class 3 is never predicted
    weights = np.ones((3, 5, 5))
    weights[2] = 0  # a padding example
    cm = np.asarray(confusion_matrix(jnp.asarray(labels), jnp.asarray(preds), 5, weights))
    ious = []
    for k in range(5):
        keep = weights > 0
        tp = np.sum((labels == k) & (preds == k) & keep)
        union = np.sum(((labels == k) | (preds == k)) & keep)
        if union:
            ious.append(tp / union)
        assert cm[k].sum() == np.sum((labels == k) & keep)
    miou, per_class = mean_iou(cm)
    assert np.isnan(per_class[4])  # class 4 never occurs: left out of the mean
    assert per_class[3] == 0.0
    assert miou == pytest.approx(np.mean(ious))


def test_digit_segmentation_op_labels_the_stroke_with_the_digit():
    image = np.zeros((4, 4, 1), np.uint8)
    image[1:3, 2] = 200
    image[0, 0] = 100  # below the 0.5 threshold
    out = ops.parse("digit_segmentation(0.5)")({"image": image, "label": 7}, None)
    expected = np.zeros((4, 4), np.int32)
    expected[1:3, 2] = 8
    np.testing.assert_array_equal(out["segmentation"], expected)
    binary = ops.parse("digit_segmentation(0.5, binary=True)")({"image": image, "label": 7}, None)
    np.testing.assert_array_equal(binary["segmentation"], (expected > 0).astype(np.int32))


@pytest.mark.slow
def test_segmentation_trains_at_sampled_patch_sizes_and_reports_miou(tmp_path):
    from configs import vit

    config = vit.as_segmentation(
        small_vit_config(total_steps=24, eval_every=24, checkpoint_every=24, batch_size=32)
    )
    with config.unlocked():
        config.model.patch_size = 4
        config.flexivit.patch_sizes = (4, 7)
        config.evals.test.patch_size = 7
        config.optim.lr = 3e-3
    final = train.train_and_evaluate(config, str(tmp_path))
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    sizes = {r["train/patch_size"] for r in rows if "train/patch_size" in r}
    assert sizes == {4, 7}
    curve = [r["train/loss"] for r in rows if "train/loss" in r]
    assert np.mean(curve[-4:]) < np.mean(curve[:4]) - 0.3
    # Most pixels are background: the pixel accuracy beats 0.5 quickly, mIoU is in [0, 1].
    assert final["eval/pixel_accuracy"] > 0.5
    assert 0.0 < final["eval/miou"] <= 1.0


def test_patch_scaling_presets_share_one_recipe_and_build():
    from configs import patch_scaling
    from vitok.models import ModelHandle

    digits = [patch_scaling.get_config(f"digits_p{p}") for p in patch_scaling.DIGIT_PATCHES]
    recipe = {k: v for k, v in digits[0].to_dict().items() if k != "model"}
    for c in digits:  # only the patch size differs
        assert {k: v for k, v in c.to_dict().items() if k != "model"} == recipe
        assert c.model.to_dict() | {"patch_size": 4} == digits[0].model.to_dict() | {
            "patch_size": 4
        }
    for family in ("photos", "photos_gray"):
        photos = [patch_scaling.get_config(f"{family}_p{p}") for p in patch_scaling.PHOTO_PATCHES]
        recipe = {k: v for k, v in photos[0].to_dict().items() if k != "model"}
        assert all({k: v for k, v in c.to_dict().items() if k != "model"} == recipe for c in photos)
        train_data, test_data = photos[0].data, photos[0].evals.test.data
        assert test_data.photos == train_data.photos and test_data.split == "test"
        assert photos[0].model.num_classes == len(train_data.photos.split(","))
    pixels = patch_scaling.get_config("deit_b_224px_p1")
    assert pixels.model.patch_size == 1 and tuple(pixels.model.image_size) == (224, 224)
    assert pixels.mesh.sequence == 8 and pixels.model.attention_backend == "sequence_parallel"
    handle = ModelHandle.abstract(pixels.model)  # shapes only: 50,176 learned position embeddings
    assert handle.param_template["posemb"].get_value().shape == (224 * 224, 768)
    with pytest.raises(ValueError, match="unknown preset 'digits_p3'"):
        patch_scaling.get_config("digits_p3")


def test_patch_scaling_launcher_tabulates_every_study_task_by_patch_size():
    import importlib.util

    from configs import patch_scaling

    path = os.path.join(os.path.dirname(__file__), "..", "experiments", "patch_scaling", "run.py")
    spec = importlib.util.spec_from_file_location("patch_scaling_run", path)
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    assert set(run.METRIC) == set(patch_scaling.STUDY_TASKS)  # a metric for every task
    row = dict(task="digits", gflops_per_image=0.01, train_step_peak_mib=9.0, ms_per_step=5.0)
    rows = [
        row | dict(patch_size=2, tokens=196, metric=0.5, wall_s=20.0),
        row | dict(patch_size=14, tokens=4, metric=0.9, wall_s=10.0),
    ]
    table = [line for line in run.markdown(rows).splitlines() if line.startswith("| ")]
    assert table[1].startswith("| 14 | 4 | 0.9000 |")  # the largest patch first
    assert table[2].startswith("| 2 | 196 | 0.5000 |")
