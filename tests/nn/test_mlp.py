"""MLP (towers, the shared bottom): Linear -> norm -> activation -> dropout per layer, every layer activated, against
functional ops written out (the model tests read the towers through the module itself, so a wrong MLP was checked
against itself: a mutation review, 2026-12-07)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmoe_rec.nn.mlp import MLP, make_activation

ACT = {"relu": torch.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


def mlp_reference(mlp: MLP, x: torch.Tensor, activation: str, norm: str) -> torch.Tensor:
    """Linear -> norm -> activation per layer, every layer activated, written with functional ops (eval mode)."""
    linears = [m for m in mlp.net if isinstance(m, nn.Linear)]
    norms = [m for m in mlp.net if isinstance(m, (nn.LayerNorm, nn.BatchNorm1d))]
    prelus = [m for m in mlp.net if isinstance(m, nn.PReLU)]
    h = x
    for i, lin in enumerate(linears):
        z = h @ lin.weight.t() + lin.bias
        if norm == "layer":
            z = F.layer_norm(z, z.shape[-1:], norms[i].weight, norms[i].bias, eps=1e-5)
        elif norm == "batch":
            z = F.batch_norm(z, norms[i].running_mean, norms[i].running_var, norms[i].weight, norms[i].bias,
                             training=False, eps=1e-5)
        h = F.prelu(z, prelus[i].weight) if activation == "prelu" else ACT[activation](z)
    return h


@pytest.mark.parametrize("activation,norm", [("gelu", "layer"), ("relu", "none"), ("silu", "batch"),
                                             ("prelu", "layer"), ("tanh", "none")])
def test_mlp_is_linear_norm_activation_per_layer_every_layer_activated(activation, norm):
    torch.manual_seed(0)
    hidden = [7, 5, 4]
    mlp = MLP(6, hidden, activation=activation, norm=norm, dropout=0.3).double().eval()
    with torch.no_grad():  # away from identity norms and the 0.25 PReLU default
        for m in mlp.net:
            if isinstance(m, (nn.LayerNorm, nn.BatchNorm1d, nn.PReLU)):
                for p in m.parameters():
                    p.uniform_(0.2, 1.5)
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    assert sum(isinstance(m, nn.Linear) for m in mlp.net) == len(hidden) and mlp.output_dim == hidden[-1]
    assert sum(isinstance(m, nn.Dropout) for m in mlp.net) == len(hidden)
    x = torch.randn(9, 6, dtype=torch.float64)
    torch.testing.assert_close(mlp(x), mlp_reference(mlp, x, activation, norm))


def test_prelu_has_one_slope_per_channel():
    assert make_activation("prelu", 7).weight.shape == (7,)
    mlp = MLP(4, [6, 3], activation="prelu")
    assert [m.weight.shape for m in mlp.net if isinstance(m, nn.PReLU)] == [(6,), (3,)]
