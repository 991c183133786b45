"""Census-income (KDD) test AUC of the peer libraries' MMoE, DeepCTR-Torch 0.3.0 and torch-rechub 0.9.0, trained on
the same feature Parquet and with the same protocol as our results, so the README can compare accuracy side by side.

    .venv/bin/python experiments/census_peers.py --seeds 0 1 2          # prints a Markdown table

Data: the feature folder experiments/census_results.py trains on (built from configs/features/census.yaml with
split seed 0 if it has no spec.json); its train / valid / test splits are read into numpy columns by
benchmarks/_peers.py, so both peers get exactly the ids and values our model streams.

Models: benchmarks/_peers.py builds them with the layer sizes given here (by default embedding dim 8, 16 experts of
64, towers of 64). What a peer adds by default is kept, since that is what its users train: torch-rechub puts
BatchNorm after every Linear (gates included; no switch); DeepCTR-Torch adds L2 1e-5 on the embeddings and draws
embeddings and hidden-layer weights from N(0, 1e-4) (its defaults `l2_reg_embedding` and `init_std`, which its
MMOE takes as arguments).

Protocol (ours: experiments/_runner.py), per library and seed: Adam lr 1e-3 (torch-rechub with weight decay 1e-4,
as in its census example), one epoch at a time through the library's own training call (DeepCTR-Torch
``model.fit(x, y, batch_size, epochs=1)``, torch-rechub ``MTLTrainer.train_one_epoch``), validation income AUC after
every epoch, stop once --patience epochs in a row brought no improvement (at most --max-epochs), then the best
epoch's weights predict the test split. AUC: sklearn's roc_auc_score (both peers depend on scikit-learn).

--rows N trains on the first N training rows only, for a quick smoke run; validation and test stay whole, so the
AUCs printed are still measured on the real splits.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import random
import statistics
import sys
import tempfile
import time
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _peers import (  # noqa: E402
    Arch, Arrays, deepctr_fit, deepctr_model, read_arrays, rechub_loader, rechub_model, rechub_train_epoch,
    rechub_trainer,
)

MONITOR_TASK = "income"  # early stopping and checkpoint choice, as census_results.py (val/income/auc)
PREDICT_BATCH = 8192  # prediction runs in eval mode (no batch statistics): the batch size only changes speed


@dataclasses.dataclass
class Result:
    test_auc: dict[str, float]  # task -> AUC
    epochs: int  # epochs trained
    best_epoch: int
    seconds: float
    params: int
    best_valid_auc: float = float("nan")  # validation income AUC of the tested epoch (what selection reads)


# A peer, set up for one run: (model, train one epoch, predict probabilities (N, T) for a split)
Setup = tuple[torch.nn.Module, Callable[[], object], Callable[[Arrays], np.ndarray]]


# --- data ---------------------------------------------------------------------------------------------------

def ensure_features(features: Path) -> None:
    """The same feature folder as census_results.py's (rebuilt there when the schema or split seed changed)."""
    sys.path.insert(0, str(ROOT / "experiments"))
    from census_results import build_features  # imported late: it pulls in Lightning

    build_features(features, seed=0)  # census_results.py's default split seed


def load_splits(features: Path, rows: int | None) -> tuple[list[str], dict[str, Arrays]]:
    spec, train = read_arrays(features, "train", rows)
    splits = {"train": train, "valid": read_arrays(features, "valid")[1], "test": read_arrays(features, "test")[1]}
    return spec.task_names, splits


def _columns(data: Arrays) -> dict[str, np.ndarray]:
    return {**data.sparse, **data.dense}


# --- the peers ----------------------------------------------------------------------------------------------

def deepctr_setup(train: Arrays, arch: Arch, seed: int, workdir: str, **adam) -> Setup:
    """`adam`: lr / weight_decay for its Adam (default: its "adam", lr 1e-3, no weight decay)."""
    # MMOE's constructor reseeds torch with its own `seed` argument (default 1024), so the run's seed goes there
    model = deepctr_model(train, arch, seed=seed, **adam)

    def predict(data: Arrays) -> np.ndarray:
        return model.predict(_columns(data), batch_size=PREDICT_BATCH)

    return model, lambda: deepctr_fit(model, train, arch), predict


def rechub_setup(train: Arrays, arch: Arch, seed: int, workdir: str, **adam) -> Setup:
    """`adam`: lr / weight_decay for its Adam (default: its census example's, lr 1e-3, weight decay 1e-4)."""
    model = rechub_model(train, arch)
    trainer = rechub_trainer(model, train, workdir, **adam)
    loader = rechub_loader(train, arch)  # reshuffled by torch's global generator on every pass

    def predict(data: Arrays) -> np.ndarray:
        # MTLTrainer.predict (eval mode, no_grad) iterates dicts of feature tensors; batches are sliced here
        # instead of through a per-row Dataset, which only costs time
        cols = {n: torch.from_numpy(v) for n, v in _columns(data).items()}
        batches = [{n: c[i:i + PREDICT_BATCH] for n, c in cols.items()}
                   for i in range(0, data.num_rows, PREDICT_BATCH)]
        with contextlib.redirect_stderr(io.StringIO()):  # tqdm bar
            return np.asarray(trainer.predict(model, batches), dtype=np.float64)

    return model, lambda: rechub_train_epoch(trainer, loader), predict


PEERS: dict[str, tuple[str, Callable[..., Setup]]] = {
    "deepctr": (f"DeepCTR-Torch {version('deepctr-torch')}", deepctr_setup),
    "rechub": (f"torch-rechub {version('torch-rechub')}", rechub_setup),
}


# --- protocol -----------------------------------------------------------------------------------------------

def aucs(data: Arrays, probs: np.ndarray) -> dict[str, float]:
    return {t: float(roc_auc_score(data.labels[:, i], probs[:, i])) for i, t in enumerate(data.tasks)}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_and_test(setup: Callable[..., Setup], splits: dict[str, Arrays], arch: Arch, seed: int, max_epochs: int,
                   patience: int, verbose: bool, **adam) -> Result:
    """Epochs until `patience` epochs without a better validation income AUC, then the best epoch on the test split.
    `adam` (lr, weight_decay) goes to the peer's setup; without it each peer keeps its own default."""
    seed_everything(seed)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:  # torch-rechub's trainer wants a model_path (only fit() writes)
        model, train_epoch, predict = setup(splits["train"], arch, seed, workdir, **adam)
        best_auc, best_state, best_epoch, stale = -1.0, None, 0, 0
        for epoch in range(1, max_epochs + 1):
            train_epoch()
            auc = aucs(splits["valid"], predict(splits["valid"]))[MONITOR_TASK]
            if verbose:
                print(f"  epoch {epoch}: valid {MONITOR_TASK} AUC {auc:.4f} ({time.perf_counter() - t0:.0f} s)",
                      flush=True)
            if auc > best_auc:  # strict, as Lightning's EarlyStopping / ModelCheckpoint
                best_auc, best_state, best_epoch, stale = auc, copy.deepcopy(model.state_dict()), epoch, 0
            else:
                stale += 1
                if stale >= patience:
                    break
        model.load_state_dict(best_state)
        test = aucs(splits["test"], predict(splits["test"]))
    params = sum(p.numel() for p in model.parameters())
    return Result(test, epoch, best_epoch, time.perf_counter() - t0, params, best_auc)


# --- report -------------------------------------------------------------------------------------------------

def mean_sd(values: list[float]) -> str:
    sd = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.4f}{sd}"


def print_table(tasks: list[str], rows: list[tuple[str, list[Result]]]) -> None:
    heads = " | ".join(f"test AUC {t.replace('_', ' ')}" for t in tasks)
    print(f"\n| library (MMoE) | params | {heads} | seeds |\n|---|---|{'---|' * len(tasks)}---|")
    for name, results in rows:
        cells = " | ".join(mean_sd([r.test_auc[t] for r in results]) for t in tasks)
        print(f"| {name} | {results[0].params:,} | {cells} | {len(results)} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", type=Path, default=ROOT / "experiments_out" / "census_features")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--libs", nargs="+", choices=list(PEERS), default=list(PEERS))
    p.add_argument("--max-epochs", type=int, default=30)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--embedding-dim", type=int, default=8)
    p.add_argument("--num-experts", type=int, default=16)
    p.add_argument("--expert-hidden", type=int, nargs="+", default=[64])
    p.add_argument("--tower-hidden", type=int, nargs="+", default=[64])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", type=int, default=None, help="first N training rows only (valid / test stay whole)")
    p.add_argument("--verbose", action="store_true", help="print the validation AUC after every epoch")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    arch = Arch("census", args.embedding_dim, args.num_experts, tuple(args.expert_hidden), tuple(args.tower_hidden),
                args.batch_size)
    ensure_features(args.features)
    tasks, splits = load_splits(args.features, args.rows)
    if MONITOR_TASK not in tasks:
        raise SystemExit(f"no task {MONITOR_TASK!r} to stop on; the features have {tasks}")
    print(f"features {args.features}: " + ", ".join(f"{s} {d.num_rows:,} rows" for s, d in splits.items())
          + f"; {len(splits['train'].sparse)} sparse + {len(splits['train'].dense)} dense features", flush=True)

    rows = []
    for lib in args.libs:
        name, setup = PEERS[lib]
        results = []
        for seed in args.seeds:
            r = train_and_test(setup, splits, arch, seed, args.max_epochs, args.patience, args.verbose)
            scores = ", ".join(f"{t.replace('_', '-')} AUC {r.test_auc[t]:.4f}" for t in tasks)
            print(f"{name} seed {seed}: {scores} ({r.epochs} epochs, best {r.best_epoch}, {r.seconds:.0f} s)",
                  flush=True)
            results.append(r)
        rows.append((name, results))
    print_table(tasks, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
