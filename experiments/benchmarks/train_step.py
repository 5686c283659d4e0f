"""Train-step MFU and input-pipeline throughput for a ViT-S/16-sized config.

    python experiments/benchmarks/train_step.py [--batch_size 16] [--steps 5] [--dtype float32]

Measures, in one process: the machine's matmul peak (FLOP/s), the median time of the real
jitted train step (``vitok.train.Setup``, the trainer's own step), and the grain pipeline's
images/s on embedded 224px photo crops. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

sys.path.insert(0, os.path.dirname(__file__))

from common import time_train_step  # noqa: E402

from configs import vit as vit_configs  # noqa: E402
from vitok import perf  # noqa: E402
from vitok.data import pipeline  # noqa: E402


def benchmark_config(batch_size: int, dtype: str):
    c = vit_configs.get_config("i1k_b16")
    c.batch_size = batch_size
    c.total_steps = 1000
    c.model.width, c.model.depth, c.model.mlp_dim, c.model.num_heads = 384, 12, 1536, 6  # ViT-S
    c.model.dtype = dtype
    c.model.scan_layers = True
    c.mesh.fsdp, c.mesh.data = 1, -1
    c.data.source = "photo_crops"
    c.data.crop_size = 256
    c.data.num_examples = 100_000
    c.data.pp = "decode(channels=3)|random_crop(224)|flip_lr|value_range(-1, 1)"
    c.data.num_threads = 8
    c.data.prefetch = 4 * batch_size
    return c


def pipeline_images_per_sec(config, batches: int) -> float:
    it = iter(pipeline.train_dataset(config.data, global_batch_size=config.batch_size, seed=0))
    next(it)  # start the reader threads
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * config.batch_size / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--dtype", default="bfloat16" if jax.default_backend() != "cpu" else "float32"
    )
    args = parser.parse_args()

    config = benchmark_config(args.batch_size, args.dtype)
    matmul_dtype = jnp.dtype(args.dtype)
    peak = perf.measure_matmul_peak(
        size=4096 if jax.default_backend() != "cpu" else 2048, dtype=matmul_dtype
    )
    peak_total = peak * (1 if jax.default_backend() == "cpu" else jax.device_count())
    rng = np.random.default_rng(0)
    local = {
        "image": rng.uniform(-1, 1, (config.batch_size, 224, 224, 3)).astype(np.float32),
        "label": np.arange(config.batch_size, dtype=np.int32) % 1000,
    }
    step_s, flops = time_train_step(config, local, args.steps)
    step_ips = config.batch_size / step_s
    pipe_ips = pipeline_images_per_sec(config, batches=max(4, args.steps))
    result = {
        "device": jax.devices()[0].device_kind,
        "num_devices": jax.device_count(),
        "model": "ViT-S/16 @224",
        "dtype": args.dtype,
        "batch_size": config.batch_size,
        "matmul_peak_tflops": peak_total / 1e12,
        "step_ms_median": step_s * 1e3,
        "train_tflops_per_step": flops / 1e12,
        "mfu": perf.mfu(flops, step_s, peak_total),
        "images_per_sec": step_ips,
        "pipeline_images_per_sec": pipe_ips,
        "pipeline_ratio": pipe_ips / step_ips,
    }
    print(
        f"matmul peak {peak_total / 1e9:.1f} GFLOP/s | step {step_s * 1e3:.0f} ms "
        f"({step_ips:.1f} img/s) | MFU {result['mfu']:.1%} of measured peak | "
        f"pipeline {pipe_ips:.0f} img/s = {result['pipeline_ratio']:.1f}x the step"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
