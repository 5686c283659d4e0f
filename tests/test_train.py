"""End-to-end trainer behaviour: layouts agree, bad configs fail clearly, NaN stops the run."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import losses, read_metrics, small_vit_config

from vitok import checkpoint, train
from vitok import config as config_lib


@pytest.fixture(scope="module")
def one_device_losses(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("one_device"))
    config = small_vit_config(**{"mesh.data": 1})
    train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
    return losses(workdir)


@pytest.mark.slow
@pytest.mark.parametrize(
    "mesh",
    [
        {"data": -1, "fsdp": 1, "tensor": 1, "sequence": 1},
        {"data": 2, "fsdp": -1, "tensor": 1, "sequence": 1},
        {"data": 2, "fsdp": 2, "tensor": 2, "sequence": 1},
    ],
    ids=["data8", "data2_fsdp4", "data2_fsdp2_tensor2"],
)
def test_eight_device_layouts_match_one_device(tmp_path, one_device_losses, mesh):
    config = small_vit_config(**{f"mesh.{k}": v for k, v in mesh.items()})
    train.train_and_evaluate(config, str(tmp_path))
    sharded = losses(str(tmp_path))
    assert len(sharded) == config.total_steps
    np.testing.assert_allclose(sharded, one_device_losses, rtol=2e-5, atol=2e-5)


def assert_eight_devices_match_one(tmp_path, overrides, mesh):
    """Trains ``overrides`` on 1 device and on the 8-device ``mesh``; the losses must agree."""
    one = small_vit_config(**overrides, **{"mesh.data": 1})
    train.train_and_evaluate(one, str(tmp_path / "one"), devices=jax.devices()[:1])
    eight = small_vit_config(**overrides, **{f"mesh.{k}": v for k, v in mesh.items()})
    train.train_and_evaluate(eight, str(tmp_path / "eight"))
    np.testing.assert_allclose(
        losses(str(tmp_path / "eight")), losses(str(tmp_path / "one")), rtol=2e-5, atol=2e-5
    )


@pytest.mark.slow
def test_scanned_layers_train_the_same_sharded_and_unsharded(tmp_path):
    overrides = {"model.scan_layers": True, "model.depth": 2, "total_steps": 4}
    assert_eight_devices_match_one(tmp_path, overrides, {"data": 2, "fsdp": 2, "tensor": 2})


@pytest.mark.slow
def test_sequence_sharding_matches_one_device(tmp_path):
    overrides = {"model.pool": "gap", "total_steps": 3}  # 16 tokens: divisible by 2
    assert_eight_devices_match_one(tmp_path, overrides, {"data": 2, "fsdp": 2, "sequence": 2})


def test_ema_follows_its_definition():
    """ema_t = d * ema_{t-1} + (1 - d) * params_t, checked on the trainer's own step."""
    from vitok import sharding

    config = small_vit_config()
    config.optim.ema_decay = 0.9
    mesh = sharding.make_mesh({"data": -1})
    setup = train.Setup.create(config, mesh, sharding.DEFAULT_RULES)
    state = setup.init_state(jax.random.key(0))
    images = np.random.default_rng(0).uniform(size=(16, 28, 28, 1)).astype(np.float32)
    batch = {"image": images, "label": np.arange(16, dtype=np.int32) % 10}
    step = jax.jit(setup.train_step)
    history = [state["params"]]
    for _ in range(3):
        state, _ = step(state, batch)
        history.append(state["params"])
    expected = history[0]
    for params in history[1:]:
        expected = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, expected, params)
    for got, want in zip(jax.tree.leaves(state["ema"]), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert int(state["step"]) == 3


def test_full_scale_preset_builds_and_counts_published_flops():
    from configs import vit as vit_configs
    from vitok.models import ModelHandle

    config = vit_configs.get_config("i1k_b16")
    config_lib.validate(config)
    handle = ModelHandle.abstract(config.model)
    num_params = sum(x.size for x in jax.tree.leaves(handle.param_template))
    assert abs(num_params - 86.6e6) < 0.5e6  # ViT-B/16: 86.6M parameters
    setup = train.Setup.create(config, sharding_mesh(), config.sharding.rules)
    forward_macs = setup.train_flops_per_step() / 3 / config.batch_size / 2
    assert abs(forward_macs - 17.6e9) / 17.6e9 < 0.02  # DeiT-B: 17.6 G multiply-adds per image


def sharding_mesh():
    from vitok import sharding

    return sharding.make_mesh({"data": 1, "fsdp": -1})


def test_training_reduces_the_loss(tmp_path):
    config = small_vit_config(total_steps=30, eval_every=30, checkpoint_every=30, batch_size=32)
    config.optim.lr = 3e-3
    final = train.train_and_evaluate(config, str(tmp_path))
    curve = losses(str(tmp_path))
    assert curve[0] == pytest.approx(np.log(10), abs=1e-3)  # zero-initialised head: uniform
    assert curve[-5:].mean() < curve[:5].mean() - 0.1
    assert final["eval/accuracy"] > 0.2  # twice the 10% of chance after 30 tiny steps


def test_params_are_actually_sharded(tmp_path):
    """The trainer's own state (initialised and after a step, as ``train_and_evaluate`` makes
    them) holds each weight as shards of the annotated mesh axes: every device stores its
    block and no more, the optimizer moments alike."""
    from jax.sharding import PartitionSpec as P

    from vitok import runs, sharding

    config = small_vit_config()
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = runs.sharding_rules(config)
    setup = train.Setup.create(config, mesh, rules)
    rng = jax.random.key(0)
    shardings = setup.state_shardings(jax.eval_shape(setup.init_state, rng))
    state = jax.jit(setup.init_state, out_shardings=shardings)(rng)
    images = np.random.default_rng(0).random((16, 28, 28, 1), np.float32)
    batch = sharding.global_batch(
        {"image": images, "label": np.arange(16) % 10, "mask": np.ones(16, np.float32)},
        mesh,
        rules,
    )
    stepped, _ = setup.jit_train_step(shardings, batch)(jax.tree.map(jnp.copy, state), batch)

    def check(array, spec, block):
        assert array.sharding.spec == spec
        assert {shard.data.shape for shard in array.addressable_shards} == {block}
        assert len(array.addressable_shards) == 8

    for tree in (state, stepped):
        block = tree["params"]["encoder"]["blocks"][0]
        check(block["mlp"]["fc1"]["kernel"], P("fsdp", "tensor"), (16, 32))  # [32, 64] / (2, 2)
        check(block["attn"]["qkv"], P("fsdp", None, "tensor", None), (16, 3, 1, 16))
        check(tree["params"]["head"]["kernel"], P("fsdp", None), (16, 10))  # 10 classes: whole
        is_moment = lambda x: isinstance(x, dict) and "encoder" in x  # noqa: E731
        moments = [m for m in jax.tree.leaves(tree["opt_state"], is_leaf=is_moment) if is_moment(m)]
        assert len(moments) == 2  # Adam's mu and nu, each a params-shaped tree
        for moment in moments:
            fc1 = moment["encoder"]["blocks"][0]["mlp"]["fc1"]["kernel"]
            check(fc1, P("fsdp", "tensor"), (16, 32))
    # The step ran on the shards: Adam's first moment of the head's kernel (zero at
    # initialisation; while the kernel is zero only the head has a gradient) is not.
    assert float(jnp.abs(moments[0]["head"]["kernel"]).max()) > 0


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    good = small_vit_config(total_steps=4, checkpoint_every=2, eval_every=100)
    good.async_checkpoints = False
    train.train_and_evaluate(good, str(tmp_path))
    # Resume the same run with an exploding learning rate: the loss turns non-finite.
    bad = small_vit_config(total_steps=12, checkpoint_every=2, eval_every=100)
    bad.optim.lr = 1e30
    with pytest.raises(train.NonFiniteLossError, match="non-finite") as info:
        train.train_and_evaluate(bad, str(tmp_path))
    assert "last good checkpoint (step 4)" in str(info.value)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
    assert ckpt.latest_step() == 4
    ckpt.close()


def test_resuming_with_a_different_model_is_refused_not_quarantined(tmp_path):
    train.train_and_evaluate(small_vit_config(total_steps=2, eval_every=100), str(tmp_path))
    wider = small_vit_config(total_steps=4, eval_every=100, **{"model.width": 64})
    with pytest.raises(checkpoint.CheckpointMismatchError, match="does not match"):
        train.train_and_evaluate(wider, str(tmp_path))
    assert os.listdir(tmp_path / "checkpoints") == ["2"]
    assert not os.path.exists(tmp_path / "checkpoints_corrupt")


# --- command line ---------------------------------------------------------------------------------


def test_command_line_overrides(tmp_path):
    args = config_lib.parse_command_line(
        [
            "--config=configs/vit.py:tiny",
            f"--workdir={tmp_path}",
            "--config.optim.lr=0.123",
            "--config.model.depth=2",
            "--config.data.pp=decode|value_range(0,1)",
        ]
    )
    assert args.config.optim.lr == 0.123
    assert args.config.model.depth == 2
    assert args.config.data.pp == "decode|value_range(0,1)"
    assert args.workdir == str(tmp_path)


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--config.optim.learning_rate=0.1", "learning_rate"),
        ("--config.batch_size=abc", "batch_size"),
        ("--config=configs/vit.py:huge", "huge"),
        ("--config=configs/nothere.py:tiny", "nothere"),
        ("--config.total_steps=0", "total_steps"),
    ],
)
def test_bad_command_line_names_the_problem(tmp_path, flag, message):
    argv = ["--config=configs/vit.py:tiny", f"--workdir={tmp_path}", flag]
    with pytest.raises(SystemExit) as info:
        config_lib.parse_command_line(argv)
    assert message in str(info.value)


def test_missing_required_key_is_reported():
    c = small_vit_config()
    with c.unlocked():
        del c["checkpoint_every"]
    with pytest.raises(config_lib.ConfigError, match="checkpoint_every"):
        config_lib.validate(c)


class _SleepyEvaluator:
    """An evaluator that takes 1 s: what a slow evaluation costs, with nothing to compute."""

    OPTIONS = {}

    def __init__(self, config, context):
        del config, context

    def evaluate(self, params, extra):
        import time

        time.sleep(1.0)
        return {"eval/slept": 1.0}


@pytest.mark.slow
def test_steps_per_second_leave_out_evaluation_time(tmp_path):
    """perf/steps_per_sec used to count the evaluations between two logs as step time."""
    from vitok.registry import EVALUATORS

    if "sleepy_for_test" not in EVALUATORS._table:
        EVALUATORS.register("sleepy_for_test")(_SleepyEvaluator)
    config = small_vit_config(total_steps=8, eval_every=1, **{"log_every": 4})
    with config.unlocked():
        config.evals = {"slow": {"type": "sleepy_for_test"}}
    train.train_and_evaluate(config, str(tmp_path))
    rates = [r["perf/steps_per_sec"] for r in read_metrics(str(tmp_path), ("perf/",))
             if "perf/steps_per_sec" in r]  # fmt: skip
    # Four 1 s evaluations lie between two logs: counted, the rate would be below 1 step/s.
    assert len(rates) == 2 and rates[-1] > 3.0, rates
