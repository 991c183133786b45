"""Train-loader throughput of FeatureDataModule: rows/s on a generated feature dataset (not a test).

    python benchmarks/data_loading.py [--rows 1000000] [--batch-size 1024] [--workers 0 1]

Writes a feature directory (4 Parquet files, 128k-row row groups; 2 single-valued + 1 multi-valued sparse
features, 8 dense, 2 tasks) to a temporary directory, then times one full training epoch (row-group shuffle +
shuffle buffer + collation into Batch with a KeyedJaggedTensor) for each worker count.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from _args import at_least
from mmoe_rec.data.datamodule import FeatureDataModule
from mmoe_rec.features.spec import FeatureSpec, SparseFeature, Task, label_column


def write_dataset(root: Path, rows: int, files: int = 4, row_group_size: int = 128 * 1024, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    dense_names = [f"x{i}" for i in range(8)]
    FeatureSpec(
        sparse_features=[SparseFeature("user", 100_000), SparseFeature("item", 20_000),
                         SparseFeature("tags", 1_000, multi_valued=True)],
        dense_features=dense_names,
        tasks=[Task("click"), Task("convert")],
        id_columns=["row_id"],
    ).save(root / "spec.json")
    (root / "train").mkdir()
    for i, part in enumerate(np.array_split(np.arange(rows, dtype=np.int64), files)):
        n = len(part)
        lengths = rng.integers(0, 6, n)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        cols = {
            "row_id": pa.array(part),
            "user": pa.array(rng.zipf(1.3, n) % 100_000),
            "item": pa.array(rng.zipf(1.5, n) % 20_000),
            "tags": pa.ListArray.from_arrays(pa.array(offsets), pa.array(rng.integers(0, 1_000, offsets[-1]))),
            **{c: pa.array(rng.normal(size=n).astype(np.float32)) for c in dense_names},
            label_column("click"): pa.array((rng.random(n) < 0.1).astype(np.float32)),
            label_column("convert"): pa.array((rng.random(n) < 0.02).astype(np.float32)),
        }
        pq.write_table(pa.table(cols), root / "train" / f"part-{i:05d}.parquet", row_group_size=row_group_size)


def time_epoch(data_dir: Path, batch_size: int, workers: int) -> tuple[int, int, float]:
    dm = FeatureDataModule(str(data_dir), batch_size=batch_size, num_workers=workers)
    start = time.perf_counter()
    rows = batches = 0
    for batch in dm.train_dataloader():
        rows += batch.batch_size
        batches += 1
    return rows, batches, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=at_least(1), default=1_000_000)
    p.add_argument("--batch-size", type=at_least(1), default=1024)
    p.add_argument("--workers", type=at_least(0), nargs="+", default=[0, 1])
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mmoe_rec_bench_") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        write_dataset(root, args.rows)
        print(f"wrote {args.rows:,} feature rows in {time.perf_counter() - t:.1f} s")
        for workers in args.workers:
            rows, batches, seconds = time_epoch(root, args.batch_size, workers)
            assert rows == args.rows, (rows, args.rows)  # every row exactly once
            print(f"train loader  batch={args.batch_size}  num_workers={workers}:  {batches} batches, "
                  f"{rows / seconds:,.0f} rows/s ({seconds:.2f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
