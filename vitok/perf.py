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


def transformer_flops(
    length: int, width: int, depth: int, mlp_dim: int, kv_length=None, mlp_matmuls: int = 2
) -> float:
    """Matmul FLOPs of ``depth`` pre-norm blocks over ``length`` tokens (2 per multiply-add):
    QKV and output projections, QK^T and AV over ``kv_length`` keys, and the MLP's
    ``mlp_matmuls`` width x mlp_dim layers (2; SwiGLU's gate, up and down: 3)."""
    kv_length = length if kv_length is None else kv_length
    projections = 2 * length * width * 4 * width
    scores = 2 * 2 * length * kv_length * width
    mlp = mlp_matmuls * 2 * length * width * mlp_dim
    return float(depth * (projections + scores + mlp))


def compiled_peak_bytes(compiled) -> int:
    """XLA's own memory accounting of a compiled function: arguments + outputs + temporaries
    (exact and repeatable, unlike sampling the process's memory)."""
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)
