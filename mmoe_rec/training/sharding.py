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
with all-to-all) and wraps the rest of the module (experts, gates, towers) in DDP. Sharded tables use torchrec's
FUSED kernel (fbgemm's table-batched embedding, the only one torchrec offers for them on CPU): their optimizer
runs inside the backward and is the strategy's own, `embedding_optimizer` at `embedding_lr` (default exact
Adagrad at 0.01), not the configured torch optimizer, whose class, lr, weight decay and scheduler train the dense
part only (fbgemm has no CPU kernel for Adam). The strategy says so in a warning when it shards. data_parallel
tables are plain (DENSE) parameters, trained by the configured optimizer.

What runs where (torch 2.13 CPU, torchrec 1.8, fbgemm-gpu-cpu 1.8, 2 gloo processes, 2026-11-23):
- table_wise: trains under Lightning (tests/training/test_ddp.py), checkpoint reloads unsharded; with each rank a
  process of its own (start_method popen, the default) or forked from the launching process (start_method fork,
  as in a notebook; spawn takes the same path), whose unsharded module gets the trained tables back in full.
- column_wise, data_parallel: train under Lightning (tests/training/test_ddp.py: tables of 256 columns split in
  two halves, one per rank, end an epoch with the tables and fused Adagrad state of table_wise, bitwise;
  data_parallel tables whole on every rank, trained by the configured optimizer; resuming them exactly was seen
  by hand, 2026-12-06). column_wise splits a table's columns only from 256 of them (torchrec's minimum shard
  width, 128, not configurable here): at this project's usual embedding dims (4-16) each table is one shard,
  placed as table_wise would. A row-wise optimizer's state (exact_row_wise_adagrad) then has one value per row
  and column shard: resume such a run under the same sharding_type.
- Memory: every rank builds the whole model and broadcasts every full table before DMP shards them (a peak of
  about 3x the tables per rank, measured); sharding spreads the tables' training state and lookups, not this
  start-up peak: tables larger than one rank's memory do not fit yet. Checkpoints gather the tables on rank 0 only.
- The fused tables step inside every backward: `accumulate_grad_batches` > 1 is refused with them (data_parallel
  tables take it), and gradient clipping does not reach them.
- row_wise, table_row_wise (and grid_shard): torchrec's EmbeddingBagCollectionSharder offers them only for
  compute device "cuda", so the planner finds no plan on CPU: they need GPUs (NCCL); refused on the CPU.
- Fused tables need a multiple of 4 columns in every shard (torchrec asserts it as DMP builds them, on every rank):
  refused before, naming the tables (`check_table_dims`). column_wise shards are multiples of 4 wide that divide
  the dim, or the whole table, so the rule is the same for it. data_parallel tables take any dim.
- Precision: torchrec builds the tables (fused or data_parallel) from their config's data type, float32, whatever
  the module's dtype (fbgemm has no float64 tables): under 64-true / bf16-true they and the fused optimizer state
  stay float32 (seen 2026-12-08, one process); the dense part takes the precision.
- On GPUs any sharding needs fbgemm's CUDA kernels, which the pinned fbgemm-gpu-cpu does not have: install the
  CUDA build fbgemm-gpu in its place (`require_fbgemm_kernels` refuses to shard without them). Never run on a
  GPU: the project's one GPU check (H100, 2026-11-24, README) did not cover sharding.

Checkpoints: `lightning_module_state_dict` gathers every sharded table to rank 0 as a full tensor, so a
checkpoint written under this strategy loads into an unsharded `MultiTaskModule` (for scoring / the registry).
The fused embedding optimizer's state (e.g. Adagrad's accumulators, one per table row) is gathered the same way
into the checkpoint under `SHARDED_OPTIMIZER_KEY`. Resuming under this strategy (`--ckpt_path`) restores after
DMP has sharded the module (DMP builds fresh tables, so weights loaded before it would be lost): each rank copies
its own shards out of the full tables and optimizer state, and the run continues exactly as if it had not
stopped (tests/training/test_ddp.py). A checkpoint without that state (from plain DDP) cannot resume a sharded
run: the embedding optimizers differ; it is refused with a clear error. The checkpoint records its sharding type
(`SHARDING_TYPE_KEY`): data_parallel tables have no fused state (the configured optimizer's state holds theirs),
so theirs resumes under plain DDP, and a checkpoint whose fused state would be dropped does not resume them.
"""
from __future__ import annotations

import importlib
import math
from typing import Any, Mapping

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel")

# fbgemm's fused optimizers with a CPU kernel (split_table_batched_embeddings_ops_training, fbgemm-gpu-cpu 1.8)
CPU_EMBEDDING_OPTIMIZERS = ("exact_adagrad", "exact_row_wise_adagrad", "exact_sgd", "ema_in_place_row_wise_adagrad")

SHARDED_OPTIMIZER_KEY = "sharded_embedding_optimizer"  # checkpoint entry: {table key: {state name: full tensor}}
SHARDED_OPTIMIZER_KIND_KEY = "sharded_embedding_optimizer_kind"  # checkpoint entry: the embedding_optimizer name
SHARDING_TYPE_KEY = "sharded_embedding_sharding_type"  # checkpoint entry: the sharding_type it was written under

# Observed with 2 CPU processes on gloo (see the module docstring); "nccl" = needs NCCL / GPUs.
SHARDING_SUPPORT = {
    "table_wise": "gloo",
    "column_wise": "gloo",
    "data_parallel": "gloo",
    "row_wise": "nccl",
    "table_row_wise": "nccl",
}


def _tables(module: nn.Module) -> list[tuple[str, str]]:
    """(table name, its weight's state_dict key) of every EmbeddingBagCollection table in `module`."""
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    out = []
    for name, m in module.named_modules():
        if isinstance(m, EmbeddingBagCollection):
            prefix = f"{name}." if name else ""
            out += [(cfg.name, f"{prefix}embedding_bags.{cfg.name}.weight") for cfg in m.embedding_bag_configs()]
    return out


def embedding_tables(module: nn.Module) -> list[str]:
    return [table for table, _ in _tables(module)]


FUSED_COLUMN_MULTIPLE = 4  # fbgemm's fused tables: each shard's columns (torchrec asserts it when DMP builds them)


def check_table_dims(module: nn.Module, sharding_type: str) -> None:
    """Refuse tables the fused kernel cannot hold: torchrec asserted it deep in DMP's setup, on every rank.
    column_wise cuts a table into shards whose width is a multiple of 4 dividing its dim, or keeps it whole,
    so the same rule holds for it. data_parallel tables are plain parameters: any dim."""
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    if sharding_type == "data_parallel":
        return
    bad = [f"{cfg.name} (feature{'s' * (len(cfg.feature_names) > 1)} {', '.join(cfg.feature_names)}): dim "
           f"{cfg.embedding_dim}"
           for m in module.modules() if isinstance(m, EmbeddingBagCollection)
           for cfg in m.embedding_bag_configs() if cfg.embedding_dim % FUSED_COLUMN_MULTIPLE]
    if bad:
        raise ValueError(
            f"sharding_type {sharding_type!r} puts the embedding tables in fbgemm's fused kernel, whose tables (and "
            f"column shards) need a multiple of {FUSED_COLUMN_MULTIPLE} columns; not so for {'; '.join(bad)}. Give "
            f"them dims that are multiples of {FUSED_COLUMN_MULTIPLE} (model init_args embedding_dim / "
            f"embedding_dims), or use sharding_type data_parallel (tables of any dim, trained by the configured "
            f"optimizer)")


def fused_tables_in(checkpoint: Mapping[str, Any]) -> bool | None:
    """Whether a checkpoint's tables were trained by a fused embedding optimizer (model-parallel sharding): from its
    sharding type; a checkpoint without it (plain DDP, or written before the type was recorded) from its fused
    state. None: an old one with an empty state, data_parallel's or a stateless optimizer's (exact_sgd)."""
    if checkpoint.get(SHARDING_TYPE_KEY) is not None:
        return checkpoint[SHARDING_TYPE_KEY] != "data_parallel"
    if SHARDED_OPTIMIZER_KEY not in checkpoint:
        return False
    return True if any(checkpoint[SHARDED_OPTIMIZER_KEY].values()) else None


FBGEMM_PROBE_OP = "fbgemm::permute_2D_sparse_data"  # the sharded input split's first fbgemm op


def require_fbgemm_kernels(device: torch.device | str) -> None:
    """Refuse to shard on a device whose fbgemm kernels are not installed: this project pins the CPU build
    (fbgemm-gpu-cpu), which registers none for CUDA, so a sharded run on GPUs would fail at its first batch with
    a dispatcher error. On GPUs install the CUDA build instead (fbgemm-gpu of the same version, and torchrec with
    its dependencies)."""
    importlib.import_module("fbgemm_gpu")  # registers the fbgemm ops

    key = {"cuda": "CUDA", "cpu": "CPU"}.get(torch.device(device).type)
    if key and not torch._C._dispatch_has_kernel_for_dispatch_key(FBGEMM_PROBE_OP, key):
        raise RuntimeError(f"the installed fbgemm has no {key} kernels ({FBGEMM_PROBE_OP} has none), so embedding "
                           f"tables cannot be sharded on {device}: this project installs fbgemm-gpu-cpu; on GPUs "
                           "install fbgemm-gpu (the CUDA build, same version) in its place, or train with the "
                           "plain ddp strategy (tables replicated)")


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
    require_fbgemm_kernels(device)
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
    check_table_dims(module, sharding_type)
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
    start = _table_weights(module, pg)  # DMP draws the tables again on the CPU (it copies them only to a GPU)
    sharded = DistributedModelParallel(module, env=env, device=device, plan=plan, sharders=sharders)
    _write_tables(module, start)
    return sharded


@torch.no_grad()
def _table_weights(module: nn.Module, pg) -> dict[str, torch.Tensor]:
    """The tables' weights as the model was built (or loaded) before sharding, rank 0's on every rank: the start
    plain DDP gives the dense part by broadcasting rank 0's parameters. Collective."""
    state = module.state_dict()
    weights = {}
    for _, key in _tables(module):
        weight = state[key].detach().clone()
        dist.broadcast(weight, src=dist.get_global_rank(pg, 0), group=pg)
        weights[key] = weight
    return weights


@torch.no_grad()
def _write_tables(module: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """The weights into the sharded tables: each rank's shards of a model-parallel table, the whole table of a
    data_parallel one (local: no communication)."""
    current = module.state_dict()
    plain = {}
    for key, weight in weights.items():
        if _is_sharded(current[key]):
            copy_into_shards(current[key], weight, key)
        else:
            plain[key] = weight
    if plain:
        result = module.load_state_dict(plain, strict=False)
        if set(plain) & set(result.missing_keys) or result.unexpected_keys:
            raise RuntimeError(f"could not write the embedding tables into the sharded model: unexpected "
                               f"{result.unexpected_keys}")


def _is_sharded(value: Any) -> bool:
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    return isinstance(value, ShardedTensor)


def gather_full(value: Any, rank: int) -> torch.Tensor | None:
    """A ShardedTensor as one full tensor on rank 0 (None elsewhere); collective: every rank must call it."""
    # on the collective's device (CUDA under NCCL, whose gather refuses CPU outputs), then to the CPU
    device = value._get_preferred_device()
    full = torch.empty(value.size(), dtype=value.dtype, device=device) if rank == 0 else None
    value.gather(dst=0, out=full)
    return None if full is None else full.cpu()


def _window(offsets: Any, sizes: Any) -> tuple[slice, ...]:
    """The slices of a full tensor that one shard covers."""
    return tuple(slice(o, o + n) for o, n in zip(offsets, sizes))


def gather_optimizer_state(state: Mapping[str, Mapping[str, Any]], rank: int,
                           world_size: int) -> dict[str, dict[str, torch.Tensor]] | None:
    """{table key: {state name: ShardedTensor}} -> full tensors on rank 0 (None elsewhere); collective.

    Each rank's fused optimizer lists only the tables it holds shards of (table-wise: different tables on
    different ranks), so a per-key ShardedTensor.gather would pair up different tables on different ranks.
    Instead every rank sends its local pieces (global offsets + values) and rank 0 assembles the tables.
    """
    local = []
    for key, per in state.items():
        for name, value in per.items():
            if _is_sharded(value):
                pieces = [(list(s.metadata.shard_offsets), s.tensor.detach().cpu()) for s in value.local_shards()]
                local.append((key, name, tuple(value.size()), value.dtype, pieces))
            else:  # replicated state: the same on every rank
                local.append((key, name, None, None, value.detach().cpu()))
    gathered: list[Any] | None = [None] * world_size if rank == 0 else None
    dist.gather_object(local, gathered, dst=0)
    if gathered is None:
        return None
    full: dict[str, dict[str, torch.Tensor]] = {}
    for entries in gathered:
        for key, name, size, dtype, payload in entries:
            per = full.setdefault(key, {})
            if size is None:
                per[name] = payload
                continue
            table = per.setdefault(name, torch.zeros(size, dtype=dtype))
            for offsets, values in payload:
                table[_window(offsets, values.shape)] = values
    return full


@torch.no_grad()
def copy_into_shards(sharded: Any, full: torch.Tensor, name: str) -> None:
    """Write this rank's shards of `sharded` from the full tensor (local: no communication)."""
    if tuple(full.shape) != tuple(sharded.size()):
        raise ValueError(f"checkpoint entry {name!r} has shape {tuple(full.shape)}, the sharded model expects "
                         f"{tuple(sharded.size())}")
    for shard in sharded.local_shards():
        shard.tensor.copy_(full[_window(shard.metadata.shard_offsets, shard.metadata.shard_sizes)])


class ShardedEmbeddingStrategy(DDPStrategy):
    """DDP for the dense part, torchrec sharding for the embedding tables (see the module docstring)."""

    strategy_name = "ddp_sharded_embeddings"

    def __init__(
        self, sharding_type: str = "table_wise", embedding_optimizer: str = "exact_adagrad",
        embedding_lr: float = 0.01, **kwargs: Any,
    ) -> None:
        if sharding_type not in SHARDING_TYPES:
            raise ValueError(f"unknown sharding_type {sharding_type!r}; choose one of {SHARDING_TYPES}")
        # checked here, when the CLI makes the strategy: before the MLflow run, not at setup (a negative lr trained
        # the tables uphill without a word; an optimizer fbgemm's CPU kernel lacks was a 37-frame traceback)
        try:
            lr = float(embedding_lr)
        except (TypeError, ValueError):
            lr = float("nan")
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"embedding_lr must be a finite number > 0, got {embedding_lr!r}")
        from fbgemm_gpu.split_embedding_configs import EmbOptimType

        known = [e.value for e in EmbOptimType if e.value != "none"]
        if embedding_optimizer not in known:
            raise ValueError(f"unknown embedding_optimizer {embedding_optimizer!r}; fbgemm's fused optimizers are "
                             f"{', '.join(known)} (on the CPU only {', '.join(CPU_EMBEDDING_OPTIMIZERS)})")
        super().__init__(**kwargs)
        self.sharding_type = sharding_type
        self.embedding_optimizer = embedding_optimizer
        self.embedding_lr = embedding_lr

    def check_settings(self, accumulate_grad_batches: int, module: nn.Module | None = None) -> None:
        """Settings this strategy cannot train with, on the device the trainer chose (and the tables of `module`).
        Called by the CLI before the fit (no MLflow run made yet, one process: at setup every rank printed it and
        the run ended FAILED) and again at setup for a Trainer of one's own."""
        if SHARDING_SUPPORT[self.sharding_type] == "nccl" and self.root_device.type == "cpu":
            raise ValueError(
                f"sharding_type {self.sharding_type!r} needs the NCCL backend (GPUs); on the CPU use one of "
                f"{[k for k, v in SHARDING_SUPPORT.items() if v == 'gloo']}")
        if module is not None:
            check_table_dims(module, self.sharding_type)
        if self.sharding_type == "data_parallel":
            return
        if self.root_device.type == "cpu" and self.embedding_optimizer not in CPU_EMBEDDING_OPTIMIZERS:
            raise ValueError(f"embedding_optimizer {self.embedding_optimizer!r} has no CPU kernel in fbgemm; on the "
                             f"CPU use one of {', '.join(CPU_EMBEDDING_OPTIMIZERS)}")
        if accumulate_grad_batches > 1:
            raise ValueError(
                f"accumulate_grad_batches={accumulate_grad_batches} with sharding_type {self.sharding_type!r}: the "
                f"sharded tables' fused optimizer steps inside every backward, so they would take a step per "
                f"micro-batch while the dense part takes one per {accumulate_grad_batches}; use data_parallel tables "
                f"(trained by the configured optimizer) or no accumulation")

    def _setup_model(self, model: nn.Module) -> nn.Module:
        fused = self.sharding_type != "data_parallel"
        self.check_settings(self.lightning_module.trainer.accumulate_grad_batches, model)
        if fused:
            rank_zero_warn(
                f"ddp_sharded_embeddings: the sharded embedding tables are trained by fbgemm's fused "
                f"{self.embedding_optimizer} at lr {self.embedding_lr} inside the backward (strategy init_args "
                f"embedding_optimizer / embedding_lr); the configured optimizer, its lr, weight decay and scheduler "
                f"train the dense part only, and gradient clipping does not reach the tables")
        return shard_module(model, self.sharding_type, self.root_device,
                            embedding_optimizer=self.embedding_optimizer, embedding_lr=self.embedding_lr)

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if self._start_method != "popen":  # spawn / fork ranks hand their weights back to the launching process
            self._launcher = _FullTablesLauncher(self, start_method=self._start_method)

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # load weights into the shards DMP made: weights loaded before sharding would be dropped

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Full tensors on rank 0 (collective: every rank takes part in each gather)."""
        state = self.lightning_module.state_dict()
        return {key: gather_full(value, self.global_rank) if _is_sharded(value) else value
                for key, value in state.items()}

    def _fused_optimizer(self) -> Any:
        return getattr(self.model, "fused_optimizer", None)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Add the sharding type and the fused embedding optimizer's state, gathered to full tensors (all ranks call
        this). data_parallel tables have none (the configured optimizer's state holds theirs): no entry says so."""
        fused = self._fused_optimizer() if self.sharding_type != "data_parallel" else None
        if "optimizer_states" in checkpoint:  # not for weights-only checkpoints
            checkpoint[SHARDING_TYPE_KEY] = self.sharding_type
        if fused is not None and "optimizer_states" in checkpoint:
            state = gather_optimizer_state(fused.state_dict()["state"], self.global_rank, self.world_size)
            if state is not None:
                checkpoint[SHARDED_OPTIMIZER_KEY] = state
                checkpoint[SHARDED_OPTIMIZER_KIND_KEY] = self.embedding_optimizer
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        """Full tables from the checkpoint into this rank's shards; everything else as usual."""
        module = self.lightning_module
        current = module.state_dict()
        saved = checkpoint["state_dict"]
        sharded_keys = {k for k, v in current.items() if _is_sharded(v)}
        for key in sharded_keys & saved.keys():
            copy_into_shards(current[key], saved[key], key)
        result = module.load_state_dict({k: v for k, v in saved.items() if k not in sharded_keys}, strict=False)
        missing = set(result.missing_keys) - sharded_keys
        absent_tables = sharded_keys - saved.keys()
        if strict and (missing or result.unexpected_keys or absent_tables):
            raise RuntimeError(f"checkpoint does not match the model: missing {sorted(missing | absent_tables)}, "
                               f"unexpected {sorted(result.unexpected_keys)}")

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """The configured optimizers as usual, then each rank's shards of the fused embedding optimizer state."""
        fused = self._fused_optimizer()
        current = fused.state_dict()["state"] if fused is not None else {}
        # tables whose optimizer keeps state: a stateless one (exact_sgd) lists its tables with no state at all,
        # and its checkpoint holds nothing for them
        current = {key: per for key, per in current.items() if per}
        kind = checkpoint.get(SHARDED_OPTIMIZER_KIND_KEY)
        saved_state = any(checkpoint.get(SHARDED_OPTIMIZER_KEY, {}).values())  # exact_sgd keeps none
        if self.sharding_type == "data_parallel":  # no fused optimizer: the configured one trains the tables
            if fused_tables_in(checkpoint):
                saved_type = checkpoint.get(SHARDING_TYPE_KEY) or "table_wise or column_wise"  # (an old one's)
                if saved_state:  # resumed silently before, that state dropped
                    raise ValueError(
                        f"this checkpoint's embedding tables were sharded {saved_type} and trained by fbgemm's fused "
                        f"{kind or 'embedding optimizer'}, whose state it holds; sharding_type data_parallel would "
                        f"train them with the configured optimizer from fresh state and drop it. Resume it with "
                        f"sharding_type {saved_type}, or start a new fit")
                rank_zero_warn(f"the checkpoint's embedding tables were trained by {kind!r}, which keeps no state; "
                               f"under data_parallel the configured optimizer takes them over from fresh state")
            super().load_optimizer_state_dict(checkpoint)
            return
        if kind is not None and kind != self.embedding_optimizer and saved_state:  # dropped, or the wrong shape
            raise ValueError(
                f"this checkpoint's embedding tables were trained by embedding_optimizer {kind!r}, whose state it "
                f"holds; the strategy now asks for {self.embedding_optimizer!r}, which would drop that state (or "
                f"find it the wrong shape). Resume with embedding_optimizer {kind!r}, or start a new fit")
        if kind is not None and kind != self.embedding_optimizer:  # a stateless one's (exact_sgd): nothing to take
            rank_zero_warn(f"the checkpoint's embedding tables were trained by {kind!r}, which keeps no state; "
                           f"{self.embedding_optimizer!r} starts from fresh state")
            super().load_optimizer_state_dict(checkpoint)
            return
        if current and checkpoint.get(SHARDING_TYPE_KEY) == "data_parallel":
            raise RuntimeError(
                f"this checkpoint was written with sharding_type data_parallel: its tables were trained by the "
                f"configured optimizer, and it holds no fused embedding optimizer state for sharding_type "
                f"{self.sharding_type!r} to take over; resume it with sharding_type data_parallel or "
                f"--trainer.strategy ddp")
        if current and SHARDED_OPTIMIZER_KEY not in checkpoint:
            raise RuntimeError(
                "this checkpoint holds no sharded-embedding optimizer state (it was not written under "
                "ddp_sharded_embeddings), so it cannot resume a sharded run: the sharded tables' optimizer runs "
                "inside their backward and has no state to take over; resume it with --trainer.strategy ddp"
            )
        super().load_optimizer_state_dict(checkpoint)
        saved = checkpoint.get(SHARDED_OPTIMIZER_KEY, {})
        for key, per in current.items():
            if key not in saved:
                raise RuntimeError(f"checkpoint has no embedding optimizer state for {key!r}")
            for name, value in per.items():
                if name not in saved[key]:
                    raise RuntimeError(f"checkpoint has no embedding optimizer state {name!r} for {key!r}")
                if _is_sharded(value):
                    copy_into_shards(value, saved[key][name], f"{key}/{name}")
                else:
                    with torch.no_grad():
                        value.copy_(saved[key][name])

    def teardown(self) -> None:
        pl_module = self.lightning_module
        if pl_module is not None and self.model is not pl_module:
            self.model = pl_module  # unwrap DMP before Lightning's teardown
        super().teardown()


class _FullTablesLauncher(_MultiProcessingLauncher):
    """Lightning's spawn / fork launcher, with rank 0's weights handed back to the launching process as full tables.

    Its own hand-back saves the module's state_dict, whose sharded tables are ShardedTensors: the launching process
    failed to read that file (weights_only load) after the whole fit, and its module is an unsharded one anyway."""

    def _collect_rank_zero_results(self, trainer: Any, results: Any) -> Any:
        full = self._strategy.lightning_module_state_dict()  # collective: every rank gathers, rank 0 keeps the tables
        output = super()._collect_rank_zero_results(trainer, results)
        if output is not None and output.weights_path is not None:
            self._strategy.checkpoint_io.save_checkpoint(full, output.weights_path)  # in place of the sharded one
        return output


def register_strategy() -> None:
    """Make `--trainer.strategy ddp_sharded_embeddings` (table-wise) a name Lightning knows."""
    from lightning.pytorch.strategies import StrategyRegistry

    if ShardedEmbeddingStrategy.strategy_name not in StrategyRegistry:
        StrategyRegistry.register(
            ShardedEmbeddingStrategy.strategy_name, ShardedEmbeddingStrategy,
            description="DDP + torchrec table-wise sharded embedding tables", sharding_type="table_wise",
        )
