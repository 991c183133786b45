"""ModelOutput: what every model's forward returns."""
from __future__ import annotations

import dataclasses

import torch

from mmoe_rec.nn.routing_record import GateRecord


@dataclasses.dataclass
class ModelOutput:
    logits: dict[str, torch.Tensor]  # task -> (B,) raw scores (logits for binary tasks, predictions for regression)
    aux: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # name -> scalar auxiliary loss (unweighted)
    routing: dict[str, GateRecord] = dataclasses.field(default_factory=dict)  # gate name (e.g. task) -> record
