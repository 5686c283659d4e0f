"""Helpers shared by the benchmarks: time the trainer's own jitted step on a fixed batch."""

from __future__ import annotations

import time

import jax
import numpy as np

from vitok import runs, sharding
from vitok.train import Setup


def time_train_step(config, local_batch: dict, steps: int) -> tuple[float, float]:
    """Median seconds per step of ``Setup.jit_train_step`` (after one compile/warm-up step), and
    the analytic FLOPs per step."""
    mesh = sharding.make_mesh(config.mesh)
    rules = runs.sharding_rules(config)
    setup = Setup.create(config, mesh, rules)
    rng = jax.random.key(0)
    shardings = setup.state_shardings(jax.eval_shape(setup.init_state, rng))
    state = jax.jit(setup.init_state, out_shardings=shardings)(rng)
    batch = sharding.global_batch(local_batch, mesh, rules)
    with sharding.mesh_rules(mesh, rules):
        step = setup.jit_train_step(shardings, batch)
        state, metrics = step(state, batch)  # compile + warm up
        jax.block_until_ready(metrics)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t)
    return float(np.median(times)), setup.train_flops_per_step()


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` (blocked until ready) after one warm-up call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return float(np.median(times))
