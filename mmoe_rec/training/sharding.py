"""Large embedding tables: shard the model's torchrec EmbeddingBagCollections with DistributedModelParallel (DMP).

    mmoe-rec fit --config configs/mmoe_synthetic.yaml --trainer.devices 2 --trainer.accelerator cpu \
        --trainer.strategy ddp_sharded_embeddings          # table-wise; or in YAML:
    trainer:
      strategy:
        class_path: mmoe_rec.training.sharding.ShardedEmbeddingStrategy
        init_args: {sharding_type: table_wise}

`ShardedEmbeddingStrategy` is Lightning's DDP strategy with one change: instead of wrapping the LightningModule
in DistributedDataParallel it wraps it in torchrec's DMP, which replaces every EmbeddingBagCollection in place by
a sharded one (tables placed by `EmbeddingShardingPlanner` under a sharding-type constraint, lookups exchanged
with all-to-all) and wraps the rest of the module (experts, gates, towers) in DDP. Tables use the DENSE compute
kernel (plain parameters, updated by the configured optimizer), which is what runs on CPU.

What runs where (torch 2.13 CPU, torchrec 1.8, fbgemm-gpu-cpu 1.8, 2 gloo processes, 2026-11-23):
- table_wise: trains under Lightning (tests/training/test_ddp.py), checkpoint reloads unsharded.
- column_wise, data_parallel: sharded forward + backward seen working by hand (2 processes, MMoE on the tiny
  feature dir); not covered by a test.
- row_wise, table_row_wise (and grid_shard): torchrec's EmbeddingBagCollectionSharder offers them only for
  compute device "cuda", so the planner finds no plan on CPU: they need GPUs (NCCL).

Checkpoints: `lightning_module_state_dict` gathers every sharded table to rank 0 as a full tensor, so a
checkpoint written under this strategy loads into an unsharded `MultiTaskModule` (for scoring / the registry).
Resuming training *under* sharding from such a checkpoint is not supported by this minimal path (the optimizer
state of sharded tables stays per rank); resume with plain DDP, or start a fresh sharded run.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel")

# Observed with 2 CPU processes on gloo (see the module docstring); "nccl" = needs NCCL / GPUs.
SHARDING_SUPPORT = {
    "table_wise": "gloo",
    "column_wise": "gloo",
    "data_parallel": "gloo",
    "row_wise": "nccl",
    "table_row_wise": "nccl",
}


def embedding_tables(module: nn.Module) -> list[str]:
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    names = []
    for m in module.modules():
        if isinstance(m, EmbeddingBagCollection):
            names += [cfg.name for cfg in m.embedding_bag_configs()]
    return names


def shard_module(
    module: nn.Module, sharding_type: str, device: torch.device, pg=None,
    embedding_optimizer: str = "exact_adagrad", embedding_lr: float = 0.01,
) -> nn.Module:
    """Wrap `module` in DMP with every table constrained to `sharding_type`; collective (all ranks call it).

    Model-parallel tables use torchrec's FUSED kernel (fbgemm TBE; the only one torchrec offers for them on CPU):
    their optimizer runs inside the backward (`embedding_optimizer`, `embedding_lr`: an fbgemm EmbOptimType
    value), not in the configured torch optimizer. data_parallel tables are plain (DENSE) parameters updated
    by the configured optimizer.
    """
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    from torchrec.distributed.embedding_types import EmbeddingComputeKernel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.distributed.types import ShardingEnv

    if sharding_type not in SHARDING_TYPES:
        raise ValueError(f"unknown sharding_type {sharding_type!r}; choose one of {SHARDING_TYPES}")
    pg = pg or dist.group.WORLD
    backend = dist.get_backend(pg)
    if SHARDING_SUPPORT[sharding_type] == "nccl" and backend != "nccl":
        raise ValueError(
            f"sharding_type {sharding_type!r} needs the NCCL backend (GPUs); on {backend} use one of "
            f"{[k for k, v in SHARDING_SUPPORT.items() if v == 'gloo']}"
        )
    tables = embedding_tables(module)
    if not tables:
        raise ValueError("ShardedEmbeddingStrategy: the model has no torchrec EmbeddingBagCollection to shard")
    dense = sharding_type == "data_parallel"
    kernel = EmbeddingComputeKernel.DENSE.value if dense else EmbeddingComputeKernel.FUSED.value
    constraints = {t: ParameterConstraints(sharding_types=[sharding_type], compute_kernels=[kernel]) for t in tables}
    env = ShardingEnv.from_process_group(pg)
    fused = None if dense else {"optimizer": EmbOptimType(embedding_optimizer), "learning_rate": embedding_lr}
    sharders = [EmbeddingBagCollectionSharder(fused_params=fused)]
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=env.world_size, compute_device=device.type), constraints=constraints
    )
    plan = planner.collective_plan(module, sharders, pg)
    return DistributedModelParallel(module, env=env, device=device, plan=plan, sharders=sharders)


def _is_sharded(value: Any) -> bool:
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    return isinstance(value, ShardedTensor)


class ShardedEmbeddingStrategy(DDPStrategy):
    """DDP for the dense part, torchrec sharding for the embedding tables (see the module docstring)."""

    strategy_name = "ddp_sharded_embeddings"

    def __init__(
        self, sharding_type: str = "table_wise", embedding_optimizer: str = "exact_adagrad",
        embedding_lr: float = 0.01, **kwargs: Any,
    ) -> None:
        if sharding_type not in SHARDING_TYPES:
            raise ValueError(f"unknown sharding_type {sharding_type!r}; choose one of {SHARDING_TYPES}")
        super().__init__(**kwargs)
        self.sharding_type = sharding_type
        self.embedding_optimizer = embedding_optimizer
        self.embedding_lr = embedding_lr

    def _setup_model(self, model: nn.Module) -> nn.Module:
        return shard_module(model, self.sharding_type, self.root_device,
                            embedding_optimizer=self.embedding_optimizer, embedding_lr=self.embedding_lr)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Full tensors on rank 0 (collective: every rank takes part in each gather)."""
        state = self.lightning_module.state_dict()
        out = {}
        for key, value in state.items():
            if _is_sharded(value):
                full = torch.empty(value.size(), dtype=value.dtype) if self.global_rank == 0 else None
                value.gather(dst=0, out=full)
                value = full
            out[key] = value
        return out

    def teardown(self) -> None:
        pl_module = self.lightning_module
        if pl_module is not None and self.model is not pl_module:
            self.model = pl_module  # unwrap DMP before Lightning's teardown
        super().teardown()


def register_strategy() -> None:
    """Make `--trainer.strategy ddp_sharded_embeddings` (table-wise) a name Lightning knows."""
    from lightning.pytorch.strategies import StrategyRegistry

    if ShardedEmbeddingStrategy.strategy_name not in StrategyRegistry:
        StrategyRegistry.register(
            ShardedEmbeddingStrategy.strategy_name, ShardedEmbeddingStrategy,
            description="DDP + torchrec table-wise sharded embedding tables", sharding_type="table_wise",
        )
