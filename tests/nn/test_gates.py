"""DenseGates: softmax reference, float32, temperature, hard gate with a straight-through gradient, records."""
from __future__ import annotations

import pytest
import torch

from mmoe_rec.nn.gates import DenseGates


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(-1).mean()


def test_weights_equal_softmax_of_the_per_gate_logits_and_sum_to_one():
    torch.manual_seed(0)
    gates = DenseGates(6, 4, num_gates=3, temperature=0.7)
    x = torch.randn(10, 6)
    weights, probs = gates(x)
    assert weights.shape == probs.shape == (10, 3, 4) and weights.dtype == torch.float32
    for g in range(3):
        want = torch.softmax(x @ gates.weight[g] / 0.7, dim=-1)
        torch.testing.assert_close(weights[:, g], want)
    torch.testing.assert_close(weights.sum(-1), torch.ones(10, 3))


def test_one_input_per_gate_equals_running_each_gate_on_its_input():
    torch.manual_seed(0)
    gates = DenseGates(5, 3, num_gates=2)
    xs = torch.randn(2, 7, 5)
    weights, _ = gates(xs)
    for g in range(2):
        torch.testing.assert_close(weights[:, g], torch.softmax(xs[g] @ gates.weight[g], dim=-1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_gates_compute_in_float32_whatever_the_input_dtype(dtype):
    torch.manual_seed(0)
    gates = DenseGates(8, 5, num_gates=2)
    x = torch.randn(6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        weights, probs = gates(x.to(dtype))
    assert weights.dtype == probs.dtype == torch.float32
    want, _ = gates(x.to(dtype).float())
    torch.testing.assert_close(weights, want)


def test_lower_temperature_gives_sharper_gates():
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    base = DenseGates(8, 6)
    entropies, maxima = [], []
    for t in (4.0, 1.0, 0.25):
        g = DenseGates(8, 6, temperature=t)
        g.load_state_dict(base.state_dict())
        w = g(x)[0].detach()
        entropies.append(float(entropy(w)))
        maxima.append(float(w.max(-1).values.mean()))
    assert entropies[0] > entropies[1] > entropies[2]
    assert maxima[0] < maxima[1] < maxima[2]


def test_hard_gate_is_one_hot_at_the_softmax_argmax_and_passes_the_soft_gradient_straight_through():
    torch.manual_seed(0)
    hard = DenseGates(5, 4, num_gates=2, kind="hard", temperature=0.5)
    soft = DenseGates(5, 4, num_gates=2, temperature=0.5)
    soft.load_state_dict(hard.state_dict())
    x, upstream = torch.randn(9, 5), torch.randn(9, 2, 4)

    w_hard, p_hard = hard(x)
    assert set(w_hard.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(w_hard.sum(-1), torch.ones(9, 2))
    assert torch.equal(w_hard.argmax(-1), p_hard.argmax(-1))
    (w_hard * upstream).sum().backward()

    w_soft, _ = soft(x)
    (w_soft * upstream).sum().backward()
    assert hard.weight.grad.abs().sum() > 0
    torch.testing.assert_close(hard.weight.grad, soft.weight.grad)  # straight-through: d one-hot := d softmax


def test_records_hold_the_used_weights_and_probabilities_detached():
    torch.manual_seed(0)
    x = torch.randn(7, 3)
    soft = DenseGates(3, 4, num_gates=2)
    w, p = soft(x)
    r = soft.record(w, p, 1, {"own": [0], "shared": [1, 2, 3]})
    assert torch.equal(r.combine, w[:, 1]) and torch.equal(r.probs, p[:, 1])
    assert not r.combine.requires_grad and r.chosen is None and int(r.dropped) == 0
    assert r.expert_groups == {"own": [0], "shared": [1, 2, 3]} and r.num_experts == 4

    hard = DenseGates(3, 4, num_gates=2, kind="hard")
    w, p = hard(x)
    r = hard.record(w, p, 0)
    assert r.chosen.shape == (7, 1) and torch.equal(r.chosen[:, 0], p[:, 0].argmax(-1))


def test_gate_weights_are_uniform_at_one_over_sqrt_in_dim():
    """Documented: nn.Linear's init per gate, U(-1/sqrt(in_dim), 1/sqrt(in_dim)) (no bias). max |w| reaches the
    bound but never passes it and the std is the uniform's bound/sqrt(3) (+-10 %): a bound 10x off, or 1/in_dim,
    fails. Large enough for tight statistics: 4 * 256 * 16 = 16,384 draws (sample std within ~0.5 %)."""
    torch.manual_seed(0)
    gates = DenseGates(256, 16, num_gates=4)
    assert [name for name, _ in gates.named_parameters()] == ["weight"]
    bound = 1 / 256 ** 0.5
    w = gates.weight.detach().double()
    assert w.shape == (4, 256, 16)
    top = float(w.abs().max())
    assert 0.9 * bound < top <= bound, (top, bound)
    assert abs(float(w.std()) / (bound / 3 ** 0.5) - 1) < 0.1, (float(w.std()), bound / 3 ** 0.5)
    assert abs(float(w.mean())) < 0.05 * bound
    for g in range(4):  # every gate drawn at that bound, not only the first
        assert 0.9 * bound < float(w[g].abs().max()) <= bound
        assert abs(float(w[g].std()) / (bound / 3 ** 0.5) - 1) < 0.1
    gates.reset_parameters()  # the same after a reset
    top = float(gates.weight.detach().abs().max())
    assert 0.9 * bound < top <= bound


@pytest.mark.parametrize("kwargs,match", [({"kind": "sparsemax"}, "unknown gate 'sparsemax'"),
                                          ({"temperature": 0.0}, "temperature must be > 0"),
                                          ({"num_gates": 0}, "num_gates >= 1")])
def test_bad_configuration_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DenseGates(3, 4, **kwargs)


def test_wrong_input_shape_is_rejected():
    with pytest.raises(ValueError, match=r"gate input must be \(B, 3\)"):
        DenseGates(3, 4, num_gates=2)(torch.randn(3, 5, 3))


def test_records_live_on_the_gates_device():
    # the monitor adds `dropped` to sums on the gates' device every step: a CPU tensor would be a host copy (and
    # a stream sync) per gate and step on a GPU; the meta device stands in for one here
    gates = DenseGates(6, 4, num_gates=2)
    weights, probs = gates(torch.randn(5, 6))
    record = gates.record(weights.to("meta"), probs.to("meta"), 1)
    assert record.dropped.device.type == "meta" and record.combine.device.type == "meta"


# Gaps a mutation review found (mutmodels): the validation of every size and of a NaN temperature, the dtype of a
# dense record's drop count
@pytest.mark.parametrize("args,kwargs,match", [((0, 4), {}, "in_dim, num_experts, num_gates >= 1"),
                                                ((3, 0), {}, "in_dim, num_experts, num_gates >= 1"),
                                                ((3, 4), {"temperature": float("nan")}, "temperature must be > 0"),
                                                ((3, 4), {"temperature": -1.0}, "temperature must be > 0")])
def test_empty_sizes_and_a_nan_or_negative_temperature_are_rejected(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        DenseGates(*args, **kwargs)


@pytest.mark.parametrize("kind", ["softmax", "hard"])
def test_a_dense_records_drop_count_is_an_int64_zero(kind):
    gates = DenseGates(3, 4, num_gates=2, kind=kind)
    w, p = gates(torch.randn(5, 3))
    r = gates.record(w, p, 0)
    assert r.dropped.dtype == torch.int64 and r.dropped.shape == () and int(r.dropped) == 0
