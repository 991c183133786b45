"""ShardedEmbeddingStrategy's settings and checkpoints, in one process (gloo, world size 1) or refused before the fit:

- a checkpoint says whether its tables were trained by a fused embedding optimizer (its sharding type): one whose
  fused state it holds does not resume under data_parallel (that state dropped), one of data_parallel tables (the
  configured optimizer's) resumes under plain DDP / one device;
- fbgemm's fused tables need a multiple of 4 columns a shard: other dims are refused naming the table and feature;
- row_wise / table_row_wise need NCCL: refused on the CPU before the MLflow run.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import MMOE, mlflow_runs
from mmoe_rec.data.datamodule import FeatureDataModule
from mmoe_rec.training.module import MultiTaskModule
from mmoe_rec.training.sharding import SHARDED_OPTIMIZER_KEY, SHARDING_TYPE_KEY, ShardedEmbeddingStrategy

pytestmark = pytest.mark.seeded_mlflow_store  # tmp_path/mlflow.db: a copy of an empty store (tests/conftest.py)

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "mmoe_synthetic.yaml"
TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
        "--trainer.num_sanity_val_steps", "0", "--trainer.log_every_n_steps", "1",
        "--data.init_args.batch_size", "128"]
SHARDED = ["--trainer.strategy", "mmoe_rec.training.sharding.ShardedEmbeddingStrategy"]


def fit(feature_dir: Path, root: Path, epochs: int, strategy=None, ckpt_path=None) -> dict:
    """One process, last.ckpt in `root`: its contents."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(0)
    dm = FeatureDataModule(str(feature_dir), batch_size=200, seed=0)
    module = MultiTaskModule(model=copy.deepcopy(MMOE), feature_spec=dm.spec)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=root,
                        callbacks=[ModelCheckpoint(dirpath=root, save_last=True)],
                        **({"strategy": strategy} if strategy is not None else {}))
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return torch.load(root / "last.ckpt", map_location="cpu", weights_only=False)


def test_a_fused_table_checkpoint_cannot_resume_silently_as_data_parallel(feature_dir, tmp_path):
    """A table_wise checkpoint's tables were trained by the fused exact_adagrad, whose state it holds; resumed with
    sharding_type data_parallel the tables would be trained by the configured optimizer from scratch and that state
    dropped (what plain ddp is refused for): refused, naming both. The resume ran without a word before."""
    saved = fit(feature_dir, tmp_path / "first", 1, ShardedEmbeddingStrategy(sharding_type="table_wise"))
    assert any(saved[SHARDED_OPTIMIZER_KEY].values())  # the fused Adagrad's accumulators
    with pytest.raises(ValueError, match="sharded table_wise and trained by fbgemm's fused exact_adagrad.*"
                                         "sharding_type data_parallel would .* drop it"):
        fit(feature_dir, tmp_path / "resumed", 2, ShardedEmbeddingStrategy(sharding_type="data_parallel"),
            ckpt_path=tmp_path / "first" / "last.ckpt")
    # one written before the sharding type was recorded: its state says the same
    assert saved.pop(SHARDING_TYPE_KEY) == "table_wise"
    torch.save(saved, tmp_path / "old.ckpt")
    with pytest.raises(ValueError, match="sharded table_wise or column_wise .* sharding_type data_parallel"):
        fit(feature_dir, tmp_path / "old", 2, ShardedEmbeddingStrategy(sharding_type="data_parallel"),
            ckpt_path=tmp_path / "old.ckpt")


def test_a_data_parallel_checkpoint_resumes_under_plain_ddp(feature_dir, tmp_path):
    """data_parallel tables are trained by the configured optimizer, whose state holds theirs: its checkpoint was
    refused under plain DDP as if it held fused state, with advice (ddp_sharded_embeddings) that then failed under
    the default table_wise. It resumes, ending close to a straight data_parallel fit (fbgemm's dense kernel pools
    in another order than torch's EmbeddingBag, so not bitwise)."""
    first = fit(feature_dir, tmp_path / "first", 1, ShardedEmbeddingStrategy(sharding_type="data_parallel"))
    straight = fit(feature_dir, tmp_path / "straight", 2, ShardedEmbeddingStrategy(sharding_type="data_parallel"))
    resumed = fit(feature_dir, tmp_path / "resumed", 2, ckpt_path=tmp_path / "first" / "last.ckpt")
    assert resumed["global_step"] == straight["global_step"] > first["global_step"]
    for key, value in straight["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert first[SHARDING_TYPE_KEY] == "data_parallel" and SHARDED_OPTIMIZER_KEY not in first


def test_a_data_parallel_checkpoint_cannot_resume_fused_tables_and_says_why():
    class FusedOptimizer:  # stands in for DMP's fused optimizer: one table with Adagrad state
        def state_dict(self):
            return {"state": {"t_user": {"t_user.momentum1": torch.ones(2)}}}

    strategy = ShardedEmbeddingStrategy(sharding_type="column_wise")
    strategy._fused_optimizer = lambda: FusedOptimizer()
    with pytest.raises(RuntimeError, match="written with sharding_type data_parallel.* sharding_type 'column_wise' "
                                           "to take over; resume it with sharding_type data_parallel or "
                                           "--trainer.strategy ddp"):
        strategy.load_optimizer_state_dict({"optimizer_states": [], SHARDING_TYPE_KEY: "data_parallel"})


@pytest.mark.parametrize("sharding_type", ["table_wise", "column_wise"])
@pytest.mark.parametrize("model_args,named", [({"embedding_dim": 6}, "t_user (feature user): dim 6"),
                                              ({"embedding_dims": {"tags": 3}}, "t_tags (feature tags): dim 3")],
                         ids=["dim-6", "one-table-dim-3"])
def test_a_fused_sharded_table_whose_dim_is_not_a_multiple_of_4_is_refused_naming_it(feature_dir, tmp_path,
                                                                                      model_args, named,
                                                                                      sharding_type):
    """fbgemm's fused tables need a multiple of 4 columns a shard: torchrec asserted it deep in DMP's setup on every
    rank ("AssertionError: table t_user has local_cols=6 not divisible by 4", ~100 lines of traceback each).
    Refused with a ValueError naming the table, its feature and the way out."""
    dm = FeatureDataModule(str(feature_dir), batch_size=100, seed=0)
    model = copy.deepcopy(MMOE)
    model["init_args"].update(model_args)
    module = MultiTaskModule(model=model, feature_spec=dm.spec)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=tmp_path, strategy=ShardedEmbeddingStrategy(sharding_type=sharding_type))
    with pytest.raises(ValueError, match=f"need a multiple of 4 columns; not so for .*{re.escape(named)}.*"
                                         f"sharding_type data_parallel"):
        trainer.fit(module, dm)


def test_shard_module_refuses_a_fused_dim_not_a_multiple_of_4_and_data_parallel_takes_it(tmp_path):
    """The backstop for a DMP set up without the strategy: one gloo process."""
    import torch.distributed as dist

    from mmoe_rec.features.spec import FeatureSpec, SparseFeature, Task
    from mmoe_rec.nn.embedding import EmbeddingFront
    from mmoe_rec.training.sharding import shard_module

    spec = FeatureSpec([SparseFeature("user", 5), SparseFeature("item", 6)], ["d"], [Task("y")]).finalize()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match=r"not so for t_fused \(features user, item\): dim 6"):
            shard_module(EmbeddingFront(spec, embedding_dim=6), "column_wise", torch.device("cpu"))
        front = EmbeddingFront(spec, embedding_dim=6)
        shard_module(front, "data_parallel", torch.device("cpu"))  # plain parameters: any dim
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("override, expected", [
    (["--model.init_args.model.init_args.embedding_dim", "6"],
     "need a multiple of 4 columns; not so for t_user (feature user): dim 6"),
    ([*SHARDED, "--trainer.strategy.init_args.sharding_type", "row_wise"],
     "sharding_type 'row_wise' needs the NCCL backend (GPUs)"),
    ([*SHARDED, "--trainer.strategy.init_args.sharding_type", "table_row_wise"],
     "sharding_type 'table_row_wise' needs the NCCL backend"),
])
def test_sharded_settings_the_tables_or_device_cannot_take_are_refused_before_the_run(feature_dir, tmp_path, capsys,
                                                                                    monkeypatch, override, expected):
    """They were refused at setup (the dims by an AssertionError inside torchrec), after the MLflow run was made
    (left FAILED) and on every rank."""
    from mmoe_rec.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    strategy = [] if "--trainer.strategy" in override else ["--trainer.strategy", "ddp_sharded_embeddings"]
    code = main(["fit", "--config", str(CONFIG), *TINY, "--data.init_args.data_dir", str(feature_dir),
                 "--trainer.accelerator", "cpu", "--checkpoint_dir", str(tmp_path / "ck"), *strategy, *override])
    err = capsys.readouterr().err
    assert code == 1 and expected in err, err[-3000:]
    assert not (tmp_path / "mlflow.db").exists() or not mlflow_runs(tmp_path / "mlflow.db")
