"""The small FeatureSpec and Batch the model tests share: a single-id feature, a multi-valued one, 2 dense."""
from __future__ import annotations

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mmoe_rec.data.batch import Batch
from mmoe_rec.features.spec import FeatureSpec, SparseFeature, Task

TASKS = ["click", "convert", "stay"]


def spec() -> FeatureSpec:
    return FeatureSpec(
        sparse_features=[SparseFeature("user", 20), SparseFeature("tags", 10, multi_valued=True)],
        dense_features=["d0", "d1"],
        tasks=[Task(t) for t in TASKS],
    ).finalize()


def batch(B: int = 12, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    user = torch.randint(0, 20, (B,), generator=g)
    tag_len = torch.randint(0, 3, (B,), generator=g)
    tags = torch.randint(0, 10, (int(tag_len.sum()),), generator=g)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["user", "tags"], values=torch.cat([user, tags]),
                                              lengths=torch.cat([torch.ones(B, dtype=torch.long), tag_len]))
    return Batch(sparse=kjt, dense=torch.randn(B, 2, generator=g), labels={t: torch.zeros(B) for t in TASKS})
