"""sources: reading raw CSV as the schema's reader says (null values, row numbers of small batches, trimmed nulls)
and the formats recognized by name (gaps a mutation review found, 2026-12-07)."""
from __future__ import annotations

from mmoe_rec.features.schema import ReaderSpec
from mmoe_rec.features.sources import input_format, iter_batches


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
