"""What a gate did on one batch, recorded so training can monitor utilization without re-running anything."""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class GateRecord:
    """One gate's routing on one batch. All tensors are detached views that monitoring may read.

    combine: (B, E) float32 weights actually used to mix expert outputs (zeros where an expert is not chosen).
    probs:   (B, E) float32 router probabilities before top-k selection (equal to `combine` for dense softmax).
    chosen:  (B, k) int64 chosen experts per row, or None for a dense gate.
    dropped: scalar int64, assignments dropped by the capacity limit (0 when dropless / dense).
    expert_groups: optional name -> expert indices (PLE: {"own": [...], "shared": [...]}).
    extra:   further scalars a router wants logged (router z, bias statistics, ...).
    """

    combine: torch.Tensor
    probs: torch.Tensor
    chosen: torch.Tensor | None = None
    dropped: torch.Tensor | None = None
    expert_groups: dict[str, list[int]] | None = None
    extra: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    @property
    def num_experts(self) -> int:
        return self.combine.shape[-1]
