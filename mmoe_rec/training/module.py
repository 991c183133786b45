"""MultiTaskModule: the LightningModule that trains any `MultiTaskModel`.

It owns what the models do not: per-task losses, loss weighting across tasks, the models' auxiliary losses with
their coefficients, the optimizer / scheduler, metrics, and the task-gradient similarity probe.

The model is injected: `model` is either a callable `feature_spec -> MultiTaskModel` (what jsonargparse makes of
`class_path` + `init_args` in a LightningCLI config) or the plain dict `{"class_path": ..., "init_args": {...}}`.
The FeatureSpec comes from the data (the CLI links `data.spec` into `feature_spec`). Both are saved as plain
hyper-parameters (class path, init args, spec dict), so `MultiTaskModule.load_from_checkpoint(path)` rebuilds
everything without the CLI or the data.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mmoe_rec.data.batch import Batch
from mmoe_rec.features.spec import FeatureSpec
from mmoe_rec.models.base import MultiTaskModel
from mmoe_rec.models.factory import build_model, class_path_of, import_class
from mmoe_rec.models.output import ModelOutput
from mmoe_rec.nn.routing.loss_free import LossFreeBias
from mmoe_rec.training import hand_back, on_exception, sigterm
from mmoe_rec.training.checkpoint_io import use_atomic_checkpoints
from mmoe_rec.training.epochs import (checkpoint_epoch, close_finished_epoch, count_epoch_after_last_batch,
                                      epoch_cut_short, reopen_cut_epoch, uncount_unprocessed_batch)
from mmoe_rec.training.losses import rank_loss_scale, step_weight, task_losses
from mmoe_rec.training.metrics import TaskMetrics
from mmoe_rec.training.monitoring import gradient_cosine, pair_scalars
from mmoe_rec.training.sharding import ShardedEmbeddingStrategy
from mmoe_rec.training.weighting import FixedWeighting, GradNorm, make_weighting

EPOCH_TOTALS_KEY = "mmoe_rec_epoch_totals"  # in a checkpoint: the running epoch's totals (see on_save_checkpoint)
RNG_KEY = "mmoe_rec_rng_states"  # in a checkpoint: every rank's torch generator states (see _gather_rng_states)
GRAD_PROBE_KEY = "mmoe_rec_grad_probe"  # in a checkpoint: the running epoch's last gradient probe (names, matrix, step)
PLATEAU_KEY = "mmoe_rec_plateau_step"  # in a checkpoint: a ReduceLROnPlateau step owed at its point (see _plateau_owed)
# in a checkpoint written inside a gradient-accumulation window: every rank's gradients summed so far in it (and
# the loss-free balancers' loads counted so far in it)
ACCUMULATED_GRADS_KEY = "mmoe_rec_accumulated_grads"
DEFAULT_AUX_COEFS = {"importance": 1e-2, "load": 1e-2, "switch": 1e-2, "router_z": 1e-3}
# fused: one kernel for all parameters instead of ~10 small ops per tensor (3.2 -> 0.6 ms/step on census)
DEFAULT_OPTIMIZER = {"class_path": "torch.optim.Adam", "init_args": {"lr": 1e-3, "fused": True}}


def model_config(model: Any) -> dict[str, Any]:
    """{"class_path", "init_args"} of an injected model (dict, class, or jsonargparse's partial of a class)."""
    if isinstance(model, dict):
        if "class_path" not in model:
            raise ValueError(f"model config needs a class_path, got keys {sorted(model)}")
        return {"class_path": model["class_path"], "init_args": dict(model.get("init_args") or {})}
    if isinstance(model, type):
        return {"class_path": f"{model.__module__}.{model.__qualname__}", "init_args": {}}
    if isinstance(model, functools.partial):
        classes = [a for a in model.args if isinstance(a, type) and issubclass(a, MultiTaskModel)]
        func = model.func if isinstance(model.func, type) else None
        cls = func or (classes[-1] if classes else None)
        if cls is not None:
            return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(model.keywords)}
    raise TypeError(f"model must be a class path config or a MultiTaskModel class, got {model!r}")


SCHEDULER_KEYS = ("interval", "frequency", "monitor", "name", "strict")  # Lightning's, beside the class and args


def component_config(config: dict[str, Any], what: str, own_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """{"class_path", "init_args", *own_keys} of an optimizer / scheduler, any other key moved into init_args.

    jsonargparse turns `--model.init_args.optimizer.init_args.lr 0.01` (and `...optimizer.lr 0.01`) into a key
    "lr" beside "class_path" in this dict; read as it comes, the override would be silently ignored."""
    if not isinstance(config, dict) or "class_path" not in config:
        raise ValueError(f"{what} must be {{'class_path': ..., 'init_args': {{...}}}}, got {config!r}")
    fixed = ("class_path", "init_args", *own_keys)
    init_args = {**dict(config.get("init_args") or {}), **{k: v for k, v in config.items() if k not in fixed}}
    return {**{k: config[k] for k in fixed if k in config and k != "init_args"}, "init_args": init_args}


def _instantiate(config: dict[str, Any], *args: Any) -> Any:
    if not isinstance(config, dict) or "class_path" not in config:
        raise ValueError(f"expected {{'class_path': ..., 'init_args': {{...}}}}, got {config!r}")
    return import_class(config["class_path"])(*args, **dict(config.get("init_args") or {}))


def _try_instantiate(key: str, config: dict[str, Any], *args: Any) -> Any:
    """`_instantiate` of a class_path + init_args config, its ValueError / TypeError prefixed with the setting."""
    init_args = dict(config.get("init_args") or {})
    try:
        return _instantiate({"class_path": config["class_path"], "init_args": init_args}, *args)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{key} {config['class_path']} with {init_args}: {e}") from None


def _check_scheduler_keys(config: dict[str, Any], scheduler: Any) -> None:
    """Lightning's own scheduler keys, checked when the module is made: Lightning refused a misspelt interval or a
    plateau scheduler without a monitor only in configure_optimizers (after the trainer, the data and the MLflow
    run were made), and a frequency of 0 failed with a ZeroDivisionError after the first training batch."""
    where = f"lr_scheduler {config['class_path']}"
    interval = config.get("interval", "epoch")
    if interval not in ("step", "epoch"):
        raise ValueError(f"{where}: interval must be 'step' or 'epoch', got {interval!r}")
    frequency = config.get("frequency", 1)
    if isinstance(frequency, bool) or not isinstance(frequency, int) or frequency < 1:
        raise ValueError(f"{where}: frequency must be an integer >= 1 ({interval}s between scheduler steps), got "
                         f"{frequency!r}")
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and not config.get("monitor"):
        raise ValueError(f"{where} steps on a metric: give the one it watches as lr_scheduler.monitor, e.g. "
                         "val/loss (with its init_args.mode: min, or max for an AUC)")


def check_tasks_loaded(model_tasks: list[str], data_tasks: list[str] | None) -> None:
    """Every task of the model is one the data module loads labels for."""
    missing = [t for t in model_tasks if data_tasks is not None and t not in data_tasks]
    if missing:
        raise ValueError(f"model tasks {missing} are not loaded by the data module (data tasks: {data_tasks})")


def better_mode(metric: str) -> str | None:
    """'max' for an AUC, 'min' for a loss, log-loss or MSE (`val/<task>/auc` -> max), None otherwise."""
    last = metric.rsplit("/", 1)[-1]
    if last == "auc":
        return "max"
    return "min" if last in ("logloss", "mse") or last.endswith("loss") else None


def seed_rank_stream(rank: int, world_size: int) -> None:
    """Under DDP, gives ranks 1.. a torch stream of their own, drawn from (the stream's seed, rank): Lightning seeds
    every rank alike, and each rank then drew the same router noise and dropout masks for its own rows. Rank 0 (and
    a 1-process fit) keeps its stream. Called in setup, before Lightning restores a resumed fit's saved states, so
    a resume continues each rank's stream where it stopped."""
    if world_size > 1 and rank > 0:
        seed = np.random.SeedSequence([torch.initial_seed(), rank]).generate_state(1, dtype=np.uint64)[0]
        torch.manual_seed(int(seed))


class BatchStart(NamedTuple):
    """What the batch in flight started from, taken in on_train_batch_start (the last hook before its forward: the
    callbacks' came before, and nothing draws or counts loads between it and the forward). A batch that failed
    after its start and before it was processed has drawn its routing noise and dropout masks, counted its
    balancer loads or added to the epoch's totals, and a resume replays it: a checkpoint written then holds these
    (~5 kB of generator state copied per step: ~3 us, 0.04 % of a census-size step on the CPU)."""
    ready: int  # the batch's total `ready` count: which batch this is of
    rng_cpu: torch.Tensor
    rng_cuda: torch.Tensor | None
    rows: int  # the epoch's running totals
    loss_sum: torch.Tensor | None  # (T,)
    batches: int
    loads: list[torch.Tensor | None]  # each loss-free balancer's pending load (add_load makes a new tensor)


class MultiTaskModule(L.LightningModule):
    """Args:
        model: the model class path and its init args (`feature_spec` is passed by this module).
        feature_spec: the data's FeatureSpec (linked from the data module by the CLI; a dict in checkpoints).
        task_weights: static per-task weights w_t (default 1 each); multiply whatever `weighting` does.
        weighting: "fixed", "uncertainty" (Kendall et al. 2018), "dwa" (dynamic weight average, Liu et al. 2019)
            or "gradnorm" (Chen et al. 2018, on `model.last_shared_layer()`).
        dwa_temperature: T of dynamic weight average.
        gradnorm_alpha: GradNorm's asymmetry alpha (0: equal gradient norms; larger: slower tasks pulled harder).
        aux_loss_coefs: coefficient of each auxiliary loss the model returns (`ModelOutput.aux`); a model aux
            loss with no coefficient here is an error (set it to 0 to ignore it), and so is a coefficient for a
            name that is neither a balance loss nor in `model.aux_loss_names()`.
        optimizer: {"class_path", "init_args"} of a torch optimizer.
        lr_scheduler: optional {"class_path", "init_args", "interval", "frequency", "monitor", "name",
            "strict"} (the last four: Lightning's scheduler keys).
        grad_similarity_every: every N training steps, the cosine similarity of the tasks' loss gradients on
            `model.shared_parameters()` is logged under `relatedness/grad_cos/...` (0 = never).
    """

    def __init__(
        self,
        model: Callable[[FeatureSpec], MultiTaskModel],
        feature_spec: FeatureSpec | dict | None = None,
        task_weights: dict[str, float] | None = None,
        weighting: str = "fixed",
        dwa_temperature: float = 2.0,
        gradnorm_alpha: float = 1.5,
        aux_loss_coefs: dict[str, float] | None = None,
        optimizer: dict[str, Any] | None = None,
        lr_scheduler: dict[str, Any] | None = None,
        grad_similarity_every: int = 0,
    ) -> None:
        super().__init__()
        hand_back.install()  # a ddp_spawn / ddp_fork fit leaves no empty folder in $TMPDIR
        on_exception.install()  # a rank that fails alone writes no on-exception checkpoint (API users too)
        if feature_spec is None:
            raise ValueError("MultiTaskModule needs the data's feature_spec (the CLI links it from data.spec)")
        spec = feature_spec if isinstance(feature_spec, FeatureSpec) else FeatureSpec.from_dict(feature_spec)
        cfg = model_config(model)
        self.model: MultiTaskModel = build_model(cfg["class_path"], spec, cfg["init_args"])
        self.model_init_args = cfg["init_args"]  # what registry.package saves next to the weights
        self.spec = spec
        self.tasks = list(self.model.tasks)
        self.task_types = {t: spec.task(t).type for t in self.tasks}
        self.weighting = make_weighting(weighting, self.tasks, self.task_types, task_weights, dwa_temperature,
                                        gradnorm_alpha)
        if isinstance(self.weighting, GradNorm) and not self.model.last_shared_layer():
            raise ValueError(f"weighting 'gradnorm' needs a shared layer; {type(self.model).__name__} with these "
                             "settings has none (MultiTaskModel.last_shared_layer() is empty)")
        self.aux_coefs = dict(DEFAULT_AUX_COEFS if aux_loss_coefs is None else aux_loss_coefs)
        known = (*DEFAULT_AUX_COEFS, *self.model.aux_loss_names())  # the shared configs list all four for every model
        unknown = sorted(set(self.aux_coefs) - set(known))
        if unknown:  # a misspelt key would leave the loss it meant at its old coefficient, silently
            raise ValueError(f"aux_loss_coefs: unknown aux loss {', '.join(map(repr, unknown))}; known: "
                             f"{', '.join(known)} (a model with aux losses of its own names them in aux_loss_names())")
        uncovered = [name for name in self.model.emitted_aux_losses() if name not in self.aux_coefs]
        if uncovered:  # the first training step would fail on it, after the trainer, data and logger are made
            names = ", ".join(map(repr, uncovered))
            raise ValueError(f"aux_loss_coefs has no coefficient for the aux loss(es) {names} this model computes: "
                             f"give one (0 to leave a loss out); given: {self.aux_coefs}")
        bad = {k: v for k, v in self.aux_coefs.items() if not (math.isfinite(float(v)) and float(v) >= 0)}
        if bad:  # a negative coefficient rewards imbalance
            raise ValueError(f"aux_loss_coefs must be finite and >= 0, got {bad}")
        if optimizer is not None and "class_path" not in optimizer:  # overrides of the default's arguments alone
            given = {k: v for k, v in optimizer.items() if k != "init_args"}
            optimizer = {"class_path": DEFAULT_OPTIMIZER["class_path"], "init_args": {
                **DEFAULT_OPTIMIZER["init_args"], **dict(optimizer.get("init_args") or {}), **given}}
        self.optimizer_config = component_config(optimizer or DEFAULT_OPTIMIZER, "optimizer")
        self.lr_scheduler_config = (component_config(lr_scheduler, "lr_scheduler", SCHEDULER_KEYS)
                                    if lr_scheduler else None)
        self._try_optimizer()
        if grad_similarity_every < 0:
            raise ValueError(f"grad_similarity_every must be >= 0, got {grad_similarity_every}")
        self.grad_similarity_every = grad_similarity_every
        self.val_metrics = TaskMetrics(spec, self.tasks, "val", self.weighting.static)
        self.test_metrics = TaskMetrics(spec, self.tasks, "test", self.weighting.static)
        self.save_hyperparameters({
            "model": {"class_path": class_path_of(self.model), "init_args": cfg["init_args"]},
            "feature_spec": spec.to_dict(),
            "task_weights": task_weights,
            "weighting": weighting,
            "dwa_temperature": dwa_temperature,
            "gradnorm_alpha": gradnorm_alpha,
            "aux_loss_coefs": self.aux_coefs,
            "optimizer": self.optimizer_config,
            "lr_scheduler": self.lr_scheduler_config,
            "grad_similarity_every": grad_similarity_every,
        })
        self.last_output: ModelOutput | None = None  # read by RoutingMonitor and after_optimizer_step
        self.last_grad_cosine: tuple[list[str], torch.Tensor] | None = None
        self.last_grad_cosine_step: int | None = None
        # (names, matrix, step) of the last probe of the epoch a resumed checkpoint was written in (RoutingMonitor)
        self.checkpoint_grad_probe: tuple[list[str], torch.Tensor, int | None] | None = None
        self._epoch_loss_sum: torch.Tensor | None = None  # (T,) on the model's device: no host sync per step
        self._epoch_batches = 0
        self._epoch_rows = 0
        self._grad_similarity_step: int | None = None  # the last step the gradient probe ran at
        self._sharded_probe_said = False  # the sharded-embedding probe's warning, once
        self._resumed_epoch: int | None = None  # epoch of the checkpoint a fit resumed from (on_load_checkpoint)
        self._train_metric_watched = False  # a callback or the scheduler watches a train/ metric (setup)
        self._plateau_stepped_at: tuple[str, int] | None = None  # ("epoch", e) / ("step", s) of its last step
        self._plateau_due: dict[str, Any] | None = None  # the step owed at the checkpoint resumed from
        self._grads_due: dict[str, Any] | None = None  # the open accumulation window's gradients resumed from
        self._backward_began = False  # the batch in flight has begun its backward (on_before_backward)
        self._balancers = [(n, m) for n, m in self.named_modules() if isinstance(m, LossFreeBias)]  # (name, module)
        self._batch_start: BatchStart | None = None  # of the batch in flight (on_train_batch_start)
        self._closed_epoch = False  # the checkpoint resumed from had its finished epoch closed (close_finished_epoch)
        # an epoch whose plateau step Lightning skipped (the epoch a fit resumed in): taken at the next epoch's
        # start, or at the fit's end
        self._plateau_deferred: tuple[str, int] | None = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a ddp_spawn rank unpickles its module before its trainer registers its SIGTERM handler, and it runs
        # no CLI that would have installed ours (sigterm.install: the ranks agree on a SIGTERM)
        sigterm.install()
        on_exception.install()
        super().__setstate__(state)

    def forward(self, batch: Batch) -> ModelOutput:
        return self.model(batch)

    def setup(self, stage: str) -> None:
        """The trainer's data module reads features of this module's spec and loads its tasks. The CLI links the
        data's spec into the module; a Trainer of one's own can pair any two: ids would mean other values."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        spec = getattr(datamodule, "spec", None)
        if spec is not None and spec.version != self.spec.version:
            raise ValueError(f"the data module's features have spec version {spec.version}, this module (and any "
                             f"checkpoint it loads) was built for spec version {self.spec.version}: their ids mean "
                             "other values; pass feature_spec=datamodule.spec to a new module, or use the feature "
                             "folder the model was trained on")
        if stage != "predict":  # predict reads no labels
            check_tasks_loaded(self.tasks, getattr(datamodule, "tasks", None))
        if stage == "fit" and self._trainer is not None:
            seed_rank_stream(self.trainer.global_rank, self.trainer.world_size)
            self._train_metric_watched = bool(self._watched_train_metrics())
            use_atomic_checkpoints(self.trainer)  # a full disk leaves the earlier checkpoint, not a truncated one

    def _watched_train_metrics(self) -> list[str]:
        """The `train/...` metrics an EarlyStopping, ModelCheckpoint or the lr scheduler watches: they may look at
        any step (a step-interval ReduceLROnPlateau, a mid-epoch validation's EarlyStopping), so such a metric is
        logged every step, not every log_every_n_steps (it was missing there: the fit failed or a save was
        skipped)."""
        monitors = [getattr(cb, "monitor", None) for cb in self.trainer.callbacks]
        if self.lr_scheduler_config:
            monitors.append(self.lr_scheduler_config.get("monitor"))
        return [m for m in monitors if isinstance(m, str) and m.startswith("train/")]

    def monitorable_metrics(self) -> dict[str, str | None]:
        """The metrics a fit logs through Lightning (what EarlyStopping, ModelCheckpoint and ReduceLROnPlateau can
        watch), each with the mode that means better: "max" (AUC), "min" (losses), None (a weight, a count).
        `experts/...` and `relatedness/...` go to MLflow only, and `test/...` is not logged during a fit."""
        names = {name: better_mode(name) for name in self.val_metrics.names()}
        train = ["train/loss", "train/task_loss", *(f"train/{t}/loss" for t in self.tasks),
                 *(f"train/aux/{name}" for name in self.model.emitted_aux_losses())]
        if isinstance(self.weighting, GradNorm):
            train.append("train/gradnorm_loss")
        names.update((name, "min") for name in train)
        if not isinstance(self.weighting, FixedWeighting):
            names.update((f"train/{t}/weight", None) for t in self.tasks)
        names["train/rows_seen"] = None
        return names

    # --- losses -----------------------------------------------------------------------------------------
    def aux_loss(self, aux: dict[str, torch.Tensor]) -> torch.Tensor | float:
        total = 0.0
        for name, value in aux.items():
            if name not in self.aux_coefs:
                raise KeyError(
                    f"the model returned aux loss {name!r} with no coefficient; set model.init_args.aux_loss_coefs."
                    f"{name} (0 ignores it); coefficients given: {self.aux_coefs}"
                )
            if self.aux_coefs[name]:
                total = total + self.aux_coefs[name] * value
        return total

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        out = self.model(batch)
        losses = task_losses(out.logits, batch.labels, self.spec, self.tasks, batch.weights)
        sum_over_ranks = functools.partial(self.trainer.strategy.reduce, reduce_op="sum")
        total_weight = step_weight(batch.weights, self.trainer.world_size, sum_over_ranks)  # () or None
        if self.trainer.world_size > 1:  # the step's global (weighted) mean under DDP
            scale = rank_loss_scale(batch.weights, batch.batch_size, getattr(batch, "step_rows", None),
                                    self.trainer.world_size, sum_over_ranks, total_weight)
            if not (isinstance(scale, float) and scale == 1.0):
                losses = {t: value * scale for t, value in losses.items()}
        rank_mean = None
        if self.trainer.world_size > 1:  # GradNorm balances the global batch's gradients (weighting.py)
            rank_mean = functools.partial(self.trainer.strategy.reduce, reduce_op="mean")
        task_total = self.weighting(losses, self.model.last_shared_layer, rank_mean)
        if total_weight is not None:
            # a step whose rows all weigh 0 (on every rank) has task losses of 0 but trained the weighting's own
            # parameters (uncertainty's log-variances through their 0.5 s term): no weighting learns from it. The
            # aux losses stay: the routers routed its rows all the same, and their balance counts rows, not weights
            task_total = task_total * (total_weight > 0)
        loss = task_total + self.aux_loss(out.aux)
        self.last_output = out
        bs = batch.batch_size
        self._epoch_rows += bs
        if self._logs_this_step():  # under DDP: means over the ranks (every rank has the same batch count)
            self.log("train/loss", loss, prog_bar=True, batch_size=bs, sync_dist=True)
            self.log("train/task_loss", task_total, batch_size=bs, sync_dist=True)
            for t, value in losses.items():
                self.log(f"train/{t}/loss", value, batch_size=bs, sync_dist=True)
            for name, value in out.aux.items():
                self.log(f"train/aux/{name}", value, batch_size=bs, sync_dist=True)
            if not isinstance(self.weighting, FixedWeighting):
                for t, w in self.weighting.weights().items():
                    self.log(f"train/{t}/weight", w, batch_size=bs)  # the same on every rank
            if isinstance(self.weighting, GradNorm):
                self.log("train/gradnorm_loss", self.weighting.last_gradnorm_loss, batch_size=bs, sync_dist=True)
        step_losses = torch.stack([losses[t].detach().float() for t in self.tasks])  # (T,)
        # (.to: totals restored from a checkpoint arrive on the CPU, before Lightning moves the module to its device)
        self._epoch_loss_sum = (step_losses if self._epoch_loss_sum is None
                                else self._epoch_loss_sum.to(step_losses.device) + step_losses)
        self._epoch_batches += 1
        step = self.global_step
        if (self.grad_similarity_every and step % self.grad_similarity_every == 0 and len(self.tasks) > 1
                and step != self._grad_similarity_step):  # once per optimizer step (gradient accumulation)
            self._grad_similarity_step = step
            self._log_grad_similarity(losses)
        return loss

    def _log_grad_similarity(self, losses: dict[str, torch.Tensor]) -> None:
        """Cosine of the tasks' loss gradients on the shared parameters, logged at this step on rank 0.

        Under DDP each task's gradient is summed over the ranks first (one all-reduce of T x shared-parameter
        floats every `grad_similarity_every` steps): the cosine of the global batch's gradients, not of rank 0's.
        Under the sharded-embedding strategy the ranks hold different table shards (trained inside the backward by
        fbgemm, no gradient to read), so the cosine there covers the dense shared parameters only (experts, shared
        bottom, ...: replicated on every rank), without the embedding tables (said once in a warning)."""
        trainer = self.trainer
        distributed = trainer.world_size > 1
        params = [p for p in self.model.shared_parameters() if p.requires_grad]
        if isinstance(trainer.strategy, ShardedEmbeddingStrategy):
            tables = {id(p) for p in self.model.front.parameters()}
            params = [p for p in params if id(p) not in tables]
            if not self._sharded_probe_said:
                self._sharded_probe_said = True
                rank_zero_warn("under the sharded-embedding strategy the loss-gradient cosine (relatedness/grad_cos) "
                               "covers the dense shared parameters only, not the sharded embedding tables")
        if not params:
            return
        per_task = []
        for t in self.tasks:
            gs = torch.autograd.grad(losses[t], params, retain_graph=True, allow_unused=True)
            per_task.append(torch.cat([(g if g is not None else torch.zeros_like(p)).detach().flatten().double()
                                       for g, p in zip(gs, params)]))
        stacked = torch.stack(per_task)  # (T, P)
        if distributed:
            stacked = trainer.strategy.reduce(stacked, reduce_op="sum")
        names, mat = gradient_cosine({t: stacked[i] for i, t in enumerate(self.tasks)})
        self.last_grad_cosine = (names, mat.cpu())
        self.last_grad_cosine_step = self.global_step  # named in the epoch's relatedness plot
        if trainer.logger is not None and trainer.is_global_zero:
            # straight to the logger at this step: self.log would hold it until the next log_every_n_steps
            trainer.logger.log_metrics(pair_scalars("relatedness/grad_cos", names, mat), step=self.global_step)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.weighting.after_optimizer_step()  # GradNorm: its weights back to sum K
        if self.last_output is not None:
            # e.g. the loss-free balancing bias update, from the loads the model counted over all of this step's
            # micro-batches (last_output holds only the last one under gradient accumulation)
            self.model.after_optimizer_step(self.last_output)

    def _logs_this_step(self) -> bool:
        """Step metrics reach the logger only every `log_every_n_steps`; each `self.log` costs ~0.5-1 ms, so the
        calls are skipped in between (a small model's whole step is a few ms). The epoch's last batch logs too: a
        ModelCheckpoint or EarlyStopping watching `train/loss` reads it at the epoch's end, and an epoch shorter
        than log_every_n_steps failed there (Lightning passes it to the logger only on its own steps)."""
        if self._train_metric_watched:
            return True
        every = self.trainer.log_every_n_steps
        # Lightning's own rule (step counted from 1)
        return bool(every) and ((self.global_step + 1) % every == 0 or bool(self.trainer.is_last_batch))

    def on_train_start(self) -> None:
        # an earlier fit's, whose batch counts this one's may meet
        self._batch_start = None
        count_epoch_after_last_batch(self.trainer)
        due, self._plateau_due = self._plateau_due, None
        if isinstance(due, dict):  # the step owed at the checkpoint this fit resumed from, with its value then
            self._take_plateau_step(tuple(due["point"]), due["value"])
        grads, self._grads_due = self._grads_due, None
        if grads is not None:
            self._restore_accumulated_grads(grads)

    def on_before_backward(self, loss: torch.Tensor) -> None:
        self._backward_began = True  # from here the batch's gradient goes into .grad (_accumulation_window_open)

    def on_train_end(self) -> None:
        self._take_deferred_plateau_step()

    def on_train_epoch_start(self) -> None:
        if self._closed_epoch:
            # the epoch after the one close_finished_epoch closed starts as a new epoch, not as a restart (with
            # max_steps Lightning restarts it "saved on last": its first advance skipped a validation check and
            # counted a step, and every metric was logged one step late)
            self._closed_epoch = False
            self.trainer.fit_loop.epoch_loop.restarting = False
        self._take_deferred_plateau_step()
        resumed, self._resumed_epoch = self._resumed_epoch, None
        if resumed == self.current_epoch:  # resumed mid-epoch: the totals (and the probe) before came with it
            return
        self.last_grad_cosine = None  # an epoch without a probe reports none, not an earlier epoch's
        self._epoch_rows = 0
        self._epoch_loss_sum = None
        self._epoch_batches = 0

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._backward_began = False  # a failure before the backward leaves the window's .grad as it was
        ready = self.trainer.fit_loop.epoch_loop.batch_progress.total.ready
        self._batch_start = BatchStart(ready, *self._rng_states(), self._epoch_rows, self._epoch_loss_sum,
                                       self._epoch_batches, [m.pending_load for _, m in self._balancers])
        resumed = self._resumed_epoch
        if resumed is None or resumed == self.current_epoch:
            return
        # A checkpoint written on the last batch of epoch `resumed`, before its epoch end: Lightning resumes in the
        # next epoch without calling on_train_epoch_start or the skipped epoch's end. Close that epoch's totals
        # here (the loss weighting's epoch update, as a straight run made it), then start this epoch's afresh.
        self._resumed_epoch = None
        self.last_grad_cosine = None  # that epoch's probe went to its statistics (RoutingMonitor.on_train_start)
        rank_zero_warn(f"resumed from a checkpoint written on the last batch of epoch {resumed}, before its epoch "
                       f"end: Lightning skips that epoch's validation and end; its loss-weighting update is applied "
                       f"now, its train/rows_seen is not logged. A checkpoint written at the epoch's end "
                       f"(save_last, or every_n_train_steps not a multiple of the epoch's batches) avoids this.")
        self._close_epoch_totals()
        self._epoch_rows = 0
        # this epoch's totals, not the closed one's
        self._batch_start = self._batch_start._replace(rows=0, loss_sum=None, batches=0)

    def _epoch_loss_sums(self, sums: torch.Tensor | None = None) -> torch.Tensor:
        """(T,) this rank's task-loss sums over the epoch's batches so far (or `sums`), on the module's device."""
        sums = self._epoch_loss_sum if sums is None else sums
        if sums is None:
            return torch.zeros(len(self.tasks), device=self.device)
        return sums.to(self.device)

    def on_train_epoch_end(self) -> None:
        cut = epoch_cut_short(self.trainer)  # then its totals stay open for a fit that resumes it
        # rows seen this epoch, summed over ranks: equals the train split size once per epoch (a cut one's rows so
        # far under a name of their own: a resume logs the whole epoch's at its end)
        self.log("train/partial_epoch/rows_seen" if cut else "train/rows_seen", float(self._epoch_rows),
                 on_step=False, on_epoch=True, reduce_fx="sum", sync_dist=True, batch_size=1)
        if not cut:  # the epoch's mean task losses over every batch of every rank: sums and counts reduced, divided
            self._close_epoch_totals()
        config = self._plateau_config()
        if config is not None and config.interval == "epoch" and self.trainer.fit_loop.restarting:
            # Lightning does not step plateau schedulers at the end of the epoch a fit resumed in (it holds no
            # metric from before the checkpoint); the metric is there after this hook: taken at the next epoch's
            # start, before any batch trains with the learning rate, as a straight run has it (or the fit's end)
            self._plateau_deferred = self._plateau_owed(config)

    # --- ReduceLROnPlateau across a resume -----------------------------------------------------------------
    # Lightning steps a plateau scheduler after the checkpoints of the point it steps at are written (the epoch's
    # end, or a step's end after its validation), restores none of the metrics it reads, and skips the end of the
    # epoch a fit resumed in: a resumed fit lost one or two steps, and its learning rate and weights drifted from a
    # straight run's. The module records the step owed at a checkpoint, with the metric's value then, and takes it
    # when the fit resumes.
    def _plateau_config(self):
        configs = self.trainer.lr_scheduler_configs if self._trainer is not None else []
        return next((c for c in configs if c.reduce_on_plateau), None)

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        super().lr_scheduler_step(scheduler, metric)
        config = self._plateau_config()
        if config is not None and scheduler is config.scheduler:
            self._plateau_stepped_at = self._plateau_point(config)

    def _plateau_point(self, config) -> tuple[str, int]:
        return ("epoch", self.current_epoch) if config.interval == "epoch" else ("step", self.global_step)

    def _plateau_owed(self, config) -> tuple[str, int] | None:
        """The point whose plateau step Lightning takes after now (or should have: see on_train_epoch_end) and has
        not yet, if any: an epoch whose batches are all done and whose end is not complete, or a step whose
        checkpoints come before its plateau step (at its end, or on its validation's end)."""
        loop = self.trainer.fit_loop.epoch_loop
        if self.trainer.state.status == "finished":  # a checkpoint saved after the fit: its steps all taken
            return None
        batches = loop.batch_progress.current
        if config.interval == "epoch":
            # the epoch's batches all processed (not merely fetched: an exception inside the last one replays it
            # on resume) and its end not complete (a SIGTERM noticed after it is raised with the next epoch counted)
            epoch = self.trainer.fit_loop.epoch_progress.current
            due = (batches.processed >= self.trainer.num_training_batches
                   and (epoch.ready > epoch.completed or epoch.processed > epoch.completed)
                   and (self.current_epoch + 1) % config.frequency == 0)
        else:
            # the current batch processed (an exception inside it replays it on resume: its step is not owed)
            due = (batches.processed == batches.ready and not loop._should_accumulate()
                   and (loop.batch_idx + 1) % config.frequency == 0)
        point = self._plateau_point(config)
        return point if due and self._plateau_stepped_at != point else None

    def _take_plateau_step(self, point: tuple[str, int], value: Any) -> None:
        """The step owed at an earlier `point` (the checkpoint's, or the resumed epoch's end), with the metric's
        `value` there; recorded as that point's, so that it is not taken twice."""
        config = self._plateau_config()
        if config is None or self._plateau_stepped_at == point:
            return
        if value is None:
            rank_zero_warn(f"ReduceLROnPlateau: the step owed at {point[0]} {point[1]} (before the checkpoint this "
                           f"fit resumed from) is not taken: {config.monitor} was not logged by then (a checkpoint "
                           "written before that point's validation); the learning rate may differ from a straight "
                           "run's by one step")
            return
        super().lr_scheduler_step(config.scheduler, value)
        self._plateau_stepped_at = point

    def _take_deferred_plateau_step(self) -> None:
        point, self._plateau_deferred = self._plateau_deferred, None
        if point is not None:  # the metric as Lightning would have read it at that epoch's end
            self._take_plateau_step(point, self.trainer.callback_metrics.get(self._plateau_config().monitor))

    def _close_epoch_totals(self) -> None:
        """The epoch's mean task losses over every batch of every rank to the loss weighting (DWA reads them);
        the sums start again. Collective: every rank calls it."""
        loss_sum = self._epoch_loss_sums()
        totals = torch.cat([loss_sum, loss_sum.new_tensor([self._epoch_batches])])  # (T + 1,)
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum").cpu()  # same on all ranks
        if totals[-1] > 0:
            mean = totals[:-1] / totals[-1]
            self.weighting.on_epoch_end({t: float(mean[i]) for i, t in enumerate(self.tasks)})
        self._epoch_loss_sum = None
        self._epoch_batches = 0

    # --- checkpoints ------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The running totals of the epoch (rows seen, task-loss sums for the epoch mean that DWA reads) summed
        # over ranks: every rank reaches this save (Lightning saves on all ranks and writes on rank 0), and a
        # resume mid-epoch gives them to rank 0, so that the sums over ranks at the epoch's end come out as in a
        # run that went straight through. The float loss sums also rank by rank: a resume under as many ranks
        # gives each its own, so that each rank's float32 sum continues as it would have (rank 0 starting from
        # the sum over ranks rounds otherwise, and DWA's weights came out a few 1e-7 off).
        rows, loss_sum, batches = self._epoch_rows, self._epoch_loss_sum, self._epoch_batches
        start = self._batch_start
        if self._in_flight(start):  # as before that batch: the resume replays it
            rows, loss_sum, batches = start.rows, start.loss_sum, start.batches
        loss_sum = self._epoch_loss_sums(loss_sum)
        totals = torch.cat([loss_sum.double(), loss_sum.new_tensor([batches, rows], dtype=torch.float64)])
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum").cpu()
        per_rank = self.trainer.strategy.all_gather(loss_sum.float())
        # (W, T): one process gets (T,) from the single-device strategy and (1, T) from a DDP one
        per_rank = per_rank.reshape(self.trainer.world_size, -1).cpu()
        # the epoch they are of: after a fit stopped mid-epoch, the cut one (Lightning has counted it completed)
        checkpoint[EPOCH_TOTALS_KEY] = {"epoch": checkpoint_epoch(self.trainer), "loss_sum": totals[:-2].float(),
                                        "loss_sum_per_rank": per_rank,
                                        "batches": int(totals[-2]), "rows": int(totals[-1])}
        checkpoint[RNG_KEY] = self._gather_rng_states()
        if self.last_grad_cosine is not None:  # this epoch's last probe, for its statistics at the epoch's end
            names, matrix = self.last_grad_cosine
            checkpoint[GRAD_PROBE_KEY] = {"names": list(names), "matrix": matrix.cpu(),
                                          "step": self.last_grad_cosine_step}
        if self._accumulation_window_open():
            grads = self._gather_accumulated_grads()
            # the window's loads so far, which its bias update counts (none without the gradients: the window's
            # batches are left out alike)
            checkpoint[ACCUMULATED_GRADS_KEY] = {"accumulate_grad_batches": self.trainer.accumulate_grad_batches,
                                                 "grads": grads, "loads": self._gather_pending_loads() if grads else {}}
        config = self._plateau_config()
        owed = self._plateau_owed(config) if config is not None and self.trainer.state.fn == "fit" else None
        if owed is not None:
            value = self.trainer.callback_metrics.get(config.monitor)
            checkpoint[PLATEAU_KEY] = {"point": list(owed), "value": None if value is None else float(value)}
        reopen_cut_epoch(checkpoint, self.trainer)
        uncount_unprocessed_batch(checkpoint, self.trainer)

    def _accumulation_window_open(self) -> bool:
        """Whether the fit is inside a gradient-accumulation window: batches trained whose optimizer step is still
        to come (a checkpoint written on an exception, a SIGTERM or a mid-epoch validation). Their gradients are in
        no weight yet: a resume without them skipped those batches' rows (the weights came out otherwise)."""
        trainer = self.trainer
        if trainer.state.fn != "fit" or trainer.accumulate_grad_batches <= 1:
            return False
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        done = int(progress.processed)
        if done % trainer.accumulate_grad_batches == 0 or done >= trainer.num_training_batches:
            return False
        if progress.started > done and self._backward_began:  # failed in its backward or step: part is in .grad
            rank_zero_warn(f"this checkpoint is written as batch {done} of epoch {trainer.current_epoch} failed "
                           "inside its backward or optimizer step, in the middle of a gradient-accumulation window: "
                           "the window's gradients cannot be told from that batch's part, and none are kept; a fit "
                           f"resumed from it leaves out the window's {done % trainer.accumulate_grad_batches} "
                           "batches before it")
            return False
        return True

    def _gather_accumulated_grads(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Every rank's gradients so far in the open window (each rank's own: DDP sums them at the window's last
        backward): name -> ((W,) bool: the rank has one, (W, *shape) the values). Collective."""
        from mmoe_rec.training.sharding import ShardedEmbeddingStrategy

        if isinstance(self.trainer.strategy, ShardedEmbeddingStrategy):  # tables step in the backward: none left
            rank_zero_warn("a checkpoint written inside a gradient-accumulation window under ddp_sharded_embeddings "
                           "keeps no partial gradients: a fit resumed from it leaves out the window's batches")
            return {}
        out = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            grad = param.grad
            has = self._per_rank(torch.tensor([grad is not None], dtype=torch.uint8))  # (W, 1)
            values = self._per_rank(grad if grad is not None else torch.zeros_like(param))  # (W, *shape)
            out[name] = (has.reshape(-1).bool(), values)
        return out

    def _in_flight(self, start: BatchStart | None) -> bool:
        """Whether `start` is of a batch that failed after its start and before it was processed: a checkpoint
        written now is resumed by replaying that batch, so what it holds must be as before the batch."""
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.total
        return start is not None and start.ready == progress.ready > progress.processed

    def _gather_pending_loads(self) -> dict[str, torch.Tensor]:
        """Every rank's loss-free balancer loads so far in the open window (each rank's own: they are summed over
        the ranks at the update): name -> (W, E) int64. Those before the forward of a batch that failed in it (its
        resume replays the batch, which counts them again). Collective."""
        start = self._batch_start
        failed_forward = self._in_flight(start)
        out = {}
        for i, (name, balancer) in enumerate(self._balancers):
            load = start.loads[i] if failed_forward else balancer.pending_load
            if load is None:  # nothing counted: what take_load reads as zeros
                load = torch.zeros_like(balancer.bias, dtype=torch.long)
            out[name] = self._per_rank(load)
        return out

    def _per_rank(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's `tensor`, (W, *shape) on the CPU, whatever shape the strategy's all_gather gives (one
        process: no rank dimension under the single-device strategy, one under DDP's). Collective."""
        out = self.trainer.strategy.all_gather(tensor.to(self.device))
        return out.reshape(self.trainer.world_size, *tensor.shape).cpu()

    def _restore_accumulated_grads(self, saved: dict[str, Any]) -> None:
        """This rank's gradients of the window the checkpoint was written in (as many ranks: the data module
        refuses a mid-epoch resume under another plan), under the same accumulate_grad_batches (another one
        draws other windows: they are left out, with a warning)."""
        if saved.get("accumulate_grad_batches") != self.trainer.accumulate_grad_batches:
            rank_zero_warn(f"the checkpoint was written inside a window of accumulate_grad_batches="
                           f"{saved.get('accumulate_grad_batches')}, and this fit accumulates "
                           f"{self.trainer.accumulate_grad_batches}: the window's gradients so far are left out")
            return
        rank = self.trainer.global_rank
        params = dict(self.named_parameters())
        for name, (has, values) in saved["grads"].items():
            param = params.get(name)
            if param is None or rank >= len(has):
                continue
            if bool(has[rank]):  # in the parameter's own layout (DDP's buckets expect it)
                param.grad = torch.empty_like(param).copy_(values[rank])
            else:
                param.grad = None
        balancers = dict(self._balancers)
        for name, loads in saved.get("loads", {}).items():
            if name in balancers and rank < len(loads):
                balancers[name].pending_load = loads[rank].to(self.device)

    def _rng_states(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's torch generator states: CPU's, and the GPU's when on one (copies)."""
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    def _gather_rng_states(self) -> dict[str, torch.Tensor | None]:
        """Every rank's torch generator state (CPU, and the GPU's when on one), (W, n) uint8: a resumed fit
        continues the random stream (routing noise, dropout) where it stopped, as a straight run does. Written as a
        batch failed before it was processed (in its forward, backward or optimizer step), those from before its
        forward: the resume replays the batch, which draws its noise and dropout masks again. Collective."""
        start = self._batch_start
        cpu, cuda = (start.rng_cpu, start.rng_cuda) if self._in_flight(start) else self._rng_states()
        return {"cpu": self._per_rank(cpu), "cuda": None if cuda is None else self._per_rank(cuda)}

    def _restore_rng_states(self, states: dict[str, torch.Tensor | None] | None) -> None:
        """This rank's saved generator states, when resuming a fit (a checkpoint from another number of ranks
        keeps the states it has for ranks it had)."""
        rank = self.trainer.global_rank
        if not states or rank >= len(states["cpu"]):
            return
        # clone: a row of the (W, n) tensor is a view at an offset, which set_rng_state reads from its storage's
        # start (rank 1's state crashed the process)
        # (reshape: checkpoints of one process under a DDP strategy held (1, 1, n))
        torch.set_rng_state(states["cpu"][rank].reshape(-1).to(torch.uint8).clone())
        if states.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(states["cuda"][rank].reshape(-1).to(torch.uint8).clone(),
                                     torch.cuda.current_device())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning calls this before it loads the weights: features of another spec (vocabularies in another
        # order, other buckets) would otherwise be scored silently with the wrong embeddings
        saved = (checkpoint.get("hyper_parameters") or {}).get("feature_spec")
        saved_version = saved.get("version") if isinstance(saved, dict) else getattr(saved, "version", None)
        if saved_version and saved_version != self.spec.version:
            raise ValueError(
                f"the checkpoint was trained on features of spec version {saved_version}, the data has spec version "
                f"{self.spec.version}: their ids mean other values. Use the feature folder the model was trained "
                f"on (its spec.json), or train again")
        self._check_embedding_optimizer(checkpoint)
        if self._trainer is not None and self.trainer.precision == "64-true":
            # the weights load before Lightning's precision plugin casts the module: into float32 parameters,
            # float64 weights were rounded (a resumed 64-true fit, and validate / test, ran on rounded weights)
            self.double()
        if self._trainer is not None and self.trainer.state.fn == "fit":
            self._closed_epoch = close_finished_epoch(checkpoint, self.trainer)
            self._restore_rng_states(checkpoint.get(RNG_KEY))
            probe = checkpoint.get(GRAD_PROBE_KEY)
            if probe is not None:  # the checkpoint's epoch's last probe: its statistics report it at its end
                self.checkpoint_grad_probe = (list(probe["names"]), probe["matrix"], probe["step"])
                self.last_grad_cosine = (list(probe["names"]), probe["matrix"])
                self.last_grad_cosine_step = probe["step"]
                # that step is probed: a fit resumed inside its accumulation window must not probe it again from
                # a later micro-batch's losses
                self._grad_similarity_step = probe["step"]
            self._plateau_due = checkpoint.get(PLATEAU_KEY)
            self._grads_due = checkpoint.get(ACCUMULATED_GRADS_KEY)
        totals = checkpoint.get(EPOCH_TOTALS_KEY)
        if self._trainer is None or totals is None or not totals["batches"]:  # not resuming a fit mid-epoch
            return
        rank, first = self.trainer.global_rank, self.trainer.global_rank == 0
        # left on the CPU: Lightning calls this before it moves the module to its device (used with .to(...))
        per_rank = totals.get("loss_sum_per_rank")
        if per_rank is not None and len(per_rank) == self.trainer.world_size:  # each rank its own sum
            self._epoch_loss_sum = per_rank[rank].reshape(-1).clone()  # (T,); (1, T) in a checkpoint as above
        else:  # another number of ranks (or a checkpoint from before): the sum over ranks on rank 0
            self._epoch_loss_sum = totals["loss_sum"] if first else None
        self._epoch_batches = totals["batches"] if first else 0
        self._epoch_rows = totals["rows"] if first else 0
        self._resumed_epoch = totals["epoch"]

    def _check_embedding_optimizer(self, checkpoint: dict[str, Any]) -> None:
        """A fit resumed from a ddp_sharded_embeddings checkpoint of fused tables under another strategy would
        train the tables with the configured optimizer from fresh state and drop their fused optimizer's state:
        refused. data_parallel tables are trained by the configured optimizer: their checkpoint resumes anywhere."""
        from mmoe_rec.training.sharding import SHARDING_TYPE_KEY, ShardedEmbeddingStrategy, fused_tables_in

        fused = fused_tables_in(checkpoint)  # None: written before the sharding type was, with no state
        if (fused is not False and self._trainer is not None and self.trainer.state.fn == "fit"
                and not isinstance(self.trainer.strategy, ShardedEmbeddingStrategy)):
            how = (f"sharding_type {checkpoint[SHARDING_TYPE_KEY]}" if checkpoint.get(SHARDING_TYPE_KEY)
                   else "sharding_type table_wise or column_wise" if fused
                   else "the sharding_type it was written with (data_parallel if so)")
            raise ValueError(
                f"this checkpoint was written under ddp_sharded_embeddings: its embedding tables are trained by their "
                f"own fused optimizer, whose state it holds, and {type(self.trainer.strategy).__name__} would "
                f"replace it with the configured optimizer from scratch. Resume it with --trainer.strategy "
                f"ddp_sharded_embeddings, {how} (validate / test / predict / register take it under any strategy)")

    # --- evaluation -------------------------------------------------------------------------------------
    def _eval_step(self, batch: Batch, metrics: TaskMetrics, prefix: str) -> None:
        out = self.model(batch)
        metrics.update(out.logits, batch.labels, batch.weights)  # <prefix>/loss too (TaskMetrics.compute)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def on_validation_epoch_end(self) -> None:
        # torchmetrics already reduced across ranks; sync_dist only keeps Lightning from warning (same values)
        self.log_dict(self.val_metrics.compute(), sync_dist=True)
        self.val_metrics.reset()

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute(), sync_dist=True)
        self.test_metrics.reset()

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, Any]:
        if self._trainer is not None and self.trainer.received_sigterm:
            # Lightning's fit, validate and test loops stop on a SIGTERM, its predict loop does not (it ran to the
            # end and exited 0): stopped here, the prediction writer removes its partial files (on_exception)
            raise SIGTERMException
        out = self.model(batch)
        scores = {
            # in float32: a bf16 sigmoid writes every logit above ~6.2 as exactly 1.0 and ties close scores
            f"score_{t}": (torch.sigmoid(out.logits[t].float()) if self.task_types[t] == "binary"
                           else out.logits[t].float()).cpu()
            for t in self.tasks
        }
        return {"ids": batch.ids, **scores}

    # --- optimization -----------------------------------------------------------------------------------
    def _try_optimizer(self) -> None:
        """The optimizer and scheduler built once on a stand-in parameter: a wrong class path, an unknown argument
        or a value the class refuses (a negative learning rate) fails now, naming the setting, not after the
        trainer, the data and the MLflow run are set up."""
        optimizer = _try_instantiate("optimizer", self.optimizer_config, [torch.nn.Parameter(torch.zeros(1))])
        if self.lr_scheduler_config:
            scheduler = _try_instantiate("lr_scheduler", self.lr_scheduler_config, optimizer)
            _check_scheduler_keys(self.lr_scheduler_config, scheduler)
        elif any(group.get("lr") == 0 for group in optimizer.param_groups):  # a scheduler may set it (OneCycleLR)
            rank_zero_warn("the optimizer's learning rate is 0 and no lr_scheduler sets another: the weights will "
                           "not change (a typo for 1e-3?)")

    def configure_optimizers(self) -> Any:
        optimizer = _instantiate(self.optimizer_config, self.parameters())
        if not self.lr_scheduler_config:
            return optimizer
        cfg = dict(self.lr_scheduler_config)
        scheduler = _instantiate({"class_path": cfg["class_path"], "init_args": cfg.get("init_args")}, optimizer)
        sched = {"scheduler": scheduler, "interval": cfg.get("interval", "epoch"), "frequency": cfg.get("frequency", 1)}
        for key in ("monitor", "name", "strict"):  # Lightning's own keys, left to its defaults when not given
            if cfg.get(key) is not None:
                sched[key] = cfg[key]
        return {"optimizer": optimizer, "lr_scheduler": sched}
