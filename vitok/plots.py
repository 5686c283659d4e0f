"""Figures a person can look at, written next to the metrics."""

from __future__ import annotations

import json
import os


def plot_curves(workdir: str, filename: str = "curves.png") -> str | None:
    """Plots ``train/loss`` and every ``eval/*`` scalar of ``metrics.jsonl`` against step."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    series: dict[str, tuple[list, list]] = {}
    for row in rows:
        for key, value in row.items():
            if (key == "train/loss" or key.startswith("eval/")) and isinstance(value, float):
                steps, values = series.setdefault(key, ([], []))
                steps.append(row["step"])
                values.append(value)
    if not series:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3.2), squeeze=False)
    for ax, (key, (steps, values)) in zip(axes[0], sorted(series.items()), strict=True):
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = os.path.join(workdir, filename)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
