"""relu_experts: the hand-written forward and backward equal autograd through plain per-expert ReLU MLPs."""
from __future__ import annotations

import pytest
import torch

from mmoe_rec.nn.experts import ExpertStack
from mmoe_rec.nn.relu_experts import relu_experts


def per_expert_reference(x: torch.Tensor, weights, biases) -> torch.Tensor:
    """(B, D) -> (B, E, H) with one Linear + ReLU per layer per expert, autograd's own ops."""
    outs = []
    for e in range(weights[0].shape[0]):
        h = x
        for w, b in zip(weights, biases):
            h = torch.relu(h @ w[e] + b[e])
        outs.append(h)
    return torch.stack(outs, dim=1)


def make_params(E: int, dims: list[int], dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(E, a, b, generator=g, dtype=dtype).requires_grad_() for a, b in zip(dims, dims[1:])]
    bs = [torch.randn(E, b, generator=g, dtype=dtype).requires_grad_() for b in dims[1:]]
    return ws, bs


@pytest.mark.parametrize("dims", [[6, 5], [6, 7, 4], [6, 7, 5, 3]])
def test_forward_and_every_gradient_equal_autograd_on_a_per_expert_reference(dims):
    ws, bs = make_params(4, dims)
    x = torch.randn(9, dims[0], dtype=torch.float64, requires_grad=True)
    got = relu_experts(x, ws, bs)
    want = per_expert_reference(x, ws, bs)
    assert got.shape == (9, 4, dims[-1])
    torch.testing.assert_close(got, want)
    g = torch.randn_like(want)
    params = [x, *ws, *bs]
    grads_got = torch.autograd.grad(got, params, g)
    grads_want = torch.autograd.grad(want, params, g)
    for a, b in zip(grads_got, grads_want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("D", [3, 40])  # an input narrower and wider than the first layer (E*h0 = 20)
@pytest.mark.parametrize("wanted", ["weight and bias", "weight", "bias"])
def test_the_first_layers_gradients_whichever_of_them_is_asked_for(D, wanted):
    ws, bs = make_params(4, [D, 5, 3])
    x = torch.randn(9, D, dtype=torch.float64)
    asked = {"weight and bias": [ws[0], bs[0]], "weight": [ws[0]], "bias": [bs[0]]}[wanted]
    g = torch.randn(9, 4, 3, dtype=torch.float64)
    got = torch.autograd.grad(relu_experts(x, ws, bs), asked, g)
    want = torch.autograd.grad(per_expert_reference(x, ws, bs), asked, g)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b)


def test_gradcheck():
    ws, bs = make_params(3, [4, 5, 3])
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *p: relu_experts(x, list(p[0::2]), list(p[1::2])),
                                    (x, *[t for pair in zip(ws, bs) for t in pair]))


@pytest.mark.parametrize("dims", [[4, 6, 2], [4, 6, 5, 3]])
@pytest.mark.parametrize("penalty_on", ["input", "weight"])
def test_a_double_backward_equals_autograds(penalty_on, dims):
    """create_graph=True (a gradient penalty): the hand-written backward is first derivatives only and used to
    return a gradient without the second-order terms, silently (d/dW1 0.36 where autograd gives 0.28).
    The inner gradient takes a random cotangent r: with y.pow(2) the cotangent 2y is zero wherever a ReLU is off,
    so a recomputation that dropped the deeper layers' ReLU (`_autograd_forward`) gave the same numbers; with r
    the inner gradient and every second-order gradient differ there."""
    ws, bs = make_params(3, dims)
    params = [t for pair in zip(ws, bs) for t in pair]
    x = torch.randn(5, dims[0], dtype=torch.float64, requires_grad=penalty_on == "input")
    r = torch.randn(5, 3, dims[-1], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    s = torch.randn(5, 3, dims[-1], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    wrt = [x] if penalty_on == "input" else ws  # every layer's weight: the deeper layers' masks enter each

    def penalized(f):
        y = f(x, ws, bs)
        inner = torch.autograd.grad((y * r).sum(), wrt, create_graph=True)
        penalty = sum(g.pow(2).sum() for g in inner)
        outer = torch.autograd.grad((y * s).sum() + penalty, params)
        return [g.detach() for g in inner], outer

    (inner_got, outer_got), (inner_want, outer_want) = penalized(relu_experts), penalized(per_expert_reference)
    # in every layer some ReLUs are off and some on at these inputs (else the masks would not be exercised)
    with torch.no_grad():
        h = x
        for w, b in zip(ws, bs):
            z = torch.einsum("...d,edh->...eh" if h.dim() == 2 else "bed,edh->beh", h, w) + b
            assert (z < 0).any() and (z > 0).any()
            h = torch.relu(z)
    for got, want in zip([*inner_got, *outer_got], [*inner_want, *outer_want]):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    inputs = (x.detach().requires_grad_(), *params)
    assert torch.autograd.gradgradcheck(lambda x, *p: relu_experts(x, list(p[0::2]), list(p[1::2])), inputs)


def test_the_incoming_gradient_is_left_untouched_and_inputs_without_grad_get_none():
    ws, bs = make_params(3, [4, 6, 2])
    x = torch.randn(5, 4, dtype=torch.float64)  # no grad wanted for x (e.g. raw features)
    bs[1].requires_grad_(False)  # a frozen bias
    y = relu_experts(x, ws, bs)
    g = torch.randn_like(y)
    g_before = g.clone()
    gw0, gb0, gw1 = torch.autograd.grad(y, [ws[0], bs[0], ws[1]], g)
    assert torch.equal(g, g_before)
    want = torch.autograd.grad(per_expert_reference(x, ws, bs), [ws[0], bs[0], ws[1]], g)
    for a, b in zip((gw0, gb0, gw1), want):
        torch.testing.assert_close(a, b)


def test_modifying_the_output_in_place_is_caught_instead_of_corrupting_the_backward():
    ws, bs = make_params(2, [3, 4, 2])
    y = relu_experts(torch.randn(5, 3, dtype=torch.float64), ws, bs)
    with pytest.raises(RuntimeError, match="is a view and is being modified inplace"):
        y.mul_(2)  # the output is a view of an activation the backward reads


@pytest.mark.parametrize("hidden", [[16], [32, 16], [32, 24, 8]])
def test_expert_stack_takes_the_fast_path_and_matches_its_autograd_path_exactly(hidden, monkeypatch):
    # PyTorch's own GEMMs whatever MMOE_REC_CPU_GEMM says: under =onednn the fast path's bias gradient comes out of
    # a GEMM over a column of ones and differs from autograd's column sum by rounding (test_cpu_gemm.py covers it)
    monkeypatch.setenv("MMOE_REC_CPU_GEMM", "blas")
    torch.manual_seed(0)
    stack = ExpertStack(5, 12, hidden)
    x = torch.randn(37, 12, requires_grad=True)
    assert stack._relu_fast_path_dtype(x) == torch.float32
    y = stack(x)
    g = torch.randn_like(y)
    y.backward(g)
    fast = [x.grad.clone()] + [p.grad.clone() for p in stack.parameters()]
    x.grad = None
    stack.zero_grad()
    monkeypatch.setattr(stack, "_relu_fast_path_dtype", lambda x: None)
    y_slow = stack(x)
    y_slow.backward(g)
    slow = [x.grad] + [p.grad for p in stack.parameters()]
    assert torch.equal(y, y_slow)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_fast_path_only_where_it_computes_the_same_thing():
    x = torch.randn(4, 6)
    assert ExpertStack(3, 6, [5]).train()._relu_fast_path_dtype(x) == torch.float32
    assert ExpertStack(3, 6, [5], dropout=0.2).eval()._relu_fast_path_dtype(x) == torch.float32
    assert ExpertStack(3, 6, [5], dropout=0.2).train()._relu_fast_path_dtype(x) is None
    assert ExpertStack(3, 6, [5], activation="gelu")._relu_fast_path_dtype(x) is None
    assert ExpertStack(3, 6, [5], norm="layer")._relu_fast_path_dtype(x) is None
    assert ExpertStack(3, 6, [5])._relu_fast_path_dtype(x.double()) is None  # parameters in float32
    assert ExpertStack(3, 6, [5]).double()._relu_fast_path_dtype(x.double()) == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's products in bfloat16, cast once
        assert ExpertStack(3, 6, [5])._relu_fast_path_dtype(x) == torch.bfloat16
        assert ExpertStack(3, 6, [5])._relu_fast_path_dtype(x.bfloat16()) == torch.bfloat16
        assert ExpertStack(3, 6, [5]).double()._relu_fast_path_dtype(x) is None  # autocast leaves float64 be
        assert ExpertStack(3, 6, [5], activation="gelu")._relu_fast_path_dtype(x) is None
    with torch.autocast("cpu", dtype=torch.float16):  # not measured: the autograd path
        assert ExpertStack(3, 6, [5])._relu_fast_path_dtype(x) is None


@pytest.mark.parametrize("hidden", [[16], [32, 16]])
@pytest.mark.parametrize("backend", ["blas", "onednn"])
def test_under_bf16_autocast_the_fast_path_computes_what_autocast_makes_of_the_autograd_path(hidden, backend,
                                                                                            monkeypatch):
    """Every product in bfloat16 (as autocast runs them), the output bfloat16, the parameters' gradients float32
    (their master copies), each within bfloat16 rounding of the autograd path under the same autocast."""
    from mmoe_rec.nn import experts as experts_module
    from mmoe_rec.nn.cpu_gemm import gemm_backend

    calls = []
    monkeypatch.setattr(experts_module, "relu_experts", lambda *a: calls.append(a[0].dtype) or relu_experts(*a))

    torch.manual_seed(0)
    stack = ExpertStack(5, 12, hidden)
    x = torch.randn(64, 12, requires_grad=True)

    def run(path: bool):
        stack.zero_grad()
        x.grad = None
        if not path:
            stack._relu_fast_path_dtype = lambda x: None
        try:
            with gemm_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
                y = stack(x)
                y.float().backward(g)
        finally:
            stack.__dict__.pop("_relu_fast_path_dtype", None)
        return y, [x.grad.clone()] + [p.grad.clone() for p in stack.parameters()]

    g = torch.randn(64, 5, hidden[-1])
    fast, fast_grads = run(True)
    slow, slow_grads = run(False)
    assert calls == [torch.bfloat16]  # the fast path once, in bfloat16
    assert fast.dtype == slow.dtype == torch.bfloat16
    torch.testing.assert_close(fast, slow, rtol=2e-2, atol=2e-2)
    for a, b in zip(fast_grads, slow_grads):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2 * b.abs().max().item())


def test_first_layer_weight_is_stored_input_major_and_its_gradient_keeps_that_layout():
    torch.manual_seed(0)
    stack = ExpertStack(4, 10, [8, 3])
    w0 = stack.weights[0]
    assert w0.shape == (4, 10, 8) and w0.permute(1, 0, 2).is_contiguous()
    stack(torch.randn(6, 10)).sum().backward()
    assert w0.grad.stride() == w0.stride()  # accumulated in place, no copy into another layout
    # the values are those of a contiguous (E, D, h) draw: the layout does not change what a seed gives
    torch.manual_seed(0)
    bound = 1.0 / 10 ** 0.5
    assert torch.equal(w0.detach(), torch.empty(4, 10, 8).uniform_(-bound, bound))


def test_inference_without_autograd_gives_the_same_output(monkeypatch):
    # bitwise where both paths use PyTorch's own GEMMs, whatever MMOE_REC_CPU_GEMM says (the comparison failed
    # under =onednn); through oneDNN the fast path's products differ from autograd's by rounding (summation order)
    from mmoe_rec.nn.cpu_gemm import gemm_backend

    torch.manual_seed(0)
    stack = ExpertStack(3, 5, [4, 2]).eval()
    x = torch.randn(7, 5)
    for backend in ("blas", "onednn"):
        with gemm_backend(backend):
            with torch.inference_mode():
                fast = stack(x)
            with monkeypatch.context() as m, torch.no_grad():
                m.setattr(stack, "_relu_fast_path_dtype", lambda x: None)
                slow = stack(x)
        if backend == "blas":
            assert torch.equal(fast, slow)
        else:
            torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("hidden", [[16], [32, 16]])
def test_under_bf16_autocast_a_bf16_input_to_float32_experts_trains_as_the_autograd_path(hidden):
    """A bfloat16 input (a PLE level's output under autocast) to float32 experts: the fast path casts the parameters
    (not the input) and its backward, run outside autocast as Lightning runs it, gives float32 parameter gradients
    and a bfloat16 input gradient, each within bfloat16 rounding of the autograd path's."""
    torch.manual_seed(0)
    stack = ExpertStack(5, 12, hidden)
    x = torch.randn(64, 12).bfloat16().requires_grad_()
    g = torch.randn(64, 5, hidden[-1])
    results = []
    for fast in (True, False):
        stack.zero_grad()
        x.grad = None
        if not fast:
            stack._relu_fast_path_dtype = lambda x: None
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = stack(x)
        finally:
            stack.__dict__.pop("_relu_fast_path_dtype", None)
        y.float().backward(g)  # outside autocast
        results.append((y, [x.grad.clone()] + [p.grad.clone() for p in stack.parameters()]))
    (fast_y, fast_grads), (slow_y, slow_grads) = results
    assert fast_y.dtype == slow_y.dtype == torch.bfloat16
    torch.testing.assert_close(fast_y, slow_y, rtol=2e-2, atol=2e-2)
    assert fast_grads[0].dtype == torch.bfloat16 and all(t.dtype == torch.float32 for t in fast_grads[1:])
    for a, b in zip(fast_grads, slow_grads):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=3e-2 * b.float().abs().max().item())


def _relu_experts_run(fn, x, ws, bs, grad):
    x = x.detach().requires_grad_()
    ws = [w.detach().requires_grad_() for w in ws]
    bs = [b.detach().requires_grad_() for b in bs]
    y = fn(x, ws, bs)
    y.backward(grad.to(y.dtype))
    return [y.detach(), *(t.grad for t in (x, *ws, *bs))]


def _normwise(got, want) -> float:
    return max(float((a.double() - b.double()).norm() / (b.double().norm() + 1e-30)) if b.numel() else 0.0
               for a, b in zip(got, want))


@pytest.mark.parametrize("backend", ["blas", "onednn"])
@pytest.mark.parametrize("layout", ["gapped", "column_major"])
@pytest.mark.parametrize("rows", [0, 1, 37])
def test_strided_inputs_and_empty_batches_get_autograds_values_in_float32_and_bfloat16(backend, layout, rows):
    """x as an expert layer meets it (columns of a wider activation, or the transpose of a contiguous tensor) and a
    batch of no rows, through PyTorch's GEMMs and oneDNN's: float32 equals float64 autograd up to rounding, and
    bfloat16 (bf16-mixed's operands) is as close to it as autograd's own bfloat16 ops are, with bfloat16 output and
    gradients."""
    from mmoe_rec.nn.cpu_gemm import gemm_backend
    from mmoe_rec.nn.relu_experts import _autograd_forward

    g = torch.Generator().manual_seed(4)
    wide = torch.randn(rows, 20, generator=g)
    x = wide[:, 4:16] if layout == "gapped" else wide[:, :12].t().contiguous().t()
    ws = [torch.randn(3, a, b, generator=g) * a ** -0.5 for a, b in ((12, 16), (16, 8))]
    bs = [torch.randn(3, b, generator=g) * 0.1 for b in (16, 8)]
    grad = torch.randn(rows, 3, 8, generator=g)
    as_double = lambda ts: [t.double() for t in ts]  # noqa: E731
    as_bf16 = lambda ts: [t.bfloat16() for t in ts]  # noqa: E731
    with gemm_backend(backend):
        want32 = _relu_experts_run(_autograd_forward, x.double(), as_double(ws), as_double(bs), grad.double())
        got32 = _relu_experts_run(relu_experts, x, ws, bs, grad)
        want16 = _relu_experts_run(_autograd_forward, x.bfloat16().double(), as_double(as_bf16(ws)),
                                   as_double(as_bf16(bs)), grad.bfloat16().double())
        autograd16 = _relu_experts_run(_autograd_forward, x.bfloat16(), as_bf16(ws), as_bf16(bs), grad.bfloat16())
        got16 = _relu_experts_run(relu_experts, x.bfloat16(), as_bf16(ws), as_bf16(bs), grad.bfloat16())
    assert got32[0].shape == (rows, 3, 8) and all(t.dtype == torch.float32 for t in got32)
    assert all(t.dtype == torch.bfloat16 for t in got16)
    assert _normwise(got32, want32) < 1e-5
    assert _normwise(got16, want16) <= 2 * _normwise(autograd16, want16) + 1e-2
