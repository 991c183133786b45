"""reader.strip_whitespace applies whatever the input's format: single-valued categorical strings of a Parquet file
or a DataFrame (pandas keeps a CSV's ", " padding: ' Private') are trimmed like the CSV reader's fields, at fit and
at transform, and a value that is one of reader.null_values once trimmed is missing. Without strip_whitespace the
padded values stay distinct values."""
from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from mmoe_rec.features.build import main as features_main
from mmoe_rec.features.spec import FeatureSpec
from mmoe_rec.features.transform import transform_table

WORKERS = ["Private", "Self-emp", "Private", "Never worked", "Private", "Self-emp"]
INCOME = ["- 50000.", "50000+.", "- 50000.", "- 50000.", "50000+.", "- 50000."]


def _schema(tmp_path, strip: bool, null_values=("",)):
    schema = {
        "id_columns": ["rid"],
        "categorical": [{"name": "worker"}, {"name": "hashed", "column": "worker", "transform": "hash",
                                             "buckets": 1000}],
        "numeric": [{"name": "x"}],
        "tasks": [{"name": "income", "positive": ["50000+."], "negative": ["- 50000."]}],
        "reader": {"strip_whitespace": strip, "null_values": list(null_values)},
    }
    path = tmp_path / f"schema_{strip}.yaml"
    path.write_text(yaml.safe_dump(schema))
    return path


def _raw(workers, income=INCOME) -> pa.Table:
    n = len(workers)
    return pa.table({"rid": pa.array(range(n), pa.int64()), "worker": pa.array(workers),
                     "x": pa.array([float(i) for i in range(n)]), "income": pa.array(income)})


def _build(tmp_path, name, table, strip, **kw):
    raw = tmp_path / f"{name}.parquet"
    pq.write_table(table, raw)
    out = tmp_path / name
    assert features_main(["--schema", str(_schema(tmp_path, strip, **kw)), "--input", f"train={raw}",
                          "--output", str(out)]) == 0
    return FeatureSpec.load(out / "spec.json"), pq.read_table(out / "train")


def test_padded_parquet_strings_fit_and_transform_like_the_trimmed_values_under_strip_whitespace(tmp_path):
    padded = [" " + w for w in WORKERS]  # as pandas.read_csv gives a census field: ' Private'
    spec_p, feats_p = _build(tmp_path, "padded", _raw(padded), strip=True)
    spec_t, feats_t = _build(tmp_path, "trimmed", _raw(WORKERS), strip=True)
    # fit: the vocabulary holds the trimmed values, the same as fitted on the trimmed rows
    assert spec_p.transforms["features"]["worker"]["values"] == ["Private", "Self-emp", "Never worked"]
    assert spec_p.version == spec_t.version
    # transform (the build's pass 2, dictionary-encoded Parquet): the ids of the trimmed values, none OOV
    assert feats_p.column("worker").to_pylist() == feats_t.column("worker").to_pylist() == [1, 2, 1, 3, 1, 2]
    assert feats_p.column("hashed").to_pylist() == feats_t.column("hashed").to_pylist()
    # transform of a DataFrame / plain-string Arrow table at scoring time: the same ids
    for rows in (pd.DataFrame({"rid": range(6), "worker": padded, "x": 1.0}),
                 pa.table({"rid": list(range(6)), "worker": [w + "  " for w in WORKERS], "x": [1.0] * 6})):
        got = transform_table(spec_t, rows, with_labels=False)  # fitted on trimmed rows (a CSV's), as scoring does
        assert got.column("worker").to_pylist() == [1, 2, 1, 3, 1, 2]
        assert got.column("hashed").to_pylist() == feats_t.column("hashed").to_pylist()
    # without strip_whitespace the padded values stay values of their own
    plain = [" Private", "Private", " Private", "Self-emp", "Private ", "Self-emp"]
    spec, feats = _build(tmp_path, "plain", _raw(plain), strip=False)
    assert sorted(spec.transforms["features"]["worker"]["values"]) == [" Private", "Private", "Private ", "Self-emp"]
    ids = feats.column("worker").to_pylist()
    assert ids[0] == ids[2] and len({ids[0], ids[1], ids[4], ids[3]}) == 4 and 0 not in ids
    got = transform_table(spec, pd.DataFrame({"rid": [0, 1], "worker": [" Private", "Private"], "x": 1.0}))
    assert got.column("worker").to_pylist() == ids[:2]


def test_padded_text_labels_match_the_schema_values_under_strip_whitespace(tmp_path):
    _, feats = _build(tmp_path, "labels", _raw(WORKERS, [" " + v + " " for v in INCOME]), strip=True)
    assert feats.column("label_income").to_pylist() == [0, 1, 0, 0, 1, 0]


def test_a_null_value_once_trimmed_is_missing_in_parquet_as_in_csv(tmp_path):
    workers = [" Private", " ?", "?", " Self-emp", " Private", "  ? "]
    spec, feats = _build(tmp_path, "nulls", _raw(workers), strip=True, null_values=("", "?"))
    assert spec.transforms["features"]["worker"]["values"] == ["Private", "Self-emp"]  # "?" is no value
    assert feats.column("worker").to_pylist() == [1, 0, 0, 2, 1, 0]
    csv = tmp_path / "nulls.csv"
    rows = "".join(f"{i},{w},1.0,{y}\n" for i, (w, y) in enumerate(zip(workers, INCOME)))
    csv.write_text("rid,worker,x,income\n" + rows)
    out = tmp_path / "nulls_csv"
    assert features_main(["--schema", str(_schema(tmp_path, True, ("", "?"))), "--input", f"train={csv}",
                          "--output", str(out)]) == 0
    assert pq.read_table(out / "train").column("worker").to_pylist() == [1, 0, 0, 2, 1, 0]



def _csv_and_parquet_builds(tmp_path, schema: dict, columns: dict[str, list]):
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump(schema))
    n = len(next(iter(columns.values())))
    csv = tmp_path / "raw.csv"
    names = ["rid", *columns, "y"]
    csv.write_text(",".join(names) + "\n" + "".join(
        ",".join([str(i), *(columns[c][i] for c in columns), str(i % 2)]) + "\n" for i in range(n)))
    parquet = tmp_path / "raw.parquet"
    pq.write_table(pa.table({"rid": list(range(n)), **columns, "y": [i % 2 for i in range(n)]}), parquet)
    built = {}
    for name, raw in (("csv", csv), ("parquet", parquet)):
        out = tmp_path / name
        assert features_main(["--schema", str(tmp_path / "schema.yaml"), "--input", f"train={raw}",
                              "--output", str(out)]) == 0
        built[name] = (FeatureSpec.load(out / "spec.json"), pq.read_table(out / "train").to_pydict())
    return built


def test_a_null_value_in_a_delimited_list_or_a_numeric_text_is_missing_in_parquet_as_in_csv(tmp_path):
    # the CSV reader nulls a field that is a null value before it is split or parsed; from Parquet or a DataFrame a
    # delimited "?" was the list ["?"] (an id of its own) and a numeric "?" an error at scoring
    schema = {"id_columns": ["rid"],
              "categorical": [{"name": "tags", "multi_valued": True, "delimiter": "|"}],
              "numeric": [{"name": "x", "missing_indicator": True}],
              "tasks": [{"name": "y"}],
              "reader": {"strip_whitespace": True, "null_values": ["", "?"]}}
    tags, xs = ["a|?", " ? ", "b", "?", "a|b"], ["1.0", "?", "2.5", " ? ", "3"]
    built = _csv_and_parquet_builds(tmp_path, schema, {"tags": tags, "x": xs})
    (spec, csv_rows), (parquet_spec, parquet_rows) = built["csv"], built["parquet"]
    assert parquet_spec.version == spec.version
    for column in ("tags", "x", "x_missing"):
        assert parquet_rows[column] == csv_rows[column], column
    assert [len(t) for t in csv_rows["tags"]] == [2, 0, 1, 0, 2] and csv_rows["x_missing"] == [0, 1, 0, 1, 0]
    frame = transform_table(spec, pd.DataFrame({"rid": range(5), "tags": tags, "x": xs}))
    assert frame.column("tags").to_pylist() == csv_rows["tags"] and frame.column("x").to_pylist() == csv_rows["x"]


def test_a_null_value_with_spaces_in_it_is_matched_as_written_as_the_csv_reader_does(tmp_path):
    # the CSV reader matches the field as written, then (strip) trimmed: a null value " ?" matched only trimmed
    # text in Parquet, so "?" got an id of its own and a numeric " ?" was an error
    schema = {"id_columns": ["rid"], "categorical": [{"name": "c"}, {"name": "t", "multi_valued": True,
                                                                     "delimiter": "|"}],
              "numeric": [{"name": "x", "missing_indicator": True}], "tasks": [{"name": "y"}],
              "reader": {"strip_whitespace": True, "null_values": ["", " ?"]}}
    built = _csv_and_parquet_builds(tmp_path, schema, {"c": ["a", " ?", "b"], "t": ["a|b", " ?", "b"],
                                                       "x": ["1", " ?", "2"]})
    (spec, csv_rows), (parquet_spec, parquet_rows) = built["csv"], built["parquet"]
    assert csv_rows["c"][1] == 0 and csv_rows["t"][1] == [] and csv_rows["x_missing"] == [0, 1, 0]
    assert parquet_spec.version == spec.version and all(parquet_rows[k] == csv_rows[k] for k in ("c", "t", "x"))


def test_without_strip_a_padded_number_is_not_a_null_value(tmp_path):
    # null value "-1": the CSV reader keeps " -1" (strip off) as the number -1; Parquet text must too
    schema = {"id_columns": ["rid"], "numeric": [{"name": "x", "missing_indicator": True}], "tasks": [{"name": "y"}],
              "reader": {"strip_whitespace": False, "null_values": ["", "-1"]}}
    built = _csv_and_parquet_builds(tmp_path, schema, {"x": [" 5", " -1", "-1", " 7"]})
    (spec, csv_rows), (parquet_spec, parquet_rows) = built["csv"], built["parquet"]
    assert csv_rows["x_missing"] == [0, 0, 1, 0] == parquet_rows["x_missing"]
    assert parquet_spec.version == spec.version and parquet_rows["x"] == csv_rows["x"]


def test_a_spec_fitted_before_delimited_null_fields_keeps_its_ids(tmp_path):
    # specs fitted before 2026-12-06 kept a delimited Parquet "?" as the value "?": their models were trained so,
    # and score so still (the feature's state has no null_fields)
    schema = {"id_columns": ["rid"], "categorical": [{"name": "t", "multi_valued": True, "delimiter": "|"}],
              "tasks": [{"name": "y"}], "reader": {"strip_whitespace": True, "null_values": ["", "?"]}}
    spec, _ = _csv_and_parquet_builds(tmp_path, schema, {"t": ["a|?", "?", "b"]})["parquet"]
    assert spec.transforms["features"]["t"]["null_fields"] is True
    frame = pd.DataFrame({"rid": [0, 1], "t": ["?", "a"]})
    assert transform_table(spec, frame).column("t").to_pylist()[0] == []
    old = spec.to_dict()
    del old["transforms"]["features"]["t"]["null_fields"]
    old.pop("version")
    old_spec = FeatureSpec.from_dict(old)
    question = old_spec.transforms["features"]["t"]["values"].index("?") + 1
    assert transform_table(old_spec, frame).column("t").to_pylist()[0] == [question]


def test_without_strip_a_whole_delimited_null_field_is_an_empty_list_as_in_csv(tmp_path):
    schema = {"id_columns": ["rid"], "categorical": [{"name": "t", "multi_valued": True, "delimiter": "|"}],
              "tasks": [{"name": "y"}], "reader": {"strip_whitespace": False, "null_values": ["", "?", " NA "]}}
    built = _csv_and_parquet_builds(tmp_path, schema, {"t": [" a|b", "?", " NA ", "b", " ?"]})
    (spec, csv_rows), (parquet_spec, parquet_rows) = built["csv"], built["parquet"]
    assert csv_rows["t"][1:3] == [[], []] and len(csv_rows["t"][4]) == 1  # " ?" is no null value without strip
    assert parquet_spec.version == spec.version and parquet_rows["t"] == csv_rows["t"]


def test_blank_null_values_record_nothing_and_keep_the_spec_version(tmp_path):
    # the marker is written only where it can change an id: a schema with the default null value "" and a
    # delimited feature keeps the version its specs had
    schema = {"id_columns": ["rid"], "categorical": [{"name": "t", "multi_valued": True, "delimiter": "|"}],
              "numeric": [{"name": "x"}], "tasks": [{"name": "y"}],
              "reader": {"strip_whitespace": True, "null_values": ["", "  "]}}
    spec, _ = _csv_and_parquet_builds(tmp_path, schema, {"t": ["a|b", "b"], "x": ["1", "2"]})["csv"]
    assert "null_fields" not in spec.transforms["features"]["t"]
    assert "null_numbers" not in spec.transforms["features"]["x"]


def test_a_spec_fitted_before_numeric_null_values_keeps_reading_a_number_as_that_number(tmp_path):
    # null value "-1": a spec fitted before read a Parquet text "-1" as the number -1 (its mean and std include it);
    # it still does. A new fit reads it as missing (as the CSV reader does) and records that (null_numbers)
    schema = {"id_columns": ["rid"], "numeric": [{"name": "x", "missing_indicator": True}], "tasks": [{"name": "y"}],
              "reader": {"strip_whitespace": True, "null_values": ["", "-1", "?"]}}
    spec, rows = _csv_and_parquet_builds(tmp_path, schema, {"x": ["5", "-1", "3", "7"]})["parquet"]
    assert spec.transforms["features"]["x"]["null_numbers"] is True and rows["x_missing"] == [0, 1, 0, 0]
    old = spec.to_dict()
    del old["transforms"]["features"]["x"]["null_numbers"]
    old.pop("version")
    old_spec = FeatureSpec.from_dict(old)
    frame = pd.DataFrame({"rid": [0, 1, 2], "x": ["-1", "?", "5"]})
    assert transform_table(old_spec, frame).column("x_missing").to_pylist() == [0, 1, 0]  # "?" was an error
    assert transform_table(spec, frame).column("x_missing").to_pylist() == [1, 1, 0]


def test_without_strip_a_single_valued_null_value_is_missing_in_parquet_as_in_csv(tmp_path):
    """null_values ["", "?"] without strip: the CSV reader read "?" as missing (id 0), a Parquet file's "?" was a
    category of its own (another vocabulary, another spec version, a hash bucket). Recorded as null_fields; a spec
    fitted before keeps its ids."""
    schema = {"id_columns": ["rid"], "categorical": [{"name": "c"}, {"name": "h", "column": "c", "transform": "hash",
                                                       "buckets": 50}],
              "tasks": [{"name": "y"}], "reader": {"strip_whitespace": False, "null_values": ["", "?"]}}
    built = _csv_and_parquet_builds(tmp_path, schema, {"c": ["a", "?", "b", " ?", "a"]})
    (spec, csv_rows), (parquet_spec, parquet_rows) = built["csv"], built["parquet"]
    assert csv_rows["c"][1] == 0 and csv_rows["h"][1] == 0 and csv_rows["c"][3] != 0  # " ?": no null value here
    assert parquet_spec.version == spec.version
    assert all(parquet_rows[k] == csv_rows[k] for k in ("c", "h", "label_y"))
    assert spec.transforms["features"]["c"]["null_fields"] is True
    frame = pd.DataFrame({"rid": [0], "c": ["?"]})
    assert transform_table(spec, frame).column("h").to_pylist() == [0]
    old = spec.to_dict()
    for name in ("c", "h"):
        del old["transforms"]["features"][name]["null_fields"]
    old.pop("version")
    assert transform_table(FeatureSpec.from_dict(old), frame).column("h").to_pylist() != [0]  # "?" hashed
