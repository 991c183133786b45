"""Streaming data module: exactly-once coverage over ranks x workers, equal batch counts, seeded shuffles,
the predict loader's ids, and the module under a real Lightning Trainer."""
from __future__ import annotations

import itertools
import lzma
from pathlib import Path

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mmoe_rec.data.batch import Batch
from mmoe_rec.data.datamodule import FeatureDataModule
from mmoe_rec.data.parquet_stream import rank_batch_sizes, worker_plan
from mmoe_rec.features.build import main as features_main


def _epoch(dm: FeatureDataModule, split: str, world: int, workers: int, train: bool, epoch: int = 0):
    """Row ids and batch sizes each simulated rank sees in one epoch, read through a real DataLoader."""
    dm.set_epoch(epoch)
    ids, sizes = [], []
    for rank in range(world):
        dm.num_workers = workers
        loader = dm.dataloader(split, train=train, with_ids=True, rank=rank, world_size=world)
        batches = list(loader)
        assert len(batches) == len(loader.dataset) == len(loader)
        ids.append(np.concatenate([b.ids["row_id"] for b in batches]))
        sizes.append([b.batch_size for b in batches])
    return ids, sizes


def _split_ids(d, split):
    return np.sort(pq.read_table(d / split, columns=["row_id"]).column("row_id").to_numpy())


@pytest.mark.parametrize("split,train", [("train", True), ("valid", False)])
def test_every_row_exactly_once_across_2_ranks_x_2_workers(feature_dir, split, train):
    dm = FeatureDataModule(str(feature_dir), batch_size=64, eval_batch_size=50, shuffle_buffer=256)
    ids, sizes = _epoch(dm, split, world=2, workers=2, train=train)
    seen = np.concatenate(ids)
    assert len(seen) == len(set(seen.tolist()))  # no row twice
    np.testing.assert_array_equal(np.sort(seen), _split_ids(feature_dir, split))  # no row missed
    assert len(sizes[0]) == len(sizes[1])
    assert min(min(s) for s in sizes) > 0


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_equal_batch_counts_for_awkward_row_counts(make_feature_dir):
    d = make_feature_dir("awkward", rows={"train": 1001}, files_per_split={"train": 3}, row_group_size=97)
    dm = FeatureDataModule(str(d), batch_size=64, shuffle_buffer=100)
    ids, sizes = _epoch(dm, "train", world=2, workers=3, train=True)
    assert len(sizes[0]) == len(sizes[1]) == 8  # ceil(ceil(1001 / 2) / 64)
    assert sorted(sizes[0]) == sorted([64] * 7 + [53]) and sorted(sizes[1]) == sorted([64] * 7 + [52])
    np.testing.assert_array_equal(np.sort(np.concatenate(ids)), np.arange(1001))


def test_plan_covers_each_row_once_with_equal_non_empty_batch_counts():
    # the pure plan, over many shapes: row ranges tile [0, N), counts are equal per rank, no batch is empty
    for n, world, batch, workers in itertools.product([3, 64, 128, 129, 1001, 1024], [1, 2, 3], [2, 7, 64], [1, 2, 3]):
        if n < world:
            continue
        counts, ranges = set(), []
        for rank in range(world):
            plans = [worker_plan(n, batch, rank, world, w, workers) for w in range(workers)]
            counts.add(sum(len(p.batch_sizes) for p in plans))
            for p in plans:
                assert len(p.ranges) == 1 and sum(p.batch_sizes) == p.ranges[0][1] - p.ranges[0][0]
                assert all(s > 0 for s in p.batch_sizes) and all(s <= batch for s in p.batch_sizes)
                ranges += p.ranges
        assert len(counts) == 1, (n, world, batch, workers)
        covered = np.zeros(n, dtype=int)
        for a, b in ranges:
            covered[a:b] += 1
        assert (covered == 1).all(), (n, world, batch, workers)


def test_one_row_fewer_on_a_full_batch_boundary_splits_the_last_batch():
    # 129 rows, 2 ranks, batch 64: rank 0 has 65 rows (64 + 1), rank 1 has 64 -> 2 batches each
    assert rank_batch_sizes(129, 0, 2, 64) == [64, 1]
    assert rank_batch_sizes(129, 1, 2, 64) == [32, 32]
    with pytest.raises(ValueError, match="non-empty batches"):
        rank_batch_sizes(3, 1, 2, 1)  # batch size 1 cannot hide the missing row
    with pytest.raises(ValueError, match="non-empty batches"):
        rank_batch_sizes(1, 1, 2, 64)  # fewer rows than ranks: rank 1 would have none


def test_drop_last_makes_only_full_batches_and_no_duplicates(make_feature_dir):
    d = make_feature_dir("drop", rows={"train": 1001}, row_group_size=97)
    dm = FeatureDataModule(str(d), batch_size=64, drop_last=True, shuffle_buffer=100)
    ids, sizes = _epoch(dm, "train", world=2, workers=2, train=True)
    assert sizes == [[64] * 7, [64] * 7]
    seen = np.concatenate(ids)
    assert len(set(seen.tolist())) == len(seen) == 2 * 7 * 64


def test_shuffle_is_seeded_and_changes_with_the_epoch(feature_dir):
    def order(seed, epoch):
        dm = FeatureDataModule(str(feature_dir), batch_size=64, seed=seed, shuffle_buffer=256)
        return np.concatenate(_epoch(dm, "train", world=1, workers=0, train=True, epoch=epoch)[0])

    e0 = order(seed=7, epoch=0)
    np.testing.assert_array_equal(e0, order(seed=7, epoch=0))
    e1 = order(seed=7, epoch=1)
    assert not np.array_equal(e0, e1) and not np.array_equal(e0, order(seed=8, epoch=0))
    np.testing.assert_array_equal(np.sort(e0), np.sort(e1))
    assert not np.array_equal(e0, np.sort(e0))  # shuffled at all
    # rows of one batch come from several row groups (the buffer mixes them), not from one contiguous run
    first_batch = e0[:64]
    assert first_batch.max() - first_batch.min() > 300


def test_validation_is_not_shuffled(feature_dir):
    dm = FeatureDataModule(str(feature_dir), batch_size=64, eval_batch_size=64)
    for epoch in (0, 3):
        ids = np.concatenate(_epoch(dm, "valid", world=1, workers=0, train=False, epoch=epoch)[0])
        np.testing.assert_array_equal(ids, _split_ids(feature_dir, "valid"))


def test_workers_do_not_change_the_rows_a_rank_reads(feature_dir):
    dm = FeatureDataModule(str(feature_dir), batch_size=64, shuffle_buffer=256)
    one = _epoch(dm, "train", world=2, workers=0, train=True)[0]
    two = _epoch(dm, "train", world=2, workers=2, train=True)[0]
    for a, b in zip(one, two):
        np.testing.assert_array_equal(np.sort(a), np.sort(b))


def test_predict_loader_carries_ids_that_match_the_rows(feature_dir):
    dm = FeatureDataModule(str(feature_dir), batch_size=64, eval_batch_size=128)
    batches = list(dm.predict_dataloader())
    ref = pq.read_table(feature_dir / "test").to_pandas().set_index("row_id")
    row_ids = np.concatenate([b.ids["row_id"] for b in batches])
    np.testing.assert_array_equal(np.sort(row_ids), ref.index.to_numpy())
    for b in batches:
        assert list(b.ids) == ["row_id", "request_id"]
        assert b.ids["request_id"].tolist() == [f"r{i}" for i in b.ids["row_id"]]
        np.testing.assert_array_equal(b.dense[:, 0].numpy(), ref.loc[b.ids["row_id"], "d0"].to_numpy())
    # train batches stay light: no ids
    assert next(iter(dm.train_dataloader())).ids is None


def test_state_dict_round_trip_replays_the_same_epoch(feature_dir):
    dm = FeatureDataModule(str(feature_dir), batch_size=64, seed=3)
    dm.set_epoch(2)
    state = dm.state_dict()
    assert {k: v for k, v in state.items() if k != "plan"} == {"epoch": 2, "seed": 3, "batches_done": 0}
    assert {k: state["plan"][k] for k in ("world_size", "batch_size", "num_workers", "seed", "train_rows")} == {
        "world_size": 1, "batch_size": 64, "num_workers": 0, "seed": 3, "train_rows": 2000}
    resumed = FeatureDataModule(str(feature_dir), batch_size=64, seed=0)
    resumed.load_state_dict(state)
    a = [b.dense for b in dm.train_dataloader()]
    b = [b.dense for b in resumed.train_dataloader()]
    torch.testing.assert_close(torch.cat(a), torch.cat(b))
    # a mid-epoch state: the first pass over that epoch skips the batches already trained, later passes do not
    mid = FeatureDataModule(str(feature_dir), batch_size=64, seed=0)
    mid.load_state_dict({**state, "batches_done": 5})
    rest = [x.dense for x in mid.train_dataloader()]
    torch.testing.assert_close(torch.cat(rest), torch.cat(a[5:]))
    torch.testing.assert_close(torch.cat([x.dense for x in mid.train_dataloader()]), torch.cat(a))


def test_bad_inputs_are_clear_errors(feature_dir, make_feature_dir, tmp_path):
    with pytest.raises(ValueError, match=r"data tasks \['ctr'\] are not in the feature spec"):
        FeatureDataModule(str(feature_dir), tasks=["ctr"])
    with pytest.raises(FileNotFoundError, match="feature spec not found"):
        FeatureDataModule(str(tmp_path))
    d = make_feature_dir("no_test", rows={"train": 100})
    with pytest.raises(FileNotFoundError, match="no \\*.parquet files"):
        FeatureDataModule(str(d)).test_dataloader()
    broken = make_feature_dir("broken", rows={"train": 100})
    path = broken / "train" / "part-00000.parquet"
    table = pq.read_table(path).drop_columns(["d1"])
    pq.write_table(table, path)
    with pytest.raises(ValueError, match="part-00000.parquet: missing feature columns \\['d1'\\]"):
        FeatureDataModule(str(broken)).train_dataloader()
    no_valid = make_feature_dir("no_valid", rows={"train": 100, "valid": 0})  # as `features` writes an empty split
    with pytest.raises(ValueError, match="split 'valid' in .* has no rows.*--valid-fraction.*limit_val_batches 0"):
        FeatureDataModule(str(no_valid)).val_dataloader()
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match="part-00000.parquet: not a readable Parquet file"):
        FeatureDataModule(str(broken)).train_dataloader()


class _Recorder(L.LightningModule):
    """Records what a Trainer feeds it: the first dense column of each train batch, per epoch."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))
        self.seen: dict[int, list[torch.Tensor]] = {}
        self.val_rows = 0

    def training_step(self, batch, batch_idx):
        assert isinstance(batch, Batch) and isinstance(batch.sparse, KeyedJaggedTensor)
        assert batch.sparse.values().device == self.device
        self.seen.setdefault(self.current_epoch, []).append(batch.dense[:, 0].clone())
        return (batch.dense @ self.w - batch.labels["click"]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.val_rows += batch.batch_size

    def predict_step(self, batch, batch_idx):
        return batch.ids["row_id"], batch.dense @ self.w

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_under_a_lightning_trainer_epochs_reshuffle_and_predict_keeps_ids(feature_dir):
    dm = FeatureDataModule(str(feature_dir), batch_size=256, eval_batch_size=250, seed=5)
    model = _Recorder()
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    assert model.val_rows == 2 * 500
    assert {k: v for k, v in dm.state_dict().items() if k != "plan"} == {"epoch": 1, "seed": 5, "batches_done": 0}
    for epoch in (0, 1):
        # what the Trainer fed equals the epoch the data module makes when told that epoch
        dm_ref = FeatureDataModule(str(feature_dir), batch_size=256, seed=5)
        dm_ref.set_epoch(epoch)
        ref = torch.cat([b.dense[:, 0] for b in dm_ref.train_dataloader()])
        torch.testing.assert_close(torch.cat(model.seen[epoch]), ref)
    assert not torch.equal(torch.cat(model.seen[0]), torch.cat(model.seen[1]))
    preds = trainer.predict(model, datamodule=dm)
    row_ids = np.concatenate([ids for ids, _ in preds])
    np.testing.assert_array_equal(np.sort(row_ids), _split_ids(feature_dir, "test"))


CENSUS_RAW = [Path(__file__).resolve().parents[2] / "data" / "census_income"]


@pytest.mark.skipif(not (CENSUS_RAW[0] / "train.csv.xz").exists(), reason="census raw files not vendored")
def test_census_sample_round_trip_raw_to_features_to_batches(tmp_path):
    from mmoe_rec.features.build import main as build_features

    raw = {}
    for split, n in (("train", 3000), ("test", 1000)):
        with lzma.open(CENSUS_RAW[0] / f"{split}.csv.xz", "rt") as f:
            lines = list(itertools.islice(f, n))
        (tmp_path / f"{split}.csv").write_text("".join(lines))
        raw[split] = [[v.strip() for v in line.rstrip("\n").split(", ")] for line in lines]
    out = tmp_path / "features"
    schema = Path(__file__).resolve().parents[2] / "configs" / "features" / "census.yaml"
    assert build_features([
        "--schema", str(schema), "--input", f"train={tmp_path / 'train.csv'}",
        "--input", f"valid+test={tmp_path / 'test.csv'}", "--output", str(out), "--row-group-rows", "700",
    ]) == 0

    dm = FeatureDataModule(str(out), batch_size=256, eval_batch_size=300, num_workers=2)
    assert dm.spec.task_names == ["income", "never_married"]
    age = dm.spec.dense_features.index("age")
    # unshuffled train split, one rank, no workers (workers interleave their blocks of batches): the batches
    # follow the raw rows one for one
    dm.num_workers = 0
    batches = list(dm.dataloader("train", rank=0, world_size=1))
    income = torch.cat([b.labels["income"] for b in batches]).tolist()
    never = torch.cat([b.labels["never_married"] for b in batches]).tolist()
    assert income == [float(r[41] == "50000+.") for r in raw["train"]]
    assert never == [float(r[7] == "Never married") for r in raw["train"]]
    ages = torch.cat([b.dense[:, age] for b in batches]).numpy()
    assert np.corrcoef(ages, [float(r[0]) for r in raw["train"]])[0, 1] > 0.9999  # standardized, not scrambled
    for b in batches:
        assert b.sparse.keys() == [f.name for f in dm.spec.sparse_features]
        assert (b.sparse.lengths() == 1).all()
        for f in dm.spec.sparse_features:
            ids = b.sparse[f.name].values()
            assert 0 <= ids.min() and ids.max() < f.num_embeddings
    # a raw category maps to one id everywhere
    sex_ids = torch.cat([b.sparse["sex"].values() for b in batches]).tolist()
    assert len({(r[12], i) for r, i in zip(raw["train"], sex_ids)}) == len({r[12] for r in raw["train"]}) >= 2
    # shuffled, 2 ranks x 2 workers: the same rows, once each
    rows = []
    dm.set_epoch(1)
    dm.num_workers = 2
    for rank in range(2):
        for b in dm.dataloader("train", train=True, rank=rank, world_size=2):
            rows += zip(b.dense[:, age].tolist(), b.labels["income"].tolist(), b.labels["never_married"].tolist())
    ref = [(float(a), i, n) for a, i, n in zip(ages, income, never)]
    assert sorted(rows) == sorted(ref)
    evaluated = sum(b.batch_size for b in dm.val_dataloader()) + sum(b.batch_size for b in dm.test_dataloader())
    assert evaluated == 1000


def test_seeds_do_not_share_epoch_orders():
    # seeded by seed + epoch, seed 1's epoch 0 was seed 0's epoch 1: seeds then varied the weights, not the data
    from mmoe_rec.data.parquet_stream import unit_order

    orders = {(seed, epoch): unit_order(200, seed, epoch, True).tolist() for seed in range(3) for epoch in range(3)}
    assert len({tuple(o) for o in orders.values()}) == len(orders)


def test_a_mid_epoch_state_resumes_only_under_the_same_batch_plan(feature_dir):
    saved = FeatureDataModule(str(feature_dir), batch_size=64, seed=3).state_dict()
    assert {k: saved["plan"][k] for k in ("world_size", "batch_size", "num_workers")} == {
        "world_size": 1, "batch_size": 64, "num_workers": 0}
    mid_epoch = {**saved, "epoch": 1, "batches_done": 5, "plan": {**saved["plan"], "world_size": 2}}
    # two processes had done 5 batches each; one process skipping 5 of its batches would retrain rows
    with pytest.raises(ValueError, match=r"world_size 2 -> 1"):
        FeatureDataModule(str(feature_dir), batch_size=64).load_state_dict(mid_epoch)
    with pytest.raises(ValueError, match=r"batch_size 64 -> 128"):
        FeatureDataModule(str(feature_dir), batch_size=128).load_state_dict({**saved, "batches_done": 5})
    same = FeatureDataModule(str(feature_dir), batch_size=64)
    same.load_state_dict({**saved, "batches_done": 5})
    assert same.seed == 3 and same._batches_to_skip(0) == 5
    at_epoch_end = FeatureDataModule(str(feature_dir), batch_size=128)  # nothing to skip: any plan resumes
    at_epoch_end.load_state_dict({**mid_epoch, "batches_done": 0})
    at_epoch_end.load_state_dict({**mid_epoch, "batches_done": 16, "epoch_batches": 16})  # the epoch's last batch
    old = FeatureDataModule(str(feature_dir), batch_size=64)  # checkpoints from before the plan was saved
    old.load_state_dict({k: v for k, v in mid_epoch.items() if k != "plan"})
    assert old._batches_to_skip(1) == 5


@pytest.mark.parametrize("change,named", [
    ({"shuffle_buffer": 200}, "shuffle_buffer 100 -> 200"), ({"chunk_rows": 50}, "chunk_rows 65536 -> 50"),
    ({"drop_last": True}, "drop_last False -> True"), ({"data": (1002, 97)}, "train_rows 1001 -> 1002"),
    ({"data": (1001, 50)}, "train_row_groups [0-9a-f]+ -> [0-9a-f]+"),  # same rows in other row groups
])
def test_a_mid_epoch_resume_refuses_any_change_to_the_batch_order(make_feature_dir, change, named):
    # each of these changes which rows a rank's first n batches hold: skipping n would retrain or skip rows
    d = make_feature_dir("plan", rows={"train": 1001}, files_per_split={"train": 3}, row_group_size=97)
    kw = dict(batch_size=32, num_workers=0, seed=4, shuffle_buffer=100, chunk_rows=65536, drop_last=False)
    mid_epoch = {**FeatureDataModule(str(d), **kw).state_dict(), "epoch": 2, "batches_done": 10}
    data = d
    if "data" in change:
        rows, group = change["data"]
        data = make_feature_dir("plan_other", rows={"train": rows}, files_per_split={"train": 3}, row_group_size=group)
    with pytest.raises(ValueError, match=f"middle of epoch 2.*same batch plan.*{named}"):
        FeatureDataModule(str(data), **{**kw, **{k: v for k, v in change.items() if k != "data"}}).load_state_dict(
            mid_epoch)
    same = FeatureDataModule(str(d), **kw)
    same.load_state_dict(mid_epoch)
    assert same._batches_to_skip(2) == 10


def test_a_mid_epoch_drop_last_checkpoint_of_older_code_is_refused(make_feature_dir):
    """Plans saved before 2026-12-06 hold no drop_last: with drop_last on, the older code kept another window of
    rows, so its batches_done does not count batches of the current order."""
    d = make_feature_dir("old_plan", rows={"train": 1001}, files_per_split={"train": 3}, row_group_size=97)
    kw = dict(batch_size=32, num_workers=0, seed=4, drop_last=True)
    state = FeatureDataModule(str(d), **kw).state_dict()
    old_plan = {k: state["plan"][k] for k in ("world_size", "batch_size", "num_workers")}  # what older code saved
    mid_epoch = {**state, "plan": old_plan, "epoch": 2, "batches_done": 10}
    with pytest.raises(ValueError, match="drop_last window"):
        FeatureDataModule(str(d), **kw).load_state_dict(mid_epoch)
    without = FeatureDataModule(str(d), **{**kw, "drop_last": False})  # every row kept: the same order as before
    without.load_state_dict(mid_epoch)
    assert without._batches_to_skip(2) == 10


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=0), "batch_size must be >= 1, got 0"),
    (dict(eval_batch_size=0), "eval_batch_size must be >= 1"),  # silently meant batch_size
    (dict(num_workers=-1), "num_workers must be >= 0"),
    (dict(chunk_rows=0), "chunk_rows must be >= 1"),
    (dict(seed=-1), r"seed must be in \[0, 2\*\*63\), got -1"),  # numpy's error at the first batch before
])
def test_bad_loader_settings_are_refused_when_the_data_module_is_made(feature_dir, kwargs, match):
    # a batch size of 0 was found when the first loader was made, after the trainer and its MLflow run
    with pytest.raises(ValueError, match=match):
        FeatureDataModule(str(feature_dir), **kwargs)
    FeatureDataModule(str(feature_dir), batch_size=1, eval_batch_size=None, num_workers=0, shuffle_buffer=0)


def test_data_tasks_given_as_a_string_or_unknown_are_refused_by_name(feature_dir):
    with pytest.raises(ValueError, match=r"data tasks must be a list of task names, e.g. \[click\]"):
        FeatureDataModule(str(feature_dir), tasks="click")
    with pytest.raises(ValueError, match=r"data tasks \['foo', 'bar'\] are not in the feature spec"):
        FeatureDataModule(str(feature_dir), tasks=["click", "foo", "bar"])


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("train", [True, False])
def test_each_batch_says_its_steps_rows_summed_over_the_ranks(make_feature_dir, workers, train):
    """The ranks' last batches differ in size; each batch carries its step's global row count (from the plan every
    rank computes alike), by which the module scales its loss to the step's global mean."""
    fd = make_feature_dir("step_rows", rows={"train": 1001, "valid": 1001, "test": 10})
    dm = FeatureDataModule(str(fd), batch_size=64, seed=0, num_workers=workers)
    split = "train" if train else "valid"
    per_rank = [list(dm.dataloader(split, train=train, rank=r, world_size=3)) for r in range(3)]
    sizes = [[b.batch_size for b in batches] for batches in per_rank]
    assert len({len(s) for s in sizes}) == 1 and len({tuple(s) for s in sizes}) > 1  # unequal tails
    for batches in per_rank:
        assert [b.step_rows for b in batches] == [sum(step) for step in zip(*sizes)]
    assert all(b.step_rows is None for b in dm.dataloader(split, train=train, rank=0, world_size=1))


def test_pin_memory_without_a_cuda_device_warns_and_does_not_pin(feature_dir):
    """Pinning needs an accelerator: on a CPU-only machine the first batch failed ("Cannot access accelerator
    device when none is available") after the MLflow run was made, naming no setting."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device pins")
    with pytest.warns(UserWarning, match="pin_memory: no CUDA device here"):
        dm = FeatureDataModule(str(feature_dir), batch_size=64, pin_memory=True)
    batch = next(iter(dm.dataloader("train", train=True, rank=0, world_size=1)))
    assert not batch.dense.is_pinned()


def test_a_dense_value_that_is_null_nan_or_inf_is_named_by_file_column_and_row(make_feature_dir):
    """The feature build writes finite dense values only; a file that holds others made every weight NaN."""
    import pyarrow as pa

    root = make_feature_dir("dense_nan", rows={"train": 300, "valid": 50, "test": 50}, row_group_size=100)
    path = root / "train" / "part-00001.parquet"
    table = pq.read_table(path)
    d0 = table["d0"].to_numpy().copy()
    d0[42] = np.inf
    pq.write_table(table.set_column(table.schema.get_field_index("d0"), "d0", pa.array(d0, pa.float32())), path,
                   row_group_size=100)
    dm = FeatureDataModule(str(root), batch_size=64)
    with pytest.raises(ValueError, match=rf"{path}: column d0 is inf at row 42 .* every value must be a finite"):
        list(dm.dataloader("train", train=True, rank=0, world_size=1))


def test_names_a_writer_sets_aside_are_not_read_as_feature_files(make_feature_dir):
    """`.part.parquet` / `_tmp.parquet` (a writer's temporary file, a copy set aside) were read as rows of the split
    where no manifest counts them: rows twice."""
    import shutil

    root = make_feature_dir("hidden", rows={"train": 300, "valid": 50, "test": 50})
    for name in (".part-00000.parquet", "_tmp.parquet"):
        shutil.copy(root / "train" / "part-00000.parquet", root / "train" / name)
    dm = FeatureDataModule(str(root), batch_size=64)
    assert sum(b.batch_size for b in dm.dataloader("train", rank=0, world_size=1)) == 300


def test_rows_that_cannot_be_planned_for_some_rank_fail_when_any_ranks_loader_is_made(make_feature_dir):
    """929 rows at batch 1 on 2 ranks: rank 0's loader was made (its own plan fits) and failed at its first batch
    inside a worker; rank 1's failed when made."""
    root = make_feature_dir("unplannable", rows={"train": 929, "valid": 50, "test": 50})
    dm = FeatureDataModule(str(root), batch_size=1)
    for rank in (0, 1):
        with pytest.raises(ValueError, match="929 rows cannot be split into 465 non-empty batches on each of 2 ranks"):
            dm.dataloader("train", train=True, rank=rank, world_size=2)


def test_a_raw_data_folder_given_as_features_says_how_to_build_them(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "part-0.csv").write_text("u,click\na,1\n")
    with pytest.raises(FileNotFoundError, match=r"holds data files but no spec.json: raw data\? `mmoe-rec features"):
        FeatureDataModule(str(tmp_path / "raw"))


# Gaps a mutation review found (2026-12-07): eval batches under drop_last and eval_batch_size, a feature file removed
def _feature_dir(tmp_path, rows_per_file=1_000_000):
    raw = tmp_path / "raw.parquet"
    rid = np.arange(1000)
    pq.write_table(pa.table({"rid": rid, "x": rid.astype(float), "y": rid % 2}), raw)
    schema = tmp_path / "s.yaml"
    schema.write_text("id_columns: [rid]\nnumeric: [{name: x}]\ntasks: [{name: y}]\n")
    out = tmp_path / "out"
    assert features_main(["--schema", str(schema), "--input", str(raw), "--output", str(out), "--seed", "0",
                          "--valid-fraction", "0.3", "--test-fraction", "0.1", "--rows-per-file",
                          str(rows_per_file)]) == 0
    return out


def test_eval_loader_keeps_every_row_in_eval_batches_under_drop_last(tmp_path):
    out = _feature_dir(tmp_path)
    n_valid = pq.read_table(out / "valid").num_rows
    assert n_valid % 50 and n_valid % 64
    dm = FeatureDataModule(str(out), batch_size=64, eval_batch_size=50, drop_last=True, shuffle_buffer=0)
    sizes = [b.batch_size for b in dm.val_dataloader()]
    assert sum(sizes) == n_valid and sizes[:-1] == [50] * (len(sizes) - 1)
    assert {b.batch_size for b in dm.train_dataloader()} == {64}


def test_a_feature_file_removed_after_the_build_is_refused(tmp_path):
    out = _feature_dir(tmp_path, rows_per_file=100)
    files = sorted((out / "train").glob("*.parquet"))
    assert len(files) > 2
    files[-1].unlink()
    dm = FeatureDataModule(str(out), batch_size=64)
    with pytest.raises(ValueError, match="manifest.json records"):
        dm.train_dataloader()


def test_a_data_dir_under_home_is_expanded(feature_dir, monkeypatch):
    """`data_dir: ~/feat` in a YAML config looked for a folder named `~` (--checkpoint_dir's ~ was expanded)."""
    monkeypatch.setenv("HOME", str(feature_dir.parent))
    dm = FeatureDataModule(f"~/{feature_dir.name}", batch_size=64)
    assert dm.data_dir == feature_dir
