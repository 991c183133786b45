"""MLP: Linear -> norm -> activation -> dropout per hidden layer (the order DeepCTR's DNN uses).

Activations by name (relu, gelu, silu, prelu, tanh); norm "none", "batch" (BatchNorm1d) or "layer" (LayerNorm).
With no hidden sizes the MLP is the identity and `output_dim` is the input width.
"""
from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = ("relu", "gelu", "silu", "prelu", "tanh")
NORMS = ("none", "batch", "layer")


def check_activation(name: str) -> str:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")
    return name


def check_norm(name: str) -> str:
    if name not in NORMS:
        raise ValueError(f"unknown norm {name!r}; expected one of {NORMS}")
    return name


def check_dropout(p: float) -> float:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {p}")
    return float(p)


def make_activation(name: str, width: int) -> nn.Module:
    """An activation module; prelu gets one learnable slope per channel (PyTorch's default 0.25)."""
    check_activation(name)
    if name == "prelu":
        return nn.PReLU(num_parameters=width)
    return {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}[name]()


def make_norm(name: str, width: int) -> nn.Module | None:
    check_norm(name)
    if name == "batch":
        return nn.BatchNorm1d(width)
    if name == "layer":
        return nn.LayerNorm(width)
    return None


class MLP(nn.Module):
    """(B, in_dim) -> (B, hidden[-1]); every layer is activated (towers add their own output layer)."""

    def __init__(
        self,
        in_dim: int,
        hidden: list[int] | tuple[int, ...],
        *,
        activation: str = "relu",
        dropout: float = 0.0,
        norm: str = "none",
    ) -> None:
        super().__init__()
        check_activation(activation)
        check_norm(norm)
        check_dropout(dropout)
        if in_dim < 1 or any(h < 1 for h in hidden):
            raise ValueError(f"MLP widths must be >= 1, got in_dim={in_dim}, hidden={list(hidden)}")
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers.append(nn.Linear(d, h))
            n = make_norm(norm, h)
            if n is not None:
                layers.append(n)
            layers.append(make_activation(activation, h))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = h
        self.net = nn.Sequential(*layers)
        self._output_dim = d

    @property
    def output_dim(self) -> int:
        return self._output_dim

    out_dim = output_dim  # the name nn.dispatch / models.sparse_mmoe use

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, in_dim) -> (B, output_dim)
