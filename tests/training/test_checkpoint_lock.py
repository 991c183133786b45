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
