"""Every test runs on an 8-device CPU mesh (set before JAX is imported); with
JAX_PLATFORMS=cuda the accelerator tests run on the GPU (e.g. ``-k "not sequence_parallel"``)."""

import os
import sys
import tempfile

# The tests' small models spend most of their time compiling: LLVM's cheapest optimisation
# level compiles them about a quarter faster (measured on 2 cores), the same XLA programs.
# VITOK_TEST_XLA_OPT=1 keeps XLA's default level. Subprocesses take the same flags
# (helpers.xla_flags).
COMPILE_FLAGS = (
    "" if os.environ.get("VITOK_TEST_XLA_OPT") == "1" else "--xla_backend_optimization_level=0"
)
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count=8 {COMPILE_FLAGS}"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole run (both xdist workers and every subprocess
# they start): the tests compile the same small configs many times over. Fresh for each run.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
if os.environ.get("VITOK_TEST_COMPILE_CACHE", "1") != "0":
    os.environ.setdefault(
        "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"vitok-jax-cache-{_RUN}")
    )
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

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
