"""Fit on train only, transform identically in batch and row by row, stable hashing, deterministic splits."""
from __future__ import annotations

import json

import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmoe_rec.features.build import main as features_main
from mmoe_rec.features.errors import FeatureDataError
from mmoe_rec.features.fit import SpecFitter, fit
from mmoe_rec.features.numeric import STATS_BLOCK, NumericStats
from mmoe_rec.features.schema import parse_schema
from mmoe_rec.features.spec import FeatureSpec, label_column
from mmoe_rec.features.transform import transform_table
from mmoe_rec.features.vocab import fnv1a64, hash_ids



def _build(feat, tmp_path, *inputs, extra=()):
    schema = feat.write_schema(tmp_path / "schema.yaml")
    out = tmp_path / "out"
    argv = ["--schema", str(schema), "--output", str(out)] + [a for i in inputs for a in ("--input", i)] + list(extra)
    assert features_main(argv) == 0
    return out, FeatureSpec.load(out)


def test_value_only_in_test_is_oov_and_stats_come_from_train(feat, tmp_path):
    train = feat.raw_table(300, seed=0, users=["alice", "bob"])
    test = feat.raw_table(100, seed=1, users=["alice", "zed"], first_row=300)
    test = test.set_column(test.schema.get_field_index("price"), "price", pa.array(np.full(100, 1e6)))
    out, spec = _build(feat, tmp_path, f"train={feat.write_parquet(tmp_path / 'raw/train.parquet', train)}",
                       f"test={feat.write_parquet(tmp_path / 'raw/test.parquet', test)}")
    user = spec.transforms["features"]["user"]
    assert sorted(user["values"]) == ["alice", "bob"]  # nothing from test
    got = pq.read_table(out / "test")
    raw_users = test["user"].to_pylist()
    ids = got["user"].to_pylist()
    assert all((i == 0) == (u == "zed") for u, i in zip(raw_users, ids))
    assert 1 + user["values"].index("alice") in ids
    # price statistics are the train ones: the test's huge prices do not move the mean
    logp = np.log1p(train["price"].to_numpy())
    assert spec.transforms["features"]["price"]["mean"] == pytest.approx(logp.mean(), rel=1e-9)
    assert spec.transforms["features"]["price"]["std"] == pytest.approx(logp.std(), rel=1e-9)
    assert pq.read_table(out / "train").num_rows == 300 and got.num_rows == 100


def test_feature_parquet_layout_and_values(feat, tmp_path):
    train = feat.raw_table(400, seed=3)
    out, spec = _build(feat, tmp_path, f"train={feat.write_parquet(tmp_path / 'raw/t.parquet', train)}")
    t = pq.read_table(out / "train")
    assert [f.name for f in spec.sparse_features] == ["user", "item", "tags", "interests", "pos"]
    assert spec.dense_features == ["price", "age", "age_missing"]
    assert t.column_names == ["row_id", "user", "item", "tags", "interests", "pos", "price", "age", "age_missing",
                              label_column("click"), label_column("dwell")]
    assert t.schema.field("tags").type == pa.list_(pa.int64()) and t.schema.field("user").type == pa.int64()
    assert all(t.schema.field(c).type == pa.float32() for c in spec.dense_features + ["label_click", "label_dwell"])
    for f in spec.sparse_features:  # ids inside the embedding tables
        v = t[f.name].combine_chunks()
        v = v.flatten() if f.multi_valued else v
        assert 0 <= min(v.to_pylist(), default=0) and max(v.to_pylist(), default=0) < f.num_embeddings
    # interests "a|b" -> two ids; "" -> empty list
    for raw, ids in zip(train["interests"].to_pylist(), t["interests"].to_pylist()):
        assert len(ids) == (len(raw.split("|")) if raw else 0)
    age_raw = train["age"].to_numpy(zero_copy_only=False)
    miss = np.isnan(age_raw)
    np.testing.assert_array_equal(t["age_missing"].to_numpy(), miss.astype(np.float32))
    st = spec.transforms["features"]["age"]
    assert st["impute"] == pytest.approx(np.median(age_raw[~miss]))
    np.testing.assert_allclose(t["age"].to_numpy()[~miss], (age_raw[~miss] - st["mean"]) / st["std"], rtol=1e-5)
    # bucketize: boundaries are train quantiles (exact below the reservoir size)
    b = spec.transforms["features"]["pos"]["boundaries"]
    assert b == sorted(set(np.quantile(train["pos"].to_numpy(), [0.25, 0.5, 0.75]).tolist()))
    np.testing.assert_array_equal(t["label_dwell"].to_numpy(), train["dwell"].to_numpy().astype(np.float32))


def test_zero_bucket_gives_zero_its_own_id_and_spreads_the_non_zero_values():
    # a money-like column: 90 % zeros, the rest spread over two orders of magnitude, one negative refund
    rng = np.random.default_rng(0)
    amount = np.where(rng.random(2000) < 0.9, 0.0, rng.uniform(10, 1000, 2000))
    amount[7] = -50.0
    raw = pa.table({"amount": amount, "click": rng.integers(0, 2, 2000)})
    numeric = [{"name": "plain", "column": "amount", "transform": "bucketize", "buckets": 8},
               {"name": "zeroed", "column": "amount", "transform": "bucketize", "buckets": 8, "zero_bucket": True}]
    fitter = SpecFitter(parse_schema({"numeric": numeric, "tasks": [{"name": "click"}]}))
    fitter.update(raw)
    spec = fitter.spec()
    out = transform_table(spec, raw)
    plain, zeroed = out["plain"].to_numpy(), out["zeroed"].to_numpy()
    assert len(np.unique(plain[amount > 0])) <= 1  # over all rows every quantile but the top is 0
    nonzero = amount[amount != 0]
    q = np.quantile(nonzero, np.linspace(0, 1, 9)[1:-1])
    assert spec.transforms["features"]["zeroed"]["boundaries"] == sorted({*q.tolist(), 0.0, np.nextafter(0.0, 1.0)})
    zero_id = zeroed[amount == 0]
    assert len(np.unique(zero_id)) == 1 and not np.isin(zero_id[0], zeroed[amount != 0]).any()
    assert zeroed[7] < zero_id[0] < zeroed[amount > 0].min()  # order kept: negative < 0 < positive
    assert len(np.unique(zeroed[amount > 0])) >= 7  # the non-zero values fill the quantile buckets
    with pytest.raises(FeatureDataError, match="zero_bucket"):
        parse_schema({"numeric": [{"name": "amount", "transform": "log1p", "zero_bucket": True}],
                      "tasks": [{"name": "click"}]})


def test_single_row_transform_equals_batch(feat):
    schema = parse_schema(feat.SCHEMA)
    fitter = SpecFitter(schema)
    fitter.update(feat.raw_table(500, seed=4))
    spec = fitter.spec()
    raw = feat.raw_table(40, seed=5, users=["alice", "bob", "newcomer"])
    batch = transform_table(spec, raw)
    df = raw.to_pandas()
    for i in range(len(df)):
        one = transform_table(spec, df.iloc[[i]])  # pandas, one row
        assert one.to_pylist() == batch.slice(i, 1).to_pylist()
    # scoring input has no labels: features only, identical values
    no_labels = transform_table(spec, raw.drop_columns(["click", "dwell"]))
    assert "label_click" not in no_labels.column_names
    assert no_labels.to_pylist() == batch.drop_columns(["label_click", "label_dwell"]).to_pylist()


def test_hash_is_stable_across_processes():
    values = ["", "a", "foobar", "user_123", "ünïcode"]
    # FNV-1a 64 reference values for "a" and "foobar"
    assert fnv1a64(pa.array(["a", "foobar"])).tolist() == [0xAF63DC4C8601EC8C, 0x85944171F73967E8]
    code = ("import pyarrow as pa; from mmoe_rec.features.vocab import hash_ids; "
            f"print(hash_ids(pa.array({values!r}), 1000).tolist())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123"})
    assert other.stdout.strip() == str(hash_ids(pa.array(values), 1000).tolist())
    assert hash_ids(pa.array([123, None]), 1000).tolist() == hash_ids(pa.array(["123", None]), 1000).tolist()
    assert hash_ids(pa.array([None]), 10).tolist() == [0]


def test_random_split_is_deterministic_and_independent_of_batch_size(feat, tmp_path):
    raw = feat.write_parquet(tmp_path / "raw/all.parquet", feat.raw_table(3000, seed=6), row_group_size=700)
    runs, versions = [], []
    for k, batch_rows in enumerate(["256", "5000"]):
        d = tmp_path / f"run{k}"
        d.mkdir()
        out, _ = _build(feat, d, str(raw), extra=["--valid-fraction", "0.2", "--test-fraction", "0.1", "--seed", "7",
                                           "--batch-rows", batch_rows, "--row-group-rows", "512"])
        runs.append({s: pq.read_table(out / s, columns=["row_id"])["row_id"].to_pylist() for s in
                     ("train", "valid", "test")})
        versions.append(json.loads((out / "spec.json").read_text())["version"])
    assert runs[0] == runs[1]
    assert versions[0] == versions[1]  # the numeric statistics too, to the last bit (the version hashes them)
    assert sorted(sum(runs[0].values(), [])) == list(range(3000))
    assert abs(len(runs[0]["valid"]) - 600) < 90 and abs(len(runs[0]["test"]) - 300) < 70
    assert pq.ParquetFile(next((tmp_path / "run0/out/train").glob("*.parquet"))).metadata.row_group(0).num_rows == 512


def test_split_column(feat, tmp_path):
    t = feat.raw_table(90, seed=8)
    t = t.append_column("split", pa.array(["train", "valid", "test"] * 30))
    out, _ = _build(feat, tmp_path, str(feat.write_parquet(tmp_path / "raw/s.parquet", t)), extra=["--split-column", "split"])
    assert pq.read_table(out / "valid")["row_id"].to_pylist() == list(range(1, 90, 3))
    assert "split" not in pq.read_table(out / "valid").column_names


def test_split_column_is_read_only_from_the_inputs_it_splits(feat, tmp_path):
    """A `train=` input beside one split by --split-column need not have that column (it was "missing column")."""
    t = feat.raw_table(90, seed=8)
    mixed = t.append_column("split", pa.array(["train", "valid", "test"] * 30))
    fixed = feat.raw_table(30, seed=9, first_row=90)
    out, _ = _build(feat, tmp_path, f"train={feat.write_parquet(tmp_path / 'raw/train.parquet', fixed)}",
                    str(feat.write_parquet(tmp_path / "raw/s.parquet", mixed)), extra=["--split-column", "split"])
    assert sorted(pq.read_table(out / "train")["row_id"].to_pylist()) == \
        sorted(list(range(0, 90, 3)) + list(range(90, 120)))
    assert pq.read_table(out / "valid")["row_id"].to_pylist() == list(range(1, 90, 3))


def test_nan_in_float_categorical_is_missing_like_null():
    """ids written as float64 with NaN for missing (pandas / Spark) get id 0, as the same column with nulls does."""
    shop = [1.0, 2.0, np.nan, 2.0, np.nan, 7.0, 1.0, np.nan]
    schema = parse_schema({"categorical": [{"name": "shop"}, {"name": "shop_h", "column": "shop", "buckets": 10},
                                           {"name": "shops", "column": "many", "multi_valued": True}],
                           "tasks": [{"name": "y"}]})
    many = pa.array([[v, 3.0] for v in shop], pa.list_(pa.float64()))
    with_nan = pa.table({"shop": pa.array(shop, from_pandas=False), "many": many, "y": [0, 1] * 4})
    assert with_nan["shop"].null_count == 0  # NaN, not null
    fitter = SpecFitter(schema)
    fitter.update(with_nan)
    spec = fitter.spec()
    assert spec.transforms["features"]["shop"]["values"] == [1, 2, 7]  # no -2**63
    assert spec.transforms["features"]["shops"]["values"] == [3, 1, 2, 7]
    got = transform_table(spec, with_nan)
    assert got["shop"].to_pylist() == [1, 2, 0, 2, 0, 3, 1, 0]
    assert [h == 0 for h in got["shop_h"].to_pylist()] == [v != v for v in shop]
    assert got["shops"].to_pylist()[2] == [0, 1]
    # the reference: the same column read by pandas with None for missing (null in Arrow)
    ref = transform_table(spec, pd.DataFrame({"shop": [None if v != v else v for v in shop], "many": many.to_pylist(),
                                              "y": [0, 1] * 4}))
    assert ref["shop"].to_pylist() == got["shop"].to_pylist() and ref["shop_h"].equals(got["shop_h"])


def test_numeric_statistics_do_not_depend_on_the_batching_not_even_in_the_last_bit():
    rng = np.random.default_rng(3)
    x = rng.lognormal(3.0, 2.0, 3 * STATS_BLOCK + 123)  # full blocks and a remainder
    missing = rng.random(x.size) < 0.1
    got = []
    for batch in (1_000, 4_096, 5_000, x.size):
        stats = NumericStats("amount")
        for i in range(0, x.size, batch):
            stats.update(x[i:i + batch], missing[i:i + batch])
        got.append((stats.count, stats.missing, stats.mean, stats.std))
    assert all(g == got[0] for g in got)
    values = x[~missing]
    assert got[0][:2] == (values.size, int(missing.sum()))
    np.testing.assert_allclose(got[0][2:], (values.mean(), values.std()), rtol=1e-12)


def test_a_delimited_column_stored_as_a_dictionary_fits_and_transforms_as_its_strings(tmp_path):
    """pandas' `category` dtype (a Parquet dictionary column) of a delimited multi-valued feature: the fit refused
    it ("expected a list column, found type dictionary<...>"), while the transform took it."""
    import pandas as pd

    from mmoe_rec.features.fit import fit
    from mmoe_rec.features.schema import parse_schema
    from mmoe_rec.features.transform import transform_table

    schema = parse_schema({"categorical": [{"name": "tags", "multi_valued": True, "delimiter": "|"}],
                           "tasks": [{"name": "y"}]})
    plain = pd.DataFrame({"tags": ["a|b", "b", None, "c|a|a"], "y": [0, 1, 0, 1]})
    as_category = plain.assign(tags=plain["tags"].astype("category"))
    spec, spec_of_category = fit(schema, plain), fit(schema, as_category)
    assert spec_of_category.to_dict() == spec.to_dict()
    assert transform_table(spec, as_category).to_pydict() == transform_table(spec, plain).to_pydict()


# Gaps a mutation review found (2026-12-07): the top-k cap, the default mean impute, signed log1p, a constant impute
# on the log scale, a constant train column
def _spec(numeric=(), categorical=(), rows=None):
    schema = parse_schema({"numeric": list(numeric), "categorical": list(categorical), "tasks": [{"name": "y"}]})
    return fit(schema, rows)


def test_max_size_keeps_exactly_the_most_frequent_values():
    rows = pa.table({"c": ["a"] * 4 + ["b"] * 3 + ["c"] * 2 + ["d"], "y": [0] * 10})
    st = _spec(categorical=[{"name": "c", "max_size": 2}], rows=rows).transforms["features"]["c"]
    assert st["values"] == ["a", "b"] and st["num_embeddings"] == 3


def test_default_mean_impute_gives_0_after_standardizing():
    x = pa.array([1.0, 2.0, None, 7.0, 10.0])
    spec = _spec(numeric=[{"name": "x"}], rows=pa.table({"x": x, "y": [0] * 5}))  # impute defaults to mean
    out = transform_table(spec, pa.table({"x": pa.array([None, 4.0], pa.float64())}))
    assert out["x"][0].as_py() == pytest.approx(0.0, abs=1e-6)
    assert out["x_missing"].to_pylist() == [1.0, 0.0]


def test_log1p_is_signed():
    x = np.array([-100.0, -5.0, 0.0, 5.0, 100.0])
    spec = _spec(numeric=[{"name": "x", "transform": "log1p"}], rows=pa.table({"x": x, "y": [0] * 5}))
    st = spec.transforms["features"]["x"]
    logx = np.sign(x) * np.log1p(np.abs(x))
    assert st["mean"] == pytest.approx(logx.mean(), abs=1e-12) and st["std"] == pytest.approx(logx.std())
    out = transform_table(spec, pa.table({"x": x}))["x"].to_numpy()
    assert out[0] < out[1] < out[2] < out[3] < out[4]  # order kept, negatives below 0


def test_a_constant_impute_is_on_the_log_scale():
    x = pa.array([1.0, 10.0, 100.0, None])
    spec = _spec(numeric=[{"name": "x", "transform": "log1p", "impute": 9}], rows=pa.table({"x": x, "y": [0] * 4}))
    st = spec.transforms["features"]["x"]
    assert st["impute"] == pytest.approx(np.log1p(9.0))
    out = transform_table(spec, pa.table({"x": pa.array([None], pa.float64())}))["x"][0].as_py()
    assert out == pytest.approx((np.log1p(9.0) - st["mean"]) / st["std"], rel=1e-6)


def test_a_constant_train_column_keeps_other_values_on_the_raw_scale():
    spec = _spec(numeric=[{"name": "x"}], rows=pa.table({"x": [5.0] * 10, "y": [0] * 10}))
    assert spec.transforms["features"]["x"]["std"] == 1.0
    assert transform_table(spec, pa.table({"x": [5.0, 6.0]}))["x"].to_pylist() == [0.0, 1.0]
