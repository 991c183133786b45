"""Evaluation metrics per task with torchmetrics: state is kept per rank and reduced across ranks on `compute()`.

binary:     auc (WeightedBinaryAUROC, exact: every rank's predictions are gathered, not binned) and logloss
            (mean BCE as a MeanMetric: a (sum, weight) pair summed across ranks, so the global mean is exact
            whatever the per-rank row counts).
regression: mse (MeanMetric of squared errors, same reduction).
Sample weights weight all three: a row of weight 2 counts as that row twice (torchmetrics' AUROC takes no
weights, hence our own).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn
from torchmetrics import Metric, MeanMetric
from torchmetrics.utilities.data import dim_zero_cat

from mmoe_rec.features.spec import FeatureSpec
from mmoe_rec.nn.keep_dtype import moving_only
from mmoe_rec.training.losses import row_losses


class WeightedBinaryAUROC(Metric):
    """ROC AUC with sample weights: P(score of a positive > score of a negative), each pair weighted by the product
    of the two rows' weights, ties counting one half. Equals the unweighted AUC when all weights are equal.

    States are concatenated across ranks (like torchmetrics' exact BinaryAUROC). With no positive or no negative
    weight the AUC is undefined: compute warns and returns NaN (torchmetrics returns 0, which reads as a perfectly
    inverted ranking: the worst model to a checkpoint or early stopping watching `mode=max`).
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")
        self.add_state("weights", default=[], dist_reduce_fx="cat")

    def update(self, scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        self.scores.append(scores.detach().flatten().double())
        self.labels.append(labels.detach().flatten().double())
        w = torch.ones_like(self.scores[-1]) if weights is None else weights.detach().flatten().double()
        self.weights.append(w)

    def compute(self) -> torch.Tensor:
        if isinstance(self.scores, list) and not self.scores:  # nothing seen on any rank
            warnings.warn("AUC of no rows; returning NaN", RuntimeWarning, stacklevel=2)
            return torch.tensor(float("nan"), device=self.device)
        return weighted_auc(dim_zero_cat(self.scores), dim_zero_cat(self.labels), dim_zero_cat(self.weights))


def weighted_auc(scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(N,) scores, 0/1 labels, weights -> scalar AUC. One sort; equal scores form one group whose negatives
    count half against its positives."""
    if not bool(torch.isfinite(scores).all()):  # a diverged model: no ranking, as its log-loss is NaN too
        return torch.tensor(float("nan"), device=scores.device)
    order = torch.argsort(scores)
    s, y, w = scores[order], labels[order], weights[order]
    _, group = torch.unique_consecutive(s, return_inverse=True)  # (N,) tie group of each sorted row
    n_groups = int(group[-1]) + 1 if group.numel() else 0
    pos = torch.zeros(n_groups, dtype=torch.float64, device=s.device).index_add_(0, group, w * y)  # (G,)
    neg = torch.zeros(n_groups, dtype=torch.float64, device=s.device).index_add_(0, group, w * (1 - y))
    total_pos, total_neg = pos.sum(), neg.sum()
    if total_pos <= 0 or total_neg <= 0:
        warnings.warn("AUC is undefined without both positive and negative (weighted) rows; returning NaN",
                      RuntimeWarning, stacklevel=2)
        return torch.tensor(float("nan"), device=s.device)
    neg_below = torch.cumsum(neg, 0) - neg  # negative weight with a strictly lower score, per group
    return ((pos * (neg_below + 0.5 * neg)).sum() / (total_pos * total_neg)).float()


# MeanMetric's nan_strategy: a float replaces NaN values by itself, here NaN (its "disable" would also drop the
# sample weights: torchmetrics 1.9 then weights every row 1)
NAN_STAYS = float("nan")

LOSS_METRIC = {"binary": "logloss", "regression": "mse"}  # the metric that is the task's training loss


class TaskMetrics(nn.Module):
    """One split's metrics ("val" or "test"); names are `<prefix>/<task>/<metric>`."""

    def __init__(self, spec: FeatureSpec, tasks: list[str], prefix: str,
                 task_weights: dict[str, float] | None = None) -> None:
        super().__init__()
        self.prefix = prefix
        self.task_weights = {t: float((task_weights or {}).get(t, 1.0)) for t in tasks}  # static, as in training
        self.types = {t: spec.task(t).type for t in tasks}
        self.metrics = nn.ModuleDict()
        for t, kind in self.types.items():
            if kind == "binary":
                self.metrics[f"{t}__auc"] = WeightedBinaryAUROC()
                self.metrics[f"{t}__logloss"] = MeanMetric(nan_strategy=NAN_STAYS)
            else:
                self.metrics[f"{t}__mse"] = MeanMetric(nan_strategy=NAN_STAYS)
        # a NaN row makes the mean NaN: torchmetrics' default drops it with a warning, which would give a diverged
        # model a finite validation loss that early stopping and checkpoints believe

    def _apply(self, fn, recurse: bool = True):
        # the metrics' running sums keep their dtypes when the model is cast (precision "bf16-true"): in bfloat16 a
        # validation log-loss, MSE and val/loss came out 5-10 % off (torchmetrics guards .half(), not .to(dtype))
        return super()._apply(moving_only(fn), recurse)

    @torch.no_grad()
    def update(self, logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor],
               weights: torch.Tensor | None = None) -> None:
        for t, kind in self.types.items():
            logit, label = logits[t].detach().float(), labels[t].float()
            per_row = row_losses(logit, label, kind, t)  # (B,)
            # a copy per task: torchmetrics sets the weight of a NaN row to 1 in place
            w = torch.ones_like(per_row) if weights is None else weights.detach().float().clone()
            if kind == "binary":
                # AUC ranks the logits themselves: a float32 sigmoid ties every logit above ~16.6 at 1.0; +-inf
                # rank as the largest / smallest finite values (NaN stays NaN)
                finite = torch.nan_to_num(logit.double(), nan=float("nan"), posinf=1e300, neginf=-1e300)
                self.metrics[f"{t}__auc"].update(finite, label, w)
                self.metrics[f"{t}__logloss"].update(per_row, w)
            else:
                self.metrics[f"{t}__mse"].update(per_row, w)

    def names(self) -> list[str]:
        """The names `compute` returns."""
        per_task = [f"{self.prefix}/{t}/{name}" for t, name in (k.rsplit("__", 1) for k in self.metrics)]
        return per_task + [f"{self.prefix}/loss"]

    def compute(self) -> dict[str, torch.Tensor]:
        """`<prefix>/<task>/<metric>` for every task, and `<prefix>/loss`: the tasks' losses (log-loss or MSE), each
        the exact mean over every row of every rank, summed with the static task weights as the training loss
        sums them (the learnt uncertainty / DWA weights left out: they change as training goes, and a loss to
        select checkpoints by must not)."""
        out = {}
        for key, metric in self.metrics.items():
            task, name = key.rsplit("__", 1)  # a task name may hold "__" itself
            out[f"{self.prefix}/{task}/{name}"] = metric.compute()
        out[f"{self.prefix}/loss"] = sum(self.task_weights[t] * out[f"{self.prefix}/{t}/{LOSS_METRIC[kind]}"]
                                         for t, kind in self.types.items())
        return out

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()
