"""Test helper callbacks (imported by the DDP subprocess via PYTHONPATH): one rank fails in on_fit_end, or aborts
as its process exits after its work is done (as the gloo exit race in mmoe_rec/training/gloo_exit.py does)."""
import atexit
import os

import lightning as L


class FailOnRank(L.Callback):
    def __init__(self, rank: int = 1) -> None:
        self.rank = rank

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == self.rank:
            raise RuntimeError(f"rank {self.rank} fails in on_fit_end")


class AbortAtExit(L.Callback):
    def __init__(self, rank: int = 1) -> None:
        self.rank = rank

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == self.rank:
            atexit.register(os.abort)
