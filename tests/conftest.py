"""Every test runs on an 8-device CPU mesh (set before JAX is imported); with
JAX_PLATFORMS=cuda the accelerator tests run on the GPU (e.g. ``-k "not sequence_parallel"``)."""

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    """On the CPU every test gets the 8-device mesh; JAX_PLATFORMS=cuda runs the accelerator
    tests (e.g. ``-k "not sequence_parallel"``) on whatever devices are there."""
    if jax.default_backend() == "cpu":
        assert jax.device_count() == 8, (
            "tests expect XLA_FLAGS=--xla_force_host_platform_device_count=8"
        )
    else:  # GPUs multiply float32 in TF32 by default; the tolerances are float32's
        jax.config.update("jax_default_matmul_precision", "highest")


def _override(c, overrides):
    with c.unlocked():
        for key, value in overrides.items():
            target = c
            *path, last = key.split(".")
            for p in path:
                target = target[p]
            target[last] = value
    return c


def short_run(c, *, steps: int, batch_size: int, eval_every: int = 0, checkpoint_every: int = 0):
    """A test config's run length: log every step; evaluate and checkpoint at the last step
    unless told otherwise."""
    c.total_steps, c.batch_size, c.log_every = steps, batch_size, 1
    c.eval_every = eval_every or steps
    c.checkpoint_every = checkpoint_every or steps
    return c


def small_flextok_config(**overrides):
    """configs/flextok.py:tiny shrunk for fast tests (same code path, smaller numbers)."""
    from configs import flextok

    c = short_run(flextok.get_config("tiny"), steps=4, batch_size=16)
    c.model.image_size = (16, 16)
    c.model.patch_size = 4
    c.model.num_registers = 4
    c.model.fsq_levels = (5, 3)
    for part in (c.model.encoder, c.model.decoder):
        part.width, part.depth, part.num_heads, part.mlp_dim = 32, 1, 2, 64
    c.data.crop_size = 16
    c.evals.recon.data.crop_size = 16
    c.evals.recon.batch_size = 16
    c.evals.recon.max_examples = 16
    c.evals.recon.data.num_examples = 16
    c.evals.recon.steps = 2
    c.evals.recon.grid_rows = 2
    c.evals.recon.baseline_examples = 64
    c.peak_flops_per_device = 1e9
    c.optim.warmup_steps = 1
    return _override(c, overrides)


def small_vit_config(**overrides):
    """configs/vit.py:tiny shrunk for fast tests (same code path, smaller numbers)."""
    from configs import vit

    c = short_run(vit.get_config("tiny"), steps=6, batch_size=16, eval_every=3, checkpoint_every=2)
    c.model.patch_size = 7
    c.model.width = 32
    c.model.depth = 1
    c.model.mlp_dim = 64
    c.model.num_heads = 2
    c.evals.test.batch_size = 64
    c.evals.test.max_examples = 128
    c.peak_flops_per_device = 1e9
    c.optim.warmup_steps = 2
    c.async_checkpoints = True
    return _override(c, overrides)
