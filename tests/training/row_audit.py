"""Test helper callback (imported by the DDP subprocess via PYTHONPATH): per rank and epoch, the number of
training rows seen and the sum of the dense feature d0 over them, appended to OUT_DIR/rank<r>.jsonl; and per
step, the rank's own training loss beside the latest `train/loss` logged (NaN before the first log); and a digest
of the rank's torch generator state as the epoch starts."""
import hashlib
import json
from pathlib import Path

import lightning as L


class RowAudit(L.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.rows = 0
        self.d0 = 0.0
        self.losses: list[list[float]] = []  # [global step, own loss, logged train/loss]

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        import torch

        self.rows, self.d0, self.losses = 0, 0.0, []
        self.rng = hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rows += batch.batch_size
        self.d0 += float(batch.dense[:, 0].double().sum())
        logged = trainer.callback_metrics.get("train/loss")
        self.losses.append([trainer.global_step, float(outputs["loss"]),
                            float("nan") if logged is None else float(logged)])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps({"epoch": trainer.current_epoch, "rows": self.rows, "d0": self.d0,
                                "losses": self.losses, "rng": self.rng}) + "\n")
