"""FlexTok train-step MFU and tokenize / detokenize throughput.

    python experiments/benchmarks/flextok.py [--batch_size 4] [--steps 3] [--skip_d12]

Two configs, measured in one process:
  tiny  configs/flextok.py:tiny as it trains in the quick start;
  d12   the d12-d12 transformer workload of ``imagenet256_d12`` (256 patch tokens of a 32x32x16
        latent with 2x2 patches, 256 registers, width 768, head dim 64), fed with latents
        directly, so the numbers are the transformers' (the frozen VAE is not timed).
Train-step MFU is analytic FLOPs (3x the forward matmuls) over the median step time and the
matmul peak measured at start-up. Detokenize cost does not depend on k (the decoder always sees
N register slots), which the per-k numbers show. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.dirname(__file__))

from common import median_seconds, time_train_step  # noqa: E402

from configs import flextok as flextok_configs  # noqa: E402
from vitok import perf  # noqa: E402
from vitok.models import ModelHandle, init_variables  # noqa: E402


def tiny_config(batch_size: int):
    c = flextok_configs.get_config("tiny")
    c.batch_size = batch_size
    return c


def d12_config(batch_size: int):
    c = flextok_configs.get_config("imagenet256_d12")
    c.batch_size = batch_size
    c.model.image_size = (32, 32)  # the c16 latent grid of a 256px image
    c.model.channels = 16
    c.model.vae = {"name": ""}
    c.model.repa_encoder = {"name": ""}
    c.model.repa_dim = 0
    c.flextok.repa_weight = 0.0
    c.model.dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    c.optim.ema_decay = 0.0
    c.mesh.fsdp, c.mesh.data = 1, -1
    return c


def measure(name: str, config, steps: int, sample_steps: list[int], repeats: int) -> dict:
    h, w = config.model.image_size
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (config.batch_size, h, w, config.model.channels))
    images = images.astype(np.float32)
    step_s, flops = time_train_step(config, {"image": images}, steps)

    handle = ModelHandle.abstract(config.model)
    params, extra = init_variables(config.model, jax.random.key(0))
    n = int(config.model.num_registers)
    tokenize = jax.jit(lambda p, e, x: handle.merge(p, e).tokenize(x))
    x = jnp.asarray(images)
    tok_s = median_seconds(lambda: tokenize(params, extra, x), repeats)
    ids = tokenize(params, extra, x)
    result = {
        "train_step_ms": step_s * 1e3,
        "train_tflops_per_step": flops / 1e12,
        "train_images_per_sec": config.batch_size / step_s,
        "tokenize_images_per_sec": config.batch_size / tok_s,
        "detokenize_images_per_sec": {},
    }
    for steps_ in sample_steps:
        detok = jax.jit(
            lambda p, e, t, s=steps_: handle.merge(p, e).detokenize(t, jax.random.key(0), steps=s),
            static_argnums=(),
        )
        for k in sorted({1, n}):
            secs = median_seconds(lambda k=k, d=detok: d(params, extra, ids[:, :k]), repeats)
            result["detokenize_images_per_sec"][f"k{k}_steps{steps_}"] = config.batch_size / secs
    print(
        f"{name}: train step {step_s * 1e3:.0f} ms ({result['train_images_per_sec']:.2f} img/s), "
        f"tokenize {result['tokenize_images_per_sec']:.1f} img/s, detokenize "
        + ", ".join(f"{k} {v:.2f} img/s" for k, v in result["detokenize_images_per_sec"].items()),
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=4, help="d12 batch size")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip_d12", action="store_true")
    args = parser.parse_args()

    peak = perf.measure_matmul_peak(size=2048 if jax.default_backend() == "cpu" else 4096)
    peak_total = peak * (1 if jax.default_backend() == "cpu" else jax.device_count())
    print(f"matmul peak {peak_total / 1e9:.1f} GFLOP/s", flush=True)
    out = {"device": jax.devices()[0].device_kind, "matmul_peak_tflops": peak_total / 1e12}

    tiny = tiny_config(64)
    out["tiny"] = measure("tiny", tiny, args.steps, [1, 10], args.repeats)
    out["tiny"]["train_mfu"] = perf.mfu(
        out["tiny"]["train_tflops_per_step"] * 1e12, out["tiny"]["train_step_ms"] / 1e3, peak_total
    )
    if not args.skip_d12:
        d12 = d12_config(args.batch_size)
        out["d12"] = measure("d12", d12, args.steps, [1], 1)
        out["d12"]["batch_size"] = args.batch_size
        out["train_mfu"] = perf.mfu(
            out["d12"]["train_tflops_per_step"] * 1e12,
            out["d12"]["train_step_ms"] / 1e3,
            peak_total,
        )
        print(f"d12 train-step MFU {out['train_mfu']:.1%} of the measured matmul peak")
    print(f"tiny train-step MFU {out['tiny']['train_mfu']:.1%} of the measured matmul peak")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
