"""Tower: a task's head, MLP -> one output per row (a logit for binary tasks, a prediction for regression)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmoe_rec.nn.mlp import MLP


class Tower(nn.Module):
    """(B, in_dim) -> (B,). With hidden = [] the tower is one Linear layer."""

    def __init__(
        self,
        in_dim: int,
        hidden: list[int] | tuple[int, ...] = (16,),
        *,
        activation: str = "relu",
        dropout: float = 0.0,
        norm: str = "none",
    ) -> None:
        super().__init__()
        self.mlp = MLP(in_dim, hidden, activation=activation, dropout=dropout, norm=norm)
        self.out = nn.Linear(self.mlp.output_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mlp(x)  # (B, h)
        if h.dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled(h.device.type):
            # the output layer in float32 (it is tiny): a bf16 logit has 8 bits of mantissa, and a bf16 model's
            # scores tied in whole blocks (151 distinct scores in 2,057 rows), which AUC and any top-N ordering read
            with torch.autocast(h.device.type, enabled=False):
                return F.linear(h.float(), self.out.weight.float(), self.out.bias.float()).squeeze(-1)
        return self.out(h).squeeze(-1)  # (B,)


def make_towers(names: list[str], in_dim: int, hidden: list[int] | tuple[int, ...], *, activation: str = "relu",
                dropout: float = 0.0, norm: str = "none") -> nn.ModuleDict:
    """One Tower per name (task), all of the same shape."""
    return nn.ModuleDict({n: Tower(in_dim, hidden, activation=activation, dropout=dropout, norm=norm) for n in names})
