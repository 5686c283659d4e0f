"""grain pipelines: deterministic for a seed, sharded per process, checkpointable.

Training examples are shuffled and augmented by their *global* index, and process p of P reads
examples ``[i*B + p*b, i*B + (p+1)*b)`` for its i-th batch (B global, b = B/P local batch). So the
global batch i holds the same examples in the same order whatever the number of processes, and a
run on 2 processes x 4 devices sees exactly what a run on 1 process x 8 devices sees.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import grain
import numpy as np
from absl import flags

from vitok.data import ops
from vitok.data.sources import REQUIRED, SOURCES, build_source, source_keys


@dataclasses.dataclass
class SkipCounter:
    """Counts examples dropped because of ``BadImageError`` (only with ``skip_bad=True``); with
    worker processes each counts its own, and only the log shows theirs."""

    count: int = 0
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def __getstate__(self) -> dict:  # a worker process gets its own count (and lock)
        return {"count": self.count}

    def __setstate__(self, state: dict) -> None:
        self.count, self.lock = state["count"], threading.Lock()

    def add(self, where: str, error: Exception) -> None:
        with self.lock:
            self.count += 1
        logging.warning("skipping bad example %s: %s", where, error)


class _Preprocess:
    """grain random-map transform: runs the pp ops, drops non-array keys, optionally skips."""

    def __init__(self, pp: str | list[str], skip_bad: bool, counter: SkipCounter):
        self.fn = ops.parse(pp)
        self.skip_bad = skip_bad
        self.counter = counter

    def __call__(self, example: dict, rng: np.random.Generator) -> dict | None:
        try:
            out = self.fn(example, rng)
        except ops.BadImageError as e:
            if not self.skip_bad:
                raise
            self.counter.add(str(example.get("path")), e)
            return None
        return {k: v for k, v in out.items() if k != "path"}


class _ProcessSlice(grain.MapDataset):
    """Local index j of process p -> global index (j // b) * b * P + p * b + j % b."""

    def __init__(self, parent: grain.MapDataset, local_batch: int, index: int, count: int):
        super().__init__(parent)
        self._b, self._p, self._n = local_batch, index, count

    def __len__(self) -> int:
        return len(self._parent) // self._n

    def __getitem__(self, j):
        if isinstance(j, slice):
            return self.slice(j)
        g = (j // self._b) * self._b * self._n + self._p * self._b + j % self._b
        return self._parent[g]

    def __str__(self) -> str:
        return f"ProcessSlice(local_batch={self._b}, process={self._p}/{self._n})"


class _RepeatedAugmentation(grain.MapDataset):
    """Repeated augmentation (Hoffer et al. 2020; DeiT's 3x): each global batch of B holds
    u = ceil(B / r) examples, each r times (when r does not divide B, u * r - B of them r - 1
    times). Copy c of the batch's i-th example sits at position c * u + i, so the copies
    land on different devices and processes, as DeiT's sampler puts them on different GPUs;
    each copy is augmented by its own position, so differently."""

    def __init__(self, parent: grain.MapDataset, global_batch: int, repeats: int):
        super().__init__(parent)
        if not 1 <= repeats <= global_batch:
            raise ValueError(
                f"config.data.repeated_augmentation={repeats} must be in [1, batch size "
                f"{global_batch}]"
            )
        self._batch, self._unique = global_batch, -(-global_batch // repeats)

    def __len__(self) -> int:
        return min(sys.maxsize, len(self._parent) // self._unique * self._batch)

    def __getitem__(self, g):
        if isinstance(g, slice):
            return self.slice(g)
        step, position = divmod(g, self._batch)
        return self._parent[step * self._unique + position % self._unique]

    def __str__(self) -> str:
        return f"RepeatedAugmentation(batch={self._batch}, unique={self._unique})"


# The keys of a data section that the pipeline itself reads, with their defaults; the rest
# belong to its source (``vitok.data.sources.source_keys``).
PIPELINE_KEYS = {
    "source": None, "split": None, "pp": "", "skip_bad": False, "num_threads": 8, "prefetch": 64,
    "repeated_augmentation": 1, "worker_processes": 0,
}  # fmt: skip


def option(config: Mapping[str, Any], key: str) -> Any:
    return config[key] if key in config else PIPELINE_KEYS[key]


def check_data_config(config: Mapping[str, Any], where: str = "config.data") -> None:
    """Every key of a data section must be the pipeline's or its source's: a typo such as
    ``crop_sise`` is an error naming it, with the keys it could have meant."""
    if "source" not in config:
        raise ValueError(f"{where} has no 'source' (known: {SOURCES.names()})")
    known = set(PIPELINE_KEYS) | set(source_keys(config["source"]))
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(
            f"{where}.{unknown[0]} is not a key of data source {config['source']!r} "
            f"(its keys: {sorted(known - set(PIPELINE_KEYS))}; pipeline keys: "
            f"{sorted(PIPELINE_KEYS)})"
        )


def data_section(source: str, previous: Mapping[str, Any] | None = None) -> dict:
    """A data section for ``source``: the pipeline keys of ``previous`` (pp, split, threads)
    and every key of the new source, taken from ``previous`` where it has it, else the
    source's default ("" for a required one). Used to switch a preset's data source."""
    previous = dict(previous or {})
    section = {k: previous[k] for k in PIPELINE_KEYS if k in previous}
    for key, default in source_keys(source).items():
        section[key] = previous.get(key, "" if default is REQUIRED or default is None else default)
    section["source"] = source
    return section


def _transform(config: Mapping[str, Any], counter: SkipCounter | None) -> _Preprocess:
    return _Preprocess(
        option(config, "pp"), bool(option(config, "skip_bad")), counter or SkipCounter()
    )


def _read_options(config: Mapping[str, Any]) -> grain.ReadOptions:
    return grain.ReadOptions(
        num_threads=int(option(config, "num_threads")),
        prefetch_buffer_size=int(option(config, "prefetch")),
    )


def train_dataset(
    config: Mapping[str, Any],
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    counter: SkipCounter | None = None,
) -> grain.IterDataset:
    """Infinite, shuffled, augmented batches of this process's slice: dicts of [b, ...] arrays."""
    local_batch = _local_batch(global_batch_size, process_count)
    source = build_source(config, config.get("split") or "train")
    transform = _transform(config, counter)
    ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat()
    repeats = int(option(config, "repeated_augmentation"))
    if repeats != 1:
        ds = _RepeatedAugmentation(ds, global_batch_size, repeats)
    ds = ds.random_map(transform)
    ds = _ProcessSlice(ds, local_batch, process_index, process_count)
    workers = int(option(config, "worker_processes"))
    if not workers:
        return ds.to_iter_dataset(_read_options(config)).batch(local_batch, drop_remainder=True)
    # Worker processes take whole batches in turn, so every batch is the one a single process
    # makes; the iterator's state then counts batches, so keep worker_processes across resumes.
    ds = ds.batch(local_batch, drop_remainder=True).to_iter_dataset(_read_options(config))
    if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags (outside an absl app)
        flags.FLAGS.mark_as_parsed()
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))


def eval_batches(
    config: Mapping[str, Any],
    *,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    max_examples: int | None = None,
    counter: SkipCounter | None = None,
    split: str | None = None,
) -> Iterator[dict]:
    """One pass over the eval split (``split`` overrides ``config.split``): local batches padded
    to size b with a float ``mask`` (1 real, 0 padding). Every process yields the same number of
    batches."""
    local_batch = _local_batch(global_batch_size, process_count)
    source = build_source(config, split or config.get("split") or "test")
    n = len(source) if max_examples is None else min(len(source), int(max_examples))
    transform = _transform(config, counter)
    ds = grain.MapDataset.source(source)[:n].seed(0).random_map(transform)
    per_process = -(-n // process_count)
    start = process_index * per_process
    ds = ds[start : min(n, start + per_process)]
    num_batches = -(-per_process // local_batch)
    batches = ds.to_iter_dataset(_read_options(config)).batch(local_batch, drop_remainder=False)
    produced = 0
    for batch in batches:
        produced += 1
        yield _pad(batch, local_batch)
    for _ in range(produced, num_batches):  # this process ran out first: send empty batches
        yield _pad(_empty_like_first(source, transform), local_batch)


def _local_batch(global_batch_size: int, process_count: int) -> int:
    if global_batch_size % process_count:
        raise ValueError(
            f"batch_size {global_batch_size} is not divisible by the {process_count} processes"
        )
    return global_batch_size // process_count


def _pad(batch: dict, size: int) -> dict:
    n = len(next(iter(batch.values())))
    out = {
        k: np.concatenate([v, np.zeros((size - n,) + v.shape[1:], v.dtype)])
        for k, v in batch.items()
    }
    out["mask"] = (np.arange(size) < n).astype(np.float32)
    return out


def _empty_like_first(source, transform) -> dict:
    example = transform(source[0], np.random.default_rng(0))
    return {k: np.asarray(v)[None][:0] for k, v in example.items()}


# The last ``training_images`` read: a run's start-up asks for the same images twice (the
# model's data_init and the reconstruction evaluator's linear codes).
_LAST_TRAINING_IMAGES: dict[str, np.ndarray] = {}


def training_images(config: Mapping[str, Any], num_examples: int) -> np.ndarray:
    """The first ``num_examples`` images [n, H, W, C] of a run's training data (``config``: its
    config.data, split and preprocessing as trained, random ops seeded per example), in one
    deterministic pass, the same in every process. Read-only: a repeated call with the same
    data config and count returns the same array."""
    key = json.dumps([dict(config), num_examples], sort_keys=True, default=repr)
    if key not in _LAST_TRAINING_IMAGES:
        batches = eval_batches(
            config,
            global_batch_size=256,
            max_examples=num_examples,
            split=config.get("split") or "train",
        )
        images = np.concatenate([batch["image"][batch["mask"] > 0] for batch in batches])
        images.setflags(write=False)
        _LAST_TRAINING_IMAGES.clear()
        _LAST_TRAINING_IMAGES[key] = images
    return _LAST_TRAINING_IMAGES[key]
