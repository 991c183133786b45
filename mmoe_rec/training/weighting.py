"""How per-task losses become one training loss.

- ``fixed``: sum_t w_t L_t.
- ``uncertainty`` (Kendall, Gal & Cipolla 2018): one learnable s_t = log sigma_t^2 per task.
  Regression (Gaussian likelihood): 0.5 exp(-s_t) L_t + 0.5 s_t. Binary (scaled softmax / Bernoulli
  approximation of the paper, eq. 10): exp(-s_t) L_t + 0.5 s_t. Large-loss (noisy) tasks learn a large s_t.
- ``dwa`` dynamic weight average (Liu, Johns & Davison 2019): w_t(e) = K softmax_t(r_t(e-1) / T), with
  r_t(e-1) = L_t(e-1) / L_t(e-2) the ratio of the last two epochs' mean losses; w_t = 1 for the first two epochs.
- ``gradnorm`` (Chen, Badrinarayanan, Lee & Rabinovich 2018): learnable w_t, trained so that the gradient norms of
  the weighted task losses on the model's last shared layer W, G_t = ||grad_W w_t L_t||, move toward
  mean_t(G_t) * r_t^alpha, where r_t = (L_t / L_t(0)) / mean_s(L_s / L_s(0)) is the task's relative inverse
  training rate (L_t(0): its loss at the first step whose rows carry weight; a step whose rows all weigh 0 has
  r_t = 0 and trains no w). The gradient-norm loss sum_t |G_t - target_t| (target held constant) trains only w;
  the network trains on sum_t s_t w_t L_t with w held constant, s_t the static task_weights, which multiply on top
  of w (G_t leaves them out, so w does not learn to undo them); after every optimizer step w is renormalized to
  sum to K. Costs one extra backward to W per task and step. Under DDP the gradients on W and the losses are
  averaged over the ranks first (one all-reduce of K x |W| floats a step): the balance is that of the global batch
  the network trains on, and every rank computes the same w.

A task of static weight 0 (evaluated, not trained) takes no part in DWA's softmax or GradNorm's balance (K counts
the trained tasks): its loss does not fall, and as the "slowest" task it took weight from the others.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from mmoe_rec.nn.keep_dtype import moving_only

WEIGHTINGS = ("fixed", "uncertainty", "dwa", "gradnorm")
SharedLayer = Callable[[], list[nn.Parameter]]  # the model's last shared layer (GradNorm's W), asked for lazily
RankMean = Callable[[torch.Tensor], torch.Tensor]  # a tensor's mean over the DDP ranks (None: one process)


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
        bad = {t: w for t, w in self.static.items() if not (math.isfinite(w) and w >= 0)}
        if bad:  # a negative weight trains a task's loss up; NaN or inf makes every step NaN
            raise ValueError(f"task_weights must be finite and >= 0 (0: the task is evaluated, not trained), got {bad}")
        if self.tasks and not any(self.static.values()):
            raise ValueError(f"task_weights are all 0: no task would be trained ({self.static})")
        self.num_trained = sum(w > 0 for w in self.static.values())  # K of DWA and GradNorm
        self.register_buffer("static_weights", torch.tensor([self.static[t] for t in self.tasks]), persistent=False)

    def _apply(self, fn, recurse: bool = True):
        # learnt weights, DWA's loss history and GradNorm's initial losses stay float32 when the model is cast
        # (precision "bf16-true"): in bfloat16 GradNorm's weights never moved and DWA's ratios lost most of their signal
        return super()._apply(moving_only(fn), recurse)

    @property
    def trained(self) -> torch.Tensor:
        """(T,) bool: the tasks trained (static weight > 0), which DWA and GradNorm balance."""
        return self.static_weights > 0

    def forward(self, losses: dict[str, torch.Tensor], shared_layer: SharedLayer | None = None,
                rank_mean: RankMean | None = None) -> torch.Tensor:
        return sum(self.static[t] * losses[t] for t in self.tasks)

    def weights(self) -> dict[str, float]:
        return dict(self.static)

    def on_epoch_end(self, mean_losses: dict[str, float]) -> None:
        """Called once per training epoch with the epoch's mean (unweighted) task losses."""

    def after_optimizer_step(self) -> None:
        """Called after every optimizer step (GradNorm renormalizes its weights)."""


class FixedWeighting(LossWeighting):
    pass


class UncertaintyWeighting(LossWeighting):
    def __init__(self, tasks: list[str], task_types: dict[str, str], task_weights: dict[str, float] | None = None):
        super().__init__(tasks, task_weights)
        self.task_types = dict(task_types)
        self.log_vars = nn.Parameter(torch.zeros(len(self.tasks)))  # (T,) s_t = log sigma_t^2, learnt

    def forward(self, losses: dict[str, torch.Tensor], shared_layer: SharedLayer | None = None,
                rank_mean: RankMean | None = None) -> torch.Tensor:
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

    def forward(self, losses: dict[str, torch.Tensor], shared_layer: SharedLayer | None = None,
                rank_mean: RankMean | None = None) -> torch.Tensor:
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
        logits = torch.where(self.trained, ratio / self.temperature, float("-inf"))  # untrained tasks left out
        self.current.copy_(torch.where(self.trained, self.num_trained * torch.softmax(logits, dim=0), 1.0))


class GradNorm(LossWeighting):
    def __init__(self, tasks: list[str], task_weights: dict[str, float] | None = None, alpha: float = 1.5):
        super().__init__(tasks, task_weights)
        if not alpha >= 0:
            raise ValueError(f"gradnorm alpha must be >= 0, got {alpha}")
        self.alpha = alpha
        self.learnt_weights = nn.Parameter(torch.ones(len(self.tasks)))  # (T,) w_t, learnt; trained ones sum to K
        # L_t(0), set at the first training step; a buffer, so a resumed run keeps its reference losses
        self.register_buffer("initial_losses", torch.full((len(self.tasks),), float("nan")))  # (T,)
        self.last_gradnorm_loss: torch.Tensor | None = None  # sum_t |G_t - target_t| of the last step (logged)

    def forward(self, losses: dict[str, torch.Tensor], shared_layer: SharedLayer | None = None,
                rank_mean: RankMean | None = None) -> torch.Tensor:
        if shared_layer is None or not (layer := [p for p in shared_layer() if p.requires_grad]):
            raise ValueError("gradnorm needs the model's last shared layer (MultiTaskModel.last_shared_layer()); "
                             "this model has none with gradients: use another weighting")
        static = self.static_weights  # (T,)
        raw = torch.stack([losses[t] for t in self.tasks])  # (T,) unweighted task losses (float32, or float64)
        grads = torch.stack([self._layer_grad(losses[t], layer) if self.static[t] else self._no_grad(layer)
                             for t in self.tasks])  # (T, |W|) grad_W L_t (zeros for an untrained task)
        seen = raw.detach().clone()  # (T,) a copy: the ranks' mean is taken in place
        if rank_mean is not None:  # the global batch's gradients and losses, the same on every rank
            grads, seen = rank_mean(grads), rank_mean(seen)
        # G_t = w_t ||grad_W L_t||: GradNorm balances the learnt w_t; the static weights multiply on top (measured
        # on static_t L_t, w_t would learn to undo them, and a task weighted 0 would drag every target to 0)
        norms = grads.norm(dim=1)  # (T,)
        on = self.trained.to(norms.dtype)  # (T,) 1 for the tasks GradNorm balances (static weight > 0)
        with torch.no_grad():
            # L_t(0) at the first step whose rows carry weight (NaN until then), without a host sync a step: a batch
            # whose rows all weigh 0 has every loss 0, and as L(0) it made every later ratio huge
            self.initial_losses.copy_(torch.where(torch.isnan(self.initial_losses) & (seen > 0), seen,
                                                  self.initial_losses))
            # (T,) L_t / L_t(0), 0 for an untrained task and before L_t(0) is known (a loss of 0 then)
            ratio = torch.where(torch.isnan(self.initial_losses), 0.0, seen / self.initial_losses) * on
            # (T,) relative inverse training rate r_t; 0 in a weightless step (0 / 0 was NaN, and the step's loss)
            rate = ratio / (ratio.sum() / self.num_trained).clamp_min(1e-12)
            target = (self.learnt_weights * norms * on).sum() / self.num_trained * rate ** self.alpha  # constant
        # trains w only (norms, target constant); an untrained task's w gets no gradient
        gradnorm_loss = ((self.learnt_weights * norms - target).abs() * on).sum()
        self.last_gradnorm_loss = gradnorm_loss.detach()
        weighted = (static * self.learnt_weights.detach() * raw).sum()  # trains the network, w constant
        # the value is the weighted task loss (what train/task_loss reports); the gradient also carries w's
        return weighted + (gradnorm_loss - gradnorm_loss.detach())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # checkpoints of the first GradNorm (2026-12-06, one hour) named the learnt weights "task_weights"
        if prefix + "task_weights" in state_dict and prefix + "learnt_weights" not in state_dict:
            state_dict[prefix + "learnt_weights"] = state_dict.pop(prefix + "task_weights")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @staticmethod
    def _no_grad(layer: list[nn.Parameter]) -> torch.Tensor:
        return torch.cat([p.new_zeros(p.numel(), dtype=torch.float32) for p in layer])  # (|W|,)

    @classmethod
    def _layer_grad(cls, loss: torch.Tensor, layer: list[nn.Parameter]) -> torch.Tensor:
        """grad_W loss flattened, (|W|,) float32, detached: a constant of the gradient-norm loss (no second-order
        terms); zeros where the loss does not reach W."""
        if not loss.requires_grad:  # a task that does not reach W this step
            return cls._no_grad(layer)
        grads = torch.autograd.grad(loss, layer, retain_graph=True, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).detach().float().flatten()
                          for g, p in zip(grads, layer)])

    def weights(self) -> dict[str, float]:
        w = self.learnt_weights.detach().float().cpu()
        return {t: self.static[t] * float(w[i]) for i, t in enumerate(self.tasks)}

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        # w > 0 and sum_t w_t = K over the trained tasks, as in the paper (renormalized after each update)
        w = self.learnt_weights.clamp_min(1e-6)
        self.learnt_weights.copy_(torch.where(self.trained, w * (self.num_trained / (w * self.trained).sum()), 1.0))


def make_weighting(
    name: str, tasks: list[str], task_types: dict[str, str], task_weights: dict[str, float] | None = None,
    dwa_temperature: float = 2.0, gradnorm_alpha: float = 1.5,
) -> LossWeighting:
    if name == "fixed":
        return FixedWeighting(tasks, task_weights)
    if name == "uncertainty":
        return UncertaintyWeighting(tasks, task_types, task_weights)
    if name == "dwa":
        return DynamicWeightAverage(tasks, task_weights, dwa_temperature)
    if name == "gradnorm":
        return GradNorm(tasks, task_weights, gradnorm_alpha)
    raise ValueError(f"unknown loss weighting {name!r}; choose one of {WEIGHTINGS}")
