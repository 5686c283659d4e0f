"""Checkpoints: exact resume after SIGKILL, fallback past corrupt or half-written steps."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ROOT, small_vit_config, tiny_vit_cli_args, xla_flags

from vitok import checkpoint, train


def make_state(seed):
    rng = np.random.default_rng(seed)
    return {
        "params": {"w": jnp.asarray(rng.normal(size=(64, 32)), jnp.float32), "b": jnp.zeros(32)},
        "step": jnp.int32(seed),
    }


def data_iterator(position):
    it = iter(grain.MapDataset.range(1000).to_iter_dataset())
    for _ in range(position):
        next(it)
    return it


def save_steps(directory, steps):
    ckpt = checkpoint.Checkpointer(directory, max_to_keep=5, async_save=True)
    for s in steps:
        ckpt.save(s, make_state(s), data_iterator(10 * s))
    ckpt.close()


def abstract():
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), make_state(0))


def restore(directory):
    it = data_iterator(0)
    ckpt = checkpoint.Checkpointer(directory, max_to_keep=5)
    out = ckpt.restore(abstract(), it)
    ckpt.close()
    return out, next(it)


def test_round_trip_restores_state_and_data_position(tmp_path):
    save_steps(str(tmp_path), [1, 2])
    (state, step), next_element = restore(str(tmp_path))
    assert step == 2
    np.testing.assert_array_equal(state["params"]["w"], make_state(2)["params"]["w"])
    assert next_element == 20  # the iterator continues where step 2 left it


def _data_files(directory, step):
    return sorted(
        glob.glob(os.path.join(directory, str(step), "state", "**", "d", "*"), recursive=True)
    )


@pytest.mark.parametrize("damage", ["flip_bytes", "truncate", "delete_metadata", "garbage_json"])
def test_corrupt_latest_falls_back_to_previous(tmp_path, damage, caplog):
    directory = str(tmp_path / "checkpoints")
    save_steps(directory, [1, 2, 3])
    if damage == "flip_bytes":
        for path in _data_files(directory, 3):
            raw = bytearray(open(path, "rb").read())
            for i in range(len(raw) // 2, len(raw), 7):
                raw[i] ^= 0xFF
            open(path, "wb").write(bytes(raw))
    elif damage == "truncate":
        for path in _data_files(directory, 3):
            raw = open(path, "rb").read()
            open(path, "wb").write(raw[: len(raw) // 3])
    elif damage == "delete_metadata":
        os.remove(os.path.join(directory, "3", "state", "_METADATA"))
    else:
        open(os.path.join(directory, "3", "meta", "metadata"), "w").write("{not json")
    (state, step), next_element = restore(directory)
    assert step == 2
    np.testing.assert_array_equal(state["params"]["w"], make_state(2)["params"]["w"])
    assert next_element == 20
    assert "step 3" in caplog.text and "corrupt" in caplog.text
    # The broken step is kept for inspection, out of the way of new saves.
    assert os.listdir(tmp_path / "checkpoints_corrupt")[0].startswith("3-")
    assert sorted(os.listdir(directory)) == ["1", "2"]


def test_half_written_step_is_ignored(tmp_path):
    directory = str(tmp_path)
    save_steps(directory, [1, 2])
    # What a kill during an async save leaves behind: an unfinalised temporary directory.
    os.rename(os.path.join(directory, "2"), os.path.join(directory, "3.orbax-checkpoint-tmp-123"))
    (state, step), _ = restore(directory)
    assert step == 1
    np.testing.assert_array_equal(state["params"]["w"], make_state(1)["params"]["w"])


def test_no_checkpoint_gives_none(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path))
    assert ckpt.restore(abstract(), None) is None


@pytest.mark.slow
def test_training_resumes_past_a_corrupt_checkpoint(tmp_path):
    config = small_vit_config(total_steps=6, checkpoint_every=2, eval_every=100)
    reference = tmp_path / "reference"
    train.train_and_evaluate(config, str(reference))
    workdir = tmp_path / "run"
    train.train_and_evaluate(
        small_vit_config(total_steps=4, checkpoint_every=2, eval_every=100), str(workdir)
    )
    for path in _data_files(str(workdir / "checkpoints"), 4):
        open(path, "wb").write(b"\0" * 16)
    final = train.train_and_evaluate(config, str(workdir))  # restores step 2, retrains 3..6
    expected = [json.loads(line) for line in open(reference / "metrics.jsonl")]
    got = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for a, b in zip(got, expected, strict=True):
        assert {k: v for k, v in a.items() if "/" in k and not k.startswith("perf/")} == {
            k: v for k, v in b.items() if "/" in k and not k.startswith("perf/")
        }
    assert final["eval/accuracy"] == expected[-1]["eval/accuracy"]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "6"]


def _run_cli(workdir, extra=()):
    cmd = [
        sys.executable,
        "-m",
        "vitok.train",
        f"--workdir={workdir}",
        *tiny_vit_cli_args(eval_every=10, checkpoint_every=5),
        *extra,
    ]
    env = dict(os.environ, XLA_FLAGS=xla_flags(8))
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def _metrics(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


# The DeiT recipe's random parts, all on: a resumed run must redraw none of them differently.
FULL_RECIPE = [
    "--config.model.channels=3",
    "--config.data.pp=decode(channels=3)|inception_crop(28, area=(0.5, 1.0))|flip_lr"
    "|rand_augment(2, 9, magnitude_std=0.5)|value_range(0, 1)|random_erasing(0.25)",
    "--config.evals.test.data.pp=decode(channels=3)|value_range(0, 1)",
    "--config.model.drop_path_rate=0.1",
    "--config.mixup.mixup_alpha=0.8",
    "--config.mixup.cutmix_alpha=1.0",
    "--config.label_smoothing=0.1",
    "--config.data.repeated_augmentation=2",
]


@pytest.mark.slow
def test_sigkill_and_restart_matches_uninterrupted_run(tmp_path):
    """With the full regularising recipe on (augmentation, repeated augmentation, drop path,
    Mixup/CutMix)."""
    reference = str(tmp_path / "reference")
    proc = _run_cli(reference, FULL_RECIPE)
    out = proc.communicate(timeout=600)[0].decode()
    assert proc.returncode == 0, out

    workdir = str(tmp_path / "killed")
    proc = _run_cli(workdir, FULL_RECIPE)
    deadline = time.time() + 300
    while not os.path.isdir(os.path.join(workdir, "checkpoints", "10")):
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    steps_before = len(_metrics(workdir))

    proc = _run_cli(workdir, FULL_RECIPE)
    out = proc.communicate(timeout=600)[0].decode()
    assert proc.returncode == 0, out
    assert "resuming at step" in out
    resumed_at = int(out.split("resuming at step")[1].split()[0])
    assert 10 <= resumed_at < 40
    assert steps_before >= 10
    assert _metrics(workdir) == _metrics(reference)


def test_asyncio_drops_only_storage_failure_tracebacks_once_a_checkpointer_exists(tmp_path):
    """The garbage collector can log orbax's failed writer tasks ("Task exception was never
    retrieved") before the save that sees the full disk raises; those records are dropped (the
    Checkpointer reports the failure as one line), any other asyncio error is kept."""
    import logging

    checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
    checkpoint.Checkpointer(str(tmp_path / "other"))
    asyncio_log = logging.getLogger("asyncio")
    assert asyncio_log.filters.count(checkpoint._ASYNCIO_FILTER) == 1

    def record(error):
        return logging.LogRecord(
            "asyncio", logging.ERROR, __file__, 1, "Task exception was never retrieved",
            None, (type(error), error, None),
        )  # fmt: skip

    full = ValueError(
        "RESOURCE_EXHAUSTED: Failed to write: No space left on device [os_error_code='28']"
    )
    too_large = OSError("[Errno 27] File too large")
    other = ValueError("the writer's own bug")
    assert not asyncio_log.filter(record(full))
    assert not asyncio_log.filter(record(too_large))
    assert asyncio_log.filter(record(other))
    plain = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "no exception", None, None)
    assert asyncio_log.filter(plain)
