import os

from mmoe_rec.training.checkpoint_lock import lock_checkpoint_folders, release_checkpoint_folders


def test_one_folder_under_two_spellings_is_locked_once(tmp_path):
    """A callback's folder (Lightning gives its real path) and the no-logger default (<default_root_dir>/checkpoints,
    not resolved) can name one folder through a symlink: its second flock refused the fit's own folder."""
    real = tmp_path / "scratch_ckpts"
    real.mkdir()
    (tmp_path / "checkpoints").symlink_to(real)
    fds = lock_checkpoint_folders([str(real), os.path.join(str(tmp_path), "checkpoints")])
    try:
        assert len(fds) == 1
    finally:
        release_checkpoint_folders(fds)


def test_partial_saves_are_the_checkpoint_writers_temporary_files_alone(tmp_path):
    from pathlib import Path

    from mmoe_rec.output_dir import temp_path
    from mmoe_rec.training.checkpoint_lock import PARTIAL_SAVE_KIND, remove_partial_saves

    partial = temp_path(tmp_path / "epoch=3-step=40.ckpt", PARTIAL_SAVE_KIND)  # AtomicCheckpointIO's name for a save
    kept = [".lock", "best.ckpt", ".best.ckpt.old-12-abcdef01", "best.ckpt.partial-checkpoint-12-abcdef01",
            ".x.partial-checkpoint-12-abc", ".best.ckpt.tmp-12-abcdef01"]
    for name in [partial.name, *kept]:
        (tmp_path / name).write_text("")
    (tmp_path / ".d.ckpt.partial-checkpoint-12-abcdef01").mkdir()  # not a file
    assert remove_partial_saves(tmp_path) == [partial.name]
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == sorted([*kept, ".d.ckpt.partial-checkpoint-12-abcdef01"])
    assert remove_partial_saves(tmp_path / "missing") == []


def test_a_fit_removes_no_temporary_file_of_another_kind_of_job(tmp_path):
    """A score job writing `--output <checkpoint folder>/preds.parquet` writes `.preds.parquet.tmp-<pid>-<hex>`
    there (output_dir.temp_path, as checkpoints are saved): a fit starting meanwhile holds the folder's lock,
    which no score job takes, and must not remove that live file."""
    from mmoe_rec.output_dir import temp_path
    from mmoe_rec.training.checkpoint_lock import lock_checkpoint_folders, release_checkpoint_folders, \
        remove_partial_saves

    tmp = temp_path(tmp_path / "preds.parquet", "tmp")
    tmp.write_bytes(b"half written")
    fds = lock_checkpoint_folders([tmp_path])
    try:
        assert remove_partial_saves(tmp_path) == [] and tmp.exists()
    finally:
        release_checkpoint_folders(fds)
