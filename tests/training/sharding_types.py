"""One sharded fit per sharding type named on the command line, in ranks forked from this process (2 CPU processes,
gloo), each from the same seeded module; prints one JSON line per fit: where each table's shards lay on each rank.

    python sharding_types.py FEATURE_DIR OUT_DIR MODEL_JSON table_wise column_wise ...

Each fit's checkpoint is OUT_DIR/<sharding type>/last.ckpt (tables and fused optimizer state gathered in full).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from mmoe_rec.data.datamodule import FeatureDataModule
from mmoe_rec.training.module import MultiTaskModule
from mmoe_rec.training.sharding import ShardedEmbeddingStrategy


class ShardLayout(Callback):
    """Writes, per rank, the (offsets, sizes) of the table shards the rank holds once DMP has sharded the module."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir

    def on_train_start(self, trainer, pl_module) -> None:
        from torch.distributed._shard.sharded_tensor import ShardedTensor

        layout = {}
        for key, value in trainer.strategy.model.state_dict().items():
            if ".embedding_bags." not in key:
                continue
            if isinstance(value, ShardedTensor):
                layout[key] = [[list(s.metadata.shard_offsets), list(s.metadata.shard_sizes)]
                               for s in value.local_shards()]
            else:  # a replicated (data_parallel) table: the whole of it on every rank
                layout[key] = [[[0] * value.dim(), list(value.shape)]]
        (self.out_dir / f"layout_rank{trainer.global_rank}.json").write_text(json.dumps(layout))


def fit(data_dir: str, out_dir: Path, model: dict, sharding_type: str) -> dict:
    out_dir.mkdir(parents=True)
    L.seed_everything(0)
    dm = FeatureDataModule(data_dir, batch_size=64, seed=0)
    module = MultiTaskModule(model=model, feature_spec=dm.spec)
    before = {k: v.clone() for k, v in module.state_dict().items() if ".embedding_bags." in k}
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=out_dir,
                        strategy=ShardedEmbeddingStrategy(sharding_type=sharding_type, start_method="fork"),
                        callbacks=[ModelCheckpoint(dirpath=out_dir, save_last=True), ShardLayout(out_dir)])
    trainer.fit(module, dm)
    after = module.state_dict()  # given back by rank 0 at the end of the fit
    trained = [k for k in before if not torch.equal(after[k], before[k])]
    return {"sharding_type": sharding_type, "trained": sorted(trained),
            "layout": {rank: json.loads((out_dir / f"layout_rank{rank}.json").read_text()) for rank in (0, 1)}}


if __name__ == "__main__":
    data_dir, out, model = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    for sharding_type in sys.argv[4:]:
        print(json.dumps(fit(data_dir, out / sharding_type, model, sharding_type)), flush=True)
