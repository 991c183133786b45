"""Readable PNG plots of routing and task relatedness (matplotlib Agg: no display needed).

`RoutingMonitor` writes three of them at each epoch end (MLflow artifacts under `plots/`):

- `utilization_heatmap` — expert utilization: one row per gate (task, or `level/task` for PLE), one column per
  expert, colour = mean combine weight that gate gave the expert over the epoch. Experts a gate cannot reach (NaN:
  a PLE task gate and the other tasks' own experts) and gates with fewer experts than the widest one leave blank
  cells. Numbers are written in the cells when they fit; the colour bar marks the uniform share 1/E when all gates
  reach the same number of experts E.
- `expert_load` (`load_over_training`) — per-expert load at every logged step, one panel per gate. With at most
  `LINE_MAX_EXPERTS` experts per gate: one line per expert (distinct colour/style pairs, same colour for the same
  expert index in every panel, one shared legend) and a dotted uniform 1/E reference line, E counting the experts
  the gate reaches (an all-NaN column is an expert it cannot reach: no line). With more experts: a step × expert
  heatmap per gate (steps on x, experts on y) on a diverging scale centred on that gate's uniform share 1/E
  (blue: below, red: above, grey: an expert the gate cannot reach), with the colour bar labelled with the load
  measure and 1/E ticked on it, so that dead and overloaded experts stand out at 64 or 256 experts.
- `task_relatedness` (`relatedness_matrices`) — one T × T panel per measure (label correlation, gate cosine,
  gate Jensen–Shannon divergence, chosen-expert Jaccard, loss-gradient cosine), values annotated when small.

Every plot has a title, axis labels and a colour bar where colour carries a value. Figure sizes grow with the
number of experts/gates/tasks and the length of their names but are capped (`MAX_WIDTH_IN`; `MAX_HEIGHT_IN`
unless there are so many gates that each panel would be under ~1.6 in),
tick labels are thinned when there are too many to read, and layout uses matplotlib's constrained layout (no
tight_layout warnings, long names and outside legends are accounted for).
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

ANNOTATE_MAX_CELLS = 400
ANNOTATE_MIN_CELL_IN = 0.38   # a cell narrower than this (inches) cannot hold "0.25" at 8 pt
LINE_MAX_EXPERTS = 12         # above this, load_over_training draws heatmaps instead of lines
MAX_WIDTH_IN = 14.0           # at log_png's dpi=110: about 1540 px
MAX_HEIGHT_IN = 24.0
FONT = 10


def _text_in(labels, fontsize: float = FONT) -> float:
    """Approximate width in inches of the longest label at `fontsize` (DejaVu Sans, ~0.6 em per character)."""
    return max((len(str(s)) for s in labels), default=0) * 0.6 * fontsize / 72


def _annotate(ax, values: np.ndarray, fmt: str, cmap, norm) -> None:
    if values.size > ANNOTATE_MAX_CELLS:
        return
    for (i, j), v in np.ndenumerate(values):
        if np.isnan(v):
            continue
        r, g, b, _ = cmap(norm(v))
        color = "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"  # readable on dark cells
        ax.text(j, i, format(v, fmt), ha="center", va="center", color=color, fontsize=8)


def _expert_axis(axis, num_experts: int, max_ticks: int) -> None:
    """Integer expert ticks labelled e0, e1, …; thinned to at most `max_ticks`."""
    if num_experts <= max_ticks:
        axis.set_ticks(range(num_experts), [f"e{i}" for i in range(num_experts)])
    else:
        axis.set_major_locator(MaxNLocator(nbins=max_ticks, integer=True, steps=[1, 2, 4, 5, 8, 10]))
        axis.set_major_formatter(FuncFormatter(lambda x, _: f"e{int(round(x))}"))


def utilization_heatmap(utilization: dict[str, np.ndarray], title: str = "Expert utilization (mean gate weight)"):
    """gate -> (E,) mean combine weight. Rows: gates (tasks), columns: experts."""
    gates = list(utilization)
    width = max(len(np.atleast_1d(v)) for v in utilization.values())
    sizes = {int(np.isfinite(np.atleast_1d(v)).sum()) for v in utilization.values()}  # experts each gate reaches
    mat = np.full((len(gates), width), np.nan)
    for i, g in enumerate(gates):
        mat[i, : len(utilization[g])] = utilization[g]
    label_in = _text_in(gates)
    fig_w = min(MAX_WIDTH_IN, max(4.5, 0.6 * width + label_in + 2.2))
    fig_h = min(MAX_HEIGHT_IN, max(2.5, 0.45 * len(gates) + 1.6))
    cell_w = (fig_w - label_in - 2.2) / width
    fig, ax = plt.subplots(figsize=(fig_w, fig_h), layout="constrained")
    cmap = plt.get_cmap("viridis")
    im = ax.imshow(mat, cmap=cmap, vmin=0.0, vmax=max(float(np.nanmax(mat)), 1e-6), aspect="auto",
                   interpolation="nearest")
    if cell_w >= ANNOTATE_MIN_CELL_IN and 0.45 * len(gates) + 1.6 <= MAX_HEIGHT_IN:
        _annotate(ax, mat, ".2f", cmap, im.norm)
    _expert_axis(ax.xaxis, width, max_ticks=max(2, int((fig_w - label_in - 2.2) / 0.45)))
    ax.set_yticks(range(len(gates)), gates)
    ax.set_xlabel("expert")
    ax.set_ylabel("gate (task)")
    ax.set_title(title)
    cbar = fig.colorbar(im, ax=ax, label="mean gate weight")
    reached = next(iter(sizes))
    if len(sizes) == 1 and reached and 1.0 / reached <= im.norm.vmax:  # same E for all gates: the uniform share
        cbar.ax.axhline(1.0 / reached, color="red", linewidth=1.5)
        cbar.ax.text(-0.1, 1.0 / reached, "1/E", color="red", fontsize=8, ha="right", va="center",
                     transform=cbar.ax.get_yaxis_transform())
    return fig


def _step_formatter(steps):
    def fmt(x, _):
        i = int(round(x))
        return str(steps[i]) if 0 <= i < len(steps) else ""
    return FuncFormatter(fmt)


def load_over_training(steps: list[int], series: dict[str, np.ndarray], ylabel: str,
                       title: str = "Per-expert load over training"):
    """gate -> (S, E) values at `steps` (S log points): one panel per gate.

    At most LINE_MAX_EXPERTS experts in every gate: one line per expert. More: a step x expert heatmap per gate.
    """
    gates = list(series)
    values = {g: np.asarray(series[g], dtype=float).reshape(len(steps), -1) for g in gates}
    max_experts = max((v.shape[1] for v in values.values()), default=0)
    if max_experts <= LINE_MAX_EXPERTS:
        return _load_lines(steps, gates, values, max_experts, ylabel, title)
    return _load_heatmaps(steps, gates, values, max_experts, ylabel, title)


def _line_style(e: int):
    """Distinct (colour, dash) for expert e < 20: tab10 colours, solid then dashed."""
    return plt.get_cmap("tab10")(e % 10), "-" if e < 10 else "--"


def _load_lines(steps, gates, values, max_experts, ylabel, title):
    n = max(1, len(gates))
    panel_h = 2.3
    fig_h = min(MAX_HEIGHT_IN, panel_h * n + 0.9)
    legend_rows = max_experts + 1 if max_experts <= 6 else (max_experts + 2) // 2
    fig_h = max(fig_h, 0.2 * legend_rows + 1.2)  # the shared legend must fit beside the panels
    fig, axes = plt.subplots(n, 1, figsize=(9, fig_h), squeeze=False, sharex=True, layout="constrained")
    handles = {}
    for ax, g in zip(axes[:, 0], gates):
        v = values[g]
        reached = [e for e in range(v.shape[1]) if not np.isnan(v[:, e]).all()]
        num_experts = len(reached)
        for e in reached:
            color, dash = _line_style(e)
            (line,) = ax.plot(steps, v[:, e], marker="." if len(steps) < 30 else None, color=color,
                              linestyle=dash, linewidth=1.3, label=f"e{e}")
            handles.setdefault(f"e{e}", line)
        if num_experts:
            ref = ax.axhline(1.0 / num_experts, color="black", linestyle=":", linewidth=1.2, label="uniform 1/E")
            handles.setdefault("uniform 1/E", ref)
        ax.set_title(g, fontsize=FONT)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("training step")
    if handles:
        names = [f"e{e}" for e in range(max_experts) if f"e{e}" in handles] + ["uniform 1/E"]
        fig.legend([handles[k] for k in names], names, loc="outside right upper", fontsize=8,
                   ncol=1 if len(names) <= 7 else 2, title="expert", title_fontsize=8)
    fig.suptitle(title)
    return fig


def _load_heatmaps(steps, gates, values, max_experts, ylabel, title):
    n = len(gates)
    label_in = _text_in([ylabel], 9)
    panel_h = float(np.clip(1.6 + 0.012 * max_experts, 2.0, 3.6))
    panel_h = max(1.6, min(panel_h, (MAX_HEIGHT_IN - 0.9) / n))
    fig_w = min(MAX_WIDTH_IN, 10.0)
    fig, axes = plt.subplots(n, 1, figsize=(fig_w, panel_h * n + 0.9), squeeze=False, sharex=True,
                             layout="constrained")
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#a0a0a0")  # unreachable (NaN): grey, not the white of 1/E
    max_ticks_y = max(2, int(panel_h / 0.22))
    for ax, g in zip(axes[:, 0], gates):
        v = values[g]  # (S, E)
        num_experts = int((~np.isnan(v).all(axis=0)).sum())  # the experts the gate reaches (others: all NaN, blank)
        uniform = 1.0 / max(num_experts, 1)
        top = float(np.nanmax(v)) if num_experts and v.size else 0.0
        norm = TwoSlopeNorm(vmin=0.0, vcenter=uniform, vmax=max(top, 2.0 * uniform))
        im = ax.imshow(v.T, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest", origin="lower")
        _expert_axis(ax.yaxis, v.shape[1], max_ticks_y)
        ax.set_ylabel("expert")
        reach = (f"{num_experts} experts" if num_experts == v.shape[1]
                 else f"{num_experts} of {v.shape[1]} experts, grey: not reachable")
        ax.set_title(f"{g}  ({reach}, uniform 1/E = {uniform:.3g})", fontsize=FONT)
        cbar = fig.colorbar(im, ax=ax, pad=0.01, fraction=0.04, aspect=12)
        cbar.set_label(ylabel, fontsize=9 if label_in < panel_h else 7)
        ticks = [0.0, uniform, norm.vmax]
        cbar.set_ticks(ticks, labels=["0", f"1/E={uniform:.3g}", f"{norm.vmax:.3g}"], fontsize=8)
    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
    axes[-1, 0].xaxis.set_major_formatter(_step_formatter(list(steps)))
    axes[-1, 0].set_xlabel("training step")
    fig.suptitle(title)
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
    num_tasks = max((len(t) for t, _ in matrices.values()), default=1)
    tick_fs = FONT if num_tasks <= 12 else 7
    label_in = max((_text_in(t, tick_fs) for t, _ in matrices.values()), default=0.0)
    side_w = label_in + 1.4  # y tick labels + "task" label on the left, colour bar and its ticks on the right
    cols = max(1, min(3, len(names), int(MAX_WIDTH_IN // (side_w + 1.8))))
    rows = (len(names) + cols - 1) // cols
    side_h = 0.5 * label_in + 1.0  # x labels rotated 30 degrees take ~half their length; title and "task" label
    mat_in = max(1.8, min(0.45, 7.0 / num_tasks) * num_tasks)
    mat_in = max(1.2, min(mat_in, MAX_WIDTH_IN / cols - side_w, (MAX_HEIGHT_IN - 0.5) / rows - side_h))
    fig, axes = plt.subplots(rows, cols, figsize=((mat_in + side_w) * cols, (mat_in + side_h) * rows + 0.5),
                             squeeze=False, layout="constrained")
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names):
        tasks, mat = matrices[name]
        mat = np.asarray(mat, dtype=float)
        vmin, vmax = ranges.get(name, (float(np.nanmin(mat)), float(np.nanmax(mat))))
        cmap = plt.get_cmap("RdBu_r" if vmin < 0 else "viridis")
        # aspect="auto": the panel is sized so that cells come out about square, and constrained layout can then
        # place labels and colour bars without overlaps
        im = ax.imshow(mat, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest", aspect="auto")
        if mat_in / max(len(tasks), 1) >= ANNOTATE_MIN_CELL_IN:
            _annotate(ax, mat, ".2f", cmap, im.norm)
        ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right", rotation_mode="anchor", fontsize=tick_fs)
        ax.set_yticks(range(len(tasks)), tasks, fontsize=tick_fs)
        ax.set_xlabel("task")
        ax.set_ylabel("task")
        ax.set_title(labels.get(name, name), fontsize=FONT)
        fig.colorbar(im, ax=ax, pad=0.03)
    fig.suptitle(title)
    return fig


def close(fig) -> None:
    plt.close(fig)
