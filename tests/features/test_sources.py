"""sources: reading raw CSV as the schema's reader says (null values, row numbers of small batches, trimmed nulls)
and the formats recognized by name (gaps a mutation review found, 2026-12-07)."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from mmoe_rec.features.schema import ReaderSpec
from mmoe_rec.features.sources import file_header, input_format, iter_batches


def test_the_readers_null_values_make_csv_fields_missing(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("u,x\nNA,1\na,-999\nb,\n")
    reader = ReaderSpec(null_values=("", "NA", "-999"))
    (_, batch), = list(iter_batches(str(path), ["u", "x"], reader))
    assert batch.column("u").to_pylist() == [None, "a", "b"] and batch.column("x").to_pylist() == ["1", None, None]


def test_batches_smaller_than_arrows_name_their_first_row_in_the_file(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("u\n" + "".join(f"r{i}\n" for i in range(7)))
    got = [(first, b.column("u").to_pylist()) for first, b in iter_batches(str(path), ["u"], ReaderSpec(), 3)]
    assert got == [(0, ["r0", "r1", "r2"]), (3, ["r3", "r4", "r5"]), (6, ["r6"])]


def test_with_strip_a_null_value_padded_with_spaces_is_missing(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("u,x\n ? ,  \n a , 1 \n")
    reader = ReaderSpec(strip_whitespace=True, null_values=("", "?"))
    (_, batch), = list(iter_batches(str(path), ["u", "x"], reader))
    assert batch.column("u").to_pylist() == [None, "a"] and batch.column("x").to_pylist() == [None, "1"]


def test_pq_files_are_parquet():
    assert input_format("part-0.pq") == "parquet" and input_format("X.PQ") == "parquet"


def test_a_parquet_header_gives_columns_metadata_types_and_rows(tmp_path):
    table = pa.table({"id": pa.array([1, 2, 3], pa.int32()), "city": ["a", None, "c"]})
    table = table.replace_schema_metadata({b"k": b"v"})
    pq.write_table(table, tmp_path / "f.parquet")
    header = file_header(str(tmp_path / "f.parquet"), ReaderSpec())
    assert header.names == ["id", "city"]
    assert header.metadata[b"k"] == b"v"
    assert header.num_rows == 3
    assert header.types(["city", "id", "absent"]) == {"city": pa.string(), "id": pa.int32()}


def test_a_csv_header_has_text_columns_and_no_metadata_or_row_count(tmp_path):
    (tmp_path / "f.csv").write_text("id,city\n1,a\n2,b\n")
    header = file_header(str(tmp_path / "f.csv"), ReaderSpec())
    assert header.names == ["id", "city"]
    assert header.metadata is None and header.num_rows is None
    assert header.types(["id"]) == {"id": pa.string()}


def test_an_input_under_the_home_folder_is_read_from_there(tmp_path, monkeypatch):
    """'~/raw.csv' from a YAML value or a quoted argument, which no shell expanded: it was 'no input files found'."""
    from mmoe_rec.features.sources import resolve_inputs

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.csv").write_text("x\n1\n")
    assert resolve_inputs("~/raw/a.csv") == [str(tmp_path / "raw" / "a.csv")]
    assert resolve_inputs("~/raw") == [str(tmp_path / "raw" / "a.csv")]
    assert resolve_inputs("~/raw/*.csv") == [str(tmp_path / "raw" / "a.csv")]
