"""Plots: readable figures (title, labels, colour bars, annotated cells) written as PNG."""
import numpy as np
import pytest
from matplotlib.colors import TwoSlopeNorm, to_hex

from mmoe_rec.training import plots


def texts(fig):
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def test_heatmap_has_labels_colorbar_and_annotations(tmp_path):
    fig = plots.utilization_heatmap({"click": np.array([0.1, 0.6, 0.3]), "buy": np.array([0.5, 0.25, 0.25])})
    ax = fig.axes[0]
    assert ax.get_title() and ax.get_xlabel() == "expert" and ax.get_ylabel()
    assert len(fig.axes) == 2  # the heatmap and its colour bar
    assert "0.60" in texts(fig) and "0.25" in texts(fig)
    fig.savefig(tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 5000
    plots.close(fig)


def test_load_over_training_one_line_per_expert():
    load = np.array([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.2, 0.3], [0.4, 0.3, 0.2, 0.1]])
    fig = plots.load_over_training([10, 20, 30], {"click": load, "buy": load[::-1]}, ylabel="fraction of rows")
    assert len(fig.axes) == 2
    assert len(fig.axes[0].lines) == 4 + 1  # experts + the uniform reference line
    assert fig.axes[-1].get_xlabel() == "training step"
    plots.close(fig)


def test_relatedness_panels():
    m = {"label_corr": (["a", "b"], np.array([[1.0, 0.3], [0.3, 1.0]])),
         "gate_js": (["a", "b"], np.array([[0.0, 0.1], [0.1, 0.0]]))}
    fig = plots.relatedness_matrices(m)
    titles = [ax.get_title() for ax in fig.axes]
    assert "label correlation (Pearson)" in titles and "gate Jensen-Shannon divergence, mean over rows" in titles
    assert "0.30" in texts(fig)
    plots.close(fig)


def _png_size(fig, path):
    from PIL import Image
    fig.savefig(path, dpi=110, bbox_inches="tight")  # as tracking.log_png writes them
    with Image.open(path) as im:
        return im.size


LONG_TASKS = ["click_through_rate_7d", "conversion_after_click_30d", "add_to_cart_probability",
              "revenue_per_impression_usd", "long_dwell_time_over_60s"]


def test_load_over_training_few_experts_lines_with_distinct_styles_and_shared_legend(recwarn, tmp_path):
    steps = list(range(100, 4100, 100))
    series = {"0/income": np.random.default_rng(0).dirichlet(np.ones(10), size=len(steps)),
              "0/shared": np.random.default_rng(1).dirichlet(np.ones(6), size=len(steps))}  # uneven, PLE-like
    fig = plots.load_over_training(steps, series, ylabel="mean gate weight")
    assert len(fig.axes) == 2  # no colour bars: lines
    lines = fig.axes[0].lines[:10]
    assert len({(str(ln.get_color()), ln.get_linestyle()) for ln in lines}) == 10  # no two experts look alike
    assert len(fig.axes[1].lines) == 6 + 1
    (legend,) = fig.legends  # one legend for all panels, outside them
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == [f"e{e}" for e in range(10)] + ["uniform 1/E"]
    w, h = _png_size(fig, tmp_path / "few.png")
    assert w <= 1300 and h <= 1000
    plots.close(fig)
    assert not [w for w in recwarn.list if "layout" in str(w.message).lower()]


def test_load_over_training_many_experts_heatmaps_readable_and_bounded(recwarn, tmp_path):
    steps = list(range(100, 4100, 100))
    rng = np.random.default_rng(0)
    series = {t: rng.dirichlet(np.ones(64), size=len(steps)) for t in LONG_TASKS}
    fig = plots.load_over_training(steps, series, ylabel="fraction of rows")
    heat = [ax for ax in fig.axes if ax.images and ax.get_ylabel() == "expert"]
    assert len(heat) == 5 and len(fig.axes) == 10  # one heatmap and one colour bar per gate
    assert heat[0].images[0].get_array().shape == (64, len(steps))  # experts on y, steps on x
    assert heat[-1].get_xlabel() == "training step"
    assert all(t in ax.get_title() for t, ax in zip(LONG_TASKS, heat)) and "1/E" in heat[0].get_title()
    cbars = [ax for ax in fig.axes if ax not in heat]
    assert all(ax.get_ylabel() == "fraction of rows" for ax in cbars)
    assert any("1/E" in t.get_text() for t in cbars[0].get_yticklabels())
    assert len(heat[0].get_yticklabels()) <= 30  # thinned expert ticks
    w, h = _png_size(fig, tmp_path / "many.png")
    assert w <= 1600 and h <= 2700
    plots.close(fig)
    fig = plots.load_over_training(steps, {"a": rng.dirichlet(np.ones(256), size=len(steps))}, ylabel="x")
    w, h = _png_size(fig, tmp_path / "huge.png")
    assert w <= 1600 and h <= 800  # one panel at its cap, the height that labels 32 experts (5.8 in)
    plots.close(fig)
    assert not recwarn.list, [str(w.message) for w in recwarn.list]


def test_wide_and_long_named_plots_stay_bounded_without_warnings(recwarn, tmp_path):
    rng = np.random.default_rng(0)
    fig = plots.utilization_heatmap({t: rng.dirichlet(np.ones(64)) for t in LONG_TASKS})
    assert not fig.axes[0].texts  # 320 cells too narrow to print numbers in
    assert len(fig.axes[0].get_xticklabels()) <= 40
    w, h = _png_size(fig, tmp_path / "util.png")
    assert w <= 1600 and h <= 600
    plots.close(fig)
    mats = {k: (LONG_TASKS, np.eye(5)) for k in ["label_corr", "gate_cos", "gate_js", "expert_jaccard", "grad_cos"]}
    fig = plots.relatedness_matrices(mats)
    assert "1.00" in texts(fig)
    w, h = _png_size(fig, tmp_path / "rel.png")
    assert w <= 1600 and h <= 2700
    plots.close(fig)
    assert not recwarn.list, [str(w.message) for w in recwarn.list]


def _ple_monitor_figures(num_task_experts: int, num_shared_experts: int):
    """A real PLE forward (task gates recorded over the whole level) through RoutingMonitor.figures."""
    import torch

    from mmoe_rec.features.spec import FeatureSpec, SparseFeature, Task
    from mmoe_rec.models.ple import PLE
    from mmoe_rec.training.callbacks import RoutingMonitor, Window

    tasks = ["click", "buy"]
    spec = FeatureSpec([SparseFeature("u", 3)], ["d"], [Task(t) for t in tasks]).finalize()
    torch.manual_seed(0)
    model = PLE(spec, num_levels=1, num_task_experts=num_task_experts, num_shared_experts=num_shared_experts)
    out = model.forward_dense(torch.randn(64, model.front.output_dim))
    window = Window(tasks)
    window.update(out.routing, {t: torch.ones(64) for t in tasks})
    monitor = RoutingMonitor(every_n_steps=10)
    monitor.history_steps = [10, 20]
    monitor.history = {g: [s.utilization.numpy()] * 2 for g, s in window.gates.items()}
    return monitor.figures(window)


def test_ple_task_gates_plot_only_the_experts_they_reach():
    """Each task gate reaches 2 own + 2 shared of the level's 6 experts: the other task's own experts are blank
    (not 0.00, not a line), and the uniform share is 1/4, not 1/6."""
    figs = _ple_monitor_figures(num_task_experts=2, num_shared_experts=2)
    heat = figs["utilization_heatmap"]
    row = heat.axes[0].images[0].get_array()[0]  # gate 0/click: [click own 2 | buy own 2 | shared 2]
    blank = np.ma.getmaskarray(row) | np.isnan(np.ma.getdata(row))
    assert blank.tolist() == [False, False, True, True, False, False]
    assert "1/E=0.25" in [t.get_text() for t in heat.axes[1].get_yticklabels()]
    cbar_marks = [line.get_ydata()[0] for line in heat.axes[1].lines]
    assert 0.25 in cbar_marks
    load = figs["expert_load"]
    click = next(ax for ax in load.axes if ax.get_title() == "0/click")
    uniform = [line for line in click.lines if line.get_label() == "uniform 1/E"]
    assert len(click.lines) == 4 + 1 and uniform[0].get_ydata()[0] == 0.25
    for fig in figs.values():
        plots.close(fig)


def test_ple_task_gates_load_heatmap_titles_count_the_reached_experts():
    figs = _ple_monitor_figures(num_task_experts=4, num_shared_experts=8)  # 16 reached of 16 + 4 = 20 (heatmaps)
    titles = [ax.get_title() for ax in figs["expert_load"].axes if ax.get_title()]
    assert "0/click  (12 of 16 experts, grey: not reachable, uniform 1/E = 0.0833)" in titles
    for fig in figs.values():
        plots.close(fig)


# Reviewed readability defects (values logged by real runs)
NOISY_16 = [0.0677, 0.0608, 0.0578, 0.0585, 0.0626, 0.0666, 0.0627, 0.0655, 0.06, 0.0673, 0.0628, 0.0619, 0.0595,
            0.0593, 0.0639, 0.0631]  # noisy top-k, 16 experts
EXPERT_CHOICE_16 = [0.0083, 0.008, 0.008, 0.0081, 0.0083, 0.0081, 0.0083, 0.0081, 0.0081, 0.0079, 0.0082, 0.008,
                    0.008, 0.0081, 0.0081, 0.0083]


def test_utilization_annotations_tell_close_values_apart():
    for vals in (NOISY_16, EXPERT_CHOICE_16):
        fig = plots.utilization_heatmap({"click": np.array(vals)})
        shown = {t.get_text(): v for t, v in zip(fig.axes[0].texts, vals)}
        assert len(shown) == len(set(vals))  # distinct values read distinct (not all "0.06"/"0.07" or "0.01")
        assert all(abs(float(text) - v) < 1e-9 for text, v in shown.items())
        plots.close(fig)


def test_utilization_colours_diverge_around_the_uniform_share():
    fig = plots.utilization_heatmap({"click": np.array(NOISY_16), "buy": np.array(NOISY_16[::-1])})
    norm = fig.axes[0].images[0].norm
    assert isinstance(norm, TwoSlopeNorm) and norm.vcenter == 1 / 16 and norm.vmin == 0
    cbar = fig.axes[1]
    assert cbar.get_ylabel() == "mean gate weight"
    assert "1/E=0.0625" in [t.get_text() for t in cbar.get_yticklabels()]
    plots.close(fig)


def test_utilization_unreachable_cells_are_grey_and_explained():
    u = {"0/click": np.array([.25, .28, np.nan, np.nan, .26, .21]),
         "0/conversion": np.array([np.nan, np.nan, .24, .3, .25, .21])}
    fig = plots.utilization_heatmap(u)
    ax = fig.axes[0]
    assert to_hex(ax.images[0].cmap.get_bad(), keep_alpha=True) == "#a0a0a0ff"  # opaque grey, as in the load heatmaps
    assert "grey: not reachable" in ax.get_title()
    plots.close(fig)
    fig = plots.utilization_heatmap({"click": np.array([0.5, 0.5])})
    assert "grey" not in fig.axes[0].get_title()  # no note without blank cells
    plots.close(fig)


def test_relatedness_undefined_cells_are_grey_and_explained(recwarn):
    # a label that did not vary has no correlation (NaN): drawn white, it looked like a correlation of 0
    corr = np.array([[1.0, np.nan, 0.0], [np.nan, np.nan, np.nan], [0.0, np.nan, 1.0]])
    fig = plots.relatedness_matrices({"label_corr": (["a", "flat", "c"], corr)})
    ax = [ax for ax in fig.axes if ax.images][0]
    assert to_hex(ax.images[0].cmap.get_bad(), keep_alpha=True) == "#a0a0a0ff"
    assert "grey: undefined" in ax.get_title()
    plots.close(fig)
    fig = plots.relatedness_matrices({"label_corr": (["a", "b"], np.full((2, 2), np.nan)),
                                      "other": (["a", "b"], np.full((2, 2), np.nan))})  # no finite value at all
    plots.close(fig)
    assert not recwarn.list, [str(w.message) for w in recwarn.list]  # "All-NaN slice encountered"


def test_load_lines_have_one_colour_per_expert():
    steps = list(range(10, 210, 10))
    for num_experts in range(2, 13):
        series = {"click": np.random.default_rng(num_experts).dirichlet(np.ones(num_experts), size=len(steps))}
        fig = plots.load_over_training(steps, series, ylabel="mean gate weight")
        expert_lines = [ln for ln in fig.axes[0].lines if ln.get_label().startswith("e")]
        if num_experts <= plots.LINE_MAX_EXPERTS:
            assert len(expert_lines) == num_experts
        colours = [to_hex(ln.get_color()) for ln in expert_lines]
        assert len(set(colours)) == len(colours), num_experts  # no two experts share a colour (12 did: e10 = e0)
        plots.close(fig)


def test_load_constant_uniform_gate_gets_a_note_not_a_flat_map():
    """Expert choice: every expert takes c rows, so its share is exactly 1/E at every step."""
    steps = [5, 10, 15, 20]
    for num_experts in (8, 16):  # lines and heatmaps
        flat = np.full((len(steps), num_experts), np.float32(1 / num_experts), dtype=float)
        fig = plots.load_over_training(steps, {"click": flat, "buy": flat}, ylabel="share of assignments")
        panels = [ax for ax in fig.axes if ax.get_title()]
        assert len(panels) == 2 and len(fig.axes) == 2  # no colour bars either
        for ax in panels:
            assert not ax.images and not ax.lines
            assert any("by construction" in t.get_text() for t in ax.texts)
            assert "1/E" in ax.get_title()
        plots.close(fig)


def test_relatedness_colour_bars_labelled_and_js_colours_run_like_similarities():
    eye = np.eye(2)
    mats = {"label_corr": (["a", "b"], eye), "gate_cos": (["a", "b"], eye), "gate_js": (["a", "b"], 1 - eye),
            "expert_jaccard": (["a", "b"], eye), "grad_cos": (["a", "b"], eye)}
    fig = plots.relatedness_matrices(mats)
    cbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(cbars) == 5 and all(ax.get_ylabel() for ax in cbars)
    assert "JS divergence, bits (0 = identical)" in [ax.get_ylabel() for ax in cbars]
    panels = {ax.get_title(): ax.images[0] for ax in fig.axes if ax.images and ax.get_title()}
    js, cos = panels["gate Jensen-Shannon divergence, mean over rows"], panels["gate cosine, mean over rows"]
    assert js.cmap.name.endswith("_r") and not cos.cmap.name.endswith("_r")
    # identical tasks (JS 0, cosine 1) get the same colour
    assert np.allclose(js.cmap(js.norm(0.0)), cos.cmap(cos.norm(1.0)))
    plots.close(fig)


def test_the_load_heatmap_step_axis_labels_each_log_point_once():
    """With one log point (the synthetic configs' later epochs) the step axis read '100' eleven times: ticks at
    fractions of the single column, each rounded to it."""
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 37):
        steps = [100 * (i + 1) for i in range(n)]
        fig = plots.load_over_training(steps, {"click": rng.dirichlet(np.ones(32), size=n)}, ylabel="share")
        fig.canvas.draw()
        labels = [t.get_text() for t in fig.axes[0].xaxis.get_ticklabels()]
        assert len(labels) == len(set(labels)) <= 10 and labels[0] == "100", (n, labels)
        assert set(labels) <= {str(s) for s in steps}
        plots.close(fig)


def test_many_tasks_get_upright_x_labels_and_each_undefined_cell_says_why():
    """12 long task names at 30 degrees ran into one another (a review's 12-task plot); past 8 tasks they stand at
    90. A grey cell's caption names what made it undefined for its measure (it said "a label that did not vary"
    for a gate pair that no row was weighed by)."""
    tasks = [f"task_{i}_engagement_watch_time"[: 12 + 2 * i] for i in range(12)]
    js = np.full((12, 12), 0.2)
    js[0, 1] = js[1, 0] = np.nan
    fig = plots.relatedness_matrices({"gate_js": (tasks, js)})
    ax = fig.axes[0]
    assert {label.get_rotation() for label in ax.get_xticklabels()} == {90.0}
    assert "no row both gates weighed" in ax.get_title()
    plots.close(fig)
    fig = plots.relatedness_matrices({"label_corr": (tasks[:3], np.eye(3))})
    assert {label.get_rotation() for label in fig.axes[0].get_xticklabels()} == {30.0}
    plots.close(fig)


# Gaps a mutation review found (2026-12-07): colour scales, their centre and direction, axis labels
def _panels(fig):
    return {ax.get_title().split("\n")[0]: ax.images[0] for ax in fig.axes if ax.images and ax.get_title()}


def test_correlation_panels_span_minus_one_to_one_on_a_diverging_scale():
    m = np.array([[1.0, -0.4], [-0.4, 1.0]])
    fig = plots.relatedness_matrices({"label_corr": (["a", "b"], m), "grad_cos": (["a", "b"], m)})
    for title in ("label correlation (Pearson)", "loss-gradient cosine (shared params)"):
        im = _panels(fig)[title]
        assert (im.norm.vmin, im.norm.vmax) == (-1, 1) and im.cmap.name.startswith("RdBu_r"), title
    plots.close(fig)


def test_load_heatmap_centred_on_the_reached_experts_uniform_share():
    rng = np.random.default_rng(0)
    load = np.full((5, 16), np.nan)
    load[:, :12] = rng.dirichlet(np.ones(12), size=5)  # the gate reaches 12 of 16 experts
    fig = plots.load_over_training([1, 2, 3, 4, 5], {"click": load}, ylabel="share")
    im = fig.axes[0].images[0]
    assert im.norm.vcenter == pytest.approx(1 / 12)
    plots.close(fig)


def test_utilization_above_uniform_is_red_below_is_blue():
    fig = plots.utilization_heatmap({"click": np.array([0.7, 0.2, 0.1])})
    im = fig.axes[0].images[0]
    r, g, b, _ = im.cmap(im.norm(0.7))
    assert r > b  # overloaded expert: red
    r, g, b, _ = im.cmap(im.norm(0.1))
    assert b > r  # starved expert: blue
    plots.close(fig)


def test_load_heatmap_puts_expert_0_at_the_bottom():
    rng = np.random.default_rng(0)
    fig = plots.load_over_training([1, 2], {"click": rng.dirichlet(np.ones(16), size=2)}, ylabel="share")
    assert fig.axes[0].images[0].origin == "lower"
    lo, hi = fig.axes[0].get_ylim()
    assert lo < hi
    plots.close(fig)


def test_relatedness_axes_name_the_tasks():
    fig = plots.relatedness_matrices({"gate_cos": (["a", "b"], np.eye(2))})
    ax = fig.axes[0]
    assert ax.get_xlabel() == "task" and ax.get_ylabel() == "task"
    plots.close(fig)


def test_utilization_axes_name_experts_and_gates():
    fig = plots.utilization_heatmap({"click": np.array([0.5, 0.5]), "buy": np.array([0.3, 0.7])})
    assert fig.axes[0].get_xlabel() == "expert" and fig.axes[0].get_ylabel() == "gate (task)"
    plots.close(fig)


def test_a_load_heatmap_labels_every_expert_up_to_32(tmp_path):
    """At 12-16 experts a 2-inch panel labelled every other expert (e0, e2, ...): finding e7's row, a dead or an
    overloaded expert, meant counting rows (review 2026-12-07)."""
    steps = list(range(10, 310, 10))
    rng = np.random.default_rng(0)
    for experts, gates in ((12, 2), (16, 4), (32, 3)):
        series = {f"task{t}": rng.dirichlet(np.ones(experts), size=len(steps)) for t in range(gates)}
        fig = plots.load_over_training(steps, series, ylabel="share of rows")
        heat = [ax for ax in fig.axes if ax.images and ax.get_ylabel() == "expert"]
        assert len(heat) == gates
        for ax in heat:
            fig.canvas.draw()
            assert [t.get_text() for t in ax.get_yticklabels()] == [f"e{e}" for e in range(experts)]
        plots.close(fig)


# Tests that kill surviving mutants of a mutation review of the plots (values drawn, not looks)


def test_utilization_of_gates_with_different_uniform_shares_is_coloured_relative_to_each_gates_share():
    """Expert choice: weights need not sum to 1 (gate a's total 0.5, b's 1.0): each cell is coloured by its weight
    over its own gate's uniform share total / E, centred on 1."""
    u = {"a": np.array([0.1, 0.1, 0.2, 0.1]), "b": np.array([0.2, 0.2, 0.4, 0.2])}
    fig = plots.utilization_heatmap(u)
    im = fig.axes[0].images[0]
    np.testing.assert_allclose(np.ma.getdata(im.get_array()), [[0.8, 0.8, 1.6, 0.8]] * 2)
    assert im.norm.vcenter == 1.0
    plots.close(fig)


def test_utilization_of_weights_that_do_not_sum_to_one_is_centred_on_their_uniform_share():
    fig = plots.utilization_heatmap({"click": np.array([0.1, 0.2, 0.1, 0.1])})  # total 0.5: uniform 0.125
    im = fig.axes[0].images[0]
    assert im.norm.vcenter == pytest.approx(0.125)
    assert "uniform=0.125" in [t.get_text() for t in fig.axes[1].get_yticklabels()]
    plots.close(fig)


def test_utilization_colour_scale_reaches_at_least_twice_the_uniform_share():
    """The diverging scale is symmetric around 1/E at least (0 .. 2/E): a gate near uniform is pale, not the
    darkest red at its largest weight."""
    fig = plots.utilization_heatmap({"click": np.array([0.3, 0.35, 0.35])})
    norm = fig.axes[0].images[0].norm
    assert norm.vmin == 0.0 and norm.vcenter == pytest.approx(1 / 3) and norm.vmax == pytest.approx(2 / 3)
    plots.close(fig)


@pytest.mark.parametrize("num_experts, reached", [(6, 4), (16, 12)], ids=["lines", "heatmaps"])
def test_a_gate_uniform_over_the_experts_it_reaches_gets_the_note(num_experts, reached):
    """A PLE expert-choice task gate: exactly 1/reached on each expert it reaches, NaN on the others: the note,
    not a flat map or flat lines."""
    steps = [5, 10, 15]
    load = np.full((len(steps), num_experts), np.nan)
    load[:, :reached] = 1.0 / reached
    fig = plots.load_over_training(steps, {"0/click": load}, ylabel="share of assignments")
    ax = next(ax for ax in fig.axes if ax.get_title())
    assert not ax.images and not ax.lines
    assert any("by construction" in t.get_text() for t in ax.texts)
    assert f"1/E = {1 / reached:.3g}" in ax.get_title()
    plots.close(fig)


def test_similarity_panels_have_fixed_colour_ranges():
    """Cosine, JS and Jaccard are drawn on 0..1 whatever the values, so that panels and epochs compare."""
    m = np.array([[1.0, 0.4], [0.4, 1.0]])
    fig = plots.relatedness_matrices({"gate_cos": (["a", "b"], m), "gate_js": (["a", "b"], 1 - m - 0.3 * np.eye(2)),
                                      "expert_jaccard": (["a", "b"], m)})
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == 3
    for im in images:
        assert (im.norm.vmin, im.norm.vmax) == (0.0, 1.0)
    plots.close(fig)


def test_load_heatmap_draws_each_experts_values_in_its_own_row():
    rng = np.random.default_rng(0)
    load = rng.dirichlet(np.ones(16), size=3)  # (steps, experts)
    fig = plots.load_over_training([1, 2, 3], {"click": load}, ylabel="share")
    np.testing.assert_allclose(np.ma.getdata(fig.axes[0].images[0].get_array()), load.T)  # row e: expert e
    plots.close(fig)
