"""In-process training on the tiny feature dir: learning, logging, checkpoint reload, exact resume, early stop."""
from __future__ import annotations

import copy
import dataclasses
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from conftest import MMOE, SPARSE, metric_history, mlflow_run
from mmoe_rec.data.datamodule import FeatureDataModule
from mmoe_rec.training.callbacks import RoutingMonitor
from mmoe_rec.training.module import MultiTaskModule
from mmoe_rec.training.tracking import MLflowTracker
from test_routing_monitor import Capture

pytestmark = pytest.mark.seeded_mlflow_store  # tmp_path/mlflow.db: a copy of an empty store (tests/conftest.py)

FAST = dict(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0)


def module_for(dm, model=MMOE, **kw):
    kw.setdefault("optimizer", {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.01}})
    return MultiTaskModule(model=copy.deepcopy(model), feature_spec=dm.spec, **kw)


def test_fit_learns_logs_to_mlflow_and_checkpoint_reloads(feature_dir, in_tmp):
    L.seed_everything(0)
    dm = FeatureDataModule(str(feature_dir), batch_size=128, seed=0)
    module = module_for(dm, grad_similarity_every=4)
    best = ModelCheckpoint(dirpath=in_tmp / "ckpt", monitor="val/click/auc", mode="max")
    # unmonitored, as in configs/: a monitored callback's save_last rewrites last.ckpt only at epochs that improved
    # the metric, so the fitted module would equal it only when the last epoch did
    last = ModelCheckpoint(dirpath=in_tmp / "last", save_last=True)
    trainer = L.Trainer(max_epochs=2, log_every_n_steps=4, logger=MLflowTracker(),
                        callbacks=[RoutingMonitor(every_n_steps=4), best, last], **FAST)
    trainer.fit(module, dm)
    run, client = mlflow_run(in_tmp / "mlflow.db")
    m = run.data.metrics
    assert m["val/click/auc"] > 0.7  # labels depend on d0 and the user: well above chance
    for key in ["train/loss", "train/click/loss", "train/convert/loss", "val/click/logloss", "val/convert/auc",
                "experts/click/util/e0", "experts/epoch/convert/entropy", "relatedness/label_corr/click.vs.convert",
                "relatedness/epoch/gate_js/click.vs.convert", "relatedness/grad_cos/click.vs.convert"]:
        assert key in m, key
    assert metric_history(client, run, "train/rows_seen") == [2000.0, 2000.0]
    util = [m[f"experts/epoch/click/util/e{i}"] for i in range(4)]
    assert sum(util) == pytest.approx(1.0, abs=1e-5)  # dense softmax gate: weights sum to 1 per row
    params = run.data.params
    assert params["model/class_path"] == "mmoe_rec.models.mmoe.MMoE" and params["model/init_args/num_experts"] == "4"
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/utilization_heatmap.png", "plots/expert_load.png", "plots/task_relatedness.png"}
    # reload without the data module or the CLI: same predictions
    assert Path(best.best_model_path).is_file()
    reloaded = MultiTaskModule.load_from_checkpoint(last.last_model_path, map_location="cpu").eval()
    module.eval()
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        a, b = module(batch).logits, reloaded(batch).logits
    for t in a:
        torch.testing.assert_close(a[t], b[t])
    assert reloaded.spec.to_dict() == dm.spec.to_dict()


def _train(feature_dir, tmp, max_epochs, ckpt_path=None, callbacks=(), max_steps=-1, weighting="fixed", model=MMOE,
           strategy="auto", accumulate=1, **module_kw):
    L.seed_everything(0)
    dm = FeatureDataModule(str(feature_dir), batch_size=96, seed=3, shuffle_buffer=256)
    module = module_for(dm, model, weighting=weighting, **module_kw)
    trainer = L.Trainer(max_epochs=max_epochs, max_steps=max_steps, logger=False, limit_val_batches=0,
                        callbacks=list(callbacks), default_root_dir=tmp, strategy=strategy,
                        accumulate_grad_batches=accumulate, **FAST)
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return trainer, module


def test_resume_from_checkpoint_continues_exactly(feature_dir, tmp_path):
    straight_trainer, straight = _train(feature_dir, tmp_path / "a", 2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "b", save_last=True)
    _train(feature_dir, tmp_path / "b", 1, callbacks=[ckpt])
    saved = torch.load(ckpt.last_model_path, map_location="cpu", weights_only=False)
    assert saved["epoch"] == 0 and saved["global_step"] == straight_trainer.global_step // 2
    assert saved["datamodule_hyper_parameters"]["seed"] == 3
    resumed_trainer, resumed = _train(feature_dir, tmp_path / "c", 2, ckpt_path=ckpt.last_model_path)
    assert resumed_trainer.global_step == straight_trainer.global_step
    a, b = straight.state_dict(), resumed.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    # optimizer state continued too (Adam's step count includes the first epoch)
    step_a = straight_trainer.optimizers[0].state_dict()["state"][0]["step"]
    step_b = resumed_trainer.optimizers[0].state_dict()["state"][0]["step"]
    assert float(step_a) == float(step_b) == straight_trainer.global_step


# 21 batches per epoch: inside the first and the second epoch. The experts' GEMMs through PyTorch's own ops (the
# `auto` policy on this model's small products) and through oneDNN (nn.cpu_gemm): exact either way.
@pytest.mark.parametrize("stop_at, gemm", [(7, "auto"), (30, "auto"), (30, "onednn")])
def test_resume_from_a_mid_epoch_checkpoint_continues_with_the_next_batch(feature_dir, tmp_path, stop_at, gemm,
                                                                          monkeypatch):
    monkeypatch.setenv("MMOE_REC_CPU_GEMM", gemm)
    straight_trainer, straight = _train(feature_dir, tmp_path / "a", 2)
    assert straight_trainer.global_step == 42
    ckpt = ModelCheckpoint(dirpath=tmp_path / "b", every_n_train_steps=stop_at, save_top_k=-1)
    _train(feature_dir, tmp_path / "b", 2, callbacks=[ckpt], max_steps=stop_at)  # "crashes" after stop_at steps
    (path,) = (tmp_path / "b").glob("*.ckpt")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    state = next(v for k, v in saved.items() if k.endswith("FeatureDataModule"))
    assert saved["global_step"] == stop_at and state["batches_done"] == stop_at % 21
    resumed_trainer, resumed = _train(feature_dir, tmp_path / "c", 2, ckpt_path=path)
    assert resumed_trainer.global_step == straight_trainer.global_step
    a, b = straight.state_dict(), resumed.state_dict()
    for k in a:  # the same batches in the same order after the resume: bitwise the same weights
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_a_one_process_ddp_fit_resumes_mid_epoch(feature_dir, tmp_path):
    """One process under a DDP strategy: Lightning's all_gather gives (1, T) there, and the checkpoint held the
    epoch's loss sums as (1, 1, T); the resumed fit crashed at the epoch's end ("Tensors must have same number of
    dimensions")."""
    straight_trainer, straight = _train(feature_dir, tmp_path / "a", 2, strategy="ddp", weighting="dwa")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "b", every_n_train_steps=30, save_top_k=-1)
    _train(feature_dir, tmp_path / "b", 2, callbacks=[ckpt], max_steps=30, strategy="ddp", weighting="dwa")
    (path,) = (tmp_path / "b").glob("*.ckpt")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    assert saved["mmoe_rec_epoch_totals"]["loss_sum_per_rank"].shape == (1, 2)
    resumed_trainer, resumed = _train(feature_dir, tmp_path / "c", 2, ckpt_path=path, strategy="ddp",
                                      weighting="dwa")
    assert resumed_trainer.global_step == straight_trainer.global_step
    a, b = straight.state_dict(), resumed.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


class _FailsAtStep(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("the fit fails here")


def test_a_checkpoint_written_as_the_fit_fails_resumes_with_the_next_batch(feature_dir, tmp_path):
    """OnExceptionCheckpoint (what a fit stopped by an error or a SIGTERM can leave): the data module recorded no
    position while Lightning's state said "interrupted", so the resume trained the epoch's first batches again
    and never its last ones (Lightning itself resumed at the right step)."""
    from lightning.pytorch.callbacks import OnExceptionCheckpoint

    straight_trainer, straight = _train(feature_dir, tmp_path / "a", 2)
    with pytest.raises(RuntimeError, match="the fit fails here"):
        _train(feature_dir, tmp_path / "b", 2, callbacks=[_FailsAtStep(27), OnExceptionCheckpoint(tmp_path / "b")])
    (path,) = (tmp_path / "b").glob("*.ckpt")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    state = next(v for k, v in saved.items() if k.endswith("FeatureDataModule"))
    assert saved["global_step"] == 27 and state["batches_done"] == 27 - 21
    resumed_trainer, resumed = _train(feature_dir, tmp_path / "c", 2, ckpt_path=path)
    assert resumed_trainer.global_step == straight_trainer.global_step
    a, b = straight.state_dict(), resumed.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


class _FailsAtBatch(L.Callback):
    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise RuntimeError("the fit fails here")


@pytest.mark.parametrize("strategy", ["auto", "ddp"])
def test_a_fit_that_fails_inside_a_gradient_accumulation_window_resumes_with_its_gradients(feature_dir, tmp_path,
                                                                                           strategy):
    """accumulate_grad_batches 2, the fit failing after 5 batches of epoch 1: the on-exception checkpoint had the
    data position after batch 5 but not the gradient of batch 5, whose optimizer step was still to come; the
    resumed fit left that batch's rows out and its weights came out otherwise than the straight fit's."""
    straight_trainer, straight = _train(feature_dir, tmp_path / "a", 2, accumulate=2, strategy=strategy,
                                        weighting="dwa")
    with pytest.raises(RuntimeError, match="the fit fails here"):
        _train(feature_dir, tmp_path / "b", 2, accumulate=2, strategy=strategy, weighting="dwa",
               callbacks=[_FailsAtBatch(1, 5), OnExceptionCheckpoint(tmp_path / "b")])
    (path,) = (tmp_path / "b").glob("*.ckpt")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 11 + 2 and "mmoe_rec_accumulated_grads" in saved
    resumed_trainer, resumed = _train(feature_dir, tmp_path / "c", 2, ckpt_path=path, accumulate=2,
                                      strategy=strategy, weighting="dwa")
    assert resumed_trainer.global_step == straight_trainer.global_step == 22
    a, b = straight.state_dict(), resumed.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    # a window closed at the checkpoint (after batch 6) keeps no gradients: they are in the weights already
    with pytest.raises(RuntimeError, match="the fit fails here"):
        _train(feature_dir, tmp_path / "d", 2, accumulate=2, callbacks=[_FailsAtBatch(1, 6),
                                                                        OnExceptionCheckpoint(tmp_path / "d")])
    (path,) = (tmp_path / "d").glob("*.ckpt")
    assert "mmoe_rec_accumulated_grads" not in torch.load(path, map_location="cpu", weights_only=False)


def test_a_fit_that_fails_in_its_training_step_mid_window_resumes_with_the_windows_gradients(feature_dir, tmp_path,
                                                                                                monkeypatch):
    """Lightning counts a batch as started before its training_step: a forward that fails (a data error, NaN, out
    of memory) mid-window left started > processed, read as a failed backward, and the window's gradients (only the
    earlier batches' then) were dropped: the resumed fit left them out."""
    from mmoe_rec.training.module import MultiTaskModule

    straight_trainer, straight = _train(feature_dir, tmp_path / "a", 2, accumulate=2)
    step = MultiTaskModule.training_step

    def failing(self, batch, batch_idx):
        if self.current_epoch == 1 and batch_idx == 5:
            raise RuntimeError("the fit fails here")
        return step(self, batch, batch_idx)

    monkeypatch.setattr(MultiTaskModule, "training_step", failing)
    with pytest.raises(RuntimeError, match="the fit fails here"):
        _train(feature_dir, tmp_path / "b", 2, accumulate=2, callbacks=[OnExceptionCheckpoint(tmp_path / "b")])
    monkeypatch.setattr(MultiTaskModule, "training_step", step)
    (path,) = (tmp_path / "b").glob("*.ckpt")
    assert "mmoe_rec_accumulated_grads" in torch.load(path, map_location="cpu", weights_only=False)
    resumed_trainer, resumed = _train(feature_dir, tmp_path / "c", 2, ckpt_path=path, accumulate=2)
    a, b = straight.state_dict(), resumed.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


class _FailsAfterBackward(_FailsAtBatch):
    """Fails once the backward of batch `batch` of epoch `epoch` is done (as a NaN check on the gradients would)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.current = (trainer.current_epoch, batch_idx)

    def on_after_backward(self, trainer, pl_module) -> None:
        if self.current == (self.epoch, self.batch):
            raise RuntimeError("the fit fails here")


class _FailsInForward(_FailsAtBatch):
    """Fails at the end of the model's forward of batch `batch` of epoch `epoch`: its loads counted, no backward."""

    def on_fit_start(self, trainer, pl_module) -> None:
        self.current = None

        def fail(module, args, output) -> None:
            if module.training and self.current == (self.epoch, self.batch):
                raise RuntimeError("the fit fails here")

        pl_module.model.register_forward_hook(fail)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.current = (trainer.current_epoch, batch_idx)


def test_a_window_whose_gradients_cannot_be_told_apart_or_another_accumulation_is_said_not_mixed(feature_dir,
                                                                                                 tmp_path):
    """Batch 3 failing after its backward, the second of its window: .grad holds batch 2's gradient and batch 3's,
    and the resume replays batch 3 (counted twice). No gradients are kept then, with a warning. A resume under
    another accumulate_grad_batches draws other windows: the saved gradients are left out, with a warning."""
    with pytest.warns(UserWarning, match="failed inside its backward or optimizer step, in the middle of a gradient"):
        with pytest.raises(RuntimeError, match="the fit fails here"):
            _train(feature_dir, tmp_path / "b", 2, accumulate=2, callbacks=[_FailsAfterBackward(1, 3),
                                                                            OnExceptionCheckpoint(tmp_path / "b")])
    (path,) = (tmp_path / "b").glob("*.ckpt")
    assert "mmoe_rec_accumulated_grads" not in torch.load(path, map_location="cpu", weights_only=False)
    with pytest.raises(RuntimeError, match="the fit fails here"):
        _train(feature_dir, tmp_path / "c", 2, accumulate=2, callbacks=[_FailsAtBatch(1, 5),
                                                                        OnExceptionCheckpoint(tmp_path / "c")])
    (path,) = (tmp_path / "c").glob("*.ckpt")
    with pytest.warns(UserWarning, match="inside a window of accumulate_grad_batches=2, and this fit accumulates 3"):
        _train(feature_dir, tmp_path / "d", 2, ckpt_path=path, accumulate=3)


def test_validating_a_mid_epoch_checkpoint_leaves_a_later_fit_of_the_same_data_module_whole(feature_dir, tmp_path):
    """Trainer.validate(ckpt_path=<mid-epoch checkpoint>) set the data module's resume position and seed: a fresh
    fit of the same object afterwards skipped the epoch's first batches, which were never trained."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / "b", every_n_train_steps=5, save_top_k=-1)
    _train(feature_dir, tmp_path / "b", 1, callbacks=[ckpt], max_steps=5)
    (path,) = (tmp_path / "b").glob("*.ckpt")
    dm = FeatureDataModule(str(feature_dir), batch_size=96, seed=7, shuffle_buffer=256)
    module = module_for(dm, MMOE)
    L.Trainer(logger=False, default_root_dir=tmp_path, **FAST).validate(module, dm, ckpt_path=str(path),
                                                                         verbose=False)
    assert dm.seed == 7

    class Count(L.Callback):
        batches = 0

        def on_train_batch_start(self, *args) -> None:
            Count.batches += 1

    L.Trainer(max_epochs=1, logger=False, limit_val_batches=0, callbacks=[Count()], enable_checkpointing=False,
              default_root_dir=tmp_path, **FAST).fit(module, dm)
    assert Count.batches == 21


class _SigtermAtEpochEnd(L.Callback):
    """What Lightning's SIGTERM handler leaves: the flag, here set as epoch 0 ends (Lightning raises after the
    epoch's end, its count already taken)."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 0:
            trainer._signal_connector.received_sigterm = True


@pytest.mark.parametrize("interval", ["epoch", "step"])
def test_a_fit_stopped_by_sigterm_at_an_epochs_end_resumes_with_the_next_epoch(feature_dir, tmp_path, interval):
    """The on-exception checkpoint of a SIGTERM noticed at epoch 0's end holds epoch 1 and epoch 0's batch count:
    the resume skipped every batch of epoch 1 (42 steps instead of 63), and a plateau scheduler's step was
    recorded as owed for an epoch that never ran."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    factor = 0.5 if interval == "epoch" else 0.9
    straight_trainer, straight = _train(feature_dir, tmp_path / "a", 3, lr_scheduler=plateau(interval, factor))
    with pytest.raises(SIGTERMException):
        _train(feature_dir, tmp_path / "b", 3, callbacks=[_SigtermAtEpochEnd(), OnExceptionCheckpoint(tmp_path / "b")],
               lr_scheduler=plateau(interval, factor))
    (path,) = (tmp_path / "b").glob("*.ckpt")
    assert "mmoe_rec_plateau_step" not in torch.load(path, map_location="cpu", weights_only=False)
    resumed_trainer, resumed = _train(feature_dir, tmp_path / "c", 3, ckpt_path=path,
                                      lr_scheduler=plateau(interval, factor))
    assert resumed_trainer.global_step == straight_trainer.global_step == 63
    lr = [t.optimizers[0].param_groups[0]["lr"] for t in (straight_trainer, resumed_trainer)]
    assert lr[0] == lr[1]
    a, b = straight.state_dict(), resumed.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_resuming_past_the_rest_of_an_epoch_a_max_steps_stop_cut_short_says_so(feature_dir, tmp_path):
    """max_steps stops a fit 9 batches into epoch 1; a checkpoint saved at that (train) epoch's end, as an older
    version wrote it (the epoch counted as processed; this one reopens it, see the test below), makes Lightning
    resume at epoch 2: the other 12 batches of epoch 1 were skipped without a word (a straight run: 63 steps)."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / "b", filename="last", enable_version_counter=False)
    _train(feature_dir, tmp_path / "b", 3, callbacks=[ckpt], max_steps=30)
    saved = torch.load(tmp_path / "b" / "last.ckpt", map_location="cpu", weights_only=False)
    for progress in saved["loops"]["fit_loop"]["epoch_progress"].values():
        assert progress["processed"] == progress["completed"] == 1  # reopened by this version
        progress["processed"] = 2
    torch.save(saved, tmp_path / "b" / "old.ckpt")
    with pytest.warns(UserWarning, match="written after 9 of the 21 batches of epoch 1 .* Lightning resumes at "
                                         "epoch 2, so the other 12 batches of epoch 1 are not trained"):
        resumed, _ = _train(feature_dir, tmp_path / "c", 3, ckpt_path=tmp_path / "b" / "old.ckpt")
    assert resumed.global_step == 51


# Routing noise (noisy top-k) and dropout draw from torch's generator: its state is in the checkpoint, and the
# loaders draw from their own, so a resumed run draws what the straight run drew. Step 30 is mid-epoch, 21 an
# epoch's last batch (validation in between: its loader must not move the stream either).
@pytest.mark.parametrize("stop_at", [30, 21])
def test_a_resumed_fit_continues_the_random_stream_of_noisy_routing_and_dropout(feature_dir, tmp_path, stop_at):
    noisy = copy.deepcopy(SPARSE)
    noisy["init_args"].update(dropout=0.2)  # noisy_topk: noise on by default
    straight_trainer, straight = _train(feature_dir, tmp_path / "a", 2, model=noisy)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "b", every_n_train_steps=stop_at, save_top_k=-1)
    _train(feature_dir, tmp_path / "b", 2, callbacks=[ckpt], max_steps=stop_at, model=noisy)
    (path,) = (tmp_path / "b").glob("*.ckpt")
    resumed_trainer, resumed = _train(feature_dir, tmp_path / "c", 2, ckpt_path=path, model=noisy)
    assert resumed_trainer.global_step == straight_trainer.global_step == 42
    a, b = straight.state_dict(), resumed.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


# A batch that fails once its forward has drawn (noise, dropout masks) is replayed by the resume: the checkpoint
# holds the generators as they were before its forward, not after its draws. One failing at its start has drawn
# nothing (those before an earlier batch's forward would be wrong there).
@pytest.mark.parametrize("fails, strategy", [(_FailsInForward, "auto"), (_FailsAfterBackward, "auto"),
                                             (_FailsAtBatch, "auto"), (_FailsInForward, "ddp")],
                         ids=["forward", "after-backward", "batch-start", "forward-ddp"])
def test_a_fit_resumed_from_a_checkpoint_written_as_a_batch_failed_draws_that_batchs_noise_again(feature_dir,
                                                                                                tmp_path, fails,
                                                                                                strategy):
    noisy = copy.deepcopy(SPARSE)
    noisy["init_args"].update(dropout=0.2)  # noisy_topk: noise on by default
    straight_trainer, straight = _train(feature_dir, tmp_path / "a", 2, model=noisy, strategy=strategy)
    with pytest.raises(RuntimeError, match="the fit fails here"):
        _train(feature_dir, tmp_path / "b", 2, model=noisy, strategy=strategy,
               callbacks=[fails(1, 5), OnExceptionCheckpoint(tmp_path / "b")])
    (path,) = (tmp_path / "b").glob("*.ckpt")
    resumed_trainer, resumed = _train(feature_dir, tmp_path / "c", 2, ckpt_path=path, model=noisy, strategy=strategy)
    assert resumed_trainer.global_step == straight_trainer.global_step == 42
    a, b = straight.state_dict(), resumed.state_dict()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, diff


# 21 batches per epoch. DWA weighs epoch 3 by the mean losses of epochs 1 and 2: a checkpoint at step 30 falls
# inside epoch 2 (the weights epoch 3 trains with), one at step 50 inside epoch 3 (the weights after it, and the
# rows seen in it). Steps 21 and 42 are an epoch's last batch, before its end: Lightning resumes in the next
# epoch without the skipped epoch's end, which the module makes up for (and says so).
@pytest.mark.parametrize("weighting, stop_at",
                         [("dwa", 30), ("dwa", 50), ("uncertainty", 50), ("dwa", 21), ("dwa", 42),
                          ("gradnorm", 30)])
def test_mid_epoch_resume_keeps_the_epochs_totals_for_loss_weighting_and_rows_seen(feature_dir, tmp_path,
                                                                                   weighting, stop_at):
    straight_trainer, straight = _train(feature_dir, tmp_path / "a", 3, weighting=weighting)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "b", every_n_train_steps=stop_at, save_top_k=-1)
    _train(feature_dir, tmp_path / "b", 3, callbacks=[ckpt], max_steps=stop_at, weighting=weighting)
    (path,) = (tmp_path / "b").glob("*.ckpt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed_trainer, resumed = _train(feature_dir, tmp_path / "c", 3, ckpt_path=path, weighting=weighting)
    said = any("last batch of epoch" in str(w.message) for w in caught)
    assert said == (stop_at % 21 == 0)
    assert resumed.weighting.weights() == straight.weighting.weights()
    if weighting in ("dwa", "gradnorm"):
        assert straight.weighting.weights()["click"] != 1.0  # reweighted (dwa: the third epoch; gradnorm: each step)
    a, b = straight.state_dict(), resumed.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    # rows seen in the last epoch: the whole train split, the rows before the checkpoint included
    assert float(resumed_trainer.callback_metrics["train/rows_seen"]) == 2000.0


def _resumes_as_the_straight_dwa_fit(feature_dir, tmp_path, ckpt, straight_trainer, straight):
    """A 3-epoch DWA fit resumed from `ckpt` ends as the straight one: step 63, DWA's weights, every weight bitwise,
    the last epoch's rows seen."""
    resumed_trainer, resumed = _train(feature_dir, tmp_path / "c", 3, ckpt_path=ckpt, weighting="dwa")
    assert resumed_trainer.global_step == straight_trainer.global_step == 63
    assert resumed.weighting.weights() == straight.weighting.weights() != {"click": 1.0, "convert": 1.0}
    a, b = straight.state_dict(), resumed.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert float(resumed_trainer.callback_metrics["train/rows_seen"]) == 2000.0


def test_a_fit_cut_by_max_steps_mid_epoch_resumes_from_its_last_checkpoint_as_a_straight_run(feature_dir, tmp_path):
    """save_last writes a checkpoint at the end of an epoch that max_steps cut short; Lightning counted that epoch
    as processed there, and a fit resumed from it skipped the epoch's other 12 batches (51 steps of 63), its
    weights and DWA's weights otherwise. The cut epoch is neither logged nor closed (its totals stay open)."""
    straight_trainer, straight = _train(feature_dir, tmp_path / "a", 3, weighting="dwa")
    last = ModelCheckpoint(dirpath=tmp_path / "b", save_last=True)
    cut_trainer, _ = _train(feature_dir, tmp_path / "b", 3, callbacks=[last], max_steps=30, weighting="dwa")
    assert float(cut_trainer.callback_metrics["train/rows_seen"]) == 2000.0  # epoch 0's: the cut one is not logged
    assert float(cut_trainer.callback_metrics["train/partial_epoch/rows_seen"]) == 9 * 96  # as a partial epoch
    _resumes_as_the_straight_dwa_fit(feature_dir, tmp_path, last.last_model_path, straight_trainer, straight)



def _datamodule_state(checkpoint):
    return next(v for k, v in checkpoint.items() if k.endswith("FeatureDataModule"))


class _StopAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


def _saved_as_at_the_cut(after, last_path):
    """The checkpoint saved after a fit cut at step 30 (in epoch 1) and save_last's at the cut: the same epoch, loop
    progress and data position. Returns both."""
    saved, in_fit = (torch.load(p, map_location="cpu", weights_only=False) for p in (after, last_path))
    assert saved["epoch"] == in_fit["epoch"] == 1 and saved["global_step"] == 30
    assert saved["loops"]["fit_loop"]["epoch_progress"] == in_fit["loops"]["fit_loop"]["epoch_progress"]
    assert _datamodule_state(saved) == _datamodule_state(in_fit)
    return saved, in_fit


@pytest.mark.parametrize("cut", ["max_steps", "should_stop"])
def test_a_checkpoint_saved_after_a_fit_cut_by_max_steps_resumes_as_a_straight_run(feature_dir, tmp_path, cut):
    """trainer.save_checkpoint after a fit that max_steps (or a stop asked) cut mid-epoch: Lightning has counted
    the cut epoch completed by then (current_epoch is the next one), and the checkpoint was one of epoch 2 with
    none of its batches done: a fit resumed from it skipped the rest of epoch 1 (51 steps of 63), its weights and
    DWA's weights otherwise. It is the mid-epoch checkpoint save_last writes at the cut."""
    straight_trainer, straight = _train(feature_dir, tmp_path / "a", 3, weighting="dwa")
    last = ModelCheckpoint(dirpath=tmp_path / "b", save_last=True)
    callbacks, max_steps = ([last], 30) if cut == "max_steps" else ([last, _StopAt(30)], -1)
    cut_trainer, _ = _train(feature_dir, tmp_path / "b", 3, callbacks=callbacks, max_steps=max_steps, weighting="dwa")
    after = tmp_path / "b" / "after.ckpt"
    cut_trainer.save_checkpoint(after)
    saved, in_fit = _saved_as_at_the_cut(after, last.last_model_path)
    assert _datamodule_state(saved)["batches_done"] == 9 and _datamodule_state(saved)["epoch"] == 1
    totals, in_fit_totals = saved["mmoe_rec_epoch_totals"], in_fit["mmoe_rec_epoch_totals"]
    assert totals["epoch"] == in_fit_totals["epoch"] == 1 and totals["batches"] == 9 and totals["rows"] == 9 * 96
    _resumes_as_the_straight_dwa_fit(feature_dir, tmp_path, after, straight_trainer, straight)


@pytest.mark.parametrize("max_epochs, max_steps", [(1, -1), (3, 21)])
def test_a_checkpoint_saved_after_a_fit_that_ended_at_an_epochs_end_resumes_at_the_next_epoch(
        feature_dir, tmp_path, max_epochs, max_steps):
    """max_epochs reached, or max_steps at an epoch's last batch: the epoch is whole, and a checkpoint saved after
    the fit is one of the next epoch, none of its batches done (as before the cut epoch's rewrite)."""
    trainer, _ = _train(feature_dir, tmp_path, max_epochs, max_steps=max_steps)
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    saved = torch.load(tmp_path / "after.ckpt", map_location="cpu", weights_only=False)
    progress = saved["loops"]["fit_loop"]["epoch_progress"]["current"]
    assert saved["epoch"] == 1 and progress["processed"] == progress["completed"] == progress["started"] == 1
    assert _datamodule_state(saved)["batches_done"] == 0 and "epoch_batches" not in _datamodule_state(saved)
    assert saved["mmoe_rec_epoch_totals"]["epoch"] == 1 and saved["mmoe_rec_epoch_totals"]["batches"] == 0

# Resumes compared with a straight run: the weights and every metric logged after the checkpoint, at the same steps.
NOISY_LOSS_FREE = {"class_path": SPARSE["class_path"],
                   "init_args": {**SPARSE["init_args"], "dropout": 0.2, "loss_free_bias": True,
                                 "bias_update_rate": 0.01, "capacity_factor": 1.0}}


def _logged_fit(feature_dir, tmp, max_epochs, ckpt_path=None, callbacks=(), max_steps=-1, model=NOISY_LOSS_FREE,
                trainer_kw=None, dm_kw=None, monitor=True, **module_kw):
    """(trainer, module, the Capture logger of every log_metrics call)."""
    L.seed_everything(0)
    dm = FeatureDataModule(str(feature_dir), batch_size=96, seed=3, shuffle_buffer=256, **(dm_kw or {}))
    module = module_for(dm, model, **module_kw)
    logger = Capture()
    cbs = [RoutingMonitor(every_n_steps=4, plots=False)] if monitor else []
    kw = {**FAST, "log_every_n_steps": 3, **(trainer_kw or {})}
    trainer = L.Trainer(max_epochs=max_epochs, max_steps=max_steps, logger=logger, default_root_dir=tmp,
                        callbacks=[*cbs, *callbacks], **kw)
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return trainer, module, logger


def _logged_after(logger, after):
    out: dict[int, dict[str, float]] = {}
    for step, metrics in logger.calls:
        if step is not None and step > after:
            out.setdefault(step, {}).update({k: float(v) for k, v in metrics.items()})
    return out


def _same(straight, resumed, after):
    (t1, m1, l1), (t2, m2, l2) = straight, resumed
    assert t1.global_step == t2.global_step
    a, b = m1.state_dict(), m2.state_dict()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, diff
    want, got = _logged_after(l1, after), _logged_after(l2, after)
    assert sorted(got) == sorted(want)
    # the monitor's sums are added in another order after a resume (~1e-8 relative, README); the training's
    # metrics are exact
    bad = [(s, k, v, got[s].get(k)) for s, ms in want.items() for k, v in ms.items()
           if got[s].get(k) is None or (got[s][k] != v if k.startswith(("train/", "val/"))
                                        else got[s][k] != pytest.approx(v, rel=1e-6, abs=1e-9))]
    assert not bad, bad[:10]


@pytest.mark.parametrize("weighting", ["dwa", "gradnorm", "uncertainty"])
def test_a_fit_resumed_from_a_mid_epoch_validation_checkpoint_is_the_straight_fit(feature_dir, tmp_path, weighting):
    kw = dict(weighting=weighting, grad_similarity_every=5,
              trainer_kw={"val_check_interval": 10, "limit_val_batches": 2},
              lr_scheduler={"class_path": "torch.optim.lr_scheduler.ReduceLROnPlateau", "monitor": "val/loss",
                            "init_args": {"mode": "min", "factor": 0.5, "patience": 0, "threshold": 0.05}})
    straight = _logged_fit(feature_dir, tmp_path / "a", 3, **kw)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "b", monitor="val/loss", save_top_k=-1, filename="{step}")
    _logged_fit(feature_dir, tmp_path / "b", 3, callbacks=[ckpt], max_steps=31, **kw)
    path = tmp_path / "b" / "step=31.ckpt"
    assert path.exists(), sorted(p.name for p in (tmp_path / "b").iterdir())
    resumed = _logged_fit(feature_dir, tmp_path / "c", 3, ckpt_path=path, **kw)
    _same(straight, resumed, 31)


class _SigtermAt(L.Callback):
    """What Lightning's SIGTERM handler leaves: the flag, set as batch `batch` of epoch `epoch` ends."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            trainer._signal_connector.received_sigterm = True


def _stop_and_resume(feature_dir, tmp_path, how, max_epochs=3, **kw):
    """how: N (a fit stopped by max_steps N, its checkpoint at step N), ("sigterm", epoch, batch) (an on-exception
    checkpoint at that batch's end), or a callback that fails the fit (an on-exception checkpoint as it fails)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    straight = _logged_fit(feature_dir, tmp_path / "a", max_epochs, **kw)
    if isinstance(how, int):
        ckpt = ModelCheckpoint(dirpath=tmp_path / "b", every_n_train_steps=how, save_top_k=-1)
        _logged_fit(feature_dir, tmp_path / "b", max_epochs, callbacks=[ckpt], max_steps=how, **kw)
    else:
        stop, raised = ((_SigtermAt(*how[1:]), SIGTERMException) if isinstance(how, tuple)
                        else (how, RuntimeError))
        with pytest.raises(raised):
            _logged_fit(feature_dir, tmp_path / "b", max_epochs,
                        callbacks=[stop, OnExceptionCheckpoint(tmp_path / "b")], **kw)
    (path,) = (tmp_path / "b").glob("*.ckpt")
    at = torch.load(path, map_location="cpu", weights_only=False)["global_step"]
    resumed = _logged_fit(feature_dir, tmp_path / "c", max_epochs, ckpt_path=path, **kw)
    _same(straight, resumed, at)


WARMUP = {"class_path": "torch.optim.lr_scheduler.LinearLR", "interval": "step",
          "init_args": {"start_factor": 0.1, "total_iters": 40}}
ONECYCLE = {"class_path": "torch.optim.lr_scheduler.OneCycleLR", "interval": "step",
            "init_args": {"max_lr": 0.05, "total_steps": 63}}
STEPLR = {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 1, "gamma": 0.5}}


@pytest.mark.parametrize("sched, how", [(WARMUP, 30), (ONECYCLE, 21), (STEPLR, ("sigterm", 1, 5)),
                                        (WARMUP, ("sigterm", 0, 20))],
                         ids=["warmup-mid", "onecycle-last-batch", "steplr-sigterm", "warmup-sigterm-epoch-end"])
def test_step_and_epoch_schedulers_resume_exactly_and_log_at_the_straight_runs_steps(feature_dir, tmp_path, sched,
                                                                                      how):
    _stop_and_resume(feature_dir, tmp_path, how, lr_scheduler=sched, weighting="dwa", monitor=False, model=SPARSE)


@pytest.mark.parametrize("fails, batch, accumulate", [(_FailsAtBatch, 5, 1), (_FailsInForward, 5, 1),
                                                       (_FailsAtBatch, 5, 2), (_FailsAtBatch, 4, 2)],
                         ids=["batch-start", "forward", "window-end", "window-start"])
def test_a_fit_resumed_from_a_checkpoint_written_as_it_failed_logs_at_the_straight_runs_steps(feature_dir, tmp_path,
                                                                                             fails, batch, accumulate):
    """Lightning adds 1 to its logging step (`_batches_that_stepped`) on every restart not at an epoch's end (nor
    inside an accumulation window), for a checkpoint written inside a batch's end; one written as a batch failed
    (OnExceptionCheckpoint) has counted its steps already: the resumed fit logged every train/ metric one logging
    interval late under a step one higher (train/loss of step 26 at 29, ...), lost the epoch's last one, and logged
    val/ and train/rows_seen at 42 and 63 instead of 41 and 62. The weights were the straight run's. Under
    accumulate_grad_batches 2 the failed batch 5 ends its window (Lightning adds 1), batch 4 starts one (it does
    not). The forward that fails has drawn its routing noise, which the resume draws again."""
    _stop_and_resume(feature_dir, tmp_path, fails(1, batch), lr_scheduler=STEPLR, weighting="dwa", monitor=False,
                     model=SPARSE, trainer_kw={"accumulate_grad_batches": accumulate})


@pytest.mark.parametrize("how", [30, ("sigterm", 1, 5)], ids=["mid", "sigterm"])
def test_a_fit_with_loader_workers_and_sample_weights_resumes_exactly(make_feature_dir, tmp_path, how):
    weighted = make_feature_dir("weighted", with_weight=True)
    _stop_and_resume(weighted, tmp_path, how, dm_kw={"num_workers": 2}, weighting="dwa", grad_similarity_every=7)


class _SigtermInValidation(L.Callback):
    """The SIGTERM flag set after validation batch `batch` of the validation at global step `step`."""

    def __init__(self, step: int, batch: int) -> None:
        self.step, self.batch = step, batch

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.global_step == self.step and batch_idx == self.batch:
            trainer._signal_connector.received_sigterm = True


def test_a_fit_stopped_by_sigterm_inside_a_mid_epoch_validation_resumes_exactly(feature_dir, tmp_path):
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    kw = dict(weighting="dwa", trainer_kw={"val_check_interval": 10, "limit_val_batches": 4},
              lr_scheduler={"class_path": "torch.optim.lr_scheduler.ReduceLROnPlateau", "monitor": "val/loss",
                            "init_args": {"mode": "min", "factor": 0.5, "patience": 0, "threshold": 0.05}})
    stop = EarlyStopping(monitor="val/click/auc", mode="max", patience=3, check_on_train_epoch_end=False)
    straight = _logged_fit(feature_dir, tmp_path / "a", 3, callbacks=[copy.deepcopy(stop)], **kw)
    with pytest.raises(SIGTERMException):
        _logged_fit(feature_dir, tmp_path / "b", 3, callbacks=[copy.deepcopy(stop), _SigtermInValidation(31, 1),
                                                               OnExceptionCheckpoint(tmp_path / "b")], **kw)
    (path,) = (tmp_path / "b").glob("*.ckpt")
    assert torch.load(path, map_location="cpu", weights_only=False)["global_step"] == 31
    resumed = _logged_fit(feature_dir, tmp_path / "c", 3, ckpt_path=path, callbacks=[copy.deepcopy(stop)], **kw)
    _same(straight, resumed, 30)


def test_early_stopping_on_chosen_metric(feature_dir, tmp_path):
    dm = FeatureDataModule(str(feature_dir), batch_size=256, seed=0)
    module = module_for(dm)
    stop = EarlyStopping(monitor="val/click/auc", mode="max", min_delta=1.0, patience=1)  # never improves by 1
    trainer = L.Trainer(max_epochs=6, logger=False, callbacks=[stop], limit_train_batches=2,
                        enable_checkpointing=False, default_root_dir=tmp_path, **FAST)
    trainer.fit(module, dm)
    assert trainer.current_epoch == 2 and stop.stopped_epoch == 1


def test_a_checkpoint_on_train_loss_works_with_epochs_shorter_than_log_every_n_steps(feature_dir, tmp_path):
    # train/loss was logged only every log_every_n_steps (50 by default): with 3 steps an epoch the checkpoint
    # found no train/loss at the epoch's end and the fit failed after its first epoch
    dm = FeatureDataModule(str(feature_dir), batch_size=256, seed=0)
    best = ModelCheckpoint(dirpath=tmp_path / "ck", monitor="train/loss", mode="min", save_top_k=1)
    trainer = L.Trainer(max_epochs=2, logger=False, callbacks=[best], limit_train_batches=3, log_every_n_steps=50,
                        default_root_dir=tmp_path, **FAST)
    trainer.fit(module_for(dm), dm)
    assert best.best_model_path and torch.isfinite(best.best_model_score)


def test_sparse_model_sample_weights_uncertainty_and_loss_free_bias(make_feature_dir, in_tmp):
    feature_dir = make_feature_dir("weighted", with_weight=True, rows={"train": 1200, "valid": 300, "test": 300})
    L.seed_everything(0)
    dm = FeatureDataModule(str(feature_dir), batch_size=100, seed=0)
    model = copy.deepcopy(SPARSE)
    model["init_args"].update(loss_free_bias=True, bias_update_rate=0.01)
    module = module_for(dm, model, weighting="uncertainty")
    assert module.spec.has_weight
    trainer = L.Trainer(max_epochs=1, log_every_n_steps=2, logger=MLflowTracker(),
                        callbacks=[RoutingMonitor(every_n_steps=3)], enable_checkpointing=False, **FAST)
    trainer.fit(module, dm)
    run, client = mlflow_run(in_tmp / "mlflow.db")
    m = run.data.metrics
    fractions = [m[f"experts/epoch/click/fraction/e{i}"] for i in range(4)]
    assert sum(fractions) == pytest.approx(1.0, abs=1e-6)
    for key in ["experts/epoch/click/load_cv2", "experts/epoch/click/max_vio", "experts/epoch/click/dead",
                "experts/epoch/click/dropped_frac", "experts/epoch/click/bias_abs_mean",
                "relatedness/epoch/expert_jaccard/click.vs.convert", "train/aux/router_z", "train/click/weight"]:
        assert key in m, key
    assert "train/aux/importance" not in m and "train/aux/load" not in m  # loss-free: the bias alone balances
    assert m["experts/epoch/click/bias_abs_mean"] > 0  # after_optimizer_step moved the loss-free bias
    assert m["experts/epoch/click/bias_abs_max"] >= m["experts/epoch/click/bias_abs_mean"]
    assert m["experts/epoch/click/bias_std"] > 0
    assert not torch.equal(module.weighting.log_vars.detach(), torch.zeros(2))  # learnt log-variances


def test_gradnorm_fit_logs_its_weights_and_loss_and_keeps_them_summing_to_the_task_count(feature_dir, in_tmp):
    L.seed_everything(0)
    dm = FeatureDataModule(str(feature_dir), batch_size=100, seed=0)
    module = module_for(dm, SPARSE, weighting="gradnorm", gradnorm_alpha=1.0)
    trainer = L.Trainer(max_epochs=1, log_every_n_steps=2, logger=MLflowTracker(), enable_checkpointing=False,
                        **FAST)
    trainer.fit(module, dm)
    m = mlflow_run(in_tmp / "mlflow.db")[0].data.metrics
    assert {"train/gradnorm_loss", "train/click/weight", "train/convert/weight"} <= set(m)
    w = module.weighting.learnt_weights.detach()
    assert w.sum().item() == pytest.approx(2.0) and not torch.equal(w, torch.ones(2))
    assert not torch.isnan(module.weighting.initial_losses).any()


def test_gradnorm_is_refused_for_a_model_without_a_shared_layer(feature_dir):
    dm = FeatureDataModule(str(feature_dir), batch_size=100, seed=0)
    ple = {"class_path": "mmoe_rec.models.ple.PLE",
           "init_args": {"num_levels": 1, "num_task_experts": 1, "num_shared_experts": 0}}
    with pytest.raises(ValueError, match="needs a shared layer"):
        module_for(dm, ple, weighting="gradnorm")


def test_an_epoch_without_a_gradient_probe_reports_no_gradient_cosine(feature_dir, in_tmp):
    """The probe runs at step 0 only (every 100 steps, 3 steps an epoch): epoch 1's relatedness JSON must not
    repeat epoch 0's gradient cosine under its own number."""
    import json

    L.seed_everything(0)
    dm = FeatureDataModule(str(feature_dir), batch_size=100, seed=0)
    module = module_for(dm, grad_similarity_every=100)
    trainer = L.Trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=1, log_every_n_steps=1,
                        logger=MLflowTracker(), callbacks=[RoutingMonitor(every_n_steps=1, plots=False)],
                        enable_checkpointing=False, **FAST)
    trainer.fit(module, dm)
    run, client = mlflow_run(in_tmp / "mlflow.db")
    epochs = [json.load(open(client.download_artifacts(run.info.run_id, f"relatedness/epoch_00{e}.json", str(in_tmp))))
              for e in (0, 1)]
    assert "grad_cos" in epochs[0] and "grad_cos" not in epochs[1]


class MicroBatchLoads(L.Callback):
    """After each training batch: every gate's load in that batch (from the step's output) and its bias."""

    def __init__(self) -> None:
        self.loads: list[dict[str, torch.Tensor]] = []
        self.biases: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        routing = pl_module.last_output.routing
        self.loads.append({t: torch.bincount(r.chosen.reshape(-1), minlength=r.num_experts) for t, r in routing.items()})
        self.biases.append({t: g.balancer.bias.clone() for t, g in pl_module.model.gates.items()})


def test_loss_free_bias_under_gradient_accumulation_counts_every_micro_batch(feature_dir, tmp_path):
    L.seed_everything(0)
    dm = FeatureDataModule(str(feature_dir), batch_size=128, seed=0)
    model = copy.deepcopy(SPARSE)
    model["init_args"].update(loss_free_bias=True, bias_update_rate=0.01)
    module = module_for(dm, model)
    seen = MicroBatchLoads()
    trainer = L.Trainer(max_steps=1, accumulate_grad_batches=2, logger=False, callbacks=[seen], limit_val_batches=0,
                        enable_checkpointing=False, default_root_dir=tmp_path, **FAST)
    trainer.fit(module, dm)
    assert len(seen.loads) == 2  # two micro-batches, one optimizer step
    first, (last, bias) = seen.loads[0], (seen.loads[1], seen.biases[1])
    assert all(not b.any() for b in seen.biases[0].values())  # no update after the first micro-batch
    for t in bias:
        load = (first[t] + last[t]).float()
        torch.testing.assert_close(bias[t], 0.01 * torch.sign(load.mean() - load))
    # the last micro-batch alone would have given another update
    assert any(not torch.equal(bias[t], 0.01 * torch.sign(last[t].float().mean() - last[t].float())) for t in bias)


@pytest.mark.parametrize("fails", [_FailsAtBatch, _FailsInForward], ids=["batch-start", "forward"])
def test_loss_free_bias_resumed_inside_an_accumulation_window_counts_the_windows_earlier_loads(feature_dir, tmp_path,
                                                                                              fails):
    """The bias update at a window's end reads the loads of all its micro-batches (LossFreeBias.pending_load); a
    checkpoint written inside the window kept the window's gradients but not those loads, so the resumed fit's
    update counted the batches after the checkpoint only and its biases, choices and weights drifted. A batch that
    failed after its forward has counted its loads (and drawn its routing noise and dropout masks): they are not
    kept (its resume counts and draws them again)."""
    model = copy.deepcopy(SPARSE)
    model["init_args"].update(loss_free_bias=True, bias_update_rate=0.01, dropout=0.2)  # noisy_topk: noise on
    _, straight = _train(feature_dir, tmp_path / "a", 2, accumulate=2, model=model)
    with pytest.raises(RuntimeError, match="the fit fails here"):
        _train(feature_dir, tmp_path / "b", 2, accumulate=2, model=model,
               callbacks=[fails(1, 5), OnExceptionCheckpoint(tmp_path / "b")])
    (path,) = (tmp_path / "b").glob("*.ckpt")
    saved = torch.load(path, map_location="cpu", weights_only=False)["mmoe_rec_accumulated_grads"]
    assert sorted(saved["loads"]) == ["model.gates.click.balancer", "model.gates.convert.balancer"]
    _, resumed = _train(feature_dir, tmp_path / "c", 2, ckpt_path=path, accumulate=2, model=model)
    a, b = straight.state_dict(), resumed.state_dict()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, diff


def test_a_trainer_of_ones_own_refuses_data_of_another_spec_or_without_the_modules_tasks(feature_dir,
                                                                                        make_feature_dir):
    """Outside the CLI nothing paired the module's spec with the data's: test / fit ran on ids that mean other
    values, and a data module without one of the tasks failed in the metrics with a bare KeyError."""
    other = make_feature_dir("other_spec", rows={"train": 200, "valid": 100, "test": 100}, with_weight=True)
    dm, dm_other = FeatureDataModule(str(feature_dir), batch_size=64), FeatureDataModule(str(other), batch_size=64)
    assert dm.spec.version != dm_other.spec.version
    module = MultiTaskModule(model=copy.deepcopy(MMOE), feature_spec=dm.spec)
    trainer = L.Trainer(**FAST, max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    with pytest.raises(ValueError, match=f"spec version {dm_other.spec.version}, this module .* spec version "
                                         f"{dm.spec.version}"):
        trainer.test(module, datamodule=dm_other)
    one_task = FeatureDataModule(str(feature_dir), batch_size=64, tasks=["click"])
    with pytest.raises(ValueError, match=r"model tasks \['convert'\] are not loaded by the data module"):
        L.Trainer(**FAST, max_epochs=1, limit_train_batches=2).fit(module, datamodule=one_task)
    trainer.test(module, datamodule=dm)  # the module's own spec: runs


def test_the_readmes_library_example_runs(feature_dir, tmp_path, monkeypatch):
    """README "As a library": run as written, on a test feature folder (it must not drift from the API)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = text.index("```python", text.index("### As a library")) + len("```python")
    code = text[start:text.index("```", start)].replace("demo_out/features/synthetic_rec", str(feature_dir))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "my_package" / "model.json").exists() and not namespace["model"].training


def test_under_ddp_a_ranks_loss_is_scaled_to_its_steps_global_mean(feature_dir):
    """Without sample weights DDP averaged the ranks' own means: in an epoch's last batches, where the ranks' batches
    differ in size, a row of the smaller batch weighed more. Scaled by world_size x rows / the step's rows, the
    ranks' average is the step's global mean (a stand-in trainer of 2 ranks; the data side is tested in
    tests/data)."""
    from types import SimpleNamespace

    dm = FeatureDataModule(str(feature_dir), batch_size=10)
    batch = next(iter(dm.dataloader("train", rank=0, world_size=1)))
    module = MultiTaskModule(model=copy.deepcopy(MMOE), feature_spec=dm.spec)
    module._trainer = SimpleNamespace(world_size=2, log_every_n_steps=0, is_last_batch=False, global_step=0,
                                      strategy=SimpleNamespace(reduce=lambda t, reduce_op: t))

    def loss(step_rows):
        torch.manual_seed(0)
        return float(module.training_step(dataclasses.replace(batch, step_rows=step_rows), 0))

    assert loss(20) == loss(None)  # equal batches on both ranks: unchanged
    assert loss(15) == pytest.approx(loss(None) * 2 * 10 / 15, rel=1e-6)  # this rank 10 rows, the other 5


# A plateau scheduler that never sees an improvement (threshold 10: better means 10x lower) cuts the rate at each of
# its steps, so that a step lost or taken twice on resume shows in the learning rate and the weights.
def plateau(interval: str, factor: float, frequency: int = 1) -> dict:
    return {"class_path": "torch.optim.lr_scheduler.ReduceLROnPlateau", "monitor": "train/loss", "interval": interval,
            "frequency": frequency, "init_args": {"mode": "min", "factor": factor, "patience": 0, "threshold": 10.0}}


@pytest.mark.parametrize("interval, stop_at", [("epoch", "last"), ("epoch", 30), ("epoch", 21), ("epoch", 50),
                                               ("epoch", "after_fit"), ("epoch", "exception"), ("step", 30),
                                               ("step", 7), ("step", "exception")])
def test_a_plateau_scheduler_resumes_with_every_step_a_straight_run_takes(feature_dir, tmp_path, interval, stop_at):
    """Lightning steps ReduceLROnPlateau after the checkpoints of its point are written, restores no metric and skips
    the end of the epoch a fit resumed in: resumed fits lost one or two steps (lr 0.01 where the straight run had
    0.005). A step-interval one watching train/loss also failed at the first step: the metric was logged only every
    log_every_n_steps (50 here)."""
    factor = 0.5 if interval == "epoch" else 0.9
    # every 3rd step: the exception inside batch 20 of epoch 1 (its 21st) is inside a step that would have been one
    frequency = 3 if (interval, stop_at) == ("step", "exception") else 1
    sched = plateau(interval, factor, frequency)
    straight_trainer, straight = _train(feature_dir, tmp_path / "a", 3, lr_scheduler=sched)
    assert straight_trainer.global_step == 63
    if stop_at == "last":  # the epoch-end checkpoint of epoch 1
        ckpt = ModelCheckpoint(dirpath=tmp_path / "b", save_last=True)
        _train(feature_dir, tmp_path / "b", 2, callbacks=[ckpt], lr_scheduler=sched)
        path = ckpt.last_model_path
    elif stop_at == "after_fit":  # saved by hand once a 2-epoch fit is over: every step of it already taken
        trainer, _ = _train(feature_dir, tmp_path / "b", 2, lr_scheduler=sched)
        path = tmp_path / "b" / "after.ckpt"
        trainer.save_checkpoint(path)
    elif stop_at == "exception":  # a fit failing inside the last batch of epoch 1: the batch is trained again
        class Boom(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if trainer.global_step == 41:
                    raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            _train(feature_dir, tmp_path / "b", 3, callbacks=[Boom(), OnExceptionCheckpoint(tmp_path / "b")],
                   lr_scheduler=sched)
        (path,) = (tmp_path / "b").glob("*.ckpt")
    else:  # mid-epoch (30: inside epoch 1; 7: inside epoch 0; 50: inside the last), or epoch 0's last batch (21)
        ckpt = ModelCheckpoint(dirpath=tmp_path / "b", every_n_train_steps=stop_at, save_top_k=-1)
        _train(feature_dir, tmp_path / "b", 3, callbacks=[ckpt], max_steps=stop_at,
               lr_scheduler=sched)
        (path,) = (tmp_path / "b").glob("*.ckpt")
    if stop_at == 21:
        ctx = pytest.warns(UserWarning, match="last batch of epoch 0")
    else:
        ctx = warnings.catch_warnings()
    with ctx:
        resumed_trainer, resumed = _train(feature_dir, tmp_path / "c", 3, ckpt_path=path,
                                          lr_scheduler=sched)
    lr = [t.optimizers[0].param_groups[0]["lr"] for t in (straight_trainer, resumed_trainer)]
    assert lr[0] == lr[1], lr
    expected_steps = 3 if interval == "epoch" else 63 // frequency
    assert lr[0] == pytest.approx(0.01 * factor ** expected_steps)
    sched = [t.lr_scheduler_configs[0].scheduler.state_dict() for t in (straight_trainer, resumed_trainer)]
    assert sched[0]["last_epoch"] == sched[1]["last_epoch"] == expected_steps
    a, b = straight.state_dict(), resumed.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_a_resumed_fit_keeps_the_epochs_last_gradient_probe(feature_dir, tmp_path):
    """The epoch's relatedness statistics report its last gradient probe; a fit resumed after that probe (step 25)
    but inside the epoch (checkpoint at 30) had none at the epoch's end (the JSON and the plot lost grad_cos)."""
    straight_trainer, straight = _train(feature_dir, tmp_path / "a", 2, grad_similarity_every=25)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "b", every_n_train_steps=30, save_top_k=-1)
    _train(feature_dir, tmp_path / "b", 2, callbacks=[ckpt], max_steps=30, grad_similarity_every=25)
    (path,) = (tmp_path / "b").glob("*.ckpt")
    _, resumed = _train(feature_dir, tmp_path / "c", 2, ckpt_path=path, grad_similarity_every=25)
    assert straight.last_grad_cosine_step == resumed.last_grad_cosine_step == 25
    assert straight.last_grad_cosine[0] == resumed.last_grad_cosine[0]
    torch.testing.assert_close(straight.last_grad_cosine[1], resumed.last_grad_cosine[1], rtol=0, atol=0)


def test_a_fit_resumed_inside_an_accumulation_window_does_not_probe_its_step_again(feature_dir, tmp_path):
    """The gradient probe runs once per optimizer step, on the step's first micro-batch (_grad_similarity_step, not
    in the checkpoint): a fit resumed at the window's second micro-batch probed step 13 again from that batch's
    losses, logged a second, other relatedness/grad_cos at step 13 and put it in epoch 1's JSON and plot."""
    kw = dict(max_epochs=2, grad_similarity_every=13, monitor=False, model=SPARSE,
              trainer_kw={"accumulate_grad_batches": 2})
    straight = _logged_fit(feature_dir, tmp_path / "a", **kw)
    with pytest.raises(RuntimeError, match="the fit fails here"):
        _logged_fit(feature_dir, tmp_path / "b", callbacks=[_FailsAtBatch(1, 5),
                                                            OnExceptionCheckpoint(tmp_path / "b")], **kw)
    (path,) = (tmp_path / "b").glob("*.ckpt")
    assert torch.load(path, map_location="cpu", weights_only=False)["global_step"] == 13
    resumed = _logged_fit(feature_dir, tmp_path / "c", ckpt_path=path, **kw)
    key = "relatedness/grad_cos/click.vs.convert"
    probes = [[(s, m[key]) for s, m in run[2].calls if key in m] for run in (straight, resumed)]
    assert probes[0] == [(0, probes[0][0][1]), (13, probes[0][1][1])]
    # step 13's probe ran (and was logged) before the checkpoint, on the window's first batch: the resumed fit, which
    # replays the window's second batch at step 13, must not probe it again from that batch's losses
    assert probes[1] == []
    assert straight[1].last_grad_cosine_step == resumed[1].last_grad_cosine_step == 13
    torch.testing.assert_close(straight[1].last_grad_cosine[1], resumed[1].last_grad_cosine[1], rtol=0, atol=0)


def test_a_plateau_step_made_up_on_resume_reads_the_metric_a_straight_run_read(feature_dir, tmp_path):
    """The step owed at an epoch-end checkpoint is taken with the watched metric's value then (a realistic
    threshold: whether the rate is cut depends on it), and the resumed scheduler's whole state is the straight
    run's."""
    sched = {"class_path": "torch.optim.lr_scheduler.ReduceLROnPlateau", "monitor": "train/loss",
             "init_args": {"mode": "min", "factor": 0.5, "patience": 0, "threshold": 0.05}}
    straight_trainer, straight = _train(feature_dir, tmp_path / "a", 4, lr_scheduler=sched)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "b", save_last=True)
    trainer, _ = _train(feature_dir, tmp_path / "b", 2, callbacks=[ckpt], lr_scheduler=sched)
    saved = torch.load(ckpt.last_model_path, map_location="cpu", weights_only=False)["mmoe_rec_plateau_step"]
    assert saved["point"] == ["epoch", 1]
    assert saved["value"] == pytest.approx(float(trainer.callback_metrics["train/loss"]))
    resumed_trainer, resumed = _train(feature_dir, tmp_path / "c", 4, ckpt_path=ckpt.last_model_path,
                                      lr_scheduler=sched)
    states = [t.lr_scheduler_configs[0].scheduler.state_dict() for t in (straight_trainer, resumed_trainer)]
    assert states[0] == states[1]
    for k, v in straight.state_dict().items():
        torch.testing.assert_close(v, resumed.state_dict()[k], rtol=0, atol=0, msg=k)


def test_the_epochs_last_batch_logs_its_train_metrics_when_nothing_watches_them(feature_dir, tmp_path):
    """An epoch shorter than log_every_n_steps: the last batch logs train/loss and the task losses for the
    progress bar and a user's callback (the test above has a ModelCheckpoint watching train/loss, which makes
    every step log, so the last-batch rule was never reached; a review's mutation)."""
    dm = FeatureDataModule(str(feature_dir), batch_size=256, seed=0)
    trainer = L.Trainer(max_epochs=1, logger=False, limit_train_batches=3, log_every_n_steps=50,
                        enable_checkpointing=False, default_root_dir=tmp_path, **FAST)
    trainer.fit(module_for(dm), dm)
    assert {"train/loss", "train/click/loss"} <= set(trainer.callback_metrics)


PLE = {"class_path": "mmoe_rec.models.ple.PLE",
       "init_args": {"embedding_dim": 4, "num_shared_experts": 2, "num_task_experts": 1, "num_levels": 2,
                     "expert_hidden": [16], "tower_hidden": [8]}}
DEEP_MMOE = {"class_path": "mmoe_rec.models.mmoe.MMoE",
             "init_args": {"embedding_dim": 4, "num_experts": 4, "expert_hidden": [16, 8], "tower_hidden": [8]}}


@pytest.mark.parametrize("model", [DEEP_MMOE, PLE, SPARSE], ids=["mmoe", "ple", "sparse"])
def test_bf16_mixed_precision_trains_the_models_as_float32_does(feature_dir, tmp_path, model, monkeypatch):
    """precision "bf16-mixed" (CPU autocast to bfloat16): the models learn as in float32, the parameters stay
    float32, and dense ReLU experts run the hand-written path in bfloat16 (its products as autocast makes them)."""
    from mmoe_rec.nn import experts as experts_module

    dtypes = []
    real = experts_module.relu_experts
    monkeypatch.setattr(experts_module, "relu_experts", lambda x, *a: dtypes.append(x.dtype) or real(x, *a))
    aucs = {}
    for precision in ("32-true", "bf16-mixed"):
        L.seed_everything(0)
        dm = FeatureDataModule(str(feature_dir), batch_size=128, seed=0)
        module = module_for(dm, model)
        trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, precision=precision,
                            default_root_dir=tmp_path, **FAST)
        trainer.fit(module, dm)
        aucs[precision] = trainer.callback_metrics["val/click/auc"].item()
        assert all(p.dtype == torch.float32 for p in module.parameters())
    assert aucs["bf16-mixed"] > 0.7 and aucs["bf16-mixed"] == pytest.approx(aucs["32-true"], abs=0.03)
    if model is not SPARSE:  # the sparse model's experts take the routed path
        assert torch.bfloat16 in dtypes and torch.float32 in dtypes


def _train_in(feature_dir, tmp, precision, max_epochs, ckpt_path=None, callbacks=(), model=SPARSE):
    L.seed_everything(0)
    dm = FeatureDataModule(str(feature_dir), batch_size=96, seed=3, shuffle_buffer=256)
    module = module_for(dm, model)
    trainer = L.Trainer(max_epochs=max_epochs, logger=False, limit_val_batches=0, precision=precision,
                        callbacks=list(callbacks), default_root_dir=tmp, **FAST)
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return trainer, module, dm


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true", "64-true"])
def test_a_reduced_or_double_precision_fit_resumes_from_its_checkpoint_exactly(feature_dir, tmp_path, precision):
    """A fit in each precision the README offers resumes from its end-of-epoch checkpoint as a straight run goes on,
    bitwise, in the precision it trained in (under 64-true Lightning restores the weights before it casts the
    module: loaded into the float32 module they were rounded to float32, then cast back), and predicts float32
    scores."""
    straight_trainer, straight, dm = _train_in(feature_dir, tmp_path / "a", precision, 2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "b", save_last=True)
    _train_in(feature_dir, tmp_path / "b", precision, 1, callbacks=[ckpt])
    resumed_trainer, resumed, _ = _train_in(feature_dir, tmp_path / "c", precision, 2, ckpt_path=ckpt.last_model_path)
    assert resumed_trainer.global_step == straight_trainer.global_step
    a, b = straight.state_dict(), resumed.state_dict()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    predictions = straight_trainer.predict(straight, dm.test_dataloader())
    scores = [v for p in predictions for k, v in p.items() if k.startswith("score_")]
    assert scores and all(s.dtype == torch.float32 and torch.isfinite(s).all() for s in scores)



def _same_nan(straight, resumed, after):
    """test_fit._same with NaN equal to NaN in the state (DWA's history holds NaN before its second epoch; torch.equal
    calls NaN unequal)."""
    (t1, m1, l1), (t2, m2, l2) = straight, resumed
    assert t1.global_step == t2.global_step
    a, b = m1.state_dict(), m2.state_dict()
    diff = [k for k in a if not torch.equal(torch.nan_to_num(a[k].double(), nan=7.5),
                                            torch.nan_to_num(b[k].double(), nan=7.5))]
    assert not diff, diff
    want, got = _logged_after(l1, after), _logged_after(l2, after)
    assert {s: sorted(m) for s, m in got.items()} == {s: sorted(m) for s, m in want.items()}
    bad = [(s, k, v, got[s].get(k)) for s, ms in want.items() for k, v in ms.items()
           if k.startswith(("train/", "val/")) and got[s].get(k) != v]
    assert not bad, bad[:10]


# 21 batches an epoch. A checkpoint at epoch 0's end, resumed with max_steps into epoch 1 (validation on: 2 batches).
# "epoch_end": ModelCheckpoint at the train epoch's end; "max_steps_21": a fit stopped by max_steps exactly at the
# epoch's end, its save_last (then extended by steps); "every21": every_n_train_steps at the epoch's last batch;
# "sigterm_last": SIGTERM at the epoch's last batch; "val_end": saved at the validation's end.
@pytest.mark.parametrize("how, accumulate, max_epochs", [
    ("epoch_end", 1, 2), ("epoch_end", 1, 3), ("max_steps_21", 1, 3), ("epoch_end", 4, 3), ("epoch_end", 1, -1),
    ("every21", 1, 3), ("sigterm_last", 1, 3), ("val_end", 1, 3)])
@pytest.mark.parametrize("weighting", ["dwa"])  # its history is by epoch
def test_an_epoch_end_checkpoint_resumed_with_max_steps_logs_at_the_straight_runs_steps(feature_dir, tmp_path, how,
                                                                                        accumulate, max_epochs,
                                                                                        weighting):
    """After close_finished_epoch Lightning's epoch loop went on restarting (max_steps forces it) at
    RESTARTED_ON_LAST: with validation on, its first advance of the next epoch returned at once (`_skip_next_val`)
    and on_advance_end counted a step (`_batches_that_stepped += 1`): the weights were the straight run's, but every
    metric after the resume was logged one step late (val/loss of step 41 at 42, train/ at 26, 29, ... instead of
    23, 26, ...). The module starts that epoch as a new one. Before close_finished_epoch, Lightning restarted inside
    the finished epoch with max_steps: it ran its end again and counted it twice (max_epochs 2: the resume trained
    nothing and exited 0)."""
    kw = dict(weighting=weighting, lr_scheduler=WARMUP, grad_similarity_every=5,
              trainer_kw={"limit_val_batches": 2, "accumulate_grad_batches": accumulate})
    target = 45 if accumulate == 1 else 15
    straight = _logged_fit(feature_dir, tmp_path / "a", max_epochs, max_steps=target, **kw)
    b = tmp_path / "b"
    if how == "every21":
        _logged_fit(feature_dir, b, max_epochs, max_steps=30, callbacks=[
            ModelCheckpoint(dirpath=b, every_n_train_steps=21, save_top_k=-1, filename="{step}")], **kw)
    elif how == "sigterm_last":
        with pytest.raises(SIGTERMException):
            _logged_fit(feature_dir, b, max_epochs, callbacks=[_SigtermAt(0, 20), OnExceptionCheckpoint(b)], **kw)
    elif how == "max_steps_21":
        _logged_fit(feature_dir, b, max_epochs, max_steps=21,
                    callbacks=[ModelCheckpoint(dirpath=b, save_last=True, filename="{step}")], **kw)
        for p in b.glob("step*.ckpt"):
            p.unlink()
    elif how == "val_end":
        _logged_fit(feature_dir, b, 1, callbacks=[ModelCheckpoint(dirpath=b, monitor="val/loss", filename="{step}",
                                                                  save_on_train_epoch_end=False)], **kw)
    else:
        _logged_fit(feature_dir, b, 1, callbacks=[ModelCheckpoint(dirpath=b, filename="{step}")], **kw)
    (path,) = b.glob("*.ckpt")
    at = torch.load(path, map_location="cpu", weights_only=False)["global_step"]
    resumed = _logged_fit(feature_dir, tmp_path / "c", max_epochs, ckpt_path=path, max_steps=target, **kw)
    _same_nan(straight, resumed, at)


class _FailsInHook(L.Callback):
    """Fails batch `batch` of epoch `epoch` in a hook after its training_step returned."""

    def __init__(self, hook, epoch, batch):
        self.hook, self.epoch, self.batch = hook, epoch, batch

    def _fail(self, trainer, hook):
        if hook == self.hook and (trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_idx) == (self.epoch,
                                                                                                    self.batch):
            raise RuntimeError("the fit fails here")

    def on_before_backward(self, trainer, pl_module, loss):
        self._fail(trainer, "before_backward")

    def on_after_backward(self, trainer, pl_module):
        self._fail(trainer, "after_backward")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._fail(trainer, "before_optimizer_step")


@pytest.mark.parametrize("hook, clip", [("before_backward", None), ("after_backward", None),
                                        ("before_optimizer_step", 0.5)])
def test_a_batch_failing_after_its_training_step_is_not_counted_twice_in_the_epoch(feature_dir, tmp_path, hook,
                                                                                    clip):
    """The checkpoint written as batch 5 of epoch 1 fails after its training_step (its backward, the optimizer step,
    under gradient clipping) held the epoch's running totals with that batch in them (batches 6, rows 576), and the
    resume replays it: train/rows_seen 2096 for epoch 1, DWA's epoch mean off, and the weights differed from then
    on. It holds the totals from before the batch."""
    tk = {"gradient_clip_val": clip} if clip else {}
    _stop_and_resume(feature_dir, tmp_path, _FailsInHook(hook, 1, 5), weighting="dwa", trainer_kw=tk)


@pytest.mark.parametrize("batch", [0, 5])
def test_a_batch_failing_after_a_last_batch_resume_saves_its_own_epochs_totals_and_resumes_as_the_straight_fit(
        feature_dir, tmp_path, batch):
    """Resumed from a checkpoint written on an epoch's last batch (before its end), the next epoch's first batch is
    where the module closes that epoch's totals: its snapshot was taken before, so a checkpoint written as that
    batch failed after its training step held the closed epoch's totals under the new epoch (rows_seen 4000 of
    2000, DWA's epoch mean off). Lightning did not count that next epoch started: every checkpoint of the resumed
    fit showed a finished epoch, which Lightning does not restart. Resumed from one written as batch 0 failed, the
    weights were the straight fit's but every metric was logged a step early (val/ and train/rows_seen at 40 and
    61, train/ of the epochs' last batches missing); from one written as batch 5 failed, the weights differed."""
    kw = dict(weighting="dwa", monitor=False)
    straight = _logged_fit(feature_dir, tmp_path / "a", 3, **kw)
    b, c = tmp_path / "b", tmp_path / "c"
    _logged_fit(feature_dir, b, 3, callbacks=[ModelCheckpoint(dirpath=b, every_n_train_steps=21, save_top_k=-1)],
                max_steps=21, **kw)  # 21 batches an epoch: written on epoch 0's last batch
    (first,) = b.glob("*.ckpt")
    with pytest.raises(RuntimeError, match="fails here"):
        _logged_fit(feature_dir, c, 3, ckpt_path=first, callbacks=[_FailsInHook("before_backward", 1, batch),
                                                                   OnExceptionCheckpoint(c)], **kw)
    (failed,) = c.glob("*.ckpt")
    saved = torch.load(failed, map_location="cpu", weights_only=False)
    totals = saved["mmoe_rec_epoch_totals"]
    assert (totals["epoch"], totals["batches"], totals["rows"]) == (1, batch, batch * 96)
    resumed = _logged_fit(feature_dir, tmp_path / "d", 3, ckpt_path=failed, **kw)
    _same_nan(straight, resumed, saved["global_step"])


@pytest.mark.parametrize("evaluate", ["validate", "test"])
def test_a_checkpoint_saved_after_a_cut_fit_and_an_evaluation_still_resumes_inside_the_cut_epoch(
        feature_dir, tmp_path, evaluate):
    """fit (max_steps cut mid-epoch) -> trainer.validate / trainer.test -> trainer.save_checkpoint: the evaluation
    changes trainer.state.fn, but the checkpoint is still the one of the cut epoch: it must hold the same loop
    progress and data position as save_last's at the cut, or a fit resumed from it skips the rest of the epoch."""
    last = ModelCheckpoint(dirpath=tmp_path / "b", save_last=True)
    trainer, module = _train(feature_dir, tmp_path / "b", 3, callbacks=[last], max_steps=30)
    dm = trainer.datamodule
    getattr(trainer, evaluate)(module, datamodule=dm, verbose=False)
    after = tmp_path / "b" / "after.ckpt"
    trainer.save_checkpoint(after)
    _saved_as_at_the_cut(after, last.last_model_path)


@pytest.mark.parametrize("model", ["mmoe", "loss_free"])
def test_a_checkpoint_saved_after_a_cut_fit_with_accumulation_resumes_as_a_straight_run(feature_dir, tmp_path, model):
    """As the test above, with gradient accumulation (2 batches a step: max_steps=15 cuts epoch 1 after 9 of its
    21 batches), and with the loss-free balancer, whose pending loads are snapshotted at each batch's start."""
    kw = {} if model == "mmoe" else {"model": NOISY_LOSS_FREE}
    straight_trainer, straight = _train(feature_dir, tmp_path / "a", 3, accumulate=2, **kw)
    last = ModelCheckpoint(dirpath=tmp_path / "b", save_last=True)
    cut_trainer, _ = _train(feature_dir, tmp_path / "b", 3, callbacks=[last], max_steps=15, accumulate=2, **kw)
    after = tmp_path / "b" / "after.ckpt"
    cut_trainer.save_checkpoint(after)
    saved, in_fit = (torch.load(p, map_location="cpu", weights_only=False) for p in (after, last.last_model_path))
    assert saved["epoch"] == in_fit["epoch"] == 1
    assert saved["loops"]["fit_loop"]["epoch_progress"] == in_fit["loops"]["fit_loop"]["epoch_progress"]
    assert _datamodule_state(saved) == _datamodule_state(in_fit)
    resumed_trainer, resumed = _train(feature_dir, tmp_path / "c", 3, ckpt_path=after, accumulate=2, **kw)
    assert resumed_trainer.global_step == straight_trainer.global_step
    a, b = straight.state_dict(), resumed.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
