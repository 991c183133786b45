"""ExpertStack: batched experts equal a per-expert reference, experts start different, gradients reach all."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from mmoe_rec.nn.dispatch import StackedExperts
from mmoe_rec.nn.experts import ExpertStack


def reference_expert(stack: ExpertStack, x: torch.Tensor, e: int) -> torch.Tensor:
    """Expert e written out with plain per-expert tensors (no batching), (N, D) -> (N, H); dropout off."""
    h = x
    for layer, (w, b) in enumerate(zip(stack.weights, stack.biases)):
        z = h @ w[e] + b[e]
        if stack.norm == "layer":
            z = F.layer_norm(z, z.shape[-1:], stack.norm_weights[layer][e], stack.norm_biases[layer][e], eps=1e-5)
        elif stack.norm == "batch":
            rm = getattr(stack, f"running_mean_{layer}")[e].clone()
            rv = getattr(stack, f"running_var_{layer}")[e].clone()
            z = F.batch_norm(z, rm, rv, stack.norm_weights[layer][e], stack.norm_biases[layer][e],
                             training=stack.training, eps=1e-5)
        if stack.activation == "prelu":
            z = F.prelu(z, stack.slopes[layer][e])
        else:
            z = {"relu": torch.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}[stack.activation](z)
        h = z
    return h


def randomize_norms(stack: ExpertStack) -> None:
    with torch.no_grad():
        for p in itertools.chain(stack.norm_weights or [], stack.norm_biases or [], stack.slopes or []):
            p.uniform_(0.2, 1.5)
        if stack.norm == "batch":
            for i in range(stack.num_layers):
                getattr(stack, f"running_mean_{i}").normal_()
                getattr(stack, f"running_var_{i}").uniform_(0.5, 2.0)


@pytest.mark.parametrize("activation,norm,hidden,training", [
    ("relu", "none", [7], False),
    ("gelu", "layer", [9, 5], True),
    ("silu", "batch", [6, 4, 3], False),
    ("prelu", "batch", [6, 4], True),
    ("tanh", "none", [8, 8], True),
])
def test_forward_equals_a_per_expert_reference(activation, norm, hidden, training):
    torch.manual_seed(0)
    stack = ExpertStack(5, 11, hidden, activation=activation, norm=norm).double().train(training)
    randomize_norms(stack)
    x = torch.randn(13, 11, dtype=torch.float64)
    want = torch.stack([reference_expert(stack, x, e) for e in range(5)], dim=1)  # before running stats move
    got = stack(x)
    assert got.shape == (13, 5, hidden[-1])
    torch.testing.assert_close(got, want)


def test_forward_each_and_forward_one_equal_forward_on_a_shared_input():
    torch.manual_seed(0)
    stack = ExpertStack(4, 6, [8, 3], activation="gelu", norm="layer").double()
    randomize_norms(stack)
    x = torch.randn(10, 6, dtype=torch.float64)
    full = stack(x)  # (B, E, H)
    torch.testing.assert_close(stack.forward_each(x.expand(4, 10, 6)), full.transpose(0, 1))
    for e in range(4):
        torch.testing.assert_close(stack.forward_one(x, e), full[:, e])


def test_forward_each_runs_each_chosen_expert_on_its_own_rows():
    torch.manual_seed(0)
    stack = ExpertStack(6, 5, [4], activation="prelu", norm="layer").double()
    randomize_norms(stack)
    idx = torch.tensor([4, 1, 4])
    xs = torch.randn(3, 7, 5, dtype=torch.float64)
    got = stack.forward_each(xs, idx)
    for j, e in enumerate(idx.tolist()):
        torch.testing.assert_close(got[j], reference_expert(stack, xs[j], e))


def test_batch_norm_running_statistics_match_torch_batch_norm_per_expert():
    torch.manual_seed(0)
    stack = ExpertStack(3, 4, [5], norm="batch").double().train()
    x = torch.randn(16, 4, dtype=torch.float64)
    rm, rv = torch.zeros(3, 5, dtype=torch.float64), torch.ones(3, 5, dtype=torch.float64)
    z = torch.einsum("bd,edh->ebh", x, stack.weights[0]) + stack.biases[0].unsqueeze(1)
    for e in range(3):
        F.batch_norm(z[e].detach(), rm[e], rv[e], training=True, momentum=0.1)  # updates rm[e], rv[e] in place
    stack(x)
    torch.testing.assert_close(stack.running_mean_0, rm)
    torch.testing.assert_close(stack.running_var_0, rv)


def test_experts_are_not_identical_at_init_and_each_is_drawn_independently():
    torch.manual_seed(0)
    stack = ExpertStack(8, 32, [64, 16])
    for w in stack.weights:
        flat = w.detach().reshape(8, -1)  # one row per expert
        bound = 1 / w.shape[1] ** 0.5
        assert float(flat.abs().max()) <= bound
        for a, b in itertools.combinations(range(8), 2):
            assert not torch.allclose(flat[a], flat[b])
            corr = torch.corrcoef(torch.stack([flat[a], flat[b]]))[0, 1]
            assert abs(float(corr)) < 0.1  # independent draws: no shared component
    out = stack(torch.randn(20, 32))
    for a, b in itertools.combinations(range(8), 2):
        assert not torch.allclose(out[:, a], out[:, b])


def assert_uniform_at_bound(t: torch.Tensor, bound: float, name: str) -> None:
    """t drawn from U(-bound, bound): it reaches the bound (max |t| > 0.9 bound, 0.9**n ~ 0 for these sizes),
    never passes it, and its spread is that of the uniform (std bound/sqrt(3), +-10 %) with mean ~ 0. A bound of
    1/fan_in, or one 10x off, fails the first two; a narrower or one-sided draw the last two."""
    t = t.detach().double().flatten()
    assert t.numel() >= 1000, name  # the sample std is then within ~1.5 % of the true one (1 sigma)
    top = float(t.abs().max())
    assert 0.9 * bound < top <= bound, f"{name}: max |w| {top:.4g}, bound {bound:.4g}"
    std = float(t.std())
    assert abs(std / (bound / 3 ** 0.5) - 1) < 0.1, f"{name}: std {std:.4g}, want {bound / 3 ** 0.5:.4g}"
    assert abs(float(t.mean())) < 0.05 * bound, name


def test_every_layers_weights_and_biases_are_uniform_at_one_over_sqrt_fan_in():
    """Documented: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as nn.Linear, for every layer's weight and bias; the
    bound from the layer's input width, not from the tensor's shape, so a layout change cannot move it."""
    torch.manual_seed(0)
    dims = [200, 96, 64, 48]
    stack = ExpertStack(24, dims[0], dims[1:])
    assert len(stack.weights) == len(stack.biases) == 3
    for layer, (w, b) in enumerate(zip(stack.weights, stack.biases)):
        bound = 1 / dims[layer] ** 0.5
        assert w.shape == (24, dims[layer], dims[layer + 1])
        assert_uniform_at_bound(w, bound, f"weights[{layer}]")
        assert_uniform_at_bound(b, bound, f"biases[{layer}]")
        # each expert's own block too: one draw over all experts, no expert scaled differently
        for e in (0, 23):
            top = float(w[e].detach().abs().max())
            assert 0.9 * bound < top <= bound, (layer, e)


def test_gradients_reach_every_expert_and_every_layer():
    torch.manual_seed(0)
    stack = ExpertStack(6, 5, [8, 4], activation="prelu", norm="layer")
    stack(torch.randn(32, 5)).pow(2).sum().backward()
    for name, p in stack.named_parameters():
        per_expert = p.grad.reshape(6, -1).abs().sum(1)
        assert torch.all(per_expert > 0), name


def test_dropout_is_active_in_training_only():
    torch.manual_seed(0)
    stack = ExpertStack(3, 4, [50], dropout=0.5)
    x = torch.randn(8, 4)
    assert torch.equal(stack.eval()(x), stack.eval()(x))
    train_out = stack.train()(x)
    eval_out = stack.eval()(x)
    alive = eval_out != 0
    dropped = (train_out[alive] == 0).float().mean()
    assert 0.35 < float(dropped) < 0.65  # p = 0.5
    kept = train_out != 0
    torch.testing.assert_close(train_out[kept], 2 * eval_out[kept])


def test_parameter_layout_matches_the_sparse_stacked_experts():
    from mmoe_rec.nn.dispatch import StackedExperts

    torch.manual_seed(0)
    dense = ExpertStack(4, 6, [8, 3])
    sparse = StackedExperts(4, 6, [8, 3])
    sparse.load_state_dict(dense.state_dict())
    x = torch.randn(5, 6)
    torch.testing.assert_close(sparse.forward_all(x), dense(x).transpose(0, 1))


@pytest.mark.parametrize("kwargs,match", [
    ({"num_experts": 0}, "num_experts must be >= 1"), ({"hidden": []}, "at least one layer"),
    ({"activation": "swish"}, "unknown activation 'swish'"), ({"norm": "group"}, "unknown norm 'group'"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
])
def test_bad_configuration_is_rejected(kwargs, match):
    args = {"num_experts": 2, "in_dim": 3, "hidden": [4], **kwargs}
    with pytest.raises(ValueError, match=match):
        ExpertStack(args.pop("num_experts"), args.pop("in_dim"), args.pop("hidden"), **args)


# Gaps a mutation review found (2026-12-07): the sparse stack's activations against the dense one's, a subset of
# experts in an order that does not read the same reversed, batch-norm statistics of a subset
@pytest.mark.parametrize("activation", ["gelu", "silu", "tanh", "relu"])
def test_sparse_and_dense_experts_compute_the_same_activation(activation):
    """The sparse layer's and the dense stack's activation tables: compared for tanh only before (gelu could have been
    silu in both the sparse paths, which agree with each other)."""
    torch.manual_seed(0)
    sparse = StackedExperts(3, 4, [6, 5], activation=activation).double().eval()
    dense = ExpertStack(3, 4, [6, 5], activation=activation).double().eval()
    dense.load_state_dict(sparse.state_dict())
    x = torch.randn(10, 4, dtype=torch.float64)
    torch.testing.assert_close(sparse.forward_all(x), dense(x).transpose(0, 1))


def test_forward_each_on_a_subset_whose_order_is_not_a_palindrome():
    """The existing test picks experts [4, 1, 4], which reads the same reversed: a reversed per-expert index
    (bias, norm or slope rows taken in the wrong order) gives the same result there."""
    torch.manual_seed(0)
    stack = ExpertStack(6, 5, [4, 3], activation="gelu").double()
    idx = torch.tensor([4, 1, 2])
    xs = torch.randn(3, 7, 5, dtype=torch.float64)
    got = stack.forward_each(xs, idx)
    for j, e in enumerate(idx.tolist()):
        torch.testing.assert_close(got[j], stack.forward_one(xs[j], e))
        h = xs[j]
        for w, b in zip(stack.weights, stack.biases):
            h = F.gelu(h @ w[e] + b[e])
        torch.testing.assert_close(got[j], h)


def test_forward_each_in_training_updates_the_running_statistics_of_the_chosen_experts_only():
    """Docstring of _batch_norm: 'running statistics updated only for idx'. Untested for a subset."""
    torch.manual_seed(0)
    stack = ExpertStack(4, 3, [5], norm="batch").double().train()
    idx = torch.tensor([2, 0])
    xs = torch.randn(2, 16, 3, dtype=torch.float64)
    assert_running_stats_updated_by_expert(stack, xs, idx)
    assert (stack.running_mean_0[[1, 3]] == 0).all() and (stack.running_var_0[[1, 3]] == 1).all()


@pytest.mark.parametrize("path", ["forward", "forward_each"])
def test_dropout_follows_the_activation(path):
    """Linear -> norm -> activation -> dropout (module docstring). With ReLU, dropout before or after the activation
    gives the same numbers; with tanh a kept unit is tanh(z) / (1 - p) only when dropout comes after it (before,
    it would be tanh(z / (1 - p)))."""
    torch.manual_seed(0)
    p = 0.5
    stack = ExpertStack(3, 4, [40, 30], activation="tanh", dropout=p).double()
    x = torch.randn(16, 4, dtype=torch.float64)

    def run():
        return stack(x) if path == "forward" else stack.forward_each(x.expand(3, -1, -1)).transpose(0, 1)

    stack.train()
    torch.manual_seed(1)
    train_out = run()
    kept = train_out != 0
    assert 0.3 < float((~kept).double().mean()) < 0.7
    assert torch.all(train_out[kept].abs() <= 1 / (1 - p) + 1e-12)  # tanh(z)/(1-p) is bounded by 2; tanh(.) by 1
    assert torch.any(train_out[kept].abs() > 1)  # values above 1 exist only if dropout scales after the tanh


def test_forward_each_on_every_expert_in_another_order_uses_each_experts_norm_and_statistics():
    """experts naming all E experts, permuted: each row block still gets its own expert's batch-norm running
    statistics (eval) and updates them (training), not those of the expert at its position."""
    torch.manual_seed(0)
    stack = ExpertStack(3, 4, [5], norm="batch").double()
    randomize_norms(stack)
    idx = torch.tensor([2, 0, 1])
    xs = torch.randn(3, 16, 4, dtype=torch.float64)
    got = stack.eval().forward_each(xs, idx)
    for j, e in enumerate(idx.tolist()):
        torch.testing.assert_close(got[j], reference_expert(stack, xs[j], e))
    stack.train()
    assert_running_stats_updated_by_expert(stack, xs, idx)


@pytest.mark.parametrize("activation", ["relu", "gelu"])  # the hand-written ReLU path and the autograd one
def test_an_input_of_another_width_is_refused_naming_the_expected_shape(activation):
    stack = ExpertStack(3, 4, [5], activation=activation)
    with pytest.raises(ValueError, match=r"expected input \(B, 4\), got \(6, 5\)"):
        stack(torch.randn(6, 5))


def assert_running_stats_updated_by_expert(stack, xs, idx) -> None:
    """A training forward_each updates each expert's first-layer batch-norm statistics from its own rows (xs[j] for
    expert idx[j]), as F.batch_norm would."""
    rm, rv = stack.running_mean_0.clone(), stack.running_var_0.clone()
    for j, e in enumerate(idx.tolist()):
        z = (xs[j] @ stack.weights[0][e] + stack.biases[0][e]).detach()
        F.batch_norm(z, rm[e], rv[e], training=True, momentum=0.1)  # updates rm[e], rv[e] in place
    stack.forward_each(xs, idx)
    torch.testing.assert_close(stack.running_mean_0, rm)
    torch.testing.assert_close(stack.running_var_0, rv)
