"""Every test runs on an 8-device CPU mesh (set before JAX is imported)."""

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
    assert jax.device_count() == 8, (
        "tests expect XLA_FLAGS=--xla_force_host_platform_device_count=8"
    )


def small_vit_config(**overrides):
    """configs/vit.py:tiny shrunk for fast tests (same code path, smaller numbers)."""
    from configs import vit

    c = vit.get_config("tiny")
    c.total_steps = 6
    c.batch_size = 16
    c.log_every = 1
    c.eval_every = 3
    c.checkpoint_every = 2
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
    with c.unlocked():
        for key, value in overrides.items():
            target = c
            *path, last = key.split(".")
            for p in path:
                target = target[p]
            target[last] = value
    return c
