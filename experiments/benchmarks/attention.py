"""Peak memory and time of attention forward+backward per backend and sequence length.

    python experiments/benchmarks/attention.py [--lengths 3136 12544 50176] [--skip_block]

Lengths are the token counts of a 224px image at patch sizes 4, 2 and 1. Heads and head size
are ViT-Ti's (3 x 64), batch 1. Peak memory is XLA's own accounting of the compiled
forward+backward (arguments + outputs + temporaries), so it is exact and repeatable; "working"
memory is the temporaries alone, what a backend needs beyond q, k, v and their gradients (those
grow 4x per 4x of length under any backend). Time is the median of a few runs. Dense attention is skipped where its [L, L] scores would not fit in
``--dense_limit_gib``. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from flax import nnx  # noqa: E402

from vitok.nn import attention as attn  # noqa: E402
from vitok.nn.flash import chunked_attention, default_chunk  # noqa: E402
from vitok.nn.transformer import Block  # noqa: E402
from vitok.perf import compiled_peak_bytes  # noqa: E402

HEADS, HEAD_DIM = 3, 64


def compiled_working_bytes(compiled) -> int:
    """Temporaries only: the memory beyond the inputs and their gradients (which every backend
    holds alike and which grow 4x per 4x of length by themselves)."""
    return int(compiled.memory_analysis().temp_size_in_bytes)


def median_seconds(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def attention_fwd_bwd(
    backend: str, length: int, repeats: int, dtype: str = "float32", chunk: int | None = None
) -> tuple[float, float, float]:
    """(peak MiB, working MiB, median ms) of grad(sum(attention(q, k, v))) at batch 1;
    ``chunk``: the chunked backend's block size (default: ``flash.default_chunk(B * H)``)."""
    shape = (1, length, HEADS, HEAD_DIM)

    def loss(q, k, v):
        if chunk is not None:
            return chunked_attention(q, k, v, attn.FullMask(), q_chunk=chunk, k_chunk=chunk).sum()
        return attn.attention(q, k, v, backend=backend).sum()

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    q = jax.random.normal(jax.random.key(0), shape, dtype)
    compiled = grad.lower(q, q, q).compile()
    seconds = median_seconds(compiled, q, q, q, repeats=repeats)
    return (
        compiled_peak_bytes(compiled) / 2**20,
        compiled_working_bytes(compiled) / 2**20,
        1e3 * seconds,
    )


def vit_block_fwd_bwd(
    length: int, backend: str = "chunked", dtype: str = "float32"
) -> tuple[float, float]:
    """(peak MiB, seconds) of one ViT-Ti block forward+backward at batch 1 (float32 weights,
    activations in ``dtype``)."""
    block = Block(192, HEADS, 768, rngs=nnx.Rngs(0), attention_backend=backend, dtype=dtype)
    graphdef, state = nnx.split(block)
    x = jax.random.normal(jax.random.key(0), (1, length, 192), dtype)
    grad = jax.jit(jax.grad(lambda s, x: nnx.merge(graphdef, s)(x).sum()))
    compiled = grad.lower(state, x).compile()
    start = time.perf_counter()  # compiled ahead of time: one call, no warm-up
    jax.block_until_ready(compiled(state, x))
    return compiled_peak_bytes(compiled) / 2**20, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[3136, 12544, 50176])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dense_limit_gib", type=float, default=6.0)
    parser.add_argument("--skip_block", action="store_true", help="skip the 50,176-token block")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32",
        help="q, k, v dtype (cuDNN flash attention takes bfloat16/float16 only)",
    )  # fmt: skip
    parser.add_argument("--block_backend", default="chunked", help="the ViT block's attention")
    parser.add_argument(
        "--chunk_sweep", type=int, nargs="*", default=[],
        help="also time the chunked backend at these block sizes (to tune default_chunk)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.dtype == "float32" and jax.default_backend() == "gpu":
        print("note: cuDNN is skipped in float32; pass --dtype bfloat16 to compare it", flush=True)

    cudnn_usable = jax.default_backend() == "gpu" and args.dtype != "float32"
    backends = ["dense", "chunked"] + (["cudnn"] if cudnn_usable else [])
    peak: dict[str, dict[int, float | None]] = {b: {} for b in backends}
    working: dict[str, dict[int, float | None]] = {b: {} for b in backends}
    ms: dict[str, dict[int, float | None]] = {b: {} for b in backends}
    for length in args.lengths:
        for backend in backends:
            scores_gib = 3 * HEADS * length**2 * 4 / 2**30  # probabilities + 2 gradients
            if backend == "dense" and scores_gib > args.dense_limit_gib:
                peak[backend][length] = working[backend][length] = ms[backend][length] = None
                print(f"{backend:8s} L={length:6d}: skipped (~{scores_gib:.0f} GiB of scores)")
                continue
            repeats = args.repeats if length <= 12544 else 1
            peak[backend][length], working[backend][length], ms[backend][length] = (
                attention_fwd_bwd(backend, length, repeats, args.dtype)
            )
            print(
                f"{backend:8s} L={length:6d}: peak {peak[backend][length]:9.1f} MiB "
                f"(working {working[backend][length]:9.1f} MiB), {ms[backend][length]:10.1f} ms",
                flush=True,
            )

    sweep: dict[int, dict[int, float]] = {c: {} for c in args.chunk_sweep}
    for chunk in args.chunk_sweep:
        for length in args.lengths:
            repeats = args.repeats if length <= 12544 else 1
            *_, sweep[chunk][length] = attention_fwd_bwd(
                "chunked", length, repeats, args.dtype, chunk
            )
            print(
                f"chunked  L={length:6d} block {chunk:5d}: {sweep[chunk][length]:10.1f} ms",
                flush=True,
            )

    result = {
        "device": jax.devices()[0].device_kind,
        "dtype": args.dtype,
        "default_chunk": default_chunk(HEADS),
        "peak_mib": peak,
        "working_mib": working,
        "ms": ms,
    }
    lengths = sorted(args.lengths)
    for backend in backends:
        pairs = [
            (a, b)
            for a, b in zip(lengths, lengths[1:], strict=False)
            if peak[backend].get(a) and peak[backend].get(b)
        ]
        result[f"{backend}_peak_growth_per_4x"] = [
            peak[backend][b] / peak[backend][a] for a, b in pairs
        ]
        result[f"{backend}_working_growth_per_4x"] = [
            working[backend][b] / working[backend][a] for a, b in pairs
        ]
    if ms["dense"].get(lengths[0]) and ms["chunked"].get(lengths[0]):
        result["chunked_over_dense_time_at_min_length"] = (
            ms["chunked"][lengths[0]] / ms["dense"][lengths[0]]
        )
    if "cudnn" in backends:
        result["chunked_over_cudnn_time"] = {
            n: ms["chunked"][n] / ms["cudnn"][n]
            for n in lengths
            if ms["chunked"][n] and ms["cudnn"][n]
        }
        result["chunked_over_cudnn_peak"] = {
            n: peak["chunked"][n] / peak["cudnn"][n]
            for n in lengths
            if peak["chunked"][n] and peak["cudnn"][n]
        }
    if sweep:
        result["chunk_sweep_ms"] = sweep
    if not args.skip_block:
        block_mib, block_s = vit_block_fwd_bwd(50176, args.block_backend, args.dtype)
        print(
            f"ViT-Ti block ({args.block_backend}), 50,176 tokens, fwd+bwd: "
            f"peak {block_mib:.0f} MiB, {block_s:.2f} s"
        )
        result["vit_block_50176_peak_mib"] = block_mib
        result["vit_block_50176_seconds"] = block_s
    print(json.dumps(result))


if __name__ == "__main__":
    main()
