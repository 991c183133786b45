"""Dense models against references written per expert with F.linear loops on the models' own parameter tensors:
the same outputs AND the same gradient for every parameter and for the input (the formula tests compare outputs
only, so a detached path that leaves the forward unchanged went unnoticed)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmoe_rec.models import MMoE, OMoE, PLE, SharedBottom
from model_inputs import TASKS, spec


def expert(stack, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e of a ReLU ExpertStack without norm, one F.linear per layer."""
    for w, b in zip(stack.weights, stack.biases):
        x = torch.relu(F.linear(x, w[e].t(), b[e]))
    return x


def gate(gates, i: int, x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(F.linear(x.float(), gates.weight[i].t().float()), dim=-1).to(x.dtype)


def mix(g: torch.Tensor, outs: list[torch.Tensor]) -> torch.Tensor:
    return sum(g[:, i:i + 1] * o for i, o in enumerate(outs))


def ref_mmoe(model, x, one_gate=False):
    outs = [expert(model.experts, e, x) for e in range(model.experts.num_experts)]
    return {t: model.towers[t](mix(gate(model.gates, 0 if one_gate else i, x), outs)) for i, t in enumerate(TASKS)}


def ref_ple(model, x):
    """Tang et al. 2020: task t's experts and gate read t's output of the level below, the shared experts and the
    shared gate (all experts of the level; none at the last level) read the shared output."""
    T = len(TASKS)
    task_in, shared_in = [x] * T, x
    for li, lv in enumerate(model.levels):
        own = [[expert(lv.task_experts, t * lv.Kt + j, task_in[t]) for j in range(lv.Kt)] for t in range(T)]
        shared = [expert(lv.shared_experts, j, shared_in) for j in range(lv.Ks)]
        new = [mix(gate(lv.task_gates, t, task_in[t]), own[t] + shared) for t in range(T)]
        if li < len(model.levels) - 1 and lv.Ks:
            shared_in = mix(gate(lv.shared_gate, 0, shared_in), [o for t in range(T) for o in own[t]] + shared)
        task_in = new
    return {t: model.towers[t](task_in[i]) for i, t in enumerate(TASKS)}


def ref_shared_bottom(model, x):
    h = model.bottom(x)
    return {t: model.towers[t](h) for t in TASKS}


CASES = [
    (SharedBottom, dict(bottom_hidden=[7, 5]), ref_shared_bottom),
    (MMoE, dict(num_experts=4, expert_hidden=[7, 5]), ref_mmoe),
    (MMoE, dict(num_experts=3, expert_hidden=[6]), ref_mmoe),
    (OMoE, dict(num_experts=3, expert_hidden=[7, 5]), lambda m, x: ref_mmoe(m, x, one_gate=True)),
    (PLE, dict(num_levels=3, num_task_experts=2, num_shared_experts=2, expert_hidden=[7, 5]), ref_ple),
    (PLE, dict(num_levels=2, num_task_experts=1, num_shared_experts=0, expert_hidden=[6]), ref_ple),
    (PLE, dict(num_levels=2, num_task_experts=0, num_shared_experts=2, expert_hidden=[6]), ref_ple),
    (PLE, dict(num_levels=1, num_task_experts=2, num_shared_experts=1, expert_hidden=[6, 4]), ref_ple),
]


@pytest.mark.parametrize("cls,kwargs,ref", CASES)
@pytest.mark.parametrize("rows", [1, 9])
def test_outputs_and_every_gradient_equal_a_per_expert_reference(cls, kwargs, ref, rows):
    torch.manual_seed(0)
    model = cls(spec(), tower_hidden=[3], **kwargs)
    x = torch.randn(rows, model.front.output_dim, requires_grad=True)
    weights = torch.randn(len(TASKS))
    params = [p for n, p in model.named_parameters() if not n.startswith("front.")]

    def grads(logits):
        loss = sum(w * logits[t].sum() for w, t in zip(weights, TASKS))
        return torch.autograd.grad(loss, [x, *params], allow_unused=True)

    got_logits, want_logits = model.forward_dense(x).logits, ref(model, x)
    for t in TASKS:
        torch.testing.assert_close(got_logits[t], want_logits[t], atol=1e-5, rtol=1e-5)
    names = ["x"] + [n for n, p in model.named_parameters() if not n.startswith("front.")]
    for name, g, w in zip(names, grads(got_logits), grads(want_logits), strict=True):
        if w is None:
            assert g is None or not g.any(), name
        else:
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4, msg=name)
