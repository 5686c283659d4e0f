"""End-to-end trainer behaviour: layouts agree, bad configs fail clearly, NaN stops the run."""

import json
import os

import jax
import numpy as np
import pytest
from conftest import small_vit_config

from vitok import config as config_lib
from vitok import train


def read_metrics(workdir, prefix=("train/", "eval/")):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k == "step" or k.startswith(prefix)} for r in rows]


def losses(workdir):
    return np.array([r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r])


@pytest.fixture(scope="module")
def one_device_losses(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("one_device"))
    config = small_vit_config(**{"mesh.data": 1})
    final = train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
    assert 0.0 <= final["eval/accuracy"] <= 1.0
    return losses(workdir)


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
    assert sharded[-1] < sharded[0]  # it learns


def test_params_are_actually_sharded(tmp_path):
    from vitok import sharding
    from vitok.models import ModelHandle

    config = small_vit_config()
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    handle = ModelHandle.abstract(config.model)
    shardings = sharding.tree_shardings(
        jax.tree.map(lambda x: x, __import__("flax").nnx.to_pure_dict(handle.param_template)),
        handle.logical_axes,
        mesh,
        config.sharding.rules,
    )
    fc1 = shardings["encoder"]["blocks"][0]["mlp"]["fc1"]["kernel"]
    assert fc1.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    qkv = shardings["encoder"]["blocks"][0]["attn"]["qkv"]
    assert qkv.spec == jax.sharding.PartitionSpec("fsdp", None, "tensor", None)
    head = shardings["head"]["kernel"]  # 10 classes: not divisible, replicated
    assert head.spec == jax.sharding.PartitionSpec("fsdp", None)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    config = small_vit_config(total_steps=12, checkpoint_every=2, eval_every=100)
    config.optim.lr = 1e30
    config.optim.clip_norm = 0.0
    config.optim.warmup_steps = 0
    config.optim.schedule = "constant"
    config.async_checkpoints = False
    with pytest.raises(train.NonFiniteLossError, match="non-finite") as info:
        train.train_and_evaluate(config, str(tmp_path))
    steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
    # Every checkpoint kept is a finite one, and the message names the last of them.
    from vitok import checkpoint
    from vitok.models import ModelHandle  # noqa: F401

    for step in steps:
        assert f"step {steps[-1]}" in str(info.value) or not steps
    assert all(s < 12 for s in steps)
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
    assert ckpt.latest_step() == (steps[-1] if steps else None)


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
