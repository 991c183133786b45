"""Per-task losses: BCE on logits for binary tasks, MSE for regression, each a sample-weighted mean."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from mmoe_rec.features.spec import FeatureSpec

LOSS_KINDS = {"binary": "bce", "regression": "mse"}


def row_losses(logit: torch.Tensor, label: torch.Tensor, task_type: str, task: str = "") -> torch.Tensor:
    """(B,) unreduced loss of one task; computed in float32 whatever the model's precision (float64 for a model in
    float64, "64-true": rounded to float32, its gradients were off by up to 5e-3 relative)."""
    if logit.shape != label.shape:  # a (B, 1) head against (B,) labels broadcast to a (B, B) loss without a word
        raise ValueError(f"task {task!r}: the model's logits have shape {tuple(logit.shape)} and its labels "
                         f"{tuple(label.shape)}; a model returns one (B,) tensor of logits per task")
    dtype = torch.float64 if logit.dtype == torch.float64 else torch.float32
    logit, label = logit.to(dtype), label.to(dtype)
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
        out[t] = weighted_mean(row_losses(logits[t], labels[t], spec.task(t).type, t), sample_weights)
    return out


def step_weight(weights: torch.Tensor | None, world_size: int,
                sum_over_ranks: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
    """() the step's sample-weight sum over every rank (one all-reduce of a scalar under DDP); None without weights.
    0 for a step whose rows all weigh 0: its task losses are all 0 and carry nothing to learn from."""
    if weights is None:
        return None
    local = weights.detach().float().sum()
    return sum_over_ranks(local.clone()) if world_size > 1 else local


def rank_weight_scale(weights: torch.Tensor | None, world_size: int,
                      sum_over_ranks: Callable[[torch.Tensor], torch.Tensor],
                      total: torch.Tensor | None = None) -> torch.Tensor | float:
    """What each rank's sample-weighted losses are multiplied by so that DDP trains on the global weighted mean.

    A rank's loss is sum_rank(w l) / sum_rank(w), and DDP averages the ranks' gradients: unscaled, the objective
    would be the mean over ranks of their own weighted means, in which a rank holding light rows counts as much
    as one holding heavy rows (each rank streams its own slice of the files; weights that follow file order, such
    as date partitions, would skew it). Scaled by world_size * sum_rank(w) / sum_all(w), the average of the ranks'
    gradients is that of sum_all(w l) / sum_all(w), and the mean over ranks of the logged losses is the global
    weighted mean. One all-reduce of a scalar per step, only with weights under several processes (none when
    `total`, the step's weight over every rank from `step_weight`, is given).
    """
    if weights is None or world_size <= 1:
        return 1.0
    local = weights.detach().float().sum()
    total = sum_over_ranks(local.clone()) if total is None else total
    return world_size * local / total.clamp_min(1e-12)


def rank_loss_scale(weights: torch.Tensor | None, rows: int, step_rows: int | None, world_size: int,
                    sum_over_ranks: Callable[[torch.Tensor], torch.Tensor],
                    total_weight: torch.Tensor | None = None) -> torch.Tensor | float:
    """What a rank's losses are multiplied by so that DDP, which averages the ranks' gradients of their own means,
    trains on the step's global mean: with sample weights `rank_weight_scale` (one all-reduce); without, the rank's
    share of the step's rows, world_size * rows / step_rows (the ranks' batches differ in size in an epoch's last one
    or two; `step_rows`, the rows summed over the ranks, comes with the batch from the plan: no communication)."""
    if weights is not None:
        return rank_weight_scale(weights, world_size, sum_over_ranks, total_weight)
    if world_size <= 1 or not step_rows:
        return 1.0
    return world_size * rows / step_rows
