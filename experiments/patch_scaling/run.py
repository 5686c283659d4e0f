"""The patch-size scaling study on the CPU: one recipe, patch sizes down to 1x1.

    python experiments/patch_scaling/run.py --workdir workdirs/patch_scaling \
        [--tasks digits digits_seg digits_fg photos] [--patch_sizes 14 7 4 2 1] [--steps 300] \
        [--progressive] [--finished_only]

For each task and patch size it trains ``configs/patch_scaling.py:<task>_p<P>`` from scratch
(same steps, batch, optimiser and augmentation for every size) and records the held-out metric
(top-1 accuracy for ``digits`` and ``photos``, mIoU for ``digits_seg`` and ``digits_fg``), the
analytic forward GFLOPs per image, the peak memory of one compiled training step (XLA's
accounting) and the median training step time. It writes ``results.json``, ``results.md`` (one
table per task) and ``patch_scaling.png`` (metric against patch size and against sequence
length). A finished (task, size) run is read back, not retrained, so the sweep can be resumed;
``--finished_only`` tabulates what has finished without training. ``--progressive`` adds the
two-stage progressive-resolution recipe (14x14 then 28x28 digits at patch 2).
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

from flax import nnx  # noqa: E402

from configs import patch_scaling  # noqa: E402
from vitok import train  # noqa: E402
from vitok.models import ModelHandle  # noqa: E402
from vitok.models.vit import vit_forward_flops  # noqa: E402
from vitok.perf import compiled_peak_bytes  # noqa: E402
from vitok.registry import TASKS  # noqa: E402

METRIC = {
    "digits": ("eval/accuracy", "top-1 accuracy"),
    "digits_seg": ("eval/miou", "mIoU, 11 classes"),
    "digits_fg": ("eval/miou", "mIoU, foreground / background"),
    "photos": ("eval/accuracy", "top-1 accuracy, photo of origin (7, colour)"),
    "photos_gray": ("eval/accuracy", "top-1 accuracy, photo of origin (10, grayscale)"),
}


def train_step_peak_mib(config) -> float:
    """Peak memory (arguments + outputs + temporaries) of one compiled loss-and-gradient step at
    the config's batch size, from XLA's memory analysis; nothing is allocated."""
    handle = ModelHandle.abstract(config.model, config.seed)
    task = TASKS.lookup(config.task)(config)
    params, extra = (
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(state))
        for state in (handle.param_template, handle.extra_template)
    )
    b, (h, w), c = config.batch_size, config.model.image_size, config.model.channels
    batch = {"image": jax.ShapeDtypeStruct((b, h, w, c), jnp.float32)}
    if config.task == "segmentation":
        batch["segmentation"] = jax.ShapeDtypeStruct((b, h, w), jnp.int32)
    else:
        batch["label"] = jax.ShapeDtypeStruct((b,), jnp.int32)

    def loss(params, extra, batch, rng):
        return task.loss(handle.merge(params, extra), batch, rng)[0]

    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    compiled = jax.jit(jax.grad(loss)).lower(params, extra, batch, rng).compile()
    return compiled_peak_bytes(compiled) / 2**20


def read_rows(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def last_metric(workdir: str, key: str) -> float:
    """The last logged value of ``key`` (also for a run that had already finished, which
    ``train_and_evaluate`` does not evaluate again)."""
    values = [r[key] for r in read_rows(workdir) if key in r]
    if not values:
        raise ValueError(f"{workdir} logged no {key!r}")
    return float(values[-1])


def run_one(task: str, patch_size: int, steps: int, root: str) -> dict:
    preset = f"{task}_p{patch_size}"
    config = patch_scaling.get_config(preset)
    with config.unlocked():
        config.total_steps = steps
        config.eval_every = steps
        config.checkpoint_every = steps
    workdir = os.path.join(root, preset)
    result_path = os.path.join(workdir, "result.json")
    if os.path.exists(result_path):
        with open(result_path) as f:
            return json.load(f)
    start = time.perf_counter()
    train.train_and_evaluate(config, workdir)
    wall = time.perf_counter() - start
    rows = read_rows(workdir)
    step_rates = [r["perf/steps_per_sec"] for r in rows if "perf/steps_per_sec" in r][1:]
    key, _ = METRIC[task]
    h, w = config.model.image_size
    result = {
        "task": task,
        "patch_size": patch_size,
        "tokens": (h // patch_size) * (w // patch_size),
        "metric": last_metric(workdir, key),
        "steps": steps,
        "gflops_per_image": vit_forward_flops(**config.model) / 1e9,
        "train_step_peak_mib": train_step_peak_mib(config),
        "ms_per_step": 1000.0 / float(np.median(step_rates)) if step_rates else float("nan"),
        "wall_s": wall,
    }
    with open(result_path, "w") as f:
        json.dump(result, f)
    return result


def run_progressive(root: str) -> dict:
    """The progressive-resolution recipe at CPU size (``digits_progressive_s1`` then ``_s2``,
    started from stage 1's weights): held-out accuracy after each stage and the total cost.
    The stages keep their presets' steps (300 + 100) whatever ``--steps`` says."""
    path = os.path.join(root, "progressive.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    out = {"wall_s": 0.0}
    for stage in (1, 2):
        config = patch_scaling.get_config(f"digits_progressive_s{stage}")
        workdir = os.path.join(root, f"digits_progressive_s{stage}")
        if stage == 2:
            with config.unlocked():
                config.init_from.workdir = os.path.join(root, "digits_progressive_s1")
        start = time.perf_counter()
        train.train_and_evaluate(config, workdir)
        out["wall_s"] += time.perf_counter() - start
        h, w = config.model.image_size
        out[f"s{stage}"] = {
            "image_size": h,
            "tokens": (h // config.model.patch_size) * (w // config.model.patch_size),
            "steps": config.total_steps,
            "accuracy": last_metric(workdir, "eval/accuracy"),
        }
    with open(path, "w") as f:
        json.dump(out, f)
    return out


def progressive_markdown(prog: dict, results: list[dict]) -> str:
    scratch = [r for r in results if r["task"] == "digits" and r["patch_size"] == 2]
    lines = [
        "### progressive resolution (digits, patch 2)\n",
        "| run | tokens | steps | top-1 accuracy |",
        "|---|---:|---:|---:|",
    ]
    for stage, name in ((1, "stage 1: 14x14"), (2, "stage 2: 28x28, from stage 1")):
        s = prog[f"s{stage}"]
        lines.append(f"| {name} | {s['tokens']} | {s['steps']} | {s['accuracy']:.4f} |")
    for r in scratch:
        lines.append(
            f"| from scratch at 28x28 | {r['tokens']} | {r['steps']} | {r['metric']:.4f} |"
        )
    lines.append(f"\nProgressive total wall time: {prog['wall_s']:.0f} s")
    if scratch:
        lines[-1] += f" (from scratch: {scratch[0]['wall_s']:.0f} s)."
    return "\n".join(lines) + "\n"


def markdown(results: list[dict]) -> str:
    lines = []
    for task in dict.fromkeys(r["task"] for r in results):
        _, label = METRIC[task]
        lines += [
            f"### {task} ({label}, held out)",
            "",
            f"| patch | tokens | {label} | GFLOPs / image (fwd) | train-step peak MiB | "
            "ms / step | wall s |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in sorted((r for r in results if r["task"] == task), key=lambda r: -r["patch_size"]):
            lines.append(
                f"| {r['patch_size']} | {r['tokens']} | {r['metric']:.4f} | "
                f"{r['gflops_per_image']:.3f} | {r['train_step_peak_mib']:.0f} | "
                f"{r['ms_per_step']:.0f} | {r['wall_s']:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in results))
    fig, axes = plt.subplots(len(tasks), 2, figsize=(9, 3.2 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks, strict=True):
        rs = sorted((r for r in results if r["task"] == task), key=lambda r: r["patch_size"])
        metric = [r["metric"] for r in rs]
        for ax, x, xlabel in (
            (row[0], [r["patch_size"] for r in rs], "patch size"),
            (row[1], [r["tokens"] for r in rs], "sequence length (tokens)"),
        ):
            ax.plot(x, metric, "o-")
            ax.set_xscale("log")
            ax.minorticks_off()
            ax.set_xticks(x, [str(v) for v in x])
            ax.set_xlabel(xlabel)
            ax.set_ylabel(METRIC[task][1])
            ax.set_title(task)
            ax.grid(True, alpha=0.3)
        row[0].invert_xaxis()  # smaller patches to the right
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="workdirs/patch_scaling")
    parser.add_argument("--tasks", nargs="+", default=list(METRIC), choices=METRIC)
    parser.add_argument(
        "--patch_sizes", nargs="+", type=int, default=None,
        help="default: each task's sizes (digits 14 7 4 2 1, photos 16 8 4 2 1); sizes a task "
        "does not have are skipped",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=patch_scaling.STUDY_STEPS)
    parser.add_argument(
        "--finished_only", action="store_true",
        help="train nothing: tabulate the (task, size) runs that have finished",
    )  # fmt: skip
    parser.add_argument(
        "--progressive", action="store_true",
        help="also run the two-stage progressive-resolution recipe (digits_progressive_s1/2)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    results = []
    for task in args.tasks:
        _, sizes = patch_scaling.STUDY_TASKS[task]
        for p in [p for p in args.patch_sizes or sizes if p in sizes]:
            preset = f"{task}_p{p}"
            if args.finished_only and not os.path.exists(
                os.path.join(args.workdir, preset, "result.json")
            ):
                continue
            r = run_one(task, p, args.steps, args.workdir)
            print(json.dumps(r), flush=True)
            results.append(r)
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    table = markdown(results)
    progressive_done = os.path.exists(os.path.join(args.workdir, "progressive.json"))
    if progressive_done or (args.progressive and not args.finished_only):
        table += "\n" + progressive_markdown(run_progressive(args.workdir), results)
    with open(os.path.join(args.workdir, "results.md"), "w") as f:
        f.write(table)
    plot(results, os.path.join(args.workdir, "patch_scaling.png"))
    print(table)


if __name__ == "__main__":
    main()
