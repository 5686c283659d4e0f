"""Class-conditional token generation (NAR, raster AR, 1D AR): cross-entropy of every token.

Batches hold ``codes: int [B, *grid]`` (pre-extracted with ``vitok.tools.extract_codes``) and
``label: int [B]``. Config ``generation.class_dropout`` (default 0.1, as NAR and LlamaGen) is the
probability of replacing a label by the null class, which classifier-free guidance needs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from vitok.config import section_options
from vitok.registry import TASKS


def drop_labels(rng: jax.Array, labels: jax.Array, rate: float, null_class: int) -> jax.Array:
    """Each label becomes ``null_class`` with probability ``rate``."""
    if rate <= 0:
        return labels
    return jnp.where(jax.random.bernoulli(rng, rate, labels.shape), null_class, labels)


def check_codes(data_config: Any, model_config: Any) -> None:
    """Clear errors, before anything compiles, for a codes file that does not fit the model
    (inside jit an id past the vocabulary or a label past the classes would only give NaNs)."""
    from vitok.data.sources import CodesSource

    source = CodesSource(path=data_config.path, split=data_config.get("split", "train"))
    grid = tuple(int(g) for g in model_config.grid)
    vocab, classes = int(model_config.vocab_size), int(model_config.num_classes)
    where = f"{source.path} (model.grid={grid}, vocab_size={vocab}, num_classes={classes})"
    if tuple(source.codes.shape[1:]) != grid:
        raise ValueError(f"{where}: the codes are {source.codes.shape[1:]} grids")
    if source.codebook_size and source.codebook_size != vocab:
        raise ValueError(f"{where}: the codes come from a {source.codebook_size}-entry codebook")
    if source.codes.size and (source.codes.min() < 0 or source.codes.max() >= vocab):
        raise ValueError(f"{where}: code ids span [{source.codes.min()}, {source.codes.max()}]")
    if source.labels.size and source.labels.max() >= classes:
        raise ValueError(f"{where}: labels go up to {source.labels.max()}")


@TASKS.register("generation")
class GenerationTask:
    CONFIG_KEYS = {"generation": {"class_dropout": 0.1}}

    def __init__(self, config: Any):
        cfg = section_options(
            config.get("generation"), self.CONFIG_KEYS["generation"], "config.generation"
        )
        self.class_dropout = float(cfg["class_dropout"])
        if not 0.0 <= self.class_dropout < 1.0:
            raise ValueError(
                f"generation.class_dropout must be in [0, 1), got {self.class_dropout}"
            )
        if config.data.get("source") == "codes":
            check_codes(config.data, config.model)

    def loss(self, model: nnx.Module, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
        drop_rng, dropout_rng = jax.random.split(rng)
        codes = batch["codes"].astype(jnp.int32)
        # Unlabelled data (label -1, e.g. codes of an unlabelled folder) trains the null class.
        labels = jnp.where(batch["label"] < 0, model.num_classes, batch["label"])
        labels = drop_labels(drop_rng, labels, self.class_dropout, model.num_classes)
        logits = model(codes, labels, dropout_rng=dropout_rng)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, codes)
        loss = losses.mean()
        return loss, {
            "train/token_accuracy": (logits.argmax(-1) == codes).mean(),
            "train/perplexity": jnp.exp(loss),
        }
