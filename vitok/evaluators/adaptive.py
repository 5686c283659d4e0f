"""Adaptive-length calibration: does an image tokenized for a requested quality meet it?

For each requested mean L1 error ε (pixels in [0, 1]), held-out images are tokenized in one
encoder pass at ε, decoded once, and scored: the achieved error, the share of images above the
request (and above ε + 0.01 / 0.02 / 0.03: the paper's Table 3), the mean error of those above,
the mean token count, and PSNR. Any tokenizer with a ``reconstruct(images, quality=)`` that
returns (images, token counts), i.e. KARL.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vitok.evaluators import evaluator_options
from vitok.evaluators.reconstruction import _first_rows, psnr, save_grid, to_unit_range
from vitok.models.karl import per_image_l1
from vitok.registry import EVALUATORS

MARGINS = (0.0, 0.01, 0.02, 0.03)
# Per-quality sums: l1, tokens, psnr, l1 of those over, then one count per margin.
_SUMS = 3 + 1 + len(MARGINS)


def calibration_sums(l1: jax.Array, tokens: jax.Array, psnrs: jax.Array, quality, mask):
    """Per-image scores [B] -> the masked sums [_SUMS] the table is made of."""
    over = (l1 > quality).astype(jnp.float32)
    columns = [l1, tokens.astype(jnp.float32), psnrs, l1 * over]
    columns += [(l1 > quality + m).astype(jnp.float32) for m in MARGINS]
    return jnp.stack([jnp.sum(c * mask) for c in columns])


def calibration_table(rows: list[dict]) -> list[str]:
    """Markdown lines of the calibration table (the paper's Table 3 form; shares in %). Rows
    hold quality, l1, over_<margin>, l1_over, tokens, and optionally tokens_std and psnr."""
    std, with_psnr = "tokens_std" in rows[0], "psnr" in rows[0]
    head = ["requested ε", "achieved L1"] + [f"> ε+{m:g}" if m else "> ε" for m in MARGINS]
    head += ["L1 of those > ε", "mean tokens (std)" if std else "mean tokens"]
    head += ["PSNR"] * with_psnr
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['quality']:.3f}", f"{r['l1']:.4f}"]
        cells += [f"{100 * r[f'over_{m:.2f}']:.0f}" for m in MARGINS]
        tokens = f"{r['tokens']:.1f}" + (f" ({r['tokens_std']:.1f})" if std else "")
        cells += [f"{r['l1_over']:.4f}", tokens] + ([f"{r['psnr']:.2f}"] if with_psnr else [])
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_calibration_table(path: str, rows: list[dict], max_tokens: int) -> None:
    intro = (
        f"Held-out images tokenized at each requested quality in one encoder pass (of at most "
        f"{max_tokens} tokens); L1 on [0, 1] pixels, shares in %.\n"
    )
    with open(path, "w") as f:
        f.write("\n".join([intro, *calibration_table(rows)]) + "\n")


@EVALUATORS.register("adaptive_length")
class AdaptiveLengthEvaluator:
    """Reports ``{prefix}/l1@ε``, ``over@ε`` (share above the request), ``tokens@ε``,
    ``psnr@ε`` for each ε in ``qualities``; writes ``adaptive.md`` (the table) and
    ``adaptive.png`` (rows: images; columns: each ε, then the original)."""

    OPTIONS = {"prefix": "adaptive", "qualities": (0.03, 0.05, 0.07, 0.09), "grid_rows": 8}

    def __init__(self, config: Any, context: Any):
        self.config, self.context = config, context
        options = evaluator_options(config, self.OPTIONS)
        self.prefix = options["prefix"]
        model = context.model.module()
        if not callable(getattr(model, "reconstruct", None)) or "quality" not in dict(
            getattr(model, "tokenize_options", {})
        ):
            raise ValueError(
                f"the adaptive_length evaluator needs a tokenizer that takes a requested "
                f"quality (KARL), not {context.config.model.name!r}"
            )
        self.qualities = [float(q) for q in options["qualities"]]
        bad = [q for q in self.qualities if not 0.0 <= q <= 1.0]
        if bad:
            raise ValueError(f"evaluator {self.prefix!r}: qualities must lie in [0, 1], got {bad}")
        self.grid_rows = int(options["grid_rows"])
        self.max_tokens = int(model.token_shape[0])

        def run(params, extra, images, mask, quality):
            recon, tokens = context.model.merge(params, extra).reconstruct(images, quality)
            scores = psnr(to_unit_range(recon), to_unit_range(images))
            sums = calibration_sums(per_image_l1(recon, images), tokens, scores, quality, mask)
            return sums, to_unit_range(recon), tokens

        self._run = jax.jit(run)

    def evaluate(self, params: Any, extra: Any) -> dict[str, float]:
        totals = np.zeros((len(self.qualities), _SUMS))
        count, grid, counts = 0.0, None, []
        for batch_index, batch in enumerate(self.context.eval_batches(self.config)):
            count += float(batch["mask"].sum())
            columns = []
            for i, q in enumerate(self.qualities):
                sums, recon, tokens = self._run(
                    params, extra, batch["image"], batch["mask"], jnp.float32(q)
                )
                totals[i] += np.asarray(sums)
                if batch_index == 0 and self.grid_rows:
                    columns.append(recon)
                    counts.append(tokens)
            if columns:
                grid = _first_rows(columns + [to_unit_range(batch["image"])], self.grid_rows)
                counts = [np.asarray(c)[: self.grid_rows] for c in _gather(counts)]
        if count == 0:
            raise ValueError(f"evaluator {self.prefix!r} saw no examples")
        results, rows = {}, []
        for q, t in zip(self.qualities, totals, strict=True):
            over = t[3] / max(t[4], 1.0)
            row = {"quality": q, "l1": t[0] / count, "tokens": t[1] / count, "psnr": t[2] / count}
            row.update({f"over_{m:.2f}": t[4 + j] / count for j, m in enumerate(MARGINS)})
            row["l1_over"] = over
            rows.append(row)
            for key in ("l1", "tokens", "psnr"):
                results[f"{self.prefix}/{key}@{q:g}"] = float(row[key])
            results[f"{self.prefix}/over@{q:g}"] = float(row["over_0.00"])
        if jax.process_index() == 0:
            workdir = self.context.workdir
            os.makedirs(workdir, exist_ok=True)
            write_calibration_table(os.path.join(workdir, "adaptive.md"), rows, self.max_tokens)
            if grid is not None:
                save_grid(os.path.join(workdir, "adaptive.png"), grid)
                with open(os.path.join(workdir, "adaptive.md"), "a") as f:
                    f.write("\nToken counts of the grid's rows (columns: requested ε):\n\n")
                    f.write("| row | " + " | ".join(f"{q:g}" for q in self.qualities) + " |\n")
                    f.write("|" + "---|" * (len(self.qualities) + 1) + "\n")
                    for r in range(len(counts[0])):
                        cells = " | ".join(str(int(c[r])) for c in counts)
                        f.write(f"| {r} | {cells} |\n")
        return results


def _gather(arrays: list[jax.Array]) -> list[np.ndarray]:
    from jax.experimental import multihost_utils

    return [np.asarray(multihost_utils.process_allgather(a, tiled=True)) for a in arrays]
