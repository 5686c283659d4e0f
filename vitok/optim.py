"""Optimizer and learning-rate schedule from ``config.optim``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import optax


def schedule(config: Mapping[str, Any], total_steps: int) -> optax.Schedule:
    """Linear warmup to ``lr``, then cosine (or constant) decay to ``lr * end_factor``."""
    lr = float(config["lr"])
    warmup = int(config.get("warmup_steps", 0))
    kind = config.get("schedule", "cosine")
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=lr,
            warmup_steps=warmup,
            decay_steps=max(total_steps, warmup + 1),
            end_value=lr * float(config.get("end_factor", 0.0)),
        )
    if kind == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)], [warmup]
        )
    if kind == "step":  # NAR / LlamaGen-style: lr x factor at each fraction of training
        fractions = tuple(float(f) for f in config.get("step_fractions", (0.5, 2 / 3, 5 / 6)))
        factor = float(config.get("step_factor", 0.2))
        boundaries: dict[int, float] = {}  # steps after warmup -> factor; coinciding multiply
        for f in fractions:
            step = max(int(f * total_steps) - warmup, 1)
            boundaries[step] = boundaries.get(step, 1.0) * factor
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, lr, max(warmup, 1)),
                optax.piecewise_constant_schedule(lr, boundaries),
            ],
            [warmup],
        )
    raise ValueError(f"config.optim.schedule must be 'cosine', 'constant' or 'step', got {kind!r}")


NO_DECAY_NAMES = ("bias", "scale")  # parameter names (suffixes) that never decay


def decay_mask(params: Any, logical_axes: Any) -> Any:
    """Weight decay by parameter role: matrices decay; biases and norm scales (by name, e.g.
    ``qkv_bias`` [3, H*D]), vectors and 1-row embeddings (class tokens) do not. The shape is the
    parameter's own: a leading ``layers`` axis (``scan_layers``) is not counted, so a scanned and
    an unrolled model decay the same parameters. ``logical_axes``: the params' tree of
    logical-axis tuples (``ModelHandle.logical_axes``)."""

    def decays(path, p, axes) -> bool:
        name = str(getattr(path[-1], "key", path[-1]))
        if name.endswith(NO_DECAY_NAMES):
            return False
        shape = [n for n, axis in zip(p.shape, axes or (None,) * p.ndim, strict=True)
                 if axis != "layers"]  # fmt: skip
        return len(shape) >= 2 and shape[0] > 1

    return jax.tree_util.tree_map_with_path(
        decays, params, logical_axes, is_leaf=lambda x: isinstance(x, tuple)
    )


def make_optimizer(
    config: Mapping[str, Any], total_steps: int, logical_axes: Any
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (or SGD-momentum) with global-norm clipping; returns (optimizer, schedule).
    ``logical_axes``: the params' logical-axis tuples, which decide weight decay (``decay_mask``)."""
    lr = schedule(config, total_steps)
    name = config.get("name", "adamw")
    if name == "adamw":
        opt = optax.adamw(
            lr,
            b1=float(config.get("b1", 0.9)),
            b2=float(config.get("b2", 0.999)),
            eps=float(config.get("eps", 1e-8)),
            weight_decay=float(config.get("weight_decay", 0.0)),
            mask=lambda params: decay_mask(params, logical_axes),
        )
    elif name == "sgd":
        opt = optax.sgd(lr, momentum=float(config.get("momentum", 0.9)))
    else:
        raise ValueError(f"config.optim.name must be 'adamw' or 'sgd', got {name!r}")
    clip = float(config.get("clip_norm", 0.0))
    if clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(clip), opt)
    return opt, lr
