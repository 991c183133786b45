"""DataFrames of raw rows to Arrow (features.frames): an object column mixing numbers and text is read as text,
as from a CSV, and a value that is no scalar is named by its column and row."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from mmoe_rec.features.build import main as features_main
from mmoe_rec.features.errors import FeatureDataError
from mmoe_rec.features.frames import table_from_pandas
from mmoe_rec.features.spec import FeatureSpec
from mmoe_rec.features.transform import transform_table


def test_a_frame_pyarrow_reads_is_converted_as_pyarrow_converts_it():
    frame = pd.DataFrame({"a": [1, 2], "b": ["x", None], "c": [0.5, float("nan")]}, index=[7, 3])
    assert table_from_pandas(frame).equals(pa.Table.from_pandas(frame, preserve_index=False))


def test_an_object_column_of_numbers_and_text_becomes_text_and_missing_values_null():
    frame = pd.DataFrame({"price": pd.Series([1.5, "2.5", None, float("nan"), 3], dtype=object),
                          "user": pd.Series([10, "u5", 12, pd.NA, 2**63 - 1], dtype=object), "ok": [1, 2, 3, 4, 5]})
    table = table_from_pandas(frame)
    assert table.column_names == ["price", "user", "ok"]
    assert table.column("price").to_pylist() == ["1.5", "2.5", None, None, "3"]  # 3 as text: as its column
    assert table.column("user").to_pylist() == ["10", "u5", "12", None, str(2**63 - 1)]
    assert table.column("ok").type == pa.int64()


def test_integers_past_64_bits_and_decimals_among_other_values_become_text():
    import decimal

    frame = pd.DataFrame({"id": pd.Series([2**64 - 1, "sku"], dtype=object), "big": pd.Series([2**70, 5], dtype=object),
                          "price": pd.Series([decimal.Decimal("1.5"), 2.5], dtype=object)})
    table = table_from_pandas(frame)  # OverflowError inside pyarrow, no column named
    assert table.to_pydict() == {"id": [str(2**64 - 1), "sku"], "big": [str(2**70), "5"], "price": ["1.5", "2.5"]}


@pytest.mark.parametrize("bad", [[1, 2], {"a": 1}, b"raw"])
def test_a_value_that_is_no_scalar_among_others_is_named_by_column_and_row(bad):
    column = pd.Series(["a", 2, "c", "d"], dtype=object)
    column.at[2] = bad
    with pytest.raises(FeatureDataError, match=r"^file f.csv, column 'tags', row 12 \(0-based\): a (list|dict|bytes) "):
        table_from_pandas(pd.DataFrame({"tags": column}), "f.csv", row_offset=10)


def _spec(tmp_path) -> FeatureSpec:
    """item ids hashed, user ids in a vocabulary, both fitted on integer columns; a numeric price."""
    rng = np.random.default_rng(0)
    raw = pa.table({"rid": np.arange(200), "item": rng.integers(0, 5000, 200), "user": rng.integers(0, 20, 200),
                    "price": rng.random(200), "click": rng.integers(0, 2, 200)})
    pq.write_table(raw, tmp_path / "raw.parquet")
    schema = {"id_columns": ["rid"], "numeric": [{"name": "price"}], "tasks": [{"name": "click"}],
              "categorical": [{"name": "item", "transform": "hash", "buckets": 65536}, {"name": "user"}]}
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump(schema))
    assert features_main(["--schema", str(tmp_path / "schema.yaml"), "--input", f"train={tmp_path / 'raw.parquet'}",
                          "--output", str(tmp_path / "features")]) == 0
    return FeatureSpec.load(tmp_path / "features" / "spec.json")


def test_a_row_transforms_the_same_beside_a_text_value_as_alone(tmp_path):
    """Float ids (a pandas column that held a NaN is float64), float32 prices, bools: a text value in another row
    turns the column into text, and the row's ids and values must not move (4034.0 was hashed as "4034.0")."""
    spec = _spec(tmp_path)
    alone = pd.DataFrame({"rid": [0, 1, 2], "item": [4034.0, 3225.0, np.nan], "user": [3.0, 7.0, 11.0],
                          "price": np.array([0.1, 2.0, 0.25], dtype=np.float32)})
    beside = pd.concat([alone, pd.DataFrame({"rid": [3], "item": ["sku-9"], "user": ["u5"], "price": ["0.5"]})],
                       ignore_index=True)
    assert beside["item"].dtype == object and beside["price"].dtype == object
    want = transform_table(spec, alone, with_labels=False)
    got = transform_table(spec, beside, with_labels=False).slice(0, 3)
    for column in ("item", "user", "price"):
        assert got.column(column).to_pylist() == want.column(column).to_pylist(), column
    assert want.column("user").to_pylist()[0] != 0  # a fitted value, not the out-of-vocabulary id


def test_numpy_scalars_bools_missing_times_and_huge_floats_among_text_read_as_their_own_column_would():
    """An object column holds numpy scalars as they are (np.float32 is no Python float): an integral one is its
    integer's text and a NaN one missing, as for Python floats; pd.NaT is missing; a bool is Arrow's "true"; a float
    past int64 keeps its float text."""
    frame = pd.DataFrame({"v": pd.Series([np.float32(4034.0), np.float32("nan"), pd.NaT, True, False, 1e20, "x"],
                                         dtype=object)})
    assert table_from_pandas(frame).column("v").to_pylist() == ["4034", None, None, "true", "false", "1e+20", "x"]


def test_a_mixed_frame_with_non_text_column_names_names_its_columns_as_text():
    frame = pd.DataFrame({0: pd.Series([1, "a"], dtype=object), 1: [2.5, 3.5]})
    table = table_from_pandas(frame)
    assert table.column_names == ["0", "1"]
    assert table.to_pydict() == {"0": ["1", "a"], "1": [2.5, 3.5]}
