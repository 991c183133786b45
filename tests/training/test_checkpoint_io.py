"""Checkpoints are written whole or not at all (mmoe_rec/training/checkpoint_io.py)."""
from __future__ import annotations

import errno

import lightning as L
import pytest
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import MMOE
from mmoe_rec.data.datamodule import FeatureDataModule
from mmoe_rec.training.checkpoint_io import AtomicCheckpointIO, use_atomic_checkpoints
from mmoe_rec.training.module import MultiTaskModule


class FullDisk:
    """Pickles as far as a few bytes, then fails as a full disk does (a write that runs out of space)."""

    def __reduce__(self):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_save_leaves_the_earlier_checkpoint_and_no_temporary_file(tmp_path):
    """Lightning's save wrote under $TMPDIR and moved the file: a copy across file systems, which a full disk cut
    short at the final path (a truncated best.ckpt over the good one; review 2026-12-07)."""
    io = AtomicCheckpointIO()
    target = tmp_path / "ck" / "best.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.arange(5)}, "step": 1}, target)
    good = target.read_bytes()
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"state_dict": {"w": torch.arange(5)}, "step": 2, "blob": FullDisk()}, target)
    assert target.read_bytes() == good
    assert sorted(p.name for p in target.parent.iterdir()) == ["best.ckpt"]
    io.save_checkpoint({"step": 3}, target)  # and a later save replaces it
    assert torch.load(target, weights_only=False)["step"] == 3


def test_a_fit_of_the_module_saves_through_it_unless_another_checkpoint_io_was_chosen(feature_dir, tmp_path):
    dm = FeatureDataModule(str(feature_dir), batch_size=256, seed=0)
    module = MultiTaskModule(model=MMOE, feature_spec=dm.spec)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, logger=False, callbacks=[ckpt],
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, dm)
    assert type(trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    assert torch.load(ckpt.last_model_path, weights_only=False)["global_step"] == 2
    assert not [p for p in (tmp_path / "ck").iterdir() if ".tmp-" in p.name]

    class Mine(TorchCheckpointIO):
        pass

    trainer = L.Trainer(plugins=[Mine()], logger=False)
    use_atomic_checkpoints(trainer)
    assert type(trainer.strategy.checkpoint_io) is Mine
