"""Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias used only to pick the top k.

Selection ranks experts by score_i + b_i; the combine weights come from the scores alone, so the bias never enters
the output nor any gradient. After each optimizer step b_i += gamma * sign(mean_load - load_i): overloaded experts
become less attractive, underloaded ones more, with no loss term competing with the task losses.
"""
from __future__ import annotations

import torch
from torch import nn


class LossFreeBias(nn.Module):
    def __init__(self, num_experts: int, update_rate: float = 1e-3) -> None:
        super().__init__()
        if update_rate <= 0:
            raise ValueError(f"bias update_rate must be > 0, got {update_rate}")
        self.update_rate = update_rate
        self.register_buffer("bias", torch.zeros(num_experts))  # (E,) saved with the model, not trained

    def selection_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """(T, E) scores -> scores used only for ranking (detached bias: no gradient path)."""
        return scores + self.bias.detach()

    @torch.no_grad()
    def update(self, load: torch.Tensor) -> None:
        """load: (E,) rows routed to each expert in the last step."""
        load = load.float()
        self.bias += self.update_rate * torch.sign(load.mean() - load)
