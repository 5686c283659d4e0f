"""Pretrained sub-models that training never updates (a FlexTok's VAE, a REPA target encoder).

Their weights are ``Frozen`` variables rather than ``nnx.Param``, so ``ModelHandle`` puts them in
the state's ``extra`` (no gradients, no optimizer moments) and checkpoints carry them like any
other state. A model lists where their weights come from in ``pretrained_workdirs()``
({attribute: workdir of a training run}); the trainer loads them once, when a run starts from
scratch (``load_pretrained``).
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from vitok import runs


class Frozen(nnx.Variable):
    """A weight of a pretrained sub-model: stored in ``extra``, never trained."""


def freeze(module: nnx.Module) -> nnx.Module:
    """Turns every ``nnx.Param`` of ``module`` into a ``Frozen`` variable, in place."""
    for _, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Module):
            for name, value in list(vars(node).items()):
                if isinstance(value, nnx.Param):
                    metadata = value.get_metadata()
                    setattr(node, name, Frozen(value.get_value(), **metadata))
    return module


def pretrained_workdirs(model_handle: Any) -> dict[str, str]:
    """{attribute: workdir} of the model's pretrained sub-models; an empty workdir is an error
    (raised before anything is initialised or compiled)."""
    sources = model_handle.module().pretrained_workdirs()
    for attribute, workdir in sources.items():
        if not workdir:
            raise ValueError(
                f"model.{attribute}: a pretrained sub-model needs the workdir of its training "
                f"run (set its 'checkpoint' field)"
            )
    return sources


def load_pretrained(model_handle: Any, extra: dict, mesh: jax.sharding.Mesh) -> dict:
    """Returns ``extra`` with each pretrained sub-model's weights read from its workdir.

    The sub-model's trained params (EMA if kept) are read onto ``mesh`` (sharded by the source
    run's rules) and replace the matching subtree of ``extra`` with that subtree's shardings;
    a shape mismatch is an error naming the sub-model and the workdir.
    """
    sources = pretrained_workdirs(model_handle)
    extra = dict(extra)
    for attribute, workdir in sources.items():
        run = runs.load_run(workdir, mesh)
        current = extra[attribute]
        loaded = _select(run.params, run.config, current, attribute, workdir)
        extra[attribute] = jax.tree.map(
            lambda new, old: jax.device_put(new, old.sharding), loaded, current
        )
        print(f"vitok: loaded model.{attribute} from {workdir} (step {run.step})")
    return extra


def _select(params: dict, run_config: Any, current: dict, attribute: str, workdir: str) -> dict:
    """The trained params with the structure of ``current`` (sub-models may drop heads)."""

    def pick(src, dst, path):
        if isinstance(dst, dict):
            missing = [k for k in dst if not isinstance(src, dict) or k not in src]
            if missing:
                raise ValueError(
                    f"model.{attribute}: the run in {workdir!r} ({run_config.model.name}) has no "
                    f"weights for {path + '/' + missing[0]!r}"
                )
            return {k: pick(src[k], v, f"{path}/{k}") for k, v in dst.items()}
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(
                f"model.{attribute}: {path} has shape {tuple(src.shape)} in {workdir!r}, the "
                f"config expects {tuple(dst.shape)}"
            )
        return src

    return pick(params, current, attribute)
