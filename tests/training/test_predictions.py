"""ParquetPredictionWriter: every row of the predict split once, the total checked before any file is renamed, and
the files of an earlier run under the same path with another number of processes removed."""
from __future__ import annotations

import copy

import lightning as L
import pyarrow.parquet as pq
import pytest
import torch

from conftest import MMOE
from mmoe_rec.data.datamodule import FeatureDataModule
from mmoe_rec.training.module import MultiTaskModule
from mmoe_rec.training.predictions import ParquetPredictionWriter

FAST = dict(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False, logger=False,
            enable_checkpointing=False)


def predict(feature_dir, output, dm=None):
    dm = dm or FeatureDataModule(str(feature_dir), batch_size=64, seed=0)
    module = MultiTaskModule(model=copy.deepcopy(MMOE), feature_spec=dm.spec)
    trainer = L.Trainer(callbacks=[ParquetPredictionWriter(str(output))], **FAST)
    trainer.predict(module, datamodule=dm, return_predictions=False)
    return dm


def test_every_row_once_and_the_files_of_an_earlier_run_with_more_processes_removed(feature_dir, tmp_path):
    out = tmp_path / "pred.parquet"
    stale = [tmp_path / "pred.rank0.parquet", tmp_path / "pred.rank1.parquet"]
    keep = tmp_path / "pred.rank1.parquet.bak"
    for p in (*stale, keep):
        p.write_bytes(b"an earlier 2-process run")
    with pytest.warns(UserWarning, match="pred.rank0.parquet, pred.rank1.parquet"):
        dm = predict(feature_dir, out)
    assert pq.read_table(out).num_rows == dm.predict_rows()
    assert not any(p.exists() for p in stale) and keep.exists()  # only this path's rank files


def test_a_row_count_that_is_not_the_splits_renames_nothing(feature_dir, tmp_path, monkeypatch):
    """What a rank that died (or a loader that lost rows) leaves: fewer rows than the split. The run fails and the
    earlier output stays as it was (rank 0 used to rename its file and exit 0 with half the rows)."""
    out = tmp_path / "pred.parquet"
    out.write_bytes(b"an earlier run")
    dm = FeatureDataModule(str(feature_dir), batch_size=64, seed=0)
    monkeypatch.setattr(dm, "predict_rows", lambda: 10 ** 6)
    with pytest.raises(RuntimeError, match="rows written over 1 process"):
        predict(feature_dir, out, dm)
    assert out.read_bytes() == b"an earlier run"
    assert [p.name for p in tmp_path.iterdir()] == ["pred.parquet"]  # the partial file removed
    with pytest.raises(RuntimeError, match="rows written over 1 process"):  # into folders made for it: they go too
        predict(feature_dir, tmp_path / "new" / "deeper" / "pred.parquet", dm)
    assert [p.name for p in tmp_path.iterdir()] == ["pred.parquet"]


@pytest.mark.parametrize("workers", [2, 3])
def test_loader_workers_keep_the_splits_row_order(feature_dir, tmp_path, workers):
    """Each worker makes a contiguous block of rows and the DataLoader interleaves them; without id columns (census
    features) the order is all that ties a score to its row. The file equals the 0-worker one, ids and scores."""
    torch.manual_seed(0)  # the same random model both times
    straight = predict(feature_dir, tmp_path / "w0.parquet").predict_rows()
    dm = FeatureDataModule(str(feature_dir), batch_size=64, seed=0, num_workers=workers)
    torch.manual_seed(0)
    predict(feature_dir, tmp_path / "w.parquet", dm)
    a, b = pq.read_table(tmp_path / "w0.parquet"), pq.read_table(tmp_path / "w.parquet")
    assert a.num_rows == b.num_rows == straight
    assert b.column("row_id").to_pylist() == a.column("row_id").to_pylist()
    test_ids = [i for p in sorted((feature_dir / "test").glob("*.parquet"))
                for i in pq.read_table(p)["row_id"].to_pylist()]
    assert b.column("row_id").to_pylist() == test_ids  # the files' order
    assert b.equals(a)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.parquet", "w0.parquet"]  # no part left behind


def test_replacing_an_earlier_runs_predictions_is_said(feature_dir, tmp_path):
    """The folder holds one run's predictions, so a second predict replaces the first's file: with a warning
    naming it (it was silent, where `score` asks for --overwrite)."""
    import warnings

    out = tmp_path / "pred.parquet"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predict(feature_dir, out)  # nothing there yet: no word
    assert not [w for w in caught if "replaced the file" in str(w.message)]
    with pytest.warns(UserWarning, match=f"replaced the file an earlier run wrote at {out}"):
        predict(feature_dir, out)


@pytest.mark.parametrize("setting", [{"limit_predict_batches": 2}, {"limit_predict_batches": 0.5},
                                     {"fast_dev_run": True}], ids=["two-batches", "half", "fast-dev-run"])
def test_a_run_limited_to_some_batches_writes_them_and_says_so(feature_dir, tmp_path, setting):
    """A predict of the first batches only (what the README lists for a quick check) failed after the whole run,
    its rows counted against the split's, with no word of the limit; now it writes them and warns."""
    dm = FeatureDataModule(str(feature_dir), batch_size=64, seed=0)
    module = MultiTaskModule(model=copy.deepcopy(MMOE), feature_spec=dm.spec)
    out = tmp_path / "pred.parquet"
    trainer = L.Trainer(callbacks=[ParquetPredictionWriter(str(out))], **FAST, **setting)
    (name, value), = setting.items()
    with pytest.warns(UserWarning, match=f"{name}={value} limits the run to .* of the predict split's 500 rows"):
        trainer.predict(module, datamodule=dm, return_predictions=False)
    rows = {"limit_predict_batches": 128 if value == 2 else 256, "fast_dev_run": 64}[name]
    ids = pq.read_table(out).column("row_id").to_pylist()
    assert ids == sorted(ids) and len(ids) == len(set(ids)) == rows


@pytest.mark.parametrize("setting", [{"limit_predict_batches": 1000}, {"limit_predict_batches": 8},
                                     {"fast_dev_run": 8}], ids=["1000", "all-8", "fast-dev-run-8"])
def test_a_limit_that_cuts_no_batch_still_checks_the_rows(feature_dir, tmp_path, monkeypatch, setting):
    """A limit at or above the loader's 8 batches cuts nothing: a shortfall of rows is still a lost rank's or a
    lost batch's and fails the run (it was taken for the limit's and renamed into place)."""
    dm = FeatureDataModule(str(feature_dir), batch_size=64, seed=0)
    monkeypatch.setattr(dm, "predict_rows", lambda: 10 ** 6)
    module = MultiTaskModule(model=copy.deepcopy(MMOE), feature_spec=dm.spec)
    out = tmp_path / "pred.parquet"
    trainer = L.Trainer(callbacks=[ParquetPredictionWriter(str(out))], **FAST, **setting)
    with pytest.raises(RuntimeError, match="rows written over 1 process"):
        trainer.predict(module, datamodule=dm, return_predictions=False)
    assert not out.exists()


@pytest.mark.parametrize("limit", [0, 0.0])
def test_a_limit_of_no_batch_is_refused_and_the_earlier_file_stays(feature_dir, tmp_path, limit):
    """Lightning skips a predict epoch of no batch: the run ended well with an earlier run's file in place."""
    out = tmp_path / "pred.parquet"
    out.write_bytes(b"an earlier run")
    dm = FeatureDataModule(str(feature_dir), batch_size=64, seed=0)
    module = MultiTaskModule(model=copy.deepcopy(MMOE), feature_spec=dm.spec)
    trainer = L.Trainer(callbacks=[ParquetPredictionWriter(str(out))], **FAST, limit_predict_batches=limit)
    with pytest.raises(ValueError, match=f"limit_predict_batches={limit} predicts no batch"):
        trainer.predict(module, datamodule=dm, return_predictions=False)
    assert out.read_bytes() == b"an earlier run"


def test_an_output_under_the_home_folder_is_written_there(feature_dir, tmp_path, monkeypatch):
    """'~/...' from a YAML config (no shell expands it): Arrow wrote the part under $HOME, the rename looked in a
    folder named '~' and failed, the part was left behind."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "home").mkdir()
    dm = predict(feature_dir, "~/preds/p.parquet")
    assert [p.name for p in (tmp_path / "home" / "preds").iterdir()] == ["p.parquet"]
    assert pq.read_table(tmp_path / "home" / "preds" / "p.parquet").num_rows == dm.predict_rows()
    assert not (tmp_path / "~").exists()


def test_an_id_column_with_a_score_columns_name_is_refused_before_any_row(feature_dir, tmp_path):
    """The score would overwrite the id in the file (a spec made by hand: a schema with it is refused at build)."""
    dm = FeatureDataModule(str(feature_dir), batch_size=64, seed=0)
    spec = copy.deepcopy(dm.spec)
    spec.id_columns = ["row_id", "score_click"]
    module = MultiTaskModule(model=copy.deepcopy(MMOE), feature_spec=spec)
    trainer = L.Trainer(callbacks=[ParquetPredictionWriter(str(tmp_path / "p.parquet"))], **FAST)
    with pytest.raises(ValueError, match=r"id columns \['score_click'\] have the names of output columns"):
        trainer.predict(module, datamodule=dm, return_predictions=False)
    assert list(tmp_path.iterdir()) == []


def test_removing_the_temporary_files_takes_this_process_parts_by_name_and_no_other_process(tmp_path):
    """sigterm's watch ends a stopped predict by os._exit, past on_exception: the writer unlinks its partial file
    and every part of it, also one the main thread is still opening (a file not yet in the writer's table), and
    none of a process whose pid starts with this one's (a review's race: parts opened in the gap were left)."""
    writer = ParquetPredictionWriter(str(tmp_path / "p.parquet"))
    writer._partial = tmp_path / ".p.parquet.partial-123"
    ours = [writer._partial, writer._part(0), writer._part(1)]  # worker 1's part: on disk, not in writer._parts
    others = [tmp_path / ".p.parquet.partial-1234", tmp_path / ".p.parquet.partial-1234.worker0"]
    for path in (*ours, *others):
        path.write_bytes(b"rows")
    writer.remove_temporary_files()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in others)
    writer.remove_temporary_files()  # nothing left of its own: no error
    made = tmp_path / "made"  # a folder made for the output goes with the files, once empty
    writer._partial, writer._made = made / ".p.parquet.partial-123", [made]
    made.mkdir()
    writer._part(0).write_bytes(b"rows")
    writer.remove_temporary_files()
    assert not made.exists()


def test_scores_are_float32_and_a_process_without_a_batch_writes_the_same_score_columns(feature_dir, tmp_path):
    """Under DDP a rank given no batch writes an empty file of the score columns: read with the other ranks' files
    its columns must have their type (float32, as the model's scores are written), or the rank files do not concat."""
    import pyarrow as pa

    out = tmp_path / "pred.parquet"
    dm = predict(feature_dir, out)
    scores = {f.name: f.type for f in pq.read_schema(out) if f.name.startswith("score_")}
    assert scores and set(scores.values()) == {pa.float32()}
    # the epoch of a process that got no batch: the writer's hooks as Lightning calls them, with none in between
    module = MultiTaskModule(model=copy.deepcopy(MMOE), feature_spec=dm.spec)
    writer = ParquetPredictionWriter(str(tmp_path / "empty.parquet"))
    trainer = L.Trainer(callbacks=[writer], **FAST)
    writer.on_predict_epoch_start(trainer, module)
    writer.on_predict_epoch_end(trainer, module)
    empty = pq.read_table(tmp_path / "empty.parquet")
    assert empty.num_rows == 0 and {f.name: f.type for f in empty.schema} == scores
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.parquet", "pred.parquet"]  # no partial file left


def test_a_multi_process_run_removes_the_file_of_an_earlier_one_process_run(tmp_path):
    """The 1-process file `<stem><suffix>` read with the rank files holds every row twice: a run of 2 removes it and
    earlier rank files past its own, and keeps its own and unrelated files (rank 0's clean-up after the rename)."""
    out = tmp_path / "pred.parquet"
    names = ["pred.parquet", "pred.rank0.parquet", "pred.rank1.parquet", "pred.rank2.parquet", "pred.rank10.parquet",
             "pred.rank1.parquet.bak", "other.rank3.parquet", "predXrank3.parquet", "pred.rank3.csv"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    writer = ParquetPredictionWriter(str(out))
    with pytest.warns(UserWarning, match="pred.parquet, pred.rank10.parquet, pred.rank2.parquet"):
        writer._remove_earlier_runs(world_size=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["pred.rank0.parquet", "pred.rank1.parquet", "pred.rank1.parquet.bak", "other.rank3.parquet",
         "predXrank3.parquet", "pred.rank3.csv"])
    writer._remove_earlier_runs(world_size=1)  # and a 1-process run removes every rank file, keeping its own
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["pred.rank1.parquet.bak", "other.rank3.parquet", "predXrank3.parquet", "pred.rank3.csv"])


def test_a_folder_made_for_the_output_is_not_empty_from_the_epochs_start(feature_dir, tmp_path):
    """The partial file is made at the epoch's start: another job that made the same folder and fails meanwhile
    removes it only while empty (remove_empty_folders), so it stays for this run's first batch."""
    from mmoe_rec.output_dir import remove_empty_folders

    made = tmp_path / "new"

    class AnotherJobFails(L.Callback):  # runs after the writer's hook: the folder is there, no batch written yet
        def on_predict_epoch_start(self, trainer, pl_module):
            assert made.is_dir()
            remove_empty_folders([made])

    dm = FeatureDataModule(str(feature_dir), batch_size=64, seed=0)
    module = MultiTaskModule(model=copy.deepcopy(MMOE), feature_spec=dm.spec)
    trainer = L.Trainer(callbacks=[ParquetPredictionWriter(str(made / "pred.parquet")), AnotherJobFails()], **FAST)
    trainer.predict(module, datamodule=dm, return_predictions=False)
    assert [p.name for p in made.iterdir()] == ["pred.parquet"]
    assert pq.read_table(made / "pred.parquet").num_rows == dm.predict_rows()


def test_a_symlinked_predictions_path_is_written_at_its_target_and_the_link_stays(feature_dir, tmp_path):
    """As every output of the project (output_dir.resolved_output): the file the link points at is replaced, the
    link stays a link to it, and no temporary is left beside either (replacing the link left the target stale)."""
    (tmp_path / "store").mkdir()
    target = tmp_path / "store" / "pred.parquet"
    target.write_bytes(b"an earlier run")
    link = tmp_path / "pred.parquet"
    link.symlink_to(target)
    with pytest.warns(UserWarning, match=f"replaced the file an earlier run wrote at {target}"):
        dm = predict(feature_dir, link)
    assert link.is_symlink() and link.resolve() == target
    assert pq.read_table(target).num_rows == dm.predict_rows()
    assert [p.name for p in (tmp_path / "store").iterdir()] == ["pred.parquet"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.parquet", "store"]


def test_an_output_spelt_as_a_folder_is_refused_before_the_run(tmp_path):
    """`--predictions_path preds/` (a folder, by its trailing slash): Path drops the slash, and the run wrote a file
    named `preds`."""
    writer = ParquetPredictionWriter(str(tmp_path / "preds") + "/")
    with pytest.raises(IsADirectoryError, match="is a folder; give a file path"):
        writer.check_output()
    assert not (tmp_path / "preds").exists()
