"""Softmax over a short last dimension on the CPU: torch.softmax against nn.softmax's transposed way, one run.

    .venv/bin/python benchmarks/softmax_small.py       # ~30 s on 2 idle CPU cores

For rows x E logits (a gate's or router's experts), forward and forward + backward, the two ways take turns
round after round; printed: each one's median time and the median of the per-round ratios. The transposed way is
forced here (not the policy in `transposes`), so the rows show where the policy's cut belongs on this CPU: PyTorch
vectorizes along the last dimension and runs rows shorter than a vector register (16 float32 lanes with AVX-512,
8 with AVX2) through a scalar path. Nothing here is a test.
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

from _args import at_least  # noqa: E402
from mmoe_rec.nn.softmax import transposed_softmax, transposes  # noqa: E402


def per_call(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def forward_backward(softmax, z: torch.Tensor, upstream: torch.Tensor):
    def run() -> None:
        z.grad = None
        softmax(z).backward(upstream)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=at_least(1), default=2)
    ap.add_argument("--rounds", type=at_least(1), default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.threads} threads; times in us, median of {args.rounds} rounds")
    print(f"{'rows':>6} {'E':>3} {'pass':>5} {'torch':>8} {'transp.':>8} {'speed-up':>8}  policy")
    ours = transposed_softmax
    theirs = lambda t: torch.softmax(t, dim=-1)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    for rows in (1024, 2048, 8192):
        for experts in (2, 4, 8, 12, 16, 32):
            z = torch.randn(rows, experts, generator=g).requires_grad_()
            upstream = torch.randn(rows, experts, generator=g)
            calls = max(20, 200_000 // (rows * experts // 64 + 1))
            for label, a, b in (("fwd", lambda: theirs(z.detach()), lambda: ours(z.detach())),
                                ("f+b", forward_backward(theirs, z, upstream), forward_backward(ours, z, upstream))):
                a(), b()
                ta, tb = [], []
                for _ in range(args.rounds):
                    ta.append(per_call(a, calls))
                    tb.append(per_call(b, calls))
                ratio = statistics.median(x / y for x, y in zip(ta, tb))
                policy = "transposed" if transposes(z) else "torch"
                print(f"{rows:>6} {experts:>3} {label:>5} {statistics.median(ta) * 1e6:8.1f} "
                      f"{statistics.median(tb) * 1e6:8.1f} {ratio:7.2f}x  {policy}", flush=True)


if __name__ == "__main__":
    main()
