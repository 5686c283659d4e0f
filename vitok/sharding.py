"""Device mesh, logical-axis rules, activation constraints and global arrays.

Parameters and activations are annotated with *logical* axis names (``batch``, ``length``,
``embed``, ``mlp``, ``heads``, ...). A run maps those names onto the *mesh* axes
(``data``, ``fsdp``, ``tensor``, ``sequence``) through ``config.sharding.rules``, so changing the
parallelism of a run is a config change, never a code change.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

# Logical name -> mesh axis (or tuple of mesh axes, or None for replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("classes", None),
    ("patch", None),
    ("layers", None),  # the stacked-layer axis of scanned blocks
    ("conv", "fsdp"),  # the channels of convolutions (the VAE)
)

LogicalAxes = Sequence[str | None]
Rules = Sequence[tuple[str, Any]]


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves a ``{axis: size}`` mapping (one size may be -1) into a full mesh shape."""
    unknown = set(mesh_config) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; known: {MESH_AXES}")
    sizes = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh may use -1 for at most one axis, got {dict(mesh_config)}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"config.mesh sizes must be positive or -1, got {dict(mesh_config)}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f"config.mesh {dict(mesh_config)}: {num_devices} devices are not divisible by {known}"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"config.mesh {dict(mesh_config)} needs {math.prod(sizes)} devices, "
            f"but {num_devices} are available"
        )
    return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the 4-axis mesh ``(data, fsdp, tensor, sequence)`` over all (global) devices."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    # Keep each process's devices contiguous so that data-parallel slices stay host-local.
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(ordered, dtype=object).reshape(shape), MESH_AXES)


def logical_to_mesh_spec(logical_axes: LogicalAxes, rules: Rules) -> PartitionSpec:
    """Maps logical names to a mesh PartitionSpec; a mesh axis is used at most once. A name
    that no rule mentions is an error (map it to None to replicate it on purpose)."""
    table = dict(rules)
    unknown = [name for name in logical_axes if name is not None and name not in table]
    if unknown:
        raise ValueError(
            f"logical axis {unknown[0]!r} is in no rule of config.sharding.rules "
            f"(known: {sorted(table)}); add it, mapped to mesh axes or to None (replicated)"
        )
    used: set[str] = set()
    spec = []
    for name in logical_axes:
        target = table.get(name) if name is not None else None
        axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def fit_spec_to_shape(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Drops mesh axes that do not divide their dimension (e.g. 10 classes over 4 devices)."""
    fitted = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        kept, size = [], 1
        for axis in axes:
            if dim % (size * mesh.shape[axis]) == 0:
                kept.append(axis)
                size *= mesh.shape[axis]
        fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*fitted)


def named_sharding(
    mesh: Mesh, logical_axes: LogicalAxes, rules: Rules, shape: Sequence[int] | None = None
) -> NamedSharding:
    spec = logical_to_mesh_spec(logical_axes, rules)
    if shape is not None:
        spec = fit_spec_to_shape(spec, shape, mesh)
    return NamedSharding(mesh, spec)


def tree_shardings(abstract_tree: Any, logical_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """Shardings for a pytree of arrays given a matching pytree of logical-axis tuples."""

    def one(leaf, axes):
        axes = tuple(axes) if axes is not None else (None,) * len(leaf.shape)
        return named_sharding(mesh, axes, rules, leaf.shape)

    return jax.tree.map(one, abstract_tree, logical_tree, is_leaf=_is_axes)


def _is_axes(x: Any) -> bool:
    return isinstance(x, PartitionSpec) or (
        isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)
    )


# --- activation constraints --------------------------------------------------------------------

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "vitok_mesh_rules", default=None
)


@contextlib.contextmanager
def mesh_rules(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Makes ``constrain`` active while tracing model code under this mesh and rules."""
    token = _ACTIVE.set((mesh, tuple(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, logical_axes: LogicalAxes) -> jax.Array:
    """``with_sharding_constraint`` by logical names; a no-op outside ``mesh_rules``."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, logical_axes, rules, x.shape))


def current_mesh() -> Mesh | None:
    active = _ACTIVE.get()
    return None if active is None else active[0]


def active_rules() -> Rules:
    active = _ACTIVE.get()
    return DEFAULT_RULES if active is None else active[1]


# --- host-local <-> global arrays ----------------------------------------------------------------


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int) -> NamedSharding:
    """Sharding of a batch-leading array: batch over the data axes, the rest replicated."""
    return named_sharding(mesh, ("batch",) + (None,) * (ndim - 1), rules)


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh, rules: Rules) -> dict:
    """Assembles each process's slice of the batch into global arrays sharded over the mesh."""
    out = {}
    for key, local in local_batch.items():
        local = np.asarray(local)
        sharding = batch_sharding(mesh, rules, local.ndim)
        global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
        out[key] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return out


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
