"""What the review of the feature pipeline found: id columns whose type changes between input files, uint64 ids
beyond int64, CSV and Parquet inputs that gave the same value different ids, ambiguous CSV headers, and a
hand-edited spec.json that kept its old version."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from mmoe_rec.features.build import main as features_main
from mmoe_rec.features.errors import FeatureDataError
from mmoe_rec.features.fit import fit
from mmoe_rec.features.schema import parse_schema
from mmoe_rec.features.sources import iter_batches
from mmoe_rec.features.spec import FeatureSpec
from mmoe_rec.features.transform import transform_table

SCHEMA = {
    "id_columns": ["rid"],
    "categorical": [{"name": "u"}, {"name": "h", "transform": "hash", "buckets": 1000}],
    "numeric": [{"name": "x"}],
    "tasks": [{"name": "click"}],
}


def _features(tmp_path, *inputs, schema=None):
    s = tmp_path / "s.yaml"
    s.write_text(yaml.safe_dump(schema or SCHEMA))
    out = tmp_path / "out"
    argv = ["--schema", str(s), "--output", str(out)] + [a for i in inputs for a in ("--input", str(i))]
    return features_main(argv), out


def _parquet(path, **cols):
    n = len(next(iter(cols.values())))
    cols.setdefault("u", ["a"] * n)
    cols.setdefault("h", ["a"] * n)
    cols.setdefault("x", [1.0] * n)
    cols.setdefault("click", [0] * n)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path)
    return path


# --- 1. id column types across input files ---

@pytest.mark.parametrize("later", [pa.array(["007", "8"]), pa.array([7.0, 8.0]), pa.array([7, 8], pa.uint64())],
                         ids=["string", "float", "uint64"])
def test_id_column_of_another_type_in_a_later_file_names_file_column_and_types(tmp_path, capsys, later):
    a = _parquet(tmp_path / "raw/a.parquet", rid=pa.array([1, 2], pa.int64()))
    b = _parquet(tmp_path / "raw/b.parquet", rid=later)
    rc, out = _features(tmp_path, f"train={a}", f"test={b}")
    err = capsys.readouterr().err
    assert rc == 1 and str(b) in err and "'rid'" in err and "int64" in err and str(later.type) in err
    assert not out.exists()


def test_id_column_is_widened_losslessly_whatever_file_comes_first(tmp_path):
    a = _parquet(tmp_path / "raw/a.parquet", rid=pa.array([1, 2], pa.int32()), name=pa.array(["p", "q"]))
    b = _parquet(tmp_path / "raw/b.parquet", rid=pa.array([2**40, 5], pa.int64()),
                 name=pa.array(["r", "p"]).dictionary_encode())
    c = _parquet(tmp_path / "raw/c.parquet", rid=pa.array([None, None], pa.null()), name=pa.array(["s", "t"]))
    schema = {**SCHEMA, "id_columns": ["rid", "name"]}
    rc, out = _features(tmp_path, f"train={c}", f"train={a}", f"test={b}", schema=schema)
    assert rc == 0
    train, test = pq.read_table(out / "train"), pq.read_table(out / "test")
    assert train.schema.field("rid").type == test.schema.field("rid").type == pa.int64()
    assert train.schema.field("name").type == test.schema.field("name").type == pa.string()
    assert train["rid"].to_pylist() == [None, None, 1, 2] and test["rid"].to_pylist() == [2**40, 5]
    assert test["name"].to_pylist() == ["r", "p"]
    empty = pq.read_table(out / "valid")  # an empty split gets the same id types
    assert empty.num_rows == 0 and empty.schema.field("rid").type == pa.int64()


# --- 2. uint64 categorical values beyond int64 ---

def test_uint64_categorical_beyond_int64_is_its_decimal_value_not_a_crash():
    big = 2**63 + 5
    schema = parse_schema(SCHEMA)
    t = pa.table({"rid": [1, 2, 3], "u": pa.array([10, big, big], pa.uint64()),
                  "h": pa.array([10, big, None], pa.uint64()), "x": [1.0, 2.0, 3.0], "click": [0, 1, 0]})
    spec = fit(schema, [t])
    assert sorted(map(str, spec.transforms["features"]["u"]["values"])) == sorted(["10", str(big)])
    out = transform_table(spec, t)
    as_text = transform_table(spec, t.set_column(1, "u", pa.array(["10", str(big), str(big)]))
                              .set_column(2, "h", pa.array(["10", str(big), None])))
    assert out["u"].to_pylist() == as_text["u"].to_pylist() and out["u"][1].as_py() != 0
    assert out["h"].to_pylist() == as_text["h"].to_pylist() and out["h"][2].as_py() == 0
    small = transform_table(spec, t.set_column(1, "u", pa.array([10, 10, 11], pa.int64())))
    assert small["u"].to_pylist()[:2] == [out["u"][0].as_py()] * 2 and small["u"][2].as_py() == 0


# --- 3. CSV and Parquet / pandas give the same ids ---

ROWS = {"rid": ["1", "2", "3", "4", "5", "6"], "u": ["10", "", "11", "10", "", "12"],
        "h": ["7", "", "8", "", "7", "9"], "x": ["1", "2", "3", "4", "5", "6"], "click": ["0", "1", "0", "1", "0", "1"]}


def _csv_text(cols: dict) -> str:
    names = list(cols)
    return ",".join(names) + "\n" + "".join(",".join(r) + "\n" for r in zip(*cols.values()))


def _csv_table(tmp_path, cols: dict, name="raw.csv") -> pa.Table:
    p = tmp_path / name
    p.write_text(_csv_text(cols))
    return pa.Table.from_batches([b for _, b in iter_batches(str(p), list(cols))])


@pytest.mark.parametrize("typed", [
    {"u": pa.array(["10", "", "11", "10", "", "12"]), "h": pa.array(["7", "", "8", "", "7", "9"])},
    {"u": pa.array([10.0, None, 11.0, 10.0, np.nan, 12.0]), "h": pa.array([7.0, np.nan, 8.0, None, 7.0, 9.0])},
], ids=["strings-with-empty", "floats-with-nan"])
@pytest.mark.parametrize("fit_on", ["csv", "parquet"])
def test_csv_and_parquet_of_the_same_rows_get_the_same_ids(tmp_path, typed, fit_on):
    schema = parse_schema(SCHEMA)
    from_csv = _csv_table(tmp_path, ROWS)
    parquet_path = tmp_path / "raw.parquet"
    pq.write_table(pa.table({"rid": [1, 2, 3, 4, 5, 6], **typed, "x": [1.0, 2, 3, 4, 5, 6],
                             "click": [0, 1, 0, 1, 0, 1]}), parquet_path)
    from_parquet = pq.read_table(parquet_path)
    spec = fit(schema, [from_csv if fit_on == "csv" else from_parquet])
    a, b = transform_table(spec, from_csv), transform_table(spec, from_parquet)
    assert a["u"].to_pylist() == b["u"].to_pylist() and a["h"].to_pylist() == b["h"].to_pylist()
    assert a["u"].to_pylist()[1] == a["u"].to_pylist()[4] == 0 and a["h"].to_pylist()[1] == 0  # "" is missing
    assert len(spec.transforms["features"]["u"]["values"]) == 3  # "" is no vocabulary value


@pytest.mark.parametrize("positive, negative", [(["True"], None), (["True"], ["False"])])
def test_a_bool_label_and_its_csv_text_match_declared_true_false_alike(tmp_path, positive, negative):
    """A bool Parquet label with `positive: ["True"]` was refused ("numeric label column, but the schema's
    positive/negative values ['True']/... are not numbers") where the same rows as CSV (pandas' "True") built."""
    schema = {**SCHEMA, "tasks": [{"name": "click", "positive": positive, "negative": negative}]}
    rows = {**ROWS, "click": ["True", "False", "True", "True", "False", "False"]}
    for name, table in (("csv", _csv_table(tmp_path, rows)),
                        ("parquet", pa.table({**{c: pa.array(v) for c, v in rows.items()},
                                              "click": pa.array([v == "True" for v in rows["click"]])}))):
        spec = fit(parse_schema(schema), [table])
        assert transform_table(spec, table)["label_click"].to_pylist() == [1, 0, 1, 1, 0, 0], name


def test_integral_float_strings_find_an_int_vocabulary(tmp_path):
    schema = parse_schema(SCHEMA)
    spec = fit(schema, [pa.table({"rid": [1, 2], "u": [10.0, 11.0], "h": ["a", "b"], "x": [1.0, 2.0],
                                  "click": [0, 1]})])
    assert spec.transforms["features"]["u"]["value_type"] == "int"
    csv = _csv_table(tmp_path, {"rid": ["1", "2", "3", "4", "5"], "u": ["10.0", "11", "1.1e1", "10.5", "x"],
                                "h": ["a"] * 5, "x": ["1"] * 5, "click": ["0"] * 5})
    ids = transform_table(spec, csv)["u"].to_pylist()
    want = transform_table(spec, pa.table({"rid": [1], "u": [10], "h": ["a"], "x": [1.0]}))["u"][0].as_py()
    assert ids[0] == want != 0 and ids[1] == ids[2] != 0 and ids[3] == ids[4] == 0


@pytest.mark.parametrize("words", [[], ["abc"]], ids=["numbers-only", "with-a-word"])
def test_integral_float_text_and_integers_fitted_together_are_one_value(tmp_path, words):
    """Parquet floats 7.0 / 10.0 (integers to the transform) and a CSV's "7.0", "10", "10.0" in one train split:
    the vocabulary held "7" and "7.0" as two values, so a CSV-trained row got an id Parquet rows never give."""
    schema = parse_schema(SCHEMA)
    parquet = pa.table({"rid": [1, 2], "u": [7.0, 10.0], "h": ["a", "b"], "x": [1.0, 2.0], "click": [0, 1]})
    texts = ["7.0", "10", "10.0", *words]
    n = len(texts)
    csv = _csv_table(tmp_path, {"rid": [str(i) for i in range(3, 3 + n)], "u": texts, "h": ["a"] * n,
                                "x": ["1"] * n, "click": ["0"] * n})
    spec = fit(schema, [parquet, csv])
    assert sorted(spec.transforms["features"]["u"]["values"]) == sorted(["7", "10", *words])
    assert spec.transforms["features"]["u"]["value_type"] == "mixed"
    p_ids, c_ids = transform_table(spec, parquet)["u"].to_pylist(), transform_table(spec, csv)["u"].to_pylist()
    assert c_ids[:3] == [p_ids[0], p_ids[1], p_ids[1]] and 0 not in p_ids + c_ids


def test_text_is_canonical_since_specs_record_it_and_as_written_before(tmp_path):
    """A spec fitted since 2026-12-06 (`canonical_text` on each categorical feature) takes a CSV's "10.0" / "1e1"
    as the integer 10 and "True" as a bool column's `true`, in fitting and transforming, for vocabularies and
    hashed features alike: pandas writes an int column with gaps as "10.0" and bools as "True", and the same rows
    read from Parquet or a DataFrame (10, true) found other ids. A spec fitted before keeps text as written."""
    schema = parse_schema({**SCHEMA, "categorical": [{"name": "u"}, {"name": "h", "transform": "hash",
                                                                    "buckets": 1000}]})
    rows = {"rid": ["1", "2", "3", "4", "5"], "u": ["10.0", "10", "20", "abc", "True"],
            "h": ["10.0", "10", "20", "abc", "True"], "x": ["1"] * 5, "click": ["0", "1", "0", "1", "0"]}
    spec = fit(schema, [_csv_table(tmp_path, rows)])
    assert sorted(spec.transforms["features"]["u"]["values"]) == ["10", "20", "abc", "true"]
    later = {"rid": [str(i) for i in range(6)], "u": ["10", "10.0", "1e1", "20.00", "abc", "TRUE"],
             "h": ["10", "10.0", "1e1", "20.00", "abc", "TRUE"], "x": ["1"] * 6, "click": ["0"] * 6}
    csv = transform_table(spec, _csv_table(tmp_path, later, name="later.csv"))
    frame = transform_table(spec, pa.table({"rid": list(range(4)), "u": [10.0, 20.0, None, 10.0],
                                            "h": [10.0, 20.0, None, 10.0], "x": [1.0] * 4, "click": [0] * 4}))
    flags = transform_table(spec, pa.table({"rid": [1], "u": [True], "h": [True], "x": [1.0], "click": [0]}))
    for name in ("u", "h"):
        ids = csv[name].to_pylist()
        assert ids[0] == ids[1] == ids[2] != 0 and ids[3] != 0 and ids[3] != ids[0] and ids[4] != 0
        assert frame[name].to_pylist() == [ids[0], ids[3], 0, ids[0]]
        assert flags[name].to_pylist() == [ids[5]] and ids[5] != 0
    assert spec.transforms["format"] == 2  # an mmoe-rec that reads format 1 only refuses it (other ids)
    # a spec fitted before: no canonical_text, text as written ("10.0", "1e1", "20.00" no entry of the vocabulary)
    old = spec.to_dict()
    old.pop("version")
    old["transforms"]["format"] = 1
    for state in old["transforms"]["features"].values():
        state.pop("canonical_text", None)
    old["transforms"]["features"]["u"]["values"] = ["10", "20", "abc", "True"]
    old_spec = FeatureSpec.from_dict(old)
    ids = transform_table(old_spec, _csv_table(tmp_path, later, name="later.csv"))["u"].to_pylist()
    assert ids[0] != 0 and ids[1:4] == [0, 0, 0] and ids[4] != 0 and ids[5] == 0
    h = transform_table(old_spec, _csv_table(tmp_path, later, name="later.csv"))["h"].to_pylist()
    assert len(set(h[:3])) == 3
    # `text: as_written` (codes whose text matters): fitted and transformed as written, in a spec of today's format
    written = parse_schema({**SCHEMA, "categorical": [{"name": "u", "text": "as_written"},
                                                      {"name": "h", "transform": "hash", "buckets": 1000,
                                                       "text": "as_written"}]})
    spec_w = fit(written, [_csv_table(tmp_path, rows)])
    assert sorted(spec_w.transforms["features"]["u"]["values"]) == ["10", "10.0", "20", "True", "abc"]
    ids = transform_table(spec_w, _csv_table(tmp_path, later, name="later.csv"))
    assert ids["u"].to_pylist()[1] != ids["u"].to_pylist()[0] and len(set(ids["h"].to_pylist()[:3])) == 3
    # Parquet integers and CSV text in one split: still as written ("250.0" is not 250; it had been folded)
    mixed = fit(written, [pa.table({"rid": [1, 2], "u": [250, 251], "h": ["a", "b"], "x": [1.0, 2.0],
                                    "click": [0, 1]}),
                          _csv_table(tmp_path, {"rid": ["3", "4", "5"], "u": ["250.0", "250", "007"], "h": ["a"] * 3,
                                                "x": ["1"] * 3, "click": ["0", "1", "0"]}, name="mixed.csv")])
    assert sorted(mixed.transforms["features"]["u"]["values"]) == ["007", "250", "250.0", "251"]
    text_ids = transform_table(mixed, pa.table({"rid": [1, 2], "u": ["250.0", "250"], "h": ["a", "a"], "x": [1.0] * 2,
                                                "click": [0, 0]}))["u"].to_pylist()
    int_ids = transform_table(mixed, pa.table({"rid": [1], "u": [250], "h": ["a"], "x": [1.0], "click": [0]}))
    assert text_ids[0] != text_ids[1] == int_ids["u"].to_pylist()[0] != 0
    with pytest.raises(FeatureDataError, match="text must be one of"):
        parse_schema({**SCHEMA, "categorical": [{"name": "u", "text": "raw"}]})


def test_float_text_past_2_53_finds_no_neighbouring_integer(tmp_path):
    # float64 holds integers exactly only up to 2**53: "9007199254740993.0" would round to ...992's entry
    big = 2**53
    spec = fit(parse_schema(SCHEMA), [pa.table({"rid": [1, 2], "u": [big, big + 2], "h": ["a", "b"], "x": [1.0, 2.0],
                                                "click": [0, 1]})])
    csv = _csv_table(tmp_path, {"rid": ["1", "2", "3"], "u": [f"{big}", f"{big + 1}.0", f"{big + 2}"],
                                "h": ["a"] * 3, "x": ["1"] * 3, "click": ["0"] * 3})
    ids = transform_table(spec, csv)["u"].to_pylist()
    assert ids[0] != 0 and ids[2] != 0 and ids[1] == 0


# --- 5. CSV headers ---

@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"], ids=["plain", "bom"])
def test_a_csv_row_that_is_not_utf8_is_named_by_file_column_and_data_row(tmp_path, capsys, bom):
    """Arrow said 'unreadable or truncated csv file (In CSV column #1: Row #4: ...)': a column index, a line number
    (or none after a quoted line end), and a file that is neither."""
    path = tmp_path / "raw.csv"
    # data row 0 holds a latin-1 byte in a column the schema does not read ("note"): Arrow never decodes it
    path.write_bytes(bom + b'rid,u,note,h,x,click\r\n1,a,\xe9t\xe9,a,1,0\r\n\r\n2,"two\nlines",,a,2,1\n'
                     b'3,caf\xe9,,a,3,0\n4,d,,a,4,1\n')
    rc, _ = _features(tmp_path, path)
    err = capsys.readouterr().err
    assert rc == 1 and f"file {path}, column 'u', row 2 (0-based): not UTF-8 text" in err, err


def test_csv_with_a_needed_column_twice_in_the_header_is_refused(tmp_path, capsys):
    p = tmp_path / "dup.csv"
    p.write_text("rid,u,h,x,click,x\n1,a,b,1,0,2\n")
    rc, out = _features(tmp_path, f"train={p}")
    err = capsys.readouterr().err
    assert rc == 1 and str(p) in err and "'x'" in err and "twice" in err


def _twice(table: pa.Table, column: str) -> pa.Table:
    return pa.Table.from_arrays(list(table.columns) + [table[column]], names=table.column_names + [column])


def test_in_memory_rows_naming_a_needed_column_twice_are_refused_as_a_file_is():
    """A Table or DataFrame naming a column twice reached pyarrow (KeyError 'Field "x" exists 2 times in schema',
    ValueError 'Duplicate column names found'): refused naming the source and the column, as a file is."""
    rows = pa.table({"rid": [1, 2, 3], "u": ["a", "b", "a"], "h": ["a"] * 3, "x": [1.0, 2.0, 3.0], "click": [0, 1, 0]})
    spec = fit(parse_schema(SCHEMA), rows)
    for twice in (_twice(rows, "x"), _twice(rows, "x").to_pandas()):
        with pytest.raises(FeatureDataError, match=r"^file batch\.parquet, column 'x': the input names this column "
                                                   r"twice"):
            transform_table(spec, twice, with_labels=False, file="batch.parquet")
        with pytest.raises(FeatureDataError, match=r"column 'x': the input names this column twice"):
            fit(parse_schema(SCHEMA), twice)


def test_in_memory_rows_naming_an_unread_column_twice_are_read_as_without_it():
    rows = pa.table({"rid": [1, 2, 3], "u": ["a", "b", "a"], "h": ["a"] * 3, "x": [1.0, 2.0, 3.0], "click": [0, 1, 0]})
    spec = fit(parse_schema(SCHEMA), rows)
    noted = rows.append_column("note", pa.array(["p", "q", "r"]))
    for twice in (_twice(noted, "note"), _twice(noted, "note").to_pandas()):
        assert fit(parse_schema(SCHEMA), twice).version == spec.version
        assert transform_table(spec, twice).equals(transform_table(spec, rows))


def test_csv_header_that_differs_from_reader_column_names_is_refused(tmp_path, capsys):
    schema = {**SCHEMA, "reader": {"header": True, "column_names": ["rid", "u", "h", "x", "click"]}}
    good, bad = tmp_path / "good.csv", tmp_path / "bad.csv"
    good.write_text("rid,u,h,x,click\n1,a,b,1,0\n")
    bad.write_text("rid,h,u,x,click\n2,a,b,1,0\n")  # u and h swapped: the names would be given to other columns
    rc, out = _features(tmp_path, f"train={good}", f"test={bad}", schema=schema)
    err = capsys.readouterr().err
    assert rc == 1 and str(bad) in err and "column_names" in err
    rc, out = _features(tmp_path, f"train={good}", schema=schema)
    assert rc == 0


# --- 6. spec.json version ---

def test_hand_edited_spec_json_is_refused_and_an_unedited_one_loads(tmp_path):
    schema = parse_schema(SCHEMA)
    spec = fit(schema, [pa.table({"rid": [1, 2], "u": ["a", "b"], "h": ["a", "b"], "x": [1.5, 2.25],
                                  "click": [0, 1]})])
    spec.save(tmp_path / "spec.json")
    assert FeatureSpec.load(tmp_path).version == spec.version
    d = json.loads((tmp_path / "spec.json").read_text())
    d["transforms"]["features"]["u"]["values"] = ["b", "a"]
    (tmp_path / "spec.json").write_text(json.dumps(d))
    with pytest.raises(FeatureDataError, match="version") as e:
        FeatureSpec.load(tmp_path)
    assert str(tmp_path / "spec.json") in str(e.value)
    d.pop("version")  # a spec written without a version gets its content hash
    assert FeatureSpec.from_dict(d).version not in ("", spec.version)


def test_a_spec_json_of_another_format_or_shape_is_an_error_naming_the_file(tmp_path):
    """A newer format, a format written as text, a missing part or an entry of the wrong shape: each refused by a
    message naming spec.json (a bare KeyError or an unnamed ValueError before)."""
    schema = parse_schema(SCHEMA)
    spec = fit(schema, [pa.table({"rid": [1, 2], "u": ["a", "b"], "h": ["a", "b"], "x": [1.5, 2.25],
                                  "click": [0, 1]})])
    good = spec.to_dict()
    path = tmp_path / "spec.json"
    cases = {
        "format 2 is not supported": {**good, "format": 2},
        "format '1' is not supported": {**good, "format": str(good["format"])},
        # a newer mmoe-rec's transforms (keys this one would ignore: other ids without a word)
        "transforms have format 3, this mmoe-rec reads formats 1 to 2": {
            **good, "transforms": {**good["transforms"], "format": 3}},
        "transforms have format True": {**good, "transforms": {**good["transforms"], "format": True}},
        "has no 'sparse_features'": {k: v for k, v in good.items() if k != "sparse_features"},
        "not a valid feature spec": {**good, "tasks": ["click"]},
        "a JSON object was expected, not list": [good],
    }
    for message, content in cases.items():
        path.write_text(json.dumps(content))
        with pytest.raises(FeatureDataError, match=message) as e:
            FeatureSpec.load(tmp_path)
        assert str(path) in str(e.value)


def test_fit_takes_a_pandas_frame_or_one_table_and_names_anything_else():
    """fit(schema, df) iterated the frame's column names ("'str' object has no attribute 'column_names'")."""
    import pandas as pd

    schema = parse_schema(SCHEMA)
    frame = pd.DataFrame({"rid": [1, 2, 3], "u": ["a", "b", "a"], "h": ["x", "y", "x"], "x": [1.0, 2.0, 3.0],
                          "click": [0, 1, 0]})
    from_frame, from_list = fit(schema, frame), fit(schema, [frame])
    from_table = fit(schema, pa.Table.from_pandas(frame, preserve_index=False))
    assert from_frame.version == from_list.version == from_table.version
    with pytest.raises(TypeError, match="fit takes pyarrow Tables / RecordBatches or pandas DataFrames, got dict"):
        fit(schema, [{"u": ["a"]}])
