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
   With ``drop_last=True`` each rank instead makes ``floor(N // W / B)`` full batches from a window of its
   slice that starts at an offset drawn from ``default_rng([seed, epoch, rank, DROP_TAG])`` and wraps around
   the slice's end; the rows it skips (at most B) change from epoch to epoch, each row equally likely, even
   when the data is one row group and the unit shuffle moves nothing.
   Validation / test use the same split, so DDP metrics see every row once (no DistributedSampler padding).
5. Worker ``k`` of ``K`` takes the contiguous block of its rank's batches ``[k * nb // K, (k + 1) * nb // K)``,
   i.e. a contiguous row range (two when a drop_last window wraps). A worker decodes each row group its range
   touches from the group's start to the range's end (Arrow reads a row group in chunks from its start), so a row
   group larger than a worker's share is decoded in part by each worker whose range it holds. The DataLoader
   yields exactly ``num_batches`` batches on every rank, whatever K is.

Training rows also pass through a shuffle buffer inside each worker (seeded by seed, epoch, rank, worker).

The index reads the files' footers only: it checks each column's Arrow type against its kind (``COLUMN_KINDS``)
and picks one type per column, to which every chunk is cast before chunks of different files are merged. Given
the folder's spec version, it refuses a file whose footer records another one (``SPEC_VERSION_KEY``): a file made
with another feature spec, whose ids mean other values. It records each file's identity (device, inode, size,
modification time), and every later open of the file, in any process, compares it (one stat per
open): a folder rebuilt under a running job (`mmoe-rec features --overwrite` between two epochs) is an error naming
the file, not the new build's rows read with the old build's row groups and spec.
Label and weight values are checked chunk by chunk as they are read, where the file and row are still known.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from mmoe_rec.features.numeric import FLOAT32_MAX
from mmoe_rec.features.sources import file_identity
from mmoe_rec.features.spec import SPEC_VERSION_KEY
from mmoe_rec.paths import skipped_name

DROP_TAG = 0x64726F70  # "drop": keeps the drop_last offset's generator apart from the shuffles' ones
MAX_OPEN_FILES = 8  # per worker: a worker may visit thousands of shards in an epoch, more than it may hold open
MAX_PARSED_FOOTERS = 64  # per worker: footers kept parsed (of files closed again), see _OpenFiles


@dataclasses.dataclass(frozen=True)
class ColumnKind:
    accepts: Callable[[pa.DataType], bool]
    expected: str  # what an error says was expected
    wide: pa.DataType  # the type files that disagree are cast to


def _int_list(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_integer(t.value_type)


def _number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


# Non-integer ids are refused, not cast: casting would truncate 1.9 to 1 or parse "3" as 3.
COLUMN_KINDS = {
    "int": ColumnKind(pa.types.is_integer, "an integer type", pa.int64()),
    "list<int>": ColumnKind(_int_list, "list<integer>", pa.list_(pa.int64())),
    "number": ColumnKind(_number, "a float or integer type", pa.float64()),
}


@dataclasses.dataclass(frozen=True)
class RowGroup:
    path: str
    index: int  # row-group number inside the file
    num_rows: int
    first_row: int = 0  # row number inside the file of the row group's first row (for error messages)
    # the file's identity when the index was made (sources.file_identity): each open compares it (_OpenFiles.get)
    identity: tuple[int, ...] | None = dataclasses.field(default=None, compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class ParquetIndex:
    """Every non-empty row group of a set of Parquet files, in file order, and the Arrow type each required
    column is read as (the files' type if they agree, else the kind's wide type, else the types' common one)."""

    units: tuple[RowGroup, ...]
    schema: pa.Schema = dataclasses.field(default_factory=lambda: pa.schema([]))

    @property
    def num_rows(self) -> int:
        return sum(u.num_rows for u in self.units)

    def fingerprint(self) -> str:
        """Hash of the file names and row-group sizes: equal fingerprints give equal epoch plans."""
        h = hashlib.sha256()
        for u in self.units:
            h.update(f"{Path(u.path).name}:{u.index}:{u.num_rows}\n".encode())
        return h.hexdigest()[:16]

    @classmethod
    def from_dir(
        cls,
        directory: str | os.PathLike,
        required_columns: Sequence[str] = (),
        kinds: Mapping[str, str] | None = None,
        spec_version: str | None = None,
    ) -> "ParquetIndex":
        return cls.from_files(feature_files(directory), required_columns, kinds, spec_version)

    @classmethod
    def from_files(
        cls,
        files: list[str | os.PathLike],
        required_columns: Sequence[str] = (),
        kinds: Mapping[str, str] | None = None,
        spec_version: str | None = None,
    ) -> "ParquetIndex":
        """``kinds`` maps some required columns to a key of ``COLUMN_KINDS``; only footers are read.
        ``spec_version``: the feature spec the files must have been made with (see ``_check_spec_version``)."""
        kinds = kinds or {}
        units = []
        types: dict[str, dict[pa.DataType, str]] = {c: {} for c in required_columns}  # column -> type -> first file
        for path in files:
            identity = _identity(str(path))  # before the footer: a file replaced in between fails at its open
            try:
                meta = pq.read_metadata(path)
            except (OSError, pa.ArrowException) as e:
                raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
            if spec_version:
                _check_spec_version(path, meta.metadata, spec_version)
            schema = meta.schema.to_arrow_schema()
            missing = [c for c in required_columns if c not in schema.names]
            if missing:
                raise ValueError(f"{path}: missing feature columns {missing}")
            for c in required_columns:
                t = schema.field(c).type
                kind = COLUMN_KINDS[kinds[c]] if c in kinds else None
                if kind is not None and not kind.accepts(t):
                    raise ValueError(f"{path}: column {c} is {t}, expected {kind.expected}")
                if pa.types.is_dictionary(t):  # read as its values: a batch's slice would carry the whole dictionary
                    t = t.value_type
                types[c].setdefault(t, str(path))
            first_row = 0
            for i in range(meta.num_row_groups):
                n = meta.row_group(i).num_rows
                if n:
                    units.append(RowGroup(str(path), i, n, first_row, identity))
                first_row += n
        schema = pa.schema([(c, _read_type(c, types[c], kinds.get(c))) for c in required_columns if types[c]])
        return cls(tuple(units), schema)


def _check_spec_version(path, metadata: dict[bytes, bytes] | None, expected: str) -> None:
    """Refuse a file whose footer records another feature spec version than ``expected`` (the folder's spec.json):
    one made by another build (other vocabularies, buckets) and dropped into this folder would be read with the
    wrong meaning of its ids, silently. A file without the key is accepted as before: feature folders built before
    the build recorded the version (and files written by other tools) have none."""
    found = (metadata or {}).get(SPEC_VERSION_KEY.encode())
    if found is None:
        return
    found = found.decode(errors="replace")
    if found != expected:
        raise ValueError(
            f"{path}: this file was made with feature spec version {found}, but its folder's spec.json has version "
            f"{expected}: its ids mean other values. Remove the file, or rebuild the features (`mmoe-rec features`)"
        )


def _read_type(column: str, seen: dict[pa.DataType, str], kind: str | None) -> pa.DataType:
    """The one type a column is read as, given the types the files have (type -> first file with it)."""
    if len(seen) == 1:
        return next(iter(seen))
    if kind is not None:
        return COLUMN_KINDS[kind].wide
    try:  # a pass-through column (ids): lossless widening only, e.g. int32 + int64 -> int64
        return pa.unify_schemas([pa.schema([(column, t)]) for t in seen], promote_options="permissive").field(0).type
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        (t0, p0), (t1, p1) = list(seen.items())[:2]
        raise ValueError(f"{p1}: column {column} is {t1}, but {p0} has it as {t0}") from None


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
    ranges: tuple[tuple[int, int], ...]  # [start, stop) ranges of the epoch's row sequence, read in this order
    batch_sizes: tuple[int, ...]
    first_batch: int = 0  # the index of its first batch among its rank's batches of the epoch


def worker_plan(
    num_rows: int,
    batch_size: int,
    rank: int,
    world: int,
    worker: int,
    num_workers: int,
    drop_last: bool = False,
    seed: int = 0,
    epoch: int = 0,
) -> WorkerPlan:
    """The contiguous block of its rank's batches (and so rows) that one loader worker makes."""
    sizes = rank_batch_sizes(num_rows, rank, world, batch_size, drop_last)
    nb = len(sizes)
    first, last = worker * nb // num_workers, (worker + 1) * nb // num_workers
    lo, hi = rank_rows(num_rows, rank, world)
    start, count = sum(sizes[:first]), sum(sizes[first:last])  # in the rank's kept rows
    if not drop_last:
        return WorkerPlan(((lo + start, lo + start + count),), tuple(sizes[first:last]), first)
    # the kept window starts at a seeded offset and wraps around the slice's end (module docstring, 4.)
    n = hi - lo
    start = (start + int(np.random.default_rng([seed, epoch, rank, DROP_TAG]).integers(n))) % n
    ranges = [(lo + start, lo + min(n, start + count))]
    if start + count > n:
        ranges.append((lo, lo + start + count - n))
    return WorkerPlan(tuple(ranges), tuple(sizes[first:last]), first)


class _OpenFiles:
    """The last ``size`` ParquetFiles used, kept open; older ones are closed. The last ``footers`` files' footers
    stay parsed: a shuffled epoch visits row groups of many files in turn, and parsing a file's footer again at each
    (every row group's metadata) made 20 files of 10-row groups read 11x slower than 5. Both are bounded: a parsed
    footer can take a megabyte (80 columns x 16 row groups), and a worker may visit thousands of files.

    ``identities`` (path -> the file's identity when the index was made): a file opened is stat'ed once and must
    still be that file. Each epoch (and each evaluation) opens the files again by path, and `mmoe-rec features
    --overwrite` into the folder meanwhile puts another build's files under the same names: read with the index's
    row groups and the job's spec, their ids would mean other values, silently."""

    def __init__(self, size: int = MAX_OPEN_FILES, footers: int | None = None,
                 identities: Mapping[str, tuple[int, ...] | None] | None = None) -> None:
        self.size = size
        self.identities = identities or {}
        self.files: collections.OrderedDict[str, pq.ParquetFile] = collections.OrderedDict()
        self.footer_size = MAX_PARSED_FOOTERS if footers is None else footers
        self.footers: collections.OrderedDict[str, pq.FileMetaData] = collections.OrderedDict()

    def get(self, path: str) -> pq.ParquetFile:
        pf = self.files.pop(path, None)
        if pf is None:
            pf = self._open(path)
        self.footers[path] = pf.metadata
        self.footers.move_to_end(path)
        if len(self.footers) > self.footer_size:
            self.footers.popitem(last=False)
        self.files[path] = pf
        if len(self.files) > self.size:
            self.files.popitem(last=False)[1].close()
        return pf

    def _open(self, path: str) -> pq.ParquetFile:
        expected = self.identities.get(path)
        try:
            pf = pq.ParquetFile(path, metadata=self.footers.get(path))
        except (OSError, pa.ArrowException):
            if expected is not None and _identity(path) != expected:  # gone or replaced
                raise ValueError(_changed(path)) from None
            raise
        # stat'ed after the open: what matches is the file this handle reads (the old build's files stay readable
        # through handles opened before the rebuild)
        if expected is not None and _identity(path) != expected:
            pf.close()
            raise ValueError(_changed(path))
        return pf

    def close(self) -> None:
        while self.files:
            self.files.popitem()[1].close()


def _identity(path: str) -> tuple[int, ...] | None:
    """A feature file's identity for the loader's check: its ctime left out (a chmod of the folder, a hard-link
    backup, an atime change during a fit must not stop it; a rebuild writes new files)."""
    return file_identity(path, ctime=False)


def _changed(path: str) -> str:
    return (f"{path}: the feature folder {Path(path).parent} was rebuilt (or changed) while this job read it; "
            f"restart the job")


def feature_files(directory: str | os.PathLike) -> list[Path]:
    """A split folder's feature files in order: its *.parquet but for ".x" / "_x" names (a writer's temporary file,
    a copy set aside), which no reader here takes; none is an error."""
    directory = Path(directory)
    files = sorted(p for p in directory.glob("*.parquet") if not skipped_name(p.name))
    if not files:
        raise FileNotFoundError(f"no *.parquet files in {directory}")
    return files


def read_rows(
    units: list[RowGroup],
    start: int,
    stop: int,
    columns: list[str],
    chunk_rows: int = 65536,
    schema: pa.Schema | None = None,
    finite_columns: Sequence[str] = (),
    nonnegative_columns: Sequence[str] = (),
    id_columns: Sequence[str] | Mapping[str, int | None] = (),
    binary_columns: Sequence[str] = (),
) -> Iterator[pa.RecordBatch]:
    """Rows [start, stop) of the sequence made by ``units`` laid end to end, as RecordBatches of <= chunk_rows.

    Each chunk has ``columns`` in that order, those in ``schema`` cast to its type, so chunks of different
    files merge. Values of ``finite_columns`` must be finite numbers (no null, NaN or inf), those of
    ``nonnegative_columns`` also >= 0, those of ``binary_columns`` 0 or 1, and the ids of ``id_columns`` (sparse
    features: an int or a list of ints, a null list being an empty bag) not null and, where a mapping gives the
    table's rows, in [0, rows); else a ValueError names the file, the column and the row in the file. A row group
    that cannot be decoded (a damaged page) is a ValueError naming the file and row group.
    """
    schema = pa.schema([]) if schema is None else schema
    types = [schema.field(c).type if c in schema.names else None for c in columns]
    checks = [(c, c in nonnegative_columns) for c in dict.fromkeys([*finite_columns, *nonnegative_columns])]
    bounds_of = dict(id_columns) if isinstance(id_columns, Mapping) else dict.fromkeys(id_columns)
    bounds = np.concatenate([[0], np.cumsum([u.num_rows for u in units])])
    u = int(np.searchsorted(bounds, start, side="right")) - 1
    files = _OpenFiles(identities={unit.path: unit.identity for unit in units})
    pos = start
    try:
        while pos < stop:
            unit = units[u]
            lo, hi = pos - bounds[u], min(stop, bounds[u + 1]) - bounds[u]  # rows wanted inside this row group
            off = 0
            for rb in _row_group_chunks(files, unit, columns, chunk_rows):
                a, b = max(lo, off), min(hi, off + rb.num_rows)
                if b > a:
                    part = _conform(rb.slice(a - off, b - a), columns, types, unit.path)
                    for c, nonnegative in checks:
                        _check_values(part.column(c), nonnegative, unit.path, c, unit.first_row + a)
                    for c in binary_columns:
                        _check_binary(part.column(c), unit.path, c, unit.first_row + a)
                    for c, rows in bounds_of.items():
                        _check_ids(part.column(c), unit.path, c, unit.first_row + a, rows)
                    yield part
                off += rb.num_rows
                if off >= hi:
                    break
            pos = bounds[u] + hi
            u += 1
    finally:
        files.close()


def _row_group_chunks(files: _OpenFiles, unit: RowGroup, columns: list[str],
                      chunk_rows: int) -> Iterator[pa.RecordBatch]:
    """One row group's RecordBatches; a read or decode error (a damaged page: Arrow names neither file nor column)
    names the file and the row group."""
    try:
        yield from files.get(unit.path).iter_batches(
            batch_size=chunk_rows, row_groups=[unit.index], columns=columns, use_threads=False
        )
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{unit.path}: row group {unit.index} (rows {unit.first_row}.."
                         f"{unit.first_row + unit.num_rows - 1} of the file) cannot be read: {e}") from None


def _conform(rb: pa.RecordBatch, columns: list[str], types: list[pa.DataType | None], path: str) -> pa.RecordBatch:
    """``rb`` with ``columns`` in order, cast to ``types`` (None: as read), every field nullable and no
    metadata: files whose column order, widths or nullability differ then give chunks that concatenate."""
    arrays = []
    for c, t in zip(columns, types):
        col = rb.column(c)
        if t is not None and col.type != t:
            try:
                col = col.cast(t)
            except pa.ArrowException as e:
                raise ValueError(f"{path}: column {c} is {col.type} and does not convert to {t} ({e})") from None
        arrays.append(col)
    return pa.RecordBatch.from_arrays(arrays, names=columns)


def _check_values(col: pa.Array, nonnegative: bool, path: str, name: str, first_row: int) -> None:
    """Raise at the first null, NaN, inf (or, if ``nonnegative``, negative) value; ``first_row`` is the row in
    the file of ``col[0]``. Vectorised: a few Arrow kernels per chunk (a float column without nulls, the usual
    dense feature: one numpy pass over its buffer)."""
    if pa.types.is_float16(col.type):  # no comparison kernels for halffloat
        col = col.cast(pa.float32())
    if col.null_count == 0 and pa.types.is_floating(col.type) and not nonnegative:
        x = col.to_numpy(zero_copy_only=False)
        if np.isfinite(x).all() and (x.dtype != np.float64 or np.abs(x).max(initial=0) <= FLOAT32_MAX):
            return
    ok = pc.is_valid(col)
    if pa.types.is_floating(col.type):
        ok = pc.and_(ok, pc.fill_null(pc.is_finite(col), False))
        if pa.types.is_float64(col.type):  # the batch holds it as float32: beyond its range it would be inf
            ok = pc.and_(ok, pc.fill_null(pc.less_equal(pc.abs(col), FLOAT32_MAX), False))
    if nonnegative and not pa.types.is_boolean(col.type):
        ok = pc.and_(ok, pc.fill_null(pc.greater_equal(col, 0), False))
    if pc.all(ok).as_py() is not False:
        return
    bad = np.flatnonzero(~ok.to_numpy(zero_copy_only=False))
    value = col[int(bad[0])].as_py()
    what = ("a finite number >= 0" if nonnegative else "a finite number") + " within float32's range"
    raise ValueError(
        f"{path}: column {name} is {'null' if value is None else value} at row {first_row + int(bad[0])} "
        f"({len(bad)} such value(s) in rows {first_row}..{first_row + len(col) - 1}); every value must be {what}"
    )


def _check_binary(col: pa.Array, path: str, name: str, first_row: int) -> None:
    """Raise at the first value other than 0 or 1 (after _check_values: no null or NaN is left)."""
    x = col.to_numpy(zero_copy_only=False)
    bad = np.flatnonzero((x != 0) & (x != 1))
    if len(bad):
        raise ValueError(f"{path}: column {name} is {x[bad[0]]} at row {first_row + int(bad[0])} ({len(bad)} such "
                         f"value(s) in rows {first_row}..{first_row + len(col) - 1}); a binary task's label is 0 or 1")


def _check_ids(col: pa.Array, path: str, name: str, first_row: int, rows: int | None = None) -> None:
    """Raise at the first null id (a null int, or a null inside a list: a null list is an empty bag), and, given
    the table's `rows`, at the first id outside [0, rows): the embedding would fail on it naming neither file nor
    row. One min / max per chunk where every id is fine."""
    listed = pa.types.is_list(col.type) or pa.types.is_large_list(col.type)
    ids = pc.list_flatten(col) if listed else col

    def row_of(bad: np.ndarray) -> int:
        return first_row + int((pc.list_parent_indices(col).to_numpy(zero_copy_only=False)[bad] if listed else bad)[0])

    if ids.null_count:
        bad = np.flatnonzero(~pc.is_valid(ids).to_numpy(zero_copy_only=False))
        raise ValueError(f"{path}: column {name} has a null id at row {row_of(bad)} ({len(bad)} null id(s) in rows "
                         f"{first_row}..{first_row + len(col) - 1}); feature Parquet holds an id for every value "
                         "(a missing one has its own), so the file was not written by `mmoe-rec features` as it is")
    if rows is None or not len(ids):
        return
    if pa.types.is_dictionary(ids.type):  # Parquet of another writer: min_max has no kernel for it
        ids = ids.dictionary_decode()
    low, high = pc.min_max(ids).values()
    if low.as_py() >= 0 and high.as_py() < rows:
        return
    values = ids.to_numpy(zero_copy_only=False)
    bad = np.flatnonzero((values < 0) | (values >= rows))
    raise ValueError(f"{path}: column {name} has id {values[bad[0]]} at row {row_of(bad)}, outside its table of "
                     f"{rows} rows ({len(bad)} such id(s) in rows {first_row}..{first_row + len(col) - 1}): was the "
                     "file encoded with this folder's spec.json?")


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
    ``finite_columns`` / ``nonnegative_columns`` / ``binary_columns`` / ``id_columns``: see ``read_rows`` (labels;
    sample weights; binary labels; sparse features and their tables' rows).
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
        finite_columns: Sequence[str] = (),
        nonnegative_columns: Sequence[str] = (),
        id_columns: Sequence[str] | Mapping[str, int | None] = (),
        binary_columns: Sequence[str] = (),
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
        self.finite_columns = tuple(finite_columns)
        self.nonnegative_columns = tuple(nonnegative_columns)
        self.id_columns = dict(id_columns) if isinstance(id_columns, Mapping) else dict.fromkeys(id_columns)
        self.binary_columns = tuple(binary_columns)
        self.epoch = 0
        # fail here, in the main process, if the rows cannot be planned for any rank (one rank's plan alone let
        # another's loader fail inside a worker, or at its first batch)
        self.step_rows() if world_size > 1 else len(self)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(rank_batch_sizes(self.index.num_rows, self.rank, self.world_size, self.batch_size, self.drop_last))

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        plan = worker_plan(
            self.index.num_rows, self.batch_size, self.rank, self.world_size, worker, num_workers, self.drop_last,
            self.seed, self.epoch,
        )
        if not plan.batch_sizes:
            return
        order = unit_order(len(self.index.units), self.seed, self.epoch, self.shuffle)
        units = [self.index.units[i] for i in order]
        chunks = itertools.chain.from_iterable(
            read_rows(units, start, stop, self.columns, self.chunk_rows, self.index.schema, self.finite_columns,
                      self.nonnegative_columns, self.id_columns, self.binary_columns)
            for start, stop in plan.ranges
        )
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
            batches = shuffle_batches(chunks, plan.batch_sizes, self.shuffle_buffer, rng)
        else:
            batches = cut_batches(chunks, plan.batch_sizes)
        step_rows = self.step_rows()
        for j, rb in enumerate(batches):
            out = self.transform(rb)
            if hasattr(out, "worker"):  # an ArrayBatch: which block of the rank's rows it is from, and its step's rows
                out.worker = worker
                out.step_rows = None if step_rows is None else step_rows[plan.first_batch + j]
            yield out

    def step_rows(self) -> list[int] | None:
        """Under several ranks, the rows of each step of the epoch summed over the ranks (index: the rank's batch);
        the ranks' batches differ in size in the last one or two (module docstring, 4.). From the plan every rank
        computes alike: no communication."""
        if self.world_size <= 1:
            return None
        sizes = [rank_batch_sizes(self.index.num_rows, r, self.world_size, self.batch_size, self.drop_last)
                 for r in range(self.world_size)]
        return [sum(per_rank) for per_rank in zip(*sizes)]
