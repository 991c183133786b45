"""Balance losses against values computed by hand on small examples."""
from __future__ import annotations

import math

import pytest
import torch

from mmoe_rec.nn.balance import cv_squared, importance_loss, load_loss, router_z_loss, switch_loss
from mmoe_rec.nn.routing import NoisyTopKRouter


def test_cv_squared_is_zero_for_uniform_and_e_minus_1_for_one_hot():
    assert cv_squared(torch.full((4,), 3.0)).item() == pytest.approx(0.0, abs=1e-12)
    assert cv_squared(torch.tensor([8.0, 0.0, 0.0, 0.0])).item() == pytest.approx(3.0, rel=1e-6)
    # [1, 3]: mean 2, population variance 1 -> 1/4
    assert cv_squared(torch.tensor([1.0, 3.0])).item() == pytest.approx(0.25, rel=1e-6)


def test_cv_squared_of_all_zero_load_is_zero_not_nan():
    v = torch.zeros(5, requires_grad=True)
    out = cv_squared(v)
    out.backward()
    assert out.item() == 0.0 and torch.isfinite(v.grad).all()


def test_importance_loss_hand_example():
    combine = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.5, 0.0, 0.5]])  # importance (1, 1, 1)
    assert importance_loss(combine).item() == pytest.approx(0.0, abs=1e-12)
    combine = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])  # one expert takes all: E - 1
    assert importance_loss(combine).item() == pytest.approx(2.0, rel=1e-6)
    combine = torch.tensor([[0.75, 0.25], [0.75, 0.25]])  # importance (1.5, 0.5): mean 1, var 0.25
    assert importance_loss(combine).item() == pytest.approx(0.25, rel=1e-6)


def test_switch_loss_is_one_for_uniform_and_e_for_one_expert():
    E, T = 4, 8
    probs = torch.full((T, E), 1.0 / E)
    chosen = torch.tensor([[0, 1], [2, 3]] * 4)  # k = 2, every expert 4 times: counts/(k*T) = 1/4
    counts = torch.bincount(chosen.reshape(-1), minlength=E)
    assert switch_loss(probs, counts).item() == pytest.approx(1.0, rel=1e-6)
    probs = torch.zeros(T, E)
    probs[:, 2] = 1.0
    counts = torch.tensor([0, 0, T, 0])
    assert switch_loss(probs, counts).item() == pytest.approx(float(E), rel=1e-6)


def test_switch_loss_hand_example_and_gradient_through_probs_only():
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6]], requires_grad=True)
    counts = torch.tensor([2, 0])  # both rows to expert 0: f = (1, 0), P = (0.55, 0.45)
    loss = switch_loss(probs, counts)
    assert loss.item() == pytest.approx(2 * 0.55, rel=1e-6)
    loss.backward()
    assert torch.allclose(probs.grad, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))  # E * f_i / T


def test_router_z_loss_hand_example():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # logsumexp: log 2, log 4
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def test_load_loss_is_zero_not_nan_without_noise():
    router = NoisyTopKRouter(6, 4, k=2, noise=True)
    router.eval()
    r = router(torch.randn(10, 6))
    assert r.load_prob is None
    loss = load_loss(r.load_prob)
    assert loss.item() == 0.0 and not torch.isnan(loss)


def test_load_loss_in_training_is_finite_and_reaches_both_router_weights():
    torch.manual_seed(0)
    router = NoisyTopKRouter(6, 4, k=2, noise=True, init="normal", init_std=0.5)
    r = router(torch.randn(32, 6))
    loss = load_loss(r.load_prob)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert router.w_gate.grad.abs().sum() > 0 and router.w_noise.grad.abs().sum() > 0


def test_switch_and_z_losses_of_a_batch_of_no_rows_are_zero_not_nan():
    # 0 rows are supported by every router; mean() of nothing was NaN, and 0 * NaN kept the monitor's router-z NaN
    logits = torch.zeros(0, 4, requires_grad=True)
    probs = logits.softmax(-1)
    for loss in (switch_loss(probs, torch.zeros(4, dtype=torch.long)), router_z_loss(logits)):
        assert loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, logits)
        assert grad.shape == (0, 4)



# A gap a mutation review found (mutmodels): the load loss sums P(x, i) over rows (per expert), not over experts
def test_load_loss_hand_example_is_the_cv_squared_of_the_per_expert_sums():
    load_prob = torch.tensor([[0.9, 0.1, 0.5], [0.9, 0.3, 0.1], [0.6, 0.2, 0.0]])  # rows sum alike, experts do not
    # Load = (2.4, 0.6, 0.6): mean 1.2, population variance 0.72 -> 0.5
    assert load_loss(load_prob).item() == pytest.approx(0.5, rel=1e-6)
    assert load_loss(torch.full((5, 4), 0.3)).item() == pytest.approx(0.0, abs=1e-12)
