"""Peak-FLOPs measurement and MFU."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np


def measure_matmul_peak(size: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
    """FLOP/s of a square matmul on the default device (median of ``repeats``)."""
    a = jax.device_put(jnp.ones((size, size), dtype), jax.devices()[0])
    b = jax.device_put(jnp.ones((size, size), dtype), jax.devices()[0])
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * size**3 / float(np.median(times))


def mfu(flops_per_step: float, seconds_per_step: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the peak."""
    return flops_per_step / seconds_per_step / peak_flops
