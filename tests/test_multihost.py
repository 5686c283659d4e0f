"""Two local processes x 4 CPU devices (jax.distributed, gloo) train exactly like 1 x 8."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT, xla_flags

ARGS = [
    "--config=configs/vit.py:tiny",
    "--config.total_steps=8",
    "--config.batch_size=32",
    "--config.log_every=1",
    "--config.eval_every=4",
    "--config.checkpoint_every=4",
    "--config.model.patch_size=7",
    "--config.model.width=32",
    "--config.model.depth=1",
    "--config.model.mlp_dim=64",
    "--config.model.num_heads=2",
    "--config.evals.test.batch_size=64",
    "--config.evals.test.max_examples=200",
    "--config.peak_flops_per_device=1e9",
    "--config.mesh.data=2",
    "--config.mesh.fsdp=-1",
]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir, devices, extra=()):
    env = dict(os.environ, XLA_FLAGS=xla_flags(devices))
    cmd = [sys.executable, "-m", "vitok.train", f"--workdir={workdir}", *ARGS, *extra]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    single = str(tmp_path / "single")
    proc = _launch(single, 8)
    out = proc.communicate(timeout=600)[0].decode()
    assert proc.returncode == 0, out

    multi = str(tmp_path / "multi")
    port = _free_port()
    procs = [
        _launch(
            multi,
            4,
            [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600)[0].decode() for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out

    a, b = _rows(single), _rows(multi)  # only process 0 writes metrics
    assert [r["step"] for r in a] == [r["step"] for r in b]
    keys = sorted(k for k in a[0] if k.startswith("train/"))
    for key in keys + ["eval/accuracy", "eval/loss"]:
        x = np.array([r[key] for r in a if key in r])
        y = np.array([r[key] for r in b if key in r])
        assert len(x) > 0
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6, err_msg=key)
    # Both processes wrote their own data-iterator position into the shared checkpoint.
    data_dir = os.path.join(multi, "checkpoints", "8", "data")
    assert sorted(f for f in os.listdir(data_dir) if f.endswith(".json")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
