"""A callback for the 2-process tests (importable by the launched ranks): a checkpoint at a given batch."""
from __future__ import annotations

import lightning as L


class SaveAtBatch(L.Callback):
    """Every rank calls trainer.save_checkpoint (a collective: the module gathers every rank's state) after batch
    `batch` of epoch `epoch`; rank 0 writes `path`."""

    def __init__(self, path: str, epoch: int, batch: int) -> None:
        self.path, self.epoch, self.batch = path, epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            trainer.save_checkpoint(self.path)
