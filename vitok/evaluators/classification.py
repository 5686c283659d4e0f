"""Top-1 accuracy and cross-entropy over a held-out split."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from vitok.evaluators import evaluator_options
from vitok.registry import EVALUATORS
from vitok.tasks.classification import cross_entropy


@EVALUATORS.register("classification")
class ClassificationEvaluator:
    """Reports ``{prefix}/accuracy`` and ``{prefix}/loss`` over every example of the split.

    ``patch_size`` (optional, 0 = native) runs a ViT at another patch size (FlexiViT).
    """

    OPTIONS = {"prefix": "eval", "patch_size": 0}

    def __init__(self, config: Any, context: Any):
        self.config = config
        self.context = context
        options = evaluator_options(config, self.OPTIONS)
        self.prefix = options["prefix"]
        patch_size = int(options["patch_size"]) or None

        def sums(params, extra, batch):
            model = context.model.merge(params, extra)
            logits = model(batch["image"], **({"patch_size": patch_size} if patch_size else {}))
            mask = batch["mask"]
            correct = (logits.argmax(-1) == batch["label"]) * mask
            losses = cross_entropy(logits, batch["label"]) * mask
            return jnp.stack([correct.sum(), losses.sum(), mask.sum()])

        self._sums = jax.jit(sums)

    def evaluate(self, params: Any, extra: Any) -> dict[str, float]:
        total = jnp.zeros(3)
        for batch in self.context.eval_batches(self.config):
            total = total + self._sums(params, extra, batch)
        correct, loss, count = (float(x) for x in jax.device_get(total))
        if count == 0:
            raise ValueError(f"evaluator {self.prefix!r} saw no examples")
        return {f"{self.prefix}/accuracy": correct / count, f"{self.prefix}/loss": loss / count}
