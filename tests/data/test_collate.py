"""collate: RecordBatch -> Batch, checked against a row-by-row pure-Python reference."""
from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from mmoe_rec.data.batch import Batch
from mmoe_rec.data.collate import BatchCollator
from mmoe_rec.features.spec import WEIGHT_COLUMN, FeatureSpec, SparseFeature, Task, label_column


def _record_batch(feature_dir, split="train") -> pa.RecordBatch:
    path = sorted((feature_dir / split).glob("*.parquet"))[0]
    return pa.concat_batches(pq.read_table(path).to_batches())


def _reference_bags(rows: list[dict], spec: FeatureSpec) -> dict[str, list[list[int]]]:
    out = {}
    for f in spec.sparse_features:
        if f.multi_valued:
            out[f.name] = [list(r[f.name] or []) for r in rows]
        else:
            out[f.name] = [[r[f.name]] for r in rows]
    return out


def _check_against_rows(batch: Batch, rb: pa.RecordBatch, spec: FeatureSpec) -> None:
    rows = rb.to_pylist()
    bags = _reference_bags(rows, spec)
    kjt = batch.sparse
    assert kjt.keys() == [f.name for f in spec.sparse_features]
    assert kjt.stride() == len(rows)
    # the KJT layout itself: key-major values, offsets = running sum of the reference bag lengths
    flat = [i for f in spec.sparse_features for bag in bags[f.name] for i in bag]
    ref_lengths = [len(bag) for f in spec.sparse_features for bag in bags[f.name]]
    assert kjt.values().tolist() == flat
    assert kjt.lengths().tolist() == ref_lengths
    assert kjt.offsets().tolist() == np.concatenate([[0], np.cumsum(ref_lengths)]).tolist()
    for name, ref in bags.items():
        assert [t.tolist() for t in kjt[name].to_dense()] == ref
    assert kjt.values().dtype == torch.int64 and kjt.lengths().dtype == torch.int64
    ref_dense = torch.tensor([[r[c] for c in spec.dense_features] for r in rows], dtype=torch.float32)
    assert batch.dense.dtype == torch.float32 and batch.dense.shape == (len(rows), spec.dense_dim)
    torch.testing.assert_close(batch.dense, ref_dense, rtol=0, atol=0)
    assert set(batch.labels) == set(spec.task_names)
    for t in spec.task_names:
        assert batch.labels[t].tolist() == [r[label_column(t)] for r in rows]


def test_collate_matches_row_by_row_reference(feature_dir):
    spec = FeatureSpec.load(feature_dir)
    rb = _record_batch(feature_dir)
    batch = BatchCollator(spec)(rb)
    _check_against_rows(batch, rb, spec)
    assert batch.ids is None and batch.weights is None


def test_collate_of_a_sliced_record_batch_respects_the_slice_offset(feature_dir):
    # the stream hands the collator zero-copy slices whose list offsets do not start at 0
    spec = FeatureSpec.load(feature_dir)
    rb = _record_batch(feature_dir).slice(37, 101)
    _check_against_rows(BatchCollator(spec)(rb), rb, spec)


@pytest.mark.parametrize("id_type", [pa.int64(), pa.int32()])
def test_single_valued_features_only_match_the_reference(feature_dir, id_type):
    # all single-valued int64 ids: one Arrow call for the KJT values; int32 ids take the column-by-column path
    spec = FeatureSpec.load(feature_dir)
    spec = dataclasses.replace(spec, sparse_features=[f for f in spec.sparse_features if not f.multi_valued])
    rb = _record_batch(feature_dir).slice(37, 101)
    rb = rb.set_column(rb.schema.get_field_index("item"), "item", rb.column("item").cast(id_type))
    _check_against_rows(BatchCollator(spec)(rb), rb, spec)


@pytest.mark.parametrize("dense_type", [pa.float32(), pa.float64()])
def test_null_dense_values_become_nan(dense_type):
    spec = FeatureSpec(sparse_features=[SparseFeature("user", 5)], dense_features=["a", "b"], tasks=[Task("click")])
    rb = pa.RecordBatch.from_pydict({"user": pa.array([1, 2, 3], pa.int64()),
                                     "a": pa.array([0.5, None, 2.0], dense_type),
                                     "b": pa.array([1.0, 2.0, 3.0], pa.float32()),
                                     "label_click": pa.array([0.0, 1.0, 0.0])})
    dense = BatchCollator(spec)(rb).dense
    assert dense.dtype == torch.float32 and dense.shape == (3, 2)
    assert dense[:, 0].tolist()[0] == 0.5 and torch.isnan(dense[1, 0]) and dense[2].tolist() == [2.0, 3.0]


def test_empty_and_null_lists_are_empty_bags():
    spec = FeatureSpec(
        sparse_features=[SparseFeature("tags", 10, multi_valued=True), SparseFeature("user", 5)],
        dense_features=[],
        tasks=[Task("click")],
    )
    rb = pa.RecordBatch.from_pydict({
        "tags": pa.array([[], [3, 4], None, [], [7]], pa.list_(pa.int64())),
        "user": pa.array([0, 1, 2, 3, 4], pa.int64()),
        label_column("click"): pa.array([0, 1, 0, 1, 0], pa.float32()),
    })
    batch = BatchCollator(spec)(rb)
    assert batch.sparse["tags"].lengths().tolist() == [0, 2, 0, 0, 1]
    assert batch.sparse["tags"].values().tolist() == [3, 4, 7]
    assert batch.sparse["user"].values().tolist() == [0, 1, 2, 3, 4]
    assert batch.dense.shape == (5, 0)

    all_empty = pa.RecordBatch.from_pydict({
        "tags": pa.array([[], []], pa.list_(pa.int64())),
        "user": pa.array([1, 2], pa.int64()),
        label_column("click"): pa.array([0, 1], pa.float32()),
    })
    batch = BatchCollator(spec)(all_empty)
    assert batch.sparse["tags"].lengths().tolist() == [0, 0]
    assert batch.sparse["tags"].values().numel() == 0
    assert batch.sparse.offsets().tolist() == [0, 0, 0, 1, 2]


def test_weights_ids_and_task_subset(make_feature_dir):
    d = make_feature_dir("weighted", rows={"train": 50}, with_weight=True)
    spec = FeatureSpec.load(d)
    rb = _record_batch(d)
    batch = BatchCollator(spec, tasks=["convert"], with_ids=True)(rb)
    assert list(batch.labels) == ["convert"]
    assert batch.weights.tolist() == pytest.approx(rb.column(WEIGHT_COLUMN).to_pylist())
    assert batch.ids["row_id"].tolist() == rb.column("row_id").to_pylist()
    assert batch.ids["request_id"].tolist() == rb.column("request_id").to_pylist()


def test_a_slice_s_ids_cross_the_worker_pipe_without_the_chunks_buffers(make_feature_dir):
    """Predict batches are slices of a larger chunk: their id columns pickled (worker -> main process) with the
    whole chunk's buffers, ~50x the bytes of the batch's ids."""
    import pickle

    d = make_feature_dir("ids_pickle", rows={"train": 2000})
    spec = FeatureSpec.load(d)
    chunk = _record_batch(d)
    assert chunk.num_rows >= 1000
    part = chunk.slice(500, 16)
    arrays = BatchCollator(spec, with_ids=True).arrays(part)
    whole = len(pickle.dumps(chunk.column("row_id")))
    assert len(pickle.dumps(arrays.ids["row_id"])) < whole / 20
    assert arrays.ids["row_id"].to_pylist() == part.column("row_id").to_pylist()


def test_unknown_task_is_a_clear_error(feature_dir):
    with pytest.raises(KeyError, match="unknown task 'ctr'"):
        BatchCollator(FeatureSpec.load(feature_dir), tasks=["ctr"])


def test_null_single_valued_id_is_an_error():
    spec = FeatureSpec(sparse_features=[SparseFeature("user", 5)], dense_features=[], tasks=[Task("click")])
    rb = pa.RecordBatch.from_pydict({"user": pa.array([1, None], pa.int64()), "label_click": pa.array([0.0, 1.0])})
    with pytest.raises(ValueError, match="'user' has 1 null"):
        BatchCollator(spec)(rb)


@pytest.mark.parametrize("values,id_type", [([1.9, 2.5], pa.float64()), (["3", "4"], pa.string())])
def test_non_integer_ids_are_refused_not_truncated_or_parsed(values, id_type):
    spec = FeatureSpec(sparse_features=[SparseFeature("user", 5), SparseFeature("tags", 5, multi_valued=True)],
                       dense_features=[], tasks=[Task("click")])
    ok_tags = pa.array([[1], []], pa.list_(pa.int64()))
    rb = pa.RecordBatch.from_pydict({"user": pa.array(values, id_type), "tags": ok_tags,
                                     "label_click": pa.array([0.0, 1.0])})
    with pytest.raises(TypeError, match=f"'user' must hold integer ids, found {id_type}"):
        BatchCollator(spec)(rb)
    rb = pa.RecordBatch.from_pydict({"user": pa.array([1, 2]), "tags": pa.array([values, []], pa.list_(id_type)),
                                     "label_click": pa.array([0.0, 1.0])})
    with pytest.raises(TypeError, match=f"'tags' must hold integer ids, found {id_type}"):
        BatchCollator(spec)(rb)


@pytest.mark.parametrize("column,value,shown", [
    ("label_click", float("nan"), "nan"), ("label_click", None, "None"), ("label_click", float("-inf"), "-inf"),
    (WEIGHT_COLUMN, -0.5, "-0.5"), (WEIGHT_COLUMN, None, "None"),
])
def test_a_non_finite_label_or_negative_weight_is_an_error(column, value, shown):
    spec = FeatureSpec(sparse_features=[SparseFeature("user", 5)], dense_features=[], tasks=[Task("click")],
                       has_weight=True)
    cols = {"user": pa.array([1, 2, 3]), "label_click": [0.0, 1.0, 0.0], WEIGHT_COLUMN: [1.0, 1.0, 2.0]}
    cols[column] = pa.array(cols[column][:2] + [value], pa.float32())
    rb = pa.RecordBatch.from_pydict(cols)
    with pytest.raises(ValueError, match=f"'{column}' is {shown} at row 2 of the batch"):
        BatchCollator(spec)(rb)


def test_batch_pickles_and_embedding_bag_collection_pools_it(feature_dir):
    spec = FeatureSpec.load(feature_dir)
    rb = _record_batch(feature_dir).slice(0, 64)
    batch = pickle.loads(pickle.dumps(BatchCollator(spec)(rb)))
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(name=f.name, embedding_dim=4, num_embeddings=f.num_embeddings,
                               feature_names=[f.name], pooling=PoolingType.SUM)
            for f in spec.sparse_features
        ]
    )
    pooled = ebc(batch.sparse).to_dict()
    for f in spec.sparse_features:
        weight = ebc.embedding_bags[f.name].weight
        ref = torch.stack([
            weight[torch.tensor(bag, dtype=torch.long)].sum(0) if bag else torch.zeros(4)
            for bag in _reference_bags(rb.to_pylist(), spec)[f.name]
        ])
        torch.testing.assert_close(pooled[f.name], ref)


def test_lightning_moves_a_batch_through_batch_to(feature_dir):
    spec = FeatureSpec.load(feature_dir)
    batch = BatchCollator(spec, with_ids=True)(_record_batch(feature_dir).slice(0, 16))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    moved = move_data_to_device(batch, device)
    assert isinstance(moved, Batch)
    assert moved.sparse.values().device.type == device.type
    assert moved.sparse.lengths().device.type == device.type
    assert moved.dense.device.type == device.type and moved.labels["click"].device.type == device.type
    assert moved.sparse.values().cpu().tolist() == batch.sparse.values().tolist()
    assert moved.ids["row_id"].tolist() == batch.ids["row_id"].tolist()


def test_the_collator_takes_the_table_transform_table_returns():
    from mmoe_rec.features.spec import FeatureSpec, SparseFeature, Task

    spec = FeatureSpec([SparseFeature("u", 5)], ["d"], [Task("click")]).finalize()
    table = pa.Table.from_batches([pa.record_batch({"u": [1, 2], "d": [0.5, 1.5], "label_click": [0.0, 1.0]}),
                                   pa.record_batch({"u": [3], "d": [2.5], "label_click": [1.0]})])
    batch = BatchCollator(spec)(table)
    assert batch.batch_size == 3 and batch.dense[:, 0].tolist() == [0.5, 1.5, 2.5]


def test_moving_a_batch_keeps_its_sample_weights_and_step_rows():
    spec = FeatureSpec([SparseFeature("u", 5)], ["d"], [Task("click")], has_weight=True).finalize()
    rb = pa.record_batch({"u": pa.array([1, 2, 3], pa.int64()), "d": pa.array([0.5, 1.0, 2.0], pa.float32()),
                          label_column("click"): pa.array([1.0, 0.0, 1.0], pa.float32()),
                          WEIGHT_COLUMN: pa.array([2.0, 0.0, 0.5], pa.float32())})  # a weight of 0 is allowed
    collator = BatchCollator(spec)
    arrays = collator.arrays(rb)
    arrays.step_rows = 7
    moved = collator.to_batch(arrays).to("cpu")
    torch.testing.assert_close(moved.weights, torch.tensor([2.0, 0.0, 0.5]))
    assert moved.step_rows == 7
    # predictions read no labels, and so no sample weight either (scored data need not have one)
    assert WEIGHT_COLUMN not in BatchCollator(spec, with_labels=False).columns
