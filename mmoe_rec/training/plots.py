"""Readable PNG plots of routing and task relatedness (matplotlib Agg: no display needed).

Every plot has a title, axis labels, a colour bar where colour carries a value, and annotated cells
when the matrix is small enough to read the numbers.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ANNOTATE_MAX_CELLS = 400


def _annotate(ax, values: np.ndarray, fmt: str, cmap, norm) -> None:
    if values.size > ANNOTATE_MAX_CELLS:
        return
    for (i, j), v in np.ndenumerate(values):
        if np.isnan(v):
            continue
        r, g, b, _ = cmap(norm(v))
        color = "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"  # readable on dark cells
        ax.text(j, i, format(v, fmt), ha="center", va="center", color=color, fontsize=8)


def utilization_heatmap(utilization: dict[str, np.ndarray], title: str = "Expert utilization (mean gate weight)"):
    """gate -> (E,) mean combine weight. Rows: gates (tasks), columns: experts."""
    gates = list(utilization)
    width = max(len(v) for v in utilization.values())
    mat = np.full((len(gates), width), np.nan)
    for i, g in enumerate(gates):
        mat[i, : len(utilization[g])] = utilization[g]
    fig, ax = plt.subplots(figsize=(max(4.5, 0.6 * width + 2.5), max(2.5, 0.5 * len(gates) + 1.5)))
    cmap = plt.get_cmap("viridis")
    im = ax.imshow(mat, cmap=cmap, vmin=0.0, vmax=max(float(np.nanmax(mat)), 1e-6), aspect="auto")
    _annotate(ax, mat, ".2f", cmap, im.norm)
    ax.set_xticks(range(width), [f"e{i}" for i in range(width)])
    ax.set_yticks(range(len(gates)), gates)
    ax.set_xlabel("expert")
    ax.set_ylabel("gate (task)")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="mean gate weight")
    fig.tight_layout()
    return fig


def load_over_training(steps: list[int], series: dict[str, np.ndarray], ylabel: str,
                       title: str = "Per-expert load over training"):
    """gate -> (S, E) values at `steps` (S log points): one panel per gate, one line per expert."""
    gates = list(series)
    fig, axes = plt.subplots(len(gates), 1, figsize=(8, 2.4 * len(gates) + 0.6), squeeze=False, sharex=True)
    for ax, g in zip(axes[:, 0], gates):
        values = np.asarray(series[g])
        num_experts = values.shape[1] if values.ndim == 2 else 0
        colors = plt.get_cmap("tab20" if num_experts > 10 else "tab10")
        for e in range(num_experts):
            ax.plot(steps, values[:, e], marker="." if len(steps) < 30 else None, color=colors(e % colors.N),
                    label=f"e{e}")
        if num_experts:
            ax.axhline(1.0 / num_experts, color="grey", linestyle="--", linewidth=0.8, label="uniform 1/E")
        ax.set_title(g, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=1 if num_experts < 12 else 2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[-1, 0].set_xlabel("training step")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def relatedness_matrices(matrices: dict[str, tuple[list[str], np.ndarray]],
                         title: str = "Task relatedness"):
    """name -> (task names, (T, T) matrix); one panel per measure, values annotated."""
    names = list(matrices)
    ranges = {"label_corr": (-1, 1), "gate_cos": (0, 1), "gate_js": (0, 1), "expert_jaccard": (0, 1),
              "grad_cos": (-1, 1)}
    labels = {"label_corr": "label correlation (Pearson)", "gate_cos": "gate cosine similarity",
              "gate_js": "gate Jensen-Shannon divergence", "expert_jaccard": "chosen-expert Jaccard overlap",
              "grad_cos": "loss-gradient cosine (shared params)"}
    cols = min(3, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 4.0 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names):
        tasks, mat = matrices[name]
        mat = np.asarray(mat, dtype=float)
        vmin, vmax = ranges.get(name, (float(np.nanmin(mat)), float(np.nanmax(mat))))
        cmap = plt.get_cmap("RdBu_r" if vmin < 0 else "viridis")
        im = ax.imshow(mat, cmap=cmap, vmin=vmin, vmax=vmax)
        _annotate(ax, mat, ".2f", cmap, im.norm)
        ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
        ax.set_yticks(range(len(tasks)), tasks)
        ax.set_xlabel("task")
        ax.set_ylabel("task")
        ax.set_title(labels.get(name, name), fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def close(fig) -> None:
    plt.close(fig)
