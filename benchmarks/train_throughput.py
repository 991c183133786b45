"""Training throughput (rows/s) of mmoe-rec's MMoE vs DeepCTR-Torch and torch-rechub, side by side in one run.

    .venv/bin/python benchmarks/train_throughput.py            # ~3 min on 2 idle CPU cores

All three libraries train on the same rows of census-income features, encoded once by mmoe-rec's feature
pipeline (``mmoe-rec features --schema configs/features/census.yaml``): mmoe-rec streams the feature Parquet
through its FeatureDataModule, the peers get the same columns read into numpy. Same layer sizes, same batch
size, Adam, one thread pool of ``--threads`` threads for everyone.

Two models (benchmarks/README.md says why these two):
- small: torch-rechub's census example (examples/ranking/run_census.py): embedding dim 4, 8 experts of one
  16-unit layer, towers of 8, batch 1024. Bound by per-batch overhead. Target: mmoe-rec >= 5x torch-rechub.
- large: embedding dim 8, 8 experts of 256-128, towers of 64, batch 1024. Bound by arithmetic.
  Targets: mmoe-rec >= 1.4x DeepCTR-Torch, and mmoe-rec's model FLOP/s >= 80 % of a plain matmul's rate on the
  same GEMM shapes, measured in the same run.

Each training number is the fastest of --epochs (default 3) full epochs through the library's normal training call,
after a short warm-up. The contenders' epochs are interleaved (round after round, one epoch each), and the
plain-matmul reference is measured at the start and after every round, its fastest kept: the machine's speed
drifts over minutes, and interleaving makes everyone meet the same drift. The fastest way of that reference is
also re-timed right before and right after each of mmoe-rec's large-model epochs, and each epoch's FLOP/s is
printed against the mean of those two as well: the ratio of the same minutes (these re-timings also count toward
the run's fastest reference). "data only" iterates the same loader
without a model. glibc malloc is told to keep freed memory (mmoe_rec/malloc.py, as `mmoe-rec` does;
--default-malloc: not), which applies to every contender alike. Nothing here is a test: it prints, it asserts
nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _peers import (  # noqa: E402
    Arch, Arrays, deepctr_fit, deepctr_loader, deepctr_model, read_arrays, rechub_loader, rechub_model,
    rechub_train_epoch, rechub_trainer,
)
from _args import at_least  # noqa: E402
from mmoe_rec.malloc import keep_freed_memory as tune_malloc  # noqa: E402
from mmoe_rec.features.spec import FeatureSpec  # noqa: E402
from mmoe_rec.nn import cpu_gemm  # noqa: E402

SMALL = Arch("small", embedding_dim=4, num_experts=8, expert_hidden=(16,), tower_hidden=(8,), batch_size=1024)
LARGE = Arch("large", embedding_dim=8, num_experts=8, expert_hidden=(256, 128), tower_hidden=(64,), batch_size=1024)
CENSUS_RAW = ROOT / "data" / "census_income"
CENSUS_SCHEMA = ROOT / "configs" / "features" / "census.yaml"


# --- features ----------------------------------------------------------------------------------------------

def build_census_features(out: Path) -> str:
    """Census train split through our feature pipeline; returns a description of where the features came from."""
    if (out / "spec.json").exists() and (out / "train").is_dir():
        return f"mmoe-rec features pipeline ({CENSUS_SCHEMA.relative_to(ROOT)}), cached in {out}"
    # the command in the schema's header comment; the pipeline writes beside `out` and renames when complete
    cmd = [sys.executable, "-m", "mmoe_rec.cli", "features", "--schema", str(CENSUS_SCHEMA),
           "--input", f"train={_raw_census('train')}", "--input", f"valid+test={_raw_census('test')}",
           "--output", str(out), "--seed", "0"]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return f"mmoe-rec features pipeline ({CENSUS_SCHEMA.relative_to(ROOT)})"


def _raw_census(split: str) -> Path:
    for d in (CENSUS_RAW, ROOT.parent / "shared" / "data" / "census_income"):
        for name in (f"{split}.csv.xz", f"{split}.csv"):
            if (d / name).exists():
                return d / name
    raise FileNotFoundError(f"census {split} split not found under {CENSUS_RAW}")


def subsample(feature_dir: Path, rows: int | None, out: Path) -> Path:
    """A feature dir holding only the first ``rows`` training rows (same row-group size), or ``feature_dir``."""
    files = sorted((feature_dir / "train").glob("*.parquet"))
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    if rows is None or rows >= total:
        return feature_dir
    shutil.rmtree(out, ignore_errors=True)
    (out / "train").mkdir(parents=True)
    shutil.copy(feature_dir / "spec.json", out / "spec.json")
    for split in ("valid", "test"):  # never read (no validation), but a data module may look for them
        if (feature_dir / split).is_dir():
            (out / split).symlink_to((feature_dir / split).resolve())
    rg = pq.ParquetFile(files[0]).metadata.row_group(0).num_rows
    table = pa.concat_tables([pq.read_table(f) for f in files]).slice(0, rows)
    pq.write_table(table, out / "train" / "part-00000.parquet", row_group_size=rg)
    return out


# --- FLOPs and the matmul reference -------------------------------------------------------------------------

def gemms(arch: Arch, input_dim: int, tasks: int, batch: int) -> list[tuple[int, int, int, int]]:
    """The model's GEMMs per batch as (count, M, K, N): experts, gates, towers (+ their 1-unit output layer)."""
    out, k = [], input_dim
    for h in arch.expert_hidden:
        out.append((arch.num_experts, batch, k, h))
        k = h
    out.append((tasks, batch, input_dim, arch.num_experts))  # gates
    for h in arch.tower_hidden:
        out.append((tasks, batch, k, h))
        k = h
    out.append((tasks, batch, k, 1))
    return out


def train_flops_per_row(arch: Arch, input_dim: int, tasks: int) -> float:
    """Forward = 2 FLOPs per weight in a matmul + the gate-weighted sum of experts; training = 3x forward."""
    macs = sum(c * k * n for c, _, k, n in gemms(arch, input_dim, tasks, 1))
    macs += tasks * arch.num_experts * arch.expert_hidden[-1]  # mixture: sum_e g_e * expert_e
    return 3 * 2 * macs


def _rate(fn: Callable[[], None], flops: float, min_s: float = 0.4, rounds: int = 3) -> float:
    """FLOP/s of the best of `rounds` timed rounds (a plain GEMM's rate is what the machine can do, so the
    best round is the honest reference: it is the least disturbed by anything else)."""
    for _ in range(3):
        fn()
    best = 0.0
    for _ in range(rounds):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < min_s:
            fn()
            n += 1
        best = max(best, flops * n / (time.perf_counter() - t0))
    return best


class MatmulReference:
    """Plain GEMMs doing the model's training arithmetic (forward X@W, backward dY@W^T and X^T@dY), several ways:
    (a) "per_layer": one torch.mm per expert / gate / tower layer, (b) "fused": experts and gates fused into one
    wide mm per layer (bmm for the later expert layers), (c) and (d) the same two through oneDNN's matmul
    (nn.cpu_gemm, forced; a bmm as one oneDNN mm per expert), and a large square mm through each library as the
    machine's peak, for context. torch's CPU mm is MKL, which runs AVX2 kernels on AMD CPUs; oneDNN uses AVX-512
    where it exists. All in `dtype` (float32; benchmarks/precision.py times them in bfloat16 too). `rate(key)` times
    one of them, `rates()` all."""

    def __init__(self, arch: Arch, input_dim: int, tasks: int, dtype: torch.dtype = torch.float32):
        g = torch.Generator().manual_seed(0)
        shapes = gemms(arch, input_dim, tasks, arch.batch_size)
        self.flops = sum(3 * 2 * c * m * k * n for c, m, k, n in shapes)

        def randn(*size):  # drawn in float32 whatever the dtype: the same values rounded
            return torch.randn(*size, generator=g).to(dtype)

        def mats(c, m, k, n):
            return [(randn(m, k), randn(k, n), randn(m, n)) for _ in range(c)]

        per = [mats(*s) for s in shapes]
        fused = []
        for c, m, k, n in shapes:
            if k == input_dim or c == 1:  # same input for every expert / gate: one wide matmul
                fused.append(("mm", *mats(1, m, k, c * n)[0]))
            else:
                fused.append(("bmm", randn(c, m, k), randn(c, k, n), randn(c, m, n)))

        def three(mm, x, w, dy):  # a layer's forward and its two backward products
            mm(x, w), mm(dy, w.t()), mm(x.t(), dy)

        def run_per(mm=torch.mm):
            for group in per:
                for x, w, dy in group:
                    three(mm, x, w, dy)

        def run_fused(mm=torch.mm, per_expert=False):
            for kind, x, w, dy in fused:
                if kind == "mm":
                    three(mm, x, w, dy)
                elif per_expert:  # a bmm as one mm per expert
                    for e in range(x.shape[0]):
                        three(mm, x[e], w[e], dy[e])
                else:
                    torch.bmm(x, w), torch.bmm(dy, w.transpose(1, 2)), torch.bmm(x.transpose(1, 2), dy)

        def with_onednn(fn):  # fn with every cpu_gemm.mm inside sent to oneDNN
            def run():
                with cpu_gemm.gemm_backend("onednn"):
                    fn()
            return run

        a, b = randn(2048, 2048), randn(2048, 2048)
        square = 2 * 2048 ** 3
        self.runs: dict[str, tuple[Callable[[], None], float]] = {
            "per_layer": (run_per, self.flops),
            "fused": (run_fused, self.flops),
            "square2048": (lambda: torch.mm(a, b), square),
        }
        if cpu_gemm.onednn_available():
            self.runs["per_layer_onednn"] = (with_onednn(lambda: run_per(cpu_gemm.mm)), self.flops)
            self.runs["fused_onednn"] = (with_onednn(lambda: run_fused(cpu_gemm.mm, per_expert=True)), self.flops)
            self.runs["square2048_onednn"] = (with_onednn(lambda: cpu_gemm.mm(a, b)), square)

    def rate(self, key: str, rounds: int = 3) -> float:
        fn, flops = self.runs[key]
        return _rate(fn, flops, rounds=rounds)

    def rates(self) -> dict[str, float]:
        return {key: self.rate(key) for key in self.runs}


REFERENCE_KEYS = ("per_layer", "fused", "per_layer_onednn", "fused_onednn")


def reference_rate(rates: dict[str, float]) -> float:
    """The plain-matmul reference: the fastest way measured of running the model's GEMMs bare."""
    return max(rates.get(key, 0.0) for key in REFERENCE_KEYS)


# --- timing -------------------------------------------------------------------------------------------------

class OtherLoad:
    """CPU share that OTHER processes took while a measurement ran (0 = the cores were ours alone).

    On a shared machine a number measured while something else ran is low, so each row prints this share.
    Busy time of the whole machine from /proc/stat, minus this process's own CPU time."""

    def __enter__(self) -> "OtherLoad":
        self.t0, self.busy0, self.own0 = time.perf_counter(), _machine_busy_s(), _cpu_seconds()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self.t0
        others = (_machine_busy_s() - self.busy0) - (_cpu_seconds() - self.own0)
        self.share = max(0.0, others) / (wall * (os.cpu_count() or 1)) if wall > 0 else 0.0


def _machine_busy_s() -> float:
    try:
        with open("/proc/stat") as f:
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    except (OSError, ValueError):
        return float("nan")
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@dataclasses.dataclass
class Row:
    arch: str
    library: str
    path: str
    rows_per_s: float
    seconds: float
    rows: int
    others: float = float("nan")  # CPU share other processes took meanwhile (OtherLoad)


def loader_row(library: str, path: str, make_loader: Callable[[], object]) -> Row:
    """Rows/s of iterating one epoch of a loader, touching nothing but the batches."""
    loader = make_loader()
    t0 = time.perf_counter()
    rows = 0
    for b in loader:
        rows += _batch_rows(b)
    sec = time.perf_counter() - t0
    return Row("data", library, path, rows / sec, sec, rows)


def measured(fn: Callable[..., Row], *args) -> Row:
    with OtherLoad() as load:
        row = fn(*args)
    row.others = load.share
    print(f"  measured {row.arch:5} {row.library:13} {row.path:50} {row.rows_per_s:9,.0f} rows/s "
          f"(others {row.others * 100:.0f} %)", flush=True)
    return row


def _batch_rows(b) -> int:
    if hasattr(b, "batch_size"):
        return int(b.batch_size)
    x, y = b
    return int(y.shape[0])


@dataclasses.dataclass
class Contender:
    """One library's training of one model, built and warmed up; `epoch()` trains one full epoch, returns seconds."""

    arch: str
    library: str
    path: str
    rows: int
    epoch: Callable[[], float]
    best: float = float("inf")
    others: float = float("nan")
    # the plain-matmul reference (FLOP/s), measured right before and right after each epoch when set
    paired_reference: Callable[[], float] | None = None
    paired: list[tuple[float, float, float]] = dataclasses.field(default_factory=list)  # (rows/s, before, after)
    seconds: list[float] = dataclasses.field(default_factory=list)  # every timed epoch, round by round

    def row(self) -> Row:
        return Row(self.arch, self.library, self.path, self.rows / self.best, self.best, self.rows, self.others)


def interleaved_epochs(contenders: list[Contender], epochs: int, between: Callable[[], None] | None = None) -> None:
    """Round after round, one epoch of each contender in turn; each keeps its fastest epoch (the one least
    disturbed by other tenants of this shared machine: single epochs vary by up to 1.6x). Interleaving puts
    every contender through the same slow and fast spells, so the ratios hold up when the machine's speed drifts
    over minutes. `between` runs after each round (the plain-matmul reference is re-measured there)."""
    for r in range(epochs):
        for c in contenders:
            before = c.paired_reference() if c.paired_reference else None
            with OtherLoad() as load:
                sec = c.epoch()
            c.seconds.append(sec)
            if sec < c.best:
                c.best, c.others = sec, load.share
            paired = ""
            if c.paired_reference:
                after = c.paired_reference()
                c.paired.append((c.rows / sec, before, after))
                paired = f"; reference just before / after {before / 1e9:.1f} / {after / 1e9:.1f} GFLOP/s"
            print(f"  epoch {r + 1}/{epochs} {c.arch:5} {c.library:13} {c.path:50} {c.rows / sec:9,.0f} rows/s "
                  f"(others {load.share * 100:.0f} %){paired}", flush=True)
        if between is not None:
            between()


def deepctr_contender(arch: Arch, data: Arrays, warm_rows: int, fused_adam: bool = False) -> Contender:
    torch.manual_seed(0)
    # without its default embedding L2 (~1.7 ms a step): the same work as mmoe-rec and torch-rechub (_peers.py)
    model = deepctr_model(data, arch, fused_adam=fused_adam, embedding_l2=0.0)
    deepctr_fit(model, data, arch, slice(0, warm_rows))
    return Contender(arch.name, "DeepCTR-Torch", "MMOE.fit", data.num_rows, lambda: deepctr_fit(model, data, arch))


def rechub_contender(arch: Arch, data: Arrays, warm_rows: int, workdir: Path, fused_adam: bool = False,
                     steps_only: bool = False) -> Contender:
    """steps_only: the epoch's batches are collated once in advance and train_one_epoch runs over that list, so
    the row measures torch-rechub's training steps without its DataGenerator loader (which reads one row at a
    time: its 'data' row)."""
    torch.manual_seed(0)
    model = rechub_model(data, arch)
    trainer = rechub_trainer(model, data, str(workdir), fused_adam=fused_adam)
    rechub_train_epoch(trainer, rechub_loader(data, arch, slice(0, warm_rows)))
    loader = rechub_loader(data, arch)
    if steps_only:
        batches = list(loader)  # one shuffled epoch, replayed
        return Contender(arch.name, "torch-rechub", "train_one_epoch, batches collated in advance", data.num_rows,
                         lambda: rechub_train_epoch(trainer, batches))
    return Contender(arch.name, "torch-rechub", "MTLTrainer.train_one_epoch", data.num_rows,
                     lambda: rechub_train_epoch(trainer, loader))


# --- setup shared by the step benchmarks ---------------------------------------------------------------------

CENSUS_FEATURES = ROOT / "bench_out" / "train_throughput" / "census_features"  # built by main() below


def quiet_torch(threads: int) -> None:
    """`threads` intra-op threads; warnings and Lightning's and torch.fx's info lines off (they would interleave
    with the printed rows)."""
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    import lightning  # noqa: F401  (imported first: it resets its loggers' levels on import)

    for name in ("lightning.pytorch", "lightning.fabric", "torch.fx._symbolic_trace"):
        logging.getLogger(name).setLevel(logging.ERROR)


def large_model_setup(features: Path, threads: int) -> tuple[FeatureSpec, int]:
    """For the scripts that time the large model's step (step_budget.py, precision.py): malloc tuned, torch quiet,
    the census features read. Returns their spec and the model's input width."""
    if not (features / "spec.json").exists():
        raise SystemExit(f"{features}: no feature dir; run benchmarks/train_throughput.py once (it builds the "
                         "census features there) or pass --features")
    tune_malloc()
    quiet_torch(threads)
    spec, _ = read_arrays(features)
    return spec, len(spec.sparse_features) * LARGE.embedding_dim + spec.dense_dim


# --- mmoe-rec -----------------------------------------------------------------------------------------------

MODEL_CLASS = "mmoe_rec.models.mmoe.MMoE"


def ours_module(spec: FeatureSpec, arch: Arch):
    from mmoe_rec.training.module import MultiTaskModule

    init = {"embedding_dim": arch.embedding_dim, "num_experts": arch.num_experts,
            "expert_hidden": list(arch.expert_hidden), "tower_hidden": list(arch.tower_hidden)}
    # the module's defaults otherwise (Adam, lr 1e-3, as the peers): what `mmoe-rec fit` trains with
    return MultiTaskModule(model={"class_path": MODEL_CLASS, "init_args": init}, feature_spec=spec)


def ours_datamodule(data_dir: Path, arch: Arch):
    from mmoe_rec.data.datamodule import FeatureDataModule

    return FeatureDataModule(str(data_dir), batch_size=arch.batch_size, num_workers=0, seed=0)


class Replay:
    """An epoch's batches collated in advance, replayed as a training loader (a sized iterable Lightning takes)."""

    def __init__(self, batches: list) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def lightning_fit(module, dm, limit_batches: int | None = None, batches: Replay | None = None,
                  precision: str = "32-true") -> float:
    """Seconds for ``Trainer.fit`` of one epoch: no validation, no logger, no checkpoint, no progress bar; over
    ``batches`` (collated in advance) instead of the data module's loader when given."""
    import lightning as L

    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        limit_train_batches=limit_batches if limit_batches is not None else 1.0, precision=precision,
    )
    t0 = time.perf_counter()
    if batches is not None:
        trainer.fit(module, train_dataloaders=batches)
    else:
        trainer.fit(module, datamodule=dm)
    return time.perf_counter() - t0


def lightning_epoch_per_step(module, data_dir: Path, arch: Arch, precision: str = "32-true") -> float:
    """Seconds per step of one whole epoch of ``Trainer.fit`` with the data module's loader, everything in it: the
    fit's fixed cost and the loader's Parquet reads, which come in bursts at a few batches of an epoch (the
    difference of two short fits cancelled them out, leaving about 70 % of the loader's cost out). The headline
    row's measurement, per step."""
    dm = ours_datamodule(data_dir, arch)
    steps = len(dm.train_dataloader())
    return lightning_fit(module, dm, precision=precision) / steps


def plain_step(model, optimizer, batch, spec: FeatureSpec) -> None:
    """One bare training step of our model: forward, the sum of the task losses, backward, optimizer step."""
    from mmoe_rec.training.losses import task_losses

    out = model(batch)
    loss = sum(task_losses(out.logits, batch.labels, spec, model.tasks).values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def plain_epoch(model, optimizer, loader, spec: FeatureSpec, limit_batches: int | None = None) -> float:
    """Seconds for one epoch of a bare torch loop over our DataModule's loader: forward, task losses, step."""
    model.train()
    t0 = time.perf_counter()
    for i, batch in enumerate(loader):
        if limit_batches and i >= limit_batches:
            break
        plain_step(model, optimizer, batch, spec)
    return time.perf_counter() - t0


def ours_lightning_contender(arch: Arch, spec: FeatureSpec, data_dir: Path, rows: int,
                             warm_batches: int, steps_only: bool = False) -> Contender:
    """steps_only: Trainer.fit over the epoch's batches collated once in advance, the counterpart of
    torch-rechub's train_one_epoch over its collated batches (each library's own training loop, no loader)."""
    torch.manual_seed(0)
    module = ours_module(spec, arch)
    lightning_fit(module, ours_datamodule(data_dir, arch), warm_batches)
    if steps_only:
        batches = Replay(list(ours_datamodule(data_dir, arch).train_dataloader()))
        return Contender(arch.name, "mmoe-rec", "Lightning Trainer.fit, batches collated in advance", rows,
                         lambda: lightning_fit(module, None, batches=batches))
    return Contender(arch.name, "mmoe-rec", "Lightning Trainer.fit (MultiTaskModule)", rows,
                     lambda: lightning_fit(module, ours_datamodule(data_dir, arch)))


def ours_plain_contender(arch: Arch, spec: FeatureSpec, data_dir: Path, rows: int, warm_batches: int,
                         steps_only: bool = False) -> Contender:
    """steps_only: over the epoch's batches collated once in advance (the step without the loader)."""
    torch.manual_seed(0)
    module = ours_module(spec, arch)
    model = module.model
    opt = module.configure_optimizers()  # what Trainer.fit gets (fused Adam): the rows differ by Lightning only
    dm = ours_datamodule(data_dir, arch)
    plain_epoch(model, opt, dm.train_dataloader(), spec, warm_batches)
    if steps_only:
        batches = list(dm.train_dataloader())
        return Contender(arch.name, "mmoe-rec", "plain torch loop, batches collated in advance", rows,
                         lambda: plain_epoch(model, opt, batches, spec))
    return Contender(arch.name, "mmoe-rec", "plain torch loop over FeatureDataModule", rows,
                     lambda: plain_epoch(model, opt, dm.train_dataloader(), spec))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--features", type=Path, help="an existing feature dir (spec.json, train/); default: build census")
    p.add_argument("--workdir", type=Path, default=ROOT / "bench_out" / "train_throughput")
    p.add_argument("--rows", type=at_least(1), default=None, help="first N training rows only, for everyone (default: all)")
    p.add_argument("--warmup-batches", type=at_least(0), default=20)
    p.add_argument("--epochs", type=at_least(1), default=3, help="timed epochs per contender; the fastest counts")
    p.add_argument("--threads", type=at_least(1), default=2)
    p.add_argument("--libs", default="mmoe-rec,deepctr,rechub")
    p.add_argument("--models", default="small,large")
    p.add_argument("--default-malloc", action="store_true", help="leave glibc malloc as it is (mmoe_rec/malloc.py)")
    p.add_argument("--peers-fused-adam", action="store_true",
                   help="the peers' Adam fused too (mmoe-rec's default); otherwise their own default Adam")
    p.add_argument("--no-steps-only", action="store_true",
                   help="skip the rows over batches collated in advance (training steps without the loaders)")
    args = p.parse_args(argv)
    malloc_tuned = False if args.default_malloc else tune_malloc()
    quiet_torch(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    libs = set(args.libs.split(","))
    archs = [{"small": SMALL, "large": LARGE}[m] for m in args.models.split(",")]
    whole = OtherLoad().__enter__()

    if args.features:
        feature_dir, source = args.features, f"given feature dir {args.features}"
    else:
        feature_dir = args.workdir / "census_features"
        source = build_census_features(feature_dir)
    data_dir = subsample(feature_dir, args.rows, args.workdir / "subsample")
    spec, data = read_arrays(data_dir)
    n_sparse, n_dense, n_tasks = len(spec.sparse_features), spec.dense_dim, len(spec.tasks)

    print(f"features: {source}")
    print(f"rows: {data.num_rows:,} (train split) | {n_sparse} sparse features (vocabularies "
          f"{min(data.vocab.values())}..{max(data.vocab.values())}) + {n_dense} dense | tasks {spec.task_names}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"warm-up {args.warmup_batches} batches, then the fastest of {args.epochs} interleaved full epochs; "
          f"malloc tuned: {malloc_tuned}; mmoe-rec's Adam fused, the peers' "
          f"{'fused too (--peers-fused-adam)' if args.peers_fused_adam else 'their default (unfused)'}")
    rows: list[Row] = []
    mm: dict[str, float] = {}
    mm_others: list[float] = []
    input_large = n_sparse * LARGE.embedding_dim + n_dense

    reference = MatmulReference(LARGE, input_large, n_tasks) if LARGE in archs else None

    def measure_matmul() -> None:  # the reference: the fastest the machine ran these GEMMs at any point of the run
        with OtherLoad() as load:
            rates = reference.rates()
        for key, rate in rates.items():
            mm[key] = max(mm.get(key, 0.0), rate)
        mm_others.append(load.share)
        print(f"  plain-matmul reference {reference_rate(rates) / 1e9:.1f} GFLOP/s "
              f"(others {load.share * 100:.0f} %)", flush=True)

    if LARGE in archs:  # measured first, before anything else has warmed the caches, and after every round
        measure_matmul()
    seen_batch_sizes: set[int] = set()
    large_contenders: list[Contender] = []
    by_arch: dict[str, dict[str, Contender]] = {}
    paired_key = ""  # the reference's fastest way at the first measurement, re-timed around our large epochs
    for arch in archs:
        warm_rows = min(data.num_rows, args.warmup_batches * arch.batch_size)
        if arch.batch_size not in seen_batch_sizes:  # data-only rows/s depends on the batch size, not the model
            seen_batch_sizes.add(arch.batch_size)
            label = f"batch {arch.batch_size}"
            if "mmoe-rec" in libs:
                rows.append(measured(loader_row, "mmoe-rec", f"FeatureDataModule.train_dataloader, {label}",
                                     lambda: ours_datamodule(data_dir, arch).train_dataloader()))
            if "deepctr" in libs:
                m = deepctr_model(data, arch)
                rows.append(measured(loader_row, "DeepCTR-Torch", f"the DataLoader fit() builds, {label}",
                                     lambda: deepctr_loader(m, data, arch)))
            if "rechub" in libs:
                rows.append(measured(loader_row, "torch-rechub", f"DataGenerator loader, {label}",
                                     lambda: rechub_loader(data, arch)))
        contenders = []
        if "mmoe-rec" in libs:
            contenders.append(ours_lightning_contender(arch, spec, data_dir, data.num_rows, args.warmup_batches))
            if arch is LARGE:
                paired_key = max(REFERENCE_KEYS, key=lambda key: mm.get(key, 0.0))

                def retime_paired() -> float:  # the re-timings count toward the run's fastest reference too
                    rate = reference.rate(paired_key)
                    mm[paired_key] = max(mm[paired_key], rate)
                    return rate
                contenders[-1].paired_reference = retime_paired
            contenders.append(ours_plain_contender(arch, spec, data_dir, data.num_rows, args.warmup_batches))
            if not args.no_steps_only:
                contenders.append(ours_lightning_contender(arch, spec, data_dir, data.num_rows, args.warmup_batches,
                                                           steps_only=True))
                contenders.append(ours_plain_contender(arch, spec, data_dir, data.num_rows, args.warmup_batches,
                                                       steps_only=True))
        if "deepctr" in libs:
            contenders.append(deepctr_contender(arch, data, warm_rows, args.peers_fused_adam))
        if "rechub" in libs:
            contenders.append(rechub_contender(arch, data, warm_rows, args.workdir, args.peers_fused_adam))
            if not args.no_steps_only:
                contenders.append(rechub_contender(arch, data, warm_rows, args.workdir, args.peers_fused_adam,
                                                   steps_only=True))
        interleaved_epochs(contenders, args.epochs, measure_matmul if arch is LARGE else None)
        if arch is LARGE:
            large_contenders = contenders
        by_arch[arch.name] = {contender_key(c): c for c in contenders}
        rows += [c.row() for c in contenders]

    _print_table(rows)
    print()
    for arch in archs:
        input_dim = n_sparse * arch.embedding_dim + n_dense
        flops = train_flops_per_row(arch, input_dim, n_tasks)
        by = {contender_key(r): r for r in rows if r.arch == arch.name}
        timed = by_arch.get(arch.name, {})
        print(f"{arch.name}: embedding dim {arch.embedding_dim} -> input {input_dim}, {arch.num_experts} experts of "
              f"{'-'.join(map(str, arch.expert_hidden))}, towers of {'-'.join(map(str, arch.tower_hidden))}, "
              f"batch {arch.batch_size}; {flops / 1e6:.3f} MFLOP per training row (3 x forward matmul FLOPs)")
        ours, rechub, deepctr = by.get("mmoe-rec"), by.get("torch-rechub"), by.get("DeepCTR-Torch")
        if ours and rechub:
            tgt = "  (target >= 5x)" if arch is SMALL else ""
            print(f"  mmoe-rec (Lightning) / torch-rechub  = {ratio(ours.rows_per_s, rechub.rows_per_s)}{tgt}; "
                  f"{round_ratios(timed, 'mmoe-rec', 'torch-rechub')}")
        if "mmoe-rec/steps" in by and "torch-rechub/steps" in by:
            print(f"  training steps only (batches collated in advance, each library's own loop: Lightning Trainer.fit "
                  f"/ train_one_epoch): mmoe-rec / torch-rechub = "
                  f"{ratio(by['mmoe-rec/steps'].rows_per_s, by['torch-rechub/steps'].rows_per_s)}; "
                  f"{round_ratios(timed, 'mmoe-rec/steps', 'torch-rechub/steps')}")
        if ours and deepctr:
            tgt = "  (target >= 1.4x)" if arch is LARGE else ""
            print(f"  mmoe-rec (Lightning) / DeepCTR-Torch = {ratio(ours.rows_per_s, deepctr.rows_per_s)}{tgt}; "
                  f"{round_ratios(timed, 'mmoe-rec', 'DeepCTR-Torch')}")
        if "mmoe-rec/plain" in by and ours:
            plain_rate = by['mmoe-rec/plain'].rows_per_s
            print(f"  Lightning overhead: plain loop {plain_rate:,.0f} rows/s vs Trainer.fit {ours.rows_per_s:,.0f} "
                  f"rows/s (the plain loop {(plain_rate / ours.rows_per_s - 1) * 100:+.0f} % faster; Lightning's share "
                  f"of its step {(1 - ours.rows_per_s / plain_rate) * 100:.0f} %)")
        if arch is LARGE:
            ref, ref_torch = reference_rate(mm), max(mm["per_layer"], mm["fused"])
            paired = next((c.paired for c in large_contenders if c.paired), [])
            retimed = f" (and {2 * len(paired)} re-timings of {paired_key})" if paired else ""
            print(f"  plain matmul, this model's GEMM shapes (fwd + 2 bwd GEMMs per layer), same threads, fastest of "
                  f"{len(mm_others)} measurements spread over the run{retimed} (others {min(mm_others) * 100:.0f}-"
                  f"{max(mm_others) * 100:.0f} %):")
            print(f"    one mm per expert/gate/tower layer      {mm['per_layer'] / 1e9:7.1f} GFLOP/s")
            print(f"    experts+gates fused (mm, then bmm)      {mm['fused'] / 1e9:7.1f} GFLOP/s")
            print(f"    (2048^3 square mm, machine peak)        {mm['square2048'] / 1e9:7.1f} GFLOP/s")
            if "fused_onednn" in mm:
                print(f"    one oneDNN mm per layer                 {mm['per_layer_onednn'] / 1e9:7.1f} GFLOP/s")
                print(f"    fused, oneDNN (bmm: one mm per expert)  {mm['fused_onednn'] / 1e9:7.1f} GFLOP/s")
                print(f"    (2048^3 square mm in oneDNN)            {mm['square2048_onednn'] / 1e9:7.1f} GFLOP/s")
            for name, r in by.items():
                achieved = flops * r.rows_per_s
                tgt = "  (target >= 80 %)" if name == "mmoe-rec" else ""
                print(f"  achieved model FLOP/s {name:22} {achieved / 1e9:7.1f} GFLOP/s = "
                      f"{achieved / ref * 100:5.1f} % of the fastest plain-matmul rate{tgt}; "
                      f"{achieved / ref_torch * 100:5.1f} % of torch.mm's")
            if paired:  # the same ratio with the reference of the same minutes: the VM's pace drifts over a run
                shares = [flops * rows / ((before + after) / 2) for rows, before, after in paired]
                print(f"  mmoe-rec (Lightning), each epoch against {paired_key} re-timed just before and after "
                      "it: " + ", ".join(f"{x * 100:.1f} %" for x in shares)
                      + f" (median {statistics.median(shares) * 100:.1f} %)")
    whole.__exit__(None, None, None)
    print(f"\nwhole run {time.perf_counter() - whole.t0:.0f} s; other processes took {whole.share * 100:.0f} % "
          "of the machine's CPU meanwhile")
    return 0


def ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}x" if b else "-"  # three decimals: 1.397 is not the 1.4x target that .2f printed


def contender_key(c) -> str:
    """library, library/plain (bare torch loop), library/steps (the library's own loop over batches collated in
    advance) or library/steps-plain (a bare torch loop over them)."""
    if "collated in advance" in c.path:
        return f"{c.library}/steps" + ("-plain" if c.path.startswith("plain") else "")
    return c.library + ("/plain" if c.path.startswith("plain") else "")


def round_ratios(timed: dict[str, Contender], a: str, b: str) -> str:
    """The same ratio round by round (the two epochs of a round ran minutes apart at most): its median does not
    pair one contender's luckiest epoch with the other's, which the fastest-of-N ratio can on a busy machine."""
    if a not in timed or b not in timed:
        return ""
    per_round = [sb / sa for sa, sb in zip(timed[a].seconds, timed[b].seconds)]
    return (f"round by round {', '.join(f'{r:.2f}x' for r in per_round)} "
            f"(median {statistics.median(per_round):.2f}x)")


def _print_table(rows: list[Row]) -> None:
    print()
    print(f"| {'model':5} | {'library':13} | {'path':50} | {'rows/s':>9} | {'seconds':>7} | {'others':>6} |")
    print(f"|{'-' * 7}|{'-' * 15}|{'-' * 52}|{'-' * 11}|{'-' * 9}|{'-' * 8}|")
    for r in rows:
        print(f"| {r.arch:5} | {r.library:13} | {r.path:50} | {r.rows_per_s:9,.0f} | {r.seconds:7.2f} "
              f"| {r.others * 100:5.0f}% |")
    print("others: CPU share other processes took during that measurement; above a few % the row is too low.")


if __name__ == "__main__":
    sys.exit(main())
