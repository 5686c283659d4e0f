"""Optimizer and learning-rate schedule from ``config.optim``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import optax

from vitok.config import REQUIRED, section_options

# The keys of ``config.optim`` and their defaults: common ones, then per optimizer ``name`` and
# per learning-rate ``schedule``.
OPTIM_KEYS = {
    "name": "adamw", "lr": REQUIRED, "warmup_steps": 0, "schedule": "cosine", "clip_norm": 0.0,
    "ema_decay": 0.0, "lr_multipliers": {},
}  # fmt: skip
OPTIMIZER_KEYS = {
    "adamw": {"b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 0.0},
    "sgd": {"momentum": 0.9},
}
SCHEDULE_KEYS = {
    "cosine": {"end_factor": 0.0},
    "constant": {},
    "step": {"step_fractions": (0.5, 2 / 3, 5 / 6), "step_factor": 0.2},  # NAR / LlamaGen
}


def optim_options(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """``config.optim`` with every default filled in; an unknown optimizer, schedule or key (for
    the chosen optimizer and schedule) is an error naming it."""
    given = dict(config or {})
    name = given.get("name", OPTIM_KEYS["name"])
    kind = given.get("schedule", OPTIM_KEYS["schedule"])
    if name not in OPTIMIZER_KEYS:
        raise ValueError(f"config.optim.name must be one of {sorted(OPTIMIZER_KEYS)}, got {name!r}")
    if kind not in SCHEDULE_KEYS:
        raise ValueError(
            f"config.optim.schedule must be one of {sorted(SCHEDULE_KEYS)}, got {kind!r}"
        )
    return section_options(
        given, {**OPTIM_KEYS, **OPTIMIZER_KEYS[name], **SCHEDULE_KEYS[kind]}, "config.optim"
    )


def schedule(config: Mapping[str, Any], total_steps: int) -> optax.Schedule:
    """Linear warmup to ``lr``, then cosine decay to ``lr * end_factor``, a constant, or steps
    (``lr * step_factor`` at each of ``step_fractions`` of training)."""
    config = optim_options(config)
    lr = float(config["lr"])
    warmup = int(config["warmup_steps"])
    kind = config["schedule"]
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=lr,
            warmup_steps=warmup,
            decay_steps=max(total_steps, warmup + 1),
            end_value=lr * float(config["end_factor"]),
        )
    if kind == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)], [warmup]
        )
    if kind == "step":
        fractions = tuple(float(f) for f in config["step_fractions"])
        factor = float(config["step_factor"])
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
    raise AssertionError(kind)  # optim_options checked it


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


def _path_name(path) -> str:
    return "/".join(str(getattr(key, "key", getattr(key, "name", key))) for key in path)


def _has_prefix(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + "/")


def scale_by_path(multipliers: Mapping[str, float]) -> optax.GradientTransformation:
    """Multiplies each update by the factor of the longest ``multipliers`` key (a parameter path
    prefix such as ``encoder`` or ``decoder/blocks``) its path starts with; others by 1. After
    AdamW this is a per-module learning rate (its weight decay included)."""

    def factor(path) -> float:
        name = _path_name(path)
        hits = [k for k in multipliers if _has_prefix(name, k)]
        return multipliers[max(hits, key=len)] if hits else 1.0

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map_with_path(lambda p, u: u * factor(p), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def check_multipliers(multipliers: Mapping[str, float], logical_axes: Any) -> None:
    """A ``lr_multipliers`` key that matches no parameter is an error naming the model's
    top-level parameters (``logical_axes``: the params' tree of logical-axis tuples)."""
    leaves = jax.tree_util.tree_flatten_with_path(
        logical_axes, is_leaf=lambda x: isinstance(x, tuple)
    )[0]
    names = [_path_name(path) for path, _ in leaves]
    unused = [k for k in multipliers if not any(_has_prefix(n, k) for n in names)]
    if unused:
        top = sorted({n.split("/")[0] for n in names})
        raise ValueError(
            f"config.optim.lr_multipliers: no parameter under {unused[0]!r}; the model's "
            f"top-level parameters are {top}"
        )


def make_optimizer(
    config: Mapping[str, Any], total_steps: int, logical_axes: Any
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (or SGD-momentum) with global-norm clipping and optional per-module learning-rate
    factors (``lr_multipliers``: parameter path prefix -> factor); returns (optimizer, schedule).
    ``logical_axes``: the params' logical-axis tuples, which decide weight decay (``decay_mask``)."""
    config = optim_options(config)
    lr = schedule(config, total_steps)
    if config["name"] == "adamw":
        opt = optax.adamw(
            lr,
            b1=float(config["b1"]),
            b2=float(config["b2"]),
            eps=float(config["eps"]),
            weight_decay=float(config["weight_decay"]),
            mask=lambda params: decay_mask(params, logical_axes),
        )
    else:
        opt = optax.sgd(lr, momentum=float(config["momentum"]))
    # Prefixes as written in the config, without leading or trailing slashes.
    multipliers = {str(k).strip("/"): float(v) for k, v in (config["lr_multipliers"] or {}).items()}
    if multipliers:
        check_multipliers(multipliers, logical_axes)
        opt = optax.chain(opt, scale_by_path(multipliers))
    clip = float(config["clip_norm"])
    if clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(clip), opt)
    return opt, lr
