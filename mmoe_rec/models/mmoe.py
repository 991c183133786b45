"""MMoE (Ma et al., KDD 2018): N shared experts, one softmax gate per task, one tower per task.

x = front(batch)                                        # (B, D_in)
experts = [f_1(x) .. f_N(x)]                            # (B, N, H)   one GEMM per layer for all experts
g_t = softmax(W_t x / temperature)                      # (B, T, N)   one GEMM for all task gates
y_t = tower_t(sum_i g_t,i * f_i(x))                     # one bmm mixes all tasks: (B, T, N) @ (B, N, H)

Routing records: one per task, under the task's name.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from mmoe_rec.features.spec import FeatureSpec
from mmoe_rec.models.base import MultiTaskModel
from mmoe_rec.models.output import ModelOutput
from mmoe_rec.nn.embedding import EmbeddingFront
from mmoe_rec.nn.experts import ExpertStack
from mmoe_rec.nn.gates import DenseGates
from mmoe_rec.nn.towers import make_towers


class MMoE(MultiTaskModel):
    def __init__(
        self,
        feature_spec: FeatureSpec,
        *,
        tasks: list[str] | None = None,
        embedding_dim: int = 8,
        embedding_dims: dict[str, int] | None = None,
        pooling: str | dict[str, str] = "sum",
        num_experts: int = 8,
        expert_hidden: list[int] | tuple[int, ...] = (64,),
        tower_hidden: list[int] | tuple[int, ...] = (16,),
        activation: str = "relu",
        dropout: float = 0.0,
        norm: str = "none",
        gate: str = "softmax",
        gate_temperature: float = 1.0,
    ) -> None:
        super().__init__(feature_spec, tasks)
        self.front = EmbeddingFront(feature_spec, embedding_dim=embedding_dim, embedding_dims=embedding_dims,
                                    pooling=pooling)
        d_in = self.front.output_dim
        self.experts = ExpertStack(num_experts, d_in, list(expert_hidden), activation=activation, dropout=dropout,
                                   norm=norm)
        self.gates = DenseGates(d_in, num_experts, self._num_gates(), kind=gate, temperature=gate_temperature)
        self.towers = make_towers(self.tasks, self.experts.output_dim, list(tower_hidden), activation=activation,
                                  dropout=dropout, norm=norm)

    def _num_gates(self) -> int:
        return len(self.tasks)  # one per task

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.front.parameters()
        yield from self.experts.parameters()

    def last_shared_layer(self) -> list[nn.Parameter]:
        return [self.experts.weights[-1]]  # (E, h_{L-1}, H): every expert's last layer

    def forward_dense(self, x: torch.Tensor) -> ModelOutput:
        """Everything after the embedding front: x (B, D_in) -> ModelOutput."""
        expert_out = self.experts(x)  # (B, N, H)
        weights, probs = self.gates(x)  # (B, T, N) float32
        mixed = torch.bmm(weights.to(expert_out.dtype), expert_out)  # (B, T, H)
        per_task = mixed.unbind(1)  # T x (B, H); one stack in backward (indexing would zero-fill per task)
        logits = {t: self.towers[t](per_task[i]) for i, t in enumerate(self.tasks)}
        routing = {t: self.gates.record(weights, probs, i) for i, t in enumerate(self.tasks)}
        return ModelOutput(logits=logits, aux={}, routing=routing)
