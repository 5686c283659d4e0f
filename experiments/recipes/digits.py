"""The regularising recipe's effect on small data: the embedded digits ViT trained without and
with DeiT's augmentation and regularisation, held-out accuracy side by side.

    python experiments/recipes/digits.py --root workdirs/recipes [--steps 1000]

Runs configs/vit.py:tiny_rgb (the tiny preset's crop augmentation, digits in three channels)
and configs/vit.py:tiny_recipe (Inception crop 0.35-1, RandAugment m9-mstd0.5, random erasing
0.25, Mixup 0.8 / CutMix 1.0, label smoothing 0.1, drop path 0.1) for the same steps and seed.
Writes results.md and results.json beside this file; the last line printed is the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from configs import vit  # noqa: E402
from vitok import train  # noqa: E402
from vitok.train import run_options  # noqa: E402

PRESETS = ("tiny_rgb", "tiny_recipe")


def train_accuracy(workdir: str) -> float:
    """The mean training accuracy over the last 10% of the logged steps (on augmented,
    possibly mixed batches against their hard labels)."""
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    values = [r["train/accuracy"] for r in rows if "train/accuracy" in r]
    tail = values[-max(1, len(values) // 10) :]
    return sum(tail) / len(tail)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="workdirs/recipes")
    parser.add_argument("--steps", type=int, default=0, help="0: the preset's total_steps")
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = parser.parse_args(argv)
    rows = {}
    for preset in PRESETS:
        config = vit.get_config(preset)
        if args.steps:
            config.total_steps = args.steps
            config.eval_every = config.checkpoint_every = args.steps
        run_options(config)
        workdir = os.path.join(args.root, preset)
        t0 = time.perf_counter()
        final = train.train_and_evaluate(config, workdir)
        rows[preset] = {
            "test_accuracy": final["eval/accuracy"],
            "test_loss": final["eval/loss"],
            "train_accuracy_last10pct": train_accuracy(workdir),
            "seconds": time.perf_counter() - t0,
            "steps": config.total_steps,
        }
    lines = [
        "| preset | held-out accuracy | held-out loss | train accuracy (last 10%) | steps | s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for preset, r in rows.items():
        lines.append(
            f"| {preset} | {r['test_accuracy']:.4f} | {r['test_loss']:.4f} | "
            f"{r['train_accuracy_last10pct']:.4f} | {r['steps']} | {r['seconds']:.0f} |"
        )
    summary = {
        "baseline_accuracy": rows["tiny_rgb"]["test_accuracy"],
        "recipe_accuracy": rows["tiny_recipe"]["test_accuracy"],
        "difference": rows["tiny_recipe"]["test_accuracy"] - rows["tiny_rgb"]["test_accuracy"],
        "runs": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print("\n".join(lines))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
