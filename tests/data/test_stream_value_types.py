"""Value types the footer check accepts but the later steps mishandled (review of the data path, 2026-12-08):
a float16 sample weight, a float64 value beyond float32's range, a dictionary-typed id column."""
from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmoe_rec.data.datamodule import FeatureDataModule


def _rewrite_all(split_dir, column, make):
    for path in sorted(split_dir.glob("*.parquet")):
        t = pq.read_table(path)
        i = t.schema.get_field_index(column)
        pq.write_table(t.set_column(i, column, make(t.column(column))), path, row_group_size=100)


def test_a_float16_sample_weight_loads_like_a_float32_one(make_feature_dir):
    """"number" accepts a float16 column; the weight's >= 0 check had no Arrow kernel for it (an Arrow error naming
    neither file nor column, for a column of valid weights)."""
    d = make_feature_dir("f16_weight", rows={"train": 300}, files_per_split={"train": 1}, row_group_size=100,
                         with_weight=True)
    _rewrite_all(d / "train", "sample_weight", lambda c: c.cast(pa.float16()))
    rows = sum(b.batch_size for b in FeatureDataModule(str(d), batch_size=64).dataloader("train", train=True))
    assert rows == 300


@pytest.mark.parametrize("column", ["d1", "sample_weight"])
def test_a_float64_value_beyond_float32_is_named_by_file_column_and_row(make_feature_dir, column):
    """Checked finite in float64, the value became inf in the batch's float32: silently for a dense feature, with an
    error naming neither file nor row for a weight."""
    d = make_feature_dir("f32_overflow", rows={"train": 300}, files_per_split={"train": 1}, row_group_size=100,
                         with_weight=True)

    def put(c):
        x = c.to_numpy().astype(np.float64)
        x[123] = 1e39
        return pa.array(x)

    _rewrite_all(d / "train", column, put)
    with pytest.raises(ValueError, match=f"part-00000.parquet: column {column} .*row 123"):
        list(FeatureDataModule(str(d), batch_size=64).dataloader("train", train=False))


def test_a_dictionary_typed_id_column_does_not_send_its_whole_dictionary_with_each_batch(make_feature_dir):
    """A string id column stored dictionary-encoded (pandas `category`) is read as a dictionary array: each batch's
    slice carried the row group's whole dictionary through the worker pipe (21x the batch's bytes here)."""
    d = make_feature_dir("dict_ids", rows={"train": 300, "test": 20_000}, row_group_size=20_000)
    _rewrite_all(d / "test", "request_id", lambda c: c.dictionary_encode())
    assert pa.types.is_dictionary(pq.read_schema(next((d / "test").glob("*.parquet"))).field("request_id").type)
    ds = FeatureDataModule(str(d), batch_size=100).dataloader("test", with_ids=True).dataset
    first = next(iter(ds))
    assert first.ids["request_id"].to_pylist()[:2] == ["r300", "r301"]
    assert len(pickle.dumps(first)) < 50_000  # 9.5 kB with the column read as strings; 199 kB as a dictionary


def test_files_with_a_dictionary_and_a_plain_string_id_column_merge(make_feature_dir):
    """The same id column as dictionary<string> in one file and string in another was refused as two types."""
    d = make_feature_dir("dict_mix", rows={"train": 300, "test": 200}, files_per_split={"test": 2},
                         row_group_size=100)
    path = d / "test" / "part-00000.parquet"
    t = pq.read_table(path)
    i = t.schema.get_field_index("request_id")
    pq.write_table(t.set_column(i, "request_id", t.column("request_id").dictionary_encode()), path)
    batches = list(FeatureDataModule(str(d), batch_size=64).dataloader("test", with_ids=True))
    assert sum(len(b.ids["request_id"]) for b in batches) == 200
