"""The MMoE paper's synthetic experiment: MMoE vs OMoE vs shared-bottom as the tasks' correlation falls.

For each correlation p of the tasks' linear parts, regression data is generated with the paper's construction
(`mmoe-rec synth mmoe`), features are fitted on its train split, and each model is trained with early stopping
on validation loss; the table reports the mean test MSE of the two tasks (lower is better) over seeds.

    python experiments/synthetic_correlation.py --ps 1.0 0.9 0.5 0.0 --seeds 0 1 2 --jobs 2

Each run is seeded and single-threaded, so `--jobs` changes how long it takes, not what it prints.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import functools
import multiprocessing
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runner import train_and_test  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Similar parameter counts (~14k in the body) so that gating, not capacity, makes the difference.
MODELS = {
    "shared-bottom": ("mmoe_rec.models.shared_bottom.SharedBottom", {"bottom_hidden": [128]}),
    "OMoE": ("mmoe_rec.models.omoe.OMoE", {"num_experts": 8, "expert_hidden": [16]}),
    "MMoE": ("mmoe_rec.models.mmoe.MMoE", {"num_experts": 8, "expert_hidden": [16]}),
}


def make_data(base: Path, p: float, seed: int, rows: int) -> Path:
    raw, features = base / f"raw_p{p}_s{seed}", base / f"features_p{p}_s{seed}"
    if not (features / "spec.json").exists():
        cli = [sys.executable, "-m", "mmoe_rec.cli"]
        subprocess.run(cli + ["synth", "mmoe", "--rows", str(rows), "--p", str(p), "--seed", str(seed),
                              "--output", str(raw)], check=True)
        subprocess.run(cli + ["features", "--schema", str(ROOT / "configs/features/synthetic_mmoe.yaml"),
                              "--input", str(raw), "--output", str(features), "--valid-fraction", "0.1",
                              "--test-fraction", "0.1", "--seed", str(seed), "--overwrite"], check=True)
    return features


def label_correlation(base: Path, p: float, seed: int) -> float:
    """Pearson correlation of the two labels over all rows of one data set: the realised task relatedness (the sine
    terms make it a monotone but not identical function of p)."""
    labels = pq.read_table(base / f"raw_p{p}_s{seed}", columns=["y1", "y2"])
    y1, y2 = (labels.column(name).to_numpy() for name in ("y1", "y2"))
    return float(np.corrcoef(y1, y2)[0, 1])


def train_one(run: tuple[float, int, str, str], max_epochs: int, lr: float, threads: int,
              fixed_epochs: bool) -> tuple[float, float | None, int]:
    """One (p, seed, model, data dir): the mean test MSE of the two tasks, with fixed_epochs also the mean MSE on
    the training split (the paper's measure: how well the model fits both tasks), and the epochs trained."""
    _, seed, name, data = run
    class_path, init_args = MODELS[name]
    model = {"class_path": class_path, "init_args": {**init_args, "tower_hidden": [8]}}
    r = train_and_test(data, model, seed=seed, max_epochs=max_epochs, monitor="val/loss", mode="min",
                       patience=None if fixed_epochs else 3, batch_size=256, lr=lr, threads=threads,
                       eval_train=fixed_epochs)
    train_mse = (r["train_eval/y1/mse"] + r["train_eval/y2/mse"]) / 2 if fixed_epochs else None
    return (r["test/y1/mse"] + r["test/y2/mse"]) / 2, train_mse, r["epochs"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="experiments_out/synthetic")
    ap.add_argument("--ps", type=float, nargs="+", default=[1.0, 0.9, 0.5, 0.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rows", type=int, default=30_000)
    ap.add_argument("--max-epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--jobs", type=int, default=1, help="runs side by side, one process each (2 on 2 cores)")
    ap.add_argument("--fixed-epochs", action="store_true",
                    help="no early stopping: train --max-epochs epochs, test the final weights and also report "
                         "the MSE on the training split")
    args = ap.parse_args()
    runs = [(p, seed, name, str(make_data(Path(args.out), p, seed, args.rows)))
            for p in args.ps for seed in args.seeds for name in MODELS]
    train = functools.partial(train_one, max_epochs=args.max_epochs, lr=args.lr, threads=args.threads,
                              fixed_epochs=args.fixed_epochs)
    tables: dict[str, dict[tuple[str, float], list[float]]] = {"test": {}, "training-split": {}}
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for (p, seed, name, _), (mse, train_mse, epochs) in zip(runs, pool.map(train, runs)):  # submission order
            tables["test"].setdefault((name, p), []).append(mse)
            on_train = ""
            if train_mse is not None:
                tables["training-split"].setdefault((name, p), []).append(train_mse)
                on_train = f", training-split MSE {train_mse:.4f}"
            print(f"p={p} seed={seed} {name}: test MSE {mse:.4f}{on_train} ({epochs} epochs)", flush=True)
    print("\nRealised label correlation of the two tasks: mean (min to max) over seeds", args.seeds)
    cells = []
    for p in args.ps:
        corr = [label_correlation(Path(args.out), p, seed) for seed in args.seeds]
        cells.append(f"{statistics.mean(corr):.3f} ({min(corr):.3f} to {max(corr):.3f})")
    print("| | " + " | ".join(f"p = {p}" for p in args.ps) + " |")
    print("|---|" + "---|" * len(args.ps))
    print("| corr(y1, y2) | " + " | ".join(cells) + " |")
    for split, table in tables.items():
        if table:
            print_tables(table, split, args.ps, args.seeds)
    return 0


def print_tables(table: dict[tuple[str, float], list[float]], split: str, ps: list[float], seeds: list[int]) -> None:
    print(f"\n== {split} MSE")
    print(f"Mean {split} MSE of the two tasks (lower is better), mean ± sd over seeds", seeds)
    print("| model | " + " | ".join(f"p = {p}" for p in ps) + " |")
    print("|---|" + "---|" * len(ps))
    for name in MODELS:
        cells = []
        for p in ps:
            v = table[(name, p)]
            sd = f" ± {statistics.stdev(v):.4f}" if len(v) > 1 else ""
            cells.append(f"{statistics.mean(v):.4f}{sd}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    # label scales differ between seeds (each seed draws its own sine constants): compare within a seed too
    print(f"\n{split} MSE relative to shared-bottom on the same data (mean over seeds; < 1 is better)")
    print("| model | " + " | ".join(f"p = {p}" for p in ps) + " |")
    print("|---|" + "---|" * len(ps))
    for name in MODELS:
        cells = []
        for p in ps:
            ratios = [m / b for m, b in zip(table[(name, p)], table[("shared-bottom", p)])]
            cells.append(f"{statistics.mean(ratios):.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    # the paper's claim is about MMoE against OMoE as the tasks decorrelate: compare them seed by seed. Ratios are
    # averaged on the log scale (a geometric mean): the arithmetic mean of o/m is biased above 1 when o and m are
    # equally good but noisy.
    ratios = {p: [o / m for o, m in zip(table[("OMoE", p)], table[("MMoE", p)])] for p in ps}
    print(f"\nOMoE / MMoE {split} MSE per seed (> 1: MMoE better): geometric mean [95 % bootstrap interval over "
          "seeds], MMoE's wins out of the seeds")
    print("| | " + " | ".join(f"p = {p}" for p in ps) + " |")
    print("|---|" + "---|" * len(ps))
    cells = []
    for p in ps:
        mean, lo, hi = geometric_mean_interval(ratios[p])
        cells.append(f"{mean:.2f} [{lo:.2f}, {hi:.2f}] ({sum(r > 1 for r in ratios[p])}/{len(ratios[p])})")
    print("| OMoE / MMoE | " + " | ".join(cells) + " |")
    # The trend itself, paired by seed (a seed fixes x, the sine constants and task 1's weights for every p):
    # MMoE's lead at p over its lead at the first p. The paper's trend: above 1 as p falls.
    base = ps[0]
    cells = []
    for p in ps:
        mean, lo, hi = geometric_mean_interval([r / r0 for r, r0 in zip(ratios[p], ratios[base])])
        cells.append("1" if p == base else f"{mean:.2f} [{lo:.2f}, {hi:.2f}]")
    print(f"| MMoE's lead relative to p = {base} | " + " | ".join(cells) + " |")


def geometric_mean_interval(values: list[float], resamples: int = 10_000) -> tuple[float, float, float]:
    """Geometric mean of positive values and a 95 % percentile-bootstrap interval for it (fixed resampling seed:
    the same values always print the same interval)."""
    logs = np.log(np.asarray(values, dtype=np.float64))
    if len(logs) < 2:
        mean = float(np.exp(logs.mean()))
        return mean, mean, mean
    boot = np.random.default_rng(0).choice(logs, size=(resamples, len(logs)), replace=True).mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(np.exp(logs.mean())), float(np.exp(lo)), float(np.exp(hi))


if __name__ == "__main__":
    sys.exit(main())
