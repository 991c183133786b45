"""The large MMoE's training step in float32 and under `--trainer.precision bf16-mixed` (CPU autocast to
bfloat16), side by side in one process:

    .venv/bin/python benchmarks/precision.py    # ~4 min on 2 idle CPU cores (census features built by
                                                # train_throughput.py, or --features DIR)

Contenders, timed in interleaved rounds (median per round; ratios against the same round's float32 step):
- float32: the bare step (forward, task losses, backward, fused Adam) over batches collated in advance;
- bf16-mixed, autograd experts: the same under autocast with the experts on ExpertStack's autograd path (how they
  ran under autocast before 2026-12-07);
- bf16-mixed: the same with relu_experts in bfloat16 (what `fit --trainer.precision bf16-mixed` runs);
- Lightning `Trainer.fit` over the data module's loader, precision 32-true against bf16-mixed: a whole epoch, per
  step, the fit's fixed cost and the loader's Parquet reads included (train_throughput.lightning_epoch_per_step;
  before 2026-12-07 two short fits, whose difference left the loader's reads out).
Then (unless `--no-others`) the bare step of a PLE and of a sparse top-2 MMoE of the same sizes (experts of
256-128, towers of 64: PLE with 4 shared and 2 task experts a level, 2 levels; the sparse model 16 experts, k = 2)
in float32 and bf16-mixed, interleaved the same way, and `mmoe-rec score`'s per-batch work (`Scorer.score_table`:
transform, collate, model) on the census test rows at `--precision 32` and `bf16`.
For context, the plain-matmul reference of train_throughput.py (the model's GEMMs bare, fused) in float32 and in
bfloat16, and each step's model FLOP/s as a share of the reference of its own precision. Where the CPU has
bfloat16 instructions (AMX, AVX512-BF16) the products run several times faster in bfloat16 and the step is bound by
everything else; without them oneDNN emulates bfloat16 (not measured here). Nothing here is a test: it prints.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _args import at_least  # noqa: E402
import train_throughput as tt  # noqa: E402
from mmoe_rec.nn import cpu_gemm  # noqa: E402


@contextlib.contextmanager
def autograd_experts(model):
    """The experts on ExpertStack's autograd path for the block (an instance attribute: nothing else sets it)."""
    model.experts._relu_fast_path_dtype = lambda x: None
    try:
        yield
    finally:
        del model.experts._relu_fast_path_dtype


OTHER_MODELS = {
    "PLE": {"class_path": "mmoe_rec.models.ple.PLE",
            "init_args": {"num_shared_experts": 4, "num_task_experts": 2, "num_levels": 2}},
    "sparse top-2 MMoE": {"class_path": "mmoe_rec.models.sparse_mmoe.SparseMMoE",
                          "init_args": {"num_experts": 16, "k": 2}},
}


def other_models(spec, arch, batches: list, rounds: int) -> None:
    """Bare steps of OTHER_MODELS in float32 and bf16-mixed, interleaved; prints ms/step and the ratio."""
    from mmoe_rec.training.module import MultiTaskModule

    sizes = {"embedding_dim": arch.embedding_dim, "expert_hidden": list(arch.expert_hidden),
             "tower_hidden": list(arch.tower_hidden)}
    print(f"\n{'model (bare step)':44s} {'float32 ms':>10s} {'bf16-mixed ms':>14s} {'x float32':>10s}")
    for name, model_cfg in OTHER_MODELS.items():
        torch.manual_seed(0)
        cfg = {"class_path": model_cfg["class_path"], "init_args": {**sizes, **model_cfg["init_args"]}}
        module = MultiTaskModule(model=cfg, feature_spec=spec)
        model, opt = module.model, module.configure_optimizers()
        model.train()

        def steps(bf16: bool) -> float:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                t0 = time.perf_counter()
                for b in batches:
                    tt.plain_step(model, opt, b, spec)
                return (time.perf_counter() - t0) / len(batches)

        steps(False), steps(True)  # warm-up
        f32, bf16 = [], []
        for _ in range(rounds):
            f32.append(steps(False))
            bf16.append(steps(True))
        ratio = statistics.median(a / b for a, b in zip(f32, bf16))
        print(f"{name:44s} {statistics.median(f32) * 1e3:10.2f} {statistics.median(bf16) * 1e3:14.2f} "
              f"{ratio:9.2f}x", flush=True)


def scoring(spec, arch, rounds: int) -> None:
    """`Scorer.score_table` (what `mmoe-rec score` runs per batch: transform, collate, model) of the census test
    rows, 65,536 at a time, with the large MMoE at --precision 32 and bf16, interleaved."""
    import pyarrow as pa

    from mmoe_rec.features.sources import iter_batches
    from mmoe_rec.features.transform import compiled
    from mmoe_rec.models.mmoe import MMoE
    from mmoe_rec.registry.scorer import Scorer
    from mmoe_rec.registry.scoring import saved_reader

    columns = compiled(spec).input_columns(with_labels=False)
    raw = tt.CENSUS_RAW / "test.csv.xz"
    table = pa.Table.from_batches([b for _, b in iter_batches(str(raw), columns, saved_reader(spec))])
    chunks = [table.slice(i, 65_536) for i in range(0, table.num_rows, 65_536)]
    torch.manual_seed(0)
    model = MMoE(spec, embedding_dim=arch.embedding_dim, num_experts=arch.num_experts,
                 expert_hidden=list(arch.expert_hidden), tower_hidden=list(arch.tower_hidden))
    scorers = {precision: Scorer(model, precision) for precision in ("32", "bf16")}

    def rows_per_s(precision: str) -> float:
        t0 = time.perf_counter()
        for chunk in chunks:
            scorers[precision].score_table(chunk)
        return table.num_rows / (time.perf_counter() - t0)

    rows_per_s("32"), rows_per_s("bf16")  # warm-up
    rates: dict[str, list[float]] = {"32": [], "bf16": []}
    for _ in range(rounds):
        for precision in rates:
            rates[precision].append(rows_per_s(precision))
    ratio = statistics.median(b / a for a, b in zip(rates["32"], rates["bf16"]))
    print(f"\nScorer.score_table, census test ({table.num_rows:,} raw CSV rows in batches of 65,536), large MMoE: "
          f"--precision 32 {statistics.median(rates['32']):,.0f} rows/s, bf16 {statistics.median(rates['bf16']):,.0f} "
          f"rows/s ({ratio:.2f}x)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", type=Path, default=tt.CENSUS_FEATURES)
    p.add_argument("--rounds", type=at_least(1), default=7)
    p.add_argument("--steps", type=at_least(3), default=30, help="steps per timed block")
    p.add_argument("--threads", type=at_least(1), default=2)
    p.add_argument("--no-others", dest="others", action="store_false", help="the large MMoE only")
    args = p.parse_args(argv)
    spec, input_dim = tt.large_model_setup(args.features, args.threads)
    arch = tt.LARGE
    references = {dtype: tt.MatmulReference(arch, input_dim, len(spec.tasks), dtype)
                  for dtype in (torch.float32, torch.bfloat16)}
    flops = references[torch.float32].flops

    torch.manual_seed(0)
    module = tt.ours_module(spec, arch)
    model = module.model
    opt = module.configure_optimizers()
    batches = list(tt.ours_datamodule(args.features, arch).train_dataloader())[: args.steps]
    model.train()

    def bare_steps(bf16: bool, autograd: bool = False) -> float:
        with (autograd_experts(model) if autograd else contextlib.nullcontext()), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            t0 = time.perf_counter()
            for b in batches:
                tt.plain_step(model, opt, b, spec)
            return (time.perf_counter() - t0) / len(batches)

    for bf16, autograd in ((False, False), (True, True), (True, False)):  # warm-up
        bare_steps(bf16, autograd)
    timers: dict[str, Callable[[], float]] = {
        "float32 bare step": lambda: bare_steps(False),
        "bf16-mixed bare step, autograd experts": lambda: bare_steps(True, autograd=True),
        "bf16-mixed bare step": lambda: bare_steps(True),
        "Lightning fit with the loader, 32-true": lambda: tt.lightning_epoch_per_step(module, args.features, arch,
                                                                                      "32-true"),
        "Lightning fit with the loader, bf16-mixed": lambda: tt.lightning_epoch_per_step(module, args.features,
                                                                                         arch, "bf16-mixed"),
        "reference GEMMs, float32": lambda: flops / references[torch.float32].rate("fused", rounds=2),
        "reference GEMMs, bfloat16": lambda: flops / references[torch.bfloat16].rate("fused", rounds=2),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; oneDNN bfloat16 instructions: "
          f"{cpu_gemm.native_bf16()}; large MMoE (E=8, {input_dim} -> 256 -> 128, towers 64, batch "
          f"{arch.batch_size}); {flops / 1e9:.2f} GFLOP a step; {args.rounds} interleaved rounds of {args.steps} steps")
    samples: dict[str, list[float]] = {k: [] for k in timers}
    for r in range(args.rounds):
        with tt.OtherLoad() as load:
            times = {name: fn() for name, fn in timers.items()}
        for name, t in times.items():
            samples[name].append(t)
        print(f"  round {r + 1}: float32 {times['float32 bare step'] * 1e3:.1f} ms, bf16-mixed "
              f"{times['bf16-mixed bare step'] * 1e3:.1f} ms a step; other processes {load.share * 100:.0f} % of "
              "the CPU", flush=True)

    def median_ratio(a: str, b: str) -> float:  # how many times faster b is than a, median of the rounds
        return statistics.median(x / y for x, y in zip(samples[a], samples[b]))

    print(f"\n{'contender':44s} {'ms/step':>8s} {'rows/s':>9s} {'x float32 (same kind)':>22s}")
    pairs = {"bf16-mixed bare step, autograd experts": "float32 bare step",
             "bf16-mixed bare step": "float32 bare step",
             "Lightning fit with the loader, bf16-mixed": "Lightning fit with the loader, 32-true",
             "reference GEMMs, bfloat16": "reference GEMMs, float32"}
    for name in timers:
        ms = statistics.median(samples[name]) * 1e3
        speedup = f"{median_ratio(pairs[name], name):.2f}x" if name in pairs else ""
        print(f"{name:44s} {ms:8.2f} {arch.batch_size / ms * 1e3:9.0f} {speedup:>22s}")
    print(f"\nbf16-mixed bare step against its autograd-experts path: "
          f"{median_ratio('bf16-mixed bare step, autograd experts', 'bf16-mixed bare step'):.2f}x")
    for name, ref in (("float32 bare step", "reference GEMMs, float32"),
                      ("bf16-mixed bare step", "reference GEMMs, bfloat16")):
        share = statistics.median(r / s for r, s in zip(samples[ref], samples[name]))
        print(f"model FLOP/s of the {name}: {flops / statistics.median(samples[name]) / 1e9:.1f} GFLOP/s, "
              f"{share * 100:.1f} % of the {ref.split(', ')[1]} reference")
    if args.others:
        other_models(spec, arch, batches, args.rounds)
        scoring(spec, arch, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
