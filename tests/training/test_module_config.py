"""MultiTaskModule's configuration checks and outputs: aux-loss coefficient names, Lightning's scheduler keys,
predictions in float32 under bf16."""
from __future__ import annotations

import copy

import lightning as L
import pytest
import torch

from conftest import MMOE, SPARSE
from mmoe_rec.data.datamodule import FeatureDataModule
from mmoe_rec.models.mmoe import MMoE
from mmoe_rec.models.output import ModelOutput
from mmoe_rec.training.module import DEFAULT_AUX_COEFS, MultiTaskModule

FAST = dict(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, logger=False, enable_checkpointing=False)


def test_a_misspelt_aux_loss_coefficient_is_refused(feature_dir):
    """`laod: 3.0` used to be kept beside `load: 0.01` and ignored: the load loss stayed at 0.01, silently."""
    spec = FeatureDataModule(str(feature_dir), batch_size=64).spec
    with pytest.raises(ValueError, match="unknown aux loss 'laod'"):
        MultiTaskModule(model=copy.deepcopy(SPARSE), feature_spec=spec,
                        aux_loss_coefs={**DEFAULT_AUX_COEFS, "laod": 3.0})
    MultiTaskModule(model=copy.deepcopy(MMOE), feature_spec=spec, aux_loss_coefs=dict(DEFAULT_AUX_COEFS))  # all four


@pytest.mark.parametrize("kwargs, match", [
    (dict(task_weights={"click": -1.0}), r"task_weights must be finite and >= 0.*'click': -1.0"),  # trained up
    (dict(task_weights={"click": float("nan")}), "task_weights must be finite"),
    (dict(task_weights={"click": float("inf")}), "task_weights must be finite"),
    (dict(task_weights={"click": 0.0, "convert": 0.0}), "all 0"),
    (dict(aux_loss_coefs={"load": -0.01}), r"aux_loss_coefs must be finite and >= 0.*'load': -0.01"),
    (dict(optimizer={"class_path": "torch.optim.Adam", "init_args": {"lr": -0.1}}),
     r"optimizer torch.optim.Adam with \{'lr': -0.1\}: Invalid learning rate"),
    (dict(optimizer={"class_path": "torch.optim.Adam", "init_args": {"lrr": 0.1}}), "unexpected keyword.*'lrr'"),
    (dict(lr_scheduler={"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"gama": 0.5}}),
     "lr_scheduler torch.optim.lr_scheduler.StepLR"),
])
def test_bad_weights_coefficients_and_optimizer_settings_fail_when_the_module_is_made(feature_dir, kwargs, match):
    # they were accepted (weights, coefficients) or found only in configure_optimizers, after the trainer, the data
    # and the MLflow run were set up, in torch's words ("Invalid learning rate: -0.1", naming no setting)
    spec = FeatureDataModule(str(feature_dir), batch_size=64).spec
    with pytest.raises(ValueError, match=match):
        MultiTaskModule(model=copy.deepcopy(MMOE), feature_spec=spec, **kwargs)
    MultiTaskModule(model=copy.deepcopy(MMOE), feature_spec=spec, task_weights={"click": 0.0, "convert": 2.0},
                    optimizer={"class_path": "torch.optim.Adam", "init_args": {"lr": 0.1}},
                    lr_scheduler={"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 1}})


def test_a_learning_rate_of_zero_without_a_scheduler_is_a_warning(feature_dir):
    """lr 0 trained a whole fit without changing a weight, without a word (a scheduler such as OneCycleLR sets its
    own rate: no warning then)."""
    spec = FeatureDataModule(str(feature_dir), batch_size=64).spec
    zero = {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.0}}
    with pytest.warns(UserWarning, match="learning rate is 0 and no lr_scheduler sets another"):
        MultiTaskModule(model=copy.deepcopy(MMOE), feature_spec=spec, optimizer=zero)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MultiTaskModule(model=copy.deepcopy(MMOE), feature_spec=spec, optimizer=zero, lr_scheduler={
            "class_path": "torch.optim.lr_scheduler.OneCycleLR", "interval": "step",
            "init_args": {"max_lr": 0.01, "total_steps": 100}})


class MMoEWithAux(MMoE):
    """A user's model with an aux loss of its own, named in aux_loss_names()."""

    def aux_loss_names(self) -> tuple[str, ...]:
        return ("gate_l2",)

    def forward_dense(self, x: torch.Tensor) -> ModelOutput:
        out = super().forward_dense(x)
        out.aux["gate_l2"] = self.gates.weight.pow(2).sum()
        return out


def test_a_models_own_aux_loss_takes_a_coefficient(feature_dir):
    spec = FeatureDataModule(str(feature_dir), batch_size=64).spec
    model = {"class_path": f"{__name__}.MMoEWithAux", "init_args": MMOE["init_args"]}
    module = MultiTaskModule(model=model, feature_spec=spec, aux_loss_coefs={"gate_l2": 0.5})
    aux = {"gate_l2": torch.tensor(2.0)}
    assert float(module.aux_loss(aux)) == pytest.approx(1.0)
    # without one: refused when the module is made (it was a KeyError at the first training step)
    with pytest.raises(ValueError, match="no coefficient for the aux loss\\(es\\) 'gate_l2' this model computes"):
        MultiTaskModule(model=model, feature_spec=spec)
    # and the balance losses a sparse model is set to compute: given some coefficients, not router_z's
    sparse = {"class_path": "mmoe_rec.models.sparse_mmoe.SparseMMoE",
              "init_args": {"embedding_dim": 4, "num_experts": 4, "k": 2, "expert_hidden": [16], "tower_hidden": [8]}}
    with pytest.raises(ValueError, match="no coefficient for the aux loss\\(es\\) 'router_z' this model computes"):
        MultiTaskModule(model=sparse, feature_spec=spec, aux_loss_coefs={"load": 0.02, "importance": 0.02})


def test_lightnings_scheduler_keys_name_and_strict_reach_lightning(feature_dir):
    """`name` used to go into StepLR's arguments: TypeError at fit time."""
    L.seed_everything(0)
    dm = FeatureDataModule(str(feature_dir), batch_size=128, seed=0)
    sched = {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 1, "gamma": 0.5},
             "interval": "step", "name": "lr-step", "strict": True}
    module = MultiTaskModule(model=copy.deepcopy(MMOE), feature_spec=dm.spec, lr_scheduler=sched,
                             optimizer={"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}})
    got = module.configure_optimizers()["lr_scheduler"]
    assert got["name"] == "lr-step" and got["strict"] is True and got["interval"] == "step"
    trainer = L.Trainer(max_steps=3, limit_val_batches=0, **FAST)
    trainer.fit(module, dm)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 3)
    assert trainer.lr_scheduler_configs[0].name == "lr-step"


def test_predictions_under_bf16_are_float32_probabilities(feature_dir):
    """A bf16 sigmoid wrote every logit above ~6.2 as exactly 1.0 and tied close scores."""
    dm = FeatureDataModule(str(feature_dir), batch_size=64, seed=0)
    dm.setup("predict")
    module = MultiTaskModule(model=copy.deepcopy(MMOE), feature_spec=dm.spec).eval()
    with torch.no_grad():  # large logits: the towers' output bias
        for tower in module.model.towers.values():
            list(tower.parameters())[-1].fill_(7.0)
    batch = next(iter(dm.predict_dataloader()))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = module.model(batch).logits
        out = module.predict_step(batch, 0)
    for t in module.tasks:
        assert logits[t].dtype == torch.float32  # the output layer computes in float32 (nn.towers)
        assert len(torch.unique(logits[t])) > 0.9 * len(logits[t])  # bf16 logits near 7 tied in steps of 1/32
        score = out[f"score_{t}"]
        assert score.dtype == torch.float32
        torch.testing.assert_close(score, torch.sigmoid(logits[t].float()))
        assert (score < 1.0).all()


class _StepLoss(L.Callback):
    """The loss training_step returned, the batch and the model's output, at each step."""

    def __init__(self) -> None:
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append((outputs["loss"].detach(), batch, pl_module.last_output))


def test_the_training_loss_is_the_weighted_task_losses_plus_the_aux_losses_times_their_coefficients(make_feature_dir):
    """Task weights, sample weights and the aux losses' coefficients all reach the loss that is trained."""
    from mmoe_rec.training.losses import task_losses

    L.seed_everything(0)
    feature_dir = make_feature_dir("weighted_aux", with_weight=True, rows={"train": 300, "valid": 100, "test": 100})
    dm = FeatureDataModule(str(feature_dir), batch_size=64, seed=0)
    coefs = {"importance": 0.3, "load": 0.2, "switch": 0.0, "router_z": 0.05}
    module = MultiTaskModule(model=copy.deepcopy(SPARSE), feature_spec=dm.spec, aux_loss_coefs=coefs,
                             task_weights={"click": 2.0, "convert": 0.5},
                             optimizer={"class_path": "torch.optim.SGD", "init_args": {"lr": 0.0}},
                             lr_scheduler={"class_path": "torch.optim.lr_scheduler.ConstantLR"})
    probe = _StepLoss()
    L.Trainer(max_steps=1, limit_val_batches=0, callbacks=[probe], **FAST).fit(module, dm)
    loss, batch, out = probe.seen[0]
    assert out.aux and batch.weights is not None  # the sparse model returns its balance losses
    assert not torch.allclose(batch.weights, batch.weights[0])  # weights that change the mean
    losses = task_losses(out.logits, batch.labels, module.spec, module.tasks, batch.weights)
    want = 2.0 * losses["click"] + 0.5 * losses["convert"] + sum(coefs[k] * v for k, v in out.aux.items())
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_monitored_metrics_say_which_way_is_better():
    from mmoe_rec.training.module import better_mode

    assert better_mode("val/click/auc") == "max"
    assert better_mode("val/loss") == "min" and better_mode("val/click/logloss") == "min"
    assert better_mode("val/dwell/mse") == "min" and better_mode("train/gradnorm_loss") == "min"
    assert better_mode("train/click/weight") is None


def test_split_metrics_weight_their_loss_as_the_static_task_weights_and_the_scheduler_steps_per_epoch(feature_dir):
    spec = FeatureDataModule(str(feature_dir), batch_size=64).spec
    module = MultiTaskModule(model=copy.deepcopy(MMOE), feature_spec=spec, task_weights={"click": 3.0},
                             lr_scheduler={"class_path": "torch.optim.lr_scheduler.StepLR",
                                           "init_args": {"step_size": 1}})
    assert module.val_metrics.task_weights == module.test_metrics.task_weights == {"click": 3.0, "convert": 1.0}
    assert module.configure_optimizers()["lr_scheduler"]["interval"] == "epoch"  # Lightning's default
    with pytest.raises(ValueError, match="grad_similarity_every must be >= 0"):
        MultiTaskModule(model=copy.deepcopy(MMOE), feature_spec=spec, grad_similarity_every=-1)


def test_loading_a_checkpoint_of_another_spec_version_is_refused(feature_dir):
    spec = FeatureDataModule(str(feature_dir), batch_size=64).spec
    module = MultiTaskModule(model=copy.deepcopy(MMOE), feature_spec=spec)
    other = {**spec.to_dict(), "version": "0123456789abcdef"}
    with pytest.raises(ValueError, match="trained on features of spec version 0123456789abcdef"):
        module.on_load_checkpoint({"hyper_parameters": {"feature_spec": other}})
    module.on_load_checkpoint({"hyper_parameters": {"feature_spec": spec.to_dict()}})  # its own: loads


@pytest.mark.parametrize("extra, match", [
    ({"interval": "epcoh"}, r"lr_scheduler.*interval.*'epcoh'"),  # Lightning refused it in configure_optimizers
    ({"frequency": 0}, r"lr_scheduler.*frequency"),  # ZeroDivisionError after the first training batch
])
def test_lightnings_scheduler_keys_are_checked_when_the_module_is_made(feature_dir, extra, match):
    """A misspelt interval or a frequency of 0 was found only once the trainer, the data and the MLflow run were
    made (a FAILED run; frequency 0 a raw ZeroDivisionError after the first batch)."""
    spec = FeatureDataModule(str(feature_dir), batch_size=64).spec
    sched = {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 1}, **extra}
    with pytest.raises(ValueError, match=match):
        MultiTaskModule(model=copy.deepcopy(MMOE), feature_spec=spec, lr_scheduler=sched)


def test_a_plateau_scheduler_without_a_monitor_is_refused_when_the_module_is_made(feature_dir):
    spec = FeatureDataModule(str(feature_dir), batch_size=64).spec
    with pytest.raises(ValueError, match=r"lr_scheduler.*monitor"):
        MultiTaskModule(model=copy.deepcopy(MMOE), feature_spec=spec,
                        lr_scheduler={"class_path": "torch.optim.lr_scheduler.ReduceLROnPlateau"})
