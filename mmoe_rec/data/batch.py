"""The Batch that moves one mini-batch from the data module to a model."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


@dataclasses.dataclass
class Batch:
    sparse: KeyedJaggedTensor  # keys = spec.sparse_features names, one bag per row per key
    dense: torch.Tensor  # (B, D) float32, D = spec.dense_dim (may be 0)
    labels: dict[str, torch.Tensor]  # task -> (B,) float32
    weights: torch.Tensor | None = None  # (B,) float32 sample weights
    ids: dict[str, Any] | None = None  # id columns passed through (Arrow arrays: type and nulls kept), never features
    # the loader worker that made it: each worker makes one contiguous block of its rank's rows, and the DataLoader
    # interleaves the blocks (the prediction writer puts rows back in order by it)
    worker: int = 0
    # under several DDP ranks: the rows of this step summed over the ranks (the training loss's global mean)
    step_rows: int | None = None

    @property
    def batch_size(self) -> int:
        return self.dense.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """A copy on `device`. From page-locked memory (DataModule `pin_memory`) to a GPU the copy is
        asynchronous even when not asked: Lightning passes `non_blocking` to tensors only, not to a Batch."""
        device = torch.device(device)
        non_blocking = non_blocking or (device.type == "cuda" and self.dense.is_pinned())
        return Batch(
            sparse=self.sparse.to(device=device, non_blocking=non_blocking),
            dense=self.dense.to(device, non_blocking=non_blocking),
            labels={k: v.to(device, non_blocking=non_blocking) for k, v in self.labels.items()},
            weights=None if self.weights is None else self.weights.to(device, non_blocking=non_blocking),
            ids=self.ids,
            worker=self.worker,
            step_rows=self.step_rows,
        )

    def pin_memory(self) -> "Batch":
        return Batch(
            sparse=self.sparse.pin_memory(),
            dense=self.dense.pin_memory(),
            labels={k: v.pin_memory() for k, v in self.labels.items()},
            weights=None if self.weights is None else self.weights.pin_memory(),
            ids=self.ids,
            worker=self.worker,
            step_rows=self.step_rows,
        )
