"""Test helper callback (imported by the DDP subprocess via PYTHONPATH): raises on one rank in one hook."""
import lightning as L


class FailOnRank(L.Callback):
    def __init__(self, rank: int = 1, hook: str = "on_fit_end") -> None:
        self.rank, self.hook = rank, hook

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == self.rank and self.hook == "on_fit_end":
            raise RuntimeError(f"rank {self.rank} fails in on_fit_end")
