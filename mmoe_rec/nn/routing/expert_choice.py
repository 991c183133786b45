"""Expert-choice routing (Zhou et al. 2022): each expert takes its top-c rows, c = ceil(T * cf / E).

S = softmax(x·W) over experts; expert e takes the c rows with the largest S[:, e] and weights each by S[row, e].
Balanced by construction (every expert gets exactly c rows) but a row's experts depend on the *other* rows of the
batch: with one request there is nothing to compare against (c = 1 and every expert takes it), and a row's score
changes with batch size and company. It is therefore a training-time rule only. At evaluation this router falls
back to token-choice top-k over the same probabilities (k = round(cf), the average number of experts a row got in
training, weighted by the raw probabilities as in training), so scoring is per row and deterministic;
eval_fallback=False raises instead.
"""
from __future__ import annotations

from fractions import Fraction

import torch
from torch import nn

from mmoe_rec.nn.routing import Routing
from mmoe_rec.nn.dispatch import ceil_scaled, check_capacity_factor
from mmoe_rec.nn.routing.topk import init_router_weight, top_indices
from mmoe_rec.nn.softmax import softmax_last_dim


class ExpertChoiceRouter(nn.Module):
    def __init__(self, d_in: int, num_experts: int, capacity_factor: float | Fraction = 2.0, *,
                 init_std: float = 1e-2, eval_fallback: bool = True, eval_k: int | None = None) -> None:
        """eval_k: experts a row takes at evaluation (token choice), by default round(capacity_factor)."""
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if capacity_factor is None:
            raise ValueError("expert choice needs a capacity_factor (rows per expert = ceil(T * cf / E)), got None")
        check_capacity_factor(capacity_factor, "expert-choice capacity_factor")
        self.num_experts, self.capacity_factor, self.eval_fallback = num_experts, capacity_factor, eval_fallback
        self.eval_k = min(num_experts, max(1, round(capacity_factor) if eval_k is None else eval_k))
        self.w_gate = nn.Parameter(torch.empty(d_in, num_experts))  # (d, E); zeros would tie every expert
        init_router_weight(self.w_gate, "normal", init_std)

    def rows_per_expert(self, num_rows: int) -> int:
        return min(num_rows, max(1, ceil_scaled(num_rows, self.capacity_factor, self.num_experts)))

    def forward(self, x: torch.Tensor) -> Routing:
        # routers in float32 whatever the model's precision (autocast would run the GEMM in bf16 / fp16)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._route(x.float())

    def _route(self, x: torch.Tensor) -> Routing:
        logits = x @ self.w_gate.float()  # (T, E)
        probs = softmax_last_dim(logits)
        if self.training:
            c = self.rows_per_expert(x.shape[0])
            top = probs.topk(c, dim=0)  # (c, E) rows each expert takes, and their probabilities as weights
            return Routing(logits=logits, probs=probs, expert_rows=top.indices, expert_weights=top.values)
        if not self.eval_fallback:
            raise RuntimeError("expert-choice routing depends on the whole batch and cannot score rows on their own; "
                               "construct with eval_fallback=True to use token-choice top-k at evaluation")
        chosen = top_indices(probs, self.eval_k)  # (T, k), ties to the lower expert as in token choice
        return Routing(logits=logits, probs=probs, chosen=chosen, weights=probs.gather(1, chosen))
