"""softmax_last_dim: the values and gradients of torch.softmax over the last dimension, whichever way it takes."""
from __future__ import annotations

import pytest
import torch

from mmoe_rec.nn import softmax as softmax_module
from mmoe_rec.nn.softmax import softmax_last_dim, transposed_softmax, transposes

SHAPES = [(1, 1), (7, 2), (1024, 8), (33, 2, 8), (5, 3, 4, 15), (64, 16), (40, 17), (9, 64)]


def values_and_grad(fn, z: torch.Tensor, upstream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = z.clone().requires_grad_()
    out = fn(leaf)
    out.backward(upstream)
    return out.detach(), leaf.grad


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("way", ["transposed", "dispatched"])
def test_matches_torch_softmax(shape, dtype, way):
    g = torch.Generator().manual_seed(len(shape) * 100 + shape[-1])
    z = torch.randn(*shape, generator=g, dtype=dtype) * 4
    upstream = torch.randn(*shape, generator=g, dtype=dtype)
    ours = transposed_softmax if way == "transposed" else softmax_last_dim
    p, grad = values_and_grad(ours, z, upstream)
    p_ref, grad_ref = values_and_grad(lambda t: torch.softmax(t, dim=-1), z, upstream)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(p, p_ref, **tol)
    torch.testing.assert_close(grad, grad_ref, **tol)
    assert p.shape == z.shape


def test_extreme_logits_stay_finite():
    z = torch.tensor([[1e4, -1e4, 0.0, 3.0], [-1e30, -1e30, -1e30, -1e30]])
    p = transposed_softmax(z)
    torch.testing.assert_close(p, torch.softmax(z, dim=-1))
    assert torch.isfinite(p).all()


def test_gradcheck_float64():
    z = torch.randn(6, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(transposed_softmax, (z,))


def test_which_way(monkeypatch):
    monkeypatch.setattr(softmax_module, "_cpu_lanes", lambda: 16)  # an AVX-512 CPU
    assert transposes(torch.zeros(4, 8)) and transposes(torch.zeros(4, 15)) and transposes(torch.zeros(2, 3, 7))
    assert not transposes(torch.zeros(4, 16)) and not transposes(torch.zeros(4, 64))
    assert transposes(torch.zeros(4, 7, dtype=torch.float64)) and not transposes(torch.zeros(4, 8, dtype=torch.float64))
    assert not transposes(torch.zeros(8))  # one row: nothing to vectorize across
    assert not transposes(torch.zeros(4, 8, dtype=torch.bfloat16))
    assert not transposes(torch.zeros(0, 8))
    monkeypatch.setattr(softmax_module, "_cpu_lanes", lambda: 8)  # AVX2
    assert transposes(torch.zeros(4, 7)) and not transposes(torch.zeros(4, 8))
    monkeypatch.setattr(softmax_module, "_cpu_lanes", lambda: 0)  # no measured kernels: always torch.softmax
    assert not transposes(torch.zeros(4, 2))


def test_gates_and_routers_use_it():
    from mmoe_rec.nn.gates import DenseGates
    from mmoe_rec.nn.routing import ExpertChoiceRouter, NoisyTopKRouter

    torch.manual_seed(0)
    x = torch.randn(50, 12)
    gates = DenseGates(12, 8, 2)
    weights, probs = gates(x)
    torch.testing.assert_close(probs, torch.softmax(gates.logits(x), dim=-1))
    router = NoisyTopKRouter(12, 8, 2, noise=False)
    routing = router(x)
    torch.testing.assert_close(routing.probs, torch.softmax(x @ router.w_gate, dim=1))
    chooser = ExpertChoiceRouter(12, 8, capacity_factor=1.0)
    torch.testing.assert_close(chooser(x).probs, torch.softmax(x @ chooser.w_gate, dim=1))
