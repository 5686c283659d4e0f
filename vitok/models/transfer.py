"""Starting a run from another run's weights (fine-tuning, progressive resolution).

``config.init_from.workdir`` names a finished (or running) training run. When a run starts
from scratch, every trainable parameter is taken from that run's latest good checkpoint (its EMA
weights if it kept them) instead of its random init; the optimizer starts fresh. Parameters whose
shape differs are adapted by the model where it knows how (a ViT PI-resizes its patch kernel to
a new patch size and resizes its position embedding to a new token grid, FlexiViT-style), and
``config.init_from.skip`` (regular expressions over 'a/b/c' parameter paths) keeps chosen
parameters at their fresh init, e.g. a classifier head for a new label set. Anything else that
does not match is an error naming the parameter, before a step is taken. A resumed run restores
its own checkpoint and never reads ``init_from`` again.
"""

from __future__ import annotations

import os
import re
from typing import Any, NamedTuple

import jax
from flax import nnx

from vitok import runs
from vitok.config import section_options
from vitok.models import ModelHandle


def flatten_params(tree: dict, prefix: tuple = ()) -> dict[tuple[str, ...], Any]:
    """A nested dict -> {(key, ..., key): leaf} with every key as a string."""
    out = {}
    for key, value in tree.items():
        path = (*prefix, str(key))
        if isinstance(value, dict):
            out.update(flatten_params(value, path))
        else:
            out[path] = value
    return out


def unflatten_like(template: dict, leaves: dict, prefix: tuple = ()) -> dict:
    """{(key, ...): leaf} -> a nested dict with the structure (and key types) of ``template``."""
    return {
        key: (
            unflatten_like(value, leaves, (*prefix, str(key)))
            if isinstance(value, dict)
            else leaves[(*prefix, str(key))]
        )
        for key, value in template.items()
    }


def adapt_params(
    source_params: dict,
    source_model: nnx.Module,
    target_params: dict,
    target_model: nnx.Module,
    skip: str | tuple[str, ...] = (),
    where: str = "the source run",
) -> tuple[dict, dict[str, list[str]]]:
    """Pure dicts of the source run's params -> params with ``target_params``' structure.

    Each target leaf is ``target_model.adapt_pretrained(path, value, source_model)`` where the
    model adapts it (e.g. a patch kernel from another patch size), else the source leaf at the
    same path if the shapes agree, or the target's own value when its 'a/b/c' path matches a
    ``skip`` pattern. Returns the params and a report {"copied", "adapted", "skipped",
    "unused": [paths]}.
    """
    patterns = [re.compile(p) for p in ((skip,) if isinstance(skip, str) else skip)]
    source = flatten_params(source_params)
    target = flatten_params(target_params)
    adapt = getattr(target_model, "adapt_pretrained", None)
    report: dict[str, list[str]] = {"copied": [], "adapted": [], "skipped": [], "unused": []}
    leaves = {}
    for path, current in target.items():
        name = "/".join(path)
        if any(p.fullmatch(name) for p in patterns):
            leaves[path] = current
            report["skipped"].append(name)
            continue
        if path not in source:
            raise ValueError(
                f"init_from: {where} has no parameter {name!r}; add a pattern matching it to "
                f"init_from.skip to keep its fresh init"
            )
        value = source[path]
        adapted = adapt(path, value, source_model) if adapt is not None else None
        if adapted is None and tuple(value.shape) == tuple(current.shape):
            leaves[path] = value.astype(current.dtype)
            report["copied"].append(name)
            continue
        if adapted is None or tuple(adapted.shape) != tuple(current.shape):
            raise ValueError(
                f"init_from: {name} has shape {tuple(value.shape)} in {where}, this model "
                f"expects {tuple(current.shape)}, and {type(target_model).__name__} cannot "
                f"adapt it; add a pattern matching {name!r} to init_from.skip to keep its "
                f"fresh init"
            )
        leaves[path] = adapted.astype(current.dtype)
        report["adapted"].append(name)
    report["unused"] = ["/".join(p) for p in source if p not in target]
    return unflatten_like(target_params, leaves), report


class SourceRun(NamedTuple):
    workdir: str
    config: Any  # the source run's config
    skip: Any  # patterns of params that keep their fresh init


INIT_FROM_KEYS = {"workdir": "", "skip": ()}  # config.init_from


def source_run(config: Any) -> SourceRun | None:
    """The run named by ``config.init_from.workdir`` (None when unset), checked to hold a
    training run's config and a checkpoint, so a wrong path fails before anything is
    compiled."""
    spec = section_options(config.get("init_from"), INIT_FROM_KEYS, "config.init_from")
    if not spec["workdir"]:
        return None
    workdir = spec["workdir"]
    source_config = runs.load_config(workdir)  # a clear error when it is no training run
    checkpoints = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(checkpoints) or not os.listdir(checkpoints):
        raise FileNotFoundError(f"init_from: {workdir!r} has no checkpoint in {checkpoints}")
    return SourceRun(workdir, source_config, spec["skip"])


def init_from_run(
    source: SourceRun | None, model: ModelHandle, params: dict, extra: dict, mesh
) -> tuple[dict, dict]:
    """The trainer's hook: (``params``, ``extra``) (fresh, sharded over ``mesh``) -> the same
    structures and shardings with the weights of the ``source_run`` (unchanged when that is
    None). The source state is restored onto the trainer's mesh under the source run's sharding
    rules, so an FSDP run never holds a replicated copy. Of ``extra``, the model's own fixed
    variables (a FlexTok's fitted linear route; not the pretrained sub-models, which load from
    their own runs) come from the source where it has them at the same path and shape, since
    its trained weights were learned next to them."""
    if source is None:
        return params, extra
    workdir, source_config, skip = source
    run = runs.load_run(workdir, mesh, config=source_config)
    extra = _own_extra_from(run.extra, extra, set(model.module().pretrained_workdirs()))
    step = run.step
    weights = "EMA" if run.weights == "ema" else "trained"
    loaded, report = adapt_params(
        run.params, run.model.module(), params, model.module(), skip,
        where=f"{workdir!r} (step {step})",
    )  # fmt: skip
    if jax.process_index() == 0:
        counts = ", ".join(f"{len(v)} {k}" for k, v in report.items())
        adapted = f"; adapted: {report['adapted']}" if report["adapted"] else ""
        print(
            f"vitok: initialised from the {weights} weights of {workdir} at step {step} "
            f"({counts}){adapted}"
        )
    params = jax.tree.map(lambda new, old: jax.device_put(new, old.sharding), loaded, params)
    return params, extra


def _own_extra_from(source: dict, extra: dict, pretrained: set[str]) -> dict:
    """``extra`` with each leaf outside the ``pretrained`` sub-models replaced by the source's
    leaf at the same path, where it has one of the same shape."""
    flat, theirs = flatten_params(extra), flatten_params(source)
    for path, current in flat.items():
        value = theirs.get(path)
        if path[0] not in pretrained and value is not None and value.shape == current.shape:
            flat[path] = jax.device_put(value, current.sharding)
    return unflatten_like(extra, flat)


def data_init(model: ModelHandle, state: dict, data_config: Any) -> dict:
    """The trainer's hook for a model's data-dependent start (``Model.data_init``): the train
    ``state`` with the values (params or ``extra`` variables, fresh and sharded) that the model
    fits to its first ``data_init_examples`` training images; unchanged when it asks for none.
    Every process reads the same images and fits the same values."""
    count = int(model.module().data_init_examples)
    if not count:
        return state
    from vitok.data import pipeline

    module = model.merge(state["params"], state["extra"])  # a frozen VAE's weights included
    images = pipeline.training_images(data_config, count)
    values = module.data_init(images)
    trees = {name: flatten_params(state[name]) for name in ("params", "extra")}
    for path, value in values.items():
        key = tuple(map(str, path))
        owner = next((name for name, flat in trees.items() if key in flat), None)
        if owner is None:
            raise ValueError(f"data_init set {'/'.join(key)}, which the model does not have")
        old = trees[owner][key]
        if tuple(value.shape) != tuple(old.shape):
            raise ValueError(f"data_init gave {key} shape {value.shape}, the model has {old.shape}")
        trees[owner][key] = jax.make_array_from_callback(
            old.shape, old.sharding, lambda index, v=value.astype(old.dtype): v[index]
        )
    if jax.process_index() == 0:
        names = ", ".join("/".join(map(str, p)) for p in values)
        print(f"vitok: fitted {names} to {len(images)} training images (data_init)")
    return state | {name: unflatten_like(state[name], flat) for name, flat in trees.items()}
