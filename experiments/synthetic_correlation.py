"""The MMoE paper's synthetic experiment: MMoE vs OMoE vs shared-bottom as the tasks' correlation falls.

For each correlation p of the tasks' linear parts, regression data is generated with the paper's construction
(`mmoe-rec synth mmoe`), features are fitted on its train split, and each model is trained with early stopping
on validation loss; the table reports the mean test MSE of the two tasks (lower is better) over seeds.

    python experiments/synthetic_correlation.py --ps 1.0 0.9 0.5 0.0 --seeds 0 1 2 --jobs 2 --runs-csv runs.csv
    python experiments/synthetic_correlation.py --tables-from runs.csv more_runs.csv   # tables only, no training

Each run is seeded and single-threaded, so `--jobs` changes how long it takes, not what it prints.
`--runs-csv` keeps every run's numbers (one row per p, seed and model) and the settings they were made with
(`<file>.settings.json`); `--tables-from` prints the tables of one or more such files, e.g. seeds run in different
sessions, without training again (files of other settings, or of none recorded, are not tabulated together).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import csv
import functools
import json
import math
import multiprocessing
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runner import train_and_test  # noqa: E402
from _settings import check_same_settings, settings_line, settings_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Similar parameter counts (~14k in the body) so that gating, not capacity, makes the difference.
MODELS = {
    "shared-bottom": ("mmoe_rec.models.shared_bottom.SharedBottom", {"bottom_hidden": [128]}),
    "OMoE": ("mmoe_rec.models.omoe.OMoE", {"num_experts": 8, "expert_hidden": [16]}),
    "MMoE": ("mmoe_rec.models.mmoe.MMoE", {"num_experts": 8, "expert_hidden": [16]}),
}


PATIENCE = 3  # early stopping: epochs without a lower validation loss (not with --fixed-epochs)


def make_data(base: Path, p: float, seed: int, rows: int) -> Path:
    raw, features = base / f"raw_p{p}_s{seed}", base / f"features_p{p}_s{seed}"
    made_for = features / "made_for.json"  # what the cached data was generated with: reused only if the same
    wanted = {"rows": rows, "p": p, "seed": seed}
    if not (features / "spec.json").exists() or not made_for.exists() or json.loads(made_for.read_text()) != wanted:
        if features.exists() and not made_for.exists() and (not features.is_dir() or any(features.iterdir())):
            raise SystemExit(f"{features}: holds files this experiment did not make (no made_for.json); they would be "
                             "replaced by its data: name another --out")
        cli = [sys.executable, "-m", "mmoe_rec.cli"]
        subprocess.run(cli + ["synth", "mmoe", "--rows", str(rows), "--p", str(p), "--seed", str(seed),
                              "--output", str(raw), "--overwrite"], check=True)  # a run cut off before features
        # a data set of one file, named alone, splits its rows as in the published runs (features/build.py)
        parts = sorted(raw.glob("*.parquet"))
        part = parts[0] if len(parts) == 1 else raw
        subprocess.run(cli + ["features", "--schema", str(ROOT / "configs/features/synthetic_mmoe.yaml"),
                              "--input", str(part), "--output", str(features), "--valid-fraction", "0.1",
                              "--test-fraction", "0.1", "--seed", str(seed), "--overwrite"], check=True)
        made_for.write_text(json.dumps(wanted))
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
                       patience=None if fixed_epochs else PATIENCE, batch_size=256, lr=lr, threads=threads,
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
    ap.add_argument("--runs-csv", type=Path, help="also write every run's numbers to this CSV (see --tables-from)")
    ap.add_argument("--tables-from", type=Path, nargs="+", metavar="CSV",
                    help="print the tables of runs saved with --runs-csv (several files: their runs together) "
                         "for the --ps given, over every seed they hold; nothing is trained")
    args = ap.parse_args()
    if args.tables_from:
        for path in args.tables_from:
            print(settings_line(path))
        check_same_settings(args.tables_from)
        records = read_runs(args.tables_from)
        seeds = complete_seeds(records, args.ps)
        print_all_tables(records, args.ps, seeds)
        return 0
    runs = [(p, seed, name, str(make_data(Path(args.out), p, seed, args.rows)))
            for p in args.ps for seed in args.seeds for name in MODELS]
    train = functools.partial(train_one, max_epochs=args.max_epochs, lr=args.lr, threads=args.threads,
                              fixed_epochs=args.fixed_epochs)
    records: list[RunRecord] = []
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for (p, seed, name, _), (mse, train_mse, epochs) in zip(runs, pool.map(train, runs)):  # submission order
            records.append(RunRecord(p, seed, name, mse, train_mse, epochs))
            on_train = "" if train_mse is None else f", training-split MSE {train_mse:.4f}"
            print(f"p={p} seed={seed} {name}: test MSE {mse:.4f}{on_train} ({epochs} epochs)", flush=True)
    if args.runs_csv:
        write_runs(args.runs_csv, records, {"rows": args.rows, "max_epochs": args.max_epochs, "lr": args.lr,
                                            "fixed_epochs": args.fixed_epochs,
                                            "patience": None if args.fixed_epochs else PATIENCE})
    print("\nRealised label correlation of the two tasks: mean (min to max) over seeds", args.seeds)
    cells = []
    for p in args.ps:
        corr = [label_correlation(Path(args.out), p, seed) for seed in args.seeds]
        cells.append(f"{statistics.mean(corr):.3f} ({min(corr):.3f} to {max(corr):.3f})")
    print("| | " + " | ".join(f"p = {p}" for p in args.ps) + " |")
    print("|---|" + "---|" * len(args.ps))
    print("| corr(y1, y2) | " + " | ".join(cells) + " |")
    print_all_tables(records, args.ps, args.seeds)
    return 0


class RunRecord(NamedTuple):
    p: float
    seed: int
    model: str
    test_mse: float
    train_mse: float | None  # only with --fixed-epochs
    epochs: int


RUN_FIELDS = list(RunRecord._fields)


def write_runs(path: Path, records: list[RunRecord], settings: dict | None = None) -> None:
    """One CSV row per run, written to a temporary file and renamed when complete; the settings the runs were made
    with beside it (`<file>.settings.json`: files of other settings are not tabulated together)."""
    if settings is not None:
        sidecar = settings_path(path)
        tmp = sidecar.with_name(sidecar.name + ".tmp")
        tmp.write_text(json.dumps(settings, indent=1, sort_keys=True))
        os.replace(tmp, sidecar)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(RUN_FIELDS)
        for r in records:
            w.writerow([r.p, r.seed, r.model, repr(r.test_mse), "" if r.train_mse is None else repr(r.train_mse),
                        r.epochs])
    os.replace(tmp, path)


def read_runs(paths: list[Path]) -> list[RunRecord]:
    """The runs of one or more --runs-csv files. A bad cell or a (p, seed, model) held twice is an error naming the
    file and line: runs are never silently dropped or counted twice."""
    records: list[RunRecord] = []
    seen: dict[tuple[float, int, str], str] = {}
    for path in paths:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != RUN_FIELDS:
                raise ValueError(f"{path}: expected the columns {RUN_FIELDS}, got {reader.fieldnames}")
            for line, row in enumerate(reader, start=2):
                where = f"{path}, line {line}"
                try:
                    rec = RunRecord(float(row["p"]), int(row["seed"]), row["model"], float(row["test_mse"]),
                                    float(row["train_mse"]) if row["train_mse"] else None, int(row["epochs"]))
                except (TypeError, ValueError) as e:
                    raise ValueError(f"{where}: {e}") from None
                if rec.model not in MODELS:
                    raise ValueError(f"{where}: unknown model {rec.model!r}; expected one of {sorted(MODELS)}")
                for column, value in (("test_mse", rec.test_mse), ("train_mse", rec.train_mse)):
                    if value is not None and not (math.isfinite(value) and value > 0):
                        raise ValueError(f"{where}: {column} must be a positive number, got {row[column]!r}")
                key = (rec.p, rec.seed, rec.model)
                if key in seen:
                    raise ValueError(f"{where}: p={rec.p} seed={rec.seed} {rec.model} is already in {seen[key]}")
                seen[key] = where
                records.append(rec)
    return records


def complete_seeds(records: list[RunRecord], ps: list[float]) -> list[int]:
    """The seeds that hold every model at every p (the tables pair by seed); an incomplete seed is an error."""
    have = {(r.p, r.seed, r.model) for r in records}
    seeds = sorted({r.seed for r in records})
    for seed in seeds:
        missing = [f"p={p} {m}" for p in ps for m in MODELS if (p, seed, m) not in have]
        if missing:
            raise ValueError(f"seed {seed} lacks runs: {', '.join(missing)}")
    if not seeds:
        raise ValueError("no runs to tabulate")
    return seeds


def print_all_tables(records: list[RunRecord], ps: list[float], seeds: list[int]) -> None:
    """The test-split tables, and the training-split ones where every run has a training-split MSE."""
    by_key = {(r.p, r.seed, r.model): r for r in records}
    chosen = [by_key[(p, seed, m)] for p in ps for seed in seeds for m in MODELS]
    tables: dict[str, dict[tuple[str, float], list[float]]] = {"test": {}, "training-split": {}}
    for r in chosen:  # seeds in order within each (model, p): the ratios pair by seed
        tables["test"].setdefault((r.model, r.p), []).append(r.test_mse)
    if all(r.train_mse is not None for r in chosen):
        for r in chosen:
            tables["training-split"].setdefault((r.model, r.p), []).append(r.train_mse)
    for split, table in tables.items():
        if table:
            print_tables(table, split, ps, seeds)


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
