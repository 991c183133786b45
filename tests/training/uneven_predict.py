"""A data module whose predict split is read by rank 0 alone: the other ranks get no batch. Ours refuses to leave
a rank without rows, and Lightning refuses a loader whose length is 0 on a rank, but loaders of unknown length
(streams) may end without a batch on some rank."""
from __future__ import annotations

from mmoe_rec.data.datamodule import FeatureDataModule


class _Stream:
    """The batches of `loader`, or none, without a length (Lightning checks lengths with a collective, so every
    rank's loader must have one or none)."""

    def __init__(self, loader=None) -> None:
        self.loader = loader

    def __iter__(self):
        return iter(self.loader if self.loader is not None else ())


class RankZeroPredicts(FeatureDataModule):
    def predict_dataloader(self):
        if self.trainer.global_rank == 0:
            return _Stream(self.dataloader(self.predict_split, with_ids=True, rank=0, world_size=1))
        return _Stream()
