"""Apply a fitted FeatureSpec to raw rows: the same code for a 5M-row build and for one scoring row.

Nothing here depends on the other rows of the batch (no batch statistics), so a row transforms the same
alone or in a batch. Output columns follow mmoe_rec/features/spec.py: ids, sparse (spec order), dense (spec
order), then labels and sample weight when present.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from mmoe_rec.features.columns import (
    dictionary_fast_path,
    label_values,
    multi_valued_column,
    numeric_column,
    numeric_null_values,
    one_chunk,
    single_categorical_column,
    weight_column,
)
from mmoe_rec.features.errors import FeatureDataError, check_columns
from mmoe_rec.features.frames import table_from_pandas
from mmoe_rec.features.numeric import apply_numeric
from mmoe_rec.features.spec import WEIGHT_COLUMN, FeatureSpec, label_column
from mmoe_rec.features.vocab import VocabLookup, canonical_text, hash_ids

LIST_TYPE = pa.list_(pa.int64())


class CompiledSpec:
    """A FeatureSpec with its lookups built once (vocabulary arrays, sorted int keys)."""

    def __init__(self, spec: FeatureSpec) -> None:
        if not spec.transforms.get("features") and (spec.sparse_features or spec.dense_features):
            raise FeatureDataError("this feature spec has no fitted transforms (was it made by mmoe_rec.features?)")
        self.spec = spec
        self.features: dict = spec.transforms.get("features", {})
        self.tasks: dict = spec.transforms.get("tasks", {})
        self.weight_column: str | None = spec.transforms.get("weight_column")
        # strings (single values, the pieces of delimited strings, text labels) are trimmed as in fitting, whatever
        # the input's format: Parquet / DataFrame rows keep the padding the CSV reader trims (' Private'); a single
        # value that is one of the reader's null_values once trimmed is missing, as in a CSV
        reader = spec.transforms.get("reader") or {}
        self.strip = bool(reader.get("strip_whitespace", False))
        self.null_values = tuple(reader.get("null_values") or ())
        self.text_null_values = numeric_null_values(self.null_values, self.strip)[0]  # see its docstring
        self.lookups = {name: VocabLookup(st["values"], st["value_type"])
                        for name, st in self.features.items() if st["kind"] == "vocab"}

    def input_columns(self, with_labels: bool) -> list[str]:
        cols = list(self.spec.id_columns) + [st["column"] for st in self.features.values()]
        if with_labels:
            cols += [t["column"] for t in self.tasks.values()]
            if self.weight_column:
                cols.append(self.weight_column)
        return list(dict.fromkeys(cols))

    def check_columns(self, names: list[str], with_labels: bool, file: str | None = None) -> None:
        """Refuse input without every column the transform reads (all that are missing named at once), or that names
        one of them twice (errors.check_columns)."""
        check_columns(names, self.input_columns(with_labels), file)

    def output_schema(self, with_labels: bool, id_types: dict[str, pa.DataType] | None = None) -> pa.Schema:
        fields = [pa.field(c, (id_types or {}).get(c, pa.string())) for c in self.spec.id_columns]
        fields += [pa.field(f.name, LIST_TYPE if f.multi_valued else pa.int64()) for f in self.spec.sparse_features]
        fields += [pa.field(d, pa.float32()) for d in self.spec.dense_features]
        if with_labels:
            fields += [pa.field(label_column(t), pa.float32()) for t in self.spec.task_names]
            if self.spec.has_weight:
                fields.append(pa.field(WEIGHT_COLUMN, pa.float32()))
        return pa.schema(fields)

    def _ids(self, name: str, state: dict, col) -> pa.Array:
        col = one_chunk(col)
        if dictionary_fast_path(state, col.type):
            return self._dictionary_ids(name, state, col)
        if state["multi_valued"]:
            values, offsets = multi_valued_column(col, state["column"], state["delimiter"], self.strip,
                                                  self.null_values if state.get("null_fields") else ())
            ids = self._single(name, state, values)
            return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(ids, pa.int64()))
        values = single_categorical_column(col, state["column"], self.strip, self.null_values,
                                           bool(state.get("null_fields")))
        return pa.array(self._single(name, state, values), pa.int64())

    def _dictionary_ids(self, name: str, state: dict, col: pa.DictionaryArray) -> pa.Array:
        """Ids of each distinct value once, gathered per row: the same ids as for the decoded column.
        A null index is a missing value (id 0, or an empty list)."""
        n_values = len(col.dictionary)
        idx = col.indices
        if idx.null_count:  # widen first: len(dictionary) may not fit a narrow index type (int8 with 128 values)
            idx = idx.cast(pa.int64()).fill_null(n_values)
        rows = idx.to_numpy(zero_copy_only=False)  # (n,)
        if not state["multi_valued"]:
            values = single_categorical_column(col.dictionary, state["column"], self.strip, self.null_values,
                                               bool(state.get("null_fields")))
            ids = self._single(name, state, values)  # (V,)
            return pa.array(np.take(np.append(ids, 0), rows), pa.int64())
        values, offsets = multi_valued_column(col.dictionary, state["column"], state["delimiter"], self.strip,
                                              self.null_values if state.get("null_fields") else ())  # (V+1,)
        ids = self._single(name, state, values)  # ids of the dictionary's flat values
        lengths = np.append(np.diff(offsets), 0)[rows]  # (n,); the appended 0 is the null index
        out_offsets = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(lengths, out=out_offsets[1:])
        # flat position of each output value: its row's list start in `ids` plus its place in the list
        first = np.append(offsets[:-1], 0)[rows] - out_offsets[:-1]
        pos = np.repeat(first, lengths) + np.arange(int(out_offsets[-1]))
        return pa.ListArray.from_arrays(pa.array(out_offsets.astype(np.int32)), pa.array(ids[pos], pa.int64()))

    def _single(self, name: str, state: dict, values: pa.Array) -> np.ndarray:
        if state.get("canonical_text"):  # as fitted (vocab.canonical_text)
            values = canonical_text(values)
        if state["kind"] == "vocab":
            lookup = self.lookups[name]
            problem = lookup.type_mismatch(values)
            if problem:
                raise FeatureDataError(problem, column=state["column"])
            return lookup(values)
        return hash_ids(values, state["buckets"])

    def transform(self, table: pa.Table | pa.RecordBatch, with_labels: bool | None = None,
                  file: str | None = None, row_offset: int = 0) -> pa.Table:
        """Raw rows -> feature rows. with_labels None: labels (and weight) if their columns are present."""
        names = table.column_names
        label_cols = [t["column"] for t in self.tasks.values()] + ([self.weight_column] if self.weight_column else [])
        if with_labels is None:
            with_labels = all(c in names for c in label_cols)
        self.check_columns(names, with_labels, file)
        out: dict[str, pa.Array] = {c: table.column(c) for c in self.spec.id_columns}
        try:
            dense: dict[str, np.ndarray] = {}
            sparse: dict[str, pa.Array] = {}
            for name, st in self.features.items():
                col = table.column(st["column"])
                if st["kind"] in ("vocab", "hash"):
                    sparse[name] = self._ids(name, st, col)
                    continue
                nulls = self.null_values if st.get("null_numbers") else self.text_null_values
                x, miss = numeric_column(col, st["column"], nulls, self.strip)
                value, indicator = apply_numeric(st, x, miss)
                if st["transform"] == "bucketize":
                    sparse[name] = pa.array(value, pa.int64())
                else:
                    dense[name] = value
                    if indicator is not None:
                        dense[st["indicator_name"]] = indicator
            for f in self.spec.sparse_features:
                out[f.name] = sparse[f.name]
            for d in self.spec.dense_features:
                out[d] = pa.array(dense[d], pa.float32())
            if with_labels:
                for t in self.spec.task_names:
                    st = self.tasks[t]
                    out[label_column(t)] = pa.array(label_values(table.column(st["column"]), st["column"], st,
                                                                        self.strip))
                if self.weight_column:
                    out[WEIGHT_COLUMN] = pa.array(weight_column(table.column(self.weight_column), self.weight_column))
        except FeatureDataError as e:
            raise e.at(file, row_offset) from None
        return pa.table(out)


_COMPILED: dict[str, CompiledSpec] = {}


def compiled(spec: FeatureSpec) -> CompiledSpec:
    """Cached by the spec's content-hash version (equal versions mean equal content)."""
    if not spec.version:
        spec.finalize()
    c = _COMPILED.get(spec.version)
    if c is None:
        if len(_COMPILED) >= 8:
            _COMPILED.pop(next(iter(_COMPILED)))
        c = _COMPILED[spec.version] = CompiledSpec(spec)
    return c


def transform_table(spec: FeatureSpec, table: pa.Table | pa.RecordBatch | pd.DataFrame,
                    with_labels: bool | None = None, file: str | None = None, row_offset: int = 0) -> pa.Table:
    """Apply `spec` to raw rows (a pyarrow Table / RecordBatch, or a pandas DataFrame of any size, one row too).

    Labels are optional: with ``with_labels=None`` they are produced when all label columns are present
    (scoring input has none); ``True`` requires them, ``False`` skips them.
    """
    if isinstance(table, pd.DataFrame):
        table = table_from_pandas(table, file, row_offset)
    return compiled(spec).transform(table, with_labels=with_labels, file=file, row_offset=row_offset)
