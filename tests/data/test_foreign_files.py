"""A feature Parquet file of another build dropped into a feature folder's split directory is refused, not read with
the wrong meaning of its ids: the build records its spec's version in every file's footer and the loader compares it
with the folder's spec.json; a file without the record (folders built before it) is caught by the row count that
manifest.json records. Folders without either record load as before."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from mmoe_rec.data.datamodule import FeatureDataModule
from mmoe_rec.data.parquet_stream import ParquetIndex
from mmoe_rec.features.build import main as features_main
from mmoe_rec.features.spec import FeatureSpec

SPEC_VERSION_KEY = "mmoe_rec.spec_version"  # the footer key: a file format, so spelled out here (spec.SPEC_VERSION_KEY)

SCHEMA = {
    "id_columns": ["rid"],
    "categorical": [{"name": "user"}],
    "numeric": [{"name": "x"}],
    "tasks": [{"name": "click"}],
}


def _build(tmp_path, name: str, seed: int, n: int = 400):
    rng = np.random.default_rng(seed)
    users = [f"u{seed}_{k}" for k in range(5)]  # another seed: other values, another vocabulary, another spec
    raw = tmp_path / f"{name}.parquet"
    pq.write_table(pa.table({"rid": np.arange(n), "user": [users[i] for i in rng.integers(0, 5, n)],
                             "x": rng.normal(size=n), "click": rng.integers(0, 2, n)}), raw)
    schema = tmp_path / "schema.yaml"
    schema.write_text(yaml.safe_dump(SCHEMA))
    out = tmp_path / name
    assert features_main(["--schema", str(schema), "--input", str(raw), "--output", str(out),
                          "--valid-fraction", "0.25", "--test-fraction", "0.25", "--seed", "0"]) == 0
    return out


def _drop_version(path) -> None:
    """The file as a build before this change wrote it: no spec version in its footer."""
    pq.write_table(pq.read_table(path).replace_schema_metadata(None), path)


def _test_rows(dm: FeatureDataModule) -> int:
    return sum(b.batch_size for b in dm.dataloader("test", rank=0, world_size=1))


def test_every_feature_file_records_the_version_of_the_spec_it_was_made_with(tmp_path):
    out = _build(tmp_path, "a", seed=0)
    version = FeatureSpec.load(out / "spec.json").version
    files = sorted(out.glob("*/*.parquet"))
    assert len(files) == 3
    for f in files:
        assert pq.read_metadata(f).metadata[SPEC_VERSION_KEY.encode()].decode() == version


def test_a_file_made_with_another_spec_is_refused_naming_the_file_and_both_versions(tmp_path):
    a, b = _build(tmp_path, "a", seed=0), _build(tmp_path, "b", seed=1)
    va, vb = (FeatureSpec.load(d / "spec.json").version for d in (a, b))
    assert va != vb
    foreign = a / "test" / "part-00001.parquet"
    shutil.copy(b / "test" / "part-00000.parquet", foreign)
    dm = FeatureDataModule(str(a), batch_size=64)
    with pytest.raises(ValueError) as e:
        dm.dataloader("test")
    msg = str(e.value)
    assert str(foreign) in msg and va in msg and vb in msg
    with pytest.raises(ValueError, match=vb):  # the index alone, given the folder's version
        ParquetIndex.from_dir(a / "test", spec_version=va)


def test_a_file_without_a_version_that_changes_the_row_count_is_refused_by_the_manifest(tmp_path):
    a, b = _build(tmp_path, "a", seed=0), _build(tmp_path, "b", seed=1)
    expected = json.loads((a / "manifest.json").read_text())["rows"]["test"]
    foreign = a / "test" / "part-00001.parquet"
    shutil.copy(b / "test" / "part-00000.parquet", foreign)
    _drop_version(foreign)  # made by a build before this change
    found = expected + pq.read_metadata(foreign).num_rows
    with pytest.raises(ValueError) as e:
        FeatureDataModule(str(a), batch_size=64).dataloader("test")
    msg = str(e.value)
    assert "'test'" in msg and f"{found} rows" in msg and f"records {expected} rows" in msg
    # the other splits are untouched and still load
    dm = FeatureDataModule(str(a), batch_size=64)
    assert sum(b.batch_size for b in dm.dataloader("valid", rank=0, world_size=1)) > 0


def test_folders_built_before_the_version_record_or_without_a_manifest_still_load(tmp_path):
    a = _build(tmp_path, "a", seed=0)
    rows = json.loads((a / "manifest.json").read_text())["rows"]["test"]
    for f in a.glob("*/*.parquet"):
        _drop_version(f)
    assert _test_rows(FeatureDataModule(str(a), batch_size=64)) == rows
    (a / "manifest.json").unlink()
    assert _test_rows(FeatureDataModule(str(a), batch_size=64)) == rows
