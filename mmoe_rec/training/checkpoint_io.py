"""Checkpoints written whole or not at all."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from fsspec.implementations.local import LocalFileSystem

from mmoe_rec.output_dir import temp_path
from mmoe_rec.training.checkpoint_lock import PARTIAL_SAVE_KIND


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temporary file beside the target (`.<name>.tmp-<pid>-<random>`), synced, then renamed over
    it.

    Lightning's own save goes through fsspec's transaction, which writes the file under $TMPDIR and then moves it:
    a copy where the checkpoint folder is on another file system (a tmpfs /tmp, the usual case), so a full disk
    left a truncated best.ckpt at its final path, over the good one. Remote paths (s3://, gs://, ...) and a call
    with storage options keep Lightning's way."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        path = Path(str(path).removeprefix("file://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(path, PARTIAL_SAVE_KIND)
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise


def use_atomic_checkpoints(trainer: Any) -> None:
    """Give the trainer's strategy AtomicCheckpointIO where it has Lightning's default (another CheckpointIO a user
    configured, async or remote, is left alone)."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
