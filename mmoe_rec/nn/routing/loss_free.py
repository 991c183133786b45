"""Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias used only to pick the top k.

Selection ranks experts by score_i + b_i; the combine weights come from the scores alone, so the bias never enters
the output nor any gradient. After each optimizer step b_i += gamma * sign(mean_load - load_i): overloaded experts
become less attractive, underloaded ones more, with no loss term competing with the task losses.

The load of a step is the sum of the loads of its forwards (`add_load`, one per micro-batch under gradient
accumulation), read and reset by `take_load` at the update.
"""
from __future__ import annotations

import torch
from torch import nn

from mmoe_rec.nn.keep_dtype import moving_only


class LossFreeBias(nn.Module):
    def __init__(self, num_experts: int, update_rate: float = 1e-3) -> None:
        super().__init__()
        if update_rate <= 0:
            raise ValueError(f"bias update_rate must be > 0, got {update_rate}")
        self.update_rate = update_rate
        self.register_buffer("bias", torch.zeros(num_experts))  # (E,) saved with the model, not trained
        # (E,) int64 rows routed since the last update. A plain attribute, not a buffer: DDP broadcasts buffers
        # from rank 0 at every forward, which would replace each rank's own count. A checkpoint written inside a
        # gradient-accumulation window keeps every rank's with the window's gradients (training.module).
        self.pending_load: torch.Tensor | None = None

    def _apply(self, fn, recurse: bool = True):
        # the bias stays float32, with its values, when the model is cast (`.to(torch.bfloat16)`, precision
        # "bf16-true", which Lightning applies after restoring a checkpoint): past |b| = 0.5 a step of 1e-3 is below
        # half a bfloat16 ulp, and the bias would stop moving; cast and back, a trained bias is rounded
        return super()._apply(moving_only(fn), recurse)

    def selection_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """(T, E) scores -> scores used only for ranking (detached bias: no gradient path)."""
        return scores + self.bias.detach()

    @torch.no_grad()
    def add_load(self, counts: torch.Tensor) -> None:
        """counts: (E,) rows one forward routed to each expert."""
        counts = counts.detach().long()
        self.pending_load = counts if self.pending_load is None else self.pending_load.to(counts.device) + counts

    def take_load(self) -> torch.Tensor:
        """(E,) int64 rows routed since the last call (zeros if none), and a fresh count."""
        load = self.pending_load if self.pending_load is not None else torch.zeros_like(self.bias, dtype=torch.long)
        self.pending_load = None
        return load

    @torch.no_grad()
    def update(self, load: torch.Tensor) -> None:
        """load: (E,) rows routed to each expert in the last step (all its micro-batches)."""
        load = load.float()
        self.bias += self.update_rate * torch.sign(load.mean() - load)
