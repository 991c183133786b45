"""Shared helpers of the training tests: tiny model configs, MLflow readers."""
from __future__ import annotations

from pathlib import Path

import pytest

MMOE = {"class_path": "mmoe_rec.models.mmoe.MMoE",
        "init_args": {"embedding_dim": 4, "num_experts": 4, "expert_hidden": [16], "tower_hidden": [8]}}
SPARSE = {"class_path": "mmoe_rec.models.sparse_mmoe.SparseMMoE",
          "init_args": {"embedding_dim": 4, "num_experts": 4, "k": 2, "expert_hidden": [16], "tower_hidden": [8]}}


def mlflow_runs(db: Path) -> list:
    """Every run in an SQLite store."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def mlflow_run(db: Path):
    """The single run in an SQLite store, and its client."""
    from mlflow import MlflowClient

    runs = mlflow_runs(db)
    assert len(runs) == 1, f"expected one run in {db}, found {len(runs)}"
    return runs[0], MlflowClient(tracking_uri=f"sqlite:///{db}")


def metric_history(client, run, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in tmp_path with MLflow's default store (sqlite:///mlflow.db) there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path
