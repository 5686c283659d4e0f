"""Starting a run from another run's weights (``config.init_from``): adaptation across patch and
image sizes, skips, clear errors, and the trainer's use of it."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import small_vit_config

from vitok import sharding, train
from vitok.models.transfer import adapt_params
from vitok.models.vit import ViT
from vitok.nn import flexi
from vitok.runs import load_run


def _vit(image: int, patch: int, **kwargs) -> ViT:
    args = dict(channels=1, width=32, depth=2, mlp_dim=64, num_heads=2, num_classes=10,
                dense_classes=3, pool="gap", rngs=nnx.Rngs(kwargs.pop("seed", 0)))  # fmt: skip
    return ViT(image_size=(image, image), patch_size=patch, **(args | kwargs))


def _params(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _with_params(model, params):
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model


def test_a_pixel_vit_moved_to_twice_the_resolution_sees_upsampled_images_exactly():
    """Source: 14x14 images at 1x1 patches. Target: 28x28 at 2x2 patches, the same 14x14 token
    grid. With the PI-resized kernel the target reads a nearest-upsampled image exactly as the
    source read the original: same logits, and its dense head paints each source pixel's
    prediction over the 2x2 block."""
    source, target = _vit(14, 1, seed=1), _vit(28, 2, seed=2)
    params, report = adapt_params(_params(source), source, _params(target), target)
    assert set(report["adapted"]) == {"embed/kernel", "dense_head/kernel", "dense_head/bias"}
    assert report["skipped"] == [] and report["unused"] == []
    target = _with_params(target, params)

    x = jax.random.uniform(jax.random.key(0), (3, 14, 14, 1))
    up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    np.testing.assert_allclose(target(up), source(x), atol=1e-5)
    dense_up = jnp.repeat(jnp.repeat(source.dense(x), 2, axis=1), 2, axis=2)
    np.testing.assert_allclose(target.dense(up), dense_up, atol=1e-5)


def test_a_learned_posemb_is_resized_to_the_new_grid_and_the_rest_copied():
    source, target = _vit(14, 2, posemb="learn", seed=1), _vit(28, 2, posemb="learn", seed=2)
    params, report = adapt_params(_params(source), source, _params(target), target)
    assert report["adapted"] == ["posemb"]
    np.testing.assert_array_equal(
        params["posemb"], flexi.resize_posemb(source.posemb[...], (7, 7), (14, 14))
    )
    for a, b in zip(
        jax.tree.leaves(params["encoder"]), jax.tree.leaves(_params(source)["encoder"]), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_a_new_label_set_needs_the_head_skipped_and_keeps_its_fresh_init():
    source, target = _vit(28, 4, seed=1), _vit(28, 4, num_classes=5, seed=2)
    with pytest.raises(ValueError, match=r"head/bias has shape \(10,\).*init_from.skip"):
        adapt_params(_params(source), source, _params(target), target)
    params, report = adapt_params(
        _params(source), source, _params(target), target, skip=(r"head/.*",)
    )
    assert set(report["skipped"]) == {"head/bias", "head/kernel"}
    np.testing.assert_array_equal(params["head"]["kernel"], target.head.kernel[...])
    np.testing.assert_array_equal(params["embed"]["kernel"], source.embed.kernel[...])


def test_a_parameter_the_source_lacks_is_named():
    source, target = _vit(28, 4, seed=1), _vit(28, 4, pool="cls", seed=2)
    with pytest.raises(ValueError, match=r"has no parameter 'cls'"):
        adapt_params(_params(source), source, _params(target), target, where="run A")


def _stage_configs(tmp_path):
    """A 14px ViT with a learned posemb, then the same ViT at 28px started from it."""
    s1 = small_vit_config(total_steps=2, eval_every=100, checkpoint_every=2)
    s1.model.image_size = (14, 14)
    s1.model.patch_size = 2
    s1.model.posemb = "learn"
    s1.data.pp = "decode(channels=1)|resize(16)|random_crop(14)|value_range(0, 1)"
    s1.evals.test.data.pp = "decode(channels=1)|resize(16)|central_crop(14)|value_range(0, 1)"
    s2 = small_vit_config(total_steps=1, eval_every=100, checkpoint_every=1)
    s2.model.patch_size = 2
    s2.model.posemb = "learn"
    s2.optim.lr = 0.0  # the step-1 checkpoint then holds the initial weights
    s2.init_from.workdir = str(tmp_path / "s1")
    return s1, s2


@pytest.mark.slow
def test_the_trainer_starts_from_the_source_run_and_then_resumes_its_own(tmp_path):
    s1, s2 = _stage_configs(tmp_path)
    one = jax.devices()[:1]
    train.train_and_evaluate(s1, str(tmp_path / "s1"), devices=one)
    train.train_and_evaluate(s2, str(tmp_path / "s2"), devices=one)

    mesh = sharding.make_mesh({"data": -1}, one)
    run1, run2 = (load_run(str(tmp_path / name), mesh) for name in ("s1", "s2"))
    (p1, step1), (p2, step2) = (run1.params, run1.step), (run2.params, run2.step)
    assert (step1, step2) == (2, 1)
    np.testing.assert_allclose(
        p2["posemb"], flexi.resize_posemb(p1["posemb"], (7, 7), (14, 14)), atol=1e-6
    )
    for name in ("encoder", "embed", "head"):
        for a, b in zip(jax.tree.leaves(p2[name]), jax.tree.leaves(p1[name]), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6)

    # A resumed run reads its own checkpoint: the source may be gone by then.
    shutil.rmtree(tmp_path / "s1")
    s2.total_steps = 2
    train.train_and_evaluate(s2, str(tmp_path / "s2"), devices=one)


def test_a_missing_source_run_is_a_clear_error_before_training(tmp_path):
    _, s2 = _stage_configs(tmp_path)
    with pytest.raises(FileNotFoundError, match="is .* the workdir of a training run"):
        train.train_and_evaluate(s2, str(tmp_path / "s2"), devices=jax.devices()[:1])
    (tmp_path / "s1").mkdir()
    (tmp_path / "s1" / "config.json").write_text(s2.to_json())
    with pytest.raises(FileNotFoundError, match="has no checkpoint"):
        train.train_and_evaluate(s2, str(tmp_path / "s2"), devices=jax.devices()[:1])


@pytest.mark.parametrize(
    "family, stages",
    [("deit_b_224px_p1_s", (1, 2, 3)), ("digits_progressive_s", (1, 2))],
)
def test_progressive_presets_chain_their_stages_and_each_starts_from_the_last(family, stages):
    """Every later stage names the earlier stage's workdir and its model can take the earlier
    model's weights (shapes only, for DeiT-B: 16,384 -> 50,176 learned position embeddings)."""
    from configs import patch_scaling
    from vitok.models import ModelHandle

    configs = [patch_scaling.get_config(f"{family}{k}") for k in stages]
    assert not configs[0].init_from.workdir
    for k, earlier, later in zip(stages[1:], configs, configs[1:], strict=False):
        assert later.init_from.workdir.endswith(f"{family}{k - 1}")
        handles = [ModelHandle.abstract(c.model) for c in (earlier, later)]
        models = [nnx.merge(h.graphdef, h.param_template, h.extra_template) for h in handles]
        params = [nnx.to_pure_dict(h.param_template) for h in handles]
        adapted = jax.eval_shape(
            lambda src, tgt, m=models: adapt_params(src, m[0], tgt, m[1])[0], *params
        )
        assert jax.tree.map(lambda a: a.shape, adapted) == jax.tree.map(
            lambda a: a.shape, params[1]
        )
    sizes = [tuple(c.model.image_size) for c in configs]
    assert sizes[0] < sizes[1] and sizes[-1] == sizes[1]
