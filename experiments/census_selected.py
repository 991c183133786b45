"""Census-income (KDD) with every choice made on the validation split: our shared-bottom, OMoE, MMoE and PLE and the
peers' MMoE (DeepCTR-Torch, torch-rechub) each get the same grid of Adam settings, each picks the setting with the
best mean validation income AUC over the selection seeds, and is then reported on fresh seeds it never saw.

    .venv/bin/python experiments/census_selected.py --jobs 2 --runs-csv experiments/results/census_selected.csv

Why: the settings of census_results.py / census_peers.py were found by a sweep of our MMoE scored on *test* AUC,
on a seed that was also reported, and the other models and the peers got no tuning at all (README, Results).
Here the choice reads validation AUC only (every run is tested and its test AUC kept in the runs file, but a
selection run's is neither printed nor read by `chosen_setting`), every contender has the same budget (len(GRID)
settings x the selection seeds), and the reported seeds are disjoint from the selection seeds.

Each run is the protocol of those two scripts (early stopping on validation income AUC, patience 3, at most 30
epochs, batch 256, the best epoch tested), single-threaded, one process per run; `--jobs 2` runs two side by side.
What stays fixed, for everyone, is the architecture (layer sizes as in census_results.py; the peers keep their
MMoE's defaults: torch-rechub's BatchNorm, DeepCTR-Torch's embedding L2 and initialisation) and the feature folder (configs/features/census.yaml, split seed 0). Those were chosen on
test AUC too, but they are shared by every contender, so they move the level, not the ranking.

--runs-csv keeps every finished run (rewritten through a temporary file after each run): a second invocation with
the same file skips the runs it holds, so an interrupted experiment resumes. The settings the runs were made with
(feature folder and what it was made from, max epochs, patience, batch size, the grid) are kept beside it in
`<file>.settings.json`, and a second invocation with other settings is refused (its runs would be reported as made
under the new ones).
--tables-from prints the tables of a saved CSV without training.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import csv
import math
import multiprocessing
import os
import statistics
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _settings import check_settings, settings_line  # noqa: E402

# Adam settings every contender chooses from. torch-rechub's census example uses (1e-3, 1e-4), DeepCTR-Torch's
# default "adam" (1e-3, 0); our earlier (test-scored) sweep ended at (1e-3, 1e-4).
GRID: list[tuple[float, float]] = [(1e-3, 0.0), (1e-3, 1e-4), (3e-3, 0.0), (3e-3, 1e-4)]
OURS = ["shared-bottom", "OMoE", "MMoE", "PLE"]
PEERS = {"DeepCTR-Torch MMoE": "deepctr", "torch-rechub MMoE": "rechub"}
TASKS = ("income", "never_married")


class Run(NamedTuple):
    stage: str  # "select" or "report"
    contender: str
    lr: float
    weight_decay: float
    seed: int


class Outcome(NamedTuple):
    valid_auc: float  # validation income AUC of the tested (best) epoch
    test_income: float
    test_never_married: float
    epochs: int
    seconds: float
    params: int


FIELDS = list(Run._fields) + list(Outcome._fields)


def run_one(run: Run, features: str, max_epochs: int, patience: int, batch_size: int) -> Outcome:
    """One training run in this (fresh, spawned) process, single-threaded."""
    import time

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    if run.contender in PEERS:
        import census_peers
        from _peers import Arch

        tasks, splits = census_peers.load_splits(Path(features), None)
        _, setup = census_peers.PEERS[PEERS[run.contender]]
        arch = Arch("census", 8, 16, (64,), (64,), batch_size)  # census_results.py's MMoE: 16 experts of 64
        r = census_peers.train_and_test(setup, splits, arch, run.seed, max_epochs, patience, verbose=False,
                                        lr=run.lr, weight_decay=run.weight_decay)
        return Outcome(r.best_valid_auc, r.test_auc["income"], r.test_auc["never_married"], r.epochs,
                       time.perf_counter() - t0, r.params)
    from _runner import train_and_test
    from census_results import COMMON, MODELS

    class_path, init_args = MODELS[run.contender]
    r = train_and_test(features, {"class_path": class_path, "init_args": {**COMMON, **init_args}}, seed=run.seed,
                       max_epochs=max_epochs, monitor="val/income/auc", patience=patience, batch_size=batch_size,
                       lr=run.lr, weight_decay=run.weight_decay, threads=1)
    return Outcome(r["best_monitor"], r["test/income/auc"], r["test/never_married/auc"], int(r["epochs"]),
                   time.perf_counter() - t0, int(r["params"]))


# --- choosing -----------------------------------------------------------------------------------------------

def chosen_setting(done: dict[Run, Outcome], contender: str, seeds: list[int]) -> tuple[float, float] | None:
    """The grid setting with the best mean validation income AUC over `seeds`, once every selection run is done."""
    means = {}
    for lr, wd in GRID:
        runs = [Run("select", contender, lr, wd, s) for s in seeds]
        if not all(r in done for r in runs):
            return None
        means[(lr, wd)] = statistics.mean(done[r].valid_auc for r in runs)
    return max(GRID, key=lambda s: (means[s], -GRID.index(s)))  # a tie goes to the earlier setting


# --- the runs file ------------------------------------------------------------------------------------------

def write_runs(path: Path, done: dict[Run, Outcome]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(FIELDS)
        for run, out in done.items():
            w.writerow([*run, *out])
    os.replace(tmp, path)


def read_runs(path: Path) -> dict[Run, Outcome]:
    """The runs of a --runs-csv file. A bad cell or a run (stage, contender, lr, weight_decay, seed) held twice is an
    error naming the file and line: a run is never silently replaced by another row."""
    done: dict[Run, Outcome] = {}
    seen: dict[Run, int] = {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != FIELDS:
            raise SystemExit(f"{path}: columns {reader.fieldnames} are not this script's {FIELDS}")
        for line, row in enumerate(reader, start=2):
            try:
                run = Run(row["stage"], row["contender"], float(row["lr"]), float(row["weight_decay"]),
                          int(row["seed"]))
                out = Outcome(float(row["valid_auc"]), float(row["test_income"]), float(row["test_never_married"]),
                              int(row["epochs"]), float(row["seconds"]), int(row["params"]))
            except (TypeError, ValueError) as e:
                raise SystemExit(f"{path}, line {line}: {e}") from None
            if run in seen:
                raise SystemExit(f"{path}, line {line}: {run.stage} {run.contender} lr={run.lr:g} "
                                 f"weight_decay={run.weight_decay:g} seed={run.seed} is already at line {seen[run]}")
            seen[run] = line
            done[run] = out
    return done


# --- tables -------------------------------------------------------------------------------------------------

def mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{values[0]:.4f}"


def setting_name(lr: float, wd: float) -> str:
    return f"lr {lr:g}, wd {wd:g}"


def print_tables(done: dict[Run, Outcome], contenders: list[str], select_seeds: list[int],
                 report_seeds: list[int]) -> None:
    print("\nValidation income AUC of each setting (mean over selection seeds "
          f"{', '.join(map(str, select_seeds))}; * = chosen)\n")
    print("| contender | " + " | ".join(setting_name(*s) for s in GRID) + " |")
    print("|---|" + "---|" * len(GRID))
    chosen = {}
    for c in contenders:
        pick = chosen_setting(done, c, select_seeds)
        cells = []
        for lr, wd in GRID:
            vals = [done[r].valid_auc for r in (Run("select", c, lr, wd, s) for s in select_seeds) if r in done]
            mark = " *" if pick == (lr, wd) else ""
            cells.append(f"{statistics.mean(vals):.4f}{mark}" if vals else "-")
        print(f"| {c} | " + " | ".join(cells) + " |")
        if pick:
            chosen[c] = pick

    print(f"\nTest AUC on report seeds {', '.join(map(str, report_seeds))} with the chosen setting (mean ± sd)\n")
    print("| contender | params | setting | valid AUC income | test AUC income | test AUC never married | seeds |")
    print("|---|---|---|---|---|---|---|")
    results: dict[str, list[Outcome]] = {}
    for c, (lr, wd) in chosen.items():
        outs = [done[r] for r in (Run("report", c, lr, wd, s) for s in report_seeds) if r in done]
        if not outs:
            continue
        results[c] = outs
        print(f"| {c} | {outs[0].params:,} | {setting_name(lr, wd)} | {mean_sd([o.valid_auc for o in outs])} | "
              f"{mean_sd([o.test_income for o in outs])} | {mean_sd([o.test_never_married for o in outs])} | "
              f"{len(outs)} |")
    if "MMoE" in results and len(results["MMoE"]) > 1:
        print("\nMMoE's test income AUC minus each contender's: difference of means ± its standard error\n")
        m = [o.test_income for o in results["MMoE"]]
        for c, outs in results.items():
            if c == "MMoE" or len(outs) < 2:
                continue
            x = [o.test_income for o in outs]
            se = math.sqrt(statistics.variance(m) / len(m) + statistics.variance(x) / len(x))
            print(f"- vs {c}: {statistics.mean(m) - statistics.mean(x):+.4f} ± {se:.4f}")


# --- main ---------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", default=str(ROOT / "experiments_out" / "census_features"))
    p.add_argument("--contenders", nargs="+", default=OURS + list(PEERS), choices=OURS + list(PEERS))
    p.add_argument("--select-seeds", type=int, nargs="+", default=[100, 101])
    p.add_argument("--report-seeds", type=int, nargs="+", default=[200, 201, 202, 203, 204])
    p.add_argument("--max-epochs", type=int, default=30)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--jobs", type=int, default=1, help="runs side by side, one single-threaded process each")
    p.add_argument("--runs-csv", type=Path, help="keep every finished run here; runs it already holds are skipped")
    p.add_argument("--tables-from", type=Path, metavar="CSV", help="print the tables of a saved runs CSV; no training")
    args = p.parse_args(argv)
    if set(args.select_seeds) & set(args.report_seeds):
        raise SystemExit(f"selection seeds {args.select_seeds} and report seeds {args.report_seeds} must not overlap")
    if args.tables_from:
        print(settings_line(args.tables_from))
        print_tables(read_runs(args.tables_from), args.contenders, args.select_seeds, args.report_seeds)
        return 0

    from census_results import build_features

    # the feature folder of census_results.py / census_peers.py; what it was made from is a setting too (the folder
    # is rebuilt in place when the schema changes: runs on the old features must not be resumed with new ones)
    made_for = build_features(Path(args.features), seed=0)
    if args.runs_csv:
        check_settings(args.runs_csv, {"features": str(Path(args.features).resolve()), "max_epochs": args.max_epochs,
                                       "patience": args.patience, "batch_size": args.batch_size,
                                       "grid": [list(g) for g in GRID], "features_made_for": made_for})
    done = read_runs(args.runs_csv) if args.runs_csv and args.runs_csv.exists() else {}
    todo = [Run("select", c, lr, wd, s) for s in args.select_seeds for c in args.contenders for lr, wd in GRID]
    reported: set[str] = set()

    def report_runs() -> list[Run]:  # report runs of every contender whose selection is complete
        runs = []
        for c in args.contenders:
            pick = chosen_setting(done, c, args.select_seeds)
            if pick and c not in reported:
                reported.add(c)
                runs += [Run("report", c, *pick, s) for s in args.report_seeds]
        return runs

    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
        pending: dict[concurrent.futures.Future, Run] = {}

        def submit(runs: list[Run]) -> None:
            for run in runs:
                if run not in done:
                    pending[pool.submit(run_one, run, args.features, args.max_epochs, args.patience,
                                        args.batch_size)] = run

        submit(todo + report_runs())
        while pending:
            finished, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for fut in finished:
                run = pending.pop(fut)
                out = fut.result()
                done[run] = out
                test = "" if run.stage == "select" else (f", test income {out.test_income:.4f}, never married "
                                                          f"{out.test_never_married:.4f}")  # not shown while choosing
                print(f"{run.stage} {run.contender} {setting_name(run.lr, run.weight_decay)} seed {run.seed}: "
                      f"valid income {out.valid_auc:.4f}{test} ({out.epochs} epochs, {out.seconds:.0f} s)", flush=True)
                if args.runs_csv:
                    write_runs(args.runs_csv, done)
            submit(report_runs())
    print_tables(done, args.contenders, args.select_seeds, args.report_seeds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
