"""`make demo`: the main job end to end on built-in data, through the same commands a user types.

synth -> features -> fit (MMoE, tracked in MLflow) -> register (alias champion) -> batch score new rows.
"""
from __future__ import annotations

import argparse
import glob
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], env: dict[str, str], cwd: Path) -> None:
    """Run in the work dir: MLflow's SQLite store keeps artifacts (plots, models) under ./mlruns beside it."""
    print(f"\n$ (cd {cwd}) {shlex.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=cwd)


NEW_ROWS = 20_000


def print_latest_run(tracking_uri: str, experiment: str) -> None:
    """What the fit logged: validation metrics and a few expert / relatedness numbers of the newest run."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    runs = mlflow.search_runs(experiment_names=[experiment], order_by=["start_time DESC"], max_results=1)
    if runs.empty:
        raise SystemExit(f"no MLflow run found in experiment {experiment!r}")
    run = runs.iloc[0]
    print(f"\nMLflow run {run['run_id']} ({experiment}):")
    for col in sorted(c for c in runs.columns if c.startswith("metrics.")):
        name = col[len("metrics."):]
        if name.startswith(("val/", "relatedness/epoch/")) or name.endswith("entropy_norm"):
            print(f"  {name:55s} {run[col]:.4f}")
    artifacts = mlflow.MlflowClient().list_artifacts(run["run_id"], "plots")
    print("  plots:", ", ".join(a.path for a in artifacts) or "none")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmoe_rec.demo", description=__doc__)
    p.add_argument("--workdir", default="demo_out")
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args(argv)
    if not (ROOT / "configs" / "features" / "synthetic_rec.yaml").is_file():  # a wheel ships the code only
        print(f"error: the demo reads configs/ of a source checkout, and {ROOT} has none (the package is installed "
              "without it): run it from a clone of the repository (`make demo`)", file=sys.stderr)
        return 1
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    cli = [sys.executable, "-m", "mmoe_rec.cli"]
    # the demo's data lies apart (demo/) from demo_out/features/synthetic_rec, which the README's step 2 builds and
    # the synthetic configs read: a demo run must not replace the features a user's checkpoints were trained on
    raw, features = work / "demo" / "raw" / "synthetic_rec", work / "demo" / "features" / "synthetic_rec"
    ckpt_dir, scores = work / "checkpoints", work / "scores.parquet"

    # a world of 20k users and 5k items: small enough that two epochs of 200k impressions learn its ids
    world = ["--users", "20000", "--items", "5000"]
    # one stream of impressions: the first file trains, the second (never seen in training) is scored at the end
    run(cli + ["synth", "rec", "--rows", str(args.rows + NEW_ROWS), "--rows-per-file", str(args.rows),
               "--output", str(raw), "--seed", "0", "--overwrite"] + world, env, work)  # a rerun replaces it
    # files of at most args.rows rows: the first holds the training rows, the second the NEW_ROWS after them
    # (or their first args.rows, when args.rows < NEW_ROWS)
    train_file, new_file = sorted(glob.glob(str(raw / "*.parquet")))[:2]
    run(cli + ["features", "--schema", str(ROOT / "configs/features/synthetic_rec.yaml"), "--input", train_file,
               "--output", str(features), "--valid-fraction", "0.1", "--test-fraction", "0.1", "--seed", "0",
               "--overwrite"], env, work)
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # the demo's own: a rerun would add best-v1.ckpt beside the old
    run(cli + ["fit", "--config", str(ROOT / "configs/mmoe_synthetic.yaml"), "--data.data_dir", str(features),
               "--trainer.max_epochs", str(args.epochs), "--trainer.default_root_dir", str(work),
               "--checkpoint_dir", str(ckpt_dir)], env, work)
    print_latest_run(env["MLFLOW_TRACKING_URI"], "mmoe-rec-synthetic")
    checkpoints = sorted(glob.glob(str(ckpt_dir / "*.ckpt")), key=os.path.getmtime)
    if not checkpoints:
        raise SystemExit(f"fit wrote no checkpoint under {ckpt_dir}")
    best = [c for c in checkpoints if "last" not in Path(c).name] or checkpoints
    run(cli + ["register", "--checkpoint", best[-1], "--name", "mmoe-synthetic", "--alias", "champion"], env, work)
    run(cli + ["score", "--model", "models:/mmoe-synthetic@champion", "--input", new_file, "--output", str(scores),
               "--overwrite"], env, work)

    import pyarrow.parquet as pq

    table = pq.read_table(scores)
    print(f"\n{scores}: {table.num_rows} rows, columns {table.column_names}")
    print(table.slice(0, 5).to_pandas().to_string(index=False))
    print(f"\nMLflow runs, metrics and plots: mlflow ui --backend-store-uri {env['MLFLOW_TRACKING_URI']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
