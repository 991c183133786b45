"""Feature-test fixtures: ``feat`` gives small raw tables and schemas written by the tests (SCHEMA, raw_table,
write_schema, write_parquet)."""
from __future__ import annotations

from pathlib import Path

import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

SCHEMA = {
    "id_columns": ["row_id"],
    "categorical": [
        {"name": "user", "min_count": 1},
        {"name": "item", "transform": "hash", "buckets": 97},
        {"name": "tags", "multi_valued": True},
        {"name": "interests", "multi_valued": True, "delimiter": "|"},
    ],
    "numeric": [
        {"name": "price", "transform": "log1p"},
        {"name": "age", "transform": "standardize", "impute": "median"},
        {"name": "pos", "transform": "bucketize", "buckets": 4},
    ],
    "tasks": [{"name": "click", "type": "binary"}, {"name": "dwell", "type": "regression"}],
}


def write_schema(path: Path, schema: dict | None = None) -> Path:
    path.write_text(yaml.safe_dump(schema or SCHEMA))
    return path


def raw_table(n: int, seed: int = 0, users: list[str] | None = None, first_row: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    users = users or ["alice", "bob", "carol", "dave"]
    lengths = rng.integers(0, 4, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    age = rng.normal(40, 10, n)
    age_missing = rng.random(n) < 0.2
    interests = ["|".join(rng.choice(["a", "b", "c", "d"], size=int(k), replace=False)) for k in rng.integers(0, 3, n)]
    return pa.table({
        "row_id": pa.array(np.arange(first_row, first_row + n, dtype=np.int64)),
        "user": pa.array([users[i] for i in rng.integers(0, len(users), n)]),
        "item": pa.array(rng.integers(0, 1000, n)),
        "tags": pa.ListArray.from_arrays(pa.array(offsets), pa.array(rng.integers(0, 10, offsets[-1]))),
        "interests": pa.array(interests),
        "price": pa.array(rng.exponential(20, n)),
        "age": pa.array(age, mask=age_missing),
        "pos": pa.array(rng.integers(1, 10, n).astype(np.float64)),
        "click": pa.array(rng.integers(0, 2, n).astype(np.int8)),
        "dwell": pa.array(rng.exponential(3, n)),
    })


def write_parquet(path: Path, table: pa.Table, row_group_size: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


@pytest.fixture
def feat():
    return types.SimpleNamespace(SCHEMA=SCHEMA, raw_table=raw_table, write_schema=write_schema,
                                 write_parquet=write_parquet)
