"""check_checkpoint_file: a path that is no checkpoint is named, with what it is, before torch.load reads it."""
from __future__ import annotations

import pytest
import torch

from mmoe_rec.training.checkpoint_file import check_checkpoint_file


def lightning_like(state_dict: dict) -> dict:
    return {"state_dict": state_dict, "pytorch-lightning_version": "2.6.6", "epoch": 0}


def test_a_torch_save_file_passes_and_lightnings_own_names_are_left_to_it(tmp_path):
    torch.save(lightning_like({"w": torch.ones(2)}), tmp_path / "good.ckpt")
    check_checkpoint_file(tmp_path / "good.ckpt")
    for name in ("last", "best", "hpc", "registry", "registry:model:latest", "s3://bucket/x.ckpt"):
        check_checkpoint_file(name)


def test_a_home_relative_path_is_expanded_as_lightning_expands_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    torch.save(lightning_like({}), tmp_path / "good.ckpt")
    check_checkpoint_file("~/good.ckpt")  # it was "no such file"


def test_files_that_are_no_checkpoint_are_named(tmp_path):
    torch.save(lightning_like({"w": torch.ones(1000)}), tmp_path / "good.ckpt")
    data = (tmp_path / "good.ckpt").read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])  # torch.load: "[Errno 22] Invalid argument"
    (tmp_path / "empty.ckpt").write_bytes(b"")  # a bare EOFError
    (tmp_path / "text.ckpt").write_text("hello\n")  # "KeyError: 101"
    (tmp_path / "folder.ckpt").mkdir()
    for name, match in (("truncated", "truncated or another kind of file"), ("empty", "an empty file"),
                        ("text", "not a checkpoint written by `mmoe-rec fit`"), ("folder", "a folder")):
        with pytest.raises(ValueError, match=match) as info:
            check_checkpoint_file(tmp_path / f"{name}.ckpt")
        assert str(tmp_path / f"{name}.ckpt") in str(info.value)
    with pytest.raises(FileNotFoundError, match="no such file"):
        check_checkpoint_file(tmp_path / "nope.ckpt")


def test_a_torch_save_file_that_is_no_lightning_checkpoint_is_named(tmp_path):
    """A bare state_dict (or a registered package's weights.pt) passed the zip check and failed after the MLflow run
    was made, with Lightning's `KeyError: 'pytorch-lightning_version'`."""
    torch.save({"model.w": torch.ones(3)}, tmp_path / "weights.pt")
    torch.save({"state_dict": {"w": torch.ones(3)}}, tmp_path / "half.ckpt")
    for name in ("weights.pt", "half.ckpt"):
        with pytest.raises(ValueError, match="a file written by torch.save, but not a Lightning checkpoint") as info:
            check_checkpoint_file(tmp_path / name)
        assert str(tmp_path / name) in str(info.value)


def test_a_zip_archive_without_a_pickle_is_named_as_such(tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "archive.ckpt", "w") as archive:
        archive.writestr("notes.txt", "hello")
    with pytest.raises(ValueError, match="a PyTorch checkpoint is a zip archive with a data.pkl; this file"):
        check_checkpoint_file(tmp_path / "archive.ckpt")
