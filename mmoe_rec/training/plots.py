"""Readable PNG plots of routing and task relatedness (matplotlib Agg: no display needed).

`RoutingMonitor` writes three of them at each epoch end (MLflow artifacts under `plots/`):

- `utilization_heatmap` — expert utilization: one row per gate (task, or `level/task` for PLE), one column per
  expert, colour = mean combine weight that gate gave the expert over the epoch, on a diverging scale centred on
  the uniform share (white: 1/E, blue: below, red: above; the colour bar ticks 1/E). E counts the experts the gate
  reaches; when the gates' uniform shares differ (PLE gates reaching different numbers of experts, or weights that
  do not sum to 1 such as expert choice's, where the uniform share is the gate's total / E) the colour is the weight
  divided by its own gate's uniform share. Experts a gate cannot reach (NaN: a PLE task gate and the other tasks'
  own experts) and gates with fewer experts than the widest one are grey, and the title says so. Numbers are
  written in the cells when they fit, with as many decimals as it takes for distinct values to read distinct (up
  to 3 significant digits: 0.0677 and 0.0673, not 0.07 and 0.07).
- `expert_load` (`load_over_training`) — per-expert load at every logged step, one panel per gate. With at most
  `LINE_MAX_EXPERTS` (10) experts per gate: one line per expert (one tab10 colour each, same colour for the same
  expert index in every panel, one shared legend) and a dotted uniform 1/E reference line, E counting the experts
  the gate reaches (an all-NaN column is an expert it cannot reach: no line). With more experts: a step × expert
  heatmap per gate (steps on x, experts on y) on a diverging scale centred on that gate's uniform share 1/E
  (blue: below, red: above, grey: an expert the gate cannot reach), with the colour bar labelled with the load
  measure and 1/E ticked on it, so that dead and overloaded experts stand out at 64 or 256 experts. A gate whose
  every expert has exactly 1/E at every step (expert choice: every expert takes c rows by construction) gets a
  note instead of a flat map or flat lines.
- `task_relatedness` (`relatedness_matrices`) — one T × T panel per measure (label correlation, gate cosine,
  gate Jensen–Shannon divergence, chosen-expert Jaccard, loss-gradient cosine), values annotated when small, each
  colour bar labelled with its measure. The colours run the same way in every panel: the bright (viridis) or red
  (correlations) end means similar, so the JS divergence panel uses reversed viridis (bright: 0, identical).

Every plot has a title, axis labels and a colour bar where colour carries a value. Figure sizes grow with the
number of experts/gates/tasks and the length of their names but are capped (`MAX_WIDTH_IN`; `MAX_HEIGHT_IN`
unless there are so many gates that each panel would be under ~1.6 in),
tick labels are thinned when there are too many to read, and layout uses matplotlib's constrained layout (no
tight_layout warnings, long names and outside legends are accounted for).
"""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator  # noqa: E402

ANNOTATE_MAX_CELLS = 400
ANNOTATE_MIN_CELL_IN = 0.38   # a cell narrower than this (inches) cannot hold "0.25" at 8 pt
ANNOTATE_MIN_FONT = 6.0       # longer numbers shrink to fit their cell, down to this size (else: no numbers)
LINE_MAX_EXPERTS = 10         # above this, load_over_training draws heatmaps instead of lines (tab10: 10 colours)
UNREACHABLE = "#a0a0a0"       # NaN cells (an expert the gate cannot reach): grey, not the white of 1/E
UNREACHABLE_NOTE = "grey: not reachable"
MAX_WIDTH_IN = 14.0           # at log_png's dpi=110: about 1540 px
MAX_HEIGHT_IN = 24.0
FONT = 10
EXPERT_LABEL_IN = 0.17  # height of one expert's tick label (7 pt) on a load heatmap's axis


def _text_in(labels, fontsize: float = FONT) -> float:
    """Approximate width in inches of the longest label at `fontsize` (DejaVu Sans, ~0.6 em per character)."""
    return max((len(str(s)) for s in labels), default=0) * 0.6 * fontsize / 72


def _number_format(values: np.ndarray) -> str:
    """Fixed-point format for cell annotations: at least 2 decimals and 2 significant digits of the largest value,
    more (up to 3 significant digits) while that makes more of the distinct values read distinct."""
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    top = float(np.abs(finite).max()) if finite.size else 0.0
    if top == 0.0:
        return ".2f"
    first = int(np.floor(-np.log10(top))) + 1  # decimal place of the largest value's first significant digit
    lo = max(2, first + 1)
    hi = min(max(lo, first + 2), 6)
    lo = min(lo, hi)
    distinct = {d: len({format(v, f".{d}f") for v in finite}) for d in range(lo, hi + 1)}
    return f".{next(d for d in range(lo, hi + 1) if distinct[d] == distinct[hi])}f"


def _annotate(ax, values: np.ndarray, cmap, norm, cell_in: float, colour_values: np.ndarray | None = None) -> None:
    """Write each finite value in its cell (format: `_number_format`), shrunk to fit `cell_in` inches; text colour
    from the cell colour (`colour_values`, the array drawn, when it is not `values`)."""
    if values.size > ANNOTATE_MAX_CELLS:
        return
    fmt = _number_format(values)
    longest = max((len(format(v, fmt)) for v in values.flat if np.isfinite(v)), default=0)
    fontsize = min(8.0, 0.9 * cell_in * 72 / (0.6 * max(longest, 1)))
    if fontsize < ANNOTATE_MIN_FONT:
        return
    colour_values = values if colour_values is None else colour_values
    for (i, j), v in np.ndenumerate(values):
        if np.isnan(v):
            continue
        r, g, b, _ = cmap(norm(colour_values[i, j]))
        color = "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"  # readable on dark cells
        ax.text(j, i, format(v, fmt), ha="center", va="center", color=color, fontsize=fontsize)


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
    mat = np.full((len(gates), width), np.nan)
    for i, g in enumerate(gates):
        mat[i, : len(utilization[g])] = utilization[g]
    reached = np.isfinite(mat).sum(axis=1)  # experts each gate reaches
    totals = np.nansum(mat, axis=1)
    sums_to_one = bool(np.all(np.abs(totals[reached > 0] - 1.0) < 1e-2))
    # uniform share of each gate: 1/E when its weights sum to 1 (softmax, renormalised top-k), else its total / E
    shares = np.where(reached > 0, (1.0 if sums_to_one else totals) / np.maximum(reached, 1), np.nan)
    common = shares[np.isfinite(shares)]
    one_share = common.size == 0 or bool(np.ptp(common) <= 1e-3 * common.max())
    label_in = _text_in(gates)
    fig_w = min(MAX_WIDTH_IN, max(4.5, 0.6 * width + label_in + 2.2))
    fig_h = min(MAX_HEIGHT_IN, max(2.5, 0.45 * len(gates) + 1.6))
    cell_w = (fig_w - label_in - 2.2) / width
    fig, ax = plt.subplots(figsize=(fig_w, fig_h), layout="constrained")
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad=UNREACHABLE)
    if one_share:  # the same uniform share for every gate: colour the weights themselves, centred on it
        colour = mat
        centre = float(common[0]) if common.size else 1.0
        centre_label = f"1/E={centre:.3g}" if sums_to_one else f"uniform={centre:.3g}"
        cbar_label = "mean gate weight"
    else:  # gates with different uniform shares: each weight relative to its own gate's uniform share
        colour = mat / shares[:, None]
        centre, centre_label = 1.0, "1/E" if sums_to_one else "uniform"
        cbar_label = "weight / the gate's 1/E" if sums_to_one else "weight / uniform share"
    top = float(np.nanmax(colour)) if np.isfinite(colour).any() else 0.0
    norm = TwoSlopeNorm(vmin=0.0, vcenter=centre, vmax=max(top, 2.0 * centre))
    im = ax.imshow(colour, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    if cell_w >= ANNOTATE_MIN_CELL_IN and 0.45 * len(gates) + 1.6 <= MAX_HEIGHT_IN:
        _annotate(ax, mat, cmap, norm, cell_w, colour_values=colour)
    _expert_axis(ax.xaxis, width, max_ticks=max(2, int((fig_w - label_in - 2.2) / 0.45)))
    ax.set_yticks(range(len(gates)), gates)
    ax.set_xlabel("expert")
    ax.set_ylabel("gate (task)")
    ax.set_title(f"{title}\n({UNREACHABLE_NOTE})" if np.isnan(mat).any() else title)
    cbar = fig.colorbar(im, ax=ax, label=cbar_label)
    cbar.set_ticks([0.0, centre, norm.vmax], fontsize=8,
                   labels=["0", centre_label, f"{norm.vmax:.3g}" if one_share else f"{norm.vmax:.3g}×"])
    cbar.ax.axhline(centre, color="black", linewidth=1.0)  # the uniform share
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
    """(colour, dash) for expert e < LINE_MAX_EXPERTS: one tab10 colour each, solid lines."""
    return plt.get_cmap("tab10")(e % 10), "-"


def _flat_uniform(v: np.ndarray) -> float | None:
    """1/E when every reached expert's load is exactly 1/E at every step (expert choice: every expert takes c rows
    by construction; a flat map or flat lines would say nothing), else None. `v`: (S, E), unreachable all-NaN."""
    reached = ~np.isnan(v).all(axis=0)
    num_experts = int(reached.sum())
    if not num_experts or not v.shape[0]:
        return None
    uniform = 1.0 / num_experts
    return uniform if np.allclose(v[:, reached], uniform, rtol=1e-5, atol=0.0) else None


def _flat_note(ax, uniform: float) -> None:
    ax.text(0.5, 0.5, f"every expert takes exactly 1/E = {uniform:.3g} of the load at every step\n"
                      "(expert choice: every expert takes c rows by construction)",
            ha="center", va="center", fontsize=9, transform=ax.transAxes)
    ax.set_yticks([])


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
        ax.set_title(g, fontsize=FONT)
        ax.set_ylabel(ylabel)
        if (flat := _flat_uniform(v)) is not None:
            _flat_note(ax, flat)
            ax.set_title(f"{g}  ({num_experts} experts, all at 1/E = {flat:.3g} at every step)", fontsize=FONT)
            if len(steps) > 1:
                ax.set_xlim(min(steps), max(steps))
            continue
        for e in reached:
            color, dash = _line_style(e)
            (line,) = ax.plot(steps, v[:, e], marker="." if len(steps) < 30 else None, color=color,
                              linestyle=dash, linewidth=1.3, label=f"e{e}")
            handles.setdefault(f"e{e}", line)
        if num_experts:
            ref = ax.axhline(1.0 / num_experts, color="black", linestyle=":", linewidth=1.2, label="uniform 1/E")
            handles.setdefault("uniform 1/E", ref)
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
    # every expert labelled up to 32 of them (0.17 in a label): at 12-16 experts a 2-inch panel labelled every
    # other one, and finding e7's row meant counting rows
    panel_h = float(np.clip(0.4 + EXPERT_LABEL_IN * max_experts, 2.0, 0.4 + EXPERT_LABEL_IN * 32))
    panel_h = max(1.6, min(panel_h, (MAX_HEIGHT_IN - 0.9) / n))
    fig_w = min(MAX_WIDTH_IN, 10.0)
    fig, axes = plt.subplots(n, 1, figsize=(fig_w, panel_h * n + 0.9), squeeze=False, sharex=True,
                             layout="constrained")
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#a0a0a0")  # unreachable (NaN): grey, not the white of 1/E
    max_ticks_y = max(2, int(panel_h / EXPERT_LABEL_IN))
    for ax, g in zip(axes[:, 0], gates):
        v = values[g]  # (S, E)
        num_experts = int((~np.isnan(v).all(axis=0)).sum())  # the experts the gate reaches (others: all NaN, blank)
        uniform = 1.0 / max(num_experts, 1)
        if _flat_uniform(v) is not None:
            _flat_note(ax, uniform)
            ax.set_xlim(-0.5, len(steps) - 0.5)
            ax.set_title(f"{g}  ({num_experts} experts, all at 1/E = {uniform:.3g} at every step)", fontsize=FONT)
            continue
        top = float(np.nanmax(v)) if num_experts and v.size else 0.0
        norm = TwoSlopeNorm(vmin=0.0, vcenter=uniform, vmax=max(top, 2.0 * uniform))
        im = ax.imshow(v.T, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest", origin="lower")
        _expert_axis(ax.yaxis, v.shape[1], max_ticks_y)
        ax.tick_params(axis="y", labelsize=8 if v.shape[1] <= 12 else 7)
        ax.set_ylabel("expert")
        reach = (f"{num_experts} experts" if num_experts == v.shape[1]
                 else f"{num_experts} of {v.shape[1]} experts, grey: not reachable")
        ax.set_title(f"{g}  ({reach}, uniform 1/E = {uniform:.3g})", fontsize=FONT)
        cbar = fig.colorbar(im, ax=ax, pad=0.01, fraction=0.04, aspect=12)
        cbar.set_label(ylabel, fontsize=9 if label_in < panel_h else 7)
        ticks = [0.0, uniform, norm.vmax]
        cbar.set_ticks(ticks, labels=["0", f"1/E={uniform:.3g}", f"{norm.vmax:.3g}"], fontsize=8)
    # one tick per log point, thinned to at most 10 (a locator of its own put 11 ticks between -0.5 and 0.5 for a
    # single log point, each labelled with its step)
    stride = max(1, math.ceil(len(steps) / 10))
    axes[-1, 0].xaxis.set_major_locator(FixedLocator(range(0, len(steps), stride)))
    axes[-1, 0].xaxis.set_major_formatter(_step_formatter(list(steps)))
    axes[-1, 0].set_xlabel("training step")
    fig.suptitle(title)
    return fig


UNDEFINED = {"label_corr": "a label that did not vary", "gate_cos": "no row both gates weighed",
             "gate_js": "no row both gates weighed", "expert_jaccard": "no row sent to an expert"}


def relatedness_matrices(matrices: dict[str, tuple[list[str], np.ndarray]],
                         title: str = "Task relatedness"):
    """name -> (task names, (T, T) matrix); one panel per measure, values annotated."""
    names = list(matrices)
    ranges = {"label_corr": (-1, 1), "gate_cos": (0, 1), "gate_js": (0, 1), "expert_jaccard": (0, 1),
              "grad_cos": (-1, 1)}
    labels = {"label_corr": "label correlation (Pearson)", "gate_cos": "gate cosine, mean over rows",
              "gate_js": "gate Jensen-Shannon divergence, mean over rows",
              "expert_jaccard": "chosen-expert Jaccard overlap", "grad_cos": "loss-gradient cosine (shared params)"}
    cbar_labels = {"label_corr": "Pearson r", "gate_cos": "cosine (1 = same gate mix)",
                   "gate_js": "JS divergence, bits (0 = identical)", "expert_jaccard": "Jaccard (1 = same experts)",
                   "grad_cos": "cosine (1 = aligned)"}
    num_tasks = max((len(t) for t, _ in matrices.values()), default=1)
    tick_fs = FONT if num_tasks <= 12 else 7
    label_in = max((_text_in(t, tick_fs) for t, _ in matrices.values()), default=0.0)
    side_w = label_in + 1.4  # y tick labels + "task" label on the left, colour bar and its ticks on the right
    cols = max(1, min(3, len(names), int(MAX_WIDTH_IN // (side_w + 1.8))))
    rows = (len(names) + cols - 1) // cols
    # x labels at 30 degrees take ~half their length in height, but overlap their neighbours past ~8 tasks: then 90
    rotation = 30 if num_tasks <= 8 else 90
    side_h = (0.5 if rotation == 30 else 1.0) * label_in + 1.0  # x labels; title and "task" label
    mat_in = max(1.8, min(0.45, 7.0 / num_tasks) * num_tasks)
    mat_in = max(1.2, min(mat_in, MAX_WIDTH_IN / cols - side_w, (MAX_HEIGHT_IN - 0.5) / rows - side_h))
    fig, axes = plt.subplots(rows, cols, figsize=((mat_in + side_w) * cols, (mat_in + side_h) * rows + 0.5),
                             squeeze=False, layout="constrained")
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names):
        tasks, mat = matrices[name]
        mat = np.asarray(mat, dtype=float)
        finite = mat[np.isfinite(mat)]
        vmin, vmax = ranges.get(name) or ((float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0))
        # the same colour end means "similar" in every panel: red / bright; JS is a divergence (0 = identical),
        # so its viridis runs the other way round; an undefined cell (NaN: a label that did not vary) is grey, not
        # the white of a correlation of 0
        cmap = plt.get_cmap("RdBu_r" if vmin < 0 else "viridis_r" if name == "gate_js" else "viridis")
        cmap = cmap.with_extremes(bad=UNREACHABLE)
        # aspect="auto": the panel is sized so that cells come out about square, and constrained layout can then
        # place labels and colour bars without overlaps
        im = ax.imshow(mat, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest", aspect="auto")
        if mat_in / max(len(tasks), 1) >= ANNOTATE_MIN_CELL_IN:
            _annotate(ax, mat, cmap, im.norm, mat_in / max(len(tasks), 1))
        ax.set_xticks(range(len(tasks)), tasks, rotation=rotation, ha="right", rotation_mode="anchor",
                      fontsize=tick_fs, **({"va": "center"} if rotation == 90 else {}))
        ax.set_yticks(range(len(tasks)), tasks, fontsize=tick_fs)
        ax.set_xlabel("task")
        ax.set_ylabel("task")
        undefined = f"\n(grey: undefined, {UNDEFINED.get(name, 'no rows to measure')})" if np.isnan(mat).any() else ""
        ax.set_title(labels.get(name, name) + undefined, fontsize=FONT)
        cbar = fig.colorbar(im, ax=ax, pad=0.03)
        cbar.set_label(cbar_labels.get(name, name), fontsize=9)
    fig.suptitle(title)
    return fig


def close(fig) -> None:
    plt.close(fig)
