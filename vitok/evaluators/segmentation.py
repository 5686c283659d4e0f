"""Mean intersection-over-union and pixel accuracy of a dense head over a held-out split."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vitok.evaluators import evaluator_options
from vitok.registry import EVALUATORS


def confusion_matrix(
    labels: jax.Array, predictions: jax.Array, num_classes: int, weights: jax.Array
) -> jax.Array:
    """labels, predictions: int [...], weights: [...] -> float32 [K, K], rows true, cols predicted."""
    index = labels.reshape(-1) * num_classes + predictions.reshape(-1)
    counts = jnp.bincount(
        index, weights=weights.reshape(-1).astype(jnp.float32), length=num_classes**2
    )
    return counts.reshape(num_classes, num_classes)


def mean_iou(confusion: np.ndarray) -> tuple[float, np.ndarray]:
    """[K, K] confusion counts -> (mean IoU over the classes that occur in labels or
    predictions, per-class IoU [K] with NaN for classes that never occur)."""
    confusion = np.asarray(confusion, np.float64)
    true_positive = np.diag(confusion)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - true_positive
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, true_positive / union, np.nan)
    return float(np.nanmean(iou)), iou


@EVALUATORS.register("segmentation")
class SegmentationEvaluator:
    """Reports ``{prefix}/miou`` and ``{prefix}/pixel_accuracy`` over every example of the split
    (one confusion matrix over all pixels, as in PASCAL/ADE20k). ``patch_size`` (0 = native)
    evaluates at another patch size."""

    OPTIONS = {"prefix": "eval", "patch_size": 0}

    def __init__(self, config: Any, context: Any):
        self.config = config
        self.context = context
        options = evaluator_options(config, self.OPTIONS)
        self.prefix = options["prefix"]
        self.num_classes = int(context.config.model.get("dense_classes", 0))
        if self.num_classes < 1:
            raise ValueError("the segmentation evaluator needs config.model.dense_classes > 0")
        patch_size = int(options["patch_size"]) or None
        num_classes = self.num_classes

        def counts(params, extra, batch):
            model = context.model.merge(params, extra)
            logits = model.dense(batch["image"], patch_size=patch_size)
            labels = batch["segmentation"]
            weights = jnp.broadcast_to(batch["mask"][:, None, None], labels.shape)
            return confusion_matrix(labels, logits.argmax(-1), num_classes, weights)

        self._counts = jax.jit(counts)

    def evaluate(self, params: Any, extra: Any) -> dict[str, float]:
        total = jnp.zeros((self.num_classes, self.num_classes))
        for batch in self.context.eval_batches(self.config):
            total = total + self._counts(params, extra, batch)
        confusion = np.asarray(jax.device_get(total))
        if confusion.sum() == 0:
            raise ValueError(f"evaluator {self.prefix!r} saw no examples")
        miou, _ = mean_iou(confusion)
        accuracy = float(np.trace(confusion) / confusion.sum())
        return {f"{self.prefix}/miou": miou, f"{self.prefix}/pixel_accuracy": accuracy}
