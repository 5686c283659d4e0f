"""Fault injection: what a run does when the cluster interrupts it (issue 17).

SIGTERM / SIGINT: the run finishes its step, checkpoints it, waits for the commit and exits with
``PREEMPTED_EXIT_CODE``; the same command then resumes and ends with exactly the metrics of an
uninterrupted run. Real signals, real subprocesses."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import ROOT, tiny_vit_cli_args, xla_flags

from vitok.train import PREEMPTED_EXIT_CODE

ARGS = tiny_vit_cli_args()  # checkpoint_every 1000: only the last step and the preempted one


def _launch(workdir, extra=(), devices=8):
    env = dict(os.environ, XLA_FLAGS=xla_flags(devices))
    cmd = [sys.executable, "-m", "vitok.train", f"--workdir={workdir}", *ARGS, *extra]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def _metrics(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


def _logged_steps(workdir) -> int:
    path = os.path.join(workdir, "metrics.jsonl")
    return sum(1 for _ in open(path)) if os.path.exists(path) else 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    proc = _launch(workdir)
    out = proc.communicate(timeout=600)[0].decode()
    assert proc.returncode == 0, out
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_a_signal_checkpoints_the_current_step_and_the_rerun_resumes_exactly(
    reference, tmp_path, sig
):
    workdir = str(tmp_path / "preempted")
    proc = _launch(workdir)
    deadline = time.time() + 300
    while _logged_steps(workdir) < 8:
        assert proc.poll() is None and time.time() < deadline, "run ended before the signal"
        time.sleep(0.02)
    proc.send_signal(sig)
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == PREEMPTED_EXIT_CODE, out
    message = out.strip().splitlines()[-1]
    assert message.startswith(f"vitok: {sig.name}: stopped after step "), message
    stopped = int(message.split("stopped after step ")[1].split(",")[0])
    assert 8 <= stopped < 40 and "run the same command again to resume" in message
    # The stopped step's checkpoint is committed (no temporary directory left behind).
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [str(stopped)]
    if sig == signal.SIGINT:
        return  # the same path from here on: resuming is checked once, after SIGTERM

    proc = _launch(workdir)
    out = proc.communicate(timeout=600)[0].decode()
    assert proc.returncode == 0, out
    assert f"resuming at step {stopped}" in out
    assert _metrics(workdir) == _metrics(reference)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(workdir, mesh):
    port = _free_port()
    flags = [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
    return [_launch(workdir, [*flags, f"--process_id={i}", *mesh], devices=4) for i in range(2)]


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_after_the_same_step(reference, tmp_path):
    """A preemption notice reaches one host; JAX's preemption sync point makes both stop after
    the same step, write one checkpoint together and exit resumable; the rerun of both resumes
    and trains like the uninterrupted single-process run."""
    mesh = ["--config.mesh.data=2", "--config.mesh.fsdp=-1"]
    workdir = str(tmp_path / "two")
    procs = _two_processes(workdir, mesh)
    deadline = time.time() + 300
    while _logged_steps(workdir) < 8:
        assert all(p.poll() is None for p in procs) and time.time() < deadline
        time.sleep(0.02)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=300)[0].decode() for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == PREEMPTED_EXIT_CODE, out
    steps = {int(o.split("stopped after step ")[1].split(",")[0]) for o in outs}
    assert len(steps) == 1, outs
    (stopped,) = steps
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [str(stopped)]

    procs = _two_processes(workdir, mesh)
    outs = [p.communicate(timeout=600)[0].decode() for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out
    assert f"resuming at step {stopped}" in outs[0]
    a, b = _metrics(reference), _metrics(workdir)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for key in ("train/loss", "eval/accuracy"):
        x = np.array([r[key] for r in a if key in r])
        y = np.array([r[key] for r in b if key in r])
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6, err_msg=key)


# --- one writer per workdir ------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_launch_on_a_live_workdir_refuses_and_a_dead_holder_does_not_block(tmp_path):
    workdir = str(tmp_path / "shared")
    first = _launch(workdir, ["--config.total_steps=100000"])
    deadline = time.time() + 300
    while _logged_steps(workdir) < 2:
        assert first.poll() is None and time.time() < deadline, "the first run ended early"
        time.sleep(0.02)
    second = _launch(workdir)
    out = second.communicate(timeout=300)[0].decode()
    assert second.returncode == 2, out
    line = out.strip().splitlines()[-1]
    assert f"is in use by a running job (host {socket.gethostname()}, pid {first.pid}" in line
    assert "Traceback" not in out
    first.send_signal(signal.SIGKILL)  # dies holding the lock
    first.wait()
    assert os.path.exists(os.path.join(workdir, ".lock"))
    third = _launch(workdir, ["--config.total_steps=3"])
    out = third.communicate(timeout=300)[0].decode()
    assert third.returncode == 0, out
    assert not os.path.exists(os.path.join(workdir, ".lock"))  # released at the end


def test_a_lock_from_another_host_is_stale_only_when_its_heartbeat_stops(tmp_path):
    from vitok.train import WorkdirLock, WorkdirLockedError

    path = tmp_path / ".lock"
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "then"}))
    with pytest.raises(WorkdirLockedError, match="host elsewhere, pid 1"):
        WorkdirLock(str(tmp_path), stale_after=60)
    old = time.time() - 120
    os.utime(path, (old, old))  # no heartbeat for two minutes
    lock = WorkdirLock(str(tmp_path), stale_after=60)
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not path.exists()


# --- errors a user can cause: one line, no traceback ----------------------------------------

BAD_INPUTS = {
    "unknown_op": (["--config.data.pp=decode(channels=1)|nosuchop"], "unknown preprocessing op 'nosuchop'"),
    "unknown_backend": (["--config.model.attention_backend=nosuch"], "unknown attention backend 'nosuch'"),
    "mesh_too_big": (["--config.mesh.data=16"], "needs 16 devices, but 8 are available"),
    "batch_not_divisible": (["--config.batch_size=12"], "batch_size 12 does not split over the 8-way"),
    "tfds_not_prepared": (
        ["--config.data.source=tfds", "--config.data.name=mnist", "--config.data.data_dir=NODATA"],
        "prepare it first with: tfds build mnist --data_dir=",
    ),
    "unknown_evaluator": (["--config.evals.test.type=nosuch"], "unknown evaluator 'nosuch'"),
    "unknown_model": (["--config.model.name=nosuch"], "unknown model 'nosuch'"),
    "unknown_task": (["--config.task=nosuch"], "unknown task 'nosuch'"),
    "unknown_source": (["--config.data.source=nosuch"], "unknown data source 'nosuch'"),
}  # fmt: skip


def _cli_argv(case: str, workdir: str) -> list[str]:
    flags, _ = BAD_INPUTS[case.removesuffix("+debug")]
    flags = [f.replace("NODATA", os.path.join(workdir, "nodata")) for f in flags]
    extra = ["--debug"] if case.endswith("+debug") else []
    return [f"--workdir={os.path.join(workdir, 'run')}", *ARGS, *flags, *extra]


@pytest.fixture(scope="module")
def cli_outcomes(tmp_path_factory) -> dict[str, tuple[int, str]]:
    """Every bad input (and one with --debug) through ``vitok.train.main``, each in its own
    forked process (``tests/forked_cli.py``): one interpreter start for all of them."""
    cases = [*sorted(BAD_INPUTS), "unknown_op+debug"]
    argvs = [_cli_argv(c, str(tmp_path_factory.mktemp(c.replace("+", "_")))) for c in cases]
    env = dict(os.environ, XLA_FLAGS=xla_flags(8))
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "forked_cli.py"), json.dumps(argvs)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return dict(zip(cases, map(tuple, json.loads(done.stdout.splitlines()[-1])), strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_user_errors_end_in_one_clear_line(case, cli_outcomes):
    code, out = cli_outcomes[case]
    assert code != 0, out
    assert "Traceback" not in out, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("vitok: ") and BAD_INPUTS[case][1] in last, last
    assert "importlib_resources" not in out


@pytest.mark.slow
def test_debug_shows_the_traceback(cli_outcomes):
    code, out = cli_outcomes["unknown_op+debug"]
    assert code != 0 and "Traceback (most recent call last)" in out, out
    assert BAD_INPUTS["unknown_op"][1] in out


# --- a full disk ----------------------------------------------------------------------------


def _small_filesystem(path) -> bool:
    """Mounts a 1 MiB tmpfs at ``path`` (needs root); False where that is not allowed."""
    os.makedirs(path, exist_ok=True)
    if os.environ.get("VITOK_TEST_NO_MOUNT"):  # to test the fallback where mounting works
        return False
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], capture_output=True
        )
    except OSError:
        return False
    return done.returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("asynchronous", [True, False], ids=["async", "sync"])
def test_a_full_disk_stops_the_run_in_one_line_and_keeps_the_last_good_checkpoint(
    tmp_path, asynchronous
):
    """On a 1 MiB tmpfs (or, where mounting is not allowed, with every file capped at 64 KiB by
    RLIMIT_FSIZE: the same failed write), a checkpoint every 5 steps fills the disk."""
    small = tmp_path / "small"
    mounted = _small_filesystem(small)
    flags = ["--config.total_steps=30", "--config.checkpoint_every=5", "--config.log_every=5",
             f"--config.async_checkpoints={asynchronous}"]  # fmt: skip
    preexec = None
    if not mounted:
        import resource

        def preexec():  # writes past 64 KiB fail with EFBIG instead of killing the process
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    try:
        workdir = str(small / "run")
        env = dict(os.environ, XLA_FLAGS=xla_flags(8))
        cmd = [sys.executable, "-m", "vitok.train", f"--workdir={workdir}", *ARGS, *flags]
        done = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, preexec_fn=preexec
        )
        out = done.stdout + done.stderr
        assert done.returncode == 2, out
        assert "Traceback" not in out, out
        last = out.strip().splitlines()[-1]
        match = re.match(
            r"vitok: writing the checkpoint of step (\d+) to .* failed \((.*); ([\d.]+) MiB "
            r"free there\); (the last good checkpoint is step (\d+), kept|no earlier checkpoint "
            r"exists); stopping the run$",
            last,
        )
        assert match, last
        failed, reason = int(match[1]), match[2]
        kept = sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")))
        # No half-written step is left for a later restore to trip over; the good ones stay.
        assert all(s % 5 == 0 and s < failed for s in kept), (kept, last)
        if mounted:  # a checkpoint is about 0.4 MiB: the disk fills at the first or a later one
            assert reason == "no space left on device"
            # The message names the newest checkpoint kept (under load an asynchronous commit
            # of the step before may not have finished when the next write fails).
            assert (int(match[5]) == kept[-1]) if match[5] else kept == []
        else:  # every checkpoint is larger than the file size limit
            assert failed == 5 and kept == [] and "no earlier checkpoint exists" in last
    finally:
        if mounted:
            subprocess.run(["umount", str(small)], capture_output=True)
