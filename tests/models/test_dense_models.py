"""Dense multi-task models: each equals its formula written per expert, PLE(no task experts, 1 level) = MMoE,
shapes / dtypes / routing records of every model, gradients reach every expert."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mmoe_rec.models import MMoE, OMoE, PLE, SharedBottom
from mmoe_rec.models.factory import build_model, class_path_of
from model_inputs import TASKS, batch, spec

B = 12


def features(d: int = 18, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(B, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)  # 2 * 8 embedding + 2


def mix(weights: torch.Tensor, outs: list[torch.Tensor]) -> torch.Tensor:
    """sum_i weights[:, i] * outs[i], written out."""
    return sum(weights[:, i : i + 1] * o for i, o in enumerate(outs))


# ---------------------------------------------------------------------------------------------------------------
# Each model equals its formula


def test_mmoe_equals_its_formula_with_one_gate_per_task():
    torch.manual_seed(0)
    model = MMoE(spec(), num_experts=4, expert_hidden=[8, 5], gate_temperature=0.5).double()
    x = features()
    out = model.forward_dense(x)
    experts = [model.experts.forward_one(x, e) for e in range(4)]
    for i, t in enumerate(TASKS):
        g = torch.softmax(x @ model.gates.weight[i] / 0.5, dim=-1)
        torch.testing.assert_close(out.logits[t], model.towers[t](mix(g, experts)))
        torch.testing.assert_close(out.routing[t].combine, g.float())


def test_omoe_shares_one_gate_between_all_tasks():
    torch.manual_seed(0)
    model = OMoE(spec(), num_experts=3, expert_hidden=[6]).double()
    x = features()
    out = model.forward_dense(x)
    g = torch.softmax(x @ model.gates.weight[0], dim=-1)
    h = mix(g, [model.experts.forward_one(x, e) for e in range(3)])
    assert set(out.routing) == {"shared"}
    for t in TASKS:
        torch.testing.assert_close(out.logits[t], model.towers[t](h))


def test_shared_bottom_is_one_mlp_then_towers():
    torch.manual_seed(0)
    model = SharedBottom(spec(), bottom_hidden=[10, 6]).double()
    x = features()
    out = model.forward_dense(x)
    assert out.routing == {} and out.aux == {}
    for t in TASKS:
        torch.testing.assert_close(out.logits[t], model.towers[t](model.bottom(x)))


def reference_ple(model: PLE, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """PLE written per task and per expert (Tang et al. 2020): -> logits, gate weights by routing name."""
    task_in = {t: x for t in TASKS}
    shared_in = x
    gates = {}
    for li, level in enumerate(model.levels):
        Kt, Ks = level.Kt, level.Ks
        own = {t: [level.task_experts.forward_one(task_in[t], i * Kt + j) for j in range(Kt)]
               for i, t in enumerate(TASKS)}
        shared = [level.shared_experts.forward_one(shared_in, j) for j in range(Ks)]
        new_in = {}
        for i, t in enumerate(TASKS):
            g = torch.softmax(task_in[t] @ level.task_gates.weight[i], dim=-1)  # over [own; shared]
            new_in[t] = mix(g, own[t] + shared)
            # recorded over every expert of the level, [all tasks' own; shared]: 0 on the other tasks' own
            full = g.new_zeros(g.shape[0], len(TASKS) * Kt + Ks)
            full[:, i * Kt:(i + 1) * Kt], full[:, len(TASKS) * Kt:] = g[:, :Kt], g[:, Kt:]
            gates[f"{li}/{t}"] = full
        if li < len(model.levels) - 1 and Ks:
            g = torch.softmax(shared_in @ level.shared_gate.weight[0], dim=-1)  # over all experts of the level
            shared_in = mix(g, [o for t in TASKS for o in own[t]] + shared)
            gates[f"{li}/shared"] = g
        task_in = new_in
    return {t: model.towers[t](task_in[t]) for t in TASKS}, gates


@pytest.mark.parametrize("levels,kt,ks", [(1, 2, 1), (3, 2, 2), (2, 0, 3), (2, 1, 0)])
def test_ple_equals_its_per_task_per_expert_formula(levels, kt, ks):
    torch.manual_seed(0)
    model = PLE(spec(), num_levels=levels, num_task_experts=kt, num_shared_experts=ks, expert_hidden=[7, 5],
                activation="silu").double()
    x = features()
    out = model.forward_dense(x)
    want_logits, want_gates = reference_ple(model, x)
    assert set(out.routing) == set(want_gates)
    for t in TASKS:
        torch.testing.assert_close(out.logits[t], want_logits[t])
    for name, g in want_gates.items():
        torch.testing.assert_close(out.routing[name].combine, g.float())


@pytest.mark.parametrize("gate", ["softmax", "hard"])
def test_ple_without_task_experts_and_one_level_equals_mmoe_on_the_same_weights(gate):
    torch.manual_seed(0)
    kw = dict(expert_hidden=[16, 8], tower_hidden=[4], gate=gate, gate_temperature=0.8, norm="layer")
    mmoe = MMoE(spec(), num_experts=5, **kw)
    torch.manual_seed(1)  # different init, then copy: equality comes from the weights, not the seed
    ple = PLE(spec(), num_levels=1, num_task_experts=0, num_shared_experts=5, **kw)
    with torch.no_grad():
        ple.front.load_state_dict(mmoe.front.state_dict())
        ple.levels[0].shared_experts.load_state_dict(mmoe.experts.state_dict())
        ple.levels[0].task_gates.load_state_dict(mmoe.gates.state_dict())
        ple.towers.load_state_dict(mmoe.towers.state_dict())
    b = batch()
    want, got = mmoe(b), ple(b)
    for t in TASKS:
        torch.testing.assert_close(got.logits[t], want.logits[t], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got.routing[f"0/{t}"].combine, want.routing[t].combine, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Shapes, dtypes, records


MODELS = [
    (SharedBottom, {}, set()),
    (OMoE, {"num_experts": 3}, {"shared"}),
    (MMoE, {"num_experts": 3}, set(TASKS)),
    (MMoE, {"num_experts": 3, "gate": "hard", "norm": "batch", "dropout": 0.1, "activation": "prelu"}, set(TASKS)),
    (PLE, {"num_levels": 2}, {"0/click", "0/convert", "0/stay", "0/shared", "1/click", "1/convert", "1/stay"}),
    (PLE, {"num_levels": 1, "num_task_experts": 2, "num_shared_experts": 2, "norm": "layer"},
     {"0/click", "0/convert", "0/stay"}),
]


@pytest.mark.parametrize("cls,kwargs,gates", MODELS)
def test_every_model_returns_one_float32_logit_per_row_and_task_and_normalized_gate_records(cls, kwargs, gates):
    torch.manual_seed(0)
    model = cls(spec(), embedding_dim=4, embedding_dims={"user": 6}, pooling={"tags": "mean"}, **kwargs)
    out = model(batch())
    assert set(out.logits) == set(TASKS) and out.aux == {}
    for t in TASKS:
        assert out.logits[t].shape == (B,) and out.logits[t].dtype == torch.float32
        assert torch.isfinite(out.logits[t]).all()
    assert set(out.routing) == gates
    for r in out.routing.values():
        assert r.combine.dtype == r.probs.dtype == torch.float32 and not r.combine.requires_grad
        torch.testing.assert_close(r.combine.sum(-1), torch.ones(B))
        torch.testing.assert_close(r.probs.sum(-1), torch.ones(B))
        if kwargs.get("gate") == "hard":
            assert r.chosen.shape == (B, 1) and set(r.combine.unique().tolist()) == {0.0, 1.0}


def test_ple_task_gate_records_say_which_experts_are_own_and_which_shared():
    model = PLE(spec(), num_levels=2, num_task_experts=2, num_shared_experts=3)
    out = model(batch())
    r = out.routing["1/convert"]  # over all 9 experts of the level: click's 0-1, convert's 2-3, stay's 4-5, shared
    assert r.combine.shape == (B, 9) and r.expert_groups == {"own": [2, 3], "shared": [6, 7, 8]}
    assert (r.combine[:, [0, 1, 4, 5]] == 0).all() and (r.probs[:, [0, 1, 4, 5]] == 0).all()
    torch.testing.assert_close(r.combine[:, [2, 3, 6, 7, 8]].sum(1), torch.ones(B))
    shared = out.routing["0/shared"]
    assert shared.combine.shape == (B, 9)
    assert shared.expert_groups == {"click": [0, 1], "convert": [2, 3], "stay": [4, 5], "shared": [6, 7, 8]}


@pytest.mark.parametrize("cls,kwargs,gates", MODELS)
def test_forward_of_a_batch_equals_forward_dense_of_its_embedding(cls, kwargs, gates):
    torch.manual_seed(0)
    model = cls(spec(), **kwargs).eval()
    b = batch()
    full, body = model(b), model.forward_dense(model.front(b))
    for t in TASKS:
        torch.testing.assert_close(full.logits[t], body.logits[t], atol=0, rtol=0)


@pytest.mark.parametrize("cls,kwargs,gates", MODELS)
@pytest.mark.parametrize("layers", [[8], [8, 5]])
def test_a_batch_of_no_rows_gives_empty_logits_and_gradients(cls, kwargs, gates, layers):
    """A reshape with -1 cannot size a 0-row tensor: MMoE / OMoE / PLE failed on an empty batch."""
    model = cls(spec(), **kwargs, **({"bottom_hidden": layers} if cls is SharedBottom else {"expert_hidden": layers}))
    x = torch.zeros(0, model.front.out_dim, requires_grad=True)
    for mode in (model.eval, model.train):
        if mode == model.train and kwargs.get("norm") == "batch":
            continue  # batch norm needs rows to take statistics from
        mode()
        out = model.forward_dense(x)
        assert all(out.logits[t].shape == (0,) for t in TASKS)
        sum(v.sum() for v in out.logits.values()).backward()
        assert x.grad.shape == (0, model.front.out_dim)


def test_a_task_subset_builds_only_those_towers_and_gates():
    model = MMoE(spec(), tasks=["convert"], num_experts=2)
    out = model(batch())
    assert set(out.logits) == {"convert"} and set(out.routing) == {"convert"} and set(model.towers) == {"convert"}


# ---------------------------------------------------------------------------------------------------------------
# Gradients


def expert_stacks(model):
    from mmoe_rec.nn.experts import ExpertStack

    return [(n, m) for n, m in model.named_modules() if isinstance(m, ExpertStack)]


@pytest.mark.parametrize("cls,kwargs", [
    (OMoE, {"num_experts": 4}),
    (MMoE, {"num_experts": 6, "expert_hidden": [8, 4]}),
    (MMoE, {"num_experts": 4, "gate": "hard"}),
    (PLE, {"num_levels": 3, "num_task_experts": 2, "num_shared_experts": 2}),
])
def test_gradients_reach_every_expert_gate_tower_and_the_embeddings(cls, kwargs):
    torch.manual_seed(0)
    model = cls(spec(), **kwargs)
    out = model(batch())
    sum(l.pow(2).sum() for l in out.logits.values()).backward()
    stacks = expert_stacks(model)
    assert stacks
    for name, stack in stacks:
        for p in stack.weights:
            assert torch.all(p.grad.reshape(stack.num_experts, -1).abs().sum(1) > 0), name
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        # DDP copies a gradient laid out otherwise into its bucket and warns ("Grad strides do not match bucket
        # view strides"): a one-gate weight's gradient had another stride on its size-1 axis (a review)
        assert p.grad.stride() == p.stride(), name


def test_hard_gates_learn_through_the_straight_through_estimator():
    torch.manual_seed(0)
    model = MMoE(spec(), num_experts=4, gate="hard")
    model(batch()).logits["click"].sum().backward()
    assert model.gates.weight.grad[0].abs().sum() > 0  # click's gate
    assert model.gates.weight.grad[1:].abs().sum() == 0  # the other tasks' gates see no click loss


def test_cgc_shared_parameters_are_what_every_task_reaches_and_task_experts_stay_private():
    torch.manual_seed(0)
    model = PLE(spec(), num_levels=1, num_task_experts=1, num_shared_experts=2)
    level = model.levels[0]
    shared_ids = {id(p) for p in model.shared_parameters()}
    assert id(level.shared_experts.weights[0]) in shared_ids
    assert id(level.task_experts.weights[0]) not in shared_ids
    assert id(level.task_gates.weight) not in shared_ids
    for i, t in enumerate(TASKS):
        model.zero_grad(set_to_none=True)
        model(batch()).logits[t].sum().backward()
        for p in model.shared_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0
        per_expert = level.task_experts.weights[0].grad.reshape(len(TASKS), -1).abs().sum(1)  # one expert each
        assert per_expert[i] > 0 and torch.all(per_expert[torch.arange(len(TASKS)) != i] == 0)


@pytest.mark.parametrize("num_levels,num_task_experts,num_shared_experts",
                         [(1, 1, 2), (2, 1, 2), (3, 1, 2), (3, 0, 2), (4, 0, 2), (3, 2, 0), (4, 1, 0)])
def test_ple_shared_parameters_are_exactly_those_every_task_loss_reaches(num_levels, num_task_experts,
                                                                         num_shared_experts):
    torch.manual_seed(0)
    model = PLE(spec(), num_levels=num_levels, num_task_experts=num_task_experts,
                num_shared_experts=num_shared_experts)
    # entries of each parameter every task's loss reaches (task experts / gates of all tasks share one tensor)
    common = {id(p): torch.ones_like(p, dtype=torch.bool) for p in model.parameters()}
    for t in TASKS:
        model.zero_grad(set_to_none=True)
        model(batch()).logits[t].sum().backward()
        for p in model.parameters():
            common[id(p)] &= p.grad != 0 if p.grad is not None else torch.zeros_like(p, dtype=torch.bool)
    reached_by_all = {key for key, mask in common.items() if mask.any()}
    assert {id(p) for p in model.shared_parameters()} == reached_by_all


@pytest.mark.parametrize("cls", [SharedBottom, OMoE, MMoE])
def test_shared_parameters_are_the_embeddings_and_the_shared_body(cls):
    model = cls(spec())
    body = model.bottom if cls is SharedBottom else model.experts
    want = {id(p) for p in [*model.front.parameters(), *body.parameters()]}
    if cls is OMoE:
        want |= {id(model.gates.weight)}
    assert {id(p) for p in model.shared_parameters()} == want


@pytest.mark.parametrize("cls,kwargs,gates", MODELS)
def test_the_last_shared_layer_is_shared_and_reached_by_every_task(cls, kwargs, gates):
    """GradNorm balances the tasks' gradient norms there: each task's loss must reach it."""
    torch.manual_seed(0)
    model = cls(spec(), **kwargs)
    layer = model.last_shared_layer()
    assert layer and {id(p) for p in layer} <= {id(p) for p in model.shared_parameters()}
    for t in TASKS:
        grads = torch.autograd.grad(model(batch()).logits[t].sum(), layer)
        assert all(g.abs().sum() > 0 for g in grads), t


def test_ple_without_shared_experts_has_no_last_shared_layer():
    assert PLE(spec(), num_levels=2, num_task_experts=1, num_shared_experts=0).last_shared_layer() == []


# ---------------------------------------------------------------------------------------------------------------
# Construction


def test_models_rebuild_from_class_path_and_state_dict():
    torch.manual_seed(0)
    kwargs = {"num_levels": 2, "num_task_experts": 1, "num_shared_experts": 2, "expert_hidden": [8]}
    model = PLE(spec(), **kwargs).eval()
    again = build_model(class_path_of(model), spec(), kwargs).eval()
    again.load_state_dict(model.state_dict())
    b = batch()
    for t in TASKS:
        torch.testing.assert_close(again(b).logits[t], model(b).logits[t], atol=0, rtol=0)


@pytest.mark.parametrize("cls,kwargs,match", [
    (PLE, {"num_task_experts": 0, "num_shared_experts": 0}, "at least one expert per gate"),
    (PLE, {"num_levels": 0}, "num_levels must be >= 1"),
    (MMoE, {"gate": "sparsemax"}, "unknown gate 'sparsemax'"),
    (MMoE, {"gate_temperature": 0.0}, "temperature must be > 0"),
    (OMoE, {"activation": "swish"}, "unknown activation 'swish'"),
    (SharedBottom, {"norm": "group"}, "unknown norm 'group'"),
    (MMoE, {"tasks": ["nope"]}, r"unknown task\(s\) \['nope'\]"),
    (MMoE, {"tasks": [TASKS[0], TASKS[0]]}, "name a task twice"),  # a second gate would overwrite the first's
    (PLE, {"tasks": [TASKS[1], TASKS[1]]}, "name a task twice"),
    (MMoE, {"tasks": TASKS[0]}, f"tasks must be a list of task names, got the string '{TASKS[0]}'"),
])
def test_bad_configuration_is_rejected(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(spec(), **kwargs)


def test_a_task_name_holding_a_dot_is_refused_naming_it():
    """Each task names a gate and a tower (torch modules, whose names take no '.'): the model failed on torch's bare
    KeyError "module name can't contain '.'" (feature schemas now refuse such names when built)."""
    from mmoe_rec.features.spec import FeatureSpec, SparseFeature, Task

    dotted = FeatureSpec([SparseFeature("u", 3)], ["d"], [Task("ctr.v2"), Task("buy")]).finalize()
    with pytest.raises(ValueError, match=r"task names \['ctr.v2'\] hold '.'"):
        MMoE(dotted, num_experts=2)


# Gaps a mutation review found (2026-12-07): the model's activation and dropout reach towers and experts, the last
# shared layer of a deeper body, OMoE's one gate
@pytest.mark.parametrize("cls,kw", [(MMoE, {}), (OMoE, {}), (SharedBottom, {}), (PLE, {"num_levels": 2})])
def test_towers_use_the_models_activation(cls, kw):
    torch.manual_seed(0)
    model = cls(spec(), activation="gelu", tower_hidden=[6, 4], **kw)
    for t in TASKS:
        kinds = {type(m) for m in model.towers[t].mlp.net}
        assert nn.GELU in kinds and nn.ReLU not in kinds, (t, kinds)


def test_the_last_shared_layer_is_the_last_layer_not_the_first():
    mmoe = MMoE(spec(), num_experts=3, expert_hidden=[8, 5])
    assert [p is mmoe.experts.weights[-1] for p in mmoe.last_shared_layer()] == [True]
    assert mmoe.last_shared_layer()[0].shape == (3, 8, 5)
    omoe = OMoE(spec(), num_experts=3, expert_hidden=[8, 5])
    assert omoe.last_shared_layer()[0] is omoe.experts.weights[-1]
    sb = SharedBottom(spec(), bottom_hidden=[10, 6])
    last = [m for m in sb.bottom.net if isinstance(m, nn.Linear)][-1]
    assert len(sb.last_shared_layer()) == 1 and sb.last_shared_layer()[0] is last.weight
    assert last.weight.shape == (6, 10)


def test_omoe_has_exactly_one_gate_and_every_gate_weight_is_trained():
    torch.manual_seed(0)
    model = OMoE(spec(), num_experts=3)
    assert model.gates.num_gates == 1 and model.gates.weight.shape[0] == 1
    x = torch.randn(8, model.front.out_dim)
    sum(v.sum() for v in model.forward_dense(x).logits.values()).backward()
    assert (model.gates.weight.grad.reshape(model.gates.num_gates, -1).abs().sum(1) > 0).all()


@pytest.mark.parametrize("cls", [MMoE, OMoE])
def test_the_experts_take_the_models_dropout(cls):
    torch.manual_seed(0)
    model = cls(spec(), num_experts=3, expert_hidden=[32], dropout=0.5)
    assert model.experts.dropout == 0.5
    x = torch.randn(6, model.front.out_dim)
    model.train()
    assert not torch.equal(model.experts(x), model.experts(x))
    model.eval()
    assert torch.equal(model.experts(x), model.experts(x))


# Gaps a mutation review found (mutmodels): PLE's shared gate takes the model's gate kind and temperature, hard gates
# record the softmax probabilities, the PLE last shared layer, arguments reaching the front / bottom, validation,
# the factory's errors and ModelOutput's defaults
def test_ple_shared_gate_takes_the_models_temperature():
    torch.manual_seed(0)
    model = PLE(spec(), num_levels=2, num_task_experts=1, num_shared_experts=2, gate_temperature=0.4).double()
    x = features()
    out = model.forward_dense(x)
    level = model.levels[0]
    want = torch.softmax(x @ level.shared_gate.weight[0] / 0.4, dim=-1)
    torch.testing.assert_close(out.routing["0/shared"].combine, want.float())
    for i, t in enumerate(TASKS):
        g = torch.softmax(x @ level.task_gates.weight[i] / 0.4, dim=-1)  # over [own; shared]
        torch.testing.assert_close(out.routing[f"0/{t}"].combine[:, [i, 3, 4]], g.float())


def test_hard_gates_record_one_hot_weights_and_the_softmax_probabilities_in_every_model():
    torch.manual_seed(0)
    x = features(dtype=torch.float32)
    models = {
        "mmoe": MMoE(spec(), num_experts=4, gate="hard", gate_temperature=0.7),
        "omoe": OMoE(spec(), num_experts=4, gate="hard", gate_temperature=0.7),
        "ple": PLE(spec(), num_levels=2, num_task_experts=1, num_shared_experts=2, gate="hard",
                   gate_temperature=0.7),
    }
    for name, model in models.items():
        out = model.forward_dense(x)
        if name == "ple":
            level = model.levels[0]
            sh = out.routing["0/shared"]
            torch.testing.assert_close(sh.probs, torch.softmax(x @ level.shared_gate.weight[0] / 0.7, -1).detach())
            gates = {f"0/{t}": (level.task_gates.weight[i], [i, 3, 4]) for i, t in enumerate(TASKS)}
        elif name == "omoe":
            gates = {"shared": (model.gates.weight[0], list(range(4)))}
        else:
            gates = {t: (model.gates.weight[i], list(range(4))) for i, t in enumerate(TASKS)}
        for gate, (w, cols) in gates.items():
            r = out.routing[gate]
            want = torch.softmax(x @ w / 0.7, dim=-1).detach()
            torch.testing.assert_close(r.probs[:, cols], want, msg=f"{name} {gate}")
            assert set(r.combine.unique().tolist()) == {0.0, 1.0}, (name, gate)
            assert torch.equal(r.combine.argmax(-1), r.probs.argmax(-1)) and r.chosen.shape == (B, 1), (name, gate)
        for gate, r in out.routing.items():  # the shared gate too: hard like the task gates
            assert set(r.combine.unique().tolist()) == {0.0, 1.0}, (name, gate)


def test_ple_last_shared_layer_is_the_last_layer_of_the_highest_levels_shared_experts():
    model = PLE(spec(), num_levels=3, num_task_experts=1, num_shared_experts=2, expert_hidden=[8, 5])
    layer = model.last_shared_layer()
    assert len(layer) == 1 and layer[0] is model.levels[-1].shared_experts.weights[-1]
    assert layer[0].shape == (2, 8, 5)


@pytest.mark.parametrize("kt,ks", [(-1, 2), (2, -1)])
def test_ple_refuses_a_negative_number_of_experts(kt, ks):
    with pytest.raises(ValueError, match="PLE needs num_task_experts >= 0, num_shared_experts >= 0"):
        PLE(spec(), num_task_experts=kt, num_shared_experts=ks)


def test_ple_refuses_a_task_named_shared():
    from mmoe_rec.features.spec import FeatureSpec, SparseFeature, Task

    s = FeatureSpec([SparseFeature("u", 3)], ["d"], [Task("click"), Task("shared")]).finalize()
    with pytest.raises(ValueError, match="a task may not be named 'shared' in PLE"):
        PLE(s, num_levels=2)


@pytest.mark.parametrize("cls,kw", [(MMoE, {}), (OMoE, {}), (SharedBottom, {}), (PLE, {"num_levels": 2})])
def test_embedding_dims_reach_the_embedding_front(cls, kw):
    plain = cls(spec(), embedding_dim=4, **kw)
    wider = cls(spec(), embedding_dim=4, embedding_dims={"user": 6}, **kw)
    assert plain.front.output_dim == 4 + 4 + 2 and wider.front.output_dim == 6 + 4 + 2


def test_shared_bottom_takes_the_models_dropout_and_norm():
    torch.manual_seed(0)
    model = SharedBottom(spec(), bottom_hidden=[32], dropout=0.5, norm="layer")
    kinds = {type(m) for m in model.bottom.net}
    assert nn.Dropout in kinds and nn.LayerNorm in kinds, kinds
    x = torch.randn(6, model.front.out_dim)
    model.train()
    assert not torch.equal(model.bottom(x), model.bottom(x))


@pytest.mark.parametrize("cls", [SharedBottom, MMoE, PLE])
def test_an_empty_task_list_is_refused(cls):
    with pytest.raises(ValueError, match="needs at least one task"):
        cls(spec(), tasks=[])


@pytest.mark.parametrize("path,match", [
    ("MMoE", r"must be 'package.module.ClassName'"),
    ("mmoe_rec.models.no_such_module.MMoE", r"module 'mmoe_rec.models.no_such_module' not found"),
    ("mmoe_rec.models.mmoe.NoSuchModel", r"mmoe_rec.models.mmoe has no class 'NoSuchModel'"),
    ("torch.nn.Linear", r"torch.nn.Linear is not a mmoe_rec MultiTaskModel"),
    ("mmoe_rec.models.factory.build_model", r"is not a mmoe_rec MultiTaskModel"),
])
def test_build_model_names_what_is_wrong_with_a_class_path(path, match):
    with pytest.raises(ValueError, match=match):
        build_model(path, spec(), {})


def test_model_output_defaults_are_empty_and_not_shared():
    from mmoe_rec.models.output import ModelOutput

    a, b = ModelOutput(logits={}), ModelOutput(logits={})
    assert a.aux == {} and a.routing == {}
    a.aux["x"] = torch.tensor(1.0)
    a.routing["y"] = None
    assert b.aux == {} and b.routing == {}


def _raw_expert(stack, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e from the raw parameter tensors: Linear -> LayerNorm (per-expert affine) -> SiLU per layer."""
    for layer, (w, b) in enumerate(zip(stack.weights, stack.biases)):
        x = torch.nn.functional.silu(torch.nn.functional.layer_norm(
            x @ w[e] + b[e], (w.shape[-1],), stack.norm_weights[layer][e], stack.norm_biases[layer][e], eps=1e-5))
    return x


def _raw_gate(gates, i: int, x: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax((x.float() @ gates.weight[i].float()) / temperature, dim=-1).to(x.dtype)


@pytest.mark.parametrize("cls,kwargs", [
    (MMoE, {"num_experts": 4}),
    (OMoE, {"num_experts": 3}),
    (PLE, {"num_levels": 3, "num_task_experts": 2, "num_shared_experts": 2}),
    (PLE, {"num_levels": 2, "num_task_experts": 1, "num_shared_experts": 0}),
])
def test_a_task_subset_in_another_order_than_the_spec_equals_the_raw_weight_formula(cls, kwargs):
    """tasks = [stay, click] (spec order: click, convert, stay): gate i, tower and logit key of each task follow
    the model's task order, and each model equals its formula written from the raw parameter tensors."""
    torch.manual_seed(0)
    tasks, temp = ["stay", "click"], 0.7
    model = cls(spec(), tasks=tasks, activation="silu", norm="layer", gate_temperature=temp, expert_hidden=[7, 5],
                tower_hidden=[3], **kwargs).double()
    x = features()
    out = model.forward_dense(x)
    assert list(out.logits) == tasks and out.aux == {}
    if cls is PLE:
        T = len(tasks)
        task_in, shared_in = [x] * T, x
        for li, lv in enumerate(model.levels):
            assert (lv.shared_gate is not None) == (li < len(model.levels) - 1 and lv.Ks > 0)
            own = [[_raw_expert(lv.task_experts, t * lv.Kt + j, task_in[t]) for j in range(lv.Kt)] for t in range(T)]
            shared = [_raw_expert(lv.shared_experts, j, shared_in) for j in range(lv.Ks)]
            new = [mix(_raw_gate(lv.task_gates, t, task_in[t], temp), own[t] + shared) for t in range(T)]
            if lv.shared_gate is not None:
                shared_in = mix(_raw_gate(lv.shared_gate, 0, shared_in, temp),
                                [o for t in range(T) for o in own[t]] + shared)
            task_in = new
        h = dict(zip(tasks, task_in))
    else:
        experts = [_raw_expert(model.experts, e, x) for e in range(model.experts.num_experts)]
        assert model.gates.weight.shape[0] == (1 if cls is OMoE else len(tasks))
        h = {t: mix(_raw_gate(model.gates, 0 if cls is OMoE else i, x, temp), experts) for i, t in enumerate(tasks)}
    for t in tasks:
        tower = model.towers[t]
        want = torch.nn.functional.linear(tower.mlp(h[t]), tower.out.weight, tower.out.bias).squeeze(-1)
        torch.testing.assert_close(out.logits[t], want, rtol=1e-6, atol=1e-7)


# Gaps a mutation review found (mutdense): pooling reaches the embedding front of every model, dropout reaches the
# towers of every model and PLE's experts
@pytest.mark.parametrize("cls,kw", [(MMoE, {}), (OMoE, {}), (SharedBottom, {}), (PLE, {"num_levels": 2})])
def test_pooling_reaches_the_embedding_front(cls, kw):
    assert cls(spec(), **kw).front.poolings == {"user": "sum", "tags": "sum"}
    assert cls(spec(), pooling="mean", **kw).front.poolings == {"user": "mean", "tags": "mean"}
    assert cls(spec(), pooling={"tags": "mean"}, **kw).front.poolings == {"user": "sum", "tags": "mean"}


@pytest.mark.parametrize("cls,kw", [(MMoE, {}), (OMoE, {}), (SharedBottom, {}),
                                    (PLE, {"num_levels": 2, "num_task_experts": 1, "num_shared_experts": 1})])
def test_dropout_reaches_every_tower_and_every_expert(cls, kw):
    torch.manual_seed(0)
    model = cls(spec(), tower_hidden=[64], dropout=0.5, **kw)
    for t in TASKS:
        assert any(isinstance(m, nn.Dropout) and m.p == 0.5 for m in model.towers[t].modules()), t
        tower, h = model.towers[t].train(), torch.randn(6, model.towers[t].mlp.net[0].in_features)
        assert not torch.equal(tower(h), tower(h)), t
    if cls is PLE:
        for level in model.levels:
            for stack in (level.task_experts, level.shared_experts):
                assert stack.dropout == 0.5
                stack.train()
                xin = torch.randn(6, stack.in_dim)
                assert not torch.equal(stack(xin), stack(xin))


def test_shared_bottom_takes_the_models_activation():
    model = SharedBottom(spec(), bottom_hidden=[10, 6], activation="gelu")
    kinds = {type(m) for m in model.bottom.net}
    assert nn.GELU in kinds and nn.ReLU not in kinds, kinds
