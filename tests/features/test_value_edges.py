"""Edge values and inputs: integers beyond 2**53, numbers too large for the statistics or for float32, labels of
CSV columns matched as number as well as text, whitespace around null values and delimiters, an input inside the
output directory, and single-file inputs that share one random split."""
from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmoe_rec.features.build import main as features_main
from mmoe_rec.features.errors import FeatureDataError
from mmoe_rec.features.schema import load_schema
from mmoe_rec.features.spec import FeatureSpec
from mmoe_rec.features.transform import transform_table


def _build(tmp_path, schema: dict | str, *inputs, extra=()):
    s = tmp_path / "s.yaml"
    s.write_text(schema if isinstance(schema, str) else json.dumps(schema))  # JSON is YAML
    out = tmp_path / "out"
    argv = ["--schema", str(s), "--output", str(out), *extra] + [x for i in inputs for x in ("--input", str(i))]
    return features_main(argv), out


def _build_csv(tmp_path, text: str, schema: str):
    """A train split from CSV text, built with `schema` (YAML)."""
    raw = tmp_path / "raw.csv"
    raw.write_text(text)
    return _build(tmp_path, schema, f"train={raw}")


def _parquet(path, **cols):
    pq.write_table(pa.table(cols), path)
    return path


def test_integers_beyond_2_53_are_rounded_not_refused(tmp_path):
    big = 2 ** 53 + 1  # a safe cast to float64 refuses it
    raw = _parquet(tmp_path / "raw.parquet", x=pa.array([big, 1, 2, big], pa.int64()),
                   n=pa.array([2 ** 64 - 1, 0, 5, 7], pa.uint64()), y=pa.array([big, 0, 1, 2], pa.int64()),
                   w=pa.array([big, 1, 1, 1], pa.int64()))
    schema = {"numeric": [{"name": "x", "transform": "none"}, {"name": "n"}],
              "tasks": [{"name": "y", "type": "regression"}], "sample_weight": "w"}
    rc, out = _build(tmp_path, schema, f"train={raw}")
    assert rc == 0
    t = pq.read_table(out / "train")
    assert t["x"].to_pylist()[0] == t["label_y"].to_pylist()[0] == t["sample_weight"].to_pylist()[0] == 2.0 ** 53
    assert np.isfinite(t["n"].to_numpy()).all()


def test_values_too_large_for_the_train_statistics_are_an_error_naming_the_column(tmp_path, capsys):
    raw = _parquet(tmp_path / "raw.parquet", x=[1e300, -1e300, 1e300, 2.0], y=[0, 1, 0, 1])
    rc, out = _build(tmp_path, {"numeric": [{"name": "x"}], "tasks": [{"name": "y"}]}, f"train={raw}")
    err = capsys.readouterr().err
    assert rc == 1 and "column 'x'" in err and "too large" in err, err
    assert not out.exists()


@pytest.mark.parametrize("column", ["x", "y", "w"])
def test_a_value_beyond_float32_is_an_error_naming_file_column_and_row(tmp_path, capsys, column):
    cols = {"x": [1.0, 2.0, 3.0, 4.0], "y": [0.5, 1.0, 2.0, 3.0], "w": [1.0, 1.0, 1.0, 1.0]}
    cols[column] = [1.0, 2.0, 1e39, 4.0]  # finite in float64, inf in float32
    raw = _parquet(tmp_path / "raw.parquet", **cols)
    schema = {"numeric": [{"name": "x", "transform": "none"}], "tasks": [{"name": "y", "type": "regression"}],
              "sample_weight": "w"}
    rc, out = _build(tmp_path, schema, f"train={raw}")
    err = capsys.readouterr().err
    assert rc == 1 and f"file {raw}, column '{column}', row 2 (0-based)" in err and "float32" in err, err
    assert not out.exists()


# --- labels: positive values match a CSV column's text as a number too ---

@pytest.mark.parametrize("positive, negative, labels", [
    ("[1]", "", ["1.0", "0.0", "1.0"]),
    ("[1.0]", "", ["1", "0", "1"]),
    ("[1]", ", negative: [0]", ["1.0", "0", "1"]),
    ("['50000+.']", ", negative: ['- 50000.']", ["50000+.", "- 50000.", " 50000+."]),  # text stays text
])
def test_numeric_positive_values_match_the_numbers_of_a_string_column(tmp_path, positive, negative, labels):
    schema = f"reader: {{strip_whitespace: true}}\ncategorical: [{{name: c}}]\n" \
             f"tasks: [{{name: y, type: binary, positive: {positive}{negative}}}]\n"
    rc, out = _build_csv(tmp_path, "c,y\n" + "".join(f"c{i},{v}\n" for i, v in enumerate(labels)), schema)
    assert rc == 0
    assert pq.read_table(out / "train")["label_y"].to_pylist() == [1.0, 0.0, 1.0]


@pytest.mark.parametrize("value", ["yes", "no", "true", "on"])
def test_an_unquoted_yaml_boolean_label_value_is_refused_with_a_quoting_hint(tmp_path, value):
    s = tmp_path / "s.yaml"
    s.write_text(f"categorical: [{{name: c}}]\ntasks: [{{name: y, positive: [x], negative: [{value}]}}]\n")
    with pytest.raises(FeatureDataError, match=r"YAML boolean.*quote it \(\"yes\""):
        load_schema(s)


@pytest.mark.parametrize("tasks, rows, missing", [
    ("positive: ['Yes']", ["yes", "no", "yes"], "positive"),
    ("positive: ['a'], negative: ['b']", ["a", "a", "a"], "negative"),
])
def test_a_train_split_without_positive_or_negative_rows_is_an_error(tmp_path, capsys, tasks, rows, missing):
    schema = f"categorical: [{{name: c}}]\ntasks: [{{name: y, column: lab, type: binary, {tasks}}}]\n"
    rc, out = _build_csv(tmp_path, "c,lab\n" + "".join(f"c{i},{v}\n" for i, v in enumerate(rows)), schema)
    err = capsys.readouterr().err
    assert rc == 1 and f"column 'lab': binary task 'y' has no {missing} row in the train split" in err, err
    assert f"'{rows[0]}'" in err  # a value seen
    assert not out.exists()


# --- whitespace: null values and delimited pieces ---

def test_a_null_value_with_whitespace_around_it_is_missing_when_stripping(tmp_path):
    schema = "reader: {strip_whitespace: true, null_values: ['?']}\ncategorical: [{name: c}]\n" \
             "numeric: [{name: x}]\ntasks: [{name: y}]\n"
    rc, out = _build_csv(tmp_path, "c,x,y\na, 1.5,1\n ? , ?,0\nb,2.5,1\n", schema)
    assert rc == 0
    t = pq.read_table(out / "train")
    assert t["c"].to_pylist()[1] == 0 and t["x_missing"].to_pylist() == [0.0, 1.0, 0.0]


def test_delimited_pieces_are_trimmed_when_stripping(tmp_path):
    schema = "reader: {strip_whitespace: true}\ncategorical: [{name: tags, multi_valued: true, delimiter: '|'}]\n" \
             "tasks: [{name: y}]\n"
    rc, out = _build_csv(tmp_path, "tags,y\n a|b ,1\na | b,0\nb|a,1\n", schema)
    assert rc == 0
    spec = FeatureSpec.load(out)
    assert sorted(spec.transforms["features"]["tags"]["values"]) == ["a", "b"]
    ids = pq.read_table(out / "train")["tags"].to_pylist()
    assert ids[0] == ids[1] == ids[2][::-1] and 0 not in ids[0]
    # the same pieces from a DataFrame at scoring time, and through the dictionary path of a Parquet column
    assert transform_table(spec, pd.DataFrame({"tags": ["a | b"]}), with_labels=False)["tags"].to_pylist() == [ids[0]]
    d = pa.table({"tags": pa.array(["a | b", " b|a"]).dictionary_encode()})
    assert transform_table(spec, d, with_labels=False)["tags"].to_pylist() == [ids[0], ids[2]]


# --- inputs and the output directory ---

@pytest.mark.parametrize("where", ["out/raw.csv", "out/sub/raw.csv"])
def test_overwrite_refuses_an_output_that_holds_an_input(tmp_path, capsys, where):
    raw = tmp_path / where
    raw.parent.mkdir(parents=True)
    raw.write_text("c,y\na,1\nb,0\n")
    rc, out = _build(tmp_path, "categorical: [{name: c}]\ntasks: [{name: y}]\n", f"train={raw}",
                     extra=["--overwrite"])
    err = capsys.readouterr().err
    assert rc == 1 and str(raw) in err and str(out) in err and "inside the output directory" in err, err
    assert raw.read_text() == "c,y\na,1\nb,0\n"


def _rows_csv(path, first: int, n: int = 50):
    path.write_text("rid,c,y\n" + "".join(f"{first + i},c{i % 3},{i % 2}\n" for i in range(n)))
    return path


def test_single_file_inputs_split_at_random_get_a_warning(tmp_path, caplog):
    a, b = _rows_csv(tmp_path / "a.csv", 0), _rows_csv(tmp_path / "b.csv", 1000)
    schema = "id_columns: [rid]\ncategorical: [{name: c}]\ntasks: [{name: y}]\n"
    with caplog.at_level(logging.WARNING, logger="mmoe_rec.features.build"):
        rc, _ = _build(tmp_path, schema, a, b, extra=["--valid-fraction", "0.2"])
    assert rc == 0
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and str(a) in warned[0] and str(b) in warned[0] and "same split" in warned[0]
    assert "\n" not in warned[0]


@pytest.mark.parametrize("inputs", [["train={a}", "valid+test={b}"], ["{a}"], ["{d}"]])
def test_no_warning_without_two_single_file_random_inputs(tmp_path, caplog, inputs):
    d = tmp_path / "d"
    d.mkdir()
    a, b = _rows_csv(d / "a.csv", 0), _rows_csv(d / "b.csv", 1000)
    schema = "id_columns: [rid]\ncategorical: [{name: c}]\ntasks: [{name: y}]\n"
    with caplog.at_level(logging.WARNING, logger="mmoe_rec.features.build"):
        rc, _ = _build(tmp_path, schema, *[i.format(a=a, b=b, d=d) for i in inputs],
                       extra=["--valid-fraction", "0.2"] if "=" not in inputs[0] else [])
    assert rc == 0 and not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_an_integer_column_against_a_text_vocabulary_is_refused_not_scored_out_of_vocabulary(tmp_path):
    """Label-encoded (or already-transformed) input for a vocabulary fitted on text: every row would silently be
    out of vocabulary. A vocabulary with integer texts still takes an integer column (7 is its "7")."""
    raw = _parquet(tmp_path / "raw.parquet", device=["android", "ios", "web", "ios"], zip=["7", "12", "7", "12"],
                   y=[0, 1, 0, 1])
    schema = {"categorical": [{"name": "device"}, {"name": "zip"}], "tasks": [{"name": "y"}]}
    rc, out = _build(tmp_path, schema, f"train={raw}")
    assert rc == 0
    spec = FeatureSpec.load(out / "spec.json")
    good = pd.DataFrame({"device": ["ios", "web"], "zip": ["12", "7"]})
    want = transform_table(spec, good, with_labels=False)
    as_ints = transform_table(spec, good.assign(zip=[12, 7]), with_labels=False)
    assert as_ints.column("zip").to_pylist() == want.column("zip").to_pylist() != [0, 0]
    with pytest.raises(FeatureDataError, match=r"column 'device'.*int64.*out of vocabulary"):
        transform_table(spec, good.assign(device=[1, 2]), with_labels=False)
    nulls = transform_table(spec, good.assign(device=pd.array([None, None], dtype="Int64")), with_labels=False)
    assert nulls.column("device").to_pylist() == [0, 0]  # no values: missing, as before


def test_string_view_columns_read_as_strings():
    """pyarrow writes string_view columns to Parquet and reads them back so: they were refused as no categorical
    (string or integer) column. Ids, numbers and labels as from plain strings."""
    from mmoe_rec.features.fit import fit
    from mmoe_rec.features.schema import parse_schema

    schema = parse_schema({"categorical": [{"name": "u"}, {"name": "tags", "multi_valued": True, "delimiter": "|"}],
                           "numeric": [{"name": "p"}],
                           "tasks": [{"name": "buy", "positive": ["yes"], "negative": ["no"]}]})
    plain = pa.table({"u": ["a", "b", "a"], "tags": ["x|y", "y", "x"], "p": ["1", "2", "3.5"],
                      "buy": ["yes", "no", "yes"]})
    view = pa.table({c: plain[c].cast(pa.string_view()) for c in plain.column_names})
    spec = fit(schema, plain)
    assert transform_table(spec, view).equals(transform_table(spec, plain))
    assert fit(schema, view).version == spec.version
    dict_view = view.set_column(0, "u", view["u"].dictionary_encode())
    assert transform_table(spec, dict_view).equals(transform_table(spec, plain))


def test_a_string_view_id_column_builds_and_is_written_as_string(tmp_path):
    """The build's split step had no kernel for string_view ids (a traceback), and a string_view file beside a
    string one was "an id column must have one type"."""
    schema = {"id_columns": ["rid"], "categorical": [{"name": "u"}], "tasks": [{"name": "click"}]}
    (tmp_path / "s.yaml").write_text(json.dumps(schema))
    view = pa.table({"rid": pa.array([f"r{i}" for i in range(40)], pa.string_view()),
                     "u": pa.array(["a", "b"] * 20, pa.string_view()), "click": [0, 1] * 20})
    (tmp_path / "raw").mkdir()
    pq.write_table(view, tmp_path / "raw" / "a.parquet")
    pq.write_table(view.set_column(0, "rid", view["rid"].cast(pa.string())), tmp_path / "raw" / "b.parquet")
    assert features_main(["--schema", str(tmp_path / "s.yaml"), "--input", str(tmp_path / "raw"), "--output",
                          str(tmp_path / "out"), "--valid-fraction", "0.25", "--test-fraction", "0.25"]) == 0
    out = pa.concat_tables([pq.read_table(tmp_path / "out" / s) for s in ("train", "valid", "test")])
    assert out.schema.field("rid").type == pa.string() and out.num_rows == 80
