"""Vectorized dispatch against the naive per-expert loop and the dense every-expert path; capacity dropping."""
from __future__ import annotations

import pytest
import torch

import mmoe_rec.nn.dispatch as dispatch
from mmoe_rec.nn.dispatch import StackedExperts, apply_capacity, capacity_for, expert_blocks, plan_dispatch


def random_assignments(T, E, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    chosen = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])  # (T, k) distinct per row
    weights = torch.rand(T, k, generator=g, dtype=torch.float64)
    rows = torch.arange(T).repeat(k)
    return chosen, chosen.t().reshape(-1), rows, weights.t().reshape(-1)


def dense_combine(experts, rows, weights, T, E):
    return torch.zeros(T, E, dtype=weights.dtype, device=weights.device).index_put((rows, experts), weights,
                                                                                  accumulate=True)


def assert_three_paths_agree(ex, x, w, experts, rows, plan, dtype):
    """Vectorized dispatch, the per-expert loop and the dense every-expert path: same outputs and gradients.
    Returns the vectorized output."""
    T, E = x.shape[0], ex.num_experts
    gout = torch.randn(T, ex.out_dim, dtype=dtype, device=x.device)
    results = []
    for run in (lambda: ex(x, plan, w),
                lambda: ex.forward_loop(x, experts, rows, w),
                lambda: ex.forward_dense(x, dense_combine(experts, rows, w, T, E))):
        out = run()
        results.append((out, torch.autograd.grad((out * gout).sum(), [x, w, *ex.parameters()])))
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-4)
    for out, grads in results[1:]:
        torch.testing.assert_close(out, results[0][0], **tol)
        for a, b in zip(grads, results[0][1]):
            torch.testing.assert_close(a, b, **tol)
    return results[0][0]


@pytest.mark.parametrize("layout,dtype,act,activate_last", [
    ("padded", torch.float64, "relu", True),
    ("padded", torch.float64, "gelu", False),
    ("grouped", torch.float32, "relu", False),
    ("grouped", torch.float32, "tanh", True),
])
def test_vectorized_equals_loop_equals_dense_forward_and_grads(layout, dtype, act, activate_last):
    T, E, k, d = 40, 6, 2, 8
    torch.manual_seed(0)
    ex = StackedExperts(E, d, [16, 8], activation=act, activate_last=activate_last).to(dtype)
    _, experts, rows, weights = random_assignments(T, E, k)
    experts[experts == 5] = 4  # expert 5 gets nothing: empty groups must work
    x = torch.randn(T, d, dtype=dtype, requires_grad=True)
    w = weights.to(dtype).requires_grad_(True)
    plan = ex.plan(experts, rows, num_out=T, layout=layout, dtype=dtype)
    assert plan.layout == layout
    assert_three_paths_agree(ex, x, w, experts, rows, plan, dtype)


@pytest.mark.parametrize("layout,dtype,act,activate_last,block_slots", [
    ("padded", torch.float64, "relu", True, 0),
    ("padded", torch.float64, "tanh", False, 0),
    ("grouped", torch.float32, "relu", True, 0),
    ("grouped", torch.float32, "gelu", False, 16),
])
def test_layer_norm_experts_vectorized_equals_loop_and_dense(monkeypatch, layout, dtype, act, activate_last,
                                                             block_slots):
    T, E, k, d = 50, 6, 2, 8
    torch.manual_seed(0)
    ex = StackedExperts(E, d, [16, 8], activation=act, activate_last=activate_last, norm="layer").to(dtype)
    with torch.no_grad():  # away from the identity init, so a wrong gamma / beta index would show
        for p in [*ex.norm_weights, *ex.norm_biases]:
            p.uniform_(0.5, 1.5)
    assert len(ex.norm_weights) == (2 if activate_last else 1)
    _, experts, rows, weights = random_assignments(T, E, k)
    experts[experts == 2] = 3  # an empty expert
    x = torch.randn(T, d, dtype=dtype, requires_grad=True)
    w = weights.to(dtype).requires_grad_(True)
    plan = ex.plan(experts, rows, num_out=T, layout=layout, dtype=dtype)
    monkeypatch.setattr(dispatch, "CPU_BLOCK_SLOTS", block_slots)
    assert_three_paths_agree(ex, x, w, experts, rows, plan, dtype)


def test_layer_norm_dispatch_gradcheck_and_dense_expert_stack_agrees():
    from mmoe_rec.nn.experts import ExpertStack

    torch.manual_seed(0)
    T, E, d = 10, 3, 4
    ex = StackedExperts(E, d, [6, 5], activation="tanh", norm="layer", dropout=0.2).double()
    with torch.no_grad():
        for p in [*ex.norm_weights, *ex.norm_biases]:
            p.uniform_(0.5, 1.5)
    _, experts, rows, weights = random_assignments(T, E, 2, seed=2)
    plan = plan_dispatch(experts, rows, E, num_out=T, layout="padded")
    x = torch.randn(T, d, dtype=torch.float64, requires_grad=True)
    w = weights.clone().requires_grad_(True)

    def train_step(x, w, *params):
        torch.manual_seed(3)  # the same dropout masks on every call
        return ex(x, plan, w)

    assert torch.autograd.gradcheck(train_step, (x, w, *ex.parameters()))
    # the dense experts with the same weights (same names) compute the same experts
    dense = ExpertStack(E, d, [6, 5], activation="tanh", norm="layer").double()
    dense.load_state_dict(ex.state_dict(), strict=False)
    ex.eval()
    torch.testing.assert_close(dense(x).transpose(0, 1), ex.forward_all(x))
    with pytest.raises(ValueError, match="norm"):
        StackedExperts(E, d, [6], norm="batch")


def test_expert_blocks_cover_every_expert_and_slot_once():
    counts = torch.tensor([5, 0, 3, 9, 0, 0, 4, 1])
    offsets = counts.cumsum(0).to(torch.int32)
    for block_slots in (1, 4, 6, 100, 0):
        blocks = expert_blocks(offsets, int(counts.sum()), 8, block_slots)
        assert blocks[0][:3:2] == (0, 0) and blocks[-1][1] == 8 and blocks[-1][3] == 22
        for (e0, e1, s0, s1), (f0, _, t0, _) in zip(blocks, blocks[1:]):
            assert e1 == f0 and s1 == t0 and e0 < e1  # contiguous, no expert twice
        for e0, e1, s0, s1 in blocks:  # a block owns exactly its experts' slots
            assert s1 - s0 == int(counts[e0:e1].sum())
    assert expert_blocks(None, 22, 8, 4) == [(0, 8, 0, 22)]  # padded layout: one block


@pytest.mark.parametrize("block_slots", [0, 7, 16, 33])
@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_blocked_grouped_dispatch_equals_the_loop(monkeypatch, block_slots, act):
    """The CPU grouped path runs in blocks of whole experts: every block size gives the loop's (and the dense
    path's) values and grads."""
    T, E, k, d = 60, 7, 2, 8
    torch.manual_seed(0)
    ex = StackedExperts(E, d, [16, 8], activation=act)
    _, experts, rows, weights = random_assignments(T, E, k)
    experts[experts == 3] = 4  # an empty expert inside a block
    x = torch.randn(T, d, requires_grad=True)
    w = weights.float().requires_grad_(True)
    plan = ex.plan(experts, rows, num_out=T, layout="grouped")
    gout = torch.randn(T, ex.out_dim)
    monkeypatch.setattr(dispatch, "CPU_BLOCK_SLOTS", block_slots)
    out = assert_three_paths_agree(ex, x, w, experts, rows, plan, torch.float32)
    # with dropout the blocks draw their masks in their own order: still one deterministic function of the seed
    ex.dropout = 0.3
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        o = ex(x, plan, w)
        runs.append((o, torch.autograd.grad((o * gout).sum(), [x, w, *ex.parameters()])))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=0, atol=0)
    assert not torch.allclose(runs[0][0], out) and all(torch.isfinite(g).all() for g in runs[0][1])


def test_dispatch_gradcheck_padded():
    torch.manual_seed(0)
    T, E, d = 12, 4, 3
    ex = StackedExperts(E, d, [5, 2], activation="tanh").double()
    _, experts, rows, weights = random_assignments(T, E, 2, seed=1)
    plan = plan_dispatch(experts, rows, E, num_out=T, layout="padded")
    x = torch.randn(T, d, dtype=torch.float64, requires_grad=True)
    w = weights.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, w, *p: ex(x, plan, w), (x, w, *ex.parameters()))


@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_dispatch_with_dropout_gradcheck_and_eval_is_unchanged(act):
    """Reseeding before every call fixes the dropout mask, so the training path is a deterministic function that
    gradcheck can verify (the ReLU path recovers the mask from its saved output, the others save it)."""
    T, E, d = 12, 4, 3
    torch.manual_seed(0)
    ex = StackedExperts(E, d, [6, 4], activation=act, dropout=0.4).double()
    _, experts, rows, weights = random_assignments(T, E, 2, seed=1)
    plan = plan_dispatch(experts, rows, E, num_out=T, layout="padded")
    x = torch.randn(T, d, dtype=torch.float64, requires_grad=True)
    w = weights.clone().requires_grad_(True)

    def train_step(x, w, *params):
        torch.manual_seed(123)
        return ex(x, plan, w)

    ex.train()
    assert torch.autograd.gradcheck(train_step, (x, w, *ex.parameters()))
    dropped = train_step(x, w)
    ex.eval()
    plain = ex(x, plan, w)
    assert not torch.allclose(dropped, plain)  # masks do something in training
    ex.dropout = 0.0
    torch.testing.assert_close(ex(x, plan, w), plain)  # and nothing in eval
    # one layer: the output is linear in the mask, so the mean over many masks approaches the eval output
    one = StackedExperts(E, d, [6], activation=act, dropout=0.4).double()
    one.eval()
    expected = one(x, plan, w)
    one.train()
    mean = torch.stack([one(x, plan, w) for _ in range(2000)]).mean(0)
    assert (mean - expected).abs().max() < 0.05 * expected.abs().max()


def test_a_padding_slot_whose_expert_overflows_leaves_row_0_alone():
    """Padding slots run their expert on row 0 with weight 0; where that expert overflows on row 0 (float16),
    0 * inf = NaN made row 0's output NaN although row 0 never chose it. Now row 0 equals the loop's."""
    torch.manual_seed(0)
    stack = StackedExperts(2, 4, [8, 4])
    with torch.no_grad():
        for w in stack.weights:
            w[1].mul_(3000.0)  # expert 1 overflows float16 (max 65504) on a large input
    stack = stack.to(torch.float16)
    x = torch.tensor([[5.0, 5, 5, 5], [0.01, 0.01, 0.01, 0.01], [0.01, -0.01, 0.01, -0.01]], dtype=torch.float16)
    assert not torch.isfinite(stack.forward_all(x[:1])[1]).all()
    experts, rows, w = torch.tensor([0, 0, 1]), torch.tensor([0, 1, 2]), torch.ones(3, dtype=torch.float16)
    plan = stack.plan(experts, rows, layout="padded", dtype=torch.float16)
    assert plan.capacity == 2 and plan.rows.tolist() == [0, 1, 2, 0]  # expert 1's padding slot holds row 0
    out = stack(x, plan, w)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, stack.forward_loop(x, experts, rows, w), rtol=0, atol=0)


def test_multi_gate_outputs_go_to_their_own_rows():
    torch.manual_seed(0)
    T, E, d, G = 10, 5, 4, 3
    ex = StackedExperts(E, d, [6]).double()
    x = torch.randn(T, d, dtype=torch.float64)
    parts = [random_assignments(T, E, 2, seed=g) for g in range(G)]
    experts = torch.cat([p[1] for p in parts])
    rows = torch.cat([p[2] for p in parts])
    out_rows = torch.cat([p[2] + g * T for g, p in enumerate(parts)])
    weights = torch.cat([p[3] for p in parts])
    plan = ex.plan(experts, rows, out_rows=out_rows, num_out=G * T, dtype=x.dtype)
    out = ex(x, plan, weights).view(G, T, -1)
    for g, (_, e, r, w) in enumerate(parts):
        torch.testing.assert_close(out[g], ex.forward_dense(x, dense_combine(e, r, w, T, E)))


def test_plan_sizes_the_output_from_the_output_rows_when_num_out_is_not_given():
    torch.manual_seed(0)
    ex = StackedExperts(3, 4, [5]).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    experts, rows = torch.tensor([0, 1, 2, 0]), torch.tensor([0, 1, 2, 4])
    out_rows = rows + 5  # a second gate's rows
    plan = ex.plan(experts, rows, out_rows=out_rows, dtype=x.dtype)
    assert plan.num_out == 10
    out = ex(x, plan, torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(out[5:], ex.forward_loop(x, experts, rows, torch.ones(4, dtype=torch.float64)))
    assert out[:5].abs().sum() == 0


def test_gradients_reach_every_chosen_expert_and_no_other():
    torch.manual_seed(0)
    T, E, d = 20, 8, 4
    ex = StackedExperts(E, d, [6, 3])
    chosen = torch.randint(0, 5, (T, 1))  # experts 5..7 never chosen
    plan = ex.plan(chosen.reshape(-1), torch.arange(T), num_out=T)
    out = ex(torch.randn(T, d), plan, torch.rand(T) + 0.1)
    out.pow(2).sum().backward()
    used = torch.unique(chosen)
    for p in ex.parameters():
        per_expert = p.grad.reshape(E, -1).abs().sum(1)
        assert (per_expert[used] > 0).all()
        assert (per_expert[5:] == 0).all()


def test_capacity_formula_and_validation():
    assert capacity_for(100, 2, 8, 1.0) == 25
    assert capacity_for(100, 2, 8, 1.25) == 32  # ceil(31.25)
    assert capacity_for(100, 2, 8, None) is None
    # the factor as written: in floats 100 * 1.1 / 2 is 55.000000000000007, which must not round up to 56
    assert capacity_for(100, 1, 2, 1.1) == 55
    assert capacity_for(300, 2, 4, 0.7) == 105
    assert capacity_for(10, 1, 3, 1.0) == 4  # ceil(3.33...)
    with pytest.raises(ValueError, match="capacity_factor"):
        capacity_for(100, 2, 8, 0.0)


def brute_force_keep(chosen, E, capacity):
    T, k = chosen.shape
    used = [0] * E
    keep = [[False] * k for _ in range(T)]
    for j in range(k):  # first choices before second choices, rows in order
        for t in range(T):
            e = int(chosen[t, j])
            if used[e] < capacity:
                used[e] += 1
                keep[t][j] = True
    return torch.tensor(keep)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dropped_assignments_match_a_brute_force_count(seed):
    g = torch.Generator().manual_seed(seed)
    T, E, k = 50, 6, 2
    logits = torch.randn(T, E, generator=g) + torch.tensor([2.0, 1.0, 0, 0, 0, 0])  # skewed: drops happen
    chosen = logits.topk(k, 1).indices
    cap = capacity_for(T, k, E, 1.0)
    keep = apply_capacity(chosen, E, cap)
    expected = brute_force_keep(chosen, E, cap)
    assert torch.equal(keep, expected)
    assert int((~keep).sum()) > 0
    assert torch.bincount(chosen[keep], minlength=E).max() <= cap


# A gap a mutation review found (2026-12-07): dropout after the activation, not before
@pytest.mark.parametrize("activation", ["tanh", "gelu"])
def test_stacked_experts_reference_paths_drop_out_after_the_activation(activation):
    """forward_all (the shared and fallback experts of SparseMMoE) is Linear -> activation -> dropout per layer."""
    torch.manual_seed(0)
    ex = StackedExperts(2, 4, [6], activation=activation, dropout=0.5).double().train()
    x = torch.randn(9, 4, dtype=torch.float64)
    torch.manual_seed(7)
    got = ex.forward_all(x)
    torch.manual_seed(7)
    z = torch.einsum("td,edh->eth", x, ex.weights[0]) + ex.biases[0].unsqueeze(1)
    want = torch.nn.functional.dropout({"tanh": torch.tanh, "gelu": torch.nn.functional.gelu}[activation](z), 0.5, training=True)
    torch.testing.assert_close(got, want)


def test_few_shapes_capacity_keeps_four_leading_bits():
    assert [dispatch.few_shapes_capacity(c) for c in (1, 7, 15, 16, 17, 100, 650, 704, 705, 1024)] == \
        [1, 7, 15, 16, 18, 104, 704, 704, 768, 1024]
    for cap in range(1, 5000):
        got = dispatch.few_shapes_capacity(cap)
        assert cap <= got <= cap * 9 / 8
    assert len({dispatch.few_shapes_capacity(c) for c in range(513, 1025)}) == 8  # a few shapes per octave


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_reduced_precision_plan_on_the_cpu_pads_to_few_shapes_and_computes_the_same(dtype):
    """The padded layout's capacity is rounded up in bfloat16 / float16 (a new bmm shape builds a new oneDNN kernel):
    the extra slots are padding, so outputs and gradients are the unrounded plan's."""
    T, E, k, d = 300, 4, 2, 8
    torch.manual_seed(0)
    ex = StackedExperts(E, d, [16, 8]).to(dtype)
    _, experts, rows, weights = random_assignments(T, E, k)
    exact = plan_dispatch(experts, rows, E, num_out=T, layout="padded")  # float32: the largest load
    rounded = plan_dispatch(experts, rows, E, num_out=T, layout="padded", dtype=dtype)
    most = int(torch.bincount(experts, minlength=E).max())
    assert exact.capacity == most and rounded.capacity == dispatch.few_shapes_capacity(most) > most
    assert rounded.padding_fraction > exact.padding_fraction
    x = torch.randn(T, d, dtype=dtype, requires_grad=True)
    w = weights.to(dtype)
    got = {}
    for name, plan in (("exact", exact), ("rounded", rounded)):
        out = ex(x, plan, w)
        got[name] = (out, torch.autograd.grad(out.float().sum(), [x, *ex.parameters()]))
    torch.testing.assert_close(got["rounded"][0], got["exact"][0], rtol=1e-2, atol=1e-2)
    for a, b in zip(got["rounded"][1], got["exact"][1]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_a_grouped_layout_that_cannot_run_in_bf16_says_so_naming_the_dtype():
    """Widths of 12 fit float32's 16-byte rows (4 values) but not bfloat16's (8): a model whose grouped layout
    trains in float32 is refused under bf16-mixed with a message that names the dtype and the way out."""
    ex = StackedExperts(4, 12, [12])
    experts, rows = torch.tensor([0, 1, 2, 3]), torch.arange(4)
    if not ex.supports_grouped(torch.float32):
        pytest.skip("this torch has no _grouped_mm")
    assert ex.plan(experts, rows, layout="grouped", dtype=torch.float32).layout == "grouped"
    with pytest.raises(ValueError, match=r"'grouped' cannot run in torch.bfloat16 .*8 bfloat16 values.*'padded'"):
        ex.plan(experts, rows, layout="grouped", dtype=torch.bfloat16)
    assert ex.plan(experts, rows, layout="auto", dtype=torch.bfloat16).layout == "padded"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm", ["none", "layer"])
def test_dispatch_under_autocast_with_strided_rows_and_an_empty_expert_is_as_close_as_the_naive_loop(dtype, norm):
    """bf16-mixed / 16-mixed: x a column slice of a wider activation, one expert chosen by no row. Output in the
    autocast dtype, float32 gradients for the float32 parameters, each within twice the naive loop's (autocast's own
    ops) distance from float64, plus a little."""
    g = torch.Generator().manual_seed(5)
    T, E, d, k = 300, 4, 16, 2
    ex = StackedExperts(E, d, [16, 8], norm=norm)
    x = torch.randn(T, d + 5, generator=g)[:, 2:2 + d]
    chosen = torch.randint(0, E, (T, k), generator=g)
    chosen[chosen == 2] = 3
    experts, rows = chosen.t().reshape(-1), torch.arange(T).repeat(k)
    w = torch.rand(T * k, generator=g)
    grad = torch.randn(T, 8, generator=g)

    def run(model, loop, autocast):
        model.zero_grad(set_to_none=True)
        xx, ww = x.to(model.weights[0].dtype).requires_grad_(), w.to(model.weights[0].dtype).requires_grad_()
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            y = (model.forward_loop(xx, experts, rows, ww, num_out=T) if loop
                 else model(xx, model.plan(experts, rows, num_out=T, layout="padded", dtype=dtype), ww))
        y.backward(grad.to(y.dtype))
        return [y.detach(), xx.grad, ww.grad, *(p.grad for p in model.parameters())]

    import copy
    want = run(copy.deepcopy(ex).double(), loop=True, autocast=False)
    loop = run(copy.deepcopy(ex), loop=True, autocast=True)
    got = run(copy.deepcopy(ex), loop=False, autocast=True)
    assert got[0].dtype == dtype and all(t.dtype == torch.float32 for t in got[1:])
    assert all(torch.isfinite(t).all() for t in got)
    dist = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm())  # noqa: E731
    for i, (a, b, c) in enumerate(zip(got, loop, want)):
        assert dist(a, c) <= 2 * dist(b, c) + 2e-2, i


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_batch_of_no_rows_dispatches_to_an_empty_output_with_zero_gradients(dtype):
    ex = StackedExperts(3, 8, [6, 4], norm="layer")
    x = torch.zeros(0, 8, requires_grad=True)
    w = torch.zeros(0, requires_grad=True)
    empty = torch.zeros(0, dtype=torch.long)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        y = ex(x, ex.plan(empty, empty, num_out=0, dtype=dtype), w)
    assert y.shape == (0, 4) and y.dtype == dtype
    y.sum().backward()
    assert x.grad.shape == (0, 8) and w.grad.shape == (0,)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and not p.grad.any() for p in ex.parameters())


@pytest.mark.parametrize("norm", ["none", "layer"])
def test_a_padding_slot_whose_expert_overflows_gives_no_nan_gradient(norm):
    """The backward half of the test above: a padding slot runs its expert on row 0 with weight 0; where that
    expert overflows float16 on row 0, the backward's h^T g (inf * 0) made that expert's weight gradients NaN, and
    with layer norm row 0's input gradient too, though row 0 never chose the expert (the per-expert loop: finite).
    Under fp16 mixed precision GradScaler then skips the step."""
    torch.manual_seed(0)
    stack = StackedExperts(2, 4, [8, 4], norm=norm)
    with torch.no_grad():
        stack.weights[0][1].mul_(3000.0)  # expert 1's first layer overflows float16 on a large row only
    stack = stack.to(torch.float16)
    x = torch.tensor([[50.0, 50, 50, 50], [0.01, 0.01, 0.01, 0.01], [0.01, -0.01, 0.01, -0.01]],
                     dtype=torch.float16, requires_grad=True)
    experts, rows = torch.tensor([0, 0, 1]), torch.tensor([0, 1, 2])  # row 0 never chooses expert 1
    w = torch.ones(3, dtype=torch.float16, requires_grad=True)
    plan = stack.plan(experts, rows, layout="padded", dtype=torch.float16)
    assert plan.rows.tolist() == [0, 1, 2, 0]  # expert 1's padding slot holds row 0
    assert not torch.isfinite(stack.forward_all(x[:1].detach())[1]).all()  # expert 1 overflows on row 0
    want = stack.forward_loop(x, experts, rows, w)
    assert torch.isfinite(want).all()
    want_grads = torch.autograd.grad(want.float().sum(), [x, w, *stack.parameters()])
    assert all(torch.isfinite(g).all() for g in want_grads)  # the case is finite without padding
    got = stack(x, plan, w)
    got_grads = torch.autograd.grad(got.float().sum(), [x, w, *stack.parameters()])
    for (name, _), g in zip([("x", None), ("w", None), *stack.named_parameters()], got_grads):
        assert torch.isfinite(g).all(), name


@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_padded_gradients_equal_the_loop_reference_without_overflow(dtype, activation):
    """The padding-slot clearing (float16 only) changes no finite gradient: padded dispatch == per-expert loop."""
    torch.manual_seed(0)
    stack = StackedExperts(2, 4, [8, 4], activation=activation).to(dtype)
    x = torch.randn(3, 4).to(dtype).requires_grad_(True)
    experts, rows = torch.tensor([0, 0, 1]), torch.tensor([0, 1, 2])
    w = torch.tensor([0.7, 0.5, 0.9], dtype=dtype, requires_grad=True)
    plan = stack.plan(experts, rows, layout="padded", dtype=dtype)
    want = torch.autograd.grad(stack.forward_loop(x, experts, rows, w).float().sum(), [x, w, *stack.parameters()])
    got = torch.autograd.grad(stack(x, plan, w).float().sum(), [x, w, *stack.parameters()])
    tol = {} if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, **tol)


def test_a_float16_layer_norm_of_a_wide_row_equals_the_loop_reference():
    """The padded kernel's layer norm takes the row variance in float16: a row whose deviations reach ~256
    (variance > 65504) overflows it, rstd is 0 and the normalised row is all 0 (F.layer_norm, the per-expert loop
    and the dense ExpertStack reduce in float32 and are right). Under 16-mixed autocast the dispatch runs in
    float16, silently."""
    torch.manual_seed(0)
    stack = StackedExperts(2, 4, [8, 4], activation="tanh", norm="layer")
    with torch.no_grad():
        stack.weights[0][1].mul_(3000.0)  # expert 1's first layer: pre-norm values of thousands, finite in float16
    stack = stack.half()
    x = torch.randn(3, 4).half()
    experts, rows, w = torch.tensor([0, 0, 1]), torch.tensor([0, 1, 2]), torch.ones(3, dtype=torch.float16)
    plan = stack.plan(experts, rows, layout="padded", dtype=torch.float16)
    with torch.no_grad():
        want, got = stack.forward_loop(x, experts, rows, w), stack(x, plan, w)
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
