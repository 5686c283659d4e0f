"""KL autoencoder: shapes, the KL term, training, and use as FlexTok's frozen latent space."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from helpers import small_flextok_config, small_vae_config

from vitok import train
from vitok.models import build_model
from vitok.tasks.vae import gaussian_kl


def test_gaussian_kl_matches_the_closed_form_and_is_zero_at_the_prior():
    mean = jnp.asarray([[0.5, -1.0]])
    logvar = jnp.log(jnp.asarray([[2.0, 0.5]]))
    expected = sum(0.5 * (m**2 + v - 1 - np.log(v)) for m, v in [(0.5, 2.0), (-1.0, 0.5)])
    assert float(gaussian_kl(mean, logvar)[0]) == pytest.approx(expected, rel=1e-6)
    assert float(gaussian_kl(jnp.zeros((1, 3)), jnp.zeros((1, 3)))[0]) == 0.0


@pytest.mark.slow
def test_vae_downsamples_by_its_factor_and_rejects_wrong_sizes():
    config = small_vae_config(**{"model.mults": (1, 2, 2)})
    model = build_model(config.model, nnx.Rngs(0))
    assert model.factor == 4 and model.latent_shape() == (4, 4, 4)
    images = jnp.zeros((2, 16, 16, 3))
    recon, mean, logvar = jax.eval_shape(lambda x: model(x, jax.random.key(0)), images)
    assert recon.shape == images.shape and mean.shape == logvar.shape == (2, 4, 4, 4)
    assert jax.eval_shape(model.encode, images).shape == (2, 4, 4, 4)
    with pytest.raises(ValueError, match="autoencoder expects images"):
        jax.eval_shape(model, jnp.zeros((2, 8, 8, 3)))


@pytest.mark.slow
def test_flextok_trains_in_a_frozen_vae_latent_space(tmp_path):
    vae_dir = str(tmp_path / "vae")
    vae_config = small_vae_config(**{"total_steps": 1})
    with vae_config.unlocked():
        vae_config.evals = ml_collections.ConfigDict()  # its evaluator has a test of its own
    one_device = jax.devices()[:1]  # sharding is tested elsewhere; this test is about loading
    train.train_and_evaluate(vae_config, vae_dir, devices=one_device)
    from vitok.runs import load_run

    vae_params = load_run(vae_dir).params

    vae_model = dict(small_vae_config().model) | {"checkpoint": vae_dir}
    config = small_flextok_config(
        **{"model.patch_size": 2, "total_steps": 2, "eval_every": 2, "evals.recon.steps": 1}
    )
    with config.unlocked():
        config.model.vae = ml_collections.ConfigDict(vae_model)
        config.evals = ml_collections.ConfigDict()  # reconstruction is tested on its own
    ft_dir = str(tmp_path / "flextok")
    final = train.train_and_evaluate(config, ft_dir, devices=one_device)
    assert np.isfinite(final["train/loss"])

    # The FlexTok checkpoint holds the VAE's trained weights, unchanged by FlexTok's training.
    extra = load_run(ft_dir).extra
    flat_vae = jax.tree.leaves_with_path(vae_params)
    flat_extra = dict(jax.tree.leaves_with_path(extra["vae"]))
    assert len(flat_vae) == len(flat_extra) > 10
    for path, value in flat_vae:
        np.testing.assert_array_equal(np.asarray(flat_extra[path]), np.asarray(value))


def test_a_latent_flextok_without_its_vae_checkpoint_is_refused(tmp_path):
    config = small_flextok_config(**{"model.patch_size": 2})
    with config.unlocked():
        config.model.vae = ml_collections.ConfigDict(
            dict(small_vae_config().model) | {"checkpoint": ""}
        )
    with pytest.raises(ValueError, match="model.vae: a pretrained sub-model needs the workdir"):
        train.train_and_evaluate(config, str(tmp_path))


def test_vae_weights_shard_over_fsdp_and_unknown_logical_axes_are_errors():
    """The VAE's "conv" axis used to be in no rule, so FSDP sharded none of its weights."""
    from vitok import sharding
    from vitok.models import ModelHandle

    config = small_vae_config()
    handle = ModelHandle.abstract(config.model)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    rules = tuple(tuple(r) for r in config.sharding.rules)
    abstract = nnx.to_pure_dict(handle.param_template)
    shardings = sharding.tree_shardings(abstract, handle.logical_axes, mesh, rules)
    specs = [s.spec for s in jax.tree.leaves(shardings)]
    sharded = [spec for spec in specs if "fsdp" in tuple(spec)]
    assert len(sharded) >= len(specs) // 2, specs  # kernels and per-channel vectors of 8+ channels
    without_conv = tuple(r for r in rules if r[0] != "conv")
    with pytest.raises(ValueError, match="logical axis 'conv' is in no rule"):
        sharding.tree_shardings(abstract, handle.logical_axes, mesh, without_conv)
