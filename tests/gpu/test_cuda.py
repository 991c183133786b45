"""The CUDA paths, run where there is a GPU (skipped elsewhere: CI has none).

- Sparse dispatch on CUDA: the vectorized layer (padded bmm, and grouped `torch._grouped_mm`) equals the naive
  per-expert loop and the dense every-expert path, outputs and gradients, float32; in bfloat16 the grouped layer
  stays within bf16 rounding of the float32 reference.
- Every model (shared-bottom, OMoE, MMoE, PLE, sparse top-k) gives on CUDA the logits and gradients it gives on
  the CPU with the same weights and batch.
- `MultiTaskModule` trains under Lightning with accelerator="gpu" on a feature directory and validates.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "nn"), str(HERE.parent / "models")]

from model_inputs import batch, spec  # noqa: E402
from test_dispatch import assert_three_paths_agree, random_assignments  # noqa: E402

from mmoe_rec.models import MMoE, OMoE, PLE, SharedBottom  # noqa: E402
from mmoe_rec.models.sparse_mmoe import SparseMMoE  # noqa: E402
from mmoe_rec.nn.dispatch import StackedExperts  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.mark.parametrize("layout", ["padded", "grouped"])
def test_dispatch_on_cuda_equals_the_loop_and_the_dense_path(layout):
    torch.manual_seed(0)
    T, E, k, d = 256, 8, 2, 32
    ex = StackedExperts(E, d, [64, 32], activation="relu", activate_last=False).to(CUDA)
    x = torch.randn(T, d, device=CUDA, requires_grad=True)
    _, experts, rows, w = (t.to(CUDA) for t in random_assignments(T, E, k))
    w = w.float().requires_grad_(True)
    plan = ex.plan(experts, rows, num_out=T, layout=layout)
    assert plan.layout == layout
    out = assert_three_paths_agree(ex, x, w, experts, rows, plan, torch.float32)
    assert out.device.type == "cuda"


def test_auto_layout_on_cuda_is_padded_in_float32_and_grouped_in_bfloat16():
    ex = StackedExperts(4, 16, [16], activation="relu").to(CUDA)
    experts = torch.arange(4, device=CUDA).repeat_interleave(200)
    rows = torch.arange(800, device=CUDA)
    assert ex.plan(experts, rows).layout == "padded"
    assert ex.plan(experts, rows, dtype=torch.bfloat16).layout == "grouped"


def test_grouped_dispatch_in_bfloat16_stays_near_float32():
    torch.manual_seed(0)
    T, E, k, d = 512, 8, 2, 64
    ex = StackedExperts(E, d, [128, 64], activation="relu", activate_last=False).to(CUDA)
    _, experts, rows, w = (t.to(CUDA) for t in random_assignments(T, E, k))
    x = torch.randn(T, d, device=CUDA)
    ref = ex(x, ex.plan(experts, rows, num_out=T, layout="grouped"), w.float())
    ex_bf16 = ex.to(torch.bfloat16)
    plan = ex_bf16.plan(experts, rows, num_out=T, layout="grouped", dtype=torch.bfloat16)
    out = ex_bf16(x.bfloat16(), plan, w.float())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.05)


MODELS = {
    "shared_bottom": lambda s: SharedBottom(s, embedding_dim=4, bottom_hidden=[16, 8], tower_hidden=[4]),
    "omoe": lambda s: OMoE(s, embedding_dim=4, num_experts=4, expert_hidden=[16], tower_hidden=[4]),
    "mmoe": lambda s: MMoE(s, embedding_dim=4, num_experts=4, expert_hidden=[16], tower_hidden=[4]),
    "ple": lambda s: PLE(s, embedding_dim=4, num_levels=2, num_task_experts=2, num_shared_experts=2,
                         expert_hidden=[16], tower_hidden=[4]),
    "sparse": lambda s: SparseMMoE(s, embedding_dim=4, num_experts=8, k=2, expert_hidden=[16], tower_hidden=[4],
                                   noise=False),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_on_cuda_equals_the_model_on_cpu(name):
    torch.manual_seed(0)
    cpu = MODELS[name](spec()).eval()  # eval: no dropout, no router noise
    gpu = MODELS[name](spec()).eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu.to(CUDA)
    # two batch objects: a KJT that went through a forward caches its per-key split, which .to() carries along
    out_cpu, out_gpu = cpu(batch(B=64)), gpu(batch(B=64).to(CUDA))
    for task, logit in out_cpu.logits.items():
        assert out_gpu.logits[task].device.type == "cuda"
        torch.testing.assert_close(out_gpu.logits[task].cpu(), logit, atol=1e-4, rtol=1e-4)
    sum(out_cpu.logits.values()).sum().backward()
    sum(out_gpu.logits.values()).sum().backward()
    grads_cpu = {n: p.grad for n, p in cpu.named_parameters() if p.grad is not None}
    grads_gpu = {n: p.grad for n, p in gpu.named_parameters() if p.grad is not None}
    assert grads_cpu.keys() == grads_gpu.keys() and grads_cpu
    for n, g in grads_cpu.items():
        torch.testing.assert_close(grads_gpu[n].cpu(), g, atol=1e-4, rtol=1e-4, msg=n)


@pytest.mark.parametrize("model", ["mmoe", "sparse"])
def test_lightning_trains_on_the_gpu(feature_dir, tmp_path, model):
    import lightning as L

    from mmoe_rec.data.datamodule import FeatureDataModule
    from mmoe_rec.training.module import MultiTaskModule

    init = {"embedding_dim": 4, "num_experts": 4, "expert_hidden": [16], "tower_hidden": [8]}
    if model == "sparse":
        init.update(k=2)
    class_path = {"mmoe": "mmoe_rec.models.mmoe.MMoE", "sparse": "mmoe_rec.models.sparse_mmoe.SparseMMoE"}[model]
    L.seed_everything(0)
    dm = FeatureDataModule(str(feature_dir), batch_size=64, seed=0, pin_memory=model == "sparse")
    module = MultiTaskModule(model={"class_path": class_path, "init_args": init}, feature_spec=dm.spec,
                             optimizer={"class_path": "torch.optim.Adam", "init_args": {"lr": 0.01}})
    trainer = L.Trainer(accelerator="gpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, dm)
    assert trainer.strategy.root_device.type == "cuda"
    (result,) = trainer.validate(module, dm, verbose=False)
    assert result["val/click/auc"] > 0.6, result


def test_a_pinned_batch_moves_to_the_gpu_unchanged(feature_dir):
    from mmoe_rec.data.datamodule import FeatureDataModule

    dm = FeatureDataModule(str(feature_dir), batch_size=64, seed=0, pin_memory=True)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch.dense.is_pinned()
    moved = batch.to("cuda")  # asynchronous from pinned memory; the values must still be the batch's
    torch.cuda.synchronize()
    torch.testing.assert_close(moved.dense.cpu(), batch.dense)
    torch.testing.assert_close(moved.sparse.values().cpu(), batch.sparse.values())
    for task, label in batch.labels.items():
        torch.testing.assert_close(moved.labels[task].cpu(), label)


def single_valued_spec():
    from mmoe_rec.features.spec import FeatureSpec, SparseFeature, Task

    return FeatureSpec(sparse_features=[SparseFeature("user", 20), SparseFeature("item", 30)],
                       dense_features=["d0"], tasks=[Task("click")]).finalize()


def single_valued_batch(B: int, user_ids=None):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from mmoe_rec.data.batch import Batch

    g = torch.Generator().manual_seed(0)
    user = torch.randint(0, 20, (B,), generator=g) if user_ids is None else user_ids
    item = torch.randint(0, 30, (B,), generator=g)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["user", "item"], values=torch.cat([user, item]),
                                              lengths=torch.ones(2 * B, dtype=torch.long))
    return Batch(sparse=kjt, dense=torch.randn(B, 1, generator=g), labels={"click": torch.zeros(B)})


def test_the_fused_embedding_table_on_cuda_equals_the_cpu():
    """Census' default path (every feature single-valued: one fused table, gather_rows): not covered by the
    model_inputs spec, whose multi-valued feature takes the per-table path."""
    torch.manual_seed(0)
    cpu = MMoE(single_valued_spec(), embedding_dim=4, num_experts=4, expert_hidden=[16], tower_hidden=[4]).eval()
    gpu = MMoE(single_valued_spec(), embedding_dim=4, num_experts=4, expert_hidden=[16], tower_hidden=[4]).eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu.to(CUDA)
    out_cpu, out_gpu = cpu(single_valued_batch(64)), gpu(single_valued_batch(64).to(CUDA))
    torch.testing.assert_close(out_gpu.logits["click"].cpu(), out_cpu.logits["click"], atol=1e-4, rtol=1e-4)
    bad = torch.arange(8) % 20
    bad[5] = 20  # one past the user table
    with pytest.raises(IndexError, match=r"sparse feature 'user': id 20 in batch row 5"):
        gpu(single_valued_batch(8, bad).to(CUDA))


def test_an_id_outside_its_table_on_cuda_names_the_feature_not_a_device_assert():
    """The per-table path (a multi-valued feature): on CUDA the lookup of an id past its table is a device-side
    assert after which nothing can be reported; the ids are checked before the lookup there."""
    torch.manual_seed(0)
    model = MODELS["mmoe"](spec()).eval().to(CUDA)
    b = batch(B=16)
    values = b.sparse.values().clone()
    values[3] = 20  # user row 3: one past the user table (20 rows)
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    b.sparse = KeyedJaggedTensor.from_lengths_sync(keys=b.sparse.keys(), values=values, lengths=b.sparse.lengths())
    with pytest.raises(IndexError, match="user"):
        model(b.to(CUDA))
    torch.cuda.synchronize()  # the context is still usable
