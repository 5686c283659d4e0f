"""A training run on disk: its ``config.json``, its model, and its weights.

    run = runs.load_run("workdirs/flextok_tiny")  # EMA params if the run kept them
    model = run.module()                          # an nnx.Module with the trained weights

Everything outside the training loop that reads a run goes through here: ``vitok.inference``,
the tools, the evaluators' feature networks and tokenizers, frozen sub-models and
``init_from``. Only the weights are read (params or their EMA, plus the non-trainable
``extra``), never the optimizer state, and they are laid out by their logical axes on the given
mesh, so a large model loads sharded. This module imports neither the trainer nor
``vitok.inference``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
from flax import nnx

from vitok import checkpoint, sharding
from vitok.models import ModelHandle
from vitok.optim import optim_options


class RunNotFoundError(FileNotFoundError):
    """A workdir holds no training run (no config.json) or no checkpoint."""


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """``workdir/config.json``, which ``load_config`` (and every tool) reads back."""
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The run's config as the trainer wrote it into ``workdir/config.json``."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise RunNotFoundError(f"{path} not found: is {workdir!r} the workdir of a training run?")
    try:
        with open(path) as f:
            return ml_collections.ConfigDict(json.load(f))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the run's config is damaged") from None


def sharding_rules(config: Any) -> tuple:
    """``config.sharding.rules`` as the tuple of (logical name, mesh axes) pairs."""
    return tuple(tuple(rule) for rule in config.sharding.rules)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs (or arrays) + matching shardings -> sharded ShapeDtypeStructs."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def weight_shardings(model: ModelHandle, mesh: jax.sharding.Mesh, rules) -> tuple[Any, Any]:
    """(params, extra) shardings from the model's logical axes; unannotated extras replicate."""
    params = sharding.tree_shardings(model.abstract_params(), model.logical_axes, mesh, rules)
    extra = sharding.tree_shardings(model.abstract_extra(), model.extra_axes, mesh, rules)
    return params, extra


def weights_key(config: Any) -> str:
    """The state entry that holds a run's weights for use: ``ema`` if it kept one."""
    return "ema" if float(optim_options(config.optim)["ema_decay"]) else "params"


@dataclasses.dataclass(frozen=True)
class Run:
    """A loaded run: ``params`` (EMA if kept) and ``extra`` are pure dicts on ``mesh``."""

    workdir: str
    config: ml_collections.ConfigDict
    model: ModelHandle
    params: Any
    extra: Any
    step: int
    weights: str  # "ema" or "params"

    def module(self) -> nnx.Module:
        return self.model.merge(self.params, self.extra)


def load_run(
    workdir: str,
    mesh: jax.sharding.Mesh | None = None,
    *,
    config: ml_collections.ConfigDict | None = None,
) -> Run:
    """Reads the newest good checkpoint's weights of ``workdir``, sharded over ``mesh``
    (default: every device on a data axis) by the run's own sharding rules."""
    config = load_config(workdir) if config is None else config
    mesh = sharding.make_mesh({"data": -1}) if mesh is None else mesh
    model = ModelHandle.abstract(config.model, int(config.get("seed", 0)))
    params, extra = weight_shardings(model, mesh, sharding_rules(config))
    key = weights_key(config)
    target = {
        key: with_shardings(model.abstract_params(), params),
        "extra": with_shardings(model.abstract_extra(), extra),
    }
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory) or not os.listdir(directory):
        raise RunNotFoundError(f"no checkpoint found in {directory}")
    ckpt = checkpoint.Checkpointer(directory, async_save=False)
    try:
        restored = ckpt.restore(target, None, partial=True)
    finally:
        ckpt.close()
    if restored is None:
        raise RunNotFoundError(f"no readable checkpoint found in {directory}")
    state, step = restored
    return Run(workdir, config, model, state[key], state["extra"], step, key)


def write_run(
    workdir: str, config: ml_collections.ConfigDict, params: Any, extra: Any, step: int = 0
) -> None:
    """Writes ``workdir`` as a run holding these weights (its config.json and one orbax
    checkpoint of ``params`` and ``extra``), so that ``load_run`` and ``init_from`` read it
    like a trained run. Refuses a workdir that already holds a run."""
    if os.path.exists(os.path.join(workdir, "config.json")) or os.path.exists(
        os.path.join(workdir, "checkpoints")
    ):
        raise FileExistsError(f"{workdir} already holds a run; give a new --workdir")
    os.makedirs(workdir, exist_ok=True)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        ckpt.save(step, {weights_key(config): params, "extra": extra}, None)
        ckpt.wait()
    finally:
        ckpt.close()
    write_config(workdir, config)  # last: a run once it exists
