"""Every test runs on an 8-device CPU mesh (set before JAX is imported); with
JAX_PLATFORMS=cuda the accelerator tests run on the GPU (e.g. ``-k "not sequence_parallel"``)."""

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the configs/ package; the tests' helpers live in tests/helpers.py

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
