"""Orbax checkpoints of the train state and the grain iterator, with fallback past broken steps.

A step directory holds ``state`` (params, optimizer state, step, RNG), ``data`` (the grain
iterator position, one file per process) and ``meta`` (a fingerprint of the state). Orbax writes
into a temporary directory and renames it when complete, so a half-written step is never taken
for a finished one. On restore, a step that fails to load or whose fingerprint does not match is
reported, moved aside to ``<workdir>/checkpoints_corrupt/`` (never deleted) and the previous step
is tried.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import threading
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

_RTOL = 1e-4


class CheckpointError(RuntimeError):
    """A checkpoint step is unreadable or its contents are corrupted."""


class CheckpointMismatchError(ValueError):
    """A readable checkpoint holds a different state tree than the config builds (a config
    change such as another model size or optimizer), so it cannot be resumed."""


def describe(tree: Any) -> dict[str, list]:
    """``{key path: [shape, dtype]}`` of every leaf: what the checkpoint must match."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        jax.tree_util.keystr(path): [list(leaf.shape), str(jnp.dtype(leaf.dtype))]
        for path, leaf in flat
    }


@jax.jit
def fingerprint(tree: Any) -> jax.Array:
    """Per-leaf (sum, sum |x|) in float32: [num_leaves, 2]. Detects corrupted bytes."""
    leaves = jax.tree.leaves(tree)
    rows = [
        jnp.stack([x.astype(jnp.float32).sum(), jnp.abs(x.astype(jnp.float32)).sum()])
        for x in leaves
    ]
    return jnp.stack(rows) if rows else jnp.zeros((0, 2))


@jax.jit
def all_finite(tree: Any) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return (
        jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves])) if leaves else jnp.array(True)
    )


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, a lost mount); the run stops."""


def _storage_reason(text: str) -> str | None:
    """The storage failure an error's text names (a full disk, a file size limit), or None."""
    if "No space left" in text or "os_error_code='28'" in text:
        return "no space left on device"
    if "File too large" in text or "os_error_code='27'" in text:
        return "file size limit exceeded"
    return None


def _write_failure(step: int, directory: str, last_good: int | None, error: Exception) -> str:
    text = str(error)
    reason = _storage_reason(text)
    if reason is None:
        reason = text.strip().splitlines()[0][:200] if text.strip() else type(error).__name__
    try:
        free = f"{shutil.disk_usage(directory).free / 2**20:.1f} MiB free there"
    except OSError:
        free = "free space unknown"
    if last_good:
        good = f"the last good checkpoint is step {last_good}, kept"
    else:
        good = "no earlier checkpoint exists"
    return (
        f"writing the checkpoint of step {step} to {directory} failed ({reason}; {free}); "
        f"{good}; stopping the run"
    )


def _quiet_background_failures() -> None:
    """After a failed write the run stops; orbax's writer threads and asyncio tasks then fail
    again one by one, each printing a traceback of the same failure. Silence them: the
    ``CheckpointWriteError`` says it once."""
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    threading.excepthook = lambda args: None


def _drop_closed_loop_errors(unraisable) -> None:
    """``sys.unraisablehook``: orbax's write callbacks that fire after their event loop closed
    (they do once a write has failed) raise "Event loop is closed" where no one can catch it;
    those are dropped, anything else goes to the default hook."""
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and "Event loop is closed" in str(error):
        return
    sys.__unraisablehook__(unraisable)


class _OrbaxWriteErrors(logging.Filter):
    """Drops orbax's own multi-line error logs of a failed write: the Checkpointer reports the
    failure once, as one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


class _AsyncioStorageErrors(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" tracebacks of orbax's writer tasks
    that failed on storage (full disk, file size limit). The garbage collector can log them
    before the save or wait that sees the failure raises; that raise reports it as one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return error is None or _storage_reason(str(error)) is None


# One instance each: ``addFilter`` skips a filter already installed, so every Checkpointer
# can install them without stacking copies.
_ORBAX_FILTER = _OrbaxWriteErrors()
_ASYNCIO_FILTER = _AsyncioStorageErrors()


class Checkpointer:
    """Saves every ``checkpoint_every`` steps (asynchronously), keeps the last ``max_to_keep``.

    A failed write raises ``CheckpointWriteError`` (one line: the step, the directory, the
    reason, the free space, the last good step) at the save or wait that sees it; the failed
    step's temporary directory is removed and no committed step is touched."""

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.corrupt_dir = os.path.join(os.path.dirname(self.directory), "checkpoints_corrupt")
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self._manager = self._open()
        self._pending: int | None = None  # the step of a save that may still be in flight
        logging.getLogger("absl").addFilter(_ORBAX_FILTER)
        logging.getLogger("asyncio").addFilter(_ASYNCIO_FILTER)
        sys.unraisablehook = _drop_closed_loop_errors

    def _open(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self.directory, item_names=("state", "data", "meta"), options=self._options
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator | None) -> None:
        """Starts an (async) save of ``state`` and the iterator position at ``step``."""
        meta = {
            "step": int(step),
            "fingerprint": np.asarray(fingerprint(state)).tolist(),
            "tree": describe(state),
        }
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        with self._reporting_write_errors(step):
            self._manager.save(step, args=ocp.args.Composite(**items))
        self._pending = step

    @contextlib.contextmanager
    def _reporting_write_errors(self, step: int):
        try:
            yield
        except Exception as e:  # orbax raises ValueError / OSError / XlaRuntimeError for these
            failed = self._pending if self._pending is not None else step
            self._pending = None
            _quiet_background_failures()
            self._remove_temporary()
            # The failed step's own directory (a synchronous save can leave it half-written
            # under its final name) is never a good checkpoint: those have other step numbers.
            shutil.rmtree(os.path.join(self.directory, str(failed)), ignore_errors=True)
            committed = (
                [s for s in self.all_steps() if s != failed]
                if os.path.isdir(self.directory)
                else []
            )
            raise CheckpointWriteError(
                _write_failure(failed, self.directory, max(committed, default=None), e)
            ) from e

    def _remove_temporary(self) -> None:
        """Deletes half-written steps (orbax's ``*.orbax-checkpoint-tmp*``), never a committed one."""
        if not os.path.isdir(self.directory):
            return
        for name in os.listdir(self.directory):
            if ".orbax-checkpoint-tmp" in name:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def restore(
        self,
        abstract_state: Any,
        data_iterator: grain.DatasetIterator | None,
        *,
        partial: bool = False,
    ) -> tuple[Any, int] | None:
        """Restores the newest good step into shardings given by ``abstract_state``
        (ShapeDtypeStructs); sets ``data_iterator`` to its position. None if there is none.

        ``partial``: ``abstract_state`` names a subset of the saved state (e.g. only
        ``{"params": ...}``); only those arrays are read, and the fingerprint and tree checks
        cover that subset.
        """
        for step in reversed(self.all_steps()):
            try:
                state = self._restore_step(step, abstract_state, data_iterator, partial)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # any failure to read a step means: fall back to an older one
                logging.error(
                    "checkpoint at step %d in %s is unreadable or corrupt: %s: %s; "
                    "moving it to %s and falling back to the previous checkpoint",
                    step,
                    self.directory,
                    type(e).__name__,
                    str(e)[:500],
                    self.corrupt_dir,
                )
                self._quarantine(step)
                continue
            logging.info("restored checkpoint at step %d from %s", step, self.directory)
            return state, step
        return None

    def _restore_step(
        self, step: int, abstract_state: Any, data_iterator: Any, partial: bool = False
    ) -> Any:
        # The small JSON item first: a tree mismatch must be reported before touching arrays.
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = meta["meta"]
        wanted = describe(abstract_state)
        saved = meta["tree"]
        # The fingerprint rows follow the saved tree's leaf order (the JSON keeps it).
        rows = np.asarray(meta["fingerprint"], np.float64).reshape(-1, 2)
        if partial:
            index = {key: i for i, key in enumerate(saved)}
            saved = {key: saved[key] for key in wanted if key in saved}
            rows = rows[[index[key] for key in saved]]
        _check_same_tree(saved, wanted, step, self.directory)
        if partial:
            restore_args = jax.tree.map(
                lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), abstract_state
            )
            state_args = ocp.args.PyTreeRestore(
                abstract_state, restore_args=restore_args, partial_restore=True
            )
        else:
            state_args = ocp.args.StandardRestore(abstract_state)
        items = {"state": state_args}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        actual = np.asarray(fingerprint(restored["state"]), np.float64)
        if rows.shape != actual.shape or not np.allclose(actual, rows, rtol=_RTOL, atol=1e-6):
            raise CheckpointError(f"fingerprint mismatch at step {step}: the arrays are corrupted")
        return restored["state"]

    def _quarantine(self, step: int) -> None:
        """Moves a broken step out of the manager's way, so it is neither used nor overwritten."""
        self._manager.wait_until_finished()
        if jax.process_index() == 0:
            os.makedirs(self.corrupt_dir, exist_ok=True)
            target = os.path.join(self.corrupt_dir, f"{step}-{int(time.time() * 1000)}")
            shutil.move(os.path.join(self.directory, str(step)), target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"vitok_quarantine_{step}")
        self._manager.close()
        self._manager = self._open()

    def wait(self) -> None:
        with self._reporting_write_errors(self._pending or 0):
            self._manager.wait_until_finished()
        self._pending = None

    def close(self) -> None:
        self.wait()
        self._manager.close()


def _check_same_tree(saved: dict, wanted: dict, step: int, directory: str) -> None:
    if saved == wanted:
        return
    missing = sorted(set(wanted) - set(saved))[:5]
    extra = sorted(set(saved) - set(wanted))[:5]
    changed = sorted(k for k in set(saved) & set(wanted) if saved[k] != wanted[k])[:5]
    raise CheckpointMismatchError(
        f"checkpoint at step {step} in {directory} does not match the state this config builds "
        f"(a changed model or optimizer?); not in checkpoint: {missing}, only in checkpoint: "
        f"{extra}, different shape/dtype: {changed}. Use a new --workdir or the original config."
    )
