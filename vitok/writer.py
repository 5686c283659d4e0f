"""Metrics to ``metrics.jsonl`` and TensorBoard, plus a progress line; process 0 only."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping


class MetricWriter:
    """``write(step, metrics)`` appends ``{"step": step, **metrics}`` to ``metrics.jsonl`` and
    logs every scalar to TensorBoard under ``workdir/tb``."""

    def __init__(self, workdir: str, *, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            os.makedirs(workdir, exist_ok=True)
            self._tb = SummaryWriter(os.path.join(workdir, "tb"))

    def truncate_after(self, step: int) -> None:
        """Drops records past ``step`` (they belong to an interrupted run being resumed)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(self.path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(self.path + ".tmp", self.path)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled or not metrics:
            return
        record = {"step": int(step)} | {k: _plain(v) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, float):
                self._tb.add_scalar(key, value, step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _plain(value) -> float | int | str:
    if isinstance(value, (int, str)):
        return value
    value = float(value)
    return value if math.isfinite(value) else str(value)


class Progress:
    """One line per call: step, chosen metrics, steps/s and ETA (works without a TTY)."""

    def __init__(self, total_steps: int, start_step: int, *, enabled: bool = True):
        self.total = total_steps
        self.enabled = enabled
        self._t0 = time.perf_counter()
        self._s0 = start_step
        self._last_t, self._last_s = self._t0, start_step

    def rate(self, step: int, paused: float = 0.0) -> float:
        """Steps per second since the previous call, not counting ``paused`` seconds (spent
        on evaluation and checkpoints in between)."""
        now = time.perf_counter()
        rate = (step - self._last_s) / max(now - self._last_t - paused, 1e-9)
        self._last_t, self._last_s = now, step
        return rate

    def show(self, step: int, steps_per_sec: float, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        done = step / max(self.total, 1)
        eta = (self.total - step) / max(steps_per_sec, 1e-9)
        bar = "#" * int(20 * done) + "." * (20 - int(20 * done))
        shown = " ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in metrics.items())
        print(
            f"[{bar}] {step}/{self.total} {shown} | {steps_per_sec:.2f} steps/s | "
            f"ETA {_duration(eta)}",
            file=sys.stderr,
            flush=True,
        )


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
