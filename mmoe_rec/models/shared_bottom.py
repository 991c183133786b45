"""Shared-bottom: one MLP shared by all tasks, then one tower per task (Caruana 1997; the MMoE paper's baseline).

x = front(batch); h = bottom(x); y_t = tower_t(h). No gates: the routing record is empty.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from mmoe_rec.features.spec import FeatureSpec
from mmoe_rec.models.base import MultiTaskModel
from mmoe_rec.models.output import ModelOutput
from mmoe_rec.nn.embedding import EmbeddingFront
from mmoe_rec.nn.mlp import MLP
from mmoe_rec.nn.towers import make_towers


class SharedBottom(MultiTaskModel):
    def __init__(
        self,
        feature_spec: FeatureSpec,
        *,
        tasks: list[str] | None = None,
        embedding_dim: int = 8,
        embedding_dims: dict[str, int] | None = None,
        pooling: str | dict[str, str] = "sum",
        bottom_hidden: list[int] | tuple[int, ...] = (64,),
        tower_hidden: list[int] | tuple[int, ...] = (16,),
        activation: str = "relu",
        dropout: float = 0.0,
        norm: str = "none",
    ) -> None:
        super().__init__(feature_spec, tasks)
        self.front = EmbeddingFront(feature_spec, embedding_dim=embedding_dim, embedding_dims=embedding_dims,
                                    pooling=pooling)
        self.bottom = MLP(self.front.output_dim, list(bottom_hidden), activation=activation, dropout=dropout,
                          norm=norm)
        self.towers = make_towers(self.tasks, self.bottom.output_dim, list(tower_hidden), activation=activation,
                                  dropout=dropout, norm=norm)

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.front.parameters()
        yield from self.bottom.parameters()

    def last_shared_layer(self) -> list[nn.Parameter]:
        linears = [m for m in self.bottom.net if isinstance(m, nn.Linear)]
        return [linears[-1].weight] if linears else []

    def forward_dense(self, x: torch.Tensor) -> ModelOutput:
        """Everything after the embedding front: x (B, D_in) -> ModelOutput."""
        h = self.bottom(x)  # (B, H)
        return ModelOutput(logits={t: self.towers[t](h) for t in self.tasks}, aux={}, routing={})
