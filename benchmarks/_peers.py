"""The two peer libraries' MMoE, built and trained the way their own examples do it (benchmark-only).

- DeepCTR-Torch 0.3.0: ``MMOE(feature_columns, ...)``, ``compile("adam", loss=[...])``, ``fit(x, y, batch_size, epochs=1)``.
- torch-rechub 0.9.0: ``MMOE(features, ...)``, ``DataGenerator(x, y).generate_dataloader(...)``, ``MTLTrainer``; the
  timed call is ``MTLTrainer.train_one_epoch`` (what ``MTLTrainer.fit`` runs per epoch before its validation pass).

Both get the same encoded arrays as mmoe-rec (read from our feature Parquet) and the same layer sizes. What the
peers' own MMoE adds and cannot switch off is kept, since it is what their users train: torch-rechub's MLP puts
BatchNorm after every Linear (experts, gates, towers). DeepCTR-Torch's L2 penalty on the embeddings (its default
``l2_reg_embedding=1e-5``, about 1.7 ms a step on a Xeon 6 VM, 2026-12-07) can be switched off: the throughput
benchmark does (``embedding_l2=0``: the same work as the other two, which regularise nothing by default); the census
accuracy runs keep DeepCTR-Torch's defaults, its N(0, 1e-4) initialisation (``init_std``) too.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mmoe_rec.features.spec import FeatureSpec, label_column


@dataclasses.dataclass(frozen=True)
class Arch:
    name: str
    embedding_dim: int
    num_experts: int
    expert_hidden: tuple[int, ...]
    tower_hidden: tuple[int, ...]
    batch_size: int


@dataclasses.dataclass
class Arrays:
    """Encoded training rows, column by column (what each library's input format is made from)."""

    sparse: dict[str, np.ndarray]  # name -> (N,) int64 ids
    vocab: dict[str, int]  # name -> num_embeddings
    dense: dict[str, np.ndarray]  # name -> (N,) float32
    labels: np.ndarray  # (N, T) float32, columns in `tasks` order
    tasks: list[str]

    @property
    def num_rows(self) -> int:
        return self.labels.shape[0]


def read_arrays(feature_dir: Path, split: str = "train", rows: int | None = None) -> tuple[FeatureSpec, Arrays]:
    """One split of a feature dir (its first ``rows`` rows, or all) as numpy columns: the peers' input, identical
    to what mmoe-rec streams."""
    spec = FeatureSpec.load(feature_dir / "spec.json")
    multi = [f.name for f in spec.sparse_features if f.multi_valued]
    if multi:
        raise ValueError(f"the peers take one id per feature; multi-valued features {multi} are not comparable")
    files = sorted((feature_dir / split).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no Parquet files under {feature_dir / split}")
    t = pa.concat_tables([pq.read_table(f) for f in files])
    if rows is not None:
        t = t.slice(0, rows)
    arrays = Arrays(
        sparse={f.name: t.column(f.name).to_numpy().astype(np.int64) for f in spec.sparse_features},
        vocab={f.name: f.num_embeddings for f in spec.sparse_features},
        dense={c: t.column(c).to_numpy().astype(np.float32) for c in spec.dense_features},
        labels=np.stack([t.column(label_column(k)).to_numpy().astype(np.float32) for k in spec.task_names], 1),
        tasks=spec.task_names,
    )
    return spec, arrays


# --- DeepCTR-Torch -----------------------------------------------------------------------------------------

def deepctr_model(data: Arrays, arch: Arch, seed: int = 1024, fused_adam: bool = False, lr: float = 1e-3,
                  weight_decay: float = 0.0, embedding_l2: float = 1e-5) -> torch.nn.Module:
    """``seed``: MMOE's own argument (default 1024). Its constructor calls ``torch.manual_seed(seed)``, which fixes
    the initial weights AND resets torch's global generator that fit()'s shuffling draws from. ``fused_adam``:
    compile with ``torch.optim.Adam(lr=1e-3, fused=True)`` (what mmoe-rec uses) instead of its "adam" (the same
    Adam, lr 1e-3, one small kernel per tensor). Another ``lr`` or a ``weight_decay`` compiles with that Adam.
    ``embedding_l2``: MMOE's ``l2_reg_embedding`` (its default 1e-5; 0 adds no penalty term to the loss)."""
    from deepctr_torch.inputs import DenseFeat, SparseFeat
    from deepctr_torch.models import MMOE

    columns = [SparseFeat(n, data.vocab[n], embedding_dim=arch.embedding_dim) for n in data.sparse] + [
        DenseFeat(n, 1) for n in data.dense
    ]
    model = MMOE(
        columns,
        num_experts=arch.num_experts,
        expert_dnn_hidden_units=arch.expert_hidden,
        gate_dnn_hidden_units=(),  # gate = one Linear on the input, as in the MMoE paper and in the other two
        tower_dnn_hidden_units=arch.tower_hidden,
        task_types=["binary"] * len(data.tasks),
        task_names=data.tasks,
        seed=seed,
        device="cpu",
        l2_reg_embedding=embedding_l2,
    )
    optimizer: str | torch.optim.Optimizer = "adam"  # torch.optim.Adam(params) with its defaults: lr 1e-3
    if fused_adam or lr != 1e-3 or weight_decay:
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay,
                                     **({"fused": True} if fused_adam else {}))
    model.compile(optimizer, loss=["binary_crossentropy"] * len(data.tasks))
    return model


def _deepctr_x(data: Arrays, rows: slice) -> dict[str, np.ndarray]:
    return {**{n: v[rows] for n, v in data.sparse.items()}, **{n: v[rows] for n, v in data.dense.items()}}


def deepctr_fit(model: torch.nn.Module, data: Arrays, arch: Arch, rows: slice = slice(None)) -> float:
    """Seconds for one ``model.fit`` epoch over ``rows``."""
    x, y = _deepctr_x(data, rows), data.labels[rows]
    with contextlib.redirect_stdout(io.StringIO()):  # fit prints the device and a summary line
        t0 = time.perf_counter()
        model.fit(x, y, batch_size=arch.batch_size, epochs=1, verbose=0)
        return time.perf_counter() - t0


def deepctr_loader(model: torch.nn.Module, data: Arrays, arch: Arch) -> torch.utils.data.DataLoader:
    """The DataLoader ``fit`` builds internally (deepctr_torch/models/basemodel.py, BaseModel.fit)."""
    x = _deepctr_x(data, slice(None))
    cols = [np.expand_dims(x[f], 1) for f in model.feature_index]
    ds = torch.utils.data.TensorDataset(torch.from_numpy(np.concatenate(cols, axis=-1)), torch.from_numpy(data.labels))
    return torch.utils.data.DataLoader(ds, shuffle=True, batch_size=arch.batch_size)


# --- torch-rechub ------------------------------------------------------------------------------------------

def rechub_model(data: Arrays, arch: Arch) -> torch.nn.Module:
    from torch_rechub.basic.features import DenseFeature, SparseFeature
    from torch_rechub.models.multi_task import MMOE

    features = [SparseFeature(n, data.vocab[n], embed_dim=arch.embedding_dim) for n in data.sparse] + [
        DenseFeature(n) for n in data.dense
    ]
    return MMOE(
        features,
        ["classification"] * len(data.tasks),
        arch.num_experts,
        expert_params={"dims": list(arch.expert_hidden)},
        tower_params_list=[{"dims": list(arch.tower_hidden)} for _ in data.tasks],
    )


def rechub_loader(data: Arrays, arch: Arch, rows: slice = slice(None)) -> torch.utils.data.DataLoader:
    """The train DataLoader of run_census.py: ``DataGenerator(x, y).generate_dataloader(...)``."""
    from torch_rechub.utils.data import DataGenerator

    x = {**{n: v[rows] for n, v in data.sparse.items()}, **{n: v[rows] for n, v in data.dense.items()}}
    y = data.labels[rows]
    tiny = slice(0, arch.batch_size)  # val / test loaders are required arguments; never iterated here
    x_small = {n: v[tiny] for n, v in x.items()}
    train, _, _ = DataGenerator(x, y).generate_dataloader(
        x_val=x_small, y_val=y[tiny], x_test=x_small, y_test=y[tiny], batch_size=arch.batch_size
    )
    return train


def rechub_trainer(model: torch.nn.Module, data: Arrays, workdir: str, fused_adam: bool = False, lr: float = 1e-3,
                   weight_decay: float = 1e-4):
    from torch_rechub.trainers import MTLTrainer

    # run_census.py's settings by default: Adam lr 1e-3, weight decay 1e-4 (fused_adam: fused, as mmoe-rec's)
    params = {"lr": lr, "weight_decay": weight_decay, **({"fused": True} if fused_adam else {})}
    return MTLTrainer(
        model, task_types=["classification"] * len(data.tasks), optimizer_params=params,
        n_epoch=1, device="cpu", model_path=workdir,
    )


def rechub_train_epoch(trainer, loader) -> float:
    """Seconds for ``MTLTrainer.train_one_epoch`` over one loader epoch (or a list of batches made in advance)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # tqdm, loss print
        t0 = time.perf_counter()
        trainer.train_one_epoch(loader)
        return time.perf_counter() - t0
