"""Analytic training cost of the ImageNet presets, and the step time it implies on accelerators.

    python experiments/benchmarks/preset_flops.py

For each preset: tokens per image, the forward FLOPs of one image (the model's own
``forward_flops``, the count the trainer's MFU uses: matmuls at 2 FLOPs per multiply-add,
attention's QK^T and AV included), a training step's FLOPs (forward + backward = 3x forward,
times the global batch), and the step time and whole run that would take at 40% MFU on 8
TPU v5e chips (197 TFLOP/s bf16 each) and on 8 H100 SXM GPUs (989 TFLOP/s dense bf16 each).
The models are built abstractly (``nnx.eval_shape``): nothing is allocated or run. Writes
``preset_flops.md`` beside this file; the last line printed is one JSON object.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from configs import patch_scaling, vit  # noqa: E402
from vitok.models import ModelHandle  # noqa: E402

PRESETS = {
    "vit:i1k_b16": lambda: vit.get_config("i1k_b16"),
    **{
        f"patch_scaling:deit_b_64px_p{p}": (
            lambda p=p: patch_scaling.get_config(f"deit_b_64px_p{p}")
        )
        for p in (16, 8, 4, 2, 1)
    },
    "patch_scaling:deit_b_224px_p1": lambda: patch_scaling.get_config("deit_b_224px_p1"),
    **{
        f"patch_scaling:deit_b_224px_p1_s{s}": (
            lambda s=s: patch_scaling.get_config(f"deit_b_224px_p1_s{s}")
        )
        for s in (1, 2, 3)
    },
}
# The published ImageNet-1k top-1 each preset's run should reproduce (where one exists).
TARGETS = {
    "vit:i1k_b16": "81.8 (DeiT-B, Touvron et al. 2021; at DeiT's batch 1024)",
    **{
        f"patch_scaling:deit_b_64px_p{p}": f"{acc} (Wang et al. 2025, 64px)"
        for p, acc in zip((16, 8, 4, 2, 1), (68.2, 76.9, 80.1, 80.8, 81.3), strict=True)
    },
    "patch_scaling:deit_b_224px_p1": "- (one stage; the paper's 84.6 is the three)",
    "patch_scaling:deit_b_224px_p1_s1": "- (stage 1 of 3)",
    "patch_scaling:deit_b_224px_p1_s2": "- (stage 2 of 3)",
    "patch_scaling:deit_b_224px_p1_s3": "84.6 (Wang et al. 2025, B/1 at 50,176 tokens)",
}
CHIPS = {"tpu_v5e_x8": 8 * 197e12, "h100_x8": 8 * 989e12}
MFU = 0.4


def preset_cost(config) -> dict:
    """Tokens, FLOPs and implied times of one preset's training run."""
    model = ModelHandle.abstract(config.model).module()
    height, width = config.model.image_size
    forward = float(model.forward_flops())
    step = 3 * forward * config.batch_size
    row = {
        "tokens": (height // config.model.patch_size) * (width // config.model.patch_size),
        "image_size": height,
        "batch_size": config.batch_size,
        "total_steps": config.total_steps,
        "forward_gflops_per_image": forward / 1e9,
        "train_pflops_per_step": step / 1e15,
    }
    for chip, peak in CHIPS.items():
        seconds = step / (MFU * peak)
        row[f"{chip}_s_per_step"] = seconds
        row[f"{chip}_days"] = seconds * config.total_steps / 86400
    return row


def table(rows: dict) -> str:
    lines = [
        "| preset | px | tokens | batch | steps | GFLOPs / image (fwd) | PFLOPs / step (train) "
        "| s / step, 8x v5e | days, 8x v5e | s / step, 8x H100 | days, 8x H100 | should reach |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| `{name}` | {r['image_size']} | {r['tokens']:,} | {r['batch_size']:,} "
            f"| {r['total_steps']:,} | {r['forward_gflops_per_image']:,.1f} "
            f"| {r['train_pflops_per_step']:,.3f} | {r['tpu_v5e_x8_s_per_step']:,.2f} "
            f"| {r['tpu_v5e_x8_days']:,.2f} | {r['h100_x8_s_per_step']:,.3f} "
            f"| {r['h100_x8_days']:,.2f} | {TARGETS[name]} |"
        )
    return "\n".join(lines)


def main() -> dict:
    rows = {name: preset_cost(build()) for name, build in PRESETS.items()}
    with open(os.path.join(os.path.dirname(__file__), "preset_flops.md"), "w") as f:
        f.write(f"Analytic cost at {MFU:.0%} MFU (`python {os.path.relpath(__file__)}`).\n\n")
        f.write(table(rows) + "\n")
    print(table(rows))
    result = {name: {k: round(v, 4) for k, v in r.items()} for name, r in rows.items()}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
