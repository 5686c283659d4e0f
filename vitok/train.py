"""The one trainer: every model family trains through ``train_and_evaluate``.

    python -m vitok.train --config=configs/vit.py:tiny --workdir=/tmp/vit \
        --config.optim.lr=1e-3

Sections: 1 set-up (processes, mesh) -> 2 data -> 3 model, optimizer and sharded state ->
4 checkpoint restore -> 5 the jitted step -> 6 the loop (log, evaluate, checkpoint).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vitok import checkpoint, perf, runs, sharding
from vitok import config as config_lib
from vitok.config import REQUIRED, section_options
from vitok.data import pipeline
from vitok.evaluators import EVAL_KEYS, evaluator_options
from vitok.models import ModelHandle, init_variables
from vitok.models.frozen import load_pretrained, pretrained_workdirs
from vitok.models.transfer import INIT_FROM_KEYS, data_init, init_from_run, source_run
from vitok.optim import make_optimizer, optim_options
from vitok.plots import plot_curves
from vitok.registry import EVALUATORS, TASKS
from vitok.writer import MetricWriter, Progress

# The top-level keys of a training config that the trainer reads, with their defaults; a task
# adds its own (``CONFIG_KEYS``: a key -> default, or a section -> its keys and defaults).
RUN_KEYS = {
    "seed": REQUIRED, "task": REQUIRED, "total_steps": REQUIRED, "batch_size": REQUIRED,
    "eval_every": REQUIRED, "checkpoint_every": REQUIRED, "log_every": 50, "keep_checkpoints": 3,
    "async_checkpoints": True, "peak_flops_per_device": 0.0, "model": REQUIRED, "data": REQUIRED,
    "optim": REQUIRED, "mesh": REQUIRED, "sharding": REQUIRED, "evals": {}, "init_from": None,
}  # fmt: skip


def run_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The top-level keys with their defaults, after checking the keys of every section a
    component reads with defaults (task, optimizer, evaluators, init_from): an unknown key is
    an error naming it, at start-up."""
    task_keys = getattr(TASKS.lookup(config.task), "CONFIG_KEYS", {})
    run = section_options(config, {**RUN_KEYS, **task_keys}, "config")
    for key, defaults in task_keys.items():
        if isinstance(defaults, Mapping):
            section_options(config.get(key), defaults, f"config.{key}")
    if run["init_from"] is not None:
        section_options(run["init_from"], INIT_FROM_KEYS, "config.init_from")
    optim_options(config.optim)
    for name, ev in run["evals"].items():
        if "type" not in ev:
            raise config_lib.ConfigError(f"config.evals.{name} needs the key 'type'")
        evaluator = EVALUATORS.lookup(ev.type)
        if not isinstance(getattr(evaluator, "OPTIONS", None), Mapping):
            raise TypeError(
                f"evaluator {ev.type!r} declares no OPTIONS (its config keys and defaults)"
            )
        evaluator_options(ev, evaluator.OPTIONS, f"config.evals.{name}")
    return run


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; the run stops and keeps its last good checkpoint."""


@dataclasses.dataclass
class EvalContext:
    """What an evaluator needs from the trainer: the model, mesh and data helpers."""

    config: ml_collections.ConfigDict
    model: ModelHandle
    mesh: jax.sharding.Mesh
    rules: tuple
    workdir: str

    def eval_batches(self, eval_config: Any) -> Iterator[dict]:
        """Global (sharded) batches of an evaluator's data, with a ``mask`` for padding."""
        options = {**EVAL_KEYS, **eval_config}
        batch_size = int(options["batch_size"] or self.config.batch_size)
        for local in pipeline.eval_batches(
            eval_config.data,
            global_batch_size=batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            max_examples=options["max_examples"] or None,
        ):
            yield sharding.global_batch(local, self.mesh, self.rules)


@dataclasses.dataclass
class Setup:
    """The pure functions of a run and what they close over (model, task, optimizer, mesh).

    The train state is a dict of plain pytrees: ``params``, ``extra`` (non-trainable variables),
    ``opt_state``, ``step``, ``rng`` (raw key data) and, with EMA, ``ema``.
    """

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    rules: tuple
    model: ModelHandle
    task: Any
    tx: optax.GradientTransformation
    lr_schedule: optax.Schedule
    ema_decay: float

    @classmethod
    def create(cls, config: ml_collections.ConfigDict, mesh, rules) -> Setup:
        model = ModelHandle.abstract(config.model, config.seed)
        tx, lr_schedule = make_optimizer(config.optim, config.total_steps, model.logical_axes)
        return cls(
            config=config,
            mesh=mesh,
            rules=rules,
            model=model,
            task=TASKS.lookup(config.task)(config),
            tx=tx,
            lr_schedule=lr_schedule,
            ema_decay=float(optim_options(config.optim)["ema_decay"]),
        )

    def init_state(self, rng: jax.Array) -> dict:
        params, extra = init_variables(self.config.model, rng)
        state = {
            "params": params,
            "extra": extra,
            "opt_state": self.tx.init(params),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.fold_in(rng, 1)),
        }
        if self.ema_decay:
            state["ema"] = params
        return state

    def train_step(self, state: dict, batch: dict) -> tuple[dict, dict]:
        """One optimizer step on a global batch; returns the new state and scalar metrics."""
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])

        def loss_fn(params):
            model = self.model.merge(params, state["extra"])
            loss, aux = self.task.loss(model, batch, rng)
            return loss.astype(jnp.float32), aux

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = state | {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
        if self.ema_decay:
            new_state["ema"] = optax.incremental_update(params, state["ema"], 1.0 - self.ema_decay)
        metrics = {
            "train/loss": loss,
            "train/grad_norm": optax.tree.norm(grads),
            "train/lr": self.lr_schedule(state["step"]),
            **aux,
        }
        return new_state, metrics

    def state_shardings(self, abstract_state: dict) -> dict:
        """Params by their logical axes; optimizer moments like their params; rest replicated."""
        replicated = sharding.replicated(self.mesh)
        params, extra = runs.weight_shardings(self.model, self.mesh, self.rules)
        opt = optax.tree_map_params(
            self.tx,
            lambda _, s: s,
            abstract_state["opt_state"],
            params,
            transform_non_params=lambda _: replicated,
            is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct),
        )
        out = {k: jax.tree.map(lambda _: replicated, v) for k, v in abstract_state.items()}
        out["params"], out["opt_state"], out["extra"] = params, opt, extra
        if "ema" in out:
            out["ema"] = params
        return out

    def jit_train_step(self, state_shardings: dict, batch: dict):
        """``train_step`` jitted with explicit shardings and the state donated."""
        return jax.jit(
            self.train_step,
            in_shardings=(state_shardings, {k: v.sharding for k, v in batch.items()}),
            out_shardings=(state_shardings, sharding.replicated(self.mesh)),
            donate_argnums=0,
        )

    def train_flops_per_step(self) -> float:
        """Forward + backward (3x forward) matmul FLOPs of one global batch."""
        return 3 * float(self.model.module().forward_flops()) * self.config.batch_size


def _peak_flops(per_device: float) -> float:
    if per_device > 0:
        return per_device * jax.device_count()
    measured = perf.measure_matmul_peak()
    # Host-platform devices share the same cores, so one measurement is the host's peak.
    return measured * (
        jax.process_count() if jax.default_backend() == "cpu" else jax.device_count()
    )


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, devices: list | None = None
) -> dict[str, float]:
    """Trains ``config`` in ``workdir`` (resuming from its checkpoints); returns final metrics.

    ``devices`` defaults to every device of every process; tests pass a subset.
    """
    # --- 1. set-up ------------------------------------------------------------------------------
    config_lib.validate(config)
    run = run_options(config)
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    lock = WorkdirLock(workdir) if is_main else None  # the job's other processes share it
    try:
        return _train(config, run, workdir, devices, lock)
    finally:
        if lock is not None:
            lock.release()


def _train(config, run: dict[str, Any], workdir: str, devices, lock) -> dict[str, float]:
    is_main = jax.process_index() == 0
    mesh = sharding.make_mesh(config.mesh, devices)
    check_batch_size(config.batch_size, mesh)
    rules = runs.sharding_rules(config)
    writer = MetricWriter(workdir, enabled=is_main)
    if is_main:
        # The tools (tokenize, detokenize, ...) rebuild the model from this file.
        runs.write_config(workdir, config)
    logging.info(
        "mesh %s over %d devices, %d processes", dict(mesh.shape), mesh.size, jax.process_count()
    )

    # --- 2. data --------------------------------------------------------------------------------
    skipped = pipeline.SkipCounter()
    train_iter = iter(
        pipeline.train_dataset(
            config.data,
            global_batch_size=config.batch_size,
            seed=config.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            counter=skipped,
        )
    )

    # --- 3. model, optimizer, sharded state -----------------------------------------------------
    setup = Setup.create(config, mesh, rules)
    init_rng = jax.random.key(config.seed)
    abstract_state = jax.eval_shape(setup.init_state, init_rng)
    state_shardings = setup.state_shardings(abstract_state)
    model, ema_decay = setup.model, setup.ema_decay

    # --- 4. restore or initialise ----------------------------------------------------------------
    ckpt = checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        max_to_keep=int(run["keep_checkpoints"]),
        async_save=bool(run["async_checkpoints"]),
    )
    target = runs.with_shardings(abstract_state, state_shardings)
    restored = ckpt.restore(target, train_iter)
    if restored is None:
        pretrained_workdirs(model)  # a missing workdir fails here, before compiling anything
        source = source_run(config)  # likewise a missing init_from run
        state = jax.jit(setup.init_state, out_shardings=state_shardings)(init_rng)
        state["extra"] = load_pretrained(model, state["extra"], mesh)
        # Fitted first: a source run without them (init_from) leaves the fitted values.
        state = data_init(model, state, config.data)
        state["params"], state["extra"] = init_from_run(
            source, model, state["params"], state["extra"], mesh
        )
        if ema_decay:  # a copy: the step donates both trees
            state["ema"] = jax.tree.map(jnp.copy, state["params"])
        start_step = 0
    else:
        state, start_step = restored
    writer.truncate_after(start_step)
    if is_main:
        print(
            f"vitok: {'resuming at step ' + str(start_step) if start_step else 'starting'} "
            f"in {workdir}",
            file=sys.stderr,
            flush=True,
        )

    # --- 5. evaluators ----------------------------------------------------------------------------
    context = EvalContext(config, model, mesh, rules, workdir)
    evaluators = {
        name: EVALUATORS.lookup(ev.type)(ev, context) for name, ev in run["evals"].items()
    }

    def run_evals() -> dict[str, float]:
        params = state["ema"] if ema_decay else state["params"]
        results = {}
        for name, evaluator in evaluators.items():
            t0 = time.perf_counter()
            results.update(evaluator.evaluate(params, state["extra"]))
            logging.info("evaluator %s took %.1fs", name, time.perf_counter() - t0)
        return results

    # --- 6. the loop ------------------------------------------------------------------------------
    flops_per_step = setup.train_flops_per_step()
    peak = _peak_flops(float(run["peak_flops_per_device"]))
    progress = Progress(config.total_steps, start_step, enabled=is_main)
    log_every = int(run["log_every"])
    last_metrics: dict[str, float] = {}
    # The first step whose loss was non-finite (0: none), tracked on the device and read only at
    # log and checkpoint steps, so no step waits for the previous one's loss.
    first_bad = jnp.zeros((), jnp.int32)
    paused = 0.0  # seconds of evaluation and checkpointing since the last log, not step time
    step_fn = None  # compiled on the first batch, whose shardings it takes
    stop = StopSignals()

    with sharding.mesh_rules(mesh, rules), _restoring(stop):
        for step in range(start_step + 1, config.total_steps + 1):
            local = next(train_iter)
            batch = sharding.global_batch(local, mesh, rules)
            if step_fn is None:
                step_fn = setup.jit_train_step(state_shardings, batch)
            state, metrics = step_fn(state, batch)
            first_bad = _track_non_finite(first_bad, metrics["train/loss"], step)

            is_last = step == config.total_steps
            if step % log_every == 0 or is_last:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                _check_finite(first_bad, ckpt)
                rate = progress.rate(step, paused=paused)
                paused = 0.0
                values["perf/steps_per_sec"] = rate
                values["perf/examples_per_sec"] = rate * config.batch_size
                if peak:
                    values["perf/mfu"] = perf.mfu(flops_per_step, 1.0 / rate, peak)
                if skipped.count:
                    values["data/skipped"] = skipped.count
                writer.write(step, values)
                if lock is not None:
                    lock.heartbeat()
                progress.show(step, rate, {k: values[k] for k in ("train/loss", "train/lr")})
                last_metrics.update(values)

            t0 = time.perf_counter()
            if step % config.eval_every == 0 or is_last:
                _check_finite(first_bad, ckpt)
                results = run_evals()
                writer.write(step, results)
                if is_main and results:
                    print(
                        "  " + " ".join(f"{k}={v:.4f}" for k, v in results.items()), file=sys.stderr
                    )
                last_metrics.update(results)

            preempted = stop.should_stop(step, sync=step % log_every == 0)
            if step % config.checkpoint_every == 0 or is_last or preempted:
                _check_finite(first_bad, ckpt)
                if not bool(checkpoint.all_finite(state["params"])):
                    raise NonFiniteLossError(_nan_message("parameters", step, ckpt))
                ckpt.save(step, state, train_iter)
            paused += time.perf_counter() - t0
            if preempted and not is_last:
                ckpt.wait()
                ckpt.close()
                writer.close()
                raise Preempted(step, stop.received, ckpt.directory)

    ckpt.close()
    writer.close()
    if is_main:
        plot_curves(workdir)
    return last_metrics


class WorkdirLockedError(RuntimeError):
    pass


class WorkdirLock:
    """One writer per workdir: ``workdir/.lock`` holds the host, pid and start time of the
    process 0 that owns it. A second launch refuses with the holder's host and pid while the
    holder lives. A lock is stale (taken over) when its pid is gone on this host, or, from
    another host, when the holder has not touched it for ``stale_after`` seconds (it touches it
    at every log step)."""

    def __init__(self, workdir: str, stale_after: float = 600.0):
        self.path = os.path.join(workdir, ".lock")
        self.stale_after = stale_after
        self.host, self.pid = socket.gethostname(), os.getpid()
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and not self._stale(holder):
                    raise WorkdirLockedError(
                        f"workdir {workdir} is in use by a running job (host {holder['host']}, "
                        f"pid {holder['pid']}, since {holder['started']}); stop it or pick "
                        f"another --workdir"
                    ) from None
                _remove(self.path)  # stale: its holder is gone
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"host": self.host, "pid": self.pid, "started": time.ctime()}, f)
            return
        raise WorkdirLockedError(f"could not take the lock {self.path}")

    def _holder(self) -> dict | None:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None  # half-written or removed meanwhile: stale

    def _stale(self, holder: dict) -> bool:
        if holder.get("host") == self.host:
            return not _pid_alive(int(holder.get("pid", -1)))
        try:
            return time.time() - os.path.getmtime(self.path) > self.stale_after
        except OSError:
            return True

    def heartbeat(self) -> None:
        try:
            os.utime(self.path)
        except OSError:
            pass

    def release(self) -> None:
        holder = self._holder()
        if holder and holder.get("host") == self.host and holder.get("pid") == self.pid:
            _remove(self.path)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# Exit status of a run stopped by SIGTERM / SIGINT after checkpointing its last step: "try
# again" (EX_TEMPFAIL); rerunning the same command resumes exactly where it stopped.
PREEMPTED_EXIT_CODE = 75


class Preempted(Exception):
    """The run was asked to stop (SIGTERM / SIGINT), checkpointed ``step`` and stopped."""

    def __init__(self, step: int, signal_name: str, directory: str):
        self.step, self.signal_name = step, signal_name
        super().__init__(
            f"{signal_name}: stopped after step {step}, checkpointed in {directory}; run the "
            f"same command again to resume"
        )


class StopSignals:
    """Turns SIGTERM and SIGINT into a request to stop after the current step.

    With one process the request is this process's own flag. With several, every process must
    stop after the same step: a signal to any of them sets the flag on all through the
    coordination service's preemption sync point (``reached_preemption_sync_point``, which
    JAX's distributed runtime arms on SIGTERM), and a SIGINT is shared at the next log step.
    The previous handlers come back on ``restore``."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous = {}
        multi = jax.process_count() > 1
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in self.SIGNALS:
            if multi and sig == signal.SIGTERM:
                continue  # the distributed runtime's own SIGTERM notifier is kept
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received = signal.Signals(signum).name

    def should_stop(self, step: int, sync: bool) -> bool:
        """Whether to stop after ``step``; every process gets the same answer. ``sync``: a step
        at which processes may exchange their local flags (one small all-reduce)."""
        if jax.process_count() == 1:
            return self.received is not None
        from jax.experimental import multihost_utils

        if multihost_utils.reached_preemption_sync_point(step):
            self.received = self.received or "SIGTERM"
            return True
        if not sync:
            return False
        flags = multihost_utils.process_allgather(np.int32(self.received is not None))
        if np.any(flags):
            self.received = self.received or "SIGINT"
            return True
        return False

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


@contextlib.contextmanager
def _restoring(stop: StopSignals):
    try:
        yield
    finally:
        stop.restore()


def check_batch_size(batch_size: int, mesh) -> None:
    """The global batch is split over the data-parallel axes (data x fsdp) and the processes."""
    ways = int(mesh.shape.get("data", 1)) * int(mesh.shape.get("fsdp", 1))
    ways = max(ways, jax.process_count())
    if batch_size % ways:
        raise ValueError(
            f"batch_size {batch_size} does not split over the {ways}-way data parallelism of "
            f"mesh {dict(mesh.shape)}; use a multiple of {ways}"
        )


def _nan_message(what: str, step: int, ckpt: checkpoint.Checkpointer) -> str:
    ckpt.wait()
    good = ckpt.latest_step()
    kept = (
        f"the last good checkpoint (step {good}) is kept" if good else "no checkpoint was written"
    )
    return f"non-finite {what} at step {step}; stopping the run; {kept} in {ckpt.directory}"


@jax.jit
def _track_non_finite(first_bad: jax.Array, loss: jax.Array, step: int) -> jax.Array:
    """The first step with a non-finite loss so far (0: none); runs on the device, no sync."""
    return jnp.where((first_bad == 0) & ~jnp.isfinite(loss), step, first_bad)


def _check_finite(first_bad: jax.Array, ckpt: checkpoint.Checkpointer) -> None:
    """Raises if any step so far had a non-finite loss (reads one scalar from the device)."""
    step = int(first_bad)
    if step:
        raise NonFiniteLossError(_nan_message("loss", step, ckpt))


# --- command line -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = config_lib.parse_command_line(sys.argv[1:] if argv is None else argv)
    _initialize_distributed(args)
    logging.basicConfig(level=logging.INFO if jax.process_index() == 0 else logging.WARNING)
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    debug = args.debug or os.environ.get("VITOK_DEBUG", "") not in ("", "0")
    try:
        final = train_and_evaluate(args.config, args.workdir)
    except WorkdirLockedError as e:
        print(f"vitok: {e}", file=sys.stderr)
        sys.exit(2)
    except checkpoint.CheckpointWriteError as e:
        print(f"vitok: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)  # not sys.exit: orbax's failed writer threads would print at shutdown
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        if debug:
            raise
        # A user-caused error (an unknown name, a bad shape or size, a missing file): one line.
        print(f"vitok: {str(e).strip() or type(e).__name__} (--debug: traceback)", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLossError as e:
        print(f"vitok: {e}", file=sys.stderr)
        sys.exit(3)
    except checkpoint.CheckpointMismatchError as e:
        print(f"vitok: {e}", file=sys.stderr)
        sys.exit(2)
    except Preempted as e:
        print(f"vitok: {e}", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_CODE)
    if jax.process_index() == 0:
        shown = {k: round(v, 4) for k, v in final.items() if k.startswith(("eval/", "train/loss"))}
        print(f"vitok: done; final metrics {shown}", file=sys.stderr)


def _initialize_distributed(args) -> None:
    """Multi-process start-up: explicit flags, or ``--distributed`` for cluster auto-detection."""
    if not (args.coordinator_address or args.distributed):
        return
    if args.cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", args.cpu_collectives)
    if args.coordinator_address:
        jax.distributed.initialize(
            coordinator_address=args.coordinator_address,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    else:
        jax.distributed.initialize()


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
