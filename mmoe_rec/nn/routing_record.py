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
    importance: (E,) float32 sum over the rows of the gate's weights g(x) before the capacity limit (Importance_i,
             what the importance loss balances), or None: then combine.sum(0) (dense gates, which drop nothing).
             `combine` is after capacity: its sum misses the weight the limit took off the overloaded experts.
    """

    combine: torch.Tensor
    probs: torch.Tensor
    chosen: torch.Tensor | None = None
    dropped: torch.Tensor | None = None
    expert_groups: dict[str, list[int]] | None = None
    extra: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    assigned: torch.Tensor | None = None  # last ones: the fields before keep their positions
    importance: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.combine.shape[-1]

    @property
    def drop_base(self) -> int:
        """What `dropped` counts out of, from shapes: B·k assignments (token choice), B rows (expert choice)."""
        return self.chosen.numel() if self.chosen is not None else self.combine.shape[0]


def concat_records(records: list[GateRecord]) -> GateRecord | None:
    """One gate's records of several batches as one record of all their rows (what monitoring sums is the same),
    or None when they do not line up (other experts, extras or routing kind): then take them one by one.
    `dropped` and `importance` add up; an extra becomes the row-weighted mean of its batch means (monitoring weighs
    each batch's extra by its rows)."""
    first = records[0]
    kinds = {(r.num_experts, r.chosen is None, r.chosen.shape[1] if r.chosen is not None else 0,
              r.assigned is None, r.dropped is None, r.importance is None, tuple(sorted(r.extra))) for r in records}
    if len(kinds) != 1:
        return None
    rows = [r.combine.shape[0] for r in records]
    total = max(sum(rows), 1)
    extra = {key: sum(n * r.extra[key].detach().double().mean() for n, r in zip(rows, records)) / total
             for key in first.extra}
    return GateRecord(
        combine=torch.cat([r.combine for r in records]),
        probs=torch.cat([r.probs for r in records]),
        chosen=None if first.chosen is None else torch.cat([r.chosen for r in records]),
        dropped=None if first.dropped is None else sum(r.dropped for r in records),
        expert_groups=first.expert_groups,
        extra=extra,
        assigned=None if first.assigned is None else torch.cat([r.assigned for r in records]),
        importance=None if first.importance is None else sum(r.importance for r in records),
    )
