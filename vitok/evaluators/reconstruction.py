"""Reconstruction quality per token count: PSNR, SSIM, a PNG grid and a table.

PSNR and SSIM are computed on images mapped from [-1, 1] to [0, 1] and clipped. SSIM follows
Wang et al. (2004): an 11-tap Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, per channel,
averaged over the window positions that lie inside the image ("valid") and over channels.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from vitok.data import pipeline
from vitok.evaluators import evaluator_options
from vitok.evaluators.fid import FeatureNet, FeatureStats, fid_from_stats
from vitok.evaluators.inception import InceptionFID
from vitok.evaluators.linear_code import LinearCode, fit_linear_code, spread_linear_code
from vitok.models.base import Tokenizer, checked_options
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


def neighbour_statistics(images: jax.Array, patch: int) -> jax.Array:
    """images [B, H, W, C] in [0, 1] -> [B, 3]: per image, the mean absolute difference of
    horizontally and vertically neighbouring pixels (1) across the borders of a patch grid of
    ``patch`` px, (2) inside the patches, and (3) everywhere. Their ratio (1) / (2) is the seam
    ratio: near 1 for natural images, well above 1 for a mosaic of patches that disagree at
    their borders; (3) measures the amount of detail."""
    x = images.astype(jnp.float32)
    dx = jnp.abs(x[:, :, 1:] - x[:, :, :-1]).mean(axis=(1, 3))  # [B, W - 1]
    dy = jnp.abs(x[:, 1:] - x[:, :-1]).mean(axis=(2, 3))  # [B, H - 1]
    across_x = (np.arange(1, x.shape[2]) % patch) == 0  # between pixel j - 1 and j
    across_y = (np.arange(1, x.shape[1]) % patch) == 0
    diffs = jnp.concatenate([dx, dy], axis=1)
    across = np.concatenate([across_x, across_y])
    if not across.any() or across.all():
        raise ValueError(f"a {patch}px patch grid has no inside and border pairs in {x.shape}")
    border = diffs[:, across].mean(axis=1)
    inside = diffs[:, ~across].mean(axis=1)
    return jnp.stack([border, inside, diffs.mean(axis=1)], axis=1)


# Per-image statistics summed over a batch: the columns of ``_image_scores``.
SCORES = ("psnr", "ssim", "border", "inside", "detail")


def _image_scores(recon, target, mask, patch: int) -> jax.Array:
    """recon/target [B, H, W, C] in [0, 1], mask [B] -> the SCORES summed over real images."""
    per_image = jnp.concatenate(
        [
            psnr(recon, target)[:, None],
            ssim(recon, target)[:, None],
            neighbour_statistics(recon, patch),
        ],
        axis=1,
    )
    return (per_image * mask[:, None]).sum(axis=0)


def write_table(path: str, rows: list[dict], original_seam_ratio: float | None = None) -> None:
    """rows: one dict per k with ``k``, ``psnr``, ``ssim`` and optionally ``seam_ratio``,
    ``detail_ratio``, ``mean_psnr`` and ``mean_detail_ratio`` (the 1-step decode),
    ``baseline_psnr`` and ``baseline_detail_ratio`` (the linear code)."""
    columns = [
        ("k", "tokens k", "{}"),
        ("psnr", "PSNR (dB)", "{:.2f}"),
        ("ssim", "SSIM", "{:.4f}"),
        ("seam_ratio", "seam ratio", "{:.3f}"),
        ("detail_ratio", "detail ratio", "{:.3f}"),
        ("mean_psnr", "mean decode PSNR", "{:.2f}"),
        ("mean_detail_ratio", "mean decode detail", "{:.3f}"),
        ("baseline_psnr", "linear code PSNR", "{:.2f}"),
        ("baseline_detail_ratio", "linear code detail", "{:.3f}"),
        ("linear_fsq_psnr", "linear FSQ code PSNR", "{:.2f}"),
    ]
    columns = [c for c in columns if c[0] in rows[0]]
    with open(path, "w") as f:
        f.write("| " + " | ".join(c[1] for c in columns) + " |\n")
        f.write("|" + "---:|" * len(columns) + "\n")
        for row in rows:
            f.write("| " + " | ".join(fmt.format(row[key]) for key, _, fmt in columns) + " |\n")
        if original_seam_ratio is not None:
            f.write(
                f"\nSampler: the evaluator's Euler steps; mean decode: one step (the decoder's "
                f"clean estimate from pure noise); linear code: PCA of training images with k "
                f"coefficients, each quantized to the codebook size; linear FSQ code (where the "
                f"tokenizer quantizes with FSQ): PCA with d coefficients per token on the FSQ's "
                f"levels over +-1.5 std, the same bits spread as FSQ spreads them. Seam ratio: neighbour "
                f"differences across patch borders over those inside patches (originals: "
                f"{original_seam_ratio:.3f}); detail ratio: mean neighbour difference over the "
                f"originals'.\n"
            )


@EVALUATORS.register("reconstruction")
class ReconstructionEvaluator:
    """Tokenizes held-out images, reconstructs them from their first k tokens for each k in
    ``token_counts``, and reports per k:

    * ``{prefix}/psnr@k``, ``{prefix}/ssim@k``: the sampler (``steps`` Euler steps, ``guidance``);
    * ``{prefix}/seam_ratio@k``: mean absolute neighbour difference across the borders of the
      decoder's patches over that inside them (``{prefix}/seam_ratio_original`` for the
      originals); ``{prefix}/detail_ratio@k``: mean neighbour difference over the originals'
      (also ``mean_detail_ratio@k`` and ``baseline_detail_ratio@k``);
    * ``{prefix}/mean_psnr@k``: the mean decode, the tokenizer's ``mean_decode_options``
      (FlexTok: one unguided Euler step, i.e. the decoder's clean estimate from pure noise, the
      MMSE-style reconstruction) (``mean_decode``, default on where the tokenizer has one);
    * ``{prefix}/baseline_psnr@k``: the linear code at the same bit budget (PCA with k
      coefficients, each quantized to the codebook size; ``vitok.evaluators.linear_code``),
      fitted once on ``baseline_examples`` images of the run's training data (0: off);
      ``{prefix}/linear_fsq_psnr@k``, where the tokenizer quantizes with FSQ: the same bits
      spread over d coefficients per token on the FSQ's levels (``fit_spread_linear_code``),
      the stronger linear reference;

    Any ``vitok.models.Tokenizer`` with ordered 1D tokens, through ``reconstruct_at_budget``:
    FlexTok decodes its first k ids, KARL encodes at the budget k (lowest quality bin).

    Config: data, batch_size, max_examples, token_counts ("pow2" or a list), steps, guidance
    (decode options, where the tokenizer takes them), seed, grid_rows (rows of the PNG grid; 0
    for none), mean_decode, baseline_examples, and optionally ``inception_weights``
    (pytorch-fid's .pth file) for the standard rFID ``{prefix}/fid@k`` between the
    reconstructions and the originals, and ``feature_net`` (a network of ours, see
    ``vitok.evaluators.fid.FeatureNet``) for the same distance in its features,
    ``{prefix}/feature_fid@k``.
    Writes ``reconstructions.png`` (rows: images; columns: each k, then the original),
    ``reconstructions_mean.png`` and ``reconstructions_linear.png`` (the same for the mean
    decode and the linear code) and ``reconstructions.md`` (the table) into the workdir.
    """

    # steps, guidance, apg None: the tokenizer's own decode options.
    OPTIONS = {
        "prefix": "eval",
        "token_counts": "pow2",
        "steps": None,
        "guidance": None,
        "apg": None,
        "seed": 0,
        "grid_rows": 8,
        "mean_decode": True,
        "baseline_examples": 8192,
        "inception_weights": "",
        "feature_net": None,
    }  # fmt: skip

    def __init__(self, config: Any, context: Any):
        self.config = config
        self.context = context
        o = evaluator_options(config, self.OPTIONS)
        self.prefix = o["prefix"]
        tokenizer = context.model.module()
        if not isinstance(tokenizer, Tokenizer) or not tokenizer.ordered:
            raise ValueError(
                f"the reconstruction evaluator takes a 1D tokenizer (FlexTok, KARL), not "
                f"{context.config.model.name!r}; use the 'autoencoder' evaluator for grids"
            )
        self.counts = token_counts(o["token_counts"], tokenizer.token_shape[0])
        options = {name: o[name] for name in ("steps", "guidance", "apg") if o[name] is not None}
        checked_options(
            options,
            tokenizer.decode_options,
            f"evaluator {self.prefix!r}: the decoder of {context.config.model.name!r}",
        )
        self.seed = int(o["seed"])
        self.grid_rows = int(o["grid_rows"])
        mean_options = tokenizer.mean_decode_options
        self.mean_decode = bool(o["mean_decode"]) and mean_options is not None
        self.pixel_patch = tokenizer.decoder_patch
        self.codebook_size = tokenizer.codebook_size

        def reconstruct(params, extra, images, k, rng, options):
            model = context.model.merge(params, extra)
            return to_unit_range(model.reconstruct_at_budget(images, k, rng, **options))

        def scores(recon, images, mask):
            return _image_scores(recon, to_unit_range(images), mask, self.pixel_patch)

        self._sample = jax.jit(functools.partial(reconstruct, options=options))
        self._mean = jax.jit(functools.partial(reconstruct, options=dict(mean_options or {})))
        self._scores = jax.jit(scores)
        self.linear_codes: dict[str, LinearCode] = {}
        baseline_examples = int(o["baseline_examples"])
        if baseline_examples:
            fsq = getattr(tokenizer, "fsq", None)
            self.linear_codes = self._fit_linear_codes(baseline_examples, fsq)
        self.features = {}  # metric name -> jitted unit images [B, H, W, C] -> features
        if o["inception_weights"]:
            inception = InceptionFID.from_file(o["inception_weights"])
            self.features["fid"] = jax.jit(lambda unit: inception.features(unit * 2 - 1))
        net_config = o["feature_net"]
        if net_config and (net_config.get("workdir") or net_config.get("model")):
            net = FeatureNet(net_config)
            self.features["feature_fid"] = jax.jit(lambda unit: net(unit * 2 - 1))

    def _fit_linear_codes(self, num_examples: int, fsq: Any) -> dict[str, LinearCode]:
        """PCA of the run's training images as the tokenizer saw them, augmentation included
        (flipped crops make a better linear code: the stronger baseline): {"linear": k
        coefficients at the codebook size, "linear_fsq": the same bits on ``fsq``'s levels
        (where the tokenizer has an FSQ)}; every process fits the same codes by itself."""
        needed = max(self.counts) * (fsq.dim if fsq is not None else 1)
        if num_examples < needed:
            raise ValueError(
                f"evaluator {self.prefix!r}: baseline_examples={num_examples} is fewer than the "
                f"{needed} PCA coefficients of its linear codes; use at least {needed} (or 0: off)"
            )
        images = pipeline.training_images(self.context.config.data, num_examples)
        full = fit_linear_code(images, needed, self.codebook_size)  # one PCA for both codes
        codes = {"linear": full.first(max(self.counts))}
        if fsq is not None:
            codes["linear_fsq"] = spread_linear_code(full, images, fsq.levels)
        return codes

    def evaluate(self, params: Any, extra: Any) -> dict[str, float]:
        methods = ["sample"] + ["mean"] * self.mean_decode + list(self.linear_codes)
        totals = {m: np.zeros((len(self.counts), len(SCORES))) for m in methods}
        original = np.zeros(len(SCORES))
        count = 0.0
        grids: dict[str, list] = {}
        # stats[name][i]: the features of the reconstructions from counts[i] tokens; [-1]: of
        # the originals. Padding examples are dropped on the host, so features go per batch.
        stats = {
            name: [FeatureStats() for _ in range(len(self.counts) + 1)] for name in self.features
        }
        for batch_index, batch in enumerate(self.context.eval_batches(self.config)):
            count += float(batch["mask"].sum())
            keep = np.asarray(multihost_utils.process_allgather(batch["mask"], tiled=True)) > 0
            target = to_unit_range(batch["image"])
            original += np.asarray(self._scores(target, batch["image"], batch["mask"]))
            for name in stats:
                stats[name][-1].add(self._gather_features(name, target, keep))
            first = batch_index == 0 and self.grid_rows
            host_images = None
            if self.linear_codes:
                host_images = np.asarray(
                    multihost_utils.process_allgather(batch["image"], tiled=True)
                )
            # Every k decodes from the same noise.
            rng = jax.random.fold_in(jax.random.key(self.seed), batch_index)
            for i, k in enumerate(self.counts):
                recons = {"sample": self._sample(params, extra, batch["image"], k, rng)}
                if self.mean_decode:
                    recons["mean"] = self._mean(params, extra, batch["image"], k, rng)
                for name, code in self.linear_codes.items():
                    recons[name] = to_unit_range(code.reconstruct(host_images, k))
                for method, recon in recons.items():
                    on_host = method in self.linear_codes
                    mask = keep.astype(np.float32) if on_host else batch["mask"]
                    images = host_images if on_host else batch["image"]
                    totals[method][i] += np.asarray(self._scores(recon, images, mask))
                    if first:
                        grids.setdefault(method, []).append(recon)
                for name in stats:
                    stats[name][i].add(self._gather_features(name, recons["sample"], keep))
            if first:
                for columns in grids.values():
                    columns.append(target)
                grids = {m: _first_rows(c, self.grid_rows) for m, c in grids.items()}
        if count == 0:
            raise ValueError(f"evaluator {self.prefix!r} saw no examples")
        means = {m: t / count for m, t in totals.items()}
        original = original / count
        col = {name: i for i, name in enumerate(SCORES)}
        original_seam = original[col["border"]] / original[col["inside"]]
        results = {f"{self.prefix}/seam_ratio_original": float(original_seam)}
        rows = []
        detail = original[col["detail"]]
        for i, k in enumerate(self.counts):
            sample = means["sample"][i]
            row = {
                "k": k,
                "psnr": float(sample[col["psnr"]]),
                "ssim": float(sample[col["ssim"]]),
                "seam_ratio": float(sample[col["border"]] / sample[col["inside"]]),
                "detail_ratio": float(sample[col["detail"]] / detail),
            }
            if "mean" in means:
                row["mean_psnr"] = float(means["mean"][i][col["psnr"]])
                row["mean_detail_ratio"] = float(means["mean"][i][col["detail"]] / detail)
            for method, name in (("linear", "baseline"), ("linear_fsq", "linear_fsq")):
                if method in means:
                    row[f"{name}_psnr"] = float(means[method][i][col["psnr"]])
                    row[f"{name}_detail_ratio"] = float(means[method][i][col["detail"]] / detail)
            rows.append(row)
            results.update({f"{self.prefix}/{key}@{k}": v for key, v in row.items() if key != "k"})
        for name, per_count in stats.items():
            for i, k in enumerate(self.counts):
                results[f"{self.prefix}/{name}@{k}"] = fid_from_stats(per_count[i], per_count[-1])
        if jax.process_index() == 0:
            workdir = self.context.workdir
            os.makedirs(workdir, exist_ok=True)
            write_table(os.path.join(workdir, "reconstructions.md"), rows, float(original_seam))
            names = {
                "sample": "",
                "mean": "_mean",
                "linear": "_linear",
                "linear_fsq": "_linear_fsq",
            }
            for method, grid in grids.items():
                save_grid(os.path.join(workdir, f"reconstructions{names[method]}.png"), grid)
        return results

    def _gather_features(self, name: str, unit_images: jax.Array, keep: np.ndarray) -> np.ndarray:
        features = multihost_utils.process_allgather(self.features[name](unit_images), tiled=True)
        return np.asarray(features)[keep]


def _first_rows(columns: list[jax.Array], rows: int) -> np.ndarray:
    """Gathers the first ``rows`` images of each column -> [rows, num_columns, H, W, C]."""
    gathered = [
        np.asarray(multihost_utils.process_allgather(c, tiled=True))[:rows] for c in columns
    ]
    return np.stack(gathered, axis=1)
