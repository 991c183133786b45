"""Float32 and bfloat16 matrix products on the CPU through oneDNN where it beats PyTorch's default: `mm`, `addmm`,
`bmm`.

PyTorch's CPU `mm` / `addmm` / `bmm` call MKL. On AMD CPUs MKL runs its AVX2 kernels even where the CPU has
AVX-512, while oneDNN (also built into PyTorch, reached through `torch.ops.mkldnn._linear_pointwise`) picks its
kernels by instruction set. On the 2-vCPU AMD EPYCs of this project's benchmarks, oneDNN's float32 matmul runs
1.95-2.23x MKL's rate on the large MMoE's GEMMs on a Zen 5, 1.04-1.45x on a Zen 4 (`benchmarks/cpu_gemm.py`).
Both are IEEE float32 with float32 accumulation; they differ only in summation order (rounding-level
differences, tested).

oneDNN's speed depends on the operands' layouts in ways that are hard to predict (one strided case measured here
took 2.7 s for products MKL does in 2.9 ms), so it is only given layouts that were measured: `a` row-major (rows
may lie further apart than their length, as an expert's columns of a wider activation do) or dense column-major
(the transpose of a contiguous tensor); `b` dense row-major or dense column-major.
With `a` column-major (the weight gradient's x^T @ g) oneDNN wins clearly only on large products (0.7-1.2x MKL
on (64..256, 1024..4096) @ (.., 64..128) across runs, 1.6-2.0x from (358, 1024) @ (1024, 2048) up).

`bmm` runs a batch of products as one oneDNN call per matrix when the policy picks oneDNN for them (a Python loop
over the batch: meant for a handful of large products, such as the 8 experts' deeper layers of a dense MMoE; the
sparse dispatch of many small experts keeps its one grouped / batched GEMM per layer).

Policy (`MMOE_REC_CPU_GEMM`, read per call so tests and benchmarks can switch it; `gemm_backend(...)` does the
same for a block of code):
- `auto` (default): oneDNN when PyTorch has it, the CPU is an AMD one with AVX-512 (where MKL's handicap shows;
  on Intel CPUs MKL runs AVX-512 itself: on a 2-vCPU Xeon, Emerald Rapids, oneDNN ran the large MMoE's products
  at 0.51-1.02x MKL's rate, the 2048^3 square at 0.93x, an expert's deeper layer as relu_experts runs it at
  0.63-0.71x, 2026-12-06; on a Zen 3, AVX2 only, MKL won every product of the large MMoE, oneDNN at 0.62-0.92x),
  both operands are float32 in a measured layout and the product is large enough (`auto_min_macs()`; at least
  `MIN_ONEDNN_MACS_A_TRANSPOSED` with `a` column-major):
  - full-width AVX-512 (Zen 5, AMD family 26 on): from `MIN_ONEDNN_MACS` multiply-adds. Below that MKL's lower
    per-call cost wins (14 against 6 us for (1024, 64) @ (64, 1)).
  - Zen 4 (family 25), which runs AVX-512 instructions on 256-bit units: oneDNN's lead is smaller there (1.04-1.45x
    on the first layer's products, 1.13-1.36x on a 2048^3 square), and on an expert's deeper layer, 8 products of
    (1024, 256) @ (256, 128) back to back, it loses to MKL's bmm (0.64-0.98x, the stacking copies included). So
    only products from `MIN_ONEDNN_MACS_HALF_WIDTH` go to oneDNN there, which keeps the first layer's.
- `onednn`: oneDNN for every float32 CPU product in a measured layout, whatever its size or the CPU (tests use it
  to reach the oneDNN path anywhere).
- `blas`: always PyTorch's own `mm` / `addmm`.
bfloat16 products (relu_experts under CPU autocast) go to oneDNN under `auto` and `onednn` on CPUs with bfloat16
instructions (`native_bf16()`: AVX512-BF16 or AMX), from `MIN_ONEDNN_MACS_BF16` multiply-adds under `auto`: PyTorch
sends them to oneDNN there too, but without the fused ReLU, and x^T @ g ran 1.25x faster through
`_linear_pointwise` (a Xeon 6). oneDNN accumulates in float32 and rounds the output to bfloat16, as PyTorch's.
Anything else (other dtypes or layouts, CUDA, empty products) goes to PyTorch's own ops. Outputs are new
contiguous tensors (except `bmm_transposed_a`'s on the oneDNN path: a transposed view). No autograd: callers are hand-written backward passes (`relu_experts`) or no-grad code.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
from collections.abc import Iterator, Sequence

import torch

ENV_VAR = "MMOE_REC_CPU_GEMM"
BACKENDS = ("auto", "onednn", "blas")
MIN_ONEDNN_MACS = 1 << 21  # below ~2M multiply-adds MKL's lower call overhead wins (benchmarks/cpu_gemm.py)
MIN_ONEDNN_MACS_HALF_WIDTH = 1 << 27  # Zen 4: the first layer's products (2^29.5) yes, a deeper layer's (2^25) no
MIN_ONEDNN_MACS_A_TRANSPOSED = 1 << 27
# bfloat16 (autocast): from here oneDNN, where PyTorch's addmm + relu_ took twice oneDNN's fused product on the large
# MMoE's first layer on a Xeon 6 with AMX (1.56 against 0.78 ms), and x^T @ g 1.36 against 1.09 ms; products of an
# expert's deeper layer or a tower (2^23-2^25) came out even
MIN_ONEDNN_MACS_BF16 = 1 << 27
ZEN5_FAMILY = 26  # AMD family 0x1A: AVX-512 on full 512-bit units

_blocks = threading.local()  # .stack: this thread's gemm_backend(...) blocks, innermost last


def _stack() -> list[str]:
    if not hasattr(_blocks, "stack"):
        _blocks.stack = []
    return _blocks.stack


def backend() -> str:
    """The policy in force: this thread's innermost `gemm_backend` block, else the environment, else `auto`."""
    stack = _stack()
    name = stack[-1] if stack else os.environ.get(ENV_VAR, "auto")
    if name not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={name!r}: expected one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def gemm_backend(name: str) -> Iterator[None]:
    """Run a block under one policy ('auto', 'onednn' or 'blas'), e.g. to A/B the two in one process. Per thread;
    on the CPU autograd runs a backward on the thread that calls it, so a block covers the backward it calls."""
    if name not in BACKENDS:
        raise ValueError(f"gemm backend {name!r}: expected one of {', '.join(BACKENDS)}")
    _stack().append(name)
    try:
        yield
    finally:
        _stack().pop()


@functools.cache
def onednn_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def cpuinfo_fields(cpuinfo: str) -> dict[str, str]:
    """The "key : value" lines of /proc/cpuinfo text, the first processor's (all cores are alike in a VM)."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    return fields


@functools.cache
def read_cpuinfo() -> str:
    """/proc/cpuinfo, or "" where there is none (not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def has_bf16_instructions(cpuinfo: str) -> bool:
    """Whether /proc/cpuinfo text names bfloat16 instructions (AVX512-BF16 or AMX-BF16) among its flags.
    PyTorch's `torch.ops.mkldnn._is_mkldnn_bf16_supported()` says True on any AVX-512 CPU (oneDNN's avx512_core,
    where it emulates bfloat16: a Skylake too), so it cannot tell."""
    flags = set(cpuinfo_fields(cpuinfo).get("flags", "").split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions and PyTorch's oneDNN can run bfloat16 products (False where there
    is no /proc/cpuinfo to read)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check is not None and check()) and has_bf16_instructions(read_cpuinfo())


def min_macs_for(cpu_capability: str, cpuinfo: str) -> int | None:
    """The smallest product (multiply-adds, `a` row-major) that `auto` sends to oneDNN on a CPU that PyTorch runs
    with `cpu_capability` ("AVX512", "AVX2", ...) and that /proc/cpuinfo describes as `cpuinfo`; None: none."""
    if not cpu_capability.startswith("AVX512"):
        return None
    fields = cpuinfo_fields(cpuinfo)
    if fields.get("vendor_id") != "AuthenticAMD":
        return None
    try:
        family = int(fields.get("cpu family", ""))
    except ValueError:
        return None
    return MIN_ONEDNN_MACS if family >= ZEN5_FAMILY else MIN_ONEDNN_MACS_HALF_WIDTH


@functools.cache
def auto_min_macs() -> int | None:
    """`min_macs_for` this machine (None where there is no /proc/cpuinfo to read: keep MKL)."""
    return min_macs_for(torch.backends.cpu.get_cpu_capability(), read_cpuinfo())


def row_major(t: torch.Tensor) -> bool:
    """A 2-d tensor whose rows are dense and lie at least a row's length apart (a measured layout for `a`)."""
    return t.dim() == 2 and _row_major(t, gaps_allowed=True)


def _row_major(t: torch.Tensor, gaps_allowed: bool = False) -> bool:
    if t.stride(1) != 1:
        return False
    return t.stride(0) >= t.shape[1] if gaps_allowed else t.stride(0) == t.shape[1]


def _column_major(t: torch.Tensor) -> bool:
    return t.stride(0) == 1 and t.stride(1) == t.shape[0]


def uses_onednn(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a (M, K) @ (K, N) product goes to oneDNN under the policy in force."""
    if a.dim() != 2 or a.numel() == 0 or b.numel() == 0:  # empty products: PyTorch's ops handle them
        return False
    a_row_major = _row_major(a, gaps_allowed=True)
    if not (a_row_major or _column_major(a)) or not (_row_major(b) or _column_major(b)):
        return False
    return _policy_picks_onednn(a, b, a.shape[0] * a.shape[1] * b.shape[1], a_row_major)


def picks_onednn(a: torch.Tensor, b: torch.Tensor, macs: int) -> bool:
    """Whether the policy sends a product of `macs` multiply-adds to oneDNN once its operands are in measured
    layouts (a row-major, b dense; the caller makes them so): a, b give dtype and device only."""
    return _policy_picks_onednn(a, b, macs, a_row_major=True)


def _policy_picks_onednn(a: torch.Tensor, b: torch.Tensor, macs: int, a_row_major: bool) -> bool:
    """The policy's choice for a product of `macs` multiply-adds in a measured layout (a, b give dtype, device)."""
    policy = backend()
    if policy == "blas" or not onednn_available():
        return False
    if a.device.type != "cpu" or a.dtype != b.dtype or a.dtype not in (torch.float32, torch.bfloat16):
        return False
    if a.dtype == torch.bfloat16:  # oneDNN's own kernels only where the CPU has bfloat16 instructions
        if not native_bf16():
            return False
        return policy == "onednn" or macs >= MIN_ONEDNN_MACS_BF16
    if policy == "onednn":
        return True
    least = auto_min_macs()
    if least is None:
        return False
    return macs >= (least if a_row_major else max(least, MIN_ONEDNN_MACS_A_TRANSPOSED))


def _onednn(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, relu: bool = False) -> torch.Tensor:
    # _linear_pointwise computes input @ weight.T + bias with weight (N, K): b.t() is a view, no copy. "relu" is
    # applied by the GEMM to its output as it is written (no second pass over it), but oneDNN's relu makes a NaN 0
    # (torch.relu keeps it): only for operands whose product is sure to be finite (checking reads a and b once; a
    # relu pass reads and writes the larger output)
    if relu and not _surely_finite(a, b, bias):
        return torch.ops.mkldnn._linear_pointwise(a, b.t(), bias, "none", [], "").relu_()
    return torch.ops.mkldnn._linear_pointwise(a, b.t(), bias, "relu" if relu else "none", [], "")


_FINITE_BOUND = torch.finfo(torch.float32).max / 2  # room for the GEMM's rounding


def _surely_finite(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether a @ b + bias is finite whatever the order of its sums, told conservatively by one norm of each
    operand: no product, partial sum or output exceeds ||a||_F ||b||_F + ||bias|| (Cauchy-Schwarz), and a NaN or
    an inf in an operand makes its norm NaN or inf. Finite operands whose products overflow float32 (torch then
    gives inf - inf = NaN, which oneDNN's relu would make 0) say False, and so do operands whose norms overflow; the
    caller then takes the path that is right for any values. One vectorized read of each and one host sync:
    torch.isfinite(t).all() makes four passes and three temporaries, 1.5-1.8 ms a step of the large MMoE on a Zen 4
    (benchmarks/README.md)."""
    norms = torch.stack([torch.linalg.vector_norm(t) for t in (a, b, bias) if t is not None]).tolist()
    bound = norms[0] * norms[1] + sum(norms[2:])  # float64
    return math.isfinite(bound) and bound < _FINITE_BOUND


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M, K) @ (K, N) -> (M, N)."""
    return _onednn(a, b, None) if uses_onednn(a, b) else torch.mm(a, b)


def addmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, relu: bool = False) -> torch.Tensor:
    """bias (N,) + (M, K) @ (K, N) -> (M, N); with relu=True, relu of that (the same values either way). A bias of
    another shape is broadcast as torch.addmm does, by torch.addmm (oneDNN takes (N,) only)."""
    if uses_onednn(a, b) and bias.dtype == a.dtype and bias.shape == (b.shape[1],):
        return _onednn(a, b, bias.contiguous(), relu)
    out = torch.addmm(bias, a, b)
    return out.relu_() if relu else out


REDUCED_PRECISION = (torch.bfloat16, torch.float16)
MAX_LOOPED_BATCH = 32  # bmm loops in Python over the batch only for a few large products


def _matrix_shape(a: torch.Tensor | Sequence[torch.Tensor]) -> tuple[int, int]:
    """(rows, columns) of each matrix of a batch, (E, R, C) or E (R, C) matrices (E = 0 only as a tensor: a list
    of none has no shape to give the result)."""
    if isinstance(a, torch.Tensor):
        return a.shape[1], a.shape[2]
    if not a:
        raise ValueError("an empty list of matrices: give an (0, R, C) tensor for an empty batch")
    return a[0].shape[0], a[0].shape[1]


def bmm(a: torch.Tensor | Sequence[torch.Tensor], b: torch.Tensor, bias: torch.Tensor | None = None,
        batch_dim: int = 0, relu: bool = False) -> torch.Tensor:
    """(E, M, K), or E (M, K) matrices, @ (E, K, N) [+ bias (E, N)] -> (E, M, N), or (M, E, N) contiguous with
    batch_dim=1 (then the result viewed as (M, E*N) is every product side by side, the layout of a wide GEMM's
    output); relu=True: relu of that. A bias of another shape than (E, N) goes to torch.baddbmm, which broadcasts it
    with a row axis put before its last: (N,) as (1, N), (E, 1) as (E, 1, 1)."""
    E, (M, _), N = len(a), _matrix_shape(a), b.shape[2]
    if 0 < E <= MAX_LOOPED_BATCH and uses_onednn(a[0], b[0]) and (
            bias is None or (bias.dtype == b.dtype and bias.shape == (E, N))):
        outs = [_onednn(a[e], b[e], None if bias is None else bias[e].contiguous(), relu) for e in range(E)]
        return torch.stack(outs, dim=batch_dim)  # one copy of the outputs; oneDNN cannot write into a slice
    if not isinstance(a, torch.Tensor):
        a = torch.stack(list(a))
    if batch_dim == 0:
        out = torch.bmm(a, b) if bias is None else torch.baddbmm(bias.unsqueeze(-2), a, b)
    else:
        out = torch.empty(M, E, N, dtype=torch.result_type(a, b), device=a.device)
        if bias is None:
            torch.bmm(a, b, out=out.transpose(0, 1))
        else:
            torch.baddbmm(bias.unsqueeze(-2), a, b, out=out.transpose(0, 1))
    return out.relu_() if relu else out


def bmm_transposed_a(a: torch.Tensor | Sequence[torch.Tensor], b: torch.Tensor) -> torch.Tensor:
    """a (E, K, M), or E (K, M) matrices, b (E, K, N) -> a^T @ b (E, M, N): a batch of layers' weight gradients
    (inputs^T @ output gradients). Through oneDNN each product runs as (b[e]^T @ a[e])^T with both operands made
    contiguous first: 2.1-2.5 ms, copies included, against 2.9-3.0 ms for MKL's bmm on (8, 1024, 256)^T @
    (8, 1024, 128), where oneDNN on the strided a[e]^T directly took 5.5 ms (benchmarks/cpu_gemm.py times one
    expert's product both ways); inputs already held as contiguous matrices are read as they are. The result is
    then a transposed view of an (E, N, M) tensor."""
    E, (K, M), N = len(a), _matrix_shape(a), b.shape[2]
    # oneDNN gets (N, K) @ (K, M), both contiguous (row-major): a measured layout.
    if 0 < E <= MAX_LOOPED_BATCH and K * M * N > 0 and _policy_picks_onednn(a[0], b, N * K * M, a_row_major=True):
        b_t_all = b.transpose(1, 2).contiguous()  # (E, N, K)
        a_all = a.contiguous() if isinstance(a, torch.Tensor) else [m.contiguous() for m in a]  # (E, K, M)
        return torch.stack([_onednn(b_t_all[e], a_all[e], None) for e in range(E)]).transpose(1, 2)
    a_all = a if isinstance(a, torch.Tensor) else torch.stack(list(a))
    if a_all.dtype in REDUCED_PRECISION and a_all.device.type == "cpu":
        # PyTorch's bfloat16 bmm on a^T of a strided a (an expert's columns of a wider activation) took 7.9 ms for
        # (8, 1024, 256)^T @ (8, 1024, 128) on a Xeon 6 with AMX, 1.07 ms with the copy made first
        a_all = a_all.contiguous()
    return torch.bmm(a_all.transpose(1, 2), b)
