"""Loading runs (weights only, sharded by annotation), the model contract, and the one tokenizer
interface that the tools, evaluators and ``vitok.inference`` share."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from helpers import small_flextok_config, small_vae_config, small_vit_config

from vitok import checkpoint, runs, sharding, train
from vitok.inference import Tokenizer
from vitok.models import ModelHandle, build_model, init_variables
from vitok.models.base import PAD_ID, Model, ModelContractError, prefix_ids
from vitok.models.flextok import keep_mask
from vitok.registry import MODELS


def _run_from_init(config, seed=0) -> runs.Run:
    """A ``runs.Run`` holding freshly initialised weights (no training needed)."""
    params, extra = init_variables(config.model, jax.random.key(seed))
    handle = ModelHandle.abstract(config.model)
    return runs.Run("", config, handle, params, extra, 0, "params")


@pytest.mark.slow
def test_a_run_loads_its_ema_weights_without_its_optimizer_state(tmp_path):
    config = small_vit_config(**{"optim.ema_decay": 0.9, "total_steps": 2, "evals": {}})
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])

    # The second path: the trainer's own full-state restore.
    mesh = sharding.make_mesh({"data": -1})
    setup = train.Setup.create(config, mesh, runs.sharding_rules(config))
    abstract = jax.eval_shape(setup.init_state, jax.random.key(0))
    ckpt = checkpoint.Checkpointer(str(tmp_path / "run" / "checkpoints"), async_save=False)
    full, step = ckpt.restore(runs.with_shardings(abstract, setup.state_shardings(abstract)), None)
    ckpt.close()

    run = runs.load_run(workdir, mesh)
    assert run.step == step == 2 and run.weights == "ema"
    for a, b in zip(jax.tree.leaves(run.params), jax.tree.leaves(full["ema"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(
        np.asarray(full["ema"]["head"]["bias"]), np.asarray(full["params"]["head"]["bias"])
    )

    # The optimizer state is never read: a config whose optimizer builds another state tree
    # (no gradient clipping) still loads the weights. Before, this was a mismatch error.
    changed = runs.load_config(workdir)
    changed.optim.clip_norm = 0.0
    other = runs.load_run(workdir, mesh, config=changed)
    for a, b in zip(jax.tree.leaves(other.params), jax.tree.leaves(run.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # ... and it is laid out by the params' logical axes on the mesh it is given (FSDP here,
    # though the run trained on one device).
    fsdp = sharding.make_mesh({"data": 2, "fsdp": 4})
    sharded = runs.load_run(workdir, fsdp)
    wanted = sharding.tree_shardings(
        sharded.model.abstract_params(),
        sharded.model.logical_axes,
        fsdp,
        runs.sharding_rules(config),
    )
    specs = [a.sharding.spec for a in jax.tree.leaves(sharded.params)]
    assert specs == [s.spec for s in jax.tree.leaves(wanted)]
    assert any("fsdp" in tuple(spec) for spec in specs)
    for a, b in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(run.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_missing_run_or_checkpoint_is_named(tmp_path):
    with pytest.raises(runs.RunNotFoundError, match="config.json not found"):
        runs.load_run(str(tmp_path))
    (tmp_path / "config.json").write_text(small_vit_config().to_json())
    with pytest.raises(runs.RunNotFoundError, match="no checkpoint found"):
        runs.load_run(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        runs.load_config(str(tmp_path))


def test_frozen_sub_models_shard_by_their_annotations_under_fsdp():
    """``extra`` (a FlexTok's frozen VAE) used to be replicated on every device."""
    config = small_flextok_config(**{"model.patch_size": 2})
    with config.unlocked():
        config.model.vae = ml_collections.ConfigDict(
            dict(small_vae_config().model) | {"checkpoint": "unused"}
        )
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    setup = train.Setup.create(config, mesh, runs.sharding_rules(config))
    shardings = setup.state_shardings(jax.eval_shape(setup.init_state, jax.random.key(0)))
    specs = [s.spec for s in jax.tree.leaves(shardings["extra"]["vae"])]
    assert len(specs) > 10
    assert sum("fsdp" in tuple(spec) for spec in specs) >= len(specs) // 2, specs


def test_a_model_without_forward_flops_is_refused_by_name():
    class NoFlops(Model):
        def __init__(self, config, rngs):
            self.w = nnx.Param(jnp.zeros(2))

    MODELS.register("test_no_flops")(NoFlops)
    MODELS.register("test_not_a_model")(lambda config, rngs: nnx.Linear(2, 2, rngs=rngs))
    with pytest.raises(ModelContractError, match="'test_no_flops'.*forward_flops"):
        build_model({"name": "test_no_flops"}, nnx.Rngs(0))
    with pytest.raises(ModelContractError, match="not a vitok.models.base.Model"):
        ModelHandle.abstract({"name": "test_not_a_model"})


def test_every_registered_family_meets_the_contract():
    from configs import flextok, karl, nar, vae, vit

    for module, preset in [
        (vit, "tiny"), (flextok, "tiny"), (vae, "tiny"), (vae, "mnist_fsq"), (nar, "digits_nar"),
        (karl, "tiny"),
    ]:  # fmt: skip
        config = module.get_config(preset)
        model = ModelHandle.abstract(config.model).module()
        assert model.forward_flops() > 0, config.model.name


def test_flextok_decodes_ragged_ids_like_each_prefix_and_like_its_own_sampler():
    config = small_flextok_config()
    tokenizer = Tokenizer(_run_from_init(config))
    assert tokenizer.ordered and tokenizer.token_shape == (4,) and tokenizer.codebook_size == 15
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    ids = tokenizer.tokenize(images)
    assert ids.shape == (2, 4) and ids.dtype == np.int32

    ragged = np.where(np.arange(4)[None] < np.asarray([[1], [3]]), ids, PAD_ID)
    np.testing.assert_array_equal(tokenizer.lengths(ragged), [1, 3])
    out = tokenizer.detokenize(ragged, steps=2)
    np.testing.assert_array_equal(out[0], tokenizer.detokenize(ids[:, :1], steps=2)[0])
    np.testing.assert_array_equal(out[1], tokenizer.detokenize(ids[:, :3], steps=2)[1])

    # The second path: the model's own encoder codes and nested-dropout keep mask.
    run = tokenizer.run
    model = run.module()
    x = jnp.asarray(images, jnp.float32) / 127.5 - 1
    codes, own_ids = model.encode(x)
    np.testing.assert_array_equal(own_ids, ids)
    keep = keep_mask(jnp.asarray([1, 3]), 4)
    direct = model.sample(codes, keep, jax.random.key(0), steps=2)
    expected = np.clip(np.round((np.asarray(direct) + 1) * 127.5), 0, 255)
    np.testing.assert_allclose(out.astype(np.float32), expected, atol=1)
    np.testing.assert_array_equal(np.asarray(prefix_ids(jnp.asarray(ids), 2))[:, 2:], PAD_ID)


def test_tokenizer_input_checks_name_the_problem():
    tokenizer = Tokenizer(_run_from_init(small_flextok_config()))
    with pytest.raises(ValueError, match="padding .* may only follow"):
        tokenizer.detokenize(np.asarray([[0, -1, 2, 3]]))
    with pytest.raises(ValueError, match="at least one token"):
        tokenizer.detokenize(np.asarray([[-1, -1]]))
    with pytest.raises(ValueError, match=r"options \['apg', .*unknown: \['step'\]"):
        tokenizer.detokenize(np.zeros((1, 2), np.int32), step=3)
    with pytest.raises(ValueError, match="tokenize takes the options"):
        tokenizer.tokenize(np.zeros((1, 16, 16, 3), np.uint8), quality=0.1)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        tokenizer.detokenize(np.zeros((1, 2), np.int32), steps=0)


def test_a_grid_tokenizer_round_trips_through_the_same_interface():
    from configs import vae

    config = vae.get_config("mnist_fsq")
    run = _run_from_init(config)
    tokenizer = Tokenizer(run)
    assert not tokenizer.ordered and tokenizer.token_shape == run.module().grid
    h, w, c = tokenizer.image_shape
    images = np.random.default_rng(1).integers(0, 256, (3, h, w, c), dtype=np.uint8)
    ids = tokenizer.tokenize(images)
    assert ids.shape == (3, *tokenizer.token_shape)
    model = run.module()
    x = jnp.asarray(images, jnp.float32) / 127.5 - 1
    recon, own_ids, _ = model(x)
    np.testing.assert_array_equal(own_ids, ids)
    expected = np.clip(np.round((np.asarray(recon) + 1) * 127.5), 0, 255)
    np.testing.assert_allclose(tokenizer.detokenize(ids).astype(np.float32), expected, atol=1)
    with pytest.raises(ValueError, match=r"shape \[B, 7, 7\]"):
        tokenizer.detokenize(ids[:, :3])
    with pytest.raises(ValueError, match="lie in"):
        tokenizer.detokenize(ids + tokenizer.codebook_size)
