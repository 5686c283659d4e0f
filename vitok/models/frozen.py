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
    abstract = nnx.merge(
        model_handle.graphdef, model_handle.param_template, model_handle.extra_template
    )
    sources = abstract.pretrained_workdirs() if hasattr(abstract, "pretrained_workdirs") else {}
    for attribute, workdir in sources.items():
        if not workdir:
            raise ValueError(
                f"model.{attribute}: a pretrained sub-model needs the workdir of its training "
                f"run (set its 'checkpoint' field)"
            )
    return sources


def load_pretrained(model_handle: Any, model_config: Any, extra: dict) -> dict:
    """Returns ``extra`` with each pretrained sub-model's weights read from its workdir.

    The sub-model's trained params (EMA if kept) replace the matching subtree of ``extra``, with
    the same shardings; a shape mismatch is an error naming the sub-model and the workdir.
    """
    sources = pretrained_workdirs(model_handle)
    if not sources:
        return extra
    from vitok import sharding
    from vitok.inference import load_config, load_params

    extra = dict(extra)
    for attribute, workdir in sources.items():
        run_config = load_config(workdir)
        _, params, _, step = load_params(run_config, workdir, sharding.make_mesh({"data": -1}))
        current = extra[attribute]
        loaded = _select(params, run_config, current, attribute, workdir)
        extra[attribute] = jax.tree.map(
            lambda new, old: jax.device_put(new, old.sharding), loaded, current
        )
        print(f"vitok: loaded model.{attribute} from {workdir} (step {step})")
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
