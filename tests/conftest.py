"""Shared fixtures: a tiny feature-Parquet directory written by hand (the layout of mmoe_rec/features/spec.py).

- ``feature_dir``: session-wide directory DIR with spec.json and DIR/{train,valid,test}/*.parquet:
  2 binary tasks (click, convert), sparse user / item (single-valued) and tags (multi-valued, some lists empty),
  3 dense features, id columns row_id (unique over all splits) and request_id (string).
  train 2000 rows in 2 files, valid 500, test 500; row groups of 300 rows (uneven last ones).
- ``make_feature_dir``: factory ``make_feature_dir(name, rows={"train": n, ...}, ...) -> Path`` for other sizes.
- ``mlflow_store_template``: an empty MLflow SQLite store, made by MLflow once per session. A test marked
  ``seeded_mlflow_store`` (the modules that track runs mark all theirs) that has a ``tmp_path`` finds a copy of it
  at ``tmp_path / "mlflow.db"``, where ``in_tmp`` and most of them point MLflow; ``seed_mlflow_store(folder)``
  copies it elsewhere. MLflow takes 1.5-2.5 s to make a store (its schema migrations), a copy 1 ms: 88 tests of four
  files made one each, 146 s of their 411 s (a Zen 3 VM, 2026-12-07). A test there about making the store (or about
  a folder with no store in it) is marked ``fresh_mlflow_store`` and gets none.
- every test (autouse ``no_state_left``): the process group a test's in-process DDP / sharded run initialized is
  destroyed, the environment variables Lightning and MLflow set (MASTER_ADDR, ..., MLFLOW_TRACKING_URI,
  MLFLOW_EXPERIMENT_ID) are restored and MLflow's global tracking URI is reset, so no test sees another's state.

Labels depend on the features (click on d0 and the user, convert on click and the item), so a model trained
on ``feature_dir`` should beat chance.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmoe_rec.features.spec import WEIGHT_COLUMN, FeatureSpec, SparseFeature, Task, label_column

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on a 2-vCPU machine: with torch's default of one thread a core in each, a
    # worker's OpenMP threads spin waiting for a partner thread the other worker's threads keep off its core.
    # tests/training/test_fit.py took 437 s in two workers against 69 s in one process, 44 s in two with one
    # thread each (a Xeon 6 VM, 2026-12-07). One thread a worker, and in the processes it starts (the variable
    # is read by torch as a process starts; Lightning's CPU DDP ranks already take cores / ranks = 1); a
    # thread count set in the environment is kept. Tests about thread counts set theirs (tests/nn/test_row_gather.py).
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

NUM_USERS, NUM_ITEMS, NUM_TAGS = 50, 30, 20
STATE_ENV = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE", "MLFLOW_TRACKING_URI",
             "MLFLOW_EXPERIMENT_ID")


@pytest.fixture(autouse=True)
def no_state_left(monkeypatch):
    import os
    import sys

    for name in STATE_ENV:  # recorded by monkeypatch, restored after the test whatever the test or MLflow did
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.setenv(name, "")
            monkeypatch.delenv(name)
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # e.g. a Trainer with the sharded strategy in-process
        dist.destroy_process_group()
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None:
        mlflow.set_tracking_uri(None)  # its module-level URI back to "from the environment"


@pytest.fixture(scope="session")
def mlflow_store_template(tmp_path_factory) -> Path:
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow_store_template") / "mlflow.db"
    here = os.getcwd()
    # MLflow sets the Default experiment's artifact folder to ./mlruns/0 of the process that makes the store, as an
    # absolute path: every copy's Default-experiment runs keep their artifacts there (one folder per run id),
    # under the session's temporary folder, not in the checkout
    os.chdir(path.parent)
    try:
        MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()  # MLflow creates and migrates it
    finally:
        os.chdir(here)
    return path


@pytest.fixture(scope="session")
def seed_mlflow_store(mlflow_store_template) -> Callable[[Path], Path]:
    """``seed(folder) -> folder / "mlflow.db"``: a copy of the session's empty store (the folder made if needed)."""

    def seed(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(mlflow_store_template, folder / "mlflow.db")
        return folder / "mlflow.db"

    return seed


@pytest.fixture(autouse=True)
def seeded_mlflow_store(request) -> None:
    node = request.node
    if (node.get_closest_marker("seeded_mlflow_store") and not node.get_closest_marker("fresh_mlflow_store")
            and "tmp_path" in request.fixturenames):
        request.getfixturevalue("seed_mlflow_store")(request.getfixturevalue("tmp_path"))


def feature_spec(with_weight: bool = False) -> FeatureSpec:
    return FeatureSpec(
        sparse_features=[
            SparseFeature("user", NUM_USERS),
            SparseFeature("item", NUM_ITEMS),
            SparseFeature("tags", NUM_TAGS, multi_valued=True),
        ],
        dense_features=["d0", "d1", "d2"],
        tasks=[Task("click"), Task("convert")],
        id_columns=["row_id", "request_id"],
        has_weight=with_weight,
    ).finalize()


def feature_table(n: int, first_row_id: int, rng: np.random.Generator, with_weight: bool = False) -> pa.Table:
    user = rng.integers(0, NUM_USERS, n)
    item = rng.integers(0, NUM_ITEMS, n)
    tag_lengths = rng.integers(0, 4, n)  # 0 = empty list
    tag_offsets = np.concatenate([[0], np.cumsum(tag_lengths)]).astype(np.int32)
    tags = pa.ListArray.from_arrays(pa.array(tag_offsets), pa.array(rng.integers(0, NUM_TAGS, tag_offsets[-1])))
    dense = rng.normal(size=(n, 3)).astype(np.float32)
    user_effect = np.linspace(-1.0, 1.0, NUM_USERS)[user]
    click = rng.random(n) < 1 / (1 + np.exp(-(1.5 * dense[:, 0] + user_effect)))
    item_effect = np.linspace(-1.0, 1.0, NUM_ITEMS)[item]
    convert = click & (rng.random(n) < 1 / (1 + np.exp(-(dense[:, 1] + item_effect))))
    row_id = np.arange(first_row_id, first_row_id + n, dtype=np.int64)
    cols = {
        "row_id": pa.array(row_id),
        "request_id": pa.array([f"r{i}" for i in row_id]),
        "user": pa.array(user, pa.int64()),
        "item": pa.array(item, pa.int64()),
        "tags": tags,
        "d0": pa.array(dense[:, 0]),
        "d1": pa.array(dense[:, 1]),
        "d2": pa.array(dense[:, 2]),
        label_column("click"): pa.array(click.astype(np.float32)),
        label_column("convert"): pa.array(convert.astype(np.float32)),
    }
    if with_weight:
        cols[WEIGHT_COLUMN] = pa.array(rng.uniform(0.5, 2.0, n).astype(np.float32))
    return pa.table(cols)


def write_feature_dir(
    root: Path,
    rows: dict[str, int] | None = None,
    files_per_split: dict[str, int] | None = None,
    row_group_size: int = 300,
    seed: int = 0,
    with_weight: bool = False,
) -> Path:
    rows = rows or {"train": 2000, "valid": 500, "test": 500}
    files_per_split = files_per_split or {"train": 2}
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    feature_spec(with_weight).save(root / "spec.json")
    next_id = 0
    for split, n in rows.items():
        (root / split).mkdir()
        k = files_per_split.get(split, 1)
        for i, part in enumerate(np.array_split(np.arange(n), k)):
            table = feature_table(len(part), next_id, rng, with_weight)
            pq.write_table(table, root / split / f"part-{i:05d}.parquet", row_group_size=row_group_size)
            next_id += len(part)
    return root


@pytest.fixture(scope="session")
def make_feature_dir(tmp_path_factory):
    """``make_feature_dir(name, **write_feature_dir kwargs) -> Path``: a fresh feature directory."""

    def make(name: str = "features", **kwargs) -> Path:
        return write_feature_dir(tmp_path_factory.mktemp(name), **kwargs)

    return make


@pytest.fixture(scope="session")
def feature_dir(make_feature_dir) -> Path:
    return make_feature_dir("feature_dir")
