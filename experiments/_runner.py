"""Train one model on one feature folder and return its test metrics: shared by the results scripts."""
from __future__ import annotations

import tempfile
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from mmoe_rec.data.datamodule import FeatureDataModule
from mmoe_rec.training.module import MultiTaskModule


def train_and_test(
    data_dir: str,
    model: dict[str, Any],
    *,
    seed: int,
    max_epochs: int,
    monitor: str,
    mode: str = "max",
    patience: int = 2,
    batch_size: int = 1024,
    lr: float = 1e-3,
    logger: Any = False,
    threads: int | None = None,
    weight_decay: float = 0.0,
) -> dict[str, float]:
    """Fit with early stopping on `monitor` (validation split), then test the best checkpoint on the test split."""
    if threads:
        torch.set_num_threads(threads)  # small models: one thread each avoids OpenMP oversubscription on 2 cores
    L.seed_everything(seed, workers=True, verbose=False)
    dm = FeatureDataModule(data_dir, batch_size=batch_size, seed=seed)
    module = MultiTaskModule(model=model, feature_spec=dm.spec,
                             optimizer={"class_path": "torch.optim.Adam",
                                        "init_args": {"lr": lr, "weight_decay": weight_decay}})
    with tempfile.TemporaryDirectory() as ckpt_dir:
        checkpoint = ModelCheckpoint(dirpath=ckpt_dir, monitor=monitor, mode=mode)
        trainer = L.Trainer(
            max_epochs=max_epochs, accelerator="cpu", devices=1, logger=logger, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[checkpoint, EarlyStopping(monitor, mode=mode, patience=patience)],
            deterministic=False,
        )
        trainer.fit(module, datamodule=dm)
        (result,) = trainer.test(module, datamodule=dm, ckpt_path=checkpoint.best_model_path, verbose=False)
    result = {k: float(v) for k, v in result.items()}
    result["epochs"] = trainer.current_epoch
    result["params"] = sum(p.numel() for p in module.model.parameters())
    return result
