"""Routers: validation, noise only in training, k = 1 gradients, the smooth load estimate, loss-free bias,
expert choice."""
from __future__ import annotations

import pytest
import torch

from mmoe_rec.nn.routing import ExpertChoiceRouter, LossFreeBias, NoisyTopKRouter, SwitchRouter
from mmoe_rec.nn.routing.topk import MAX_PASSES_UP_TO_K, smooth_load, top_indices, top_values


def test_invalid_router_arguments_raise_at_construction():
    with pytest.raises(ValueError, match="k must be"):
        NoisyTopKRouter(4, 3, k=4)
    with pytest.raises(ValueError, match="k must be"):
        NoisyTopKRouter(4, 3, k=0)
    with pytest.raises(ValueError, match="normalize"):
        NoisyTopKRouter(4, 3, k=1, normalize="sparsemax")
    with pytest.raises(ValueError, match="tie"):
        NoisyTopKRouter(4, 3, k=1, noise=False, init="zeros")
    with pytest.raises(ValueError, match="capacity_factor"):
        ExpertChoiceRouter(4, 3, capacity_factor=0.0)


@pytest.mark.parametrize("k", [1, 2, MAX_PASSES_UP_TO_K, MAX_PASSES_UP_TO_K + 1, 8])
def test_top_indices_match_torch_topk_and_leave_the_scores_alone(k):
    scores = torch.randn(257, 8)
    before = scores.clone()
    assert torch.equal(top_indices(scores, k), scores.topk(k, dim=1).indices)  # no ties: the same, largest first
    assert torch.equal(top_values(scores, k), scores.topk(k, dim=1).values)
    assert torch.equal(scores, before)


def test_top_indices_break_ties_towards_the_lower_expert():
    scores = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    assert top_indices(scores, 2).tolist() == [[1, 2], [0, 1]]
    assert top_indices(scores, 4).tolist() == [[1, 2, 3, 0], [0, 1, 2, 3]]


@pytest.mark.parametrize("k", [MAX_PASSES_UP_TO_K + 1, 6, 8])
def test_top_indices_break_ties_towards_the_lower_expert_above_the_argmax_passes(k):
    # fine-grained routing reaches such k (k = 2 with fine_grained = 4 is 8 of the split experts)
    assert top_indices(torch.zeros(3, 40), k).tolist() == [list(range(k))] * 3
    scores = torch.randint(0, 3, (200, 16)).float()  # many ties
    want = [sorted(range(16), key=lambda e: (-row[e], e))[:k] for row in scores.tolist()]
    assert top_indices(scores, k).tolist() == want


def test_top_indices_of_non_finite_scores_stay_distinct():
    scores = torch.tensor([[float("-inf")] * 4, [0.0, float("nan"), 1.0, float("-inf")]])
    for k in (2, 3):
        picked = top_indices(scores, k)
        assert all(len(set(row)) == k for row in picked.tolist())
        assert picked[0].tolist() == list(range(k))  # ties (all -inf) to the lower expert
        assert picked[1].tolist() == [1, 2, 0][:k]  # NaN ranks first, as in torch.topk / torch.sort


def test_paper_init_is_zero_and_noise_breaks_the_tie_in_training_only():
    router = NoisyTopKRouter(5, 6, k=2)
    assert router.w_gate.abs().sum() == 0 and router.w_noise.abs().sum() == 0
    x = torch.randn(64, 5)
    chosen = router(x).chosen
    assert len(torch.unique(chosen)) > 2  # noise spreads rows over experts
    router.eval()
    a, b = router(x), router(x)
    assert torch.equal(a.chosen, b.chosen) and torch.equal(a.weights, b.weights)


@pytest.mark.parametrize("normalize", ["topk_softmax", "softmax_topk"])
def test_weights_sum_to_one_and_match_the_chosen_logits(normalize):
    torch.manual_seed(0)
    router = NoisyTopKRouter(5, 6, k=3, noise=False, normalize=normalize, init_std=1.0)
    r = router(torch.randn(20, 5))
    assert torch.allclose(r.weights.sum(1), torch.ones(20))
    expected = torch.softmax(r.logits.gather(1, r.chosen), dim=1)  # both modes agree without noise
    assert torch.allclose(r.weights, expected, atol=1e-6)
    assert torch.equal(r.chosen, r.logits.topk(3, dim=1).indices)


def test_both_normalize_names_are_one_rule_with_bitwise_equal_weights_and_gradients():
    """softmax over all E renormalised over the chosen k == softmax over the chosen k (the normaliser cancels):
    the two names are kept for configs, and run the same computation, noise included."""
    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(0))
    got = {}
    for name in ("topk_softmax", "softmax_topk"):
        torch.manual_seed(0)
        router = NoisyTopKRouter(5, 6, k=3, noise=True, normalize=name, init="normal", init_std=1.0).train()
        r = router(x)  # same seed: same noise
        (r.weights * torch.arange(3.0)).sum().backward()
        got[name] = (r.chosen, r.weights.detach(), router.w_gate.grad, router.w_noise.grad)
    for a, b in zip(got["topk_softmax"], got["softmax_topk"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("make", [
    lambda: NoisyTopKRouter(5, 4, k=1, noise=False, normalize="topk_softmax"),
    lambda: NoisyTopKRouter(5, 4, k=1, noise=False, normalize="softmax_topk"),
    lambda: NoisyTopKRouter(5, 4, k=1, noise=True, normalize="softmax_topk"),
    lambda: SwitchRouter(5, 4),
], ids=["topk_softmax", "softmax_topk", "noisy", "switch"])
def test_router_gets_a_gradient_from_the_task_loss_with_k1(make):
    torch.manual_seed(0)
    router = make()
    x = torch.randn(16, 5)
    r = router(x)
    assert r.chosen.shape == (16, 1)
    assert not torch.allclose(r.weights, torch.ones_like(r.weights))  # the raw probability, not a constant 1
    expert_out = torch.randn(16, 4)  # stands for the experts' contribution to the loss
    (r.weights.squeeze(1) * expert_out.gather(1, r.chosen).squeeze(1)).sum().backward()
    assert router.w_gate.grad.abs().sum() > 0


@pytest.mark.parametrize("make", [lambda: NoisyTopKRouter(4, 6, k=1, noise=True, init="normal", init_std=1.0),
                                  lambda: SwitchRouter(4, 6, noise=True)])
def test_in_training_a_top_1_row_is_weighted_by_the_softmax_of_the_noisy_logits_that_chose_its_expert(make):
    """k = 1: the weight is softmax(H)_i with H the noisy logits (module doc; Shazeer et al. 2017), the same H that
    chose expert i, and probs (the Switch loss's P) is that softmax too. With the clean logits' softmax no test
    failed (a review's mutation)."""
    torch.manual_seed(0)
    router = make().train()
    x = torch.randn(32, 4)
    torch.manual_seed(5)
    out = router(x)
    torch.manual_seed(5)  # the same draw of the noise, written out
    clean = x @ router.w_gate.detach()
    noisy = clean + torch.randn_like(clean) * (torch.nn.functional.softplus(x @ router.w_noise.detach())
                                               + router.noise_epsilon)
    assert not torch.equal(noisy.argmax(1), clean.argmax(1))  # the noise changes some choices: a real test
    probs = torch.softmax(noisy, dim=1)
    assert torch.equal(out.chosen, noisy.argmax(1, keepdim=True))
    torch.testing.assert_close(out.probs, probs)
    torch.testing.assert_close(out.weights.detach(), probs.gather(1, out.chosen))


def test_smooth_load_matches_monte_carlo_redraw_of_one_experts_noise():
    torch.manual_seed(0)
    T, E, k = 3, 5, 2
    clean = torch.randn(T, E)
    std = torch.rand(T, E) + 0.5
    noisy = clean + torch.randn(T, E) * std
    mask = torch.zeros(T, E, dtype=torch.bool).scatter_(1, noisy.topk(k, 1).indices, True)
    p = smooth_load(clean, noisy, std, mask, k)
    n = 40000
    for t in range(T):
        for i in range(E):
            redraw = noisy[t].repeat(n, 1)
            redraw[:, i] = clean[t, i] + torch.randn(n) * std[t, i]
            in_top = (redraw.topk(k, 1).indices == i).any(1).float().mean()
            assert p[t, i].item() == pytest.approx(in_top.item(), abs=0.015)


def test_the_routers_load_estimate_counts_the_loss_free_bias_as_the_selection_does():
    """load_prob is P(expert i stays chosen if only its own noise is redrawn), where the selection ranks the
    noisy scores plus the bias: the estimate must add the bias too (without it, off by ~0.24 here)."""
    torch.manual_seed(0)
    router = NoisyTopKRouter(5, 5, k=2, noise=True, init="normal", init_std=1.0, loss_free_bias=True).train()
    router.balancer.bias.copy_(torch.tensor([1.5, -1.0, 0.0, 0.5, -0.3]))
    x = torch.randn(3, 5)
    torch.manual_seed(1)
    out = router(x)
    torch.manual_seed(1)  # the same noise draw as the router's
    clean = x @ router.w_gate
    std = torch.nn.functional.softplus(x @ router.w_noise) + router.noise_epsilon
    noisy = clean + torch.randn_like(clean) * std
    assert torch.equal(out.chosen.sort(1).values, (noisy + router.balancer.bias).topk(2, 1).indices.sort(1).values)
    n = 40000
    for t in range(3):
        for i in range(5):
            redraw = noisy[t].repeat(n, 1)
            redraw[:, i] = clean[t, i] + torch.randn(n) * std[t, i]
            stays = ((redraw + router.balancer.bias).topk(2, 1).indices == i).any(1).float().mean()
            assert out.load_prob[t, i].item() == pytest.approx(stays.item(), abs=0.015)


def test_loss_free_bias_changes_the_choice_but_not_the_combine_weights():
    torch.manual_seed(0)
    router = NoisyTopKRouter(5, 6, k=2, noise=False, init_std=1.0, loss_free_bias=True)
    x = torch.randn(30, 5)
    before = router(x)
    router.balancer.bias[4] = 100.0  # expert 4 now always selected
    after = router(x)
    assert (after.chosen == 4).any(1).all()
    assert not torch.equal(before.chosen, after.chosen)
    # weights: softmax over the clean logits of the chosen experts, the bias nowhere in them
    expected = torch.softmax(after.logits.gather(1, after.chosen), dim=1)
    assert torch.allclose(after.weights, expected, atol=1e-6)
    same = (before.chosen.sort(1).values == after.chosen.sort(1).values).all(1)
    assert same.any()
    b_w = before.weights.gather(1, before.chosen.argsort(1))[same]
    a_w = after.weights.gather(1, after.chosen.argsort(1))[same]
    assert torch.allclose(b_w, a_w)
    assert not router.balancer.bias.requires_grad


def test_loss_free_bias_update_moves_towards_the_mean_load():
    bias = LossFreeBias(3, update_rate=0.5)
    bias.update(torch.tensor([4, 0, 2]))  # mean 2: overloaded down, underloaded up, on the mean unchanged
    assert torch.equal(bias.bias, torch.tensor([-0.5, 0.5, 0.0]))


def test_loss_free_bias_sums_the_loads_added_since_the_last_take():
    bias = LossFreeBias(3)
    assert torch.equal(bias.take_load(), torch.zeros(3, dtype=torch.long))  # nothing routed yet
    bias.add_load(torch.tensor([4, 0, 2]))
    bias.add_load(torch.tensor([0, 1, 1]))
    assert torch.equal(bias.take_load(), torch.tensor([4, 1, 3]))
    assert torch.equal(bias.take_load(), torch.zeros(3, dtype=torch.long))  # taking resets the count
    assert "pending_load" not in bias.state_dict()  # a step's count is not model state


def test_expert_choice_gives_every_expert_exactly_c_rows_in_training():
    torch.manual_seed(0)
    router = ExpertChoiceRouter(5, 4, capacity_factor=2.0)
    r = router(torch.randn(10, 5))
    c = 5  # ceil(10 * 2 / 4)
    assert r.chosen is None and r.expert_rows.shape == (c, 4)
    assert torch.equal(r.counts, torch.full((4,), c))
    assert torch.allclose(r.expert_weights, r.probs.gather(0, r.expert_rows))


def test_expert_choice_eval_scores_each_row_on_its_own():
    torch.manual_seed(0)
    router = ExpertChoiceRouter(5, 4, capacity_factor=2.0, init_std=1.0)
    router.eval()
    x = torch.randn(10, 5)
    batch = router(x)
    alone = router(x[3:4])
    assert torch.equal(batch.chosen[3:4], alone.chosen)
    assert torch.allclose(batch.weights[3:4], alone.weights)
    # weighted by the raw probabilities, as in training (each expert's rows at their softmax probability), not
    # renormalised over the chosen: renormalised, the towers would read ~E/k times the scale they trained on
    assert torch.equal(batch.weights, batch.probs.gather(1, batch.chosen))
    assert bool((batch.weights.sum(1) < 1).all())
    strict = ExpertChoiceRouter(5, 4, capacity_factor=2.0, eval_fallback=False)
    strict.eval()
    with pytest.raises(RuntimeError, match="cannot score rows on their own"):
        strict(x)


@pytest.mark.parametrize("make", [lambda: NoisyTopKRouter(6, 4, k=2), lambda: SwitchRouter(6, 4),
                                  lambda: ExpertChoiceRouter(6, 4, capacity_factor=2.0)])
def test_routers_run_in_float32_under_autocast(make):
    torch.manual_seed(0)
    router = make().eval()  # no training noise: the three calls must agree
    with torch.no_grad():
        for p in router.parameters():
            p.normal_()  # not the zero init: distinct logits
    x = torch.randn(16, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routed = router(x)
        routed_low = router(x.bfloat16())
    plain = router(x)
    for r in (routed, routed_low):
        assert r.logits.dtype == r.probs.dtype == torch.float32
    torch.testing.assert_close(routed.probs, plain.probs)  # not rounded to bf16 on the way
    assert router.double()(x.double()).logits.dtype == torch.float32  # a float64 model routes in float32 too


def test_loss_free_bias_stays_float32_and_keeps_moving_in_a_bfloat16_model():
    # in bfloat16 a step of 1e-3 is below half an ulp once |b| >= 0.5: the bias stuck at -0.5 / 0.5
    bias = LossFreeBias(2, 1e-3).to(torch.bfloat16)
    assert bias.bias.dtype == torch.float32
    for _ in range(2000):
        bias.update(torch.tensor([10, 0]))
    assert bias.bias.tolist() == pytest.approx([-2.0, 2.0], abs=1e-3)
    # with its values: Lightning casts a bf16-true model after restoring its checkpoint (cast and back rounded them)
    router = NoisyTopKRouter(6, 4, 2, loss_free_bias=True)
    trained = torch.tensor([0.5007, -0.7003, 1.0021, -1.0029])
    router.balancer.bias.copy_(trained)
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.double()):
        cast(router)
        assert router.balancer.bias.dtype == torch.float32 and torch.equal(router.balancer.bias, trained)
        assert "balancer.bias" in dict(router.named_buffers())


# Gaps a mutation review found (each test below failed on one surviving mutant and passes on this code)

def test_with_k_equal_to_e_every_expert_stays_chosen_with_probability_one():
    """k = E is a valid router: every expert is always chosen, so P(x, i) = 1 exactly (mutant `k > E` in
    smooth_load survived: it compared against a threshold that does not exist and gave P < 1)."""
    torch.manual_seed(0)
    router = NoisyTopKRouter(4, 3, k=3, init="normal", init_std=0.5).train()
    r = router(torch.randn(32, 4))
    assert r.load_prob is not None
    assert torch.equal(r.load_prob, torch.ones(32, 3))
    assert torch.equal(smooth_load(r.logits, r.logits, torch.ones(32, 3), r.mask, 3), torch.ones(32, 3))


@pytest.mark.parametrize("make", [lambda: SwitchRouter(4, 3, loss_free_bias=True),
                                  lambda: NoisyTopKRouter(4, 3, k=1, noise=False, loss_free_bias=True)])
def test_loss_free_bias_changes_the_top_1_choice_but_not_its_raw_probability_weight(make):
    """k = 1: the weight is the raw softmax probability of the clean scores over all E, bias left out of it (mutant
    `softmax(noisy + bias)` for the probabilities survived: only the k = 2 path was checked)."""
    torch.manual_seed(0)
    router = make().eval()
    x = torch.randn(64, 4)
    router.balancer.bias.copy_(torch.tensor([0.0, 0.0, 10.0]))  # expert 2 wins every row by its bias alone
    r = router(x)
    assert (r.chosen[:, 0] == 2).all()
    clean = torch.softmax(x @ router.w_gate, dim=1)
    torch.testing.assert_close(r.probs, clean)
    torch.testing.assert_close(r.weights[:, 0], clean[:, 2])
    assert (r.weights < 0.9).all()  # softmax(clean + bias) would be ~1


def test_expert_choice_eval_k_is_the_rounded_capacity_factor_at_most_e():
    """Evaluation's k = round(cf), clamped to [1, E] (mutants int(cf) and no clamp to E survived)."""
    x = torch.randn(16, 4)
    for cf, E, want in [(1.75, 4, 2), (2.6, 4, 3), (0.4, 4, 1), (3.0, 2, 2)]:
        router = ExpertChoiceRouter(4, E, capacity_factor=cf).eval()
        assert router.eval_k == want, cf
        r = router(x)
        assert r.chosen.shape == (16, want), cf
        assert all(len(set(row)) == want for row in r.chosen.tolist())  # distinct experts per row
        assert set(r.chosen.flatten().tolist()) <= set(range(E))


def test_expert_choice_needs_a_capacity_factor_and_loss_free_bias_a_positive_rate():
    """None capacity factor and a zero bias rate are refused with a ValueError naming the setting (mutants that
    dropped either check survived: None then failed later with a TypeError, rate 0 gave a bias that never moves)."""
    with pytest.raises(ValueError, match="capacity_factor"):
        ExpertChoiceRouter(4, 3, capacity_factor=None)
    with pytest.raises(ValueError, match="update_rate"):
        LossFreeBias(3, update_rate=0.0)
    with pytest.raises(ValueError, match="update_rate"):
        NoisyTopKRouter(4, 3, k=1, noise=False, loss_free_bias=True, bias_update_rate=0.0)


def test_routing_combine_carries_the_routers_gradient():
    """Routing.combine is documented differentiable (benchmarks/moe_layer.py's dense reference trains through it);
    mutant combine built from detached weights survived."""
    torch.manual_seed(0)
    router = NoisyTopKRouter(4, 5, k=2, noise=False).train()
    x = torch.randn(24, 4)
    target = torch.randn(24, 5)
    (router(x).combine * target).sum().backward()
    via_combine = router.w_gate.grad.clone()
    router.w_gate.grad = None
    r = router(x)
    (r.weights * target.gather(1, r.chosen)).sum().backward()
    assert via_combine.abs().sum() > 0
    torch.testing.assert_close(via_combine, router.w_gate.grad)
