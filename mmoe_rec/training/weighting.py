"""How per-task losses become one training loss.

- ``fixed``: sum_t w_t L_t.
- ``uncertainty`` (Kendall, Gal & Cipolla 2018): one learnable s_t = log sigma_t^2 per task.
  Regression (Gaussian likelihood): 0.5 exp(-s_t) L_t + 0.5 s_t. Binary (scaled softmax / Bernoulli
  approximation of the paper, eq. 10): exp(-s_t) L_t + 0.5 s_t. Large-loss (noisy) tasks learn a large s_t.
- ``dwa`` dynamic weight average (Liu, Johns & Davison 2019): w_t(e) = K softmax_t(r_t(e-1) / T), with
  r_t(e-1) = L_t(e-1) / L_t(e-2) the ratio of the last two epochs' mean losses; w_t = 1 for the first two epochs.
"""
from __future__ import annotations

import math

import torch
from torch import nn

WEIGHTINGS = ("fixed", "uncertainty", "dwa")


class LossWeighting(nn.Module):
    """Combines {task: loss} into a scalar; `weights()` reports the current effective per-task weights."""

    def __init__(self, tasks: list[str], task_weights: dict[str, float] | None = None) -> None:
        super().__init__()
        self.tasks = list(tasks)
        task_weights = dict(task_weights or {})
        unknown = sorted(set(task_weights) - set(self.tasks))
        if unknown:
            raise ValueError(f"task_weights name unknown task(s) {unknown}; tasks are {self.tasks}")
        self.static = {t: float(task_weights.get(t, 1.0)) for t in self.tasks}

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.static[t] * losses[t] for t in self.tasks)

    def weights(self) -> dict[str, float]:
        return dict(self.static)

    def on_epoch_end(self, mean_losses: dict[str, float]) -> None:
        """Called once per training epoch with the epoch's mean (unweighted) task losses."""


class FixedWeighting(LossWeighting):
    pass


class UncertaintyWeighting(LossWeighting):
    def __init__(self, tasks: list[str], task_types: dict[str, str], task_weights: dict[str, float] | None = None):
        super().__init__(tasks, task_weights)
        self.task_types = dict(task_types)
        self.log_vars = nn.Parameter(torch.zeros(len(self.tasks)))  # (T,) s_t = log sigma_t^2, learnt

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        total = 0.0
        for i, t in enumerate(self.tasks):
            s = self.log_vars[i]
            scale = 0.5 if self.task_types[t] == "regression" else 1.0
            total = total + self.static[t] * (scale * torch.exp(-s) * losses[t] + 0.5 * s)
        return total

    def weights(self) -> dict[str, float]:
        s = self.log_vars.detach().float()
        return {
            t: self.static[t] * (0.5 if self.task_types[t] == "regression" else 1.0) * math.exp(-float(s[i]))
            for i, t in enumerate(self.tasks)
        }


class DynamicWeightAverage(LossWeighting):
    def __init__(self, tasks: list[str], task_weights: dict[str, float] | None = None, temperature: float = 2.0):
        super().__init__(tasks, task_weights)
        if temperature <= 0:
            raise ValueError(f"dwa temperature must be > 0, got {temperature}")
        self.temperature = temperature
        # history of epoch-mean losses, kept as a buffer so a resumed run continues with the same weights
        self.register_buffer("history", torch.full((2, len(self.tasks)), float("nan")))  # (2, T): e-2, e-1
        self.register_buffer("current", torch.ones(len(self.tasks)))  # (T,)

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        # current is a device buffer: indexing it keeps the step free of host syncs (float() would sync on GPU)
        return sum(self.static[t] * self.current[i] * losses[t] for i, t in enumerate(self.tasks))

    def weights(self) -> dict[str, float]:
        return {t: self.static[t] * float(self.current[i]) for i, t in enumerate(self.tasks)}

    @torch.no_grad()
    def on_epoch_end(self, mean_losses: dict[str, float]) -> None:
        latest = torch.tensor([float(mean_losses[t]) for t in self.tasks], dtype=self.history.dtype)
        self.history[0] = self.history[1].clone()
        self.history[1] = latest.to(self.history.device)
        if torch.isnan(self.history).any():
            return  # fewer than two epochs seen: keep w = 1
        ratio = self.history[1] / self.history[0].clamp_min(1e-12)  # (T,) r_t
        self.current.copy_(len(self.tasks) * torch.softmax(ratio / self.temperature, dim=0))


def make_weighting(
    name: str, tasks: list[str], task_types: dict[str, str], task_weights: dict[str, float] | None = None,
    dwa_temperature: float = 2.0,
) -> LossWeighting:
    if name == "fixed":
        return FixedWeighting(tasks, task_weights)
    if name == "uncertainty":
        return UncertaintyWeighting(tasks, task_types, task_weights)
    if name == "dwa":
        return DynamicWeightAverage(tasks, task_weights, dwa_temperature)
    raise ValueError(f"unknown loss weighting {name!r}; choose one of {WEIGHTINGS}")
