"""RoutingMonitor and the gradient probe inside real Lightning runs: which steps log, what a window holds, after a
mid-epoch resume, with gradient accumulation; PLE relatedness over the level's experts."""
from __future__ import annotations

import copy

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers.logger import Logger

from conftest import MMOE, SPARSE
from mmoe_rec.data.datamodule import FeatureDataModule
from mmoe_rec.training.callbacks import RoutingMonitor
from mmoe_rec.training.module import MultiTaskModule

pytestmark = pytest.mark.seeded_mlflow_store  # tmp_path/mlflow.db: a copy of an empty store (tests/conftest.py)

FAST = dict(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, limit_val_batches=0)
UTIL = "experts/click/util/e0"


class Capture(Logger):
    """Every log_metrics call, in order: [(step, metrics)]."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "capture"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.calls.append((step, dict(metrics)))

    def steps_with(self, key: str) -> list[int]:
        return [s for s, m in self.calls if key in m]


class WindowSizes(RoutingMonitor):
    """Records how many rows each logged step window held."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rows: list[tuple[int, float]] = []

    def _log(self, trainer, metrics, step) -> None:
        if UTIL in metrics:
            self.rows.append((step, self._window.gates["click"].rows))
        super()._log(trainer, metrics, step)


def fit(feature_dir, tmp, monitor, max_epochs=2, batch_size=96, ckpt_path=None, callbacks=(), max_steps=-1,
        model=MMOE, **module_kw):
    L.seed_everything(0)
    dm = FeatureDataModule(str(feature_dir), batch_size=batch_size, seed=3, shuffle_buffer=256)
    module_kw.setdefault("optimizer", {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.01}})
    module = MultiTaskModule(model=copy.deepcopy(model), feature_spec=dm.spec, **module_kw)
    logger = Capture()
    trainer = L.Trainer(max_epochs=max_epochs, max_steps=max_steps, logger=logger, default_root_dir=tmp,
                        callbacks=[monitor, *callbacks], **FAST)
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return trainer, logger


def test_step_windows_run_across_epoch_ends(feature_dir, tmp_path):
    # 2000 rows in batches of 96: 21 batches an epoch, the last of 80 rows; global steps 1-42. Windows of 5
    # steps: the one logged at step 25 holds steps 21-25, across the epoch end (the last batch of epoch 1, then
    # four of epoch 2); it used to be dropped at the epoch start
    monitor = WindowSizes(every_n_steps=5, plots=False)
    _, logger = fit(feature_dir, tmp_path, monitor)
    assert logger.steps_with(UTIL) == [5, 10, 15, 20, 25, 30, 35, 40]
    assert dict(monitor.rows)[25] == 80 + 4 * 96  # nothing dropped at the epoch boundary
    assert all(rows == 5 * 96 for step, rows in monitor.rows if step != 25)


def test_with_gradient_accumulation_each_step_logs_once(feature_dir, tmp_path):
    monitor = WindowSizes(every_n_steps=2, plots=False)
    L.seed_everything(0)
    dm = FeatureDataModule(str(feature_dir), batch_size=100, seed=0)
    module = MultiTaskModule(model=copy.deepcopy(MMOE), feature_spec=dm.spec, grad_similarity_every=2)
    logger = Capture()
    trainer = L.Trainer(max_epochs=1, accumulate_grad_batches=4, logger=logger, callbacks=[monitor],
                        default_root_dir=tmp_path, **FAST)
    trainer.fit(module, dm)
    assert trainer.global_step == 5  # 20 batches, 4 per optimizer step
    steps = logger.steps_with(UTIL)
    # at the optimizer steps only: the three batches before the first one (global step 0) logged a window then
    assert steps == sorted(set(steps)) == [2, 4]
    assert monitor.rows == [(2, 800.0), (4, 800.0)]  # each window: 2 steps x 4 batches x 100 rows
    grad_steps = logger.steps_with("relatedness/grad_cos/click.vs.convert")
    assert grad_steps == [0, 2, 4]


def test_gradient_cosine_is_logged_at_the_step_it_was_sampled(feature_dir, tmp_path):
    # through self.log it waited for the next log_every_n_steps (4) and repeated old values
    _, logger = fit(feature_dir, tmp_path, RoutingMonitor(every_n_steps=50, plots=False), max_epochs=1,
                    grad_similarity_every=6)
    key = "relatedness/grad_cos/click.vs.convert"
    assert logger.steps_with(key) == [0, 6, 12, 18]
    values = [m[key] for _, m in logger.calls if key in m]
    assert len(set(values)) == 4 and all(-1 <= v <= 1 for v in values)


def test_a_fit_resumed_mid_epoch_keeps_logging(feature_dir, tmp_path):
    _, straight = fit(feature_dir, tmp_path / "a", RoutingMonitor(every_n_steps=5, plots=False))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "b", every_n_train_steps=15, save_top_k=-1)
    fit(feature_dir, tmp_path / "b", RoutingMonitor(every_n_steps=5, plots=False), callbacks=[ckpt], max_steps=15)
    (path,) = (tmp_path / "b").glob("*.ckpt")
    _, resumed = fit(feature_dir, tmp_path / "c", RoutingMonitor(every_n_steps=5, plots=False), ckpt_path=str(path))
    assert resumed.steps_with(UTIL) == [s for s in straight.steps_with(UTIL) if s > 15]
    epoch_key = "experts/epoch/click/util/e0"
    assert resumed.steps_with(epoch_key) == straight.steps_with(epoch_key) == [21, 42]


# noisy top-k with a capacity and loss-free bias: drops, loads, bias statistics and expert overlap in the window
SPARSE_DROPPING = {"class_path": SPARSE["class_path"],
                   "init_args": {**SPARSE["init_args"], "capacity_factor": 1.0, "loss_free_bias": True,
                                 "bias_update_rate": 0.01}}


@pytest.mark.parametrize("model,at", [(MMOE, 13), (SPARSE_DROPPING, 13), (MMOE, "epoch end"), (MMOE, "last batch")],
                         ids=["mmoe", "sparse", "mmoe-epoch-end", "mmoe-last-batch"])
def test_a_fit_resumed_mid_window_and_mid_epoch_logs_what_a_straight_fit_logs(feature_dir, tmp_path, model, at):
    """The checkpoint at step 13 falls inside the window of steps 11-15 and inside epoch 0 (steps 1-21): the
    window logged at 15 and the epoch's statistics at 21 cover the steps before the checkpoint too (they covered
    only the steps after it), and everything after matches the straight fit's values. One written at epoch 0's
    end (step 21, inside the window of steps 21-25) holds that window and no epoch sums. One written on epoch 0's
    last batch (step 21, before the epoch's end) holds the whole epoch's sums: the resumed fit, which starts epoch
    1, logs them at step 21 as the straight fit did (they were dropped)."""
    _, straight = fit(feature_dir, tmp_path / "a", RoutingMonitor(every_n_steps=5, plots=False), model=model)
    if at == "epoch end":
        ckpt = ModelCheckpoint(dirpath=tmp_path / "b", every_n_epochs=1, save_on_train_epoch_end=True, save_top_k=-1)
        stop, after = dict(max_epochs=1), 21
    elif at == "last batch":
        ckpt = ModelCheckpoint(dirpath=tmp_path / "b", every_n_train_steps=21, save_top_k=-1)
        stop, after = dict(max_steps=21), 20  # the epoch's statistics at step 21 compared too
    else:
        ckpt = ModelCheckpoint(dirpath=tmp_path / "b", every_n_train_steps=at, save_top_k=-1)
        stop, after = dict(max_steps=at), at
    fit(feature_dir, tmp_path / "b", RoutingMonitor(every_n_steps=5, plots=False), callbacks=[ckpt], model=model,
        **stop)
    (path,) = (tmp_path / "b").glob("*.ckpt")
    _, resumed = fit(feature_dir, tmp_path / "c", RoutingMonitor(every_n_steps=5, plots=False), ckpt_path=str(path),
                     model=model)

    def monitored(logger):  # step -> the monitor's metrics logged at it (Lightning logs a step more than once)
        out: dict[int, dict[str, float]] = {}
        for step, metrics in logger.calls:
            mine = {k: v for k, v in metrics.items() if k.startswith(("experts/", "relatedness/"))}
            if step > after and mine:
                out.setdefault(step, {}).update(mine)
        return out

    want, got = monitored(straight), monitored(resumed)
    assert sorted(got) == sorted(want) == [s for s in [15, 20, 21, 25, 30, 35, 40, 42] if s > after]
    for step, metrics in want.items():
        assert got[step].keys() == metrics.keys(), step
        for key, value in metrics.items():
            assert got[step][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (step, key)
    if model is SPARSE_DROPPING:  # the statistics that differed after a resume are among those compared
        assert any(k.endswith("dropped_frac") and v > 0 for k, v in want[21].items())
        assert any("bias" in k for k in want[21])


def test_a_resumed_fit_keeps_the_load_history_of_the_steps_before_it(feature_dir, tmp_path):
    straight = RoutingMonitor(every_n_steps=5, plots=False)
    fit(feature_dir, tmp_path / "a", straight)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "b", every_n_train_steps=15, save_top_k=-1)
    fit(feature_dir, tmp_path / "b", RoutingMonitor(every_n_steps=5, plots=False), callbacks=[ckpt], max_steps=15)
    (path,) = (tmp_path / "b").glob("*.ckpt")
    resumed = RoutingMonitor(every_n_steps=5, plots=False)
    fit(feature_dir, tmp_path / "c", resumed, ckpt_path=str(path))
    assert resumed.history_steps == straight.history_steps  # the plot covers the whole run, not the steps after 15
    for gate, loads in straight.history.items():
        assert len(resumed.history[gate]) == len(loads)
        for a, b in zip(resumed.history[gate][:3], loads[:3]):  # logged before the checkpoint: the same loads
            assert a.tolist() == b.tolist()


def test_an_epoch_plot_that_cannot_be_written_is_a_warning_and_training_goes_on(feature_dir, tmp_path, monkeypatch):
    """A failing artifact write at an epoch's end (a full disk, a store that went away) stopped the whole fit."""
    from mmoe_rec.training import callbacks

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(callbacks, "log_png", full_disk)
    monkeypatch.setattr(RoutingMonitor, "_artifact_logger", lambda self, trainer: True)  # as under MLflow
    with pytest.warns(UserWarning, match=r"epoch 0's plots could not be logged \(OSError: .*No space left"):
        trainer, logger = fit(feature_dir, tmp_path, RoutingMonitor(every_n_steps=5, plots=True))
    assert trainer.current_epoch == 2 and logger.steps_with("experts/epoch/click/util/e0") == [21, 42]


def test_the_load_history_is_thinned_to_a_bounded_length(feature_dir, tmp_path, monkeypatch):
    """The history behind the load plot grew by a point per log and went whole into every checkpoint (58 MB for
    20,000 points of 5 gates x 64 experts). Past MAX_LOAD_HISTORY points every other one is dropped, and only the
    points of the doubled spacing are recorded from then on."""
    from mmoe_rec.training import callbacks

    monkeypatch.setattr(callbacks, "MAX_LOAD_HISTORY", 8)
    monitor = RoutingMonitor(every_n_steps=2, plots=False)
    fit(feature_dir, tmp_path, monitor)  # 42 steps: logs at 2, 4, ..., 42
    # 21 log points: thinned at the 9th (2..18: to every 4 steps) and again at 36 (to every 8 steps)
    assert monitor.history_every == 4
    assert monitor.history_steps == [8, 16, 24, 32, 40]
    assert all(len(loads) == 5 for loads in monitor.history.values())
    fig = monitor.figures(callbacks.Window(["click", "convert"]))["expert_load"]
    assert "(every 8 steps)" in fig._suptitle.get_text()


def test_without_an_mlflow_logger_no_plot_is_drawn_and_it_says_so_once(feature_dir, tmp_path, monkeypatch):
    """The plots and JSON go to MLflow only: with another logger they were drawn every epoch and dropped silently."""
    monitor = RoutingMonitor(every_n_steps=5, plots=True)
    drawn = []
    monkeypatch.setattr(monitor, "write_plots", lambda *a, **k: drawn.append(a))
    with pytest.warns(UserWarning, match="RoutingMonitor: the plots and the relatedness JSON go to an MLflow logger "
                                         "only") as caught:
        _, logger = fit(feature_dir, tmp_path, monitor)
    assert drawn == [] and len([w for w in caught if "RoutingMonitor: the plots" in str(w.message)]) == 1
    assert logger.steps_with("experts/epoch/click/util/e0") == [21, 42]  # the scalars still logged


def test_the_epoch_plots_say_which_epoch_and_which_step_the_gradient_probe_was():
    """Each epoch's plots replace the last epoch's under plots/: their titles name the epoch (and the gradient
    cosine's step), which nothing in the figure said."""
    import torch

    from mmoe_rec.nn.routing_record import GateRecord
    from mmoe_rec.training import plots
    from mmoe_rec.training.callbacks import Window

    monitor = RoutingMonitor(every_n_steps=5)
    window = Window(["a", "b"])
    probs = torch.softmax(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    window.update({t: GateRecord(combine=probs, probs=probs) for t in ("a", "b")},
                  {"a": torch.tensor([0.0, 1, 0, 1, 1, 0]), "b": torch.tensor([1.0, 0, 1, 1, 0, 0])})
    figs = monitor.figures(window, (["a", "b"], torch.eye(2, dtype=torch.float64)), epoch=3, probe_step=40)
    try:
        assert figs["utilization_heatmap"].axes[0].get_title() == "Expert utilization (mean gate weight, epoch 3)"
        assert figs["task_relatedness"]._suptitle.get_text() == "Task relatedness, epoch 3 (gradient cosine: step 40)"
    finally:
        for fig in figs.values():
            plots.close(fig)


def test_a_fit_shorter_than_a_window_still_plots_the_load_at_each_epochs_end(feature_dir, tmp_path):
    """The load plot drew only window points: a fit of fewer steps than every_n_steps (42 < 100 here) got none.
    Until a window is logged, the epochs' ends are its points; they survive a checkpoint."""
    from mmoe_rec.training import callbacks

    monitor = RoutingMonitor(every_n_steps=100, plots=False)
    fit(feature_dir, tmp_path, monitor)  # 2 epochs of 21 steps
    assert monitor.history_steps == [] and monitor.epoch_history_steps == [21, 42]
    assert all(len(loads) == 2 for loads in monitor.epoch_history.values()) and monitor.epoch_history
    fig = monitor.figures(callbacks.Window(["click", "convert"]))["expert_load"]
    assert "at each epoch's end" in fig._suptitle.get_text()
    reloaded = RoutingMonitor(every_n_steps=100, plots=False)
    reloaded.load_state_dict(monitor.state_dict())
    assert reloaded.epoch_history_steps == [21, 42]
    for name, loads in monitor.epoch_history.items():
        for a, b in zip(loads, reloaded.epoch_history[name]):
            assert (a == b).all()


def test_a_model_without_gates_draws_no_load_plot():
    """Shared-bottom (its configs keep the monitor for label correlation and the gradient cosine): the load history
    filled with steps and no gate, and every epoch wrote an empty "Per-expert load over training" figure."""
    import torch

    from mmoe_rec.training.callbacks import Window, _append_loads

    monitor = RoutingMonitor(every_n_steps=2)
    window = Window(["click", "conversion"])
    window.update({}, {"click": torch.rand(64), "conversion": torch.rand(64)})  # no routing: no gates
    for step in (2, 4, 6):
        monitor.history_steps.append(step)
        _append_loads(monitor.history, window)
    figs = monitor.figures(window, epoch=0)
    assert "expert_load" not in figs and "utilization_heatmap" not in figs
    assert "task_relatedness" in figs  # the label correlation is drawn


def test_the_load_history_of_a_sparse_gate_is_its_share_of_assignments_not_its_gate_weight():
    """The expert-load plot says "share of assignments" for sparse gates: 3 of 4 rows to expert 0 is 0.75, whatever
    the combine weights (0.5 here, so the mean gate weight would read 0.375 / 0.125)."""
    import numpy as np
    import torch

    from mmoe_rec.nn.routing_record import GateRecord
    from mmoe_rec.training.callbacks import Window, _append_loads

    chosen = torch.tensor([[0], [0], [0], [1]])
    window = Window(["click"])
    window.update({"click": GateRecord(combine=torch.zeros(4, 2).scatter(1, chosen, 0.5),
                                       probs=torch.full((4, 2), 0.5), chosen=chosen, dropped=torch.tensor(0))},
                  {"click": torch.zeros(4)})
    history = {}
    _append_loads(history, window)
    np.testing.assert_allclose(history["click"][0], [0.75, 0.25])


def test_the_monitor_weighs_the_label_correlation_by_the_batchs_sample_weights():
    """The callback passed the batch's labels to its window without their weights: the README's sample-weighted
    label correlation was the unweighted one in every fit (a review's mutation: no test saw it)."""
    from types import SimpleNamespace

    import torch

    from mmoe_rec.nn.routing_record import GateRecord
    from mmoe_rec.training.callbacks import Window

    labels = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    weights = torch.tensor([3.0, 1.0, 1.0, 1.0, 2.0])
    p = torch.full((5, 2), 0.5)
    module = SimpleNamespace(tasks=["a", "b"], last_output=SimpleNamespace(
        routing={"a": GateRecord(combine=p, probs=p), "b": GateRecord(combine=p, probs=p)}))
    trainer = SimpleNamespace(global_step=1, accumulate_grad_batches=1, is_last_batch=False, current_epoch=0)
    monitor = RoutingMonitor(every_n_steps=1000, plots=False)
    monitor.on_train_batch_end(trainer, module, None, SimpleNamespace(labels={"a": labels[:, 0], "b": labels[:, 1]},
                                                                      weights=weights), 0)
    seen = Window.from_state_dict(monitor.state_dict()["open"]["window"]).relatedness()["label_corr"][1]
    repeated = torch.repeat_interleave(labels, weights.long(), dim=0)
    want = Window(["a", "b"])
    want.update({}, {"a": repeated[:, 0], "b": repeated[:, 1]})
    torch.testing.assert_close(seen, want.relatedness()["label_corr"][1])


def test_a_window_of_zero_steps_is_refused_when_made():
    """every_n_steps 0 divided by zero at the first training batch."""
    for bad in (0, -3):
        with pytest.raises(ValueError, match=f"every_n_steps must be >= 1, got {bad}"):
            RoutingMonitor(every_n_steps=bad)
    assert RoutingMonitor(every_n_steps=1).every_n_steps == 1


def test_gate_relatedness_is_that_of_the_group_seen_with_the_most_rows():
    """The gates changed shape within a window (two groups of tasks): the group with the most rows is the one
    relatedness reports, not the other."""
    import torch

    from mmoe_rec.training.callbacks import Window

    window = Window(["a", "b", "c"])
    window.gate_pairs = {("a", "b"): torch.tensor([[1.0, 9.0, 10.0]], dtype=torch.float64),   # JS 0.1, cos 0.9
                         ("a", "c"): torch.tensor([[1.0, 0.5, 2.0]], dtype=torch.float64)}     # 2 rows only
    names, js = window.relatedness()["gate_js"]
    assert names == ["a", "b"] and float(js[0, 1]) == pytest.approx(0.1)
    assert float(window.relatedness()["gate_cos"][1][0, 1]) == pytest.approx(0.9)


def test_a_fit_stopped_mid_epoch_by_max_steps_logs_no_epoch_statistics_for_the_cut_epoch(feature_dir, tmp_path):
    """max_steps ends the fit 15 steps into a 21-step epoch: Lightning still calls on_train_epoch_end, and the
    partial epoch must not be logged as that epoch's statistics (a resume from the step-15 checkpoint logs the whole
    epoch at step 21: the run held epoch 0 twice, at steps 15 and 21)."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / "b", every_n_train_steps=15, save_top_k=-1)
    _, stopped = fit(feature_dir, tmp_path / "b", RoutingMonitor(every_n_steps=5, plots=False), callbacks=[ckpt],
                     max_steps=15)
    (path,) = (tmp_path / "b").glob("*.ckpt")
    _, resumed = fit(feature_dir, tmp_path / "c", RoutingMonitor(every_n_steps=5, plots=False), ckpt_path=str(path))
    epoch_key = "experts/epoch/click/util/e0"
    assert stopped.steps_with(epoch_key) + resumed.steps_with(epoch_key) == [21, 42]
    assert not any(k.startswith("relatedness/epoch/") for _, m in stopped.calls for k in m)
    # what the stopped fit saw of its epoch, under names of its own (a fit that ends there logged nothing at all)
    assert stopped.steps_with("experts/partial_epoch/click/util/e0") == [15]
    assert any(k.startswith("relatedness/partial_epoch/") for _, m in stopped.calls for k in m)
    assert not resumed.steps_with("experts/partial_epoch/click/util/e0")
