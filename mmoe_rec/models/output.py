"""ModelOutput: what every model's forward returns."""
from __future__ import annotations

import dataclasses

import torch

from mmoe_rec.nn.routing_record import GateRecord

# what the gates did in one forward (DESIGN.md's `routing: RoutingStats`): gate name (a task, or "<level>/<task>"
# in PLE) -> its GateRecord (combine weights, router probabilities, chosen experts, drops)
RoutingStats = dict[str, GateRecord]


@dataclasses.dataclass
class ModelOutput:
    logits: dict[str, torch.Tensor]  # task -> (B,) raw scores (logits for binary tasks, predictions for regression)
    aux: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # name -> scalar auxiliary loss (unweighted)
    routing: RoutingStats = dataclasses.field(default_factory=dict)  # gate name (e.g. task) -> record
