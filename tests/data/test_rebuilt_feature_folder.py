"""A feature folder rebuilt (`mmoe-rec features --overwrite`) under a job that reads it: the job's index (row groups,
spec version) was made from the old build, and each epoch opens the files again by path. Every open compares the
file with the one indexed, so the job stops with an error naming the file instead of reading the new build's rows
under the old spec. The rebuild is forced between two epochs, not timed (a review of jobs run at once)."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmoe_rec.cli import _loader_worker_error
from mmoe_rec.data.datamodule import FeatureDataModule
from mmoe_rec.data.parquet_stream import ParquetIndex, read_rows
from mmoe_rec.data.synthetic import main as synth_main
from mmoe_rec.features.build import main as features_main
from mmoe_rec.features.spec import FeatureSpec

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = str(ROOT / "configs/features/synthetic_rec.yaml")
REBUILT = r"the feature folder .* was rebuilt \(or changed\) while this job read it; restart the job"


def _features(raw: Path, out: Path, *extra: str) -> int:
    return features_main(["--schema", SCHEMA, "--input", str(raw), "--output", str(out), "--valid-fraction", "0.1",
                          "--test-fraction", "0.1", "--seed", "0", *extra])


@pytest.fixture(scope="module")
def raws(tmp_path_factory):
    """Two raw datasets of the same shape: the second has its users relabelled (a permutation), so its features
    have the same tables and row counts but another spec (user ids that mean other users)."""
    base = tmp_path_factory.mktemp("concurrent")
    raw, relabelled = base / "raw", base / "relabelled"
    assert synth_main(["rec", "--rows", "2000", "--users", "300", "--items", "100", "--output", str(raw)]) == 0
    relabelled.mkdir()
    for f in sorted(raw.glob("*.parquet")):
        t = pq.read_table(f)
        users = t.column("user_id").to_numpy()
        values = np.unique(users)
        perm = dict(zip(values.tolist(), np.random.default_rng(0).permutation(values).tolist()))
        i = t.schema.get_field_index("user_id")
        t = t.set_column(i, "user_id", pa.array([perm[u] for u in users.tolist()], t.schema.field(i).type))
        pq.write_table(t, relabelled / f.name)
    return raw, relabelled


def _batch_digest(batch) -> str:
    h = hashlib.sha256(batch.dense.numpy().tobytes())
    h.update(batch.sparse.values().numpy().tobytes())
    h.update(batch.sparse.lengths().numpy().tobytes())
    for task in sorted(batch.labels):
        h.update(batch.labels[task].numpy().tobytes())
    return h.hexdigest()


def test_a_fits_loader_never_reads_a_feature_folder_rebuilt_after_it_started(raws, tmp_path):
    """`mmoe-rec features --overwrite` into the folder a running fit reads, between two of its epochs: the fit's
    index (row groups, spec version) was made from the old build, its next epoch opened the new build's files by
    path and trained on ids of another spec without a word (the checkpoint kept the old spec's version)."""
    raw, relabelled = raws
    feat, old_copy = tmp_path / "feat", tmp_path / "old_copy"
    assert _features(raw, feat) == 0
    shutil.copytree(feat, old_copy)
    dm = FeatureDataModule(str(feat), batch_size=256)
    assert [_batch_digest(b) for b in dm.train_dataloader()]  # epoch 0, from the old build
    assert _features(relabelled, feat, "--overwrite") == 0  # another job's rebuild, between the fit's epochs
    assert FeatureSpec.load(feat / "spec.json").version != dm.spec.version
    dm.set_epoch(1)
    ref = FeatureDataModule(str(old_copy), batch_size=256)
    ref.set_epoch(1)
    expected = [_batch_digest(b) for b in ref.train_dataloader()]
    try:
        got = [_batch_digest(b) for b in dm.train_dataloader()]
    except (ValueError, RuntimeError, OSError) as e:  # refused: fine, if it says what happened
        assert "feat" in str(e), str(e)
        return
    assert got == expected, "epoch 1 read the rebuilt folder's rows under the old spec"


def test_the_check_holds_in_loader_workers_and_in_the_evaluation_and_predict_loaders(raws, tmp_path):
    """Loader workers open the files in their own processes (the index travels to them with its identities); the
    error reaches the user as one line naming the file (the CLI's worker-error line). The valid / predict loaders
    use the same cached index."""
    raw, relabelled = raws
    feat = tmp_path / "feat"
    assert _features(raw, feat) == 0
    dm = FeatureDataModule(str(feat), batch_size=256, num_workers=1)
    assert list(dm.train_dataloader()) and list(dm.val_dataloader()) and dm.predict_rows()  # the fit's indexes
    assert _features(relabelled, feat, "--overwrite") == 0
    with pytest.raises(ValueError, match=REBUILT) as caught:
        list(dm.val_dataloader())
    line = _loader_worker_error(str(caught.value))
    assert line is not None and line.startswith(str(feat / "valid")) and "(in data loader worker 0)" in line
    with pytest.raises(ValueError, match=REBUILT):
        list(dm.train_dataloader())
    with pytest.raises(ValueError, match=REBUILT):
        list(dm.predict_dataloader())
    assert list(FeatureDataModule(str(feat), batch_size=256).predict_dataloader())  # a new job reads the new build


def _rows(index: ParquetIndex) -> int:
    return sum(b.num_rows for b in read_rows(list(index.units), 0, 100, ["x"], schema=index.schema))


@pytest.mark.parametrize("change", ["chmod", "hard link", "touch -a"])
def test_a_loader_goes_on_reading_a_feature_file_whose_bytes_did_not_change(tmp_path, change):
    """Only a rebuild (another file under the name) stops a job: making the folder read-only during a fit
    (chmod -R a-w), a backup that hard-links it (cp -al, rsnapshot), or an atime set by a tool change the ctime, not
    the bytes, and stopped the job as "rebuilt" when the check compared the ctime."""
    path = tmp_path / "part-0.parquet"
    pq.write_table(pa.table({"x": list(range(100))}), path, row_group_size=50)
    index = ParquetIndex.from_dir(tmp_path, ["x"])
    assert _rows(index) == 100
    if change == "chmod":
        path.chmod(0o444)
    elif change == "hard link":
        os.link(path, tmp_path.parent / f"{tmp_path.name}-snapshot.parquet")
    else:
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns + 10**9, st.st_mtime_ns))
    assert _rows(index) == 100  # the next epoch
