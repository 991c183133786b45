"""Sparse routers: each turns router inputs (T, d) into a `Routing` (which experts each row uses, with what weight).

One routing rule per file: noisy top-k (topk.py), Switch top-1 (switch.py), expert choice (expert_choice.py);
loss_free.py holds the selection-only bias of auxiliary-loss-free balancing. Routers compute in float32.
"""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class Routing:
    """What a router decided for T rows over E experts.

    logits:  (T, E) float32 clean router logits x·W_g (router z-loss).
    probs:   (T, E) float32 softmax of the logits the router selected with (Switch loss P_i; GateRecord.probs).
    chosen, weights: (T, k) experts chosen per row and their combine weights (token choice), else None.
    expert_rows, expert_weights: (c, E) rows each expert took and their weights (expert choice), else None.
    load_prob: (T, E) smooth probability that expert i stays chosen if only its own noise is redrawn
             (noisy top-k in training only); None otherwise.
    The weights carry the router's gradient.
    """

    logits: torch.Tensor
    probs: torch.Tensor
    chosen: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    expert_rows: torch.Tensor | None = None
    expert_weights: torch.Tensor | None = None
    load_prob: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return self.logits.shape[0]

    @property
    def num_experts(self) -> int:
        return self.logits.shape[1]

    def assignments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(experts, rows, weights), each (N,). Token choice: all first choices in row order, then all second
        choices, ... (the priority a capacity limit drops by). Expert choice: expert-major."""
        if self.chosen is not None:
            T, k = self.chosen.shape
            rows = torch.arange(T, device=self.chosen.device).repeat(k)  # (k*T,)
            return self.chosen.t().reshape(-1), rows, self.weights.t().reshape(-1)
        c, E = self.expert_rows.shape
        experts = torch.arange(E, device=self.expert_rows.device).repeat_interleave(c)
        return experts, self.expert_rows.t().reshape(-1), self.expert_weights.t().reshape(-1)

    @property
    def counts(self) -> torch.Tensor:
        """(E,) int64 rows sent to each expert, before any capacity limit (what loss-free balancing evens out)."""
        experts, _, _ = self.assignments()
        return torch.bincount(experts, minlength=self.num_experts)

    @property
    def mask(self) -> torch.Tensor:
        """(T, E) bool, True where a row is sent to an expert."""
        experts, rows, _ = self.assignments()
        m = torch.zeros(self.logits.shape, dtype=torch.bool, device=self.logits.device)
        m[rows, experts] = True
        return m

    @property
    def combine(self) -> torch.Tensor:
        """(T, E) float32 weights of the chosen experts, 0 elsewhere (differentiable)."""
        experts, rows, weights = self.assignments()
        return torch.zeros_like(self.logits).index_put((rows, experts), weights.float())


from mmoe_rec.nn.routing.expert_choice import ExpertChoiceRouter  # noqa: E402
from mmoe_rec.nn.routing.loss_free import LossFreeBias  # noqa: E402
from mmoe_rec.nn.routing.switch import SwitchRouter  # noqa: E402
from mmoe_rec.nn.routing.topk import NoisyTopKRouter, init_router_weight  # noqa: E402

ROUTERS = ("noisy_topk", "switch", "expert_choice")

__all__ = ["Routing", "NoisyTopKRouter", "SwitchRouter", "ExpertChoiceRouter", "LossFreeBias", "ROUTERS",
           "init_router_weight"]
