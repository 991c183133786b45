"""Dense gates: G gates over E experts each, g(x) = softmax(x W_g / temperature), computed in float32.

- "softmax" (default): the MMoE gate (Ma et al. 2018); temperature < 1 sharpens, > 1 flattens.
- "hard": the forward pass uses one-hot(argmax) (one expert per row), the backward pass the softmax's gradient
  (straight-through estimator), so the gate keeps learning although its forward output is piecewise constant.

The gates are stored together, W (G, D, E), no bias (as in the paper), nn.Linear's init per gate. With one
shared input the G gates are one GEMM; with one input per gate (PLE's upper levels) one bmm. Logits and weights
are float32 even under autocast: the mixing weights are the routers of a dense model.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from mmoe_rec.nn.routing_record import GateRecord
from mmoe_rec.nn.softmax import softmax_last_dim

GATE_KINDS = ("softmax", "hard")


class _StraightThrough(torch.autograd.Function):
    """Forward: one-hot of the row's argmax (exact zeros and ones). Backward: identity to the soft weights."""

    @staticmethod
    def forward(ctx, soft: torch.Tensor) -> torch.Tensor:
        idx = soft.argmax(-1, keepdim=True)
        return torch.zeros_like(soft).scatter_(-1, idx, 1.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class DenseGates(nn.Module):
    def __init__(
        self,
        in_dim: int,
        num_experts: int,
        num_gates: int = 1,
        *,
        kind: str = "softmax",
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if kind not in GATE_KINDS:
            raise ValueError(f"unknown gate {kind!r}; expected one of {GATE_KINDS}")
        if not temperature > 0:
            raise ValueError(f"gate temperature must be > 0, got {temperature}")
        if in_dim < 1 or num_experts < 1 or num_gates < 1:
            raise ValueError(f"gates need in_dim, num_experts, num_gates >= 1, got {in_dim}, {num_experts}, {num_gates}")
        self.in_dim, self.num_experts, self.num_gates = in_dim, num_experts, num_gates
        self.kind = kind
        self.temperature = float(temperature)
        self.weight = nn.Parameter(torch.empty(num_gates, in_dim, num_experts))  # (G, D, E)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_dim)  # nn.Linear's default
        nn.init.uniform_(self.weight, -bound, bound)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, D) shared by all gates, or (G, B, D) one input per gate -> (B, G, E) float32."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            w = self.weight.float()
            if x.dim() == 2:
                B = x.shape[0]
                # (D, G*E). One gate: a view of the weight, so that its gradient has the weight's strides (the
                # permute's had another stride on the size-1 axis: DDP copied it and warned "Grad strides do not
                # match bucket view strides"); several: a copy, whose gradient autograd lays out as the weight
                w_flat = (w.view(self.in_dim, self.num_experts) if self.num_gates == 1
                          else w.permute(1, 0, 2).reshape(self.in_dim, -1))
                return (x @ w_flat).view(B, self.num_gates, self.num_experts)  # one GEMM for all gates
            if x.dim() == 3 and x.shape[0] == self.num_gates:
                return torch.bmm(x, w).transpose(0, 1)  # (G, B, E) -> (B, G, E)
        raise ValueError(f"gate input must be (B, {self.in_dim}) or ({self.num_gates}, B, {self.in_dim}), "
                         f"got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (weights, probs), both (B, G, E) float32. weights mix the experts (one-hot for "hard", with the
        straight-through gradient); probs are the softmax probabilities."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = self.logits(x)
            if self.temperature != 1.0:  # skipped at 1: a pass forward and backward over (B, G, E)
                logits = logits / self.temperature
            probs = softmax_last_dim(logits)
            weights = _StraightThrough.apply(probs) if self.kind == "hard" else probs
        return weights, probs

    def record(self, weights: torch.Tensor, probs: torch.Tensor, gate: int,
               expert_groups: dict[str, list[int]] | None = None) -> GateRecord:
        """GateRecord of gate `gate` from this forward's (B, G, E) weights and probs (detached)."""
        w, p = weights[:, gate].detach(), probs[:, gate].detach()  # (B, E)
        chosen = w.argmax(-1, keepdim=True) if self.kind == "hard" else None  # (B, 1): a hard gate is top-1
        return GateRecord(combine=w, probs=p, chosen=chosen, dropped=w.new_zeros((), dtype=torch.int64),
                          expert_groups=expert_groups)
