"""cpu_gemm: oneDNN's products equal PyTorch's to float32 rounding; the policy decides which library runs."""
from __future__ import annotations

import itertools
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mmoe_rec.nn import cpu_gemm
from mmoe_rec.nn.relu_experts import first_layer_per_expert, relu_experts

needs_onednn = pytest.mark.skipif(not cpu_gemm.onednn_available(), reason="this PyTorch has no oneDNN")


class OpLog(TorchDispatchMode):
    """Records the name of every op that runs."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def ran_onednn(fn) -> bool:
    with OpLog() as log:
        fn()
    return any("_linear_pointwise" in name for name in log.names)


def operand(rows: int, cols: int, column_major: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if column_major:  # the transpose of a contiguous (cols, rows) tensor
        return torch.randn(cols, rows, generator=g).t()
    return torch.randn(rows, cols, generator=g)


@needs_onednn
@pytest.mark.parametrize("a_t, b_t", list(itertools.product([False, True], repeat=2)))
def test_onednn_mm_and_addmm_equal_torch_to_float32_rounding_in_every_measured_layout(a_t, b_t):
    a, b = operand(37, 23, a_t, 0), operand(23, 19, b_t, 1)
    bias = torch.randn(19)
    want_mm = (a.double() @ b.double()).float()
    want_addmm = (bias.double() + a.double() @ b.double()).float()
    with cpu_gemm.gemm_backend("onednn"):
        assert cpu_gemm.uses_onednn(a, b)
        assert ran_onednn(lambda: cpu_gemm.mm(a, b))
        got_mm, got_addmm = cpu_gemm.mm(a, b), cpu_gemm.addmm(bias, a, b)
        assert torch.equal(cpu_gemm.mm(a, b), got_mm)  # deterministic: the same product twice, bitwise
    for got, want in ((got_mm, want_mm), (got_addmm, want_addmm)):
        assert got.shape == (37, 19) and got.dtype == torch.float32 and got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # The same product through PyTorch's own op differs from oneDNN's by rounding only.
    torch.testing.assert_close(got_mm, torch.mm(a, b), rtol=1e-5, atol=1e-5)


def test_blas_policy_is_exactly_torch_and_never_reaches_onednn():
    a, b, bias = torch.randn(64, 48), torch.randn(48, 40), torch.randn(40)
    with cpu_gemm.gemm_backend("blas"):
        assert not ran_onednn(lambda: cpu_gemm.mm(a, b))
        assert torch.equal(cpu_gemm.mm(a, b), torch.mm(a, b))
        assert torch.equal(cpu_gemm.addmm(bias, a, b), torch.addmm(bias, a, b))


@needs_onednn
def test_unmeasured_layouts_other_dtypes_and_empty_products_stay_with_torch():
    gapped = torch.randn(30, 40)[:, :20]  # rows 40 apart
    a, b = torch.randn(8, 30), torch.randn(20, 8)
    with cpu_gemm.gemm_backend("onednn"):
        assert cpu_gemm.uses_onednn(gapped, b)  # a row-major `a` may have gaps (measured: an expert's columns)
        assert not cpu_gemm.uses_onednn(a, gapped)  # a gapped `b` was once ~1000x slower in oneDNN
        assert not cpu_gemm.uses_onednn(gapped.t(), a.t())  # so was a gapped column-major `a`
        assert not ran_onednn(lambda: cpu_gemm.mm(a, gapped))
        assert torch.equal(cpu_gemm.mm(a, gapped), torch.mm(a, gapped))
        assert not cpu_gemm.uses_onednn(torch.randn(5, 4, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64))
        empty = cpu_gemm.mm(torch.randn(0, 4), torch.randn(4, 3))
        assert empty.shape == (0, 3)


@needs_onednn
def test_auto_takes_onednn_only_for_large_products_on_amd_cpus_with_avx512():
    small = (torch.randn(64, 32), torch.randn(32, 16))  # 32k multiply-adds
    large = (torch.randn(1024, 256), torch.randn(256, 128))  # 2^25 multiply-adds
    large_a_transposed = (torch.randn(256, 1024).t(), torch.randn(256, 128))  # 2^25, below the column-major bar
    least = cpu_gemm.auto_min_macs()
    with cpu_gemm.gemm_backend("auto"):
        assert not cpu_gemm.uses_onednn(*small)
        assert not cpu_gemm.uses_onednn(*large_a_transposed)
        assert cpu_gemm.uses_onednn(*large) == (least is not None and least <= 1 << 25)
    if torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        with open("/proc/cpuinfo") as f:
            assert (least is not None) == ("AuthenticAMD" in f.read())  # any product to oneDNN at all


def cpuinfo(vendor: str, family: int) -> str:
    block = f"processor\t: {{}}\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel name\t: Some CPU\n"
    return "\n".join(block.format(i) for i in range(2))


def test_auto_thresholds_by_cpu():
    # Zen 5 (full-width AVX-512): from 2^21 multiply-adds; Zen 4 (AVX-512 on 256-bit units): the first layer's
    # products only; Intel, or no AVX-512 in use: never (MKL runs AVX-512 itself on Intel).
    assert cpu_gemm.min_macs_for("AVX512", cpuinfo("AuthenticAMD", 26)) == cpu_gemm.MIN_ONEDNN_MACS
    assert cpu_gemm.min_macs_for("AVX512", cpuinfo("AuthenticAMD", 25)) == cpu_gemm.MIN_ONEDNN_MACS_HALF_WIDTH
    assert cpu_gemm.MIN_ONEDNN_MACS < 1 << 25 < cpu_gemm.MIN_ONEDNN_MACS_HALF_WIDTH < 1024 * 358 * 2048
    assert cpu_gemm.min_macs_for("AVX2", cpuinfo("AuthenticAMD", 26)) is None
    assert cpu_gemm.min_macs_for("AVX2", cpuinfo("AuthenticAMD", 25)) is None  # Zen 3: MKL won every product
    assert cpu_gemm.min_macs_for("AVX512", cpuinfo("GenuineIntel", 6)) is None
    assert cpu_gemm.min_macs_for("AVX512", "") is None
    assert cpu_gemm.min_macs_for("AVX512", "vendor_id : AuthenticAMD\ncpu family : ?\n") is None


@needs_onednn
def test_auto_sends_a_deeper_layer_to_onednn_on_zen5_and_not_on_zen4(monkeypatch):
    deeper_layer = (torch.randn(1024, 256), torch.randn(256, 128))  # an expert's second layer, 2^25 multiply-adds
    first_layer = (torch.randn(1024, 358), torch.randn(358, 2048))
    first_layer_wgrad = (torch.randn(1024, 358).t(), torch.randn(1024, 2048))  # a column-major, 2^29.5
    for family, deeper in [(26, True), (25, False)]:
        monkeypatch.setattr(cpu_gemm, "auto_min_macs",
                            lambda family=family: cpu_gemm.min_macs_for("AVX512", cpuinfo("AuthenticAMD", family)))
        with cpu_gemm.gemm_backend("auto"):
            assert cpu_gemm.uses_onednn(*deeper_layer) == deeper
            assert cpu_gemm.uses_onednn(*first_layer)
            assert cpu_gemm.uses_onednn(*first_layer_wgrad)


def test_policy_from_the_environment_and_nested_blocks(monkeypatch):
    monkeypatch.setenv(cpu_gemm.ENV_VAR, "blas")
    assert cpu_gemm.backend() == "blas"
    with cpu_gemm.gemm_backend("onednn"):
        assert cpu_gemm.backend() == "onednn"
        with cpu_gemm.gemm_backend("auto"):
            assert cpu_gemm.backend() == "auto"
        assert cpu_gemm.backend() == "onednn"
    assert cpu_gemm.backend() == "blas"
    monkeypatch.setenv(cpu_gemm.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="MMOE_REC_CPU_GEMM='fastest'"):
        cpu_gemm.backend()
    with pytest.raises(ValueError, match="'mkl'"):
        with cpu_gemm.gemm_backend("mkl"):
            pass


@needs_onednn
@pytest.mark.parametrize("policy", ["blas", "onednn"])
@pytest.mark.parametrize("dims", [[24, 16, 8], [24, 16, 12, 8]])
def test_relu_experts_in_float32_match_a_float64_reference_under_either_library(policy, dims):
    g = torch.Generator().manual_seed(3)
    E = 4
    ws = [torch.randn(E, a, b, generator=g) / a ** 0.5 for a, b in zip(dims, dims[1:])]
    bs = [torch.randn(E, b, generator=g) * 0.1 for b in dims[1:]]
    # The first layer's weight input-major, as ExpertStack stores it (its (D, E*h) matrix is then row-major).
    ws[0] = ws[0].permute(1, 0, 2).contiguous().permute(1, 0, 2)
    x = torch.randn(32, dims[0], generator=g)
    params32 = [t.clone().requires_grad_() for t in (x, *ws, *bs)]
    params64 = [t.double().requires_grad_() for t in (x, *ws, *bs)]
    grad_out = torch.randn(32, E, dims[-1], generator=g)

    L = len(dims) - 1

    def run(params):
        x_, *rest = params
        return relu_experts(x_, rest[:L], rest[L:])

    with cpu_gemm.gemm_backend(policy):
        assert first_layer_per_expert(x, ws) == (policy == "onednn")  # both paths of the first layer
        y32 = run(params32)
        assert ran_onednn(lambda: run(params32)) == (policy == "onednn")
        grads32 = torch.autograd.grad(y32, params32, grad_out)
    # The backward reads the policy in force where it is called: a forward under "blas", its backward under policy.
    with cpu_gemm.gemm_backend("blas"):
        y_blas = run(params32)
    with cpu_gemm.gemm_backend(policy):
        assert ran_onednn(lambda: torch.autograd.grad(y_blas, params32, grad_out)) == (policy == "onednn")
    # ... and a forward under policy, its backward under "blas" (the per-expert first layer's saved activations
    # then go through PyTorch's own products)
    with cpu_gemm.gemm_backend(policy):
        y_policy = run(params32)
    with cpu_gemm.gemm_backend("blas"):
        grads_mixed = torch.autograd.grad(y_policy, params32, grad_out)
    y64 = run(params64)
    grads64 = torch.autograd.grad(y64, params64, grad_out.double())
    torch.testing.assert_close(y32, y64.float(), rtol=1e-5, atol=1e-5)
    for a, b, c in zip(grads32, grads64, grads_mixed):
        torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c, b.float(), rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("frozen", [None, "first_bias", "first_weight"])
def test_relu_experts_wide_first_layer_in_onednn_matches_a_float64_reference(monkeypatch, frozen):
    """A Zen 4's layout: the first layer one wide oneDNN GEMM, the deeper layer in MKL's bmm. The first layer's
    weight and bias gradients then come out of one GEMM on x^T with a row of ones (its bias gradient is that
    row); with either of them frozen, the other is made alone."""
    monkeypatch.setattr(cpu_gemm, "auto_min_macs", lambda: 40_000)  # the wide products (2^15.6) yes, the deeper no
    monkeypatch.setattr(cpu_gemm, "MIN_ONEDNN_MACS_A_TRANSPOSED", 40_000)
    g = torch.Generator().manual_seed(11)
    E, dims, B = 4, [24, 16, 8], 32
    ws = [torch.randn(E, a, b, generator=g) / a ** 0.5 for a, b in zip(dims, dims[1:])]
    ws[0] = ws[0].permute(1, 0, 2).contiguous().permute(1, 0, 2)  # input-major, as ExpertStack stores it
    bs = [torch.randn(E, b, generator=g) * 0.1 for b in dims[1:]]
    x = torch.randn(B, dims[0], generator=g)
    grad_out = torch.randn(B, E, dims[-1], generator=g)
    wants = {"x": True, "first_weight": frozen != "first_weight", "first_bias": frozen != "first_bias"}
    needs = [wants["x"], wants["first_weight"], True, wants["first_bias"], True]  # x, w0, w1, b0, b1

    def grads(dtype):
        params = [t.to(dtype).requires_grad_(need) for t, need in zip((x, *ws, *bs), needs)]
        y = relu_experts(params[0], params[1:3], params[3:])
        wanted = [t for t in params if t.requires_grad]
        return torch.autograd.grad(y, wanted, grad_out.to(dtype)), wanted

    with cpu_gemm.gemm_backend("auto"):
        assert not first_layer_per_expert(x, ws)
        with OpLog() as log:
            got, wanted = grads(torch.float32)
    assert any("_linear_pointwise" in name for name in log.names)
    assert any("bmm" in name for name in log.names)  # the deeper layer stayed with MKL
    want, _ = grads(torch.float64)
    for a, b, param in zip(got, want, wanted):
        assert a.shape == param.shape
        torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=1e-5)
    if frozen is None:  # the weight's gradient keeps the input-major layout (accumulated without a copy)
        assert got[1].stride() == ws[0].stride()


@needs_onednn
def test_relu_experts_per_expert_first_layer_with_inputs_that_want_no_gradient():
    g = torch.Generator().manual_seed(8)
    E, dims = 3, [20, 12, 6, 4]
    ws = [(torch.randn(E, a, b, generator=g) / a ** 0.5).requires_grad_() for a, b in zip(dims, dims[1:])]
    bs = [(torch.randn(E, b, generator=g) * 0.1).requires_grad_() for b in dims[1:]]
    x = torch.randn(17, dims[0], generator=g)  # raw features: no gradient wanted
    bs[1].requires_grad_(False)  # a frozen bias of the layer that reads the per-expert activations
    wanted = [ws[0], bs[0], ws[1], ws[2], bs[2]]
    grad_out = torch.randn(17, E, dims[-1], generator=g)
    with cpu_gemm.gemm_backend("onednn"):
        assert first_layer_per_expert(x, ws)
        got = torch.autograd.grad(relu_experts(x, ws, bs), wanted, grad_out)
    with cpu_gemm.gemm_backend("blas"):
        assert not first_layer_per_expert(x, ws)
        want = torch.autograd.grad(relu_experts(x, ws, bs), wanted, grad_out)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_onednn
def test_first_layer_per_expert_only_where_both_layers_go_to_onednn(monkeypatch):
    x = torch.randn(1024, 358)
    w0, w1 = torch.randn(8, 358, 256), torch.randn(8, 256, 128)  # the large MMoE: 2^26.5 and 2^25 multiply-adds
    with cpu_gemm.gemm_backend("onednn"):
        assert first_layer_per_expert(x, [w0, w1])
        assert not first_layer_per_expert(x, [w0])  # one layer: the wide GEMM's output is already (B, E, H)
        assert not first_layer_per_expert(x.t().contiguous().t(), [w0, w1])  # x column-major
        assert not first_layer_per_expert(x.double(), [w0.double(), w1.double()])
        many = torch.randn(cpu_gemm.MAX_LOOPED_BATCH + 1, 358, 4)
        assert not first_layer_per_expert(x, [many, torch.randn(cpu_gemm.MAX_LOOPED_BATCH + 1, 4, 4)])
    with cpu_gemm.gemm_backend("blas"):
        assert not first_layer_per_expert(x, [w0, w1])
    for family, per_expert in [(26, True), (25, False)]:  # Zen 4 keeps the deeper layer in MKL's bmm
        monkeypatch.setattr(cpu_gemm, "auto_min_macs",
                            lambda family=family: cpu_gemm.min_macs_for("AVX512", cpuinfo("AuthenticAMD", family)))
        with cpu_gemm.gemm_backend("auto"):
            assert first_layer_per_expert(x, [w0, w1]) == per_expert


@needs_onednn
@pytest.mark.parametrize("policy", ["blas", "onednn"])
@pytest.mark.parametrize("batch_dim", [0, 1])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bmm_equals_torch_baddbmm_in_either_output_layout(policy, batch_dim, with_bias):
    g = torch.Generator().manual_seed(5)
    E, M, K, N = 3, 11, 7, 5
    wide = torch.randn(M, E * K, generator=g)
    a = wide.view(M, E, K).transpose(0, 1)  # (E, M, K): each matrix an expert's columns of a wider activation
    b = torch.randn(E, N, K, generator=g).transpose(1, 2)  # (E, K, N), each matrix column-major
    bias = torch.randn(E, N, generator=g) if with_bias else None
    want = torch.bmm(a.double(), b.double()) + (0 if bias is None else bias.double().unsqueeze(1))
    with cpu_gemm.gemm_backend(policy):
        got = cpu_gemm.bmm(a, b, bias, batch_dim=batch_dim)
        assert ran_onednn(lambda: cpu_gemm.bmm(a, b, bias, batch_dim=batch_dim)) == (policy == "onednn")
        matrices = [m.contiguous() for m in a]  # the same inputs held as E contiguous (M, K) matrices
        torch.testing.assert_close(cpu_gemm.bmm(matrices, b, bias, batch_dim=batch_dim), got, rtol=1e-6, atol=1e-6)
    assert got.is_contiguous()
    if batch_dim == 1:
        assert got.shape == (M, E, N)
        got = got.transpose(0, 1)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)
    with cpu_gemm.gemm_backend(policy):  # relu inside the GEMM (oneDNN) or after it: the same values
        got_relu = cpu_gemm.bmm(a, b, bias, batch_dim=batch_dim, relu=True)
        assert torch.equal(got_relu, cpu_gemm.bmm(a, b, bias, batch_dim=batch_dim).relu())


@needs_onednn
@pytest.mark.parametrize("policy", ["blas", "onednn"])
def test_addmm_with_relu_equals_relu_of_addmm_bitwise(policy):
    g = torch.Generator().manual_seed(7)
    a, b, bias = torch.randn(33, 21, generator=g), torch.randn(21, 17, generator=g), torch.randn(17, generator=g)
    with cpu_gemm.gemm_backend(policy):
        got = cpu_gemm.addmm(bias, a, b, relu=True)
        assert ran_onednn(lambda: cpu_gemm.addmm(bias, a, b, relu=True)) == (policy == "onednn")
        plain = cpu_gemm.addmm(bias, a, b)
    assert (plain < 0).any() and (got >= 0).all()
    assert torch.equal(got, plain.relu())


@needs_onednn
@pytest.mark.parametrize("policy", ["blas", "onednn"])
@pytest.mark.parametrize("bad", ["nan_input", "inf_input", "nan_weight", "nan_bias"])
def test_relu_keeps_a_nan_as_torch_relu_does(policy, bad):
    """oneDNN's fused relu made a NaN 0: an expert's output on a row with a NaN feature came out finite and normal
    looking (a review's probe), while the blas path and torch.relu keep it."""
    g = torch.Generator().manual_seed(8)
    a, b, bias = torch.randn(9, 6, generator=g), torch.randn(6, 5, generator=g), torch.randn(5, generator=g)
    if bad == "nan_input":
        a[2, 3] = float("nan")
    elif bad == "inf_input":  # +inf and -inf in one row: inf - inf, NaN where their weights share a sign
        a[2, 3], a[2, 4] = float("inf"), float("-inf")
    elif bad == "nan_weight":
        b[1, 4] = float("nan")
    else:
        bias[4] = float("nan")
    want = torch.relu(torch.addmm(bias, a, b))
    assert want.isnan().any()
    with cpu_gemm.gemm_backend(policy):
        got = cpu_gemm.addmm(bias, a, b, relu=True)
        stacked = cpu_gemm.bmm(torch.stack([a, a]), torch.stack([b, b]), torch.stack([bias, bias]), relu=True)
        assert ran_onednn(lambda: cpu_gemm.addmm(bias, a, b, relu=True)) == (policy == "onednn")
    for out in (got, stacked[0], stacked[1]):
        assert torch.equal(out.isnan(), want.isnan())
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5, equal_nan=True)


@needs_onednn
@pytest.mark.parametrize("policy", ["blas", "onednn"])
def test_relu_of_finite_operands_whose_sum_overflows_has_the_plain_values(policy):
    """The finiteness check is a norm of each operand: finite values that overflow it take the unfused path, which
    must give the same values as the fused one."""
    g = torch.Generator().manual_seed(10)
    a, b, bias = torch.randn(9, 6, generator=g), torch.randn(6, 5, generator=g), torch.randn(5, generator=g)
    a[:, 0] = 3e38  # their sum is inf, each product 0 (b's row 0 is 0): every output finite
    b[0] = 0.0
    assert not torch.isfinite(a.sum()) and torch.isfinite(a).all()
    want = torch.relu(torch.addmm(bias, a, b))
    assert torch.isfinite(want).all() and (want == 0).any() and (want > 0).any()
    with cpu_gemm.gemm_backend(policy):
        got = cpu_gemm.addmm(bias, a, b, relu=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("policy", ["blas", "onednn"])
def test_a_bias_of_another_shape_is_broadcast_as_torch_does(policy):
    """oneDNN takes a bias of shape (N,) only: a 0-d bias was dropped without a word there, a (1, N) one failed
    ("could not create a primitive descriptor")."""
    g = torch.Generator().manual_seed(9)
    a, b = torch.randn(7, 4, generator=g), torch.randn(4, 3, generator=g)
    with cpu_gemm.gemm_backend(policy):
        for bias in (torch.tensor(1.5), torch.randn(1, 3, generator=g), torch.randn(1, generator=g)):
            for relu in (False, True):
                want = torch.addmm(bias, a, b)
                want = want.relu() if relu else want
                torch.testing.assert_close(cpu_gemm.addmm(bias, a, b, relu=relu), want, rtol=1e-5, atol=1e-5)
        stack_a, stack_b = torch.stack([a, 2 * a]), torch.stack([b, b])  # (2, 7, 4) @ (2, 4, 3)
        bias_e1, bias_en, bias_n = torch.randn(2, 1, generator=g), torch.randn(2, 3, generator=g), torch.randn(3)
        for bias, as_added in ((bias_e1, bias_e1[:, None, :]), (bias_en, bias_en[:, None, :]), (bias_n, bias_n)):
            want = torch.bmm(stack_a, stack_b) + as_added  # an (N,) bias was added per row (or failed)
            for batch_dim in (0, 1):
                got = cpu_gemm.bmm(stack_a, stack_b, bias, batch_dim=batch_dim)
                torch.testing.assert_close(got if batch_dim == 0 else got.transpose(0, 1), want, rtol=1e-5,
                                           atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("policy", ["blas", "onednn"])
def test_bmm_transposed_a_equals_torch(policy):
    g = torch.Generator().manual_seed(6)
    E, K, M, N = 3, 13, 7, 5
    a = torch.randn(K, E * M, generator=g).view(K, E, M).transpose(0, 1)  # (E, K, M), strided like an activation
    b = torch.randn(E, K, N, generator=g)
    with cpu_gemm.gemm_backend(policy):
        got = cpu_gemm.bmm_transposed_a(a, b)
        assert ran_onednn(lambda: cpu_gemm.bmm_transposed_a(a, b)) == (policy == "onednn")
    assert got.shape == (E, M, N)
    torch.testing.assert_close(got, torch.bmm(a.double().transpose(1, 2), b.double()).float(), rtol=1e-5, atol=1e-5)
    matrices = [m.contiguous() for m in a]  # the same inputs held as E contiguous (K, M) matrices
    with cpu_gemm.gemm_backend(policy):
        torch.testing.assert_close(cpu_gemm.bmm_transposed_a(matrices, b), got, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(cpu_gemm.bmm_transposed_a(tuple(matrices), b), got, rtol=1e-6, atol=1e-6)


def test_a_block_sets_the_policy_of_its_own_thread_only():
    import threading

    seen = []
    with cpu_gemm.gemm_backend("blas"):
        worker = threading.Thread(target=lambda: seen.append(cpu_gemm.backend()))
        worker.start()
        worker.join()
        assert cpu_gemm.backend() == "blas"
    assert seen == [os.environ.get(cpu_gemm.ENV_VAR, "auto")]


def _zen(monkeypatch, family: int) -> None:
    monkeypatch.setattr(cpu_gemm, "auto_min_macs",
                        lambda: cpu_gemm.min_macs_for("AVX512", cpuinfo("AuthenticAMD", family)))


def test_auto_thresholds_hold_for_later_amd_families_and_read_the_first_processor():
    # family 26 "on": a later AMD family with AVX-512 is full width too
    assert cpu_gemm.min_macs_for("AVX512", cpuinfo("AuthenticAMD", 27)) == cpu_gemm.MIN_ONEDNN_MACS
    # the first processor's fields, not the last's
    mixed = cpuinfo("AuthenticAMD", 26) + "\n" + cpuinfo("GenuineIntel", 6)
    assert cpu_gemm.cpuinfo_fields(mixed)["vendor_id"] == "AuthenticAMD"
    assert cpu_gemm.min_macs_for("AVX512", mixed) == cpu_gemm.MIN_ONEDNN_MACS


@needs_onednn
def test_auto_on_zen5_starts_at_the_threshold_and_keeps_small_transposed_products_in_mkl(monkeypatch):
    _zen(monkeypatch, 26)
    k = cpu_gemm.MIN_ONEDNN_MACS // (64 * 64)
    with cpu_gemm.gemm_backend("auto"):
        assert cpu_gemm.uses_onednn(torch.randn(64, k), torch.randn(k, 64))  # exactly MIN_ONEDNN_MACS: "from"
        assert not cpu_gemm.uses_onednn(torch.randn(63, k), torch.randn(k, 64))
        # a column-major `a` of 2^25 multiply-adds: above the row-major bar, below the column-major one
        assert cpu_gemm.uses_onednn(torch.randn(1024, 256), torch.randn(256, 128))
        assert not cpu_gemm.uses_onednn(torch.randn(256, 1024).t(), torch.randn(256, 128))


@needs_onednn
def test_blas_policy_never_reaches_onednn_even_where_auto_would(monkeypatch):
    _zen(monkeypatch, 26)
    a, b = torch.randn(1024, 256), torch.randn(256, 128)
    with cpu_gemm.gemm_backend("auto"):
        assert cpu_gemm.uses_onednn(a, b)
    with cpu_gemm.gemm_backend("blas"):
        assert not cpu_gemm.uses_onednn(a, b)
        assert not ran_onednn(lambda: cpu_gemm.mm(a, b))


def test_a_block_left_by_an_exception_restores_the_policy(monkeypatch):
    monkeypatch.setenv(cpu_gemm.ENV_VAR, "blas")
    with pytest.raises(RuntimeError, match="inside"):
        with cpu_gemm.gemm_backend("onednn"):
            raise RuntimeError("inside")
    assert cpu_gemm.backend() == "blas"


@needs_onednn
@pytest.mark.parametrize("policy", ["blas", "onednn"])
def test_strided_biases_are_added_as_torch_adds_them(policy):
    """oneDNN reads a bias as dense: a strided (N,) view (every other element, or an expert's row of an (N, E)
    bias transposed) gave other values when passed through as it is."""
    g = torch.Generator().manual_seed(12)
    a, b = torch.randn(7, 4, generator=g), torch.randn(4, 3, generator=g)
    bias = torch.randn(6, generator=g)[::2]
    assert not bias.is_contiguous()
    E = 3
    sa, sb = torch.randn(E, 7, 4, generator=g), torch.randn(E, 4, 3, generator=g)
    bias_en = torch.randn(3, E, generator=g).t()  # (E, N), each row strided
    with cpu_gemm.gemm_backend(policy):
        for relu in (False, True):
            want = torch.addmm(bias, a, b)
            torch.testing.assert_close(cpu_gemm.addmm(bias, a, b, relu=relu), want.relu() if relu else want,
                                       rtol=1e-5, atol=1e-5)
        want = torch.baddbmm(bias_en.unsqueeze(1), sa, sb)
        torch.testing.assert_close(cpu_gemm.bmm(sa, sb, bias_en), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cpu_gemm.bmm(sa, sb, bias_en, relu=True), want.relu(), rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("policy", ["blas", "onednn"])
def test_relu_keeps_a_nan_from_infinities_of_one_sign(policy):
    """Two +inf in a row of `a` (their sum +inf, not NaN) times weights of both signs: inf - inf = NaN in the
    output, which torch.relu keeps and oneDNN's fused relu would make 0."""
    g = torch.Generator().manual_seed(13)
    a, b, bias = torch.randn(9, 6, generator=g), torch.randn(6, 5, generator=g), torch.randn(5, generator=g)
    a[2, 3] = a[2, 4] = float("inf")
    b[3], b[4] = 1.0, -1.0
    want = torch.relu(torch.addmm(bias, a, b))
    assert want[2].isnan().all()
    with cpu_gemm.gemm_backend(policy):
        got = cpu_gemm.addmm(bias, a, b, relu=True)
    assert torch.equal(got.isnan(), want.isnan())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)


@needs_onednn
@pytest.mark.parametrize("policy", ["blas", "onednn"])
def test_bmm_transposed_a_of_an_empty_inner_dimension_is_zeros(policy):
    a, b = torch.randn(2, 0, 5), torch.randn(2, 0, 3)
    with cpu_gemm.gemm_backend(policy):
        got = cpu_gemm.bmm_transposed_a(a, b)
    assert torch.equal(got, torch.zeros(2, 5, 3))


@needs_onednn
@pytest.mark.parametrize("policy", ["blas", "onednn"])
def test_relu_keeps_the_nan_of_finite_operands_whose_products_overflow(policy):
    """Finite operands passed the old check (a sum of each), their products overflowed to inf - inf = NaN inside the
    GEMM, and oneDNN's fused relu made that NaN 0 where torch.relu keeps it (a mutation review's probe)."""
    a, b, bias = torch.tensor([[1e20, 1e20], [1.0, 2.0]]), torch.tensor([[1e20], [-1e20]]), torch.zeros(1)
    want = torch.relu(torch.addmm(bias, a, b))
    assert want[0, 0].isnan() and want[1, 0] == 0
    with cpu_gemm.gemm_backend(policy):
        got = cpu_gemm.addmm(bias, a, b, relu=True)
        stacked = cpu_gemm.bmm(torch.stack([a, a]), torch.stack([b, b]), torch.stack([bias, bias]), relu=True)
    for out in (got, stacked[0], stacked[1]):
        assert torch.equal(out.isnan(), want.isnan()) and out[1, 0] == 0


def test_the_fused_relu_is_kept_for_ordinary_operands_and_left_wherever_a_product_could_be_other_than_finite():
    g = torch.Generator().manual_seed(11)
    a, b, bias = torch.randn(64, 32, generator=g) * 100, torch.randn(32, 16, generator=g), torch.randn(16, generator=g)
    assert cpu_gemm._surely_finite(a, b, bias) and cpu_gemm._surely_finite(a, b, None)
    assert cpu_gemm._surely_finite(a.t().contiguous().t(), b.t().contiguous().t(), bias)  # strided operands
    for bad in (float("nan"), float("inf"), float("-inf")):
        for operand in (a, b, bias):
            broken = operand.clone()
            broken.view(-1)[3] = bad
            args = [broken if t is operand else t for t in (a, b, bias)]
            assert not cpu_gemm._surely_finite(*args)
    assert not cpu_gemm._surely_finite(a * 1e18, b * 1e18, bias)  # finite, but the products may overflow
    assert not cpu_gemm._surely_finite(a, b, bias * 1e38)


@pytest.mark.parametrize("policy", ["blas", "onednn"])
def test_a_batch_of_no_matrices_gives_an_empty_product_as_torch_does(policy):
    """bmm and bmm_transposed_a read the first matrix's shape before looking at the batch size: IndexError."""
    a, a_t, b = torch.randn(0, 3, 4), torch.randn(0, 4, 3), torch.randn(0, 4, 5)
    with cpu_gemm.gemm_backend(policy):
        assert cpu_gemm.bmm(a, b).shape == (0, 3, 5)
        assert cpu_gemm.bmm(a, b, torch.randn(0, 5), relu=True).shape == (0, 3, 5)
        assert cpu_gemm.bmm(a, b, batch_dim=1).shape == (3, 0, 5)
        assert cpu_gemm.bmm_transposed_a(a_t, b).shape == (0, 3, 5)
        with pytest.raises(ValueError, match="an empty list of matrices"):
            cpu_gemm.bmm([], b)


def test_bf16_products_go_to_onednn_only_on_cpus_with_bf16_instructions(monkeypatch):
    first_layer = (torch.randn(1024, 358).bfloat16(), torch.randn(358, 2048).bfloat16())  # 2^29.5 multiply-adds
    deeper_layer = (torch.randn(1024, 256).bfloat16(), torch.randn(256, 128).bfloat16())  # 2^25
    monkeypatch.setattr(cpu_gemm, "onednn_available", lambda: True)
    monkeypatch.setattr(cpu_gemm, "native_bf16", lambda: True)
    with cpu_gemm.gemm_backend("auto"):
        assert cpu_gemm.uses_onednn(*first_layer)
        assert not cpu_gemm.uses_onednn(*deeper_layer)  # even on PyTorch's side (measured)
        assert cpu_gemm.uses_onednn(first_layer[0].t().contiguous().t(), first_layer[1])  # x^T @ g's layout
        assert not cpu_gemm.uses_onednn(first_layer[0], first_layer[1].float())  # mixed dtypes: PyTorch's
        assert not cpu_gemm.uses_onednn(first_layer[0].half(), first_layer[1].half())  # float16: not measured
    with cpu_gemm.gemm_backend("onednn"):
        assert cpu_gemm.uses_onednn(*deeper_layer)
    with cpu_gemm.gemm_backend("blas"):
        assert not cpu_gemm.uses_onednn(*first_layer)
    monkeypatch.setattr(cpu_gemm, "native_bf16", lambda: False)  # oneDNN would emulate bfloat16: PyTorch's ops
    for policy in ("auto", "onednn"):
        with cpu_gemm.gemm_backend(policy):
            assert not cpu_gemm.uses_onednn(*first_layer)


needs_native_bf16 = pytest.mark.skipif(not (cpu_gemm.onednn_available() and cpu_gemm.native_bf16()),
                                       reason="this CPU has no bfloat16 instructions (AVX512-BF16 or AMX)")


@needs_native_bf16
@pytest.mark.parametrize("a_t", [False, True])
def test_bf16_products_through_onednn_round_as_torchs_do(a_t):
    a, b = operand(67, 45, a_t, 0).bfloat16(), operand(45, 33, False, 1).bfloat16()
    bias = torch.randn(33).bfloat16()
    want = (bias.double() + a.double() @ b.double())  # the operands' exact product, float64
    with cpu_gemm.gemm_backend("onednn"):
        assert ran_onednn(lambda: cpu_gemm.addmm(bias, a, b, relu=True))
        got, got_relu, got_mm = cpu_gemm.addmm(bias, a, b), cpu_gemm.addmm(bias, a, b, relu=True), cpu_gemm.mm(a, b)
    assert got.dtype == got_relu.dtype == got_mm.dtype == torch.bfloat16
    # float32 accumulation, one rounding to bfloat16: within one bfloat16 step of the exact value, as torch's
    for value, exact in ((got, want), (got_relu, want.relu()), (got_mm, a.double() @ b.double()),
                         (torch.addmm(bias, a, b), want)):
        torch.testing.assert_close(value.double(), exact, rtol=2 ** -7, atol=1e-2)
    assert torch.equal(got_relu, got.relu())


@needs_native_bf16
def test_bf16_relu_keeps_a_nan_as_torch_relu_does():
    a, b, bias = torch.randn(16, 8).bfloat16(), torch.randn(8, 4).bfloat16(), torch.randn(4).bfloat16()
    a[3, 2] = float("nan")
    with cpu_gemm.gemm_backend("onednn"):
        got = cpu_gemm.addmm(bias, a, b, relu=True)
    assert torch.isnan(got[3]).all() and not torch.isnan(got[:3]).any()


@needs_native_bf16
@pytest.mark.parametrize("dims", [[24, 16, 8], [24, 16]])
def test_relu_experts_in_bf16_through_onednn_matches_pytorchs_bf16_products(dims):
    torch.manual_seed(0)
    E, B = 4, 96
    x = torch.randn(B, dims[0]).bfloat16().requires_grad_()
    ws = [(torch.randn(E, a, b) / a ** 0.5).bfloat16().requires_grad_() for a, b in zip(dims, dims[1:])]
    bs = [(torch.randn(E, b) / 4).bfloat16().requires_grad_() for b in dims[1:]]
    g = torch.randn(B, E, dims[-1]).bfloat16()
    results = {}
    for policy in ("blas", "onednn"):
        with cpu_gemm.gemm_backend(policy):
            y = relu_experts(x, ws, bs)
            grads = torch.autograd.grad(y, [x, *ws, *bs], g)
        results[policy] = (y, grads)
    (y_blas, g_blas), (y_dnn, g_dnn) = results["blas"], results["onednn"]
    assert y_dnn.dtype == torch.bfloat16
    torch.testing.assert_close(y_dnn.float(), y_blas.float(), rtol=2e-2, atol=2e-2)
    for a, b in zip(g_dnn, g_blas):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=3e-2 * b.float().abs().max().item())


def test_bmm_transposed_a_in_bf16_of_a_strided_batch_equals_torchs_product():
    """bfloat16 inputs of a strided layout are made contiguous first (PyTorch's kernel for that layout was 7x
    slower): the values are the same product's."""
    first = torch.randn(64, 3 * 16).bfloat16()  # (B, E*h): an expert's columns of a wider activation
    a = first.view(64, 3, 16).transpose(0, 1)  # (E, B, h), strided
    b = torch.randn(3, 64, 8).bfloat16()
    with cpu_gemm.gemm_backend("blas"):
        got = cpu_gemm.bmm_transposed_a(a, b)
    assert got.dtype == torch.bfloat16 and got.shape == (3, 16, 8)
    assert torch.equal(got, torch.bmm(a.contiguous().transpose(1, 2), b))
    torch.testing.assert_close(got.double(), a.double().transpose(1, 2) @ b.double(), rtol=2 ** -7, atol=1e-2)


# Gaps a mutation review of the bfloat16 path found: PyTorch's bmm fed a strided reduced-precision a^T (7x slower,
# same values), bfloat16 (E, N) biases kept from oneDNN's per-expert products, the threshold's boundary.
@pytest.mark.parametrize("dtype, copied", [(torch.bfloat16, True), (torch.float16, True), (torch.float32, False)])
def test_bmm_transposed_a_copies_a_strided_batch_first_in_reduced_precision_only(dtype, copied, monkeypatch):
    first = torch.randn(64, 3 * 16).to(dtype)  # (B, E*h): an expert's columns of a wider activation
    a = first.view(64, 3, 16).transpose(0, 1)  # (E, B, h), strided
    b = torch.randn(3, 64, 8).to(dtype)
    seen = []
    real = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda x, y, **kw: seen.append(x) or real(x, y, **kw))
    with cpu_gemm.gemm_backend("blas"):
        got = cpu_gemm.bmm_transposed_a(a, b)
    (a_t,) = seen
    assert a_t.transpose(1, 2).is_contiguous() == copied  # float32: MKL reads the strided batch as it is
    assert (a_t.data_ptr() == first.data_ptr()) == (not copied)
    assert torch.equal(got, real(a.transpose(1, 2), b))


@needs_native_bf16
@pytest.mark.parametrize("as_list", [False, True])
def test_a_bf16_batch_with_an_expert_bias_runs_onednn_per_expert_under_the_onednn_policy(as_list):
    a, b, bias = torch.randn(3, 40, 24).bfloat16(), torch.randn(3, 24, 16).bfloat16(), torch.randn(3, 16).bfloat16()
    with cpu_gemm.gemm_backend("onednn"):
        assert ran_onednn(lambda: cpu_gemm.bmm(list(a) if as_list else a, b, bias, relu=True))
        got = cpu_gemm.bmm(list(a) if as_list else a, b, bias, relu=True)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, torch.baddbmm(bias.unsqueeze(1), a, b).relu(), rtol=2 ** -7, atol=1e-2)


def test_bf16_products_go_to_onednn_from_exactly_min_onednn_macs_bf16(monkeypatch):
    a, b = torch.ones(2, 2).bfloat16(), torch.ones(2, 2).bfloat16()
    monkeypatch.setattr(cpu_gemm, "onednn_available", lambda: True)
    monkeypatch.setattr(cpu_gemm, "native_bf16", lambda: True)
    with cpu_gemm.gemm_backend("auto"):
        assert cpu_gemm.picks_onednn(a, b, cpu_gemm.MIN_ONEDNN_MACS_BF16)
        assert not cpu_gemm.picks_onednn(a, b, cpu_gemm.MIN_ONEDNN_MACS_BF16 - 1)
    assert cpu_gemm.MIN_ONEDNN_MACS_BF16 == 1 << 27  # measured (a Xeon 6 with AMX; module comment)


def test_bf16_instructions_are_read_from_the_cpu_flags_not_from_avx512_alone():
    """PyTorch's own check says True on any AVX-512 CPU (oneDNN emulates bfloat16 on a Skylake): the flags tell."""
    def flags(*names: str) -> str:
        return f"processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx2 avx512f avx512bw {' '.join(names)}\n"

    assert cpu_gemm.has_bf16_instructions(flags("avx512_bf16"))  # Cooper Lake, Zen 4
    assert cpu_gemm.has_bf16_instructions(flags("amx_bf16", "amx_tile"))  # Sapphire Rapids on
    assert not cpu_gemm.has_bf16_instructions(flags("avx512_vnni"))  # Cascade Lake: emulated
    assert not cpu_gemm.has_bf16_instructions(flags())
    assert not cpu_gemm.has_bf16_instructions("")  # no /proc/cpuinfo
    with open("/proc/cpuinfo") as f:  # this machine: native_bf16 says what its flags say (oneDNN present)
        text = f.read()
    if cpu_gemm.onednn_available():
        assert cpu_gemm.native_bf16() == cpu_gemm.has_bf16_instructions(text)
