"""EmbeddingFront: the sparse features through a torchrec EmbeddingBagCollection, pooled per feature, then
concatenated with the dense features: Batch -> (B, D_in), D_in = sum of embedding dims + spec.dense_dim.

- One table per sparse feature ("t_<feature>"), `num_embeddings` from the FeatureSpec (OOV / hash buckets
  included), so DistributedModelParallel can shard tables one by one.
- Pooling per feature: "sum" or "mean" (a dict overrides the default per feature). An empty bag pools to zeros.
- Dims: `embedding_dim` for every feature, `embedding_dims` overrides per feature.
- Init: N(0, init_std^2), init_std = 0.05 by default. torchrec's default U(-1/sqrt(n), 1/sqrt(n)) scales with the
  vocabulary (±0.7 for a 2-value feature, ±0.004 for 65k buckets); a fixed small std gives every feature the
  same starting scale, small against standardized dense features.
- Output order: features in spec order, then the dense features. The pooled KeyedTensor is reordered by key
  if it does not come back in that order (a sharded collection may return its features grouped by shard).
- A spec without sparse features has no collection: the output is the dense features alone.
- Fast path: when every sparse feature is single-valued (a bag of one id: sum and mean pooling are that row)
  and all share one dim, pooling is one `index_select` over the tables laid end to end instead of one
  `embedding_bag` call per feature (33 calls for census; the calls, not the arithmetic, dominated small models).
  Only for small tables (the concatenation is rebuilt each step) and only for the collection built here: a
  sharded collection (DistributedModelParallel) takes the torchrec path.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from mmoe_rec.data.batch import Batch
from mmoe_rec.features.spec import FeatureSpec

POOLINGS = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}
FAST_PATH_MAX_ELEMENTS = 1 << 20  # tables up to 4 MB in all are concatenated per step; larger ones use torchrec


class EmbeddingFront(nn.Module):
    def __init__(
        self,
        feature_spec: FeatureSpec,
        *,
        embedding_dim: int = 8,
        embedding_dims: dict[str, int] | None = None,
        pooling: str | dict[str, str] = "sum",
        init_std: float = 0.05,
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
        self._fast_single_ids = (
            bool(tables)
            and not any(f.multi_valued for f in feature_spec.sparse_features)
            and len(set(self.dims.values())) == 1
            and sum(f.num_embeddings * self.dims[f.name] for f in feature_spec.sparse_features) <= FAST_PATH_MAX_ELEMENTS
        )
        sizes = [f.num_embeddings for f in feature_spec.sparse_features]
        # (F,) first row of each feature's table in the end-to-end concatenation
        self.register_buffer("_row_offsets", torch.tensor([0] + sizes[:-1], dtype=torch.int64).cumsum(0),
                             persistent=False)
        self._output_dim = sum(self.dims.values()) + self.dense_dim
        if self._output_dim == 0:
            raise ValueError("the feature spec has neither sparse nor dense features")

    @property
    def output_dim(self) -> int:
        return self._output_dim

    out_dim = output_dim  # the name models.sparse_mmoe uses

    def pooled(self, batch: Batch) -> torch.Tensor:
        """(B, sum of embedding dims): pooled embeddings in spec order."""
        kjt = batch.sparse
        num_features, rows = len(self.sparse_names), batch.batch_size
        if (self._fast_single_ids and type(self.ebc) is EmbeddingBagCollection
                and kjt.keys() == self.sparse_names and kjt.values().numel() == num_features * rows):
            ids = kjt.values().view(num_features, rows).t() + self._row_offsets  # (B, F): KJT values are key-major
            table = torch.cat([self.ebc.embedding_bags[f"t_{n}"].weight for n in self.sparse_names])  # (sum V, d)
            return table.index_select(0, ids.reshape(-1)).view(rows, -1)  # (B, F*d)
        kt = self.ebc(kjt)
        if list(kt.keys()) == self.sparse_names:
            return kt.values()
        by_key = kt.to_dict()
        return torch.cat([by_key[n] for n in self.sparse_names], dim=1)

    def forward(self, batch: Batch) -> torch.Tensor:
        dense = batch.dense.float()  # (B, D_dense)
        if self.ebc is None:
            return dense
        pooled = self.pooled(batch)  # (B, D_emb)
        if self.dense_dim == 0:
            return pooled
        return torch.cat([pooled, dense], dim=1)  # (B, D_in)
