"""Streams feature Parquet by row group and splits each epoch over DDP ranks x DataLoader workers.

The plan of an epoch depends only on (seed, epoch, row-group sizes, world size, batch size), so every rank
computes the same plan without talking to the others:

1. The index lists the split's non-empty row groups ("units") in file / row-group order.
2. Training permutes the unit order with ``numpy.random.default_rng([seed, epoch])``; evaluation keeps it. (A
   sum seed + epoch would give seed 1's epoch 0 the order of seed 0's epoch 1: seeds would not vary the data order.)
3. Laid end to end, the units form one row sequence ``[0, N)``. Rank ``r`` of ``W`` takes a contiguous slice:
   ``N // W`` rows, one more for the first ``N % W`` ranks. Every row belongs to exactly one rank.
4. Remainder policy (ranks must make the same number of batches or DDP hangs in a collective):
   every rank makes ``num_batches = ceil(ceil(N / W) / B)`` batches, all of B rows except the last one,
   which takes what is left. A rank that got one row fewer may be left with an empty last batch; then its
   last two batches share the last B rows (ceil(B/2) and floor(B/2)). No row is dropped, none is repeated.
   With ``drop_last=True`` (training only) each rank instead makes ``floor(N // W / B)`` full batches and
   skips the rest of its slice; the unit shuffle changes which rows are skipped from epoch to epoch.
   Validation / test use the same split, so DDP metrics see every row once (no DistributedSampler padding).
5. Worker ``k`` of ``K`` takes the contiguous block of its rank's batches ``[k * nb // K, (k + 1) * nb // K)``,
   i.e. a contiguous row range, so a row group is decoded by at most two workers. The DataLoader therefore
   yields exactly ``num_batches`` batches on every rank, whatever K is.

Training rows also pass through a shuffle buffer inside each worker (seeded by seed, epoch, rank, worker).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info


@dataclasses.dataclass(frozen=True)
class RowGroup:
    path: str
    index: int  # row-group number inside the file
    num_rows: int


@dataclasses.dataclass(frozen=True)
class ParquetIndex:
    """Every non-empty row group of a set of Parquet files, in file order."""

    units: tuple[RowGroup, ...]

    @property
    def num_rows(self) -> int:
        return sum(u.num_rows for u in self.units)

    @classmethod
    def from_dir(cls, directory: str | os.PathLike, required_columns: list[str] = ()) -> "ParquetIndex":
        directory = Path(directory)
        files = sorted(directory.glob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"no *.parquet files in {directory}")
        return cls.from_files(files, required_columns)

    @classmethod
    def from_files(cls, files: list[str | os.PathLike], required_columns: list[str] = ()) -> "ParquetIndex":
        units = []
        for path in files:
            try:
                meta = pq.ParquetFile(path).metadata
            except (OSError, pa.ArrowException) as e:
                raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
            names = set(meta.schema.to_arrow_schema().names)
            missing = [c for c in required_columns if c not in names]
            if missing:
                raise ValueError(f"{path}: missing feature columns {missing}")
            for i in range(meta.num_row_groups):
                n = meta.row_group(i).num_rows
                if n:
                    units.append(RowGroup(str(path), i, n))
        return cls(tuple(units))


def resolve_rank_world() -> tuple[int, int]:
    """(rank, world size): torch.distributed when initialised, else torchrun's RANK / WORLD_SIZE, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def unit_order(num_units: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Order in which the epoch lays the row groups end to end (identical on every rank)."""
    if not shuffle:
        return np.arange(num_units)
    return np.random.default_rng([seed, epoch]).permutation(num_units)


def rank_rows(num_rows: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of the epoch's row sequence owned by a rank: N // W rows, +1 for the first N % W ranks."""
    base, extra = divmod(num_rows, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def rank_batch_sizes(num_rows: int, rank: int, world: int, batch_size: int, drop_last: bool = False) -> list[int]:
    """Sizes of the batches one rank makes in an epoch; the same count on every rank (module docstring, 4.)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    start, stop = rank_rows(num_rows, rank, world)
    n = stop - start
    if drop_last:
        nb = (num_rows // world) // batch_size
        if nb == 0:
            raise ValueError(
                f"drop_last: {num_rows} rows over {world} ranks do not fill one batch of {batch_size} per rank"
            )
        return [batch_size] * nb
    most = -(-num_rows // world)  # ceil(N / W): rows of the largest rank
    nb = -(-most // batch_size)
    if n < nb or n == 0:
        raise ValueError(
            f"{num_rows} rows cannot be split into {nb} non-empty batches on each of {world} ranks "
            f"(batch size {batch_size}); use more rows, fewer ranks or a batch size >= 2"
        )
    sizes = [batch_size] * (nb - 1) + [n - (nb - 1) * batch_size]
    if sizes[-1] == 0:  # this rank got one row fewer: the last two batches share the last B rows
        sizes[-2:] = [(batch_size + 1) // 2, batch_size // 2]
    return sizes


@dataclasses.dataclass(frozen=True)
class WorkerPlan:
    row_start: int  # [row_start, row_stop) of the epoch's row sequence
    row_stop: int
    batch_sizes: tuple[int, ...]


def worker_plan(
    num_rows: int, batch_size: int, rank: int, world: int, worker: int, num_workers: int, drop_last: bool = False
) -> WorkerPlan:
    """The contiguous block of its rank's batches (and so rows) that one loader worker makes."""
    sizes = rank_batch_sizes(num_rows, rank, world, batch_size, drop_last)
    nb = len(sizes)
    first, last = worker * nb // num_workers, (worker + 1) * nb // num_workers
    start = rank_rows(num_rows, rank, world)[0] + sum(sizes[:first])
    return WorkerPlan(start, start + sum(sizes[first:last]), tuple(sizes[first:last]))


def read_rows(
    units: list[RowGroup], start: int, stop: int, columns: list[str], chunk_rows: int = 65536
) -> Iterator[pa.RecordBatch]:
    """Rows [start, stop) of the sequence made by ``units`` laid end to end, as RecordBatches of <= chunk_rows."""
    bounds = np.concatenate([[0], np.cumsum([u.num_rows for u in units])])
    u = int(np.searchsorted(bounds, start, side="right")) - 1
    files: dict[str, pq.ParquetFile] = {}
    pos = start
    try:
        while pos < stop:
            unit = units[u]
            lo, hi = pos - bounds[u], min(stop, bounds[u + 1]) - bounds[u]  # rows wanted inside this row group
            if unit.path not in files:
                files[unit.path] = pq.ParquetFile(unit.path)
            off = 0
            chunks = files[unit.path].iter_batches(
                batch_size=chunk_rows, row_groups=[unit.index], columns=columns, use_threads=False
            )
            for rb in chunks:
                a, b = max(lo, off), min(hi, off + rb.num_rows)
                if b > a:
                    yield rb.slice(a - off, b - a)
                off += rb.num_rows
                if off >= hi:
                    break
            pos = bounds[u] + hi
            u += 1
    finally:
        for pf in files.values():
            pf.close()


def _concat(parts: list[pa.RecordBatch]) -> pa.RecordBatch:
    return parts[0] if len(parts) == 1 else pa.concat_batches(parts)


def cut_batches(chunks: Iterator[pa.RecordBatch], sizes: tuple[int, ...]) -> Iterator[pa.RecordBatch]:
    """Re-cut a stream of RecordBatches into batches of exactly ``sizes``, in order."""
    pending: list[pa.RecordBatch] = []
    have = 0
    it = iter(sizes)
    need = next(it, None)
    for rb in chunks:
        pending.append(rb)
        have += rb.num_rows
        while need is not None and have >= need:
            merged = _concat(pending)
            yield merged.slice(0, need)
            pending = [merged.slice(need)] if have > need else []
            have -= need
            need = next(it, None)
    if need is not None or have:
        raise RuntimeError(f"row stream ended with {have} rows for a batch plan that still wanted {need}")


def shuffle_batches(
    chunks: Iterator[pa.RecordBatch], sizes: tuple[int, ...], buffer_rows: int, rng: np.random.Generator
) -> Iterator[pa.RecordBatch]:
    """Like ``cut_batches``, through a shuffle buffer: once ``buffer_rows`` + the next batch are held, permute
    them and serve batches until half the buffer is left (so each row is moved O(1) times on average)."""
    pending: list[pa.RecordBatch] = []
    have = 0
    it = iter(sizes)
    need = next(it, None)
    keep = buffer_rows // 2
    for rb in chunks:
        pending.append(rb)
        have += rb.num_rows
        if need is not None and have >= buffer_rows + need:
            merged = _concat(pending).take(rng.permutation(have))
            used = 0
            while need is not None and have - used - need >= keep:
                yield merged.slice(used, need)
                used += need
                need = next(it, None)
            pending = [merged.slice(used)] if have > used else []
            have -= used
    if have:
        merged = _concat(pending).take(rng.permutation(have))
        used = 0
        while need is not None and used + need <= have:
            yield merged.slice(used, need)
            used += need
            need = next(it, None)
        have -= used
    if need is not None or have:
        raise RuntimeError(f"row stream ended with {have} rows for a batch plan that still wanted {need}")


class FeatureParquetStream(IterableDataset):
    """Yields ``transform(rows)`` for each planned batch of rows (use ``DataLoader(batch_size=None)``):
    one rank's share of one epoch, split over the loader's workers.

    ``rank`` / ``world_size`` default to ``resolve_rank_world()`` at construction, i.e. in the main process
    after DDP is set up. ``len()`` is the number of batches per rank, the same on every rank.
    """

    def __init__(
        self,
        index: ParquetIndex,
        transform: Callable[[pa.RecordBatch], Any],
        columns: list[str],
        batch_size: int,
        *,
        shuffle: bool = False,
        shuffle_buffer: int = 65536,
        seed: int = 0,
        drop_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        chunk_rows: int = 65536,
    ) -> None:
        if (rank is None) != (world_size is None):
            raise ValueError("pass both rank and world_size, or neither")
        if rank is None:
            rank, world_size = resolve_rank_world()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.index = index
        self.transform = transform  # picklable: it travels to the workers
        self.columns = list(columns)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.chunk_rows = chunk_rows
        self.epoch = 0
        len(self)  # fail here, in the main process, if the rows cannot be planned

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(rank_batch_sizes(self.index.num_rows, self.rank, self.world_size, self.batch_size, self.drop_last))

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        plan = worker_plan(
            self.index.num_rows, self.batch_size, self.rank, self.world_size, worker, num_workers, self.drop_last
        )
        if not plan.batch_sizes:
            return
        order = unit_order(len(self.index.units), self.seed, self.epoch, self.shuffle)
        units = [self.index.units[i] for i in order]
        chunks = read_rows(units, plan.row_start, plan.row_stop, self.columns, self.chunk_rows)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
            batches = shuffle_batches(chunks, plan.batch_sizes, self.shuffle_buffer, rng)
        else:
            batches = cut_batches(chunks, plan.batch_sizes)
        for rb in batches:
            yield self.transform(rb)
