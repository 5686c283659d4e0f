"""Figures a person can look at, written next to the metrics."""

from __future__ import annotations

import json
import math
import os
import re

_AT_K = re.compile(r"^(?P<family>.+)@(?P<k>\d+)$")


def metric_panels(rows: list[dict]) -> dict[str, dict[str, tuple[list, list, str]]]:
    """Groups the plotted scalars of ``metrics.jsonl`` rows into panels.

    A key ``eval/psnr@4`` is the line "k=4" of the panel ``eval/psnr`` (a metric family, one line
    per token count k); ``train/loss`` and ``eval/accuracy`` are panels of one line. Two kinds of
    reference are drawn dotted inside the panels they belong to instead of in a panel of their own:
    ``eval/baseline_X@k`` in every panel ``eval/..._X`` or ``eval/X`` (the linear code beside the
    decoder's PSNR), and ``eval/X_original`` in ``eval/X`` (the originals' seam ratio). The
    second linear reference, ``eval/linear_fsq_X@k``, is left to the table (reconstructions.md):
    constant lines for two references per k would bury the curves.

    Returns {panel: {line label: (steps, values, style)}}, style "-" or ":".
    """
    series: dict[str, tuple[list, list]] = {}
    for row in rows:
        for key, value in row.items():
            plotted = key == "train/loss" or (
                key.startswith("eval/") and not key.split("/")[-1].startswith("linear_fsq_")
            )
            if plotted and isinstance(value, float):
                steps, values = series.setdefault(key, ([], []))
                steps.append(row["step"])
                values.append(value)

    def split(key: str) -> tuple[str, str]:
        match = _AT_K.match(key)
        return (match["family"], f"k={match['k']}") if match else (key, key.split("/")[-1])

    families = {split(key)[0] for key in series}
    panels: dict[str, dict[str, tuple[list, list, str]]] = {}
    references = []
    for key in sorted(
        series, key=lambda k: (split(k)[0], int(_AT_K.match(k)["k"]) if _AT_K.match(k) else 0)
    ):
        family, label = split(key)
        prefix, _, name = family.rpartition("/")
        if name.startswith("baseline_") or (
            name.endswith("_original") and f"{prefix}/{name[: -len('_original')]}" in families
        ):
            references.append((key, family, label))
            continue
        panels.setdefault(family, {})[label] = (*series[key], "-")
    for key, family, label in references:
        prefix, _, name = family.rpartition("/")
        if name.endswith("_original"):
            targets = [f"{prefix}/{name[: -len('_original')]}"]
            label = "originals"
        else:
            base = name[len("baseline_") :]
            targets = [p for p in panels if p == f"{prefix}/{base}" or p.endswith(f"_{base}")]
            label = f"{label} linear"
            if not targets:
                targets = [family]
        for target in targets:
            panels.setdefault(target, {})[label] = (*series[key], ":")
    return dict(sorted(panels.items(), key=lambda item: item[0] != "train/loss"))


def plot_curves(workdir: str, filename: str = "curves.png") -> str | None:
    """Plots ``train/loss`` and every ``eval/*`` scalar of ``metrics.jsonl`` against step, one
    panel per metric family (``metric_panels``), at most four panels a row."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    panels = metric_panels(rows)
    if not panels:
        return None
    cols = min(4, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.4 * nrows), squeeze=False)
    colours = plt.get_cmap("viridis")
    for ax, (title, lines) in zip(axes.flat, panels.items(), strict=False):
        labels = [label for label in lines if not label.endswith(" linear")]
        for label, (steps, values, style) in lines.items():
            own = label.removesuffix(" linear")
            index = labels.index(own) if own in labels else 0
            colour = "black" if label == "originals" else colours(index / max(len(labels) - 1, 1))
            marker = "o" if len(steps) < 30 and style == "-" else None
            ax.plot(steps, values, style, color=colour, marker=marker, markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=7, ncol=2)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    out = os.path.join(workdir, filename)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
