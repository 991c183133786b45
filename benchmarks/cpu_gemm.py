"""Float32 GEMMs on this CPU: PyTorch's own mm (MKL) against oneDNN (nn.cpu_gemm), side by side in one run.

    .venv/bin/python benchmarks/cpu_gemm.py            # ~1 min on 2 idle CPU cores

For each shape and operand layout (a / b row-major "N" or the transpose of a contiguous tensor "T"), the two
libraries take turns, round after round, and the median of the per-round time ratios is printed with each one's
median time and GFLOP/s; also the largest difference from a float64 product, for both. The shapes are the GEMMs
of the large MMoE of train_throughput.py (batch 1024, input 358, 8 experts of 256-128, towers of 64, 2 gates) in
the orientations nn.relu_experts gives them, a few smaller products (where nn.cpu_gemm's `auto` policy keeps
MKL) and a 2048^3 square, each product alone, called again and again on the same operands. A second table times
an expert's deeper layer for all 8 experts as nn.relu_experts runs it (8 products on their own operands back to
back, and the copies each library's path needs): a product that wins alone can lose there. It shows which
products the policy should send to oneDNN; the `auto` column says what it does on this CPU. Nothing here is a test.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _args import at_least  # noqa: E402
from mmoe_rec.nn import cpu_gemm  # noqa: E402

# (label, M, K, N, a layout, b layout)
CASES = [
    ("experts' first layer, forward", 1024, 358, 2048, "N", "N"),
    ("first layer, input gradient g @ W^T", 1024, 2048, 358, "N", "T"),
    ("first layer, weight gradient x^T @ g", 358, 1024, 2048, "T", "N"),
    ("an expert's second layer, forward", 1024, 256, 128, "N", "N"),
    ("second layer, input gradient", 1024, 128, 256, "N", "T"),
    ("second layer, weight gradient (as g^T h)", 128, 1024, 256, "N", "N"),
    ("second layer, weight gradient x^T @ g", 256, 1024, 128, "T", "N"),
    ("gates, forward", 1024, 358, 16, "N", "N"),
    ("tower, forward", 1024, 128, 64, "N", "N"),
    ("tower output, forward", 1024, 64, 1, "N", "N"),
    ("small experts (E=256, d=64)", 64, 64, 64, "N", "N"),
    ("square", 2048, 2048, 2048, "N", "N"),
]


def operand(rows: int, cols: int, layout: str, g: torch.Generator) -> torch.Tensor:
    return torch.randn(cols, rows, generator=g).t() if layout == "T" else torch.randn(rows, cols, generator=g)


def time_once(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def under(policy: str, fn: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        with cpu_gemm.gemm_backend(policy):
            fn()
    return run


def onednn_calls(fn: Callable[[], object]) -> int:
    """How many oneDNN products `fn` makes (counted at nn.cpu_gemm's one call site)."""
    calls = 0
    real = cpu_gemm._onednn

    def counting(*args):
        nonlocal calls
        calls += 1
        return real(*args)
    cpu_gemm._onednn = counting
    try:
        fn()
    finally:
        cpu_gemm._onednn = real
    return calls


def compare(fn: Callable[[], object], rounds: int) -> tuple[float, float, float]:
    """Median seconds under MKL and under oneDNN, and the median of the per-round ratios MKL / oneDNN."""
    fns = {"blas": under("blas", fn), "onednn": under("onednn", fn)}
    est = time_once(fns["blas"], 3)
    calls = max(1, min(200, int(0.05 / max(est, 1e-6))))  # ~50 ms per contender per round
    times: dict[str, list[float]] = {name: [] for name in fns}
    for run in fns.values():
        run()
    for _ in range(rounds):
        for name, run in fns.items():
            times[name].append(time_once(run, calls))
    speedup = statistics.median(m / o for m, o in zip(times["blas"], times["onednn"]))
    return statistics.median(times["blas"]), statistics.median(times["onednn"]), speedup


def max_errors(fn: Callable[[], torch.Tensor], exact: torch.Tensor) -> str:
    errs = []
    for policy in ("blas", "onednn"):
        with cpu_gemm.gemm_backend(policy):
            errs.append((fn() - exact).abs().max().item())
    return f"{errs[0]:.1e} / {errs[1]:.1e}"


def row(label: str, shape: str, flops: int, timing: tuple[float, float, float], auto: bool, errors: str) -> str:
    t_mkl, t_dnn, speedup = timing
    return (f"{label:42s} {shape:>22s}  {t_mkl * 1e3:8.3f} {t_dnn * 1e3:9.3f} {flops / t_mkl / 1e9:8.1f} "
            f"{flops / t_dnn / 1e9:11.1f} {speedup:7.2f}x {'oneDNN' if auto else 'MKL':>6s}  {errors}")


HEADER = (f"{'product':42s} {'shape':>22s}  {'MKL ms':>8s} {'oneDNN ms':>9s} {'MKL GF/s':>8s} "
          f"{'oneDNN GF/s':>11s} {'speed-up':>8s} {'auto':>6s}  max |err| MKL / oneDNN")


def single_products(rounds: int, g: torch.Generator) -> None:
    print("\nOne product at a time (the same operands call after call)")
    print(HEADER)
    for label, M, K, N, la, lb in CASES:
        a, b = operand(M, K, la, g), operand(K, N, lb, g)
        with cpu_gemm.gemm_backend("auto"):
            auto = cpu_gemm.uses_onednn(a, b)
        print(row(label, f"{M} x {K} x {N} {la}{lb}", 2 * M * K * N, compare(lambda: cpu_gemm.mm(a, b), rounds),
                  auto, max_errors(lambda: cpu_gemm.mm(a, b), a.double() @ b.double())))


def expert_layer(rounds: int, g: torch.Generator, E: int = 8, B: int = 1024, h0: int = 256, h1: int = 128) -> None:
    """An expert's deeper layer for all E experts, as nn.relu_experts runs it: E products back to back (each on its
    own operands), through cpu_gemm's bmm (MKL: one torch.bmm; oneDNN: one call per expert and a stacking copy)."""
    print(f"\nAn expert's deeper layer, {E} experts back to back as nn.relu_experts runs it (copies included)")
    print(HEADER)
    first = torch.randn(B, E * h0, generator=g).relu_()  # the first layer's output, (B, E*h0)
    h = first.view(B, E, h0).transpose(0, 1)  # (E, B, h0), strided
    w = torch.randn(E, h0, h1, generator=g) / h0 ** 0.5
    bias = torch.randn(E, h1, generator=g)
    grad = torch.randn(E, B, h1, generator=g)
    w_t = w.transpose(1, 2)
    hd, wd, gd = h.double(), w.double(), grad.double()
    products = [
        ("forward h @ W + b", f"{E} x ({B} x {h0} x {h1})", lambda: cpu_gemm.bmm(h, w, bias),
         torch.baddbmm(bias.double().unsqueeze(1), hd, wd)),
        ("input gradient g @ W^T, (B, E*h0) out", f"{E} x ({B} x {h1} x {h0})",
         lambda: cpu_gemm.bmm(grad, w_t, batch_dim=1), torch.bmm(gd, wd.transpose(1, 2)).transpose(0, 1)),
        ("weight gradient h^T @ g", f"{E} x ({h0} x {B} x {h1})", lambda: cpu_gemm.bmm_transposed_a(h, grad),
         torch.bmm(hd.transpose(1, 2), gd)),
    ]
    for label, shape, fn, exact in products:
        with cpu_gemm.gemm_backend("auto"):
            auto = onednn_calls(fn) > 0
        print(row(label, shape, 2 * E * B * h0 * h1, compare(fn, rounds), auto, max_errors(fn, exact)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=at_least(1), default=9)
    p.add_argument("--threads", type=at_least(1), default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, oneDNN available: {cpu_gemm.onednn_available()}, "
          f"auto sends products from {cpu_gemm.auto_min_macs()} multiply-adds to oneDNN ({cpu_model()})")
    if not cpu_gemm.onednn_available():
        return 0
    g = torch.Generator().manual_seed(0)
    single_products(args.rounds, g)
    expert_layer(args.rounds, g)
    return 0


def cpu_model() -> str:
    fields = cpu_gemm.cpuinfo_fields(cpu_gemm.read_cpuinfo())
    return f"{fields.get('model name', '?')}, family {fields.get('cpu family', '?')}"


if __name__ == "__main__":
    raise SystemExit(main())
