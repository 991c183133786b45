"""Dense experts' forward + backward: autograd through ExpertStack's ops vs nn.relu_experts, side by side in one run.

    .venv/bin/python benchmarks/expert_stack.py            # ~1 min on 2 idle CPU cores

Two measurements, each interleaved (the contenders take turns, block after block, so that the shared VM's drift
hits both alike), printing medians and the median of the per-round ratios:
1. the experts with the MMoE mixture on top: ExpertStack(8, 358, [256, 128]) on a (1024, 358) batch, mixed by 2
   task gates, backward from a fixed gradient (the large model of train_throughput.py);
2. the whole training step of that large MMoE (embedding front, experts, gates, towers, losses, fused Adam) on
   census features, batches read once into memory.
Contenders: "autograd" is ExpertStack's general path (ReLU and its gradient as separate tensors, the first-layer
weight copied into its (D, E*h) matrix each step: ExpertStack before nn.relu_experts); "relu_experts/blas" is the
path ExpertStack takes for ReLU experts on the CPU with every GEMM in PyTorch's own ops (MKL); "relu_experts" is
that path under the default GEMM policy (nn.cpu_gemm: large products in oneDNN on AMD CPUs with AVX-512), and
"relu_experts/wide" the same with the first layer always one wide GEMM (where `first_layer_per_expert` would
run it one oneDNN product per expert; on other CPUs the two are the same thing).
All compute the same numbers up to float32 rounding (tests/nn/test_relu_experts.py, tests/nn/test_cpu_gemm.py).
Nothing here is a test: it prints, it asserts nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _args import at_least  # noqa: E402
from mmoe_rec.malloc import keep_freed_memory as tune_malloc  # noqa: E402
from mmoe_rec.nn import cpu_gemm  # noqa: E402
from mmoe_rec.nn import relu_experts as relu_experts_module  # noqa: E402
from mmoe_rec.nn.experts import ExpertStack  # noqa: E402

# name -> (use ExpertStack's general autograd path, GEMM policy, first layer per expert where the policy says so)
CONTENDERS = {"autograd": (True, "blas", True), "relu_experts/blas": (False, "blas", True),
              "relu_experts": (False, "auto", True), "relu_experts/wide": (False, "auto", False)}


@contextlib.contextmanager
def gemm_setup(policy: str, per_expert_allowed: bool) -> Iterator[None]:
    """The GEMM policy, and (this benchmark's switch) the first layer kept as one wide GEMM when not allowed."""
    chooser = relu_experts_module.first_layer_per_expert
    if not per_expert_allowed:
        relu_experts_module.first_layer_per_expert = lambda x, ws: False
    try:
        with cpu_gemm.gemm_backend(policy):
            yield
    finally:
        relu_experts_module.first_layer_per_expert = chooser


def as_before(stack: ExpertStack) -> ExpertStack:
    """The general autograd path with the first-layer weight contiguous (E, D, h), as ExpertStack had it."""
    stack._relu_fast_path_dtype = lambda x: None  # instance attribute: this benchmark's switch, nothing else sets it
    stack.weights[0] = torch.nn.Parameter(stack.weights[0].detach().contiguous())
    return stack


def interleaved(fns: dict[str, Callable[[], None]], rounds: int, per_round: int) -> dict[str, list[float]]:
    """ms per call of each contender, one list entry per round; the contenders take turns within each round."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(per_round):
                fn()
            times[name].append((time.perf_counter() - t0) / per_round * 1e3)
    return times


def report(title: str, times: dict[str, list[float]], base: str) -> None:
    print(f"\n{title}")
    for name, t in times.items():
        ratios = [a / b for a, b in zip(times[base], t)]
        print(f"  {name:17s} median {statistics.median(t):7.2f} ms  best {min(t):7.2f} ms  "
              f"speed-up vs {base}: median {statistics.median(ratios):.3f}x")


def experts_case(rounds: int) -> None:
    E, B, D, hidden, T = 8, 1024, 358, [256, 128], 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, D, generator=g, requires_grad=True)
    gates = torch.softmax(torch.randn(B, T, E, generator=g), -1).requires_grad_()
    grad_mixed = torch.randn(B, T, hidden[-1], generator=g)
    fns = {}
    for name, (general_path, policy, per_expert) in CONTENDERS.items():
        torch.manual_seed(0)
        stack = ExpertStack(E, D, hidden)
        if general_path:
            as_before(stack)

        def run(stack=stack, policy=policy, per_expert=per_expert):
            with gemm_setup(policy, per_expert):
                mixed = torch.bmm(gates, stack(x))  # (B, T, H)
                mixed.backward(grad_mixed)
        fns[name] = run
    report(f"1. experts + mixture, forward + backward: E={E}, {D} -> {hidden}, batch {B}, {T} gates",
           interleaved(fns, rounds, 5), "autograd")


def training_step_case(rounds: int, workdir: Path) -> None:
    import train_throughput as tt
    from _peers import read_arrays

    feature_dir = workdir / "census_features"
    tt.build_census_features(feature_dir)
    spec, _ = read_arrays(feature_dir)
    batches = list(itertools.islice(tt.ours_datamodule(feature_dir, tt.LARGE).train_dataloader(), 40))
    fns = {}
    for name, (general_path, policy, per_expert) in CONTENDERS.items():
        torch.manual_seed(0)
        model = tt.ours_module(spec, tt.LARGE).model
        if general_path:
            as_before(model.experts)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
        batch_cycle = itertools.cycle(batches)

        def step(model=model, opt=opt, batch_cycle=batch_cycle, policy=policy, per_expert=per_expert):
            with gemm_setup(policy, per_expert):
                tt.plain_step(model, opt, next(batch_cycle), spec)
        fns[name] = step
    report("2. large MMoE training step on census features (batch 1024, Adam)", interleaved(fns, rounds, 8),
           "autograd")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=at_least(1), default=15)
    p.add_argument("--threads", type=at_least(1), default=2)
    p.add_argument("--workdir", type=Path, default=ROOT / "bench_out" / "train_throughput")
    p.add_argument("--skip-step", action="store_true", help="only the experts (no census features needed)")
    args = p.parse_args(argv)
    tune_malloc()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds")
    experts_case(args.rounds)
    if not args.skip_step:
        training_step_case(args.rounds, args.workdir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
