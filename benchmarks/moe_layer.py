"""Sparse MoE layer on this CPU: vectorized dispatch vs every-expert dense vs a naive per-expert loop.

One run, side by side, forward (no grad) and forward+backward, printed as ratios. The layer is the whole sparse
layer: router (x·W_g, top-k, softmax over the chosen) + dispatch + experts + weighted combine; gradients flow to x,
the router and the experts. Each expert is an FFN with one hidden layer, d -> h (ReLU) -> d, so one assignment costs
2·(d·h + h·d) FLOPs forward; the router 2·d·E per row; backward twice the forward.

"matmul rate" is the FLOP/s of a plain torch.mm of the experts' dominant shape (k·T, d) x (d, h) (fwd; fwd+bwd adds
its two backward mms), measured in the same process; the sparse layer's achieved rate is its FLOPs / its time.
On the CPU the same three products are also timed through oneDNN (nn.cpu_gemm, forced): torch.mm is MKL, which runs
AVX2 kernels on AMD CPUs, and oneDNN is up to 2x faster there (benchmarks/cpu_gemm.py). Both fractions are
printed; the sparse layer's grouped / batched GEMMs are PyTorch's (MKL).

Allocator: large fresh tensors on this VM pay page faults on first touch (glibc maps / unmaps big allocations and
trims the heap). By default the script asks glibc to keep freed memory in the heap (mmoe_rec/malloc.py, which
`mmoe-rec` applies too), for every contender alike; --default-malloc measures without it.

Usage: python benchmarks/moe_layer.py [--case 1|2|all] [--default-malloc] [--threads N] [--layout auto|grouped|padded]
                                     [--block-slots N] [--repeats N] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from _args import at_least  # noqa: E402
from mmoe_rec.malloc import keep_freed_memory as tune_malloc  # noqa: E402
from mmoe_rec.nn import cpu_gemm  # noqa: E402


def synced(fn, device: torch.device):
    """fn, then wait for the GPU (timings of CUDA work must include the kernels, not just their launch)."""
    if device.type != "cuda":
        return fn

    def go():
        fn()
        torch.cuda.synchronize(device)
    return go


def interleaved_min(fns: dict, rounds: int, rounds_for: dict | None = None) -> dict:
    """Run the contenders in turn, round after round; keep each one's fastest time.

    Interleaving and the minimum make the ratios robust to other processes sharing the CPU (the minimum is the
    run least disturbed by them). rounds_for caps the rounds of slow contenders.
    """
    rounds_for = rounds_for or {}
    best = {name: float("inf") for name in fns}
    for name, fn in fns.items():  # warm-up (also grows the heap)
        fn()
    for r in range(rounds):
        for name, fn in fns.items():
            if r >= rounds_for.get(name, rounds):
                continue
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def run_case(name: str, E: int, k: int, T: int, d: int, h: int, repeats: int, dense_repeats: int,
             layout: str = "auto", device: torch.device = torch.device("cpu")) -> dict:
    from mmoe_rec.nn.dispatch import StackedExperts
    from mmoe_rec.nn.routing import NoisyTopKRouter

    torch.manual_seed(0)
    experts = StackedExperts(E, d, [h, d], activation="relu", activate_last=False).to(device)
    router = NoisyTopKRouter(d, E, k, noise=False, init="normal").to(device)
    with torch.no_grad():  # unit-norm columns: experts equally likely, as a balanced (trained) router would make them
        router.w_gate.copy_(torch.nn.functional.normalize(torch.randn(d, E), dim=0))
    x = torch.randn(T, d, device=device, requires_grad=True)
    params = [x, *router.parameters(), *experts.parameters()]

    def sparse():
        e, rows, w = router(x).assignments()
        return experts(x, experts.plan(e, rows, num_out=T, dtype=x.dtype, layout=layout), w)

    def dense():
        return experts.forward_dense(x, router(x).combine)

    def loop():
        e, rows, w = router(x).assignments()
        return experts.forward_loop(x, e, rows, w)

    def fwd(f):
        def go():
            with torch.no_grad():
                f()
        return go

    # every backward starts from a materialized output gradient: out.sum()'s is a stride-0 expanded tensor, which
    # each backward product first copies out in full (12-22 % of the plain matmul's time; a review, 2026-12-06)
    g_layer = torch.ones(T, d, device=device)

    def fwd_bwd(f):
        def go():
            out = f()
            grads = torch.autograd.grad(out, params, g_layer)
            del out, grads
        return go

    a = torch.randn(k * T, d, device=device)
    w = torch.randn(d, h, device=device, requires_grad=True)
    a.requires_grad_(True)
    a_plain, w_plain, g_out = a.detach(), w.detach(), torch.ones(k * T, h, device=device)

    def mm_fwd():
        with torch.no_grad():
            torch.mm(a, w)

    def mm_fwd_bwd():
        out = torch.mm(a, w)
        torch.autograd.grad(out, [a, w], g_out)

    def onednn_fwd():
        with cpu_gemm.gemm_backend("onednn"):
            cpu_gemm.mm(a_plain, w_plain)

    def onednn_fwd_bwd():  # the same three products autograd runs for torch.mm
        with cpu_gemm.gemm_backend("onednn"):
            cpu_gemm.mm(a_plain, w_plain), cpu_gemm.mm(g_out, w_plain.t()), cpu_gemm.mm(a_plain.t(), g_out)

    with_onednn = device.type == "cpu" and cpu_gemm.onednn_available()

    with torch.no_grad():
        e, rows, _ = router(x).assignments()
        plan = experts.plan(e, rows, num_out=T, dtype=x.dtype, layout=layout)
        loads = plan.counts.float()
    flops_fwd = k * T * 2 * (d * h + h * d) + 2 * T * d * E
    mm_flops_fwd = 2 * k * T * d * h
    print(f"\n== case {name}: E={E} k={k} T={T} expert d={d} -> h={h} -> d={d} (ReLU); threads={torch.get_num_threads()}")
    print(f"   dispatch layout={plan.layout}, padding={plan.padding_fraction:.1%}, "
          f"load max/mean={float(loads.max() / loads.mean()):.2f}, sparse FLOPs fwd={flops_fwd / 1e9:.2f} G")
    results = {}
    for mode, wrap, mm_fn, dnn_fn, mult in (("forward", fwd, mm_fwd, onednn_fwd, 1),
                                            ("fwd+bwd", fwd_bwd, mm_fwd_bwd, onednn_fwd_bwd, 3)):
        fns = {"sparse": wrap(sparse), "loop": wrap(loop), "dense": wrap(dense), "mm": mm_fn}
        if with_onednn:
            fns["onednn"] = dnn_fn
        t = interleaved_min({n: synced(f, device) for n, f in fns.items()}, repeats, {"dense": dense_repeats})
        rate_sparse = mult * flops_fwd / t["sparse"]
        rate_mm = mult * mm_flops_fwd / t["mm"]
        rate_dnn = mult * mm_flops_fwd / t["onednn"] if with_onednn else float("nan")
        results[mode] = (t["dense"] / t["sparse"], t["loop"] / t["sparse"], rate_sparse / rate_mm,
                         rate_sparse / rate_dnn)
        dnn = f" | oneDNN mm {t['onednn'] * 1e3:6.1f} ms ({rate_dnn / 1e9:.0f} GFLOP/s)" if with_onednn else ""
        print(f"   {mode:8s}: sparse {t['sparse'] * 1e3:8.1f} ms | dense {t['dense'] * 1e3:8.1f} ms"
              f" | loop {t['loop'] * 1e3:8.1f} ms | mm {t['mm'] * 1e3:6.1f} ms ({rate_mm / 1e9:.0f} GFLOP/s){dnn}")
        dnn = f", {results[mode][3]:.0%} of oneDNN's" if with_onednn else ""
        print(f"   {mode:8s}: sparse vs dense {results[mode][0]:5.1f}x | vs loop {results[mode][1]:5.2f}x"
              f" | {rate_sparse / 1e9:.0f} GFLOP/s = {results[mode][2]:.0%} of the matmul rate{dnn}")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", choices=["1", "2", "all"], default="all")
    p.add_argument("--default-malloc", action="store_true", help="do not tune glibc malloc (see module doc)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--repeats", type=at_least(1), default=10, help="timed rounds per contender; the fastest counts")
    p.add_argument("--block-slots", type=int, default=None,
                   help="slots per expert block of the CPU grouped dispatch (0 = one block; default: the library's)")
    p.add_argument("--layout", choices=["auto", "grouped", "padded"], default="auto",
                   help="dispatch layout of the sparse layer (auto: grouped when experts get >= 128 rows on average)")
    p.add_argument("--device", default="cpu", help="cpu (the targets are for this) or cuda (for information)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    tuned = False if args.default_malloc else tune_malloc()
    import mmoe_rec.nn.dispatch as dispatch

    if args.block_slots is not None:
        dispatch.CPU_BLOCK_SLOTS = args.block_slots
    if args.threads:
        torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"threads {torch.get_num_threads()}"
    print(f"torch {torch.__version__}, {where}, malloc tuned: {tuned}, "
          f"CPU dispatch blocks of {dispatch.CPU_BLOCK_SLOTS} slots, "
          f"load average before: {os.getloadavg()[0]:.2f} (other processes on this CPU distort absolute times)")
    targets = {"1": (20.0, 2.0, 0.70), "2": (None, 3.0, 0.30)}
    all_results = {}
    if args.case in ("1", "all"):
        all_results["1"] = run_case("1", E=64, k=2, T=16384, d=256, h=256, repeats=args.repeats, dense_repeats=2,
                                    layout=args.layout, device=device)
    if args.case in ("2", "all"):
        all_results["2"] = run_case("2", E=256, k=2, T=4096, d=64, h=64, repeats=args.repeats * 2,
                                    dense_repeats=max(1, args.repeats // 2), layout=args.layout, device=device)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    print("targets (fwd+bwd): case 1 >= 20x dense, >= 2x loop, >= 70% matmul rate; case 2 >= 3x loop, >= 30%")
    for case, res in all_results.items():
        vs_dense, vs_loop, frac, frac_dnn = res["fwd+bwd"]
        t_dense, t_loop, t_frac = targets[case]
        ok = (t_dense is None or vs_dense >= t_dense) and vs_loop >= t_loop and frac >= t_frac
        dnn = "" if frac_dnn != frac_dnn else (  # NaN: no oneDNN contender
            f" (against oneDNN's matmul rate: {frac_dnn:.0%}, {'met' if frac_dnn >= t_frac else 'not met'})")
        print(f"case {case} fwd+bwd: {vs_dense:.1f}x dense, {vs_loop:.2f}x loop, {frac:.0%} of matmul -> "
              f"{'MET' if ok else 'NOT MET'}{dnn}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
