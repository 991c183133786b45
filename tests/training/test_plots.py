"""Plots: readable figures (title, labels, colour bars, annotated cells) written as PNG."""
import numpy as np

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
    fig = plots.load_over_training([10, 20, 30], {"click": np.full((3, 4), 0.25), "buy": np.full((3, 4), 0.25)},
                                   ylabel="fraction of rows")
    assert len(fig.axes) == 2
    assert len(fig.axes[0].lines) == 4 + 1  # experts + the uniform reference line
    assert fig.axes[-1].get_xlabel() == "training step"
    plots.close(fig)


def test_relatedness_panels():
    m = {"label_corr": (["a", "b"], np.array([[1.0, 0.3], [0.3, 1.0]])),
         "gate_js": (["a", "b"], np.array([[0.0, 0.1], [0.1, 0.0]]))}
    fig = plots.relatedness_matrices(m)
    titles = [ax.get_title() for ax in fig.axes]
    assert "label correlation (Pearson)" in titles and "gate Jensen-Shannon divergence" in titles
    assert "0.30" in texts(fig)
    plots.close(fig)
