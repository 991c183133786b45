"""OMoE: MMoE with one gate shared by all tasks (the "one-gate" baseline of Ma et al., KDD 2018).

x = front(batch); h = sum_i g_i(x) * f_i(x) with g = softmax(W x / temperature); y_t = tower_t(h).
Routing record: the one gate, under the name "shared". Same arguments as MMoE.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from mmoe_rec.models.mmoe import MMoE
from mmoe_rec.models.output import ModelOutput

GATE_NAME = "shared"


class OMoE(MMoE):
    def _num_gates(self) -> int:
        return 1

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        yield from super().shared_parameters()
        yield from self.gates.parameters()  # the gate is shared by every task too

    def forward_dense(self, x: torch.Tensor) -> ModelOutput:
        """Everything after the embedding front: x (B, D_in) -> ModelOutput."""
        expert_out = self.experts(x)  # (B, N, H)
        weights, probs = self.gates(x)  # (B, 1, N) float32
        mixed = torch.bmm(weights.to(expert_out.dtype), expert_out)[:, 0]  # (B, H)
        logits = {t: self.towers[t](mixed) for t in self.tasks}
        return ModelOutput(logits=logits, aux={}, routing={GATE_NAME: self.gates.record(weights, probs, 0)})
