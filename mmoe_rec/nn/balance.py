"""Balance losses for sparse routers. Each returns an unweighted float32 scalar; training applies the weights.

- importance: CV² of Importance_i = sum over rows of the combine weight g(x)_i (Shazeer et al. 2017).
- load: CV² of Load_i = sum over rows of the smooth P(x, i) of the noisy gate. Only defined with noise on: at
  evaluation there is no noise scale to divide by, so it returns 0 (never NaN).
- switch: E * sum_i f_i * P_i (Fedus et al. 2021), f_i the fraction of assignments sent to expert i (counts / k·T
  for token choice), P_i the mean router probability. Uniform routing gives 1, one expert taking all gives E.
- router_z: mean over rows of logsumexp(logits)² (ST-MoE), keeps router logits small.

CV² = population variance / (mean² + eps): 0 for a uniform vector, E - 1 when one expert takes everything.
"""
from __future__ import annotations

import torch

BALANCE_LOSSES = ("importance", "load", "switch", "router_z")
CV_EPS = 1e-10


def cv_squared(v: torch.Tensor, eps: float = CV_EPS) -> torch.Tensor:
    """(E,) -> scalar var/mean² with eps on the mean² (not on a std: no sqrt, no NaN gradient at 0)."""
    v = v.float()
    if v.numel() <= 1:
        return v.new_zeros(())
    return v.var(unbiased=False) / (v.mean() ** 2 + eps)


def importance_loss(combine: torch.Tensor) -> torch.Tensor:
    """combine: (T, E) weights actually given to experts."""
    return cv_squared(combine.float().sum(0))


def load_loss(load_prob: torch.Tensor | None) -> torch.Tensor:
    """load_prob: (T, E) smooth P(x, i), or None when there is no noise (eval / noise off) -> 0."""
    if load_prob is None:
        return torch.zeros(())
    return cv_squared(load_prob.float().sum(0))


def switch_loss(probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """probs: (T, E) router probabilities; counts: (E,) assignments per expert (k·T of them for token choice)."""
    E = probs.shape[1]
    counts = counts.float()
    f = counts / counts.sum().clamp_min(1.0)  # (E,) fraction of assignments; not differentiable (argmax-based)
    p = probs.float().sum(0) / max(probs.shape[0], 1)  # (E,) mean probability (0, not NaN, for no rows); gradient
    return E * (f * p).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """logits: (T, E) router logits; the mean over rows of logsumexp², 0 for a batch of no rows (not NaN)."""
    return torch.logsumexp(logits.float(), dim=1).pow(2).sum() / max(logits.shape[0], 1)
