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
    patience: int | None = 2,
    batch_size: int = 1024,
    lr: float = 1e-3,
    logger: Any = False,
    threads: int | None = None,
    weight_decay: float = 0.0,
    eval_train: bool = False,
) -> dict[str, float]:
    """Fit with early stopping on `monitor` (validation split), then test the best checkpoint on the test split.

    patience=None: no early stopping, all `max_epochs` are trained and the final weights are tested.
    eval_train: also evaluate the tested weights on the training split (its metrics come back as `train_eval/...`).
    """
    if threads:
        torch.set_num_threads(threads)  # small models: one thread each avoids OpenMP oversubscription on 2 cores
    L.seed_everything(seed, workers=True, verbose=False)
    dm = FeatureDataModule(data_dir, batch_size=batch_size, seed=seed)
    module = MultiTaskModule(model=model, feature_spec=dm.spec,
                             optimizer={"class_path": "torch.optim.Adam",
                                        "init_args": {"lr": lr, "weight_decay": weight_decay}})
    with tempfile.TemporaryDirectory() as ckpt_dir:
        checkpoint = ModelCheckpoint(dirpath=ckpt_dir, monitor=monitor, mode=mode)
        callbacks = [checkpoint] if patience is None else [checkpoint, EarlyStopping(monitor, mode=mode,
                                                                                      patience=patience)]
        trainer = L.Trainer(
            max_epochs=max_epochs, accelerator="cpu", devices=1, logger=logger, enable_progress_bar=False,
            enable_model_summary=False, callbacks=callbacks, deterministic=False,
        )
        trainer.fit(module, datamodule=dm)
        tested = checkpoint.best_model_path if patience is not None else None  # None: the weights as trained
        # the monitored validation metric of the tested checkpoint (what a selection on validation reads)
        best_monitor = None if tested is None else float(checkpoint.best_model_score)
        (result,) = trainer.test(module, datamodule=dm, ckpt_path=tested, verbose=False)
        if eval_train:  # the validation step's metrics, computed over the training split
            (on_train,) = trainer.validate(module, dataloaders=dm.train_dataloader(), verbose=False)
            result.update({k.replace("val/", "train_eval/", 1): v for k, v in on_train.items()})
    result = {k: float(v) for k, v in result.items()}
    result["epochs"] = trainer.current_epoch
    if best_monitor is not None:
        result["best_monitor"] = best_monitor
    result["params"] = sum(p.numel() for p in module.model.parameters())
    return result
