"""Fit a FeatureSpec from a stream of train rows: one pass, bounded memory (counts of distinct values,
running moments, a fixed-size sample per numeric column)."""
from __future__ import annotations

import dataclasses
from typing import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa

from mmoe_rec.features.columns import (
    multi_valued_column, numeric_column, numeric_null_values, single_categorical_column,
)
from mmoe_rec.features.errors import FeatureDataError, check_columns
from mmoe_rec.features.frames import table_from_pandas
from mmoe_rec.features.numeric import RESERVOIR_SIZE, NumericStats, fit_numeric, prepare
from mmoe_rec.features.schema import Schema
from mmoe_rec.features.spec import TRANSFORMS_FORMAT, FeatureSpec, SparseFeature, Task
from mmoe_rec.features.vocab import VocabCounter


def nulls_delimited_fields(c, schema) -> bool:
    """Whether a delimited feature's whole fields that the CSV reader reads as null are made empty lists in Parquet /
    DataFrame input too (columns.null_fields). Recorded in the feature's state (specs fitted since 2026-12-06; one
    fitted before keeps its ids), and only where it can change an id: a null value that is not blank (with strip,
    a blank one gives an empty list anyway, as does "" without)."""
    strip = schema.reader.strip_whitespace
    return bool(c.multi_valued and c.delimiter is not None
                and any(v.strip() if strip else v for v in schema.reader.null_values))


def nulls_unstripped_fields(c, schema) -> bool:
    """Whether a single-valued feature's fields that the CSV reader reads as null are made null in Parquet /
    DataFrame input where the reader does not strip (with strip they always were): recorded as the feature's
    `null_fields` (specs fitted since 2026-12-06; one fitted before keeps its ids), only where it can change an id
    (a null value other than "", which is missing anyway)."""
    return bool(not c.multi_valued and not schema.reader.strip_whitespace and any(schema.reader.null_values))


class SpecFitter:
    """Accumulates train statistics batch by batch; `spec()` turns them into a finalized FeatureSpec."""

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.rows = 0
        self._counters = {c.name: VocabCounter() for c in schema.categorical if c.transform == "vocab"}
        self._stats = {n.name: NumericStats(n.name, RESERVOIR_SIZE) for n in schema.numeric}

    def update(self, table: pa.Table | pa.RecordBatch, mask: np.ndarray | None = None,
               file: str | None = None, row_offset: int = 0) -> None:
        """Add the rows of `table` where `mask` is true (all rows if None). Rows in errors are file rows."""
        check_columns(table.column_names, self.schema.raw_columns(with_labels=False), file)
        take = None if mask is None else pa.array(mask)
        try:
            for c in self.schema.categorical:
                col = table.column(c.column)
                if c.multi_valued:
                    strip = self.schema.reader.strip_whitespace
                    values, offsets = multi_valued_column(col, c.column, c.delimiter, strip,
                                                          self.schema.reader.null_values if nulls_delimited_fields(c, self.schema)
                                                          else ())
                    if take is not None:  # keep the values of kept rows only
                        per_value_row = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
                        values = values.filter(pa.array(mask[per_value_row]))
                else:
                    # trimmed as the transform trims them (CompiledSpec), so fit and transform see the same values
                    values = single_categorical_column(col, c.column, self.schema.reader.strip_whitespace,
                                                       self.schema.reader.null_values,
                                                       nulls_unstripped_fields(c, self.schema))
                    if take is not None:
                        values = values.filter(take)
                if c.name in self._counters:
                    self._counters[c.name].update(values, canonical=c.text == "canonical")
            for n in self.schema.numeric:
                x, missing = numeric_column(table.column(n.column), n.column, self.schema.reader.null_values,
                                            self.schema.reader.strip_whitespace)  # all: null_numbers recorded
                if mask is not None:
                    x, missing = x[mask], missing[mask]
                self._stats[n.name].update(prepare("none" if n.transform == "bucketize" else n.transform, x), missing)
        except FeatureDataError as e:
            raise e.at(file, row_offset) from None
        self.rows += int(table.num_rows if mask is None else mask.sum())

    def spec(self) -> FeatureSpec:
        s = self.schema
        if self.rows == 0:
            raise FeatureDataError("the train split has no rows: nothing to fit the feature spec on")
        sparse, dense, features = [], [], {}
        for c in s.categorical:
            state = {"kind": c.transform, "column": c.column, "multi_valued": c.multi_valued, "delimiter": c.delimiter}
            # recorded: specs fitted before kept a delimited "?" (or, without strip, a single "?") as the value "?"
            if nulls_delimited_fields(c, s) or nulls_unstripped_fields(c, s):
                state["null_fields"] = True
            # recorded: specs fitted before took "True" / "10.0" text as written (as `text: as_written` does)
            state["canonical_text"] = c.text == "canonical"
            if c.transform == "vocab":
                values, kind = self._counters[c.name].vocabulary(c.min_count, c.max_size, fold=c.text == "canonical")
                state.update(values=values, value_type=kind, min_count=c.min_count, num_embeddings=len(values) + 1)
            else:
                state.update(buckets=c.buckets, num_embeddings=c.buckets + 1)
            features[c.name] = state
            sparse.append(SparseFeature(c.name, state["num_embeddings"], multi_valued=c.multi_valued))
        for n in s.numeric:
            state = fit_numeric(n, self._stats[n.name])
            if numeric_null_values(s.reader.null_values, s.reader.strip_whitespace)[1]:
                state["null_numbers"] = True  # recorded: specs fitted before read a null value "-1" as -1
            features[n.name] = state
            if n.transform == "bucketize":
                sparse.append(SparseFeature(n.name, state["num_embeddings"]))
            else:
                dense.append(n.name)
                if state["indicator"]:
                    state["indicator_name"] = f"{n.name}_missing"
                    dense.append(state["indicator_name"])
        tasks = {t.name: {"column": t.column, "type": t.type,
                          "positive": None if t.positive is None else list(t.positive),
                          "negative": None if t.negative is None else list(t.negative)} for t in s.tasks}
        transforms = {
            "format": TRANSFORMS_FORMAT,
            "features": features,
            "tasks": tasks,
            "weight_column": s.sample_weight,
            "reader": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(s.reader).items()},
            "train_rows": self.rows,
            "quantile_sketch": {"kind": "bottom-k uniform reservoir", "size": RESERVOIR_SIZE},
        }
        return FeatureSpec(
            sparse_features=sparse,
            dense_features=dense,
            tasks=[Task(t.name, t.type) for t in s.tasks],
            id_columns=list(s.id_columns),
            has_weight=s.sample_weight is not None,
            transforms=transforms,
        ).finalize()


def fit(schema: Schema, tables: Iterable[pa.Table | pa.RecordBatch | pd.DataFrame] | pa.Table | pd.DataFrame
        ) -> FeatureSpec:
    """Fit a FeatureSpec on train rows: one table, record batch or pandas DataFrame, or a stream of them."""
    if isinstance(tables, (pa.Table, pa.RecordBatch, pd.DataFrame)):  # one of them (iterating a DataFrame gives
        tables = [tables]  # its column names)
    fitter = SpecFitter(schema)
    for t in tables:
        if isinstance(t, pd.DataFrame):
            t = table_from_pandas(t)
        elif not isinstance(t, (pa.Table, pa.RecordBatch)):
            raise TypeError(f"fit takes pyarrow Tables / RecordBatches or pandas DataFrames, got {type(t).__name__}")
        fitter.update(t)
    return fitter.spec()
