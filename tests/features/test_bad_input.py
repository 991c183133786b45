"""Each kind of bad input gives one FeatureDataError naming file, column and row, and leaves no output."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmoe_rec.features.build import main as features_main
from mmoe_rec.features.columns import label_values, weight_column
from mmoe_rec.features.errors import FeatureDataError
from mmoe_rec.features.schema import load_schema

CENSUS_LIKE = {
    "categorical": [{"name": "city"}],
    "numeric": [{"name": "amount"}],
    "tasks": [{"name": "income", "column": "income", "type": "binary", "positive": ["50000+."],
               "negative": ["- 50000."]}],
}


def _run(tmp_path, schema_file, *inputs):
    out = tmp_path / "out"
    argv = ["--schema", str(schema_file), "--output", str(out)] + [x for i in inputs for x in ("--input", str(i))]
    return features_main(argv), out


def _assert_clean(tmp_path, out):
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]  # no half-written output


def _csv(tmp_path, rows: list[str], name="raw.csv"):
    p = tmp_path / name
    p.write_text("city,amount,income\n" + "".join(r + "\n" for r in rows))
    return p


def _good_rows(n=50):
    return [f"c{i % 3},{i}.5,{'50000+.' if i % 4 == 0 else '- 50000.'}" for i in range(n)]


def test_good_csv_builds(feat, tmp_path):
    rc, out = _run(tmp_path, feat.write_schema(tmp_path / "s.yaml", CENSUS_LIKE), _csv(tmp_path, _good_rows()))
    assert rc == 0 and (out / "spec.json").exists()


def test_missing_column(feat, tmp_path, capsys):
    raw = feat.write_parquet(tmp_path / "raw.parquet", feat.raw_table(20).drop_columns(["price"]))
    rc, out = _run(tmp_path, feat.write_schema(tmp_path / "s.yaml"), raw)
    err = capsys.readouterr().err
    assert rc == 1 and str(raw) in err and "'price'" in err and "missing column" in err
    _assert_clean(tmp_path, out)
    # every missing column at once, not one a run
    two = feat.write_parquet(tmp_path / "two.parquet", feat.raw_table(20).drop_columns(["price", "user"]))
    rc, out = _run(tmp_path, feat.write_schema(tmp_path / "s.yaml"), two)
    err = capsys.readouterr().err
    assert rc == 1 and f"file {two}: missing columns 'user', 'price' (the file has" in err, err
    _assert_clean(tmp_path, out)


def test_wrong_type_value_in_numeric_csv_column_names_the_row(feat, tmp_path, capsys):
    rows = _good_rows()
    rows[37] = "c1,abc,- 50000."
    raw = _csv(tmp_path, rows)
    rc, out = _run(tmp_path, feat.write_schema(tmp_path / "s.yaml", CENSUS_LIKE), raw)
    err = capsys.readouterr().err
    assert rc == 1 and f"file {raw}, column 'amount', row 37 (0-based): expected a number, found 'abc'" in err
    _assert_clean(tmp_path, out)


def test_wrong_column_type_in_parquet(feat, tmp_path, capsys):
    t = feat.raw_table(20)
    t = t.set_column(t.schema.get_field_index("price"), "price", t["tags"])  # a list where a number belongs
    raw = feat.write_parquet(tmp_path / "raw.parquet", t)
    rc, out = _run(tmp_path, feat.write_schema(tmp_path / "s.yaml"), raw)
    err = capsys.readouterr().err
    assert rc == 1 and str(raw) in err and "'price'" in err and "expected a numeric column" in err
    _assert_clean(tmp_path, out)


def test_label_outside_allowed_values(feat, tmp_path, capsys):
    rows = _good_rows(80)
    rows[61] = "c0,1.0,50000"
    raw = _csv(tmp_path, rows)
    rc, out = _run(tmp_path, feat.write_schema(tmp_path / "s.yaml", CENSUS_LIKE), raw)
    err = capsys.readouterr().err
    assert rc == 1 and f"file {raw}, column 'income', row 61 (0-based): label value '50000'" in err
    _assert_clean(tmp_path, out)


def test_nan_label(feat, tmp_path, capsys):
    t = feat.raw_table(300)
    dwell = t["dwell"].to_numpy().copy()
    dwell[257] = np.nan
    t = t.set_column(t.schema.get_field_index("dwell"), "dwell", pa.array(dwell))
    raw = feat.write_parquet(tmp_path / "raw.parquet", t, row_group_size=100)
    rc, out = _run(tmp_path, feat.write_schema(tmp_path / "s.yaml"), raw)
    err = capsys.readouterr().err
    assert rc == 1 and f"file {raw}, column 'dwell', row 257 (0-based): label is NaN" in err
    _assert_clean(tmp_path, out)


@pytest.mark.parametrize("negative", [None, [0]])
def test_a_nan_text_label_is_an_error_when_the_labels_are_numbers(feat, tmp_path, capsys, negative):
    """`positive: [1]` alone counted a CSV's "NaN" as a negative; the same rows from a float column were an error."""
    raw = tmp_path / "raw.csv"
    raw.write_text("city,amount,buy\n" + "".join(f"c{i % 3},{i},{'NaN' if i == 70 else i % 2}\n" for i in range(90)))
    task = {"name": "buy", "type": "binary", "positive": [1], **({"negative": negative} if negative else {})}
    schema = {**CENSUS_LIKE, "tasks": [task]}
    rc, out = _run(tmp_path, feat.write_schema(tmp_path / "s.yaml", schema), raw)
    err = capsys.readouterr().err
    assert rc == 1 and f"file {raw}, column 'buy', row 70 (0-based): label is NaN ('NaN')" in err
    _assert_clean(tmp_path, out)


def test_binary_label_not_zero_or_one(feat, tmp_path, capsys):
    t = feat.raw_table(30)
    click = t["click"].to_numpy().copy()
    click[12] = 2
    t = t.set_column(t.schema.get_field_index("click"), "click", pa.array(click))
    raw = feat.write_parquet(tmp_path / "raw.parquet", t)
    rc, _ = _run(tmp_path, feat.write_schema(tmp_path / "s.yaml"), raw)
    assert rc == 1 and "column 'click', row 12 (0-based): binary label must be 0 or 1" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["empty_file", "header_only", "zero_row_parquet"])
def test_empty_input(feat, tmp_path, capsys, kind):
    if kind == "empty_file":
        raw = tmp_path / "raw.csv"
        raw.write_text("")
    elif kind == "header_only":
        raw = _csv(tmp_path, [])
    else:
        raw = feat.write_parquet(tmp_path / "raw.parquet", feat.raw_table(5).slice(0, 0))
    schema = CENSUS_LIKE if kind != "zero_row_parquet" else None
    rc, out = _run(tmp_path, feat.write_schema(tmp_path / "s.yaml", schema), raw)
    err = capsys.readouterr().err
    assert rc == 1 and "empty" in err and str(raw) in err
    _assert_clean(tmp_path, out)


def test_an_empty_csv_beside_parquet_is_reported_as_empty_not_as_text_ids(feat, tmp_path, capsys):
    """The id columns' types are planned before any row is read: a CSV's were taken as text without opening the
    file, which clashed with the Parquet file's int64 ids ("id column of type string here, int64 in ...")."""
    feat.write_parquet(tmp_path / "raw" / "a.parquet", feat.raw_table(20))
    (tmp_path / "raw" / "b.csv").write_text("")
    rc, out = _run(tmp_path, feat.write_schema(tmp_path / "s.yaml"), tmp_path / "raw")
    err = capsys.readouterr().err
    assert rc == 1 and f"file {tmp_path / 'raw' / 'b.csv'}: empty input file" in err, err
    _assert_clean(tmp_path, out)


def test_truncated_parquet(feat, tmp_path, capsys):
    good = feat.write_parquet(tmp_path / "a.parquet", feat.raw_table(200))
    data = good.read_bytes()
    bad = tmp_path / "b.parquet"
    bad.write_bytes(data[: len(data) // 2])
    rc, out = _run(tmp_path, feat.write_schema(tmp_path / "s.yaml"), good, bad)
    err = capsys.readouterr().err
    assert rc == 1 and f"file {bad}" in err and "unreadable Parquet" in err
    _assert_clean(tmp_path, out)


def test_unknown_transform_in_schema(feat, tmp_path, capsys):
    schema = dict(CENSUS_LIKE, numeric=[{"name": "amount", "transform": "zscore"}])
    path = feat.write_schema(tmp_path / "s.yaml", schema)
    with pytest.raises(FeatureDataError, match=r"column 'amount'.*unknown numeric transform 'zscore'"):
        load_schema(path)
    rc, out = _run(tmp_path, path, _csv(tmp_path, _good_rows()))
    assert rc == 1 and f"file {path}" in capsys.readouterr().err
    _assert_clean(tmp_path, out)


def test_existing_output_is_left_alone_on_error(feat, tmp_path):
    good = _csv(tmp_path, _good_rows())
    schema = feat.write_schema(tmp_path / "s.yaml", CENSUS_LIKE)
    rc, out = _run(tmp_path, schema, good)
    before = sorted(p.name for p in out.rglob("*"))
    bad = _csv(tmp_path, _good_rows() + ["c1,2.0,maybe"], name="bad.csv")
    argv = ["--schema", str(schema), "--output", str(out), "--input", str(bad), "--overwrite"]
    assert features_main(argv) == 1
    assert sorted(p.name for p in out.rglob("*")) == before


@pytest.mark.parametrize("when", ["during the fit", "during the transform"])
def test_an_input_rewritten_while_the_build_reads_it_is_refused(feat, tmp_path, monkeypatch, capsys, when):
    """The build reads each input twice, fit then transform: a file another job rewrote meanwhile was transformed
    with a spec fitted on its old rows (every id out of vocabulary, prices thousands of standard deviations, the
    spec's train_rows 50 against 53 rows written), without an error. Rewritten while the transform reads it, it
    is refused too: which rows were read cannot be told."""
    import mmoe_rec.features.build as build_mod

    raw = _csv(tmp_path, _good_rows())
    patched, name = (build_mod.SpecFitter, "update") if when == "during the fit" else (build_mod, "cast_ids")
    step = getattr(patched, name)

    def rewrite_then_step(*args, **kwargs):
        if raw.read_text().startswith("city,amount,income\nc0"):  # once
            raw.write_text("city,amount,income\n" + "".join(f"zz{i},1000.0,- 50000.\n" for i in range(53)))
        return step(*args, **kwargs)

    monkeypatch.setattr(patched, name, rewrite_then_step)
    rc, out = _run(tmp_path, feat.write_schema(tmp_path / "s.yaml", CENSUS_LIKE), raw)
    err = capsys.readouterr().err
    assert rc == 1 and f"file {raw}: changed while the build read it" in err, err
    assert ("fitted spec" in err) == (when == "during the transform")  # refused before the transform pass
    _assert_clean(tmp_path, out)


@pytest.mark.parametrize("clash,names", [
    ({"numeric": [{"name": "amount"}, {"name": "amount_missing", "column": "city"}]},
     ("missing indicator of numeric feature 'amount'", "numeric feature 'amount_missing'")),
    ({"categorical": [{"name": "city"}, {"name": "label_income", "column": "city", "buckets": 8}]},
     ("categorical feature 'label_income'", "label of task 'income'")),
    ({"id_columns": ["sample_weight"], "sample_weight": "w"}, ("id column 'sample_weight'", "sample weight")),
])
def test_schema_output_name_collision_is_an_error_naming_both(feat, tmp_path, clash, names):
    path = feat.write_schema(tmp_path / "s.yaml", dict(CENSUS_LIKE, **clash))
    with pytest.raises(FeatureDataError) as e:
        load_schema(path)
    msg = str(e.value)
    assert str(path) in msg and all(n in msg for n in names), msg


def test_schema_without_indicator_may_use_the_indicator_name(feat, tmp_path):
    schema = dict(CENSUS_LIKE, numeric=[{"name": "amount", "missing_indicator": False},
                                        {"name": "amount_missing", "column": "amount", "transform": "log1p"}])
    load_schema(feat.write_schema(tmp_path / "s.yaml", schema))


@pytest.mark.parametrize("bad", ["inf", "-inf", "1e999", "parquet_inf"])
def test_non_finite_number_names_file_column_and_row(feat, tmp_path, capsys, bad):
    if bad == "parquet_inf":
        t = feat.raw_table(50)
        price = t["price"].to_numpy().copy()
        price[23] = np.inf
        raw = feat.write_parquet(tmp_path / "raw.parquet", t.set_column(t.schema.get_field_index("price"), "price",
                                                                           pa.array(price)))
        schema, where, shown = None, f"file {raw}, column 'price', row 23 (0-based)", "inf"
    else:
        rows = _good_rows()
        rows[41] = f"c1,{bad},- 50000."
        raw, schema = _csv(tmp_path, rows), CENSUS_LIKE
        where, shown = f"file {raw}, column 'amount', row 41 (0-based)", repr(bad)
    rc, out = _run(tmp_path, feat.write_schema(tmp_path / "s.yaml", schema), raw)
    err = capsys.readouterr().err
    assert rc == 1 and f"{where}: expected a finite number, found {shown}" in err, err
    _assert_clean(tmp_path, out)


def test_bad_value_in_multi_valued_column_names_its_row_and_plain_value(feat, tmp_path, capsys):
    tags = pa.array([[1.0, 2.0], [], [3.0], [4.0, 5.0], None, [6.5], [7.0]], pa.list_(pa.float64()))
    raw = feat.write_parquet(tmp_path / "raw.parquet", pa.table({"tags": tags, "y": [0, 1, 0, 1, 0, 1, 0]}))
    schema = {"categorical": [{"name": "tags", "multi_valued": True}], "tasks": [{"name": "y"}]}
    rc, out = _run(tmp_path, feat.write_schema(tmp_path / "s.yaml", schema), raw)
    err = capsys.readouterr().err  # 6.5 is the 6th flat value, in row 5
    assert rc == 1 and (f"file {raw}, column 'tags', row 5 (0-based): expected a categorical value, "
                        "found the non-integral number 6.5") in err, err
    _assert_clean(tmp_path, out)


@pytest.mark.parametrize("header", [True, False])
def test_csv_row_with_wrong_field_count_names_the_row(feat, tmp_path, capsys, header):
    rows = _good_rows(3000)
    rows[2345] = "c1,7.5"  # a field short
    raw = tmp_path / "raw.csv"
    raw.write_text(("city,amount,income\n" if header else "") + "".join(r + "\n" for r in rows))
    schema = CENSUS_LIKE if header else dict(CENSUS_LIKE, reader={"header": False,
                                                                  "column_names": ["city", "amount", "income"]})
    rc, out = _run(tmp_path, feat.write_schema(tmp_path / "s.yaml", schema), raw)
    err = capsys.readouterr().err
    assert rc == 1 and f"file {raw}, row 2345 (0-based): malformed CSV row: expected 3 fields, found 2 ('c1,7.5')" in err, err
    assert "unreadable or truncated" not in err
    _assert_clean(tmp_path, out)


@pytest.mark.parametrize("suffix", [".tsv", ".tsv.gz", ".tsv.bz2", ".tsv.xz"])
def test_compressed_tsv_is_read_tab_separated(feat, tmp_path, suffix):
    import bz2
    import gzip
    import lzma

    text = "city\tamount\tincome\n" + "".join(r.replace(",", "\t") + "\n" for r in _good_rows())
    raw = tmp_path / f"raw{suffix}"
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(raw.suffix, open)
    with opener(raw, "wt") as f:
        f.write(text)
    csv = _csv(tmp_path, _good_rows())
    schema = feat.write_schema(tmp_path / "s.yaml", CENSUS_LIKE)
    assert features_main(["--schema", str(schema), "--output", str(tmp_path / "tsv"), "--input", str(raw)]) == 0
    assert features_main(["--schema", str(schema), "--output", str(tmp_path / "csv"), "--input", str(csv)]) == 0
    assert pq.read_table(tmp_path / "tsv/train").equals(pq.read_table(tmp_path / "csv/train"))


@pytest.mark.parametrize("second", ["valid+test={dir}/./raw.csv", "train={dir}/raw*.csv"])
def test_a_file_given_by_two_inputs_is_refused_not_read_twice(feat, tmp_path, capsys, second):
    # read twice, its rows would be duplicated in train, or the same rows would be in train and in valid / test
    raw = _csv(tmp_path, _good_rows())
    schema = feat.write_schema(tmp_path / "s.yaml", CENSUS_LIKE)
    rc, out = _run(tmp_path, schema, f"train={raw}", second.format(dir=tmp_path))
    err = capsys.readouterr().err
    assert rc == 1 and "given twice" in err and "raw.csv" in err
    _assert_clean(tmp_path, out)


@pytest.mark.parametrize("prefix", ["train:0+valid:0", "train+train"])
def test_split_weights_that_cannot_split_are_refused(feat, tmp_path, capsys, prefix):
    raw = _csv(tmp_path, _good_rows())
    rc, out = _run(tmp_path, feat.write_schema(tmp_path / "s.yaml", CENSUS_LIKE), f"{prefix}={raw}")
    assert rc == 1 and "split weights" in capsys.readouterr().err
    _assert_clean(tmp_path, out)


@pytest.mark.parametrize("weight", [".", "0.1."])
def test_a_split_weight_that_is_no_number_is_refused_naming_the_input(feat, tmp_path, capsys, weight):
    raw = _csv(tmp_path, _good_rows())
    arg = f"train:{weight}+valid:1={raw}"
    rc, out = _run(tmp_path, feat.write_schema(tmp_path / "s.yaml", CENSUS_LIKE), arg)
    err = capsys.readouterr().err
    assert rc == 1 and f"--input {arg!r}" in err and f"{weight!r}, is not a number" in err
    _assert_clean(tmp_path, out)


def _partitioned_raw(tmp_path) -> Path:
    """raw/day1.csv (30 rows), raw/day=2/part-0.csv (20 rows), and raw/_tmp/part-9.csv (7 rows: to be passed over)."""
    raw = tmp_path / "raw"
    (raw / "day=2").mkdir(parents=True)
    (raw / "_tmp").mkdir()
    _csv(raw, _good_rows(30), "day1.csv")
    _csv(raw / "day=2", _good_rows(20), "part-0.csv")
    _csv(raw / "_tmp", _good_rows(7), "part-9.csv")
    return raw


def test_a_folder_input_reads_its_subfolders_and_refuses_a_file_it_cannot_read(feat, tmp_path, capsys):
    """A folder's files below its top level (a partition folder `day=2/`) were passed over, and so were files of
    an unknown format: their rows were lost without a word. Now every file below the folder is read, names that
    start with "." or "_" (`_SUCCESS`, `_tmp/`) passed over as in the scoring job, and any other file must be
    readable."""
    raw = _partitioned_raw(tmp_path)
    (raw / "_SUCCESS").write_text("")
    (raw / ".day1.csv.crc").write_text("x")
    schema = feat.write_schema(tmp_path / "s.yaml", CENSUS_LIKE)
    rc, out = _run(tmp_path, schema, f"train={raw}")
    assert rc == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"]["train"] == 50
    (source,) = manifest["inputs"]
    assert [Path(f).relative_to(raw).as_posix() for f in source["files"]] == ["day1.csv", "day=2/part-0.csv"]

    (raw / "day=3.csv.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    for arg in (raw, f"{raw}/*"):
        rc, out2 = _run(tmp_path / "again", schema, f"train={arg}")
        err = capsys.readouterr().err
        assert rc == 1 and f"file {raw / 'day=3.csv.zst'}: unknown input format" in err and str(arg) in err, err



def test_a_hive_partition_glob_is_a_path_when_written_with_dot_slash(feat, tmp_path, monkeypatch):
    """`--input 'day=*/part.csv'` reads as a split prefix `day=`: the error says how to give it as a path."""
    from mmoe_rec.features.build import parse_input

    for day in (1, 2):
        (tmp_path / f"day={day}").mkdir()
        _csv(tmp_path / f"day={day}", _good_rows(5), "part.csv")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FeatureDataError, match=r"unknown split 'day'.*written \./day=\*/part\.csv"):
        parse_input("day=*/part.csv", None, 0.1, 0.1)
    assert len(parse_input("./day=*/part.csv", None, 0.1, 0.1).files) == 2


def test_an_output_inside_its_input_folder_is_passed_over_and_globs_read_partition_folders(feat, tmp_path, capsys):
    """`--input raw --output raw/features`: the rerun read the first run's output as input (refused as an unknown
    format since folders are read whole). The build's own output is passed over; another feature folder inside
    the input is named as such. A glob `raw/*` reads what a matched folder holds, and skips `_`/`.` names below
    its root as a folder input does."""
    from mmoe_rec.features.build import Source, parse_input

    raw = _partitioned_raw(tmp_path)
    schema = feat.write_schema(tmp_path / "s.yaml", CENSUS_LIKE)
    argv = ["--schema", str(schema), "--input", f"train={raw}", "--output", str(raw / "features")]
    assert features_main(argv) == 0
    assert features_main([*argv, "--overwrite"]) == 0, capsys.readouterr().err
    assert json.loads((raw / "features" / "manifest.json").read_text())["rows"]["train"] == 50
    rc = features_main(["--schema", str(schema), "--input", f"train={raw}", "--output", str(tmp_path / "other")])
    err = capsys.readouterr().err
    assert rc == 1 and f"it is in {raw / 'features'}, a feature folder `mmoe-rec features` wrote" in err, err

    shutil.rmtree(raw / "features")
    glob_source = parse_input(f"train={raw}/*", None, 0, 0)
    assert glob_source.keys == ("day1.csv", "day=2/part-0.csv")
    # made in Python without keys: files of two partition folders with one name keep distinct split keys
    _csv(raw, _good_rows(5), "part-0.csv")
    plain = Source((str(raw / "part-0.csv"), str(raw / "day=2" / "part-0.csv")), "random", ("train", "valid"),
                   (0.5, 0.5))
    assert [plain.key(0), plain.key(1)] == ["part-0.csv", "day=2/part-0.csv"]


# Gaps a mutation review found (2026-12-07): a label of 0.5, a weight just below 0
def test_a_binary_label_between_0_and_1_is_refused():
    with pytest.raises(FeatureDataError, match="binary label must be 0 or 1"):
        label_values(pa.array([0.0, 0.5, 1.0]), "y", {"type": "binary", "positive": None})


def test_a_slightly_negative_weight_is_refused():
    with pytest.raises(FeatureDataError, match="sample weight is negative"):
        weight_column(pa.array([1.0, -0.5]), "w")


def test_a_train_split_whose_sample_weights_are_all_zero_is_refused(feat, tmp_path, capsys):
    """Every weighted loss 0: `mmoe-rec fit` trained nothing and exited 0 (review 2026-12-07). Zero weights on some
    train rows, or on every row of the other splits, are fine."""
    schema = feat.write_schema(tmp_path / "s.yaml", {**CENSUS_LIKE, "sample_weight": "w"})
    rows = _good_rows(40)

    def raw(weights, name):
        p = tmp_path / name
        p.write_text("city,amount,income,w\n" + "".join(f"{r},{w}\n" for r, w in zip(rows, weights)))
        return p

    zero = raw([0] * 40, "zero.csv")
    rc, out = _run(tmp_path, schema, f"train={zero}")
    err = capsys.readouterr().err
    assert rc == 1 and "column 'w'" in err and "every one of the 40 train rows has sample weight 0" in err, err
    _assert_clean(tmp_path, out)
    some = raw([0] * 39 + [0.5], "some.csv")
    rc, out = _run(tmp_path, schema, f"train={some}", f"valid+test={zero}")
    assert rc == 0, capsys.readouterr().err


def test_an_error_in_the_fit_pass_names_the_row_in_the_file_not_in_its_batch(feat, tmp_path, capsys):
    rows = _good_rows()
    rows[37] = "c1,abc,- 50000."  # a train row: the fit pass, which reads it in its 4th batch of 10, finds it
    raw = _csv(tmp_path, rows)
    out = tmp_path / "out"
    rc = features_main(["--schema", str(feat.write_schema(tmp_path / "s.yaml", CENSUS_LIKE)), "--input", str(raw),
                        "--output", str(out), "--batch-rows", "10"])
    err = capsys.readouterr().err
    assert rc == 1 and f"file {raw}, column 'amount', row 37 (0-based): expected a number, found 'abc'" in err, err
    assert "fitted spec" not in err  # it was the fit pass
    _assert_clean(tmp_path, out)
