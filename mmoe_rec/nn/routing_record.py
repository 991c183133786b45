"""What a gate did on one batch, recorded so training can monitor utilization without re-running anything."""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class GateRecord:
    """One gate's routing on one batch. All tensors are detached views that monitoring may read.

    combine: (B, E) float32 weights actually used to mix expert outputs (zeros where an expert is not chosen).
    probs:   (B, E) float32 router probabilities before top-k selection, from the clean logits (without the
             training noise of noisy top-k; equal to `combine` for dense softmax).
    chosen:  (B, k) int64 chosen experts per row (token choice), or None (dense gate, expert choice).
    dropped: scalar int64. Token choice: assignments dropped by the capacity limit (out of B·k). Expert choice:
             rows that no expert took (out of B). 0 when dropless / dense.
    expert_groups: optional name -> expert indices (PLE: {"own": [...], "shared": [...]}).
    extra:   further scalars a router wants logged (router z, bias statistics, ...).
    assigned: (B, E) bool, True where a row was sent to an expert, for routings in which a row gets any number of
             experts (expert choice; `chosen` is None then), else None. Sparse, like `chosen`: load statistics.
    """

    combine: torch.Tensor
    probs: torch.Tensor
    chosen: torch.Tensor | None = None
    dropped: torch.Tensor | None = None
    expert_groups: dict[str, list[int]] | None = None
    extra: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    assigned: torch.Tensor | None = None  # last: the fields before keep their positions

    @property
    def num_experts(self) -> int:
        return self.combine.shape[-1]

    @property
    def drop_base(self) -> int:
        """What `dropped` counts out of, from shapes: B·k assignments (token choice), B rows (expert choice)."""
        return self.chosen.numel() if self.chosen is not None else self.combine.shape[0]
