"""EmbeddingFront: pooled embeddings equal a hand computation, dims / pooling per feature, dense features appended."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mmoe_rec.data.batch import Batch
from mmoe_rec.features.spec import FeatureSpec, SparseFeature, Task
from mmoe_rec.nn.embedding import FUSED_MAX_ELEMENTS, FUSED_TABLE, EmbeddingFront


def spec(dense=("d0", "d1", "d2")) -> FeatureSpec:
    return FeatureSpec(
        sparse_features=[SparseFeature("user", 6), SparseFeature("tags", 5, multi_valued=True),
                         SparseFeature("item", 4)],
        dense_features=list(dense),
        tasks=[Task("click")],
    )


# 3 rows. user: one id per row; tags: [1, 3, 3], [], [4]; item: one id per row.
USER, TAGS, ITEM = [[2], [5], [0]], [[1, 3, 3], [], [4]], [[3], [3], [1]]


def kjt(keys=("user", "tags", "item")) -> KeyedJaggedTensor:
    bags = {"user": USER, "tags": TAGS, "item": ITEM}
    values = [v for k in keys for bag in bags[k] for v in bag]
    lengths = [len(bag) for k in keys for bag in bags[k]]
    return KeyedJaggedTensor.from_lengths_sync(keys=list(keys), values=torch.tensor(values, dtype=torch.long),
                                               lengths=torch.tensor(lengths, dtype=torch.long))


def batch(keys=("user", "tags", "item"), dense_dim=3) -> Batch:
    dense = torch.arange(3 * dense_dim, dtype=torch.float32).view(3, dense_dim) / 10
    return Batch(sparse=kjt(keys), dense=dense, labels={"click": torch.zeros(3)})


def table(front: EmbeddingFront, name: str) -> torch.Tensor:
    return front.table(name).detach()


def pool(weight: torch.Tensor, bag: list[int], how: str) -> torch.Tensor:
    if not bag:
        return torch.zeros(weight.shape[1])
    rows = weight[torch.tensor(bag)]
    return rows.sum(0) if how == "sum" else rows.mean(0)


@pytest.mark.parametrize("keys", [("user", "tags", "item"), ("item", "user", "tags")])
def test_pooled_output_equals_hand_computed_sum_and_mean_with_per_feature_dims(keys):
    torch.manual_seed(0)
    front = EmbeddingFront(spec(), embedding_dim=4, embedding_dims={"tags": 3}, pooling={"tags": "mean"})
    b = batch(keys)
    out = front(b)
    assert front.output_dim == front.out_dim == 4 + 3 + 4 + 3
    assert out.shape == (3, front.output_dim) and out.dtype == torch.float32
    want = torch.stack([
        torch.cat([pool(table(front, "user"), USER[i], "sum"), pool(table(front, "tags"), TAGS[i], "mean"),
                   pool(table(front, "item"), ITEM[i], "sum"), b.dense[i]])
        for i in range(3)
    ])
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
    assert torch.all(out[1, 4:7] == 0)  # the empty tag bag pools to zeros


def test_sum_pooling_of_a_multi_valued_feature_counts_repeated_ids():
    torch.manual_seed(0)
    front = EmbeddingFront(spec(), embedding_dim=2, pooling="sum")
    w = table(front, "tags")
    torch.testing.assert_close(front(batch())[0, 2:4], w[1] + 2 * w[3])


def test_init_is_normal_with_the_documented_std_whatever_the_vocabulary():
    torch.manual_seed(0)
    big = FeatureSpec([SparseFeature("a", 4000), SparseFeature("b", 3)], [], [Task("t")])
    front = EmbeddingFront(big, embedding_dim=16, init_std=0.05)
    w = table(front, "a")
    assert abs(float(w.std()) - 0.05) < 0.003 and abs(float(w.mean())) < 0.003
    assert float(table(front, "b").abs().max()) < 0.05 * 5  # not torchrec's U(+-1/sqrt(3)) = +-0.58


def test_gradient_reaches_only_the_rows_that_were_looked_up():
    front = EmbeddingFront(spec(), embedding_dim=2)
    front(batch()).sum().backward()
    assert not front.fused  # tags is multi-valued: one table per feature
    grad = front.ebc.embedding_bags["t_user"].weight.grad
    used = {2, 5, 0}
    for row in range(6):
        assert bool(grad[row].abs().sum() > 0) == (row in used)


def test_without_sparse_features_the_output_is_the_dense_features():
    front = EmbeddingFront(FeatureSpec([], ["x0", "x1"], [Task("y")]))
    dense = torch.randn(5, 2)
    b = Batch(sparse=KeyedJaggedTensor.empty(), dense=dense, labels={})
    assert front.ebc is None and front.output_dim == 2
    assert torch.equal(front(b), dense)


def test_without_dense_features_the_output_is_the_pooled_embeddings():
    front = EmbeddingFront(spec(dense=()), embedding_dim=3)
    out = front(batch(dense_dim=0))
    assert out.shape == (3, 9) and front.output_dim == 9


@pytest.mark.parametrize("kwargs,match", [
    ({"embedding_dims": {"nope": 3}}, "embedding_dims names unknown sparse feature"),
    ({"pooling": {"nope": "sum"}}, "pooling names unknown sparse feature"),
    ({"pooling": "max"}, "pooling of 'user' must be one of"),
    ({"embedding_dim": 0}, "embedding dim of 'user' must be >= 1"),
])
def test_bad_configuration_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EmbeddingFront(spec(), **kwargs)


def single_valued_spec(user_rows: int = 6) -> FeatureSpec:
    return FeatureSpec(sparse_features=[SparseFeature("user", user_rows), SparseFeature("item", 4)],
                       dense_features=["d0"], tasks=[Task("click")])


def single_valued_batch(keys=("user", "item")) -> Batch:
    return Batch(sparse=kjt(keys), dense=torch.ones(3, 1), labels={"click": torch.zeros(3)})


def table_grad(front: EmbeddingFront, name: str) -> torch.Tensor:
    if not front.fused:
        return front.ebc.embedding_bags[f"t_{name}"].weight.grad
    start = int(front._row_offsets[front.sparse_names.index(name)])
    return front.ebc.embedding_bags[FUSED_TABLE].weight.grad.narrow(0, start, front.table_rows[name])


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_fused_table_equals_one_table_per_feature_values_forward_gradients_and_rng(pooling):
    made, after = {}, {}
    for fuse in (False, True):
        torch.manual_seed(0)
        made[fuse] = EmbeddingFront(single_valued_spec(), embedding_dim=5, pooling=pooling, fuse_tables=fuse)
        after[fuse] = torch.rand(3)  # the global RNG is where the per-table layout leaves it
    per_table, fused = made[False], made[True]
    assert fused.fused and not per_table.fused
    assert [name for name, _ in fused.named_parameters()] == [f"ebc.embedding_bags.{FUSED_TABLE}.weight"]
    assert torch.equal(after[False], after[True])
    outs = {}
    for fuse, front in made.items():
        outs[fuse] = front(single_valued_batch())
        outs[fuse].pow(2).sum().backward()
    assert torch.equal(outs[True], outs[False])
    for n in ("user", "item"):
        assert torch.equal(table(fused, n), table(per_table, n))
        assert torch.equal(table_grad(fused, n), table_grad(per_table, n))
    # the hand computation too: user rows 2, 5, 0 and item rows 3, 3, 1
    torch.testing.assert_close(outs[True][:, :5], table(fused, "user")[torch.tensor([2, 5, 0])])
    torch.testing.assert_close(outs[True][:, 5:10], table(fused, "item")[torch.tensor([3, 3, 1])])


def graph_nodes(t: torch.Tensor) -> set[str]:
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node.name() not in seen:
            seen.add(node.name())
            todo.extend(next_fn for next_fn, _ in node.next_functions)
    return seen


def test_the_fused_tables_cpu_gradient_is_summed_by_row_gather():
    # nn.row_gather's backward (no false sharing between threads), not index_select's; equal values are tested
    # above and in tests/nn/test_row_gather.py
    front = EmbeddingFront(single_valued_spec(), embedding_dim=4)
    nodes = graph_nodes(front.pooled(single_valued_batch()))
    assert "_GatherRowsBackward" in nodes and "IndexSelectBackward0" not in nodes


def test_fused_table_through_torchrec_equals_the_index_select_path():
    torch.manual_seed(0)
    front = EmbeddingFront(single_valued_spec(), embedding_dim=3)
    fast = front(single_valued_batch(("user", "item")))
    # keys in another order leave the index_select path: torchrec pools the fused table with shifted ids
    through_torchrec = front(single_valued_batch(("item", "user")))
    torch.testing.assert_close(through_torchrec, fast)
    with pytest.raises(KeyError, match="nope"):
        front(Batch(sparse=KeyedJaggedTensor.from_lengths_sync(keys=["user", "nope"], values=torch.zeros(6).long(),
                                                               lengths=torch.ones(6).long()),
                    dense=torch.ones(3, 1), labels={}))


def test_a_per_table_state_dict_loads_into_the_fused_layout():
    torch.manual_seed(0)
    per_table = nn.ModuleDict({"front": EmbeddingFront(single_valued_spec(), embedding_dim=4, fuse_tables=False)})
    fused = nn.ModuleDict({"front": EmbeddingFront(single_valued_spec(), embedding_dim=4)})
    assert not torch.equal(table(fused["front"], "user"), table(per_table["front"], "user"))
    fused.load_state_dict(per_table.state_dict())  # strict: no key missing or left over
    b = single_valued_batch()
    assert torch.equal(fused["front"](b), per_table["front"](b))


def test_fusing_is_off_for_multi_valued_mixed_dims_large_tables_or_when_asked():
    assert not EmbeddingFront(spec()).fused  # tags is multi-valued
    assert not EmbeddingFront(single_valued_spec(), embedding_dim=4, embedding_dims={"item": 3}).fused
    assert not EmbeddingFront(single_valued_spec(), fuse_tables=False).fused
    assert EmbeddingFront(single_valued_spec(FUSED_MAX_ELEMENTS // 8 - 4), embedding_dim=8).fused
    assert not EmbeddingFront(single_valued_spec(FUSED_MAX_ELEMENTS // 8 - 3), embedding_dim=8).fused
    with pytest.raises(KeyError, match="nope"):
        EmbeddingFront(single_valued_spec()).table("nope")


@pytest.mark.parametrize("keys", [("user", "item"), ("item", "user")])  # index_select path, then torchrec's
@pytest.mark.parametrize("bad_id", [6, 7, -1])
def test_fused_table_refuses_an_id_outside_its_features_table(keys, bad_id):
    # without the check, user id 6 would read item's row 0 of the fused table: a silent wrong answer
    front = EmbeddingFront(single_valued_spec(), embedding_dim=3)
    assert front.fused
    values = {"user": [2, bad_id, 0], "item": [3, 3, 1]}
    sparse = KeyedJaggedTensor.from_lengths_sync(keys=list(keys), values=torch.tensor([v for k in keys for v in values[k]]),
                                                 lengths=torch.ones(6, dtype=torch.long))
    with pytest.raises(IndexError, match=rf"'user': id {bad_id}.*6 rows"):
        front(Batch(sparse=sparse, dense=torch.ones(3, 1), labels={}))
    per_table = EmbeddingFront(single_valued_spec(), embedding_dim=3, fuse_tables=False)
    with pytest.raises(IndexError, match=rf"'user': id {bad_id}.*6 rows"):  # torchrec's own error named no feature
        per_table(Batch(sparse=sparse, dense=torch.ones(3, 1), labels={}))


def test_a_bfloat16_front_gives_bfloat16_inputs():
    # precision "bf16-true" casts the model: float32 dense features beside bf16 embeddings would make the first
    # bf16 layer fail with a dtype mismatch
    front = EmbeddingFront(single_valued_spec(), embedding_dim=4).to(torch.bfloat16)
    out = front(single_valued_batch())
    assert out.dtype == torch.bfloat16 and out.shape == (3, 2 * 4 + 1)
    # without sparse features there are no tables to take the dtype from: still the model's dtype
    dense_only = EmbeddingFront(FeatureSpec([], ["x0", "x1"], [Task("y")]))
    b = Batch(sparse=KeyedJaggedTensor.empty(), dense=torch.randn(5, 2).to(torch.bfloat16), labels={})
    assert dense_only.to(torch.bfloat16)(b).dtype == torch.bfloat16
    assert dense_only.float()(b).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_a_front_of_per_table_lookups_gives_the_models_dtype(dtype):
    """torchrec pools a bfloat16 / float64 table into float32: a model with a multi-valued feature (tables not fused)
    cast by precision "bf16-true" got float32 inputs for its bf16 layers and failed on the dtype mismatch."""
    from mmoe_rec.models.mmoe import MMoE

    front = EmbeddingFront(spec(), embedding_dim=4)
    assert not front.fused
    want = front(batch())
    got = front.to(dtype)(batch())
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)
    model = MMoE(spec(), num_experts=2, embedding_dim=4).to(dtype)
    # the model runs in its dtype; a bf16 model's output layer computes in float32 (nn.towers: scores do not tie)
    assert model(batch()).logits["click"].dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)


@pytest.mark.parametrize("fuse_tables", [True, False])
def test_a_batch_of_no_rows_pools_to_no_rows(fuse_tables):
    """The per-table lookup raised torchrec's bare IndexError on a 0-row batch (the fused gather did not)."""
    sv = spec() if not fuse_tables else single_valued_spec()
    front = EmbeddingFront(sv, embedding_dim=4, fuse_tables=fuse_tables)
    keys = list(front.sparse_names)
    empty = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.zeros(0, dtype=torch.long),
                                                lengths=torch.zeros(0, dtype=torch.long))
    out = front(Batch(sparse=empty, dense=torch.zeros(0, sv.dense_dim), labels={}))
    assert out.shape == (0, front.output_dim) and out.dtype == torch.float32


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_the_fused_front_pools_by_the_bag_lengths_when_there_are_as_many_ids_as_bags(pooling):
    """Bags [] and [1, 3] hold 2 ids for 2 rows, like two one-id bags: the fast path read them as ids 1 and 3; and
    the fused table sums, so a mean-pooled feature's bag of 2 came out twice its mean."""
    fused = EmbeddingFront(single_valued_spec(), embedding_dim=3, pooling=pooling)
    per_table = EmbeddingFront(single_valued_spec(), embedding_dim=3, pooling=pooling, fuse_tables=False)
    fused.load_state_dict(per_table.state_dict())  # the per-table layout loads into the fused table
    assert fused.fused and not per_table.fused
    sparse = KeyedJaggedTensor.from_lengths_sync(keys=["user", "item"], values=torch.tensor([1, 3, 2, 0]),
                                                 lengths=torch.tensor([0, 2, 1, 1]))
    b = Batch(sparse=sparse, dense=torch.ones(2, 1), labels={})
    want = per_table(b)
    torch.testing.assert_close(fused(b), want)
    user = per_table.table("user")
    torch.testing.assert_close(want[0, :3], torch.zeros(3))  # an empty bag pools to zeros
    torch.testing.assert_close(want[1, :3], (user[1] + user[3]) / (2 if pooling == "mean" else 1))


@pytest.mark.parametrize("fuse_tables", [True, False])
def test_a_batch_whose_sparse_features_are_not_the_specs_is_an_error_naming_them(fuse_tables):
    # one missing was a bare KeyError('item') from inside torchrec; one unknown was ignored by the per-table layout
    front = EmbeddingFront(single_valued_spec(), embedding_dim=3, fuse_tables=fuse_tables)

    def batch(keys: list[str]) -> Batch:
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.zeros(3 * len(keys)).long(),
                                                  lengths=torch.ones(3 * len(keys)).long())
        return Batch(sparse=kjt, dense=torch.ones(3, 1), labels={})

    with pytest.raises(KeyError, match=r"missing \['item'\]"):
        front(batch(["user"]))
    with pytest.raises(KeyError, match=r"not in the spec \['nope'\]"):
        front(batch(["user", "item", "nope"]))


def test_dense_features_of_another_width_are_named_as_such():
    spec = FeatureSpec([SparseFeature("u", 5)], ["d0", "d1", "d2"], [Task("click")]).finalize()
    front = EmbeddingFront(spec, embedding_dim=4)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["u"], values=torch.tensor([1, 2]), lengths=torch.ones(2).long())
    with pytest.raises(ValueError, match=r"dense features of shape \(2, 2\); the feature spec has 3 dense"):
        front(Batch(sparse=kjt, dense=torch.zeros(2, 2), labels={}))


@pytest.mark.parametrize("fused", [False, True], ids=["per-table", "fused-table-general-path"])
def test_a_float64_front_pools_in_float64(fused):
    """torchrec pools every table through float32 (its `.float()`): a float64 model (precision "64-true", gradcheck)
    got float32-rounded embeddings, 5e-8 off, and gradients 1e-8 off (a review's probe). Fused, the batch holds a bag
    of two ids so that the general path (not the one-id gather) runs."""
    torch.manual_seed(0)
    if fused:
        front = EmbeddingFront(single_valued_spec(), embedding_dim=4, pooling="mean").double()
        assert front.fused
        bags = {"user": [[2, 5], [], [0]], "item": [[3], [3], [1]]}  # 4 ids for 3 rows: not one id a bag
    else:
        front = EmbeddingFront(spec(), embedding_dim=4, pooling={"tags": "mean"}).double()
        bags = {"user": USER, "tags": TAGS, "item": ITEM}
    keys = list(bags)
    sparse = KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.tensor([v for k in keys for bag in bags[k] for v in bag]),
        lengths=torch.tensor([len(bag) for k in keys for bag in bags[k]]))
    dense = torch.rand(3, front.dense_dim, dtype=torch.float64)
    got = front(Batch(sparse=sparse, dense=dense, labels={}))
    assert got.dtype == torch.float64

    def reference(name: str, bag: list[int]) -> torch.Tensor:  # (d,) from the same float64 parameters
        rows = front.table(name)[torch.tensor(bag, dtype=torch.long)]
        return rows.sum(0) if front.poolings[name] == "sum" or not bag else rows.mean(0)

    want = torch.cat([torch.stack([reference(n, bag) for bag in bags[n]]) for n in front.sparse_names] + [dense], 1)
    torch.testing.assert_close(got, want, rtol=1e-15, atol=1e-15)
    weights = torch.rand_like(got)
    params = list(front.ebc.parameters())
    grads_got = torch.autograd.grad((got * weights).sum(), params)
    grads_want = torch.autograd.grad((want * weights).sum(), params)
    for g, w in zip(grads_got, grads_want):
        torch.testing.assert_close(g, w, rtol=1e-15, atol=1e-15)


def test_a_fused_state_dict_loads_into_the_per_table_layout():
    """The other way round from the test above it: a checkpoint of fused tables into a front built with
    fuse_tables=False (or from a spec that gained a multi-valued feature) failed on its keys."""
    torch.manual_seed(0)
    fused = nn.ModuleDict({"front": EmbeddingFront(single_valued_spec(), embedding_dim=4)})
    per_table = nn.ModuleDict({"front": EmbeddingFront(single_valued_spec(), embedding_dim=4, fuse_tables=False)})
    with torch.no_grad():
        for p in fused.parameters():
            p.copy_(torch.randn_like(p))
    per_table.load_state_dict(fused.state_dict())  # strict: no key missing or left over
    b = single_valued_batch()
    assert torch.equal(per_table["front"](b), fused["front"](b))


@pytest.mark.parametrize("fuse_tables", [True, False])
def test_sparse_and_dense_features_of_different_row_counts_are_named_as_such(fuse_tables):
    front = EmbeddingFront(single_valued_spec(), embedding_dim=4, fuse_tables=fuse_tables)
    with pytest.raises(ValueError, match="3 rows of sparse features and 2 of dense ones"):
        front(Batch(sparse=kjt(("user", "item")), dense=torch.ones(2, 1), labels={}))


def test_tables_of_other_sizes_are_refused_when_the_layout_is_converted():
    """A per-table state dict whose tables have other row counts than the spec's was joined into the fused table
    (the user table got some of the item table's rows), and a fused one with another total was left unloaded under
    strict=False without a word (a review's probe)."""
    other_sizes = single_valued_spec(user_rows=3)  # user 3 rows instead of 6
    fused = EmbeddingFront(single_valued_spec(), embedding_dim=4)
    per_table = EmbeddingFront(single_valued_spec(), embedding_dim=4, fuse_tables=False)
    with pytest.raises(RuntimeError, match=r"t_user.weight: 3 rows in the state dict, .* 'user' has 6"):
        fused.load_state_dict(EmbeddingFront(other_sizes, embedding_dim=4, fuse_tables=False).state_dict())
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=r"t_fused.weight: 7 rows in the state dict, .* have 10 \(\[6, 4\]\)"):
            per_table.load_state_dict(EmbeddingFront(other_sizes, embedding_dim=4).state_dict(), strict=strict)


def test_init_std_reaches_the_tables():
    """Only the default (0.05) was tested: a hard-coded std passed."""
    torch.manual_seed(0)
    spec = FeatureSpec([SparseFeature("a", 4000)], [], [Task("t")])
    table = EmbeddingFront(spec, embedding_dim=16, init_std=0.2).table("a")
    assert abs(float(table.std()) - 0.2) < 0.01


def test_fused_mean_pooling_divides_the_right_features_bags_when_keys_come_in_another_order():
    """The fused table sums; a mean-pooled feature's bag of several ids is divided by its length, in the column of
    that feature in spec order (the batch's key position put it on another feature's column: a review's
    mutation survived, every test sent keys in spec order with one pooling)."""
    spec = FeatureSpec([SparseFeature("user", 6), SparseFeature("item", 4)], ["d0"], [Task("click")])
    kw = dict(embedding_dim=3, pooling={"user": "mean", "item": "sum"})
    fused = EmbeddingFront(spec, **kw)
    per_table = EmbeddingFront(spec, fuse_tables=False, **kw)
    fused.load_state_dict(per_table.state_dict())
    assert fused.fused
    # keys item, user (not the spec's order); row 1's user bag holds two ids
    sparse = KeyedJaggedTensor.from_lengths_sync(keys=["item", "user"], values=torch.tensor([2, 0, 1, 1, 3]),
                                                 lengths=torch.tensor([1, 1, 1, 2]))
    batch = Batch(sparse=sparse, dense=torch.ones(2, 1), labels={})
    torch.testing.assert_close(fused(batch), per_table(batch))


# Gaps a mutation review found (mutdense): the default pooling of features a pooling dict leaves out, and the
# reordering of a collection's pooled features into spec order (never exercised: an unsharded collection returns
# them in spec order)
def test_the_features_a_pooling_dict_does_not_name_are_sum_pooled():
    torch.manual_seed(0)
    front = EmbeddingFront(spec(dense=()), embedding_dim=3, pooling={"user": "mean"}, fuse_tables=False)
    assert front.poolings == {"user": "mean", "tags": "sum", "item": "sum"}
    out = front(batch(dense_dim=0))
    tags = table(front, "tags")  # row 0's bag [1, 3, 3] tells a sum from a mean
    torch.testing.assert_close(out[:, 3:6], torch.stack([pool(tags, bag, "sum") for bag in TAGS]))


def test_pooled_features_are_put_in_spec_order_when_the_collection_returns_them_in_another():
    """A collection sharded by DistributedModelParallel may return its features grouped by shard (module docstring):
    the front puts them back in spec order."""
    from torchrec.sparse.jagged_tensor import KeyedTensor

    torch.manual_seed(0)
    front = EmbeddingFront(spec(), embedding_dims={"user": 2, "tags": 3, "item": 4}, pooling={"tags": "mean"})
    assert not front.fused  # tags is multi-valued
    want = front(batch())

    class Regrouped(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
            by_key = self.inner(features).to_dict()
            keys = ["item", "user", "tags"]
            return KeyedTensor.from_tensor_list(keys, [by_key[k] for k in keys])

    front.ebc = Regrouped(front.ebc)
    assert torch.equal(front(batch()), want)
