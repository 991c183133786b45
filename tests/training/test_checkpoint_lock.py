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
    from mmoe_rec.training.checkpoint_lock import remove_partial_saves

    partial = temp_path(tmp_path / "epoch=3-step=40.ckpt", "tmp")  # AtomicCheckpointIO's name for a save
    kept = [".lock", "best.ckpt", ".best.ckpt.old-12-abcdef01", "best.ckpt.tmp-12-abcdef01", ".x.tmp-12-abc"]
    for name in [partial.name, *kept]:
        (tmp_path / name).write_text("")
    (tmp_path / ".d.ckpt.tmp-12-abcdef01").mkdir()  # not a file
    assert remove_partial_saves(tmp_path) == [partial.name]
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == sorted([*kept, ".d.ckpt.tmp-12-abcdef01"])
    assert remove_partial_saves(tmp_path / "missing") == []
