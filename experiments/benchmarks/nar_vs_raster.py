"""NAR vs raster AR decoding throughput: same backbone, same batch, a 16x16 token grid.

    python experiments/benchmarks/nar_vs_raster.py [--size b] [--batch_size 1] [--cfg_scale 2]

Builds one generator shape twice, as NAR (``model.name=nar``: n + m - 1 = 31 passes, with its
extra block and column head) and as raster AR (``ar``: 256 passes), both with KV caches and
class-conditional CFG, and times a whole jitted ``sample`` call (median of --repeats after a
compile/warm-up call). NAR is timed three ways: with one loop per exact diagonal width (the
default sampler: no padded rows, 30 loop bodies to compile), with its passes in power-of-two
width buckets (8 bodies), and as a single loop at the full diagonal width. Random weights: the cost of
decoding does not depend on their values.

Sizes: "b" is NAR-B / LlamaGen-B (width 768, 12 layers, 12 heads, 16,384 codes, their LLaMA
block with 2D RoPE, as the converted releases); "small" is
width 256, 4 layers, 1,024 codes (seconds). The last line printed is one JSON object with
``nar_passes``, ``raster_passes`` and ``speedup`` (NAR images/s over raster images/s).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.dirname(__file__))

from common import median_seconds  # noqa: E402

from vitok.models.nar import TokenGenerator, sample  # noqa: E402

SIZES = {
    "b": dict(
        width=768,
        depth=12,
        num_heads=12,
        vocab_size=16384,
        norm="rms",
        mlp="swiglu",
        use_bias=False,
        posemb="rope2d",
    ),  # fmt: skip
    "small": dict(width=256, depth=4, num_heads=4, vocab_size=1024),
}


def sampler(order: str, size: str, batch: int, cfg_scale: float, buckets: bool | str):
    """A jitted () -> sample(...) closure and the model's parameter count."""
    model = TokenGenerator(
        grid=(16, 16), num_classes=1000, order=order, scan_layers=True, rngs=nnx.Rngs(0),
        **SIZES[size],
    )  # fmt: skip
    graphdef, state = nnx.split(model)
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

    @jax.jit
    def run(state, labels, rng):
        return sample(nnx.merge(graphdef, state), labels, rng, cfg_scale=cfg_scale,
                      buckets=buckets)  # fmt: skip

    labels = jnp.arange(batch, dtype=jnp.int32) % 1000
    calls = iter(range(1 << 30))
    return (lambda: run(state, labels, jax.random.key(next(calls)))), run, state, labels, params


def measure(order: str, args, buckets: bool | str = True) -> dict:
    fn, run, state, labels, params = sampler(
        order, args.size, args.batch_size, args.cfg_scale, buckets
    )
    start = time.perf_counter()
    jax.block_until_ready(fn())  # compile + first run
    first_call = time.perf_counter() - start
    seconds = median_seconds(fn, args.repeats)
    passes = int(run(state, labels, jax.random.key(0))["passes"])
    out = {
        "passes": passes,
        "seconds": seconds,
        "images_per_sec": args.batch_size / seconds,
        "ms_per_pass": 1e3 * seconds / passes,
        "params_m": params / 1e6,
        "compile_and_first_s": first_call,
    }
    print(f"{order:9s} buckets={buckets!s:5s} {out}", file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="b")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--cfg_scale", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    nar = measure("neighbour", args, buckets="exact")
    nar_pow2 = measure("neighbour", args, buckets=True)
    nar_one_loop = measure("neighbour", args, buckets=False)
    raster = measure("raster", args)
    result = {
        "device": jax.devices()[0].platform,
        "size": args.size,
        "batch_size": args.batch_size,
        "cfg_scale": args.cfg_scale,
        "nar_params_m": round(nar["params_m"], 1),
        "raster_params_m": round(raster["params_m"], 1),
        "nar_passes": nar["passes"],
        "raster_passes": raster["passes"],
        "nar_images_per_sec": round(nar["images_per_sec"], 4),
        "nar_pow2_images_per_sec": round(nar_pow2["images_per_sec"], 4),
        "nar_one_loop_images_per_sec": round(nar_one_loop["images_per_sec"], 4),
        "raster_images_per_sec": round(raster["images_per_sec"], 4),
        "nar_ms_per_pass": round(nar["ms_per_pass"], 2),
        "raster_ms_per_pass": round(raster["ms_per_pass"], 2),
        "speedup": round(nar["images_per_sec"] / raster["images_per_sec"], 3),
        "speedup_pow2": round(nar_pow2["images_per_sec"] / raster["images_per_sec"], 3),
        "speedup_one_loop": round(nar_one_loop["images_per_sec"] / raster["images_per_sec"], 3),
        "compile_s": {
            "nar": round(nar["compile_and_first_s"] - nar["seconds"], 1),
            "nar_pow2": round(nar_pow2["compile_and_first_s"] - nar_pow2["seconds"], 1),
            "raster": round(raster["compile_and_first_s"] - raster["seconds"], 1),
        },
        "pass_ratio": round(raster["passes"] / nar["passes"], 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
