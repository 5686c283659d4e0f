"""Models, found by ``config.model.name`` through ``vitok.registry.MODELS``."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx

from vitok.models.base import Model, Tokenizer, check_model
from vitok.registry import MODELS

__all__ = ["Model", "ModelHandle", "Tokenizer", "build_model", "init_variables", "logical_axes"]


def build_model(config: Mapping[str, Any], rngs: nnx.Rngs) -> Model:
    """``config`` is ``config.model``; its ``name`` picks the registered constructor."""
    model = MODELS.lookup(config["name"])(config, rngs)
    check_model(model, config["name"])
    return model


def logical_axes(params: nnx.State) -> Any:
    """A model's ``nnx.Param`` state -> a pure dict of its logical-axis tuples, matching params."""
    specs = nnx.to_pure_dict(nnx.get_partition_spec(params))
    return jax.tree.map(tuple, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


@dataclasses.dataclass(frozen=True)
class ModelHandle:
    """A model split into a static graph and pure-dict parameters (the jit-boundary form).

    ``params`` are the trainable ``nnx.Param`` values, ``extra`` every other variable (buffers,
    frozen sub-models); both are plain nested dicts of arrays.
    """

    graphdef: Any
    param_template: nnx.State
    extra_template: nnx.State
    logical_axes: Any  # pure dict of logical-axis tuples, matching params
    extra_axes: Any  # the same for extra (frozen sub-models keep their annotations)

    @classmethod
    def abstract(cls, config: Mapping[str, Any], seed: int = 0) -> ModelHandle:
        model = nnx.eval_shape(lambda: build_model(config, nnx.Rngs(seed)))
        graphdef, params, extra = nnx.split(model, nnx.Param, ...)
        return cls(graphdef, params, extra, logical_axes(params), logical_axes(extra))

    def abstract_params(self) -> Any:
        """Pure dict of ShapeDtypeStructs of the params."""
        return _shapes(self.param_template)

    def abstract_extra(self) -> Any:
        return _shapes(self.extra_template)

    def module(self) -> nnx.Module:
        """The abstract module (ShapeDtypeStruct weights): its attributes and methods, no
        values."""
        return nnx.merge(self.graphdef, self.param_template, self.extra_template)

    def merge(self, params: Any, extra: Any) -> nnx.Module:
        """Pure dicts -> a module (inside jit this only rebuilds Python objects)."""
        param_state = jax.tree.map(lambda x: x, self.param_template)
        extra_state = jax.tree.map(lambda x: x, self.extra_template)
        nnx.replace_by_pure_dict(param_state, params)
        nnx.replace_by_pure_dict(extra_state, extra)
        return nnx.merge(self.graphdef, param_state, extra_state)


def _shapes(state: nnx.State) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(state))


def init_variables(config: Mapping[str, Any], rng: jax.Array) -> tuple[dict, dict]:
    """Builds the model from ``rng`` and returns its (params, extra) as pure dicts."""
    model = build_model(config, nnx.Rngs(params=rng))
    _, params, extra = nnx.split(model, nnx.Param, ...)
    return nnx.to_pure_dict(params), nnx.to_pure_dict(extra)
