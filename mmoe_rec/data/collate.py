"""Feature-Parquet rows (a pyarrow RecordBatch) -> Batch, column at a time: no Python loop over rows.

Sparse features become one KeyedJaggedTensor with keys in ``spec.sparse_features`` order:
a single-valued int64 column gives length-1 bags, a multi-valued ``list<int64>`` column gives jagged bags
(an empty or null list is an empty bag). KJT values and lengths are int64: ``nn.EmbeddingBag`` wants the
offsets in the same dtype as the ids.

When every sparse column is single-valued int64 (census: 44 of them) the KJT values are one Arrow call,
``to_tensor`` of those columns in column-major order, which is the key-major layout of the values; likewise
the dense columns when all are float32. Column by column, 1024 census rows took 174 us against 53 us (a Zen 5,
2026-11-25): 44 lookups, conversions, copies and ``np.ones`` per batch. Other types and null ids take the
column-by-column path, which converts them or names the column.

Ids must have an integer type (a float or string id is an error, not truncated or parsed), and labels and sample
weights must be finite (weights also >= 0): a NaN label would make the loss NaN. The stream checks both earlier,
naming the file and row (``column_kinds``, ``finite_columns``); the checks here cover RecordBatches made by hand.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mmoe_rec.data.batch import Batch
from mmoe_rec.features.spec import WEIGHT_COLUMN, FeatureSpec, label_column


@dataclasses.dataclass
class ArrayBatch:
    """A Batch as plain numpy arrays: what a DataLoader worker sends to the main process.

    Numpy arrays pickle through the worker pipe as bytes; torch tensors would each cost a shared-memory
    segment and a file-descriptor handshake (~1 ms each, measured), several times the cost of the batch.
    """

    values: np.ndarray  # (sum of bag lengths,) int64, key-major like a KJT
    lengths: np.ndarray  # (num_keys * B,) int64
    dense: np.ndarray  # (B, D) float32
    labels: dict[str, np.ndarray]  # task -> (B,) float32
    weights: np.ndarray | None = None  # (B,) float32
    ids: dict[str, pa.Array] | None = None  # id columns as read (type and nulls kept)
    worker: int = 0  # the loader worker that made it: its batches are one contiguous block of the rank's rows
    step_rows: int | None = None  # under several ranks: the rows of this step summed over the ranks


class BatchCollator:
    """Turns RecordBatches of feature Parquet into Batches for a chosen set of tasks, in two steps:
    ``arrays(rb)`` (columnar work, runs in the loader worker) and ``to_batch(arrays)`` (zero-copy tensors and
    the KJT, runs in the process that consumes the batch). ``collator(rb)`` does both.
    """

    def __init__(
        self,
        spec: FeatureSpec,
        tasks: list[str] | None = None,
        with_ids: bool = False,
        with_labels: bool = True,
    ) -> None:
        self.spec = spec
        self.tasks = list(spec.task_names if tasks is None else tasks)
        for t in self.tasks:
            spec.task(t)  # raises a KeyError naming the known tasks
        self.with_ids = with_ids
        self.with_labels = with_labels
        self.keys = [f.name for f in spec.sparse_features]
        self._single_valued = bool(self.keys) and not any(f.multi_valued for f in spec.sparse_features)
        self._int64_ids = pa.schema([(k, pa.int64()) for k in self.keys])
        self._float32_dense = pa.schema([(c, pa.float32()) for c in spec.dense_features])

    @property
    def columns(self) -> list[str]:
        """The Parquet columns this collator reads, in a stable order."""
        cols = self.keys + list(self.spec.dense_features)
        if self.with_labels:
            cols += [label_column(t) for t in self.tasks]
        if self.with_labels and self.spec.has_weight:
            cols.append(WEIGHT_COLUMN)
        if self.with_ids:
            cols += list(self.spec.id_columns)
        return cols

    @property
    def label_columns(self) -> list[str]:
        return [label_column(t) for t in self.tasks] if self.with_labels else []

    @property
    def finite_columns(self) -> list[str]:
        """Columns read whose every value must be a finite number: labels, the sample weight and the dense features
        (the feature build writes none other; a null, NaN or inf there made every weight NaN without a word)."""
        return self.label_columns + self.nonnegative_columns + list(self.spec.dense_features)

    @property
    def binary_label_columns(self) -> list[str]:
        """Label columns of binary tasks: 0 or 1 each (BCE with a target of 2 has no lower bound)."""
        return [label_column(t) for t in self.tasks if self.spec.task(t).type == "binary"] if self.with_labels else []

    @property
    def id_bounds(self) -> dict[str, int]:
        """Each sparse feature's column -> its table's rows: ids lie in [0, rows)."""
        return {f.name: f.num_embeddings for f in self.spec.sparse_features}

    @property
    def nonnegative_columns(self) -> list[str]:
        return [WEIGHT_COLUMN] if self.with_labels and self.spec.has_weight else []

    @property
    def column_kinds(self) -> dict[str, str]:
        """Kind (``parquet_stream.COLUMN_KINDS``) of each feature, label and weight column; ids pass through."""
        kinds = {f.name: "list<int>" if f.multi_valued else "int" for f in self.spec.sparse_features}
        kinds.update(dict.fromkeys(self.spec.dense_features + self.finite_columns, "number"))
        return kinds

    def __call__(self, rb: pa.RecordBatch | pa.Table) -> Batch:
        if isinstance(rb, pa.Table):  # what transform_table returns: its rows as one record batch
            rb = rb.combine_chunks().to_batches()[0] if rb.num_rows else pa.RecordBatch.from_pylist([], rb.schema)
        return self.to_batch(self.arrays(rb))

    def arrays(self, rb: pa.RecordBatch) -> ArrayBatch:
        b = rb.num_rows
        values, lengths = self._sparse_arrays(rb)
        if self.spec.dense_features:
            dense = _float32_matrix(rb, self.spec.dense_features, self._float32_dense)  # (B, D)
        else:
            dense = np.zeros((b, 0), dtype=np.float32)
        labels, weights, ids = {}, None, None
        if self.with_labels:
            labels = {t: _finite32(rb.column(label_column(t)), label_column(t)) for t in self.tasks}
            if self.spec.has_weight:
                weights = _finite32(rb.column(WEIGHT_COLUMN), WEIGHT_COLUMN, nonnegative=True)
        if self.with_ids:
            # as Arrow arrays: to_numpy would make an int64 column with a null float64 (ids past 2**53 rounded);
            # compacted: a slice of a larger chunk pickles (to the main process) with the chunk's whole buffers
            ids = {c: pa.concat_arrays([rb.column(c)]) for c in self.spec.id_columns}
        return ArrayBatch(values, lengths, dense, labels, weights, ids)

    def _sparse_arrays(self, rb: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray]:
        """(values, lengths), key-major like a KJT."""
        b = rb.num_rows
        features = self.spec.sparse_features
        if self._single_valued and b:
            ids = rb.select(self.keys)
            if ids.schema.equals(self._int64_ids):  # else the column-by-column path converts or names the problem
                try:
                    # (B, F) column-major = (F, B) row-major: the ids of each key in turn
                    key_major = ids.to_tensor(row_major=False).to_numpy().T
                except pa.ArrowTypeError:  # a null id: the column-by-column path below names the column
                    pass
                else:
                    return np.array(key_major, dtype=np.int64).reshape(-1), np.ones(len(features) * b, np.int64)
        values, lengths = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        for f in features:
            col = rb.column(f.name)
            if f.multi_valued:
                v, n = _jagged(col, f.name)
            else:
                v, n = _int64(col, f.name), np.ones(b, dtype=np.int64)
            values.append(v)
            lengths.append(n)
        return np.concatenate(values), np.concatenate(lengths)

    def to_batch(self, a: ArrayBatch) -> Batch:
        sparse = KeyedJaggedTensor(
            keys=self.keys,
            values=torch.from_numpy(a.values),
            lengths=torch.from_numpy(a.lengths),
            stride=a.dense.shape[0],
        )
        return Batch(
            sparse=sparse,
            dense=torch.from_numpy(a.dense),
            labels={t: torch.from_numpy(v) for t, v in a.labels.items()},
            weights=None if a.weights is None else torch.from_numpy(a.weights),
            ids=a.ids,
            worker=a.worker,
            step_rows=a.step_rows,
        )


def _int64(col: pa.Array, name: str) -> np.ndarray:
    if not pa.types.is_integer(col.type):  # a cast would truncate 1.9 to 1 or parse "3"
        raise TypeError(f"sparse feature column {name!r} must hold integer ids, found {col.type}")
    if col.null_count:
        raise ValueError(f"sparse feature column {name!r} has {col.null_count} null ids")
    # np.array(..., copy) so torch gets a writable buffer (Arrow memory is read-only)
    return np.array(col.to_numpy(zero_copy_only=False), dtype=np.int64)


def _jagged(col: pa.Array, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(flat ids, per-row lengths) of a list column; both respect the column's slice offset."""
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
        raise TypeError(f"multi-valued sparse feature column {name!r} must be list<int64>, found {col.type}")
    lengths = pc.fill_null(pc.list_value_length(col), 0)  # a null list is an empty bag
    flat = pc.list_flatten(col)
    return _int64(flat, name), np.array(lengths.to_numpy(zero_copy_only=False), dtype=np.int64)


def _float32_matrix(rb: pa.RecordBatch, names: list[str], all_float32: pa.Schema) -> np.ndarray:
    """(B, len(names)) float32, row-major; nulls become NaN. One Arrow call when the columns are all float32."""
    cols = rb.select(names)
    if rb.num_rows and cols.schema.equals(all_float32):
        return np.array(cols.to_tensor(null_to_nan=True).to_numpy(), dtype=np.float32)
    return np.stack([_float32(col, c) for col, c in zip(cols.columns, names)], axis=1)


def _float32(col: pa.Array, name: str) -> np.ndarray:
    if not (pa.types.is_floating(col.type) or pa.types.is_integer(col.type) or pa.types.is_boolean(col.type)):
        raise TypeError(f"column {name!r} must be numeric, found {col.type}")
    # nulls become NaN: the feature pipeline imputes, so a NaN here points at the data, not at the loader
    return np.array(col.to_numpy(zero_copy_only=False), dtype=np.float32)


def _finite32(col: pa.Array, name: str, nonnegative: bool = False) -> np.ndarray:
    """A label or weight column as float32; a null (NaN here), NaN, inf or (``nonnegative``) negative value is an
    error naming the column and the row of the batch."""
    x = _float32(col, name)  # (B,)
    bad = ~np.isfinite(x) | (x < 0) if nonnegative else ~np.isfinite(x)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"column {name!r} is {col[i].as_py()} at row {i} of the batch ({int(bad.sum())} such rows): "
                         f"it must be a finite number{' >= 0' if nonnegative else ''}")
    return x
