"""Autoencoder reconstruction quality: PSNR and SSIM of ``model(images)[0]`` and a PNG grid."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vitok.evaluators import evaluator_options
from vitok.evaluators.reconstruction import _first_rows, psnr, save_grid, ssim, to_unit_range
from vitok.registry import EVALUATORS


@EVALUATORS.register("autoencoder")
class AutoencoderEvaluator:
    """PSNR and SSIM of an autoencoder's reconstructions (``model(images)[0]``, no sampling);
    writes ``autoencoder.png`` (reconstruction beside original) into the workdir."""

    OPTIONS = {"prefix": "eval", "grid_rows": 8}

    def __init__(self, config: Any, context: Any):
        self.config = config
        self.context = context
        options = evaluator_options(config, self.OPTIONS)
        self.prefix = options["prefix"]
        self.grid_rows = int(options["grid_rows"])

        def run(params, extra, images, mask):
            recon = to_unit_range(context.model.merge(params, extra)(images)[0])
            target = to_unit_range(images)
            sums = jnp.stack(
                [(psnr(recon, target) * mask).sum(), (ssim(recon, target) * mask).sum()]
            )
            return sums, recon

        self._run = jax.jit(run)

    def evaluate(self, params: Any, extra: Any) -> dict[str, float]:
        totals, count, grid = np.zeros(2), 0.0, None
        for batch_index, batch in enumerate(self.context.eval_batches(self.config)):
            sums, recon = self._run(params, extra, batch["image"], batch["mask"])
            totals += np.asarray(sums)
            count += float(batch["mask"].sum())
            if batch_index == 0 and self.grid_rows:
                grid = _first_rows([recon, to_unit_range(batch["image"])], self.grid_rows)
        if count == 0:
            raise ValueError(f"evaluator {self.prefix!r} saw no examples")
        if grid is not None and jax.process_index() == 0:
            os.makedirs(self.context.workdir, exist_ok=True)
            save_grid(os.path.join(self.context.workdir, "autoencoder.png"), grid)
        return {f"{self.prefix}/psnr": totals[0] / count, f"{self.prefix}/ssim": totals[1] / count}
