"""Per-task losses: BCE on logits for binary tasks, MSE for regression, each a sample-weighted mean."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmoe_rec.features.spec import FeatureSpec

LOSS_KINDS = {"binary": "bce", "regression": "mse"}


def row_losses(logit: torch.Tensor, label: torch.Tensor, task_type: str) -> torch.Tensor:
    """(B,) unreduced loss of one task; computed in float32 whatever the model's precision."""
    logit, label = logit.float(), label.float()
    if task_type == "binary":
        return F.binary_cross_entropy_with_logits(logit, label, reduction="none")
    if task_type == "regression":
        return (logit - label) ** 2
    raise ValueError(f"unknown task type {task_type!r} (binary or regression)")


def weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """sum(w * v) / sum(w): a weight of 2 counts a row twice; no weights = plain mean."""
    if weights is None:
        return values.mean()
    weights = weights.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1e-12)


def task_losses(
    logits: dict[str, torch.Tensor],
    labels: dict[str, torch.Tensor],
    spec: FeatureSpec,
    tasks: list[str],
    sample_weights: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """task -> scalar loss (unweighted across tasks; task weighting is the job of `weighting`)."""
    out = {}
    for t in tasks:
        if t not in labels:
            raise KeyError(f"batch has no label for task {t!r} (labels: {sorted(labels)})")
        out[t] = weighted_mean(row_losses(logits[t], labels[t], spec.task(t).type), sample_weights)
    return out
