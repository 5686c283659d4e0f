"""Reconstruction quality per token count: PSNR, SSIM, a PNG grid and a table.

PSNR and SSIM are computed on images mapped from [-1, 1] to [0, 1] and clipped. SSIM follows
Wang et al. (2004): an 11-tap Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, per channel,
averaged over the window positions that lie inside the image ("valid") and over channels.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from vitok.evaluators.fid import FeatureNet, FeatureStats, fid_from_stats
from vitok.models.flextok import keep_mask
from vitok.registry import EVALUATORS


def psnr(a: jax.Array, b: jax.Array, data_range: float = 1.0) -> jax.Array:
    """a, b: [B, H, W, C] -> per-image PSNR [B] in dB."""
    mse = jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)), axis=(1, 2, 3))
    return 10.0 * jnp.log10(data_range**2 / jnp.maximum(mse, 1e-12))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    w = np.exp(-(x**2) / (2 * sigma**2))
    return (w / w.sum()).astype(np.float32)


def _filter_valid(x: jax.Array, window: np.ndarray) -> jax.Array:
    """Separable 'valid' filtering of [B, H, W, C] with a 1D window along H then W."""
    n = len(window)
    h, w = x.shape[1] - n + 1, x.shape[2] - n + 1
    rows = sum(window[i] * x[:, i : i + h] for i in range(n))
    return sum(window[i] * rows[:, :, i : i + w] for i in range(n))


def ssim(
    a: jax.Array, b: jax.Array, data_range: float = 1.0, window_size: int = 11, sigma: float = 1.5
) -> jax.Array:
    """a, b: [B, H, W, C] -> per-image mean SSIM [B]."""
    if min(a.shape[1:3]) < window_size:
        raise ValueError(f"SSIM needs images of at least {window_size}px, got {a.shape[1:3]}")
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    win = gaussian_window(window_size, sigma)
    mu_a, mu_b = _filter_valid(a, win), _filter_valid(b, win)
    var_a = _filter_valid(a * a, win) - mu_a**2
    var_b = _filter_valid(b * b, win) - mu_b**2
    cov = _filter_valid(a * b, win) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return s.mean(axis=(1, 2, 3))


def to_unit_range(images: jax.Array) -> jax.Array:
    """[-1, 1] -> [0, 1], clipped."""
    return jnp.clip((images.astype(jnp.float32) + 1) / 2, 0.0, 1.0)


def token_counts(spec: Any, num_registers: int) -> list[int]:
    """ "pow2" -> [1, 2, 4, ..., N] (N included); a list is checked against 1..N."""
    if isinstance(spec, str):
        if spec != "pow2":
            raise ValueError(f"token_counts must be 'pow2' or a list of ints, got {spec!r}")
        counts = [2**i for i in range(int(np.log2(num_registers)) + 1)]
        return sorted(set(counts + [num_registers]))
    counts = sorted({int(k) for k in spec})
    if not counts or counts[0] < 1 or counts[-1] > num_registers:
        raise ValueError(f"token_counts must lie in 1..{num_registers}, got {list(spec)}")
    return counts


def save_grid(path: str, rows: np.ndarray, border: int = 2) -> None:
    """rows: [R, Cols, H, W, C] in [0, 1] -> one PNG with a white border between tiles."""
    from PIL import Image

    r, c, h, w, ch = rows.shape
    canvas = np.ones((r * (h + border) + border, c * (w + border) + border, ch), np.float32)
    for i in range(r):
        for j in range(c):
            y, x = border + i * (h + border), border + j * (w + border)
            canvas[y : y + h, x : x + w] = rows[i, j]
    pixels = np.round(canvas * 255).astype(np.uint8)
    Image.fromarray(pixels[..., 0] if ch == 1 else pixels).save(path)


def write_table(path: str, counts: list[int], psnrs: list[float], ssims: list[float]) -> None:
    with open(path, "w") as f:
        f.write("| tokens k | PSNR (dB) | SSIM |\n|---:|---:|---:|\n")
        for k, p, s in zip(counts, psnrs, ssims, strict=True):
            f.write(f"| {k} | {p:.2f} | {s:.4f} |\n")


@EVALUATORS.register("reconstruction")
class ReconstructionEvaluator:
    """Tokenizes held-out images, reconstructs them from their first k tokens for each k in
    ``token_counts``, and reports ``{prefix}/psnr@k`` and ``{prefix}/ssim@k``.

    Config: data, batch_size, max_examples, token_counts ("pow2" or a list), steps, guidance,
    seed, grid_rows (rows of the PNG grid; 0 for none), and optionally ``fid``: a feature
    network (see ``vitok.evaluators.fid.FeatureNet``) for ``{prefix}/fid@k`` between the
    reconstructions and the originals (rFID).
    Writes ``reconstructions.png`` (rows: images; columns: each k, then the original) and
    ``reconstructions.md`` (the table) into the workdir.
    """

    def __init__(self, config: Any, context: Any):
        self.config = config
        self.context = context
        self.prefix = config.get("prefix", "eval")
        model_config = context.config.model
        self.counts = token_counts(
            config.get("token_counts", "pow2"), int(model_config.num_registers)
        )
        steps = int(config.get("steps", 25))
        guidance = float(config.get("guidance", 1.0))
        self.seed = int(config.get("seed", 0))
        self.grid_rows = int(config.get("grid_rows", 8))

        def encode(params, extra, images):
            return context.model.merge(params, extra).encode(images)[0]

        def reconstruct(params, extra, codes, k, rng):
            model = context.model.merge(params, extra)
            keep = keep_mask(jnp.full((codes.shape[0],), k), model.num_registers)
            recon = model.sample(codes, keep, rng, steps=steps, guidance=guidance)
            return to_unit_range(recon)

        def scores(recon, images, mask):
            target = to_unit_range(images)
            return jnp.stack(
                [(psnr(recon, target) * mask).sum(), (ssim(recon, target) * mask).sum()]
            )

        self._encode = jax.jit(encode)
        self._reconstruct = jax.jit(reconstruct)
        self._scores = jax.jit(scores)
        self.features = None
        if config.get("fid") and (config.fid.get("workdir") or config.fid.get("model")):
            net = FeatureNet(config.fid)
            # Padding examples are dropped on the host, so features are gathered per batch.
            self.features = jax.jit(lambda unit_images: net(unit_images * 2 - 1))

    def evaluate(self, params: Any, extra: Any) -> dict[str, float]:
        totals = np.zeros((len(self.counts), 2))
        count = 0.0
        grid = None
        stats = [FeatureStats() for _ in range(len(self.counts) + 1)] if self.features else None
        for batch_index, batch in enumerate(self.context.eval_batches(self.config)):
            count += float(batch["mask"].sum())
            keep = np.asarray(multihost_utils.process_allgather(batch["mask"], tiled=True)) > 0
            if stats:
                stats[-1].add(self._gather_features(to_unit_range(batch["image"]), keep))
            columns = []
            # Encoded once per batch; every k decodes from the same noise.
            codes = self._encode(params, extra, batch["image"])
            rng = jax.random.fold_in(jax.random.key(self.seed), batch_index)
            for i, k in enumerate(self.counts):
                recon = self._reconstruct(params, extra, codes, k, rng)
                totals[i] += np.asarray(self._scores(recon, batch["image"], batch["mask"]))
                if stats:
                    stats[i].add(self._gather_features(recon, keep))
                if batch_index == 0 and self.grid_rows:
                    columns.append(recon)
            if columns:
                columns.append(to_unit_range(batch["image"]))
                grid = _first_rows(columns, self.grid_rows)
        if count == 0:
            raise ValueError(f"evaluator {self.prefix!r} saw no examples")
        means = totals / count
        results = {}
        for k, (p, s) in zip(self.counts, means, strict=True):
            results[f"{self.prefix}/psnr@{k}"] = float(p)
            results[f"{self.prefix}/ssim@{k}"] = float(s)
        if stats:
            for i, k in enumerate(self.counts):
                results[f"{self.prefix}/fid@{k}"] = fid_from_stats(stats[i], stats[-1])
        if jax.process_index() == 0:
            workdir = self.context.workdir
            os.makedirs(workdir, exist_ok=True)
            write_table(
                os.path.join(workdir, "reconstructions.md"),
                self.counts,
                list(means[:, 0]),
                list(means[:, 1]),
            )
            if grid is not None:
                save_grid(os.path.join(workdir, "reconstructions.png"), grid)
        return results

    def _gather_features(self, unit_images: jax.Array, keep: np.ndarray) -> np.ndarray:
        features = multihost_utils.process_allgather(self.features(unit_images), tiled=True)
        return np.asarray(features)[keep]


def _first_rows(columns: list[jax.Array], rows: int) -> np.ndarray:
    """Gathers the first ``rows`` images of each column -> [rows, num_columns, H, W, C]."""
    gathered = [
        np.asarray(multihost_utils.process_allgather(c, tiled=True))[:rows] for c in columns
    ]
    return np.stack(gathered, axis=1)
