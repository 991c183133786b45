"""Float32 GEMMs on this CPU: PyTorch's own mm (MKL) against oneDNN (nn.cpu_gemm), side by side in one run.

    .venv/bin/python benchmarks/cpu_gemm.py            # ~1 min on 2 idle CPU cores

For each shape and operand layout (a / b row-major "N" or the transpose of a contiguous tensor "T"), the two
libraries take turns, round after round, and the median of the per-round time ratios is printed with each one's
median time and GFLOP/s; also the largest difference from a float64 product, for both. The shapes are the GEMMs
of the large MMoE of train_throughput.py (batch 1024, input 358, 8 experts of 256-128, towers of 64, 2 gates) in
the orientations nn.relu_experts gives them, a few smaller products (where nn.cpu_gemm's `auto` policy keeps
MKL) and a 2048^3 square. It shows which products the policy should send to oneDNN; nothing here is a test.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, oneDNN available: {cpu_gemm.onednn_available()}")
    if not cpu_gemm.onednn_available():
        return 0
    g = torch.Generator().manual_seed(0)
    print(f"{'product':42s} {'M x K x N':>18s} lay  {'MKL ms':>8s} {'oneDNN ms':>9s} {'MKL GF/s':>8s} "
          f"{'oneDNN GF/s':>11s} {'speed-up':>8s} {'auto':>6s}  max |err| MKL / oneDNN")
    for label, M, K, N, la, lb in CASES:
        a, b = operand(M, K, la, g), operand(K, N, lb, g)
        exact = a.double() @ b.double()
        with cpu_gemm.gemm_backend("blas"):
            err_mkl = (cpu_gemm.mm(a, b) - exact).abs().max().item()
        with cpu_gemm.gemm_backend("onednn"):
            err_dnn = (cpu_gemm.mm(a, b) - exact).abs().max().item()
        with cpu_gemm.gemm_backend("auto"):
            auto = "oneDNN" if cpu_gemm.uses_onednn(a, b) else "MKL"

        def under(policy):
            def fn():
                with cpu_gemm.gemm_backend(policy):
                    cpu_gemm.mm(a, b)
            return fn

        fns = {"blas": under("blas"), "onednn": under("onednn")}
        est = time_once(fns["blas"], 3)
        calls = max(1, min(200, int(0.05 / max(est, 1e-6))))  # ~50 ms per contender per round
        times: dict[str, list[float]] = {name: [] for name in fns}
        for fn in fns.values():
            fn()
        for _ in range(args.rounds):
            for name, fn in fns.items():
                times[name].append(time_once(fn, calls))
        speedup = statistics.median(m / o for m, o in zip(times["blas"], times["onednn"]))
        t_mkl, t_dnn = statistics.median(times["blas"]), statistics.median(times["onednn"])
        flops = 2 * M * K * N
        print(f"{label:42s} {f'{M} x {K} x {N}':>18s} {la}{lb}  {t_mkl * 1e3:8.3f} {t_dnn * 1e3:9.3f} "
              f"{flops / t_mkl / 1e9:8.1f} {flops / t_dnn / 1e9:11.1f} {speedup:7.2f}x {auto:>6s}  "
              f"{err_mkl:.1e} / {err_dnn:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
