"""KARL on the CPU: calibration, complexity, single pass vs search, and a labelled grid.

    python experiments/karl/run.py --root workdirs/karl [--flextok_workdir DIR] [--out DIR]

1. tokenizer   configs/karl.py:tiny trained in root/karl_tiny (skipped when it has finished)
2. calibration held-out photo crops tokenized at each requested quality ε in one encoder pass:
               achieved mean L1 (on [0, 1] pixels), the share of images above ε (and above
               ε + 0.01 / 0.02 / 0.03; the paper's Table 3 form), the mean token count
3. complexity  the mean predicted token count at fixed requests for flat colours,
               chessboards, digits, held-out photo crops (in distribution) and uniform noise,
               and L1 at the largest and smallest budget: Δ = L1(min) - L1(max) tells noise
               (high count, Δ about 0: nothing to gain from tokens) from structure (high
               count, large Δ)
4. search      single pass against a test-time search (ALIT's): encode at each budget, keep the
               shortest whose reconstruction meets ε (KARL's own budgets, and FlexTok's k
               where --flextok_workdir is given), with token counts and encoder/decoder passes
5. report      results_cpu.json, results_cpu.md, calibration.png and grid.png into --out; the
               last line printed is the JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs import karl as karl_configs  # noqa: E402
from vitok import runs, train  # noqa: E402
from vitok.data import pipeline  # noqa: E402
from vitok.evaluators.adaptive import MARGINS, calibration_table  # noqa: E402
from vitok.models.karl import per_image_l1  # noqa: E402

QUALITIES = (0.03, 0.05, 0.07, 0.09, 0.12, 0.16)
COMPLEXITY_QUALITIES = (0.05, 0.09)
GRID_QUALITIES = (0.03, 0.07, 0.12, 0.2)


def finished(workdir: str, steps: int) -> bool:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return any(json.loads(line).get("step") == steps for line in f)


# --- image sets ----------------------------------------------------------------------------------


def held_out_photos(config, limit: int = 256) -> np.ndarray:
    """The run's held-out photo crops, [N, H, W, 3] in [-1, 1]."""
    data = config.evals.recon.data
    batches = pipeline.eval_batches(data, global_batch_size=128, max_examples=limit)
    return np.concatenate([b["image"][b["mask"] > 0] for b in batches]).astype(np.float32)


def flat_colours(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    colours = rng.uniform(-1, 1, (n, 1, 1, 3))
    return np.broadcast_to(colours, (n, size, size, 3)).astype(np.float32)


def chessboards(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Two random colours in squares of 2, 4 or 8 px."""
    out = []
    for i in range(n):
        square = (2, 4, 8)[i % 3]
        y, x = np.mgrid[:size, :size] // square
        a, b = rng.uniform(-1, 1, (2, 3))
        out.append(np.where(((y + x) % 2 == 0)[..., None], a, b))
    return np.stack(out).astype(np.float32)


def digits(n: int, size: int) -> np.ndarray:
    """scikit-learn's 8x8 digits, bilinearly upsampled, white on black, as RGB."""
    from sklearn.datasets import load_digits

    x = load_digits().images[:n].astype(np.float32) / 16.0  # [n, 8, 8] in [0, 1]
    x = np.asarray(jax.image.resize(jnp.asarray(x), (len(x), size, size), "linear"))
    return np.repeat(np.clip(x, 0, 1)[..., None] * 2 - 1, 3, axis=-1)


def uniform_noise(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


# --- KARL passes ---------------------------------------------------------------------------------


class KARLRun:
    """Jitted single passes of a trained KARL run: (reconstructions, token counts, L1)."""

    def __init__(self, workdir: str):
        self.run = runs.load_run(workdir)
        self.model = self.run.module()
        self.max_tokens = self.model.max_tokens
        handle = self.run.model

        def passes(params, extra, images, quality, budget):
            model = handle.merge(params, extra)
            recon, tokens = model.reconstruct(images, quality, budget)
            return recon, tokens, per_image_l1(recon, images)

        self._passes = jax.jit(passes)

    def __call__(self, images: np.ndarray, quality: float, budget: int | None = None):
        budget = self.max_tokens if budget is None else budget
        out = self._passes(
            self.run.params, self.run.extra, jnp.asarray(images), jnp.float32(quality),
            jnp.int32(budget),
        )  # fmt: skip
        return tuple(np.asarray(x) for x in out)


def calibration(karl: KARLRun, images: np.ndarray) -> list[dict]:
    rows = []
    for q in QUALITIES:
        _, tokens, l1 = karl(images, q)
        over = l1 > q
        row = {"quality": q, "l1": float(l1.mean()), "tokens": float(tokens.mean())}
        row.update({f"over_{m:.2f}": float(np.mean(l1 > q + m)) for m in MARGINS})
        row["l1_over"] = float(l1[over].mean()) if over.any() else 0.0
        row["tokens_std"] = float(tokens.std())
        rows.append(row)
    return rows


def complexity(karl: KARLRun, sets: dict[str, np.ndarray], t_min: int) -> list[dict]:
    rows = []
    for name, images in sets.items():
        row = {"images": name, "n": len(images)}
        for q in COMPLEXITY_QUALITIES:
            _, tokens, l1 = karl(images, q)
            row[f"tokens@{q:g}"] = float(tokens.mean())
            row[f"l1@{q:g}"] = float(l1.mean())
        row["l1_max_budget"] = float(karl(images, 0.0)[2].mean())
        row["l1_min_budget"] = float(karl(images, 0.0, t_min)[2].mean())
        row["gap"] = row["l1_min_budget"] - row["l1_max_budget"]
        rows.append(row)
    return rows


def karl_search(karl: KARLRun, images: np.ndarray, quality: float, budgets) -> dict:
    """ALIT's test-time search over KARL's budgets (fixed count, lowest bin): the shortest
    budget whose reconstruction meets the request, else the largest; passes = budgets tried."""
    l1 = np.stack([karl(images, 0.0, t)[2] for t in budgets], axis=1)  # [N, budgets]
    meets = l1 <= quality
    first = np.where(meets.any(1), meets.argmax(1), len(budgets) - 1)
    chosen = np.asarray(budgets)[first]
    return {
        "tokens": float(chosen.mean()),
        "passes": float((first + 1).mean()),
        "l1": float(l1[np.arange(len(images)), first].mean()),
        "met": float(meets.any(1).mean()),
    }


def flextok_search(workdir: str, images: np.ndarray, quality: float) -> dict:
    """The same search over FlexTok's nested prefixes: one encoder pass, then decode the first
    k tokens for k = 1, 2, 4, ... (mean decode: one step) until the request is met."""
    from vitok.inference import Tokenizer

    tok = Tokenizer.from_workdir(workdir)
    ids = tok.tokenize(images)
    counts = [2**i for i in range(int(np.log2(tok.num_tokens)) + 1)]
    options = dict(tok.model.mean_decode_options or {})
    target = np.clip((images + 1) / 2, 0, 1)
    l1 = []
    for k in counts:
        recon = tok.detokenize(ids[:, :k], **options).astype(np.float32) / 255.0
        l1.append(np.abs(recon - target).mean(axis=(1, 2, 3)))
    l1 = np.stack(l1, axis=1)
    meets = l1 <= quality
    first = np.where(meets.any(1), meets.argmax(1), len(counts) - 1)
    return {
        "tokens": float(np.asarray(counts)[first].mean()),
        "decoder_passes": float((first + 1).mean()),
        "l1": float(l1[np.arange(len(images)), first].mean()),
        "met": float(meets.any(1).mean()),
    }


# --- report --------------------------------------------------------------------------------------


def labelled_grid(path: str, karl: KARLRun, images: np.ndarray, scale: int = 3) -> list[list]:
    """Rows: images; columns: reconstructions at GRID_QUALITIES, then the original; each tile
    labelled with its token count. Returns the counts [rows][columns]."""
    from PIL import Image, ImageDraw

    columns, counts = [], []
    for q in GRID_QUALITIES:
        recon, tokens, _ = karl(images, q)
        columns.append(recon)
        counts.append(tokens)
    columns.append(images)
    n, h, w, _ = images.shape
    th, tw, label, border = h * scale, w * scale, 14, 4
    canvas = Image.new(
        "RGB",
        (len(columns) * (tw + border) + border, 18 + n * (th + label + border) + border),
        "white",
    )
    draw = ImageDraw.Draw(canvas)
    for j, q in enumerate(GRID_QUALITIES):
        draw.text((border + j * (tw + border), 3), f"eps={q:g}", fill="black")
    draw.text((border + len(GRID_QUALITIES) * (tw + border), 3), "original", fill="black")
    for i in range(n):
        for j, column in enumerate(columns):
            tile = np.clip((column[i] + 1) * 127.5, 0, 255).round().astype(np.uint8)
            tile = Image.fromarray(tile).resize((tw, th), Image.NEAREST)
            x, y = border + j * (tw + border), 18 + border + i * (th + label + border)
            canvas.paste(tile, (x, y))
            if j < len(GRID_QUALITIES):
                draw.text((x, y + th + 1), f"{int(counts[j][i])} tokens", fill="black")
    canvas.save(path)
    return [[int(c[i]) for c in counts] for i in range(n)]


def plot_calibration(path: str, rows: list[dict], max_tokens: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q = [r["quality"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    a.plot(q, [r["l1"] for r in rows], "o-", label="achieved (mean)")
    a.plot(q, q, "k--", lw=1, label="requested")
    a.set_xlabel("requested L1 ε")
    a.set_ylabel("held-out L1")
    a.legend()
    a.set_title("calibration")
    b.plot(q, [r["tokens"] for r in rows], "o-")
    b.set_ylim(0, max_tokens + 1)
    b.set_xlabel("requested L1 ε")
    b.set_ylabel("mean tokens per image")
    b.set_title(f"token count (of {max_tokens})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(path: str, result: dict) -> None:
    cal, comp, search = result["calibration"], result["complexity"], result["search"]
    t = result["max_tokens"]
    lines = [
        f"# KARL tiny on the CPU ({result['steps']} steps, {result['train_minutes']:.1f} min "
        f"of training; {result['held_out']} held-out photo crops, at most {t} tokens)\n",
        "## Calibration (the paper's Table 3 form; shares in %)\n",
        *calibration_table(cal),
    ]
    qs = COMPLEXITY_QUALITIES
    lines += [
        "\n## Complexity: mean predicted tokens per image set\n",
        "| images | " + " | ".join(f"tokens @ ε={q:g}" for q in qs)
        + f" | L1 @ {t} tokens | L1 @ {result['t_min']} tokens | Δ = L1(min) − L1(max) |",
        "|" + "---|" * (len(qs) + 4),
    ]  # fmt: skip
    for r in comp:
        cells = " | ".join(f"{r[f'tokens@{q:g}']:.1f}" for q in qs)
        lines.append(
            f"| {r['images']} | {cells} | {r['l1_max_budget']:.4f} | "
            f"{r['l1_min_budget']:.4f} | {r['gap']:.4f} |"
        )
    lines += [f"\n{result['complexity_verdict']}\n"]
    lines += [
        "\n## Single pass vs test-time search (held-out crops)\n",
        "| requested ε | KARL one pass: tokens, L1, met | passes | KARL search: tokens, L1, met "
        "| passes (enc+dec each) | FlexTok search over k: tokens, L1, met | passes |",
        "|" + "---|" * 7,
    ]
    for s in search:
        row = (
            f"| {s['quality']:.2f} | {s['single']['tokens']:.1f}, {s['single']['l1']:.4f}, "
            f"{100 * s['single']['met']:.0f}% | 1 enc + 1 dec | {s['karl']['tokens']:.1f}, "
            f"{s['karl']['l1']:.4f}, {100 * s['karl']['met']:.0f}% | {s['karl']['passes']:.2f} x 2 |"
        )
        if "flextok" in s:
            f = s["flextok"]
            row += (
                f" {f['tokens']:.1f}, {f['l1']:.4f}, {100 * f['met']:.0f}% | 1 enc + "
                f"{f['decoder_passes']:.2f} dec |"
            )
        else:
            row += " (no --flextok_workdir) | |"
        lines.append(row)
    lines += [
        "\n'met': the share of images whose reconstruction meets the request. A search that "
        "cannot meet it keeps the largest budget.\n",
        "## Grid\n",
        "grid.png: rows are held-out crops, columns the reconstructions at ε = "
        + ", ".join(f"{q:g}" for q in GRID_QUALITIES)
        + " (each labelled with its token count), then the original.\n",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def complexity_verdict(rows: list[dict]) -> str:
    """Per fixed request: the order of the image sets by mean tokens, whether it is the paper's
    (flat colours fewest, photos between, noise at the maximum), and whether noise has the
    smallest Δ (more tokens do not help it, unlike structure)."""
    by = {r["images"]: r for r in rows}
    lines = []
    for q in COMPLEXITY_QUALITIES:
        key = f"tokens@{q:g}"
        order = " < ".join(
            f"{r['images']} ({r[key]:.1f})" for r in sorted(rows, key=lambda r: r[key])
        )
        flat, photos, noise = (by[n][key] for n in ("flat colour", "photo crops", "uniform noise"))
        paper = flat < photos <= noise and noise == max(r[key] for r in rows)
        lines.append(f"At ε={q:g}: {order}; the paper's order: {'yes' if paper else 'no'}.")
    gap = by["uniform noise"]["gap"] < min(r["gap"] for r in rows if r["images"] != "uniform noise")
    lines.append(
        f"Noise has the smallest Δ = L1(min) - L1(max) ({by['uniform noise']['gap']:.4f}): "
        f"{'yes' if gap else 'no'}."
    )
    return " ".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="workdirs/karl")
    parser.add_argument("--steps", type=int, default=0, help="0: the preset's")
    parser.add_argument("--flextok_workdir", default="", help="a FlexTok run for the search")
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--images", type=int, default=256, help="held-out crops to use")
    args = parser.parse_args(argv)

    config = karl_configs.get_config("tiny")
    if args.steps:
        config.total_steps = args.steps
    workdir = os.path.join(args.root, "karl_tiny")
    timing = os.path.join(args.root, "train_minutes.json")
    if not finished(workdir, config.total_steps):
        print(f"== training configs/karl.py:tiny for {config.total_steps} steps in {workdir}")
        t0 = time.perf_counter()
        train.train_and_evaluate(config, workdir)
        with open(timing, "w") as f:
            json.dump((time.perf_counter() - t0) / 60, f)
    train_minutes = json.load(open(timing)) if os.path.exists(timing) else float("nan")

    karl = KARLRun(workdir)
    size = karl.model.image_size[0]
    photos = held_out_photos(karl.run.config, args.images)
    rng = np.random.default_rng(0)
    n = 64
    sets = {
        "flat colour": flat_colours(n, size, rng),
        "chessboard": chessboards(n, size, rng),
        "digits (OOD)": digits(n, size),
        "photo crops": photos[:n],
        "uniform noise": uniform_noise(n, size, rng),
    }
    t_min = int(min(karl.run.config.karl.budgets))
    comp = complexity(karl, sets, t_min)
    cal = calibration(karl, photos)
    budgets = sorted(set(min(int(b), karl.max_tokens) for b in karl.run.config.karl.budgets))
    search = []
    for q in (0.05, 0.07, 0.09, 0.12):
        _, tokens, l1 = karl(photos, q)
        row = {
            "quality": q,
            "single": {
                "tokens": float(tokens.mean()), "l1": float(l1.mean()),
                "met": float(np.mean(l1 <= q)),
            },
            "karl": karl_search(karl, photos, q, budgets),
        }  # fmt: skip
        if args.flextok_workdir:
            row["flextok"] = flextok_search(args.flextok_workdir, photos, q)
        search.append(row)
    os.makedirs(args.out, exist_ok=True)
    grid_counts = labelled_grid(os.path.join(args.out, "grid.png"), karl, photos[:8])
    plot_calibration(os.path.join(args.out, "calibration.png"), cal, karl.max_tokens)
    result = {
        "steps": int(karl.run.step), "train_minutes": train_minutes, "held_out": len(photos),
        "max_tokens": karl.max_tokens, "t_min": t_min, "calibration": cal, "complexity": comp,
        "complexity_verdict": complexity_verdict(comp), "search": search,
        "grid_token_counts": grid_counts,
    }  # fmt: skip
    with open(os.path.join(args.out, "results_cpu.json"), "w") as f:
        json.dump(result, f, indent=1)
    write_markdown(os.path.join(args.out, "results_cpu.md"), result)
    print(open(os.path.join(args.out, "results_cpu.md")).read())
    summary = {
        f"over@{r['quality']:g}": round(r["over_0.00"], 3) for r in cal
    } | {f"tokens@{r['quality']:g}": round(r["tokens"], 2) for r in cal} | {
        f"{r['images']}_tokens": round(r[f"tokens@{COMPLEXITY_QUALITIES[0]:g}"], 2)
        for r in comp
    }  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
