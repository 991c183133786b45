"""Raw Parquet columns of unusual but realistic Arrow types: each gives the features of its plainly typed equivalent,
or is refused in one line naming the file and the column (never a pyarrow traceback, never other values)."""
from __future__ import annotations

import decimal
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmoe_rec.features.build import main as features_main

N = 30
SCHEMA = {"id_columns": ["rid"],
          "categorical": [{"name": "c"}, {"name": "h", "transform": "hash", "buckets": 97}, {"name": "k"},
                          {"name": "m", "multi_valued": True}],
          "numeric": [{"name": "x"}],
          "tasks": [{"name": "y"}]}
CV = [None if i == 3 else f"u{i % 7}" for i in range(N)]
KV = [None if i == 5 else (i * 7) % 9 for i in range(N)]
XV = [None if i == 7 else 0.25 * i - 3.0 for i in range(N)]
MV = [None if i == 2 else [f"t{j}" for j in range(i % 3)] for i in range(N)]


def plain() -> pa.Table:
    return pa.table({"rid": pa.array(range(N), pa.int64()), "c": pa.array(CV), "h": pa.array(CV),
                     "k": pa.array(KV, pa.int64()), "m": pa.array(MV, pa.list_(pa.string())),
                     "x": pa.array(XV, pa.float64()), "y": pa.array([i % 2 for i in range(N)], pa.int8())})


def _with(column: str, arr) -> pa.Table:
    t = plain()
    return t.set_column(t.column_names.index(column), column, arr)


def _build(tmp_path, table: pa.Table, *extra: str) -> tuple[int, pa.Table | None]:
    (tmp_path / "in").mkdir(parents=True)
    (tmp_path / "s.yaml").write_text(json.dumps(SCHEMA))
    pq.write_table(table, tmp_path / "in" / "a.parquet", row_group_size=7)
    rc = features_main(["--schema", str(tmp_path / "s.yaml"), "--input", f"train={tmp_path / 'in'}",
                        "--output", str(tmp_path / "out"), *extra])
    return rc, (pq.read_table(tmp_path / "out" / "train").sort_by("rid") if rc == 0 else None)


VARIANTS = {
    "int8 ids": lambda: _with("k", plain()["k"].cast(pa.int8())),
    "uint64 ids": lambda: _with("k", plain()["k"].cast(pa.uint64())),
    "float64 ids with nulls": lambda: _with("k", plain()["k"].cast(pa.float64())),
    "float16 ids": lambda: _with("k", plain()["k"].cast(pa.float16())),
    "integer text ids": lambda: _with("k", plain()["k"].cast(pa.string())),
    "dictionary of ints": lambda: _with("k", plain()["k"].dictionary_encode()),
    "large_string": lambda: _with("c", plain()["c"].cast(pa.large_string())),
    "string_view": lambda: _with("c", plain()["c"].cast(pa.string_view())),
    "dictionary of strings": lambda: _with("c", plain()["c"].dictionary_encode()),
    "hashed dictionary": lambda: _with("h", plain()["h"].dictionary_encode()),
    "large_list of large_string": lambda: _with("m", plain()["m"].cast(pa.large_list(pa.large_string()))),
    "float32 numbers": lambda: _with("x", plain()["x"].cast(pa.float32())),  # XV are exact in float32
    "decimal numbers": lambda: _with("x", pa.array([None if v is None else decimal.Decimal(repr(v)) for v in XV],
                                                   pa.decimal128(20, 4))),
    "numeric text": lambda: _with("x", pa.array([None if v is None else repr(v) for v in XV], pa.large_string())),
    "bool label": lambda: _with("y", plain()["y"].cast(pa.bool_())),
    "decimal label": lambda: _with("y", plain()["y"].cast(pa.decimal128(5, 2))),
    "uint64 row ids": lambda: _with("rid", plain()["rid"].cast(pa.uint64())),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_an_unusually_typed_parquet_column_gives_the_features_of_its_plain_type(tmp_path, variant):
    rc, want = _build(tmp_path / "plain", plain())
    assert rc == 0
    rc, got = _build(tmp_path / "variant", VARIANTS[variant](), "--batch-rows", "8")
    assert rc == 0
    for column in want.column_names:
        if column != "rid":
            assert got[column].to_pylist() == want[column].to_pylist(), column


@pytest.mark.parametrize("column, arr, reason", [
    ("k", pa.array([None if v is None else decimal.Decimal(v) for v in KV], pa.decimal128(38, 0)), "decimal128"),
    ("c", pa.array([None if v is None else v.encode() for v in CV], pa.binary()), "binary"),
    ("k", pa.array(range(N), pa.timestamp("s", tz="UTC")), "timestamp"),
    ("c", pa.array([{"a": i} for i in range(N)]), "struct"),
    ("x", pa.array(range(N), pa.date32()), "date32"),
    ("m", pa.array([["a", "b"]] * N, pa.list_(pa.string(), 2)), "fixed_size_list"),
])
def test_an_unsupported_column_type_is_refused_naming_file_column_and_type(tmp_path, capsys, column, arr, reason):
    rc, _ = _build(tmp_path, _with(column, arr))
    err = capsys.readouterr().err
    assert rc == 1 and "a.parquet" in err and f"column '{column}'" in err and reason in err and "Traceback" not in err


@pytest.mark.parametrize("batch_rows", ["64", "3", "5"])
def test_dictionaries_that_differ_between_row_groups_give_the_ids_of_plain_strings(tmp_path, batch_rows):
    """pandas `category` columns written group by group: each row group has a dictionary of its own (other values,
    other order, nulls), and a batch may span two groups."""
    groups = [(["a", "b", None, "a"], ["x|y", None, "", "y"]), (["zz", "b", "b", None], ["q", "x|q", None, "x"]),
              (["", " a", "a", "c"], ["y|y", "x", "z", ""])]
    schema = {"id_columns": ["rid"], "categorical": [{"name": "c"}, {"name": "ch", "column": "c", "transform": "hash",
                                                                     "buckets": 1000},
                                                    {"name": "d", "multi_valued": True, "delimiter": "|"}],
              "tasks": [{"name": "y"}]}
    parts = [pa.table({"rid": pa.array(range(4 * g, 4 * g + 4), pa.int64()), "c": pa.array(c), "d": pa.array(d),
                       "y": pa.array([0, 1, 0, 1], pa.int8())}) for g, (c, d) in enumerate(groups)]
    (tmp_path / "s.yaml").write_text(json.dumps(schema))
    for name, encode in (("plain", False), ("dict", True)):
        (tmp_path / name).mkdir()
        tables = [p.set_column(1, "c", p["c"].dictionary_encode()).set_column(2, "d", p["d"].dictionary_encode())
                  if encode else p for p in parts]
        with pq.ParquetWriter(tmp_path / name / "f.parquet", tables[0].schema) as w:
            for t in tables:
                w.write_table(t)
        assert features_main(["--schema", str(tmp_path / "s.yaml"), "--input", f"train={tmp_path / name}",
                              "--output", str(tmp_path / f"out_{name}"), "--batch-rows", batch_rows]) == 0
    assert pq.ParquetFile(tmp_path / "dict" / "f.parquet").metadata.num_row_groups == 3
    got, want = (pq.read_table(tmp_path / f"out_{n}" / "train").sort_by("rid") for n in ("dict", "plain"))
    assert got.select(["c", "ch", "d"]).equals(want.select(["c", "ch", "d"]))
