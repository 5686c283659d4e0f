"""NAR vs raster AR on the embedded digits, end to end on the CPU.

    python experiments/nar/run.py --root workdirs/nar_digits [--steps 3000] [--out experiments/nar]

1. tokenizer   configs/vae.py:mnist_fsq: 28x28 digits -> 7x7 FSQ codes (256-entry codebook)
2. codes       vitok.tools.extract_codes writes root/codes/mnist_{train,test}.npz
3. classifier  configs/vit.py:tiny on the native 28x28 digits: the judge of the samples
4. generators  configs/nar.py:digits_nar and :digits_raster, same backbone, data and recipe;
               each ends with the generation evaluator: 100 samples per class (CFG 2.0),
               decoded by the tokenizer and classified; classifier-feature FID against the
               held-out digits; passes and images/s of sampling; a PNG grid per class
5. report      results.json and results.md (one row per generator) and the sample grids
               copied into --out

Every stage is skipped when its output exists, so the script resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from configs import nar as nar_configs  # noqa: E402
from configs import vae as vae_configs  # noqa: E402
from configs import vit as vit_configs  # noqa: E402
from vitok import train  # noqa: E402
from vitok.tools import extract_codes  # noqa: E402

CLASSIFIER_PP = "decode(channels=1)|value_range(0, 1)"


def finished(workdir: str, steps: int) -> bool:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return any(json.loads(line).get("step") == steps for line in f)


def last_metrics(workdir: str) -> dict:
    merged: dict = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            merged.update(json.loads(line))
    return merged


def train_once(config, workdir: str, what: str) -> dict:
    if not finished(workdir, config.total_steps):
        print(f"== {what}: training {config.total_steps} steps in {workdir}", flush=True)
        t0 = time.perf_counter()
        train.train_and_evaluate(config, workdir)
        print(f"== {what}: {time.perf_counter() - t0:.0f}s", flush=True)
    return last_metrics(workdir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=nar_configs.DIGITS_ROOT)
    parser.add_argument("--steps", type=int, default=0, help="generator steps (0: the preset's)")
    parser.add_argument("--out", default="", help="where to copy results.md and the grids")
    args = parser.parse_args(argv)
    root = args.root
    os.makedirs(root, exist_ok=True)

    tokenizer_dir = os.path.join(root, "tokenizer")
    tok = vae_configs.get_config("mnist_fsq")
    tok_metrics = train_once(tok, tokenizer_dir, "tokenizer")

    codes = os.path.join(root, "codes", "mnist_{split}.npz")
    if not all(os.path.exists(codes.format(split=s)) for s in ("train", "test")):
        extract_codes.main(["--workdir", tokenizer_dir, "--out", codes])

    classifier_dir = os.path.join(root, "classifier")
    clf = vit_configs.get_config("tiny")
    with clf.unlocked():
        clf.data.pp = CLASSIFIER_PP
        clf.evals.test.data.pp = CLASSIFIER_PP
    clf_metrics = train_once(clf, classifier_dir, "classifier")

    rows = {}
    for name in ("nar", "raster"):
        config = nar_configs.get_config(f"digits_{name}")
        with config.unlocked():
            if args.steps:
                config.total_steps = config.eval_every = args.steps
            config.data.path = codes
            config.evals.samples.tokenizer_workdir = tokenizer_dir
            config.evals.samples.classifier_workdir = classifier_dir
        workdir = os.path.join(root, name)
        t0 = time.perf_counter()
        metrics = train_once(config, workdir, name)
        rows[name] = {
            "class_accuracy": metrics["samples/class_accuracy"],
            "fid": metrics["samples/classifier_fid"],
            "passes": metrics["samples/passes"],
            "images_per_sec": metrics["samples/images_per_sec"],
            "real_accuracy": metrics["samples/real_accuracy"],
            "train_loss": metrics["train/loss"],
            "steps": config.total_steps,
            "wall_s": round(time.perf_counter() - t0),
        }

    results = {
        "tokenizer": {k: tok_metrics.get(k) for k in ("eval/psnr", "eval/ssim")},
        "classifier_accuracy": clf_metrics.get("eval/accuracy"),
        "generators": rows,
    }
    with open(os.path.join(root, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    table = [
        "| model | passes (7x7) | class accuracy | classifier-feature FID | images/s | train loss |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        table.append(
            f"| {name} | {r['passes']:.0f} | {r['class_accuracy']:.3f} | {r['fid']:.2f} | "
            f"{r['images_per_sec']:.1f} | {r['train_loss']:.3f} |"
        )
    text = "\n".join(
        [
            "# NAR vs raster AR on the embedded digits (CPU)",
            "",
            f"Tokenizer: 7x7 FSQ codes, 256 entries; held-out PSNR "
            f"{tok_metrics.get('eval/psnr', float('nan')):.2f} dB. Judge: ViT classifier, "
            f"held-out accuracy {clf_metrics.get('eval/accuracy', float('nan')):.3f}. "
            "100 samples per class, CFG 2.0, temperature 1.0.",
            "",
            *table,
            "",
        ]
    )
    with open(os.path.join(root, "results.md"), "w") as f:
        f.write(text)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        shutil.copy(os.path.join(root, "results.md"), os.path.join(args.out, "results_cpu.md"))
        for name in rows:
            shutil.copy(
                os.path.join(root, name, "samples_samples.png"),
                os.path.join(args.out, f"{name}_samples.png"),
            )


if __name__ == "__main__":
    main()
