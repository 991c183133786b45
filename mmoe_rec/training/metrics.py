"""Evaluation metrics per task with torchmetrics: state is kept per rank and reduced across ranks on `compute()`.

binary:     auc (BinaryAUROC, exact: the rank's predictions are gathered, not binned) and logloss
            (mean BCE as a MeanMetric: a (sum, weight) pair summed across ranks, so the global mean is exact
            whatever the per-rank row counts).
regression: mse (MeanMetric of squared errors, same reduction).
Sample weights weight logloss / mse; AUROC is unweighted (torchmetrics' AUROC takes no weights).
"""
from __future__ import annotations

import torch
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAUROC

from mmoe_rec.features.spec import FeatureSpec
from mmoe_rec.training.losses import row_losses


class TaskMetrics(nn.Module):
    """One split's metrics ("val" or "test"); names are `<prefix>/<task>/<metric>`."""

    def __init__(self, spec: FeatureSpec, tasks: list[str], prefix: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.types = {t: spec.task(t).type for t in tasks}
        self.metrics = nn.ModuleDict()
        for t, kind in self.types.items():
            if kind == "binary":
                self.metrics[f"{t}__auc"] = BinaryAUROC()
                self.metrics[f"{t}__logloss"] = MeanMetric()
            else:
                self.metrics[f"{t}__mse"] = MeanMetric()

    @torch.no_grad()
    def update(self, logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor],
               weights: torch.Tensor | None = None) -> None:
        for t, kind in self.types.items():
            logit, label = logits[t].detach().float(), labels[t].float()
            per_row = row_losses(logit, label, kind)  # (B,)
            w = torch.ones_like(per_row) if weights is None else weights.float()
            if kind == "binary":
                self.metrics[f"{t}__auc"].update(torch.sigmoid(logit), label.long())
                self.metrics[f"{t}__logloss"].update(per_row, w)
            else:
                self.metrics[f"{t}__mse"].update(per_row, w)

    def compute(self) -> dict[str, torch.Tensor]:
        out = {}
        for key, metric in self.metrics.items():
            task, name = key.split("__")
            out[f"{self.prefix}/{task}/{name}"] = metric.compute()
        return out

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()
