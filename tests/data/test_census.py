"""Census-Income: vendored files, column names, labels, and a sample round trip raw -> feature Parquet."""
from __future__ import annotations

import hashlib
import lzma
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmoe_rec.data import census
from mmoe_rec.features.build import main as features_main
from mmoe_rec.features.schema import load_schema
from mmoe_rec.features.spec import FeatureSpec

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "configs/features/census.yaml"
SHA256 = {"train": "0b1eda6feb45e5f781f91b468c96dcde2423b90646ace0c767ee71112abc44e1",
          "test": "2520a970637ea69a1cd214e21d5fe242f31a83fcffd91f8834cfdf311760317a"}


def test_vendored_files_match_provenance():
    for split, sha in SHA256.items():
        assert hashlib.sha256(census.raw_path(split).read_bytes()).hexdigest() == sha
        assert sha in (census.DATA_DIR / "PROVENANCE.md").read_text()


def test_schema_matches_census_columns_and_excludes_label_sources():
    s = load_schema(SCHEMA)
    assert len(census.COLUMNS) == 42 and s.reader.column_names == census.COLUMNS
    used = {c.column for c in s.categorical} | {n.column for n in s.numeric}
    assert used == set(census.COLUMNS) - set(census.NOT_FEATURES)
    assert [t.name for t in s.tasks] == list(census.TASKS)


def _sample_lines(n: int) -> list[bytes]:
    with lzma.open(census.raw_path("train"), "rb") as f:
        return [next(f) for _ in range(n)]


def test_census_sample_round_trip(tmp_path):
    lines = _sample_lines(3000)
    (tmp_path / "train.csv").write_bytes(b"".join(lines[:2000]))
    (tmp_path / "rest.csv.xz").write_bytes(lzma.compress(b"".join(lines[2000:])))
    out = tmp_path / "features"
    assert features_main(["--schema", str(SCHEMA), "--input", f"train={tmp_path / 'train.csv'}",
                          "--input", f"valid+test={tmp_path / 'rest.csv.xz'}", "--output", str(out),
                          "--seed", "0"]) == 0
    spec = FeatureSpec.load(out)
    assert spec.task_names == ["income", "never_married"] and spec.id_columns == [] and not spec.has_weight
    names = {f.name for f in spec.sparse_features} | set(spec.dense_features)
    assert not names & set(census.NOT_FEATURES)
    train = pq.read_table(out / "train")
    assert train.num_rows == 2000
    rest = pa.concat_tables([pq.read_table(out / "valid"), pq.read_table(out / "test")])
    assert rest.num_rows == 1000 and 350 < pq.read_table(out / "valid").num_rows < 650
    for f in spec.sparse_features:
        assert train.schema.field(f.name).type == pa.int64()
        assert train[f.name].to_numpy().max() < f.num_embeddings
    assert all(train.schema.field(d).type == pa.float32() for d in spec.dense_features)
    # labels against pandas reading the same rows the README's way
    ref = pd.read_csv(tmp_path / "train.csv", header=None, names=list(census.COLUMNS), skipinitialspace=True)
    np.testing.assert_array_equal(train["label_income"].to_numpy(), (ref["income_50k"] == "50000+.").to_numpy())
    np.testing.assert_array_equal(train["label_never_married"].to_numpy(),
                                  (ref["marital_stat"] == "Never married").to_numpy())
    # numeric: standardized age from train statistics
    age = ref["age"].to_numpy(np.float64)
    np.testing.assert_allclose(train["age"].to_numpy(), (age - age.mean()) / age.std(), rtol=1e-5, atol=1e-6)
    # categorical ids follow the vocabulary
    sex = spec.transforms["features"]["sex"]["values"]
    assert train["sex"].to_pylist() == [1 + sex.index(v) for v in ref["sex"]]


def test_iter_raw_and_labels_on_vendored_test_file():
    batch = next(census.iter_raw(census.raw_path("test"), batch_rows=5000))
    assert batch.num_rows == 5000 and batch.schema.names == list(census.COLUMNS)
    assert batch.column("citizenship")[0].as_py() == batch.column("citizenship")[0].as_py().strip()
    y = census.labels(batch)
    assert 0.03 < y["income"].mean() < 0.1 and 0.35 < y["never_married"].mean() < 0.5


def test_labels_refuse_an_unknown_income_or_marital_status_value():
    """An unknown income value was refused, an unknown marital status read silently as "not never married"."""
    def batch(income: str, marital: str) -> pa.Table:
        return pa.table({census.INCOME_COLUMN: [income], census.MARITAL_COLUMN: [marital]})

    assert census.labels(batch(census.INCOME_POSITIVE, census.NEVER_MARRIED))["never_married"].tolist() == [1.0]
    with pytest.raises(ValueError, match="unknown income value '70000'"):
        census.labels(batch("70000", census.NEVER_MARRIED))
    with pytest.raises(ValueError, match="unknown marital status value 'Single'"):
        census.labels(batch(census.INCOME_NEGATIVE, "Single"))


def test_raw_path_names_the_vendored_files_and_refuses_another_split(tmp_path):
    """Only train and test are vendored ("valid" is cut from test): another name is an error naming it, not the path
    of a file that is not there."""
    assert census.raw_path("train") == census.DATA_DIR / "train.csv.xz" and census.raw_path("test").exists()
    assert census.raw_path("test", tmp_path) == tmp_path / "test.csv.xz"
    for split in ("valid", "Train", ""):
        with pytest.raises(ValueError, match=f"census raw files are 'train' and 'test', not {split!r}"):
            census.raw_path(split)


def test_an_unknown_label_value_is_named_as_found_past_known_ones():
    """The value named is the first unknown one, not the batch's first row (a known value: a baffling message)."""
    t = pa.table({census.INCOME_COLUMN: [census.INCOME_NEGATIVE, census.INCOME_POSITIVE, "70000", "80000"],
                  census.MARITAL_COLUMN: [census.NEVER_MARRIED, "Divorced", "Divorced", "Single"]})
    with pytest.raises(ValueError, match="unknown income value '70000'"):
        census.labels(t)
    with pytest.raises(ValueError, match="unknown marital status value 'Single'"):
        census.labels(t.set_column(0, census.INCOME_COLUMN, pa.array([census.INCOME_NEGATIVE] * 4)))
