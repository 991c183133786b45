"""Where the large MMoE's training step stands against the plain-matmul reference of train_throughput.py, piece by
piece: how much of a step the GEMMs alone take, and what must fit beside them for 80 %.

    .venv/bin/python benchmarks/step_budget.py             # ~2 min on 2 idle CPU cores (census features built
                                                          # by train_throughput.py, or --features DIR)

Issue #5 asks for model FLOP/s >= 80 % of a plain matmul's rate on the same GEMM shapes. That leaves the step
1.25x the reference's time for everything: the GEMMs as they run in the step, and all the rest (ReLU, biases,
embeddings, mixture, towers' small ops, losses, Adam, the loader, the training loop). This script times, in
interleaved rounds (the median of each, and each ratio against the same round's reference):
- reference: train_throughput.MatmulReference's fastest way, the model's GEMMs bare with their operands hot (the best
  of three windows each round);
- GEMM replay: the very GEMM calls of one real training step of ours (captured with a TorchDispatchMode: the same
  ops, shapes, layouts, order and input tensors), replayed back to back with nothing between them, fresh outputs
  each call as in the step (a call that writes into a given `out=` tensor writes into the same one again).
  This is the step's GEMM time if every other op cost nothing;
- Adam: the fused Adam step alone, on the model's parameters and a step's gradients;
- loader: FeatureDataModule's train loader, per batch over a whole epoch, without a model;
- bare step: forward, losses, backward, Adam over batches collated in advance (train_throughput's plain loop);
- Lightning step: Trainer.fit over the same batches, per step (the fixed cost of a fit is taken out by timing two
  lengths), and a whole epoch of Trainer.fit with the loader, per step (what train_throughput.py's headline row
  measures: the fit's fixed cost and the loader's Parquet reads included; two short fits with the loader, as
  before 2026-12-07, cancelled out the reads, which come in bursts at a few batches of an epoch).
The "best case" line adds the replayed GEMMs, Adam and the loader, the parts no implementation of this model and
pipeline can leave out, and says which share of the reference that leaves. Nothing here is a test: it prints.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _args import at_least  # noqa: E402
import train_throughput as tt  # noqa: E402

aten = torch.ops.aten
# every overload: relu_experts writes a product straight into a strided output with `torch.bmm(..., out=...)`
GEMM_OPS = {getattr(op, overload) for op in (aten.mm, aten.addmm, aten.bmm, aten.baddbmm)
            for overload in ("default", "out")}
try:  # oneDNN's fused linear (nn.cpu_gemm on AMD CPUs with AVX-512)
    GEMM_OPS.add(torch.ops.mkldnn._linear_pointwise.default)
except AttributeError:
    pass


class CaptureGemms(TorchDispatchMode):
    """Records every GEMM op with its arguments while a step runs (the tensors are kept alive for the replay)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in GEMM_OPS:
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", type=Path, default=tt.CENSUS_FEATURES)
    p.add_argument("--rounds", type=at_least(1), default=7)
    p.add_argument("--steps", type=at_least(3), default=30,
                   help="steps per timed block (>= 3: Lightning's step is timed over steps // 3 and steps)")
    p.add_argument("--threads", type=at_least(1), default=2)
    args = p.parse_args(argv)
    spec, input_dim = tt.large_model_setup(args.features, args.threads)
    arch = tt.LARGE
    reference = tt.MatmulReference(arch, input_dim, len(spec.tasks))
    ref_key = max(tt.REFERENCE_KEYS, key=lambda key: reference.rate(key) if key in reference.runs else 0.0)
    flops = reference.flops  # per step of batch_size rows (train_throughput's count)

    torch.manual_seed(0)
    module = tt.ours_module(spec, arch)
    model = module.model
    opt = module.configure_optimizers()
    batches = list(tt.ours_datamodule(args.features, arch).train_dataloader())[: 2 * args.steps]
    model.train()
    for b in batches[:10]:  # warm-up
        tt.plain_step(model, opt, b, spec)
    capture = CaptureGemms()
    with capture:
        tt.plain_step(model, opt, batches[0], spec)
    gemm_calls = capture.calls

    def replay() -> None:
        with torch.no_grad():  # the GEMMs alone: no autograd graph for the weights' calls (out= refuses one)
            for func, a, kw in gemm_calls:
                func(*a, **kw)

    def block(fn: Callable[[], None], n: int) -> float:  # seconds per call
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n

    def bare_steps() -> float:
        t0 = time.perf_counter()
        for b in batches[: args.steps]:
            tt.plain_step(model, opt, b, spec)
        return (time.perf_counter() - t0) / args.steps

    def loader_batches() -> float:  # a whole epoch: its first batch fills the 65,536-row shuffle buffer, more rows
        t0, n = time.perf_counter(), 0  # than 2 x steps batches deliver (timed over those, 1.6x the epoch's mean)
        for _ in tt.ours_datamodule(args.features, arch).train_dataloader():
            n += 1
        return (time.perf_counter() - t0) / n

    def lightning_per_step() -> float:  # two lengths over collated batches: the fit's fixed cost cancels
        n1, n2 = args.steps // 3, args.steps
        t1 = tt.lightning_fit(module, None, batches=tt.Replay(batches[:n1]))
        t2 = tt.lightning_fit(module, None, batches=tt.Replay(batches[:n2]))
        return (t2 - t1) / (n2 - n1)

    timers: dict[str, Callable[[], float]] = {
        "reference (plain GEMMs, operands hot)": lambda: flops / reference.rate(ref_key, rounds=3),
        "GEMM replay (the step's GEMM calls alone)": lambda: block(replay, args.steps),
        "fused Adam step": lambda: block(opt.step, args.steps),
        "loader, per batch": loader_batches,
        "bare step (collated batches)": bare_steps,
        "Lightning step (collated batches)": lightning_per_step,
        "Lightning epoch with the loader, per step": lambda: tt.lightning_epoch_per_step(module, args.features, arch),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; large MMoE (E=8, {input_dim} -> 256 -> 128, "
          f"towers 64, batch {arch.batch_size}); {flops / 1e9:.2f} GFLOP a step; {len(gemm_calls)} GEMM calls a step; "
          f"reference way: {ref_key}; {args.rounds} interleaved rounds of {args.steps} steps")
    samples: dict[str, list[float]] = {k: [] for k in timers}
    shares: dict[str, list[float]] = {k: [] for k in timers}
    for r in range(args.rounds):
        with tt.OtherLoad() as load:  # another process on the cores makes a round's every part slow, unevenly
            times = {name: fn() for name, fn in timers.items()}
        ref = times["reference (plain GEMMs, operands hot)"]
        for name, t in times.items():
            samples[name].append(t)
            shares[name].append(t / ref)
        bare = times["bare step (collated batches)"]
        print(f"  round {r + 1}: reference {flops / ref / 1e9:.1f} GFLOP/s, bare step {bare * 1e3:.1f} ms, other "
              f"processes {load.share * 100:.0f} % of the CPU", flush=True)
    print(f"\n{'part':44s} {'ms/step':>8s} {'x reference (median of rounds)':>32s}")
    for name in timers:
        print(f"{name:44s} {median_ms(samples[name]):8.2f} {statistics.median(shares[name]):32.3f}")
    floor = [g + a + lo for g, a, lo in zip(shares["GEMM replay (the step's GEMM calls alone)"],
                                             shares["fused Adam step"], shares["loader, per batch"])]
    print("\nFLOP/s share of the reference (reference time / time), median of rounds:")
    for name in ("GEMM replay (the step's GEMM calls alone)", "bare step (collated batches)",
                 "Lightning step (collated batches)", "Lightning epoch with the loader, per step"):
        print(f"  {name:44s} {statistics.median(1 / s for s in shares[name]) * 100:5.1f} %")
    print(f"  {'best case: GEMM replay + Adam + loader':44s} {statistics.median(1 / f for f in floor) * 100:5.1f} %"
          "   (every other op free)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
