"""EmbeddingFront: the sparse features through a torchrec EmbeddingBagCollection, pooled per feature, then
concatenated with the dense features: Batch -> (B, D_in), D_in = sum of embedding dims + spec.dense_dim.

- Tables: one per sparse feature ("t_<feature>"), `num_embeddings` from the FeatureSpec (OOV / hash buckets
  included), so DistributedModelParallel can shard tables one by one. Small single-valued tables are fused
  into one (below).
- Pooling per feature: "sum" or "mean" (a dict overrides the default per feature). An empty bag pools to zeros.
- Dims: `embedding_dim` for every feature, `embedding_dims` overrides per feature.
- Init: N(0, init_std^2), init_std = 0.05 by default. torchrec's default U(-1/sqrt(n), 1/sqrt(n)) scales with the
  vocabulary (±0.7 for a 2-value feature, ±0.004 for 65k buckets); a fixed small std gives every feature the
  same starting scale, small against standardized dense features.
- Output order: features in spec order, then the dense features. The pooled KeyedTensor is reordered by key
  if it does not come back in that order (a sharded collection may return its features grouped by shard).
- A spec without sparse features has no collection: the output is the dense features alone.
- Fused tables (`fuse_tables=True`, the default): when every sparse feature is single-valued (a bag of one id:
  sum and mean pooling are that row), all share one dim and the tables hold at most FUSED_MAX_ELEMENTS values
  in all, the collection has ONE table, "t_fused", with the features' tables laid end to end in spec order
  (feature f's id i is row offset_f + i). Pooling is then one `index_select` of (B, F) ids (`nn.row_gather`,
  whose CPU backward avoids the false sharing of index_select's), and the gradient lands in one parameter:
  one table instead of F (44 for census) saves the per-table autograd and optimizer work that dominated small
  models. A bare training step of the census MMoEs of benchmarks/train_throughput.py,
  per-table against fused, interleaved in one process (two runs, a Zen 5, 2026-11-25): small 6.4 -> 3.8 ms
  both times, large 26.7 -> 23.8 and 26.0 -> 23.0 ms. A prototype of the same, half an hour earlier in a faster
  spell of the shared VM: small 2.45 -> 2.08 ms, large 22.3 -> 22.0 ms.
  The values are those the per-table layout would have (it is built first and copied, the global RNG left where
  the per-table layout leaves it), and the forward and the gradients are equal (tested), so a seeded run starts
  and steps the same either way (an optimizer step over one tensor instead of F rounds a global gradient norm
  differently, if one is clipped). A collection sharded by DistributedModelParallel is called through torchrec
  with the ids shifted to the fused rows; a table this small has no reason to be sharded (it lands on one rank).
  `table(name)` gives a feature's (V, d) rows in either layout, and a state dict saved with per-table keys
  loads into the fused layout.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mmoe_rec.data.batch import Batch
from mmoe_rec.features.spec import FeatureSpec
from mmoe_rec.nn.row_gather import gather_rows

POOLINGS = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}
FUSED_MAX_ELEMENTS = 1 << 20  # single-valued tables up to 4 MB in all are fused into one
FUSED_TABLE = "t_fused"


class EmbeddingFront(nn.Module):
    def __init__(
        self,
        feature_spec: FeatureSpec,
        *,
        embedding_dim: int = 8,
        embedding_dims: dict[str, int] | None = None,
        pooling: str | dict[str, str] = "sum",
        init_std: float = 0.05,
        fuse_tables: bool = True,
    ) -> None:
        super().__init__()
        names = [f.name for f in feature_spec.sparse_features]
        embedding_dims = dict(embedding_dims or {})
        poolings = dict(pooling) if isinstance(pooling, dict) else {}
        default_pooling = "sum" if isinstance(pooling, dict) else pooling
        for what, overrides in (("embedding_dims", embedding_dims), ("pooling", poolings)):
            unknown = sorted(set(overrides) - set(names))
            if unknown:
                raise ValueError(f"{what} names unknown sparse feature(s) {unknown}; the spec has {names}")
        if not init_std > 0:
            raise ValueError(f"init_std must be > 0, got {init_std}")

        self.sparse_names = names
        self.dense_dim = feature_spec.dense_dim
        self.dims: dict[str, int] = {}
        self.poolings: dict[str, str] = {}
        tables = []
        for f in feature_spec.sparse_features:
            dim = int(embedding_dims.get(f.name, embedding_dim))
            pool = poolings.get(f.name, default_pooling)
            if dim < 1:
                raise ValueError(f"embedding dim of {f.name!r} must be >= 1, got {dim}")
            if pool not in POOLINGS:
                raise ValueError(f"pooling of {f.name!r} must be one of {sorted(POOLINGS)}, got {pool!r}")
            self.dims[f.name], self.poolings[f.name] = dim, pool
            tables.append(EmbeddingBagConfig(
                name=f"t_{f.name}", embedding_dim=dim, num_embeddings=f.num_embeddings, feature_names=[f.name],
                pooling=POOLINGS[pool], init_fn=functools.partial(nn.init.normal_, mean=0.0, std=init_std),
            ))
        self.ebc = EmbeddingBagCollection(tables) if tables else None
        self.fused = (
            fuse_tables
            and bool(tables)
            and not any(f.multi_valued for f in feature_spec.sparse_features)
            and len(set(self.dims.values())) == 1
            and sum(f.num_embeddings * self.dims[f.name] for f in feature_spec.sparse_features) <= FUSED_MAX_ELEMENTS
        )
        sizes = [f.num_embeddings for f in feature_spec.sparse_features]
        self.table_rows = dict(zip(names, sizes))
        # (F,) first row of each feature's table in the fused table
        self.register_buffer("_row_offsets", torch.tensor([0] + sizes[:-1], dtype=torch.int64).cumsum(0),
                             persistent=False)
        self.register_buffer("_table_sizes", torch.tensor(sizes, dtype=torch.int64), persistent=False)  # (F,)
        # an empty float buffer: follows module.to(dtype), so a front without tables knows the model's dtype
        self.register_buffer("_dtype_probe", torch.empty(0), persistent=False)
        if self.fused:
            self.ebc = self._fused_collection(tables)
        self._output_dim = sum(self.dims.values()) + self.dense_dim
        if self._output_dim == 0:
            raise ValueError("the feature spec has neither sparse nor dense features")

    @property
    def output_dim(self) -> int:
        return self._output_dim

    out_dim = output_dim  # the name models.sparse_mmoe uses

    def _fused_collection(self, tables: list[EmbeddingBagConfig]) -> EmbeddingBagCollection:
        """One table holding the per-table collection's tables end to end (same values, so the same training).
        Built with the global RNG forked: the per-table collection already drew what a seeded run expects."""
        per_table = torch.cat([self.ebc.embedding_bags[t.name].weight.detach() for t in tables])  # (sum V, d)
        config = EmbeddingBagConfig(
            name=FUSED_TABLE, embedding_dim=per_table.shape[1], num_embeddings=per_table.shape[0],
            feature_names=list(self.sparse_names), pooling=PoolingType.SUM,  # bags of one id: sum = mean
            init_fn=tables[0].init_fn,  # what reset_parameters() draws from
        )
        with torch.random.fork_rng(devices=[]):
            fused = EmbeddingBagCollection([config])
        with torch.no_grad():
            fused.embedding_bags[FUSED_TABLE].weight.copy_(per_table)
        return fused

    def table(self, name: str) -> torch.Tensor:
        """(V, d) embedding rows of one sparse feature (a view into the fused table when fused; unsharded only)."""
        if name not in self.table_rows:
            raise KeyError(f"no sparse feature {name!r}; the spec has {self.sparse_names}")
        if not self.fused:
            return self.ebc.embedding_bags[f"t_{name}"].weight
        start = int(self._row_offsets[self.sparse_names.index(name)])
        return self.ebc.embedding_bags[FUSED_TABLE].weight.narrow(0, start, self.table_rows[name])

    def pooled(self, batch: Batch) -> torch.Tensor:
        """(B, sum of embedding dims): pooled embeddings in spec order."""
        kjt = batch.sparse
        num_features, rows = len(self.sparse_names), batch.batch_size
        if self.fused:
            if (type(self.ebc) is EmbeddingBagCollection and kjt.keys() == self.sparse_names
                    and kjt.values().numel() == num_features * rows):
                values = kjt.values().view(num_features, rows)  # (F, B): KJT is key-major
                if self._single_id_bags(values, kjt.lengths()):  # as many ids as bags need not be one per bag
                    ids = values.t() + self._row_offsets  # (B, F)
                    table = self.ebc.embedding_bags[FUSED_TABLE].weight  # (sum V, d)
                    return gather_rows(table, ids.reshape(-1)).view(rows, num_features * table.shape[1])  # (B, F*d)
        self._check_keys(kjt)
        if rows == 0:  # torchrec's per-table lookup fails on a batch of no rows (an IndexError naming nothing)
            return self._dtype_probe.new_zeros(0, sum(self.dims.values()))  # (0, sum of embedding dims)
        if type(self.ebc) is EmbeddingBagCollection and next(self.ebc.parameters()).dtype == torch.float64:
            # torchrec pools through float32 (its `.float()`)
            return self._pooled_by_table(kjt).to(self._dtype_probe.dtype)
        if self.fused:
            kjt = self._to_fused_rows(kjt)
        elif type(self.ebc) is not EmbeddingBagCollection or kjt.values().is_cuda:
            # sharded by DMP: fbgemm's kernels would read row 0 for an id outside its table and go on; on CUDA an
            # id outside its table is a device-side assert that leaves nothing to name the feature with afterwards
            self._check_bag_ids(kjt)
        try:
            kt = self.ebc(kjt)
        except RuntimeError:  # torchrec's "Index 1 of input takes value 3 ..." names neither feature nor row
            if not self.fused and type(self.ebc) is EmbeddingBagCollection:
                self._check_bag_ids(kjt)  # raises the error naming the feature when an id is out of range
            raise
        if list(kt.keys()) == self.sparse_names:
            pooled = kt.values()
        else:
            by_key = kt.to_dict()
            pooled = torch.cat([by_key[n] for n in self.sparse_names], dim=1)
        if self.fused and any(self.poolings[n] == "mean" for n in kjt.keys()):
            pooled = self._mean_of_fused_sums(pooled, kjt, rows)
        # torchrec pools a bfloat16 table into float32 (float64 ones are pooled above): back to the model's dtype,
        # as the fused gather gives it
        return pooled.to(self._dtype_probe.dtype)  # (B, sum of embedding dims)

    def _pooled_by_table(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        """(B, sum of embedding dims) in spec order, each feature's bags pooled from its own rows by PyTorch's
        embedding_bag in the tables' dtype (unsharded collection)."""
        self._check_bag_ids(kjt)
        by_key = kjt.to_dict()
        return torch.cat([
            nn.functional.embedding_bag(by_key[n].values(), self.table(n), by_key[n].offsets(),  # (B + 1,)
                                        mode=self.poolings[n], include_last_offset=True)  # (B, d)
            for n in self.sparse_names], dim=1)

    def _mean_of_fused_sums(self, pooled: torch.Tensor, kjt: KeyedJaggedTensor, rows: int) -> torch.Tensor:
        """The fused table pools by sum (one id a bag: sum = mean); a bag of several ids of a mean-pooled feature
        (a hand-built batch: the spec says single-valued) is divided by its length here, as its own table would."""
        lengths = kjt.lengths().view(len(kjt.keys()), rows)  # (K, B) in the batch's key order
        divisor = torch.ones(rows, len(self.sparse_names), dtype=pooled.dtype, device=pooled.device)  # (B, F)
        for k, name in enumerate(kjt.keys()):
            if self.poolings[name] == "mean":
                divisor[:, self.sparse_names.index(name)] = lengths[k].clamp_min(1).to(pooled.dtype)
        d = pooled.shape[1] // len(self.sparse_names)  # one dim for every feature when fused
        return pooled / divisor.repeat_interleave(d, dim=1)

    def _single_id_bags(self, values: torch.Tensor, lengths: torch.Tensor) -> bool:
        """Whether the (F, B) ids are one per bag (lengths (F*B,) all 1; F*B ids may also be empty bags beside
        longer ones: False, the caller takes the general path), each within its own table. In the fused table an
        id past its feature's table would silently read the next feature's rows (the per-table layout raises;
        sharded, it is checked by `_check_bag_ids`)."""
        # one fused pass and one host sync (~0.07 ms a step for census' (44, 1024) in a training loop; the
        # reductions per feature cost twice that); which feature and row only once something is out of range
        in_range = ((values >= 0) & (values < self._table_sizes[:, None])).all()
        single, ok = torch.stack([(lengths == 1).all(), in_range]).tolist()
        if not single:
            return False
        if ok:
            return True
        bad = (values.amax(1) >= self._table_sizes) | (values.amin(1) < 0)  # (F,)
        f = int(bad.nonzero()[0])
        size = int(self._table_sizes[f])
        row = int(((values[f] < 0) | (values[f] >= size)).nonzero()[0])
        raise IndexError(f"sparse feature {self.sparse_names[f]!r}: id {int(values[f, row])} in batch row {row} is "
                         f"outside its table of {size} rows (ids 0..{size - 1}); was the data encoded with this "
                         "model's feature spec?")

    def _check_keys(self, kjt: KeyedJaggedTensor) -> None:
        """The batch's sparse features are the spec's (any order): one missing was a bare KeyError from inside
        torchrec, one unknown was ignored by the per-table layout."""
        keys = kjt.keys()
        missing = [n for n in self.sparse_names if n not in keys]
        unknown = [k for k in keys if k not in self.sparse_names]
        if missing or unknown:
            parts = ([f"missing {missing}"] if missing else []) + ([f"not in the spec {unknown}"] if unknown else [])
            raise KeyError(f"the batch's sparse features {list(keys)} are not the spec's {self.sparse_names}: "
                           + "; ".join(parts))

    def _check_bag_ids(self, kjt: KeyedJaggedTensor) -> tuple[list[int], torch.Tensor]:
        """Every id of every bag within its feature's table (the keys checked by `_check_keys`); returns each key's
        position in spec order and (keys,) its number of ids. An id outside its table is an error naming the
        feature."""
        index = {n: i for i, n in enumerate(self.sparse_names)}
        key_index = [index[k] for k in kjt.keys()]
        counts = torch.tensor(kjt.length_per_key(), dtype=torch.int64, device=self._table_sizes.device)
        limit = torch.repeat_interleave(self._table_sizes[key_index], counts)  # (values,) each id's table size
        bad = (kjt.values() < 0) | (kjt.values() >= limit)
        if bool(bad.any()):
            at = int(bad.nonzero()[0])
            key = int(torch.searchsorted(counts.cumsum(0), at, right=True))
            raise IndexError(f"sparse feature {kjt.keys()[key]!r}: id {int(kjt.values()[at])} is outside its table "
                             f"of {int(limit[at])} rows; was the data encoded with this model's feature spec?")
        return key_index, counts

    def _to_fused_rows(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """The same bags with each feature's ids shifted to its rows of the fused table (the torchrec path)."""
        key_index, counts = self._check_bag_ids(kjt)
        shift = torch.repeat_interleave(self._row_offsets[key_index], counts)  # (values,)
        return KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values() + shift, lengths=kjt.lengths(),
                                 stride=kjt.stride())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # a state dict of the per-table layout (e.g. written before tables were fused) into the fused table, and
        # a fused one into per-table tables (fuse_tables=False, or a spec that gained a multi-valued feature)
        fused_key = f"{prefix}ebc.embedding_bags.{FUSED_TABLE}.weight"
        per_table = [f"{prefix}ebc.embedding_bags.t_{n}.weight" for n in self.sparse_names]
        # Each table's rows are checked where they can be: a fused table with the spec's total of rows split
        # otherwise cannot be told apart (the checkpoint's own spec says, as the CLI checks before loading).
        if self.fused and fused_key not in state_dict and all(k in state_dict for k in per_table):
            for name, key in zip(self.sparse_names, per_table):
                if state_dict[key].shape[0] != self.table_rows[name]:
                    raise RuntimeError(f"{key}: {state_dict[key].shape[0]} rows in the state dict, the spec's table "
                                       f"of sparse feature {name!r} has {self.table_rows[name]}")
            state_dict[fused_key] = torch.cat([state_dict.pop(k) for k in per_table])
        elif (self.ebc is not None and not self.fused and fused_key in state_dict
              and not any(k in state_dict for k in per_table)):
            rows = [self.table_rows[n] for n in self.sparse_names]
            if state_dict[fused_key].shape[0] != sum(rows):
                raise RuntimeError(f"{fused_key}: {state_dict[fused_key].shape[0]} rows in the state dict, the spec's "
                                   f"tables of {self.sparse_names} have {sum(rows)} ({rows})")
            state_dict.update(zip(per_table, state_dict.pop(fused_key).split(rows)))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, batch: Batch) -> torch.Tensor:
        if batch.dense.dim() != 2 or batch.dense.shape[1] != self.dense_dim:  # a shape check: no host sync
            raise ValueError(f"the batch has dense features of shape {tuple(batch.dense.shape)}; the feature spec has "
                             f"{self.dense_dim} dense features ((B, {self.dense_dim})): was the batch made with this "
                             "model's feature spec?")
        if self.ebc is None:  # dense features only: in the model's dtype (a bf16-true model gets bf16 inputs)
            return batch.dense.to(self._dtype_probe.dtype)  # (B, D_dense)
        if batch.sparse.stride() != batch.dense.shape[0]:  # torch.cat's "Sizes of tensors must match" named neither
            raise ValueError(f"the batch has {batch.sparse.stride()} rows of sparse features and "
                             f"{batch.dense.shape[0]} of dense ones")
        pooled = self.pooled(batch)  # (B, D_emb)
        if self.dense_dim == 0:
            return pooled
        # the tables' dtype: a model cast to bfloat16 (precision "bf16-true") gets bf16 inputs, not float32 ones
        return torch.cat([pooled, batch.dense.to(pooled.dtype)], dim=1)  # (B, D_in)
