"""Monitoring functions against references computed by hand or with numpy."""
import math

import numpy as np
import pytest
import torch

from mmoe_rec.nn.routing_record import GateRecord
from mmoe_rec.training.metrics import TaskMetrics
from mmoe_rec.training.monitoring import (
    GateStats,
    LabelStats,
    cosine,
    cv_squared,
    gate_pair_sums,
    gate_similarity,
    jaccard_sums,
    js_rows,
    label_correlation,
    max_violation,
    pair_scalars,
    task_gates,
    utilization_metrics,
)
from mmoe_rec.features.spec import FeatureSpec, SparseFeature, Task


def sparse_record(chosen, weights, num_experts, dropped=0):
    chosen = torch.tensor(chosen)
    combine = torch.zeros(len(chosen), num_experts).scatter(1, chosen, torch.tensor(weights))
    probs = torch.full((len(chosen), num_experts), 1.0 / num_experts)
    return GateRecord(combine=combine, probs=probs, chosen=chosen, dropped=torch.tensor(dropped),
                      extra={"bias_abs_mean": torch.tensor(0.25)})


def expert_choice_record(expert_rows, num_rows, num_experts, dropped):
    """expert_rows[e]: the rows expert e took (expert choice: a row may get any number of experts)."""
    assigned = torch.zeros(num_rows, num_experts, dtype=torch.bool)
    for e, rows in enumerate(expert_rows):
        assigned[rows, e] = True
    probs = torch.full((num_rows, num_experts), 1.0 / num_experts)
    return GateRecord(combine=probs * assigned, probs=probs, dropped=torch.tensor(dropped), assigned=assigned)


def test_cv2_and_max_violation():
    x = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert float(cv_squared(x)) == pytest.approx(np.var([1, 2, 3, 6]) / 3.0**2, rel=1e-6)
    assert float(cv_squared(torch.ones(5))) == pytest.approx(0.0)
    assert float(max_violation(x)) == pytest.approx((6 - 3) / 3)


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """One pair of distributions through the per-row JS divergence, in float64."""
    return float(js_rows(p.double()[None], q.double()[None])[0])


def test_js_divergence_bounds():
    p = torch.tensor([0.5, 0.5, 0.0, 0.0])
    assert float(js_divergence(p, p)) == pytest.approx(0.0, abs=1e-9)
    assert float(js_divergence(p, torch.tensor([0.0, 0.0, 0.5, 0.5]))) == pytest.approx(1.0, abs=1e-9)
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    m = (p + q) / 2
    ref = 0.5 * sum(a * math.log2(a / b) for a, b in zip(p.tolist(), m.tolist()) if a > 0) + \
        0.5 * sum(a * math.log2(a / b) for a, b in zip(q.tolist(), m.tolist()) if a > 0)
    assert float(js_divergence(p, q)) == pytest.approx(ref, rel=1e-9)


def test_gate_stats_sparse_metrics():
    # 4 rows, E=4, k=2: expert 3 never chosen -> dead; counts (3, 3, 2, 0)
    rec = sparse_record([[0, 1], [0, 2], [1, 0], [1, 2]], [[0.6, 0.4], [0.5, 0.5], [0.7, 0.3], [0.9, 0.1]], 4,
                        dropped=1)
    stats = GateStats.empty(4)
    stats.update(rec)
    m = utilization_metrics("click", stats)
    assert m["experts/click/fraction/e0"] == pytest.approx(3 / 8)
    assert m["experts/click/fraction/e3"] == 0.0
    assert m["experts/click/dead"] == 1.0
    assert m["experts/click/dropped_frac"] == pytest.approx(1 / 8)
    assert m["experts/click/util/e0"] == pytest.approx((0.6 + 0.5 + 0.3) / 4)
    assert m["experts/click/load_cv2"] == pytest.approx(float(cv_squared(torch.tensor([3.0, 3, 2, 0]))))
    assert m["experts/click/max_vio"] == pytest.approx((3 - 2) / 2)
    assert m["experts/click/entropy_norm"] == pytest.approx(1.0)  # uniform probs
    assert m["experts/click/bias_abs_mean"] == pytest.approx(0.25)


# A gap a review found (2026-12): counting the experts with a combine weight (after capacity) passed every test
def test_load_statistics_count_the_routers_choices_before_capacity():
    """fraction, sent, load CV^2, MaxVio and dead experts count what the router chose; an assignment the capacity
    dropped (combine weight 0, counted in `dropped`) is still a choice of its expert."""
    rec = sparse_record([[0, 1], [0, 2], [1, 0], [3, 2]], [[0.6, 0.4], [0.5, 0.5], [0.7, 0.3], [0.9, 0.1]], 4,
                        dropped=1)
    rec.combine[3, 3] = 0.0  # row 3's first choice, expert 3, dropped by the capacity limit
    stats = GateStats.empty(4)
    stats.update(rec)
    m = utilization_metrics("click", stats)
    assert m["experts/click/fraction/e3"] == pytest.approx(1 / 8)
    assert m["experts/click/sent/e3"] == pytest.approx(1 / 4)
    assert m["experts/click/dead"] == 0.0
    assert m["experts/click/util/e3"] == 0.0  # the utilization is after capacity
    assert m["experts/click/load_cv2"] == pytest.approx(float(cv_squared(torch.tensor([3.0, 2, 2, 1]))))
    assert m["experts/click/max_vio"] == pytest.approx((3 - 2) / 2)
    assert m["experts/click/dropped_frac"] == pytest.approx(1 / 8)


def test_gate_stats_groups_share_for_ple():
    combine = torch.tensor([[0.1, 0.2, 0.7], [0.3, 0.3, 0.4]])
    rec = GateRecord(combine=combine, probs=combine, expert_groups={"own": [0, 1], "shared": [2]})
    stats = GateStats.empty(3)
    stats.update(rec)
    m = utilization_metrics("level1/click", stats)
    assert m["experts/level1/click/share/own"] == pytest.approx(0.45)
    assert m["experts/level1/click/share/shared"] == pytest.approx(0.55)
    assert "experts/level1/click/dead" not in m  # dense gate: no load statistics


def test_label_correlation_matches_numpy():
    rng = np.random.default_rng(0)
    a = rng.random(200) < 0.4
    b = a & (rng.random(200) < 0.5)
    c = rng.normal(size=200)
    stats = LabelStats.empty(["a", "b", "c"])
    for sl in (slice(0, 70), slice(70, 200)):
        stats.update({"a": torch.tensor(a[sl], dtype=torch.float32), "b": torch.tensor(b[sl], dtype=torch.float32),
                      "c": torch.tensor(c[sl], dtype=torch.float32)})
    names, corr = label_correlation(stats)
    ref = np.corrcoef(np.stack([a, b, c]).astype(float))
    np.testing.assert_allclose(corr.numpy(), ref, atol=1e-5)
    assert pair_scalars("relatedness/label_corr", names, corr)["relatedness/label_corr/a.vs.b"] == \
        pytest.approx(ref[0, 1], abs=1e-5)


def test_jaccard_and_gate_similarity():
    a = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    b = torch.tensor([[1, 0, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    # rows 1/3, 1 and 0 (disjoint); the row neither gate sent anywhere is left out (it counted as overlap 1)
    assert jaccard_sums(a, b).tolist() == pytest.approx([4 / 3, 3.0])
    x, y = torch.tensor([[0.5, 0.5], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # two rows, 2 experts
    sums = gate_pair_sums(torch.stack([x, y, y]))  # pairs (x, y), (x, y), (y, y)
    sims = gate_similarity(["x", "y", "z"], sums)
    names, cos = sims["gate_cos"]
    assert names == ["x", "y", "z"]
    assert float(cos[0, 1]) == float(cos[1, 0]) == pytest.approx((1 / math.sqrt(2) + 1) / 2)  # mean over rows
    assert float(cos[1, 2]) == pytest.approx(1.0) and float(cos[0, 0]) == 1.0
    js = sims["gate_js"][1]
    assert float(js[0, 1]) == pytest.approx((float(js_divergence(x[0], y[0])) + 0.0) / 2)
    assert float(js[1, 2]) == pytest.approx(0.0, abs=1e-9) and float(js[0, 0]) == 0.0


def test_gate_similarity_leaves_out_the_rows_a_gate_dropped():
    """A row without combine weight (expert choice: no expert took it) has no distribution: identical gates that
    drop the same fifth of the rows read cosine 1 and JS 0 (cosine 0.8 when those rows counted as 0)."""
    g = torch.softmax(torch.randn(10, 4, generator=torch.Generator().manual_seed(0)), -1)
    g[:2] = 0.0
    sims = gate_similarity(["a", "b"], gate_pair_sums(torch.stack([g, g.clone()])))
    assert float(sims["gate_cos"][1][0, 1]) == pytest.approx(1.0)
    assert float(sims["gate_js"][1][0, 1]) == pytest.approx(0.0, abs=1e-6)
    h = g.clone()
    h[2] = 0.0  # dropped by one gate only: left out too (7 rows both weigh)
    assert float(gate_pair_sums(torch.stack([g, h]))[0, 2]) == 7


def test_gate_pair_sums_in_row_chunks_equal_one_pass(monkeypatch):
    from mmoe_rec.training import monitoring

    c = torch.softmax(torch.randn(4, 50, 6, generator=torch.Generator().manual_seed(1)), -1)  # 4 gates, 50 rows
    whole = gate_pair_sums(c)
    monkeypatch.setattr(monitoring, "PAIR_CHUNK_ELEMENTS", 6 * 6 * 7)  # 6 pairs x 6 experts x 7 rows a chunk
    torch.testing.assert_close(gate_pair_sums(c), whole, rtol=1e-6, atol=1e-6)  # float32 sums per chunk


def test_gate_similarity_is_per_row_not_of_the_mean_distributions():
    """Two gates that route every row to different experts, half the rows each way: their mean distributions are
    the same (uniform), which read as JS 0 / cosine 1 ("tasks route identically"); per row they are disjoint."""
    from mmoe_rec.nn.routing_record import GateRecord
    from mmoe_rec.training.callbacks import Window

    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat(4, 1)  # (8, 2)
    b = a.flip(1)
    window = Window(["click", "buy"])
    window.update({"click": GateRecord(combine=a, probs=a), "buy": GateRecord(combine=b, probs=b)},
                  {"click": torch.zeros(8), "buy": torch.ones(8)})
    torch.testing.assert_close(window.gates["click"].utilization, window.gates["buy"].utilization)
    related = window.relatedness()
    assert float(related["gate_js"][1][0, 1]) == pytest.approx(1.0)
    assert float(related["gate_cos"][1][0, 1]) == pytest.approx(0.0)


def test_task_gates_maps_ple_levels_to_last_level():
    gates = ["level0/click", "level0/buy", "level0/shared", "level1/click", "level1/buy"]
    assert task_gates(gates, ["click", "buy"]) == {"click": "level1/click", "buy": "level1/buy"}
    assert task_gates(["click", "buy"], ["click", "buy"]) == {"click": "click", "buy": "buy"}


def test_task_metrics_auc_logloss_mse_reference():
    spec = FeatureSpec([SparseFeature("u", 2)], [], [Task("c"), Task("r", "regression")]).finalize()
    m = TaskMetrics(spec, ["c", "r"], "val")
    logits = torch.tensor([2.0, -1.0, 0.5, -0.5, 1.0])
    y = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    r_pred, r_true = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), torch.tensor([1.0, 1.0, 3.0, 6.0, 5.0])
    m.update({"c": logits[:2], "r": r_pred[:2]}, {"c": y[:2], "r": r_true[:2]})
    m.update({"c": logits[2:], "r": r_pred[2:]}, {"c": y[2:], "r": r_true[2:]})
    out = m.compute()
    # AUC = P(score_pos > score_neg): positives (2.0, -0.5, 1.0) vs negatives (-1.0, 0.5) -> 5 of 6 pairs
    pos, neg = logits[y == 1], logits[y == 0]
    ref_auc = float((pos[:, None] > neg[None, :]).float().mean())
    assert ref_auc == pytest.approx(5 / 6)
    assert float(out["val/c/auc"]) == pytest.approx(ref_auc)
    p = torch.sigmoid(logits)
    ref_ll = float(-(y * p.log() + (1 - y) * (1 - p).log()).mean())
    assert float(out["val/c/logloss"]) == pytest.approx(ref_ll, rel=1e-5)
    assert float(out["val/r/mse"]) == pytest.approx((0 + 1 + 0 + 4 + 0) / 5)


def test_task_gates_picks_the_last_ple_level_numerically():
    from mmoe_rec.training.monitoring import task_gates

    names = ["0/a", "9/a", "10/a", "9/shared", "2/b", "11/b"]
    assert task_gates(names, ["a", "b"]) == {"a": "10/a", "b": "11/b"}
    # a task name holding "/" (the gate is "<level>/<task>"): it was left out, its expert use never logged
    names = ["0/ctr/v2", "0/cvr", "0/shared", "1/ctr/v2", "1/cvr"]
    assert task_gates(names, ["ctr/v2", "cvr", "v2"]) == {"ctr/v2": "1/ctr/v2", "cvr": "1/cvr"}


def test_sparse_gate_reports_the_fraction_of_rows_sent_beside_the_share_of_assignments():
    rec = sparse_record([[0, 1], [0, 2], [0, 1]], [[0.5, 0.5]] * 3, 4)  # every row sent to expert 0, k = 2
    stats = GateStats.empty(4)
    stats.update(rec)
    m = utilization_metrics("click", stats)
    assert m["experts/click/sent/e0"] == 1.0 and m["experts/click/fraction/e0"] == 0.5
    assert sum(m[f"experts/click/sent/e{i}"] for i in range(4)) == pytest.approx(2.0)  # k


def test_router_extras_are_means_over_rows_not_over_batches():
    stats = GateStats.empty(4)
    big = sparse_record([[0, 1]] * 9, [[0.5, 0.5]] * 9, 4)
    small = sparse_record([[0, 1]], [[0.5, 0.5]], 4)
    big.extra, small.extra = {"router_z": torch.tensor(1.0)}, {"router_z": torch.tensor(11.0)}
    stats.update(big)
    stats.update(small)
    assert utilization_metrics("click", stats)["experts/click/router_z"] == pytest.approx((9 * 1 + 11) / 10)


def test_label_correlation_counts_a_row_of_weight_two_twice():
    rng = np.random.default_rng(1)
    y = rng.random((60, 2)) < 0.5
    w = rng.integers(1, 4, 60)
    weighted = LabelStats.empty(["a", "b"])
    weighted.update({"a": torch.tensor(y[:, 0]).float(), "b": torch.tensor(y[:, 1]).float()},
                    torch.tensor(w, dtype=torch.float32))
    repeated = LabelStats.empty(["a", "b"])
    rep = np.repeat(y, w, axis=0)
    repeated.update({"a": torch.tensor(rep[:, 0]).float(), "b": torch.tensor(rep[:, 1]).float()})
    torch.testing.assert_close(label_correlation(weighted)[1], label_correlation(repeated)[1])


def test_ple_task_gates_that_use_only_their_own_experts_are_disjoint():
    from mmoe_rec.models.ple import PLE
    from mmoe_rec.training.callbacks import Window

    spec = FeatureSpec([SparseFeature("u", 3)], ["d"], [Task("click"), Task("buy")]).finalize()
    model = PLE(spec, num_levels=1, num_task_experts=1, num_shared_experts=1)
    with torch.no_grad():  # each task's gate all on its own expert (position 0 of [own; shared])
        model.levels[0].task_gates.weight.zero_()
        model.levels[0].task_gates.weight[:, -1, 0] = 50.0  # the dense input column, large: softmax -> own
    x = torch.cat([torch.zeros(8, model.front.output_dim - 1), torch.ones(8, 1)], dim=1)
    out = model.forward_dense(x)
    window = Window(["click", "buy"])
    window.update(out.routing, {"click": torch.zeros(8), "buy": torch.ones(8)})
    related = window.relatedness()
    names, js = related["gate_js"]
    assert float(js[0, 1]) == pytest.approx(1.0, abs=1e-6)  # disjoint: click's expert 0, buy's expert 1
    assert float(related["gate_cos"][1][0, 1]) == pytest.approx(0.0, abs=1e-6)
    m = utilization_metrics("0/click", window.gates["0/click"])
    assert m["experts/0/click/share/own"] == pytest.approx(1.0, abs=1e-6)
    assert m["experts/0/click/entropy_norm"] <= 1.0  # over its 2 weighable experts, not the level's 3


def test_window_updates_never_read_a_value_back_to_the_host():
    """A GPU step must not wait for the monitor: its sums stay on the gates' device until the window is reduced.
    Tensors on the meta device have no values, so any read (float(), .item(), .cpu(), .tolist()) raises."""
    from mmoe_rec.training.callbacks import Window

    def on_meta(record: GateRecord) -> GateRecord:
        return GateRecord(combine=record.combine.to("meta"), probs=record.probs.to("meta"),
                          chosen=record.chosen.to("meta"), dropped=record.dropped.to("meta"),
                          extra={k: v.to("meta") for k, v in record.extra.items()})

    window = Window(["click", "buy"])
    for _ in range(2):  # the second update adds to sums already on the device
        routing = {t: on_meta(sparse_record([[0, 1], [2, 3], [1, 2]], [[0.5, 0.5]] * 3, 4))
                   for t in ("click", "buy")}
        labels = {t: torch.ones(3, device="meta") for t in ("click", "buy")}
        window.update(routing, labels, torch.ones(3, device="meta"))
    with pytest.raises((NotImplementedError, RuntimeError)):  # the guard: a host read of a meta tensor does raise
        float(window.gates["click"].entropy_sum)
    assert window.gates["click"].rows == 6 and window.gates["click"].drop_base == 12  # counted from shapes


def test_window_metrics_after_a_reduce_equal_the_metrics_of_the_sums():
    """Reduced (single process: copied to the CPU) or not, the window gives the same numbers."""
    from mmoe_rec.training.callbacks import Window

    window = Window(["click", "buy"])
    for rows in ([[0, 1], [0, 2], [1, 3]], [[2, 3], [0, 1]]):
        routing = {t: sparse_record(rows, [[0.7, 0.3]] * len(rows), 4, dropped=1) for t in ("click", "buy")}
        labels = {"click": torch.tensor([1.0, 0.0, 1.0][:len(rows)]), "buy": torch.tensor([1.0, 0.0, 0.0][:len(rows)])}
        window.update(routing, labels)
    before = window.metrics("experts", "relatedness")
    window.reduce()
    after = window.metrics("experts", "relatedness")
    assert after == pytest.approx(before)
    assert before["experts/click/dropped_frac"] == pytest.approx(2 / 10)
    assert before["experts/click/bias_abs_mean"] == pytest.approx(0.25)
    assert before["relatedness/expert_jaccard/click.vs.buy"] == pytest.approx(1.0)
    assert all(isinstance(v, float) for v in after.values())


def test_expert_choice_gate_gets_load_statistics_and_its_dropped_rows_out_of_the_rows():
    # 4 rows, E = 3, every expert takes c = 2 rows: e0 {0, 1}, e1 {1, 3}, e2 {0, 3}; row 2 by none
    rec = expert_choice_record([[0, 1], [1, 3], [0, 3]], 4, 3, dropped=1)
    stats = GateStats.empty(3)
    stats.update(rec)
    m = utilization_metrics("click", stats)
    assert [m[f"experts/click/fraction/e{i}"] for i in range(3)] == pytest.approx([2 / 6] * 3)  # 6 assignments
    assert [m[f"experts/click/sent/e{i}"] for i in range(3)] == pytest.approx([2 / 4] * 3)
    assert m["experts/click/load_cv2"] == 0.0 and m["experts/click/max_vio"] == 0.0
    assert m["experts/click/dead"] == 0.0
    assert m["experts/click/dropped_frac"] == pytest.approx(1 / 4)  # one row of four, not of the assignments


def test_expert_choice_gates_get_the_chosen_expert_overlap_between_tasks():
    from mmoe_rec.training.callbacks import Window

    click = expert_choice_record([[0, 1], [1, 3], [0, 3]], 4, 3, dropped=1)  # rows' experts {0,2} {0,1} {} {1,2}
    buy = expert_choice_record([[0, 2], [1, 2], [1, 3]], 4, 3, dropped=0)  # {0} {1,2} {0,1} {2}
    window = Window(["click", "buy"])
    window.update({"click": click, "buy": buy}, {t: torch.ones(4) for t in ("click", "buy")})
    m = window.metrics("experts", "relatedness")
    assert m["relatedness/expert_jaccard/click.vs.buy"] == pytest.approx((1 / 2 + 1 / 3 + 0 + 1 / 2) / 4)
    assert m["experts/buy/dropped_frac"] == 0.0 and m["experts/click/dropped_frac"] == pytest.approx(1 / 4)


def test_an_expert_choice_model_gets_the_sparse_gate_metrics_in_training():
    from mmoe_rec.models.sparse_mmoe import SparseMMoE
    from mmoe_rec.training.callbacks import Window

    spec = FeatureSpec(sparse_features=[SparseFeature("user", 5)], dense_features=["d0"],
                       tasks=[Task("click"), Task("buy")]).finalize()
    torch.manual_seed(0)
    model = SparseMMoE(spec, embedding_dim=3, num_experts=4, k=1, router="expert_choice", capacity_factor=1.0)
    out = model.forward_dense(torch.randn(10, model.front.out_dim))  # c = 3 rows per expert
    window = Window(["click", "buy"])
    window.update(out.routing, {t: torch.ones(10) for t in ("click", "buy")})
    m = window.metrics("experts", "relatedness")
    for key in ["fraction/e0", "sent/e0", "load_cv2", "max_vio", "dead", "dropped_frac"]:
        assert f"experts/click/{key}" in m, key
    assert m["experts/click/fraction/e0"] == pytest.approx(3 / 12)
    assert m["experts/click/dropped_frac"] == pytest.approx(int(out.routing["click"].dropped) / 10)
    assert "relatedness/expert_jaccard/click.vs.buy" in m


@pytest.mark.parametrize("scale", [1.0, 1e-6, 1e-9])
def test_cosine_and_label_correlation_do_not_depend_on_scale(scale):
    g = torch.randn(50, generator=torch.Generator().manual_seed(0)) * scale
    assert float(cosine(g, g)) == pytest.approx(1.0)
    assert float(cosine(g, -g)) == pytest.approx(-1.0)
    assert math.isnan(float(cosine(g, torch.zeros(50))))  # undefined, not orthogonal
    rng = np.random.default_rng(2)
    a = rng.normal(size=300)
    b = 0.7 * a + rng.normal(size=300)
    stats = LabelStats.empty(["a", "b", "flat"])
    stats.update({"a": torch.tensor(a * scale), "b": torch.tensor(b * scale), "flat": torch.full((300,), 0.3)})
    corr = label_correlation(stats)[1]
    assert float(corr[0, 1]) == pytest.approx(np.corrcoef(a, b)[0, 1], rel=1e-6)
    assert float(corr[0, 0]) == pytest.approx(1.0)
    # a constant label's correlation is undefined: NaN (it read 0, "uncorrelated"), and not logged as a pair
    assert corr[2].isnan().all() and corr[:, 2].isnan().all()
    assert set(pair_scalars("label_corr", ["a", "b", "flat"], corr)) == {"label_corr/a.vs.b"}
    from mmoe_rec.training.monitoring import matrix_for_json

    assert matrix_for_json(corr)[2] == [None, None, None]  # JSON has no NaN


def test_label_correlation_is_reported_for_small_sample_weights():
    """`count` is the sum of weights: "more than one row" must not read it (0.001 per row made it vanish)."""
    from mmoe_rec.training.callbacks import Window

    rng = np.random.default_rng(3)
    y = torch.tensor(rng.random((500, 2)) < 0.5, dtype=torch.float32)
    got = {}
    for w in (1.0, 1e-3):
        window = Window(["click", "buy"])
        window.update({}, {"click": y[:, 0], "buy": y[:, 1]}, torch.full((500,), w))
        got[w] = window.relatedness()["label_corr"][1]
    torch.testing.assert_close(got[1e-3], got[1.0])
    window = Window(["click", "buy"])
    window.update({}, {"click": y[:1, 0], "buy": y[:1, 1]}, torch.full((1,), 5.0))
    assert "label_corr" not in window.relatedness()  # one row, however heavy: no correlation


def test_ple_task_gate_balance_statistics_cover_only_the_experts_it_can_reach():
    """A PLE task gate is recorded over the whole level; the other tasks' own experts are not its dead experts."""
    from mmoe_rec.models.ple import PLE
    from mmoe_rec.training.callbacks import Window

    spec = FeatureSpec([SparseFeature("u", 3)], ["d"], [Task("click"), Task("buy"), Task("like")]).finalize()
    tasks = ["click", "buy", "like"]
    torch.manual_seed(0)
    hard = PLE(spec, num_levels=1, num_task_experts=2, num_shared_experts=2, gate="hard")
    out = hard.forward_dense(torch.randn(4000, hard.front.output_dim))
    window = Window(tasks)
    window.update(out.routing, {t: torch.ones(4000) for t in tasks})
    stats = window.gates["0/click"]
    reach = sorted(i for idx in stats.groups.values() for i in idx)
    assert len(reach) == 4 and (stats.counts[reach] > 0).all()  # every reachable expert chosen
    m = utilization_metrics("0/click", stats)
    assert m["experts/0/click/dead"] == 0.0
    assert m["experts/0/click/load_cv2"] == pytest.approx(float(cv_squared(stats.counts[reach])))
    assert m["experts/0/click/max_vio"] == pytest.approx(float(max_violation(stats.counts[reach])))
    assert sum(m[f"experts/0/click/fraction/e{i}"] for i in range(8)) == pytest.approx(1.0)  # still level-wide

    uniform = PLE(spec, num_levels=1, num_task_experts=2, num_shared_experts=2)
    with torch.no_grad():
        uniform.levels[0].task_gates.weight.zero_()  # every task gate: 1/4 on each of its 4 experts
    out = uniform.forward_dense(torch.randn(100, uniform.front.output_dim))
    window = Window(tasks)
    window.update(out.routing, {t: torch.ones(100) for t in tasks})
    m = utilization_metrics("0/click", window.gates["0/click"])
    assert m["experts/0/click/importance_cv2"] == pytest.approx(0.0, abs=1e-9)


def test_a_window_made_of_added_segments_equals_one_updated_step_by_step():
    """RoutingMonitor computes a step's statistics once, into a segment that is added to the open window and the
    epoch: the sums must be those of updating each window with every step, and adding must not alias."""
    from mmoe_rec.nn.routing_record import GateRecord
    from mmoe_rec.training.callbacks import Window

    g = torch.Generator().manual_seed(3)

    def step(rows: int):
        probs = {t: torch.softmax(torch.randn(rows, 4, generator=g), -1) for t in ("click", "buy")}
        chosen = {t: p.topk(2, -1).indices for t, p in probs.items()}
        routing = {t: GateRecord(combine=torch.zeros_like(p).scatter_(1, chosen[t], p.gather(1, chosen[t])),
                                 probs=p, chosen=chosen[t], dropped=torch.tensor(1),
                                 extra={"router_z": torch.rand((), generator=g)}) for t, p in probs.items()}
        labels = {t: (torch.rand(rows, generator=g) < 0.4).float() for t in probs}
        return routing, labels, torch.rand(rows, generator=g) + 0.5

    steps = [step(rows) for rows in (16, 9, 23)]
    direct, added = Window(["click", "buy"]), Window(["click", "buy"])
    for routing, labels, weights in steps:
        direct.update(routing, labels, weights)
    first = Window(["click", "buy"])
    first.update(*steps[0])
    rest = Window(["click", "buy"])
    for s in steps[1:]:
        rest.update(*s)
    added.add(first)
    added.add(rest)
    before = [t.clone() for t in first.gates["click"].tensors()]
    added.gates["click"].combine_sum += 1.0  # the segment added must not change with the window it went into
    torch.testing.assert_close(first.gates["click"].tensors(), before)
    added.gates["click"].combine_sum -= 1.0
    for name in direct.gates:
        torch.testing.assert_close(added.gates[name].tensors(), direct.gates[name].tensors())
    torch.testing.assert_close(added.labels.state(), direct.labels.state())
    assert direct.metrics("experts", "relatedness") == pytest.approx(added.metrics("experts", "relatedness"))


@pytest.mark.parametrize("kind", ["dense", "token_choice", "expert_choice"])
def test_a_buffered_window_settles_to_the_sums_of_one_updated_batch_by_batch(kind):
    """RoutingMonitor's segment keeps batches and computes their statistics together (concat_records): the sums,
    extras (row-weighted), drops and pair statistics must equal updating batch by batch."""
    from mmoe_rec.nn.routing_record import GateRecord
    from mmoe_rec.training.callbacks import Window

    g = torch.Generator().manual_seed(5)

    def record(rows: int) -> GateRecord:
        p = torch.softmax(torch.randn(rows, 6, generator=g), -1)
        if kind == "dense":
            return GateRecord(combine=p, probs=p)
        if kind == "token_choice":
            chosen = p.topk(2, -1).indices
            return GateRecord(combine=torch.zeros_like(p).scatter_(1, chosen, p.gather(1, chosen)), probs=p,
                              chosen=chosen, dropped=torch.tensor(rows % 3),
                              extra={"router_z": torch.rand((), generator=g),
                                     "bias_abs_mean": torch.rand(6, generator=g)})
        assigned = torch.rand(rows, 6, generator=g) < 0.3
        return GateRecord(combine=p * assigned, probs=p, assigned=assigned, dropped=torch.tensor(1),
                          extra={"router_z": torch.rand((), generator=g)})

    steps = []
    for rows in (7, 12, 5, 9):
        routing = {t: record(rows) for t in ("click", "buy")}
        steps.append((routing, {t: (torch.rand(rows, generator=g) < 0.5).float() for t in routing},
                      torch.rand(rows, generator=g) + 0.1))
    direct, buffered = Window(["click", "buy"]), Window(["click", "buy"], buffer_elements=10 ** 6)
    for step in steps:
        direct.update(*step)
        buffered.update(*step)
    assert not buffered.gates  # nothing computed yet: kept for one pass
    got, want = buffered.metrics("experts", "relatedness"), direct.metrics("experts", "relatedness")
    assert got.keys() == want.keys() and got == pytest.approx(want, rel=1e-6, abs=1e-9)  # pair sums: float32
    # records that do not line up (here: other extras) are taken one by one
    odd = Window(["click", "buy"], buffer_elements=10 ** 6)
    odd.update(*steps[0])
    uniform = torch.full((3, 6), 1 / 6)
    odd.update({t: GateRecord(combine=uniform, probs=uniform, extra={"other": torch.tensor(2.0)})
                for t in ("click", "buy")}, {t: torch.zeros(3) for t in ("click", "buy")})
    odd.settle()
    assert odd.gates["click"].rows == 7 + 3
    assert float(odd.gates["click"].extra_sum["other"]) == pytest.approx(3 * 2.0)


def test_expert_overlap_leaves_out_rows_no_expert_took():
    """Expert choice: two gates pick disjoint experts for row 0 and no expert takes rows 1-2 for either. The
    overlap is 0, as the gates' cosine says; rows taken by nobody counted as overlap 1 (0.667)."""
    from mmoe_rec.training.callbacks import Window

    def record(mask: torch.Tensor) -> GateRecord:
        combine = mask.float() / mask.float().sum(1, keepdim=True).clamp_min(1)
        return GateRecord(combine=combine, probs=torch.full((3, 4), 0.25), chosen=None,
                          dropped=(mask.sum(1) == 0).sum(), assigned=mask)

    a = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    b = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    window = Window(["a", "b"])
    window.update({"a": record(a), "b": record(b)}, {"a": torch.tensor([0.0, 1, 0]), "b": torch.tensor([1.0, 0, 1])})
    related = window.relatedness()
    assert float(related["gate_cos"][1][0, 1]) == 0.0
    assert float(related["expert_jaccard"][1][0, 1]) == 0.0


def test_gates_that_never_weigh_a_row_together_have_no_similarity_and_nothing_sent_has_no_overlap():
    """Expert choice, disjoint rows: task a's experts took rows 0-1, task b's rows 2-3. No row has both gates'
    distributions: JS and cosine are undefined (NaN, left out of the scalars), not JS 0 ("identical"); the overlap
    is 0 (each row sent by one gate only). With no row sent at all the overlap is undefined too."""
    from mmoe_rec.training.callbacks import Window

    probs = torch.full((4, 2), 0.5)
    ca = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.0, 0.0], [0.0, 0.0]])

    def record(combine: torch.Tensor) -> GateRecord:
        return GateRecord(combine=combine, probs=probs, chosen=None, dropped=(combine.sum(1) == 0).sum(),
                          assigned=combine > 0)

    labels = {"a": torch.tensor([0.0, 1, 0, 1]), "b": torch.tensor([1.0, 0, 1, 1])}
    window = Window(["a", "b"])
    window.update({"a": record(ca), "b": record(ca.flip(0))}, labels)
    related = window.relatedness()
    assert torch.isnan(related["gate_js"][1][0, 1]) and torch.isnan(related["gate_cos"][1][0, 1])
    assert float(related["expert_jaccard"][1][0, 1]) == 0.0
    metrics = window.metrics("experts", "relatedness")
    assert "relatedness/gate_js/a.vs.b" not in metrics and metrics["relatedness/expert_jaccard/a.vs.b"] == 0.0
    nothing = Window(["a", "b"])
    nothing.update({"a": record(torch.zeros(4, 2)), "b": record(torch.zeros(4, 2))}, labels)
    assert torch.isnan(nothing.relatedness()["expert_jaccard"][1][0, 1])


def test_label_correlation_keeps_a_small_variance_under_a_large_mean():
    """Raw sums E[y^2] - E[y]^2 lost a regression label of mean 1e6 and std 1 to rounding (it read constant: NaN);
    the centred statistics keep it, over batches, windows and a checkpoint's round trip."""
    from mmoe_rec.training.callbacks import Window

    rng = np.random.default_rng(5)
    a = rng.normal(size=3000)
    b = 0.6 * a + rng.normal(size=3000)
    price = 1e6 + b  # (rows,) the same correlation with a as b, shifted by a large constant
    window = Window(["a", "price"])
    for sl in (slice(0, 1000), slice(1000, 1001), slice(1001, 3000)):
        part = Window(["a", "price"])
        part.update({}, {"a": torch.tensor(a[sl]), "price": torch.tensor(price[sl])})
        window.add(Window.from_state_dict(part.state_dict()))
    corr = window.relatedness()["label_corr"][1]
    assert float(corr[0, 1]) == pytest.approx(np.corrcoef(a, b)[0, 1], rel=1e-9)
    flat = Window(["a", "price"])  # and a label that is constant under the same mean still reads constant
    flat.update({}, {"a": torch.tensor(a), "price": torch.full((3000,), 1e6 + 0.1, dtype=torch.float64)})
    assert flat.relatedness()["label_corr"][1][1].isnan().all()


def test_label_statistics_merge_across_ranks_as_one_window():
    """`reduce` merges each rank's centred statistics (counts and means first, then m2 about the common mean):
    two simulated ranks of different means and weights give the one-process figures."""
    import threading

    from mmoe_rec.training.callbacks import Window

    rng = np.random.default_rng(6)
    y = rng.normal(size=(500, 2)) + [5e5, -3.0]
    w = rng.random(500) + 0.5
    parts = [slice(0, 120), slice(120, 500)]
    whole = Window(["a", "b"])
    whole.update({}, {"a": torch.tensor(y[:, 0]), "b": torch.tensor(y[:, 1])}, torch.tensor(w))
    windows = []
    for sl in parts:
        win = Window(["a", "b"])
        win.update({}, {"a": torch.tensor(y[sl, 0]), "b": torch.tensor(y[sl, 1])}, torch.tensor(w[sl]))
        windows.append(win)

    barrier = threading.Barrier(2)
    calls: list[list[list[torch.Tensor]]] = [[], []]
    results: list = [None, None]

    def all_reduce_for(rank):
        def reduce(tensors):
            calls[rank].append(tensors)
            barrier.wait()
            summed = [a.cpu() + b.cpu() for a, b in zip(calls[0][-1], calls[1][-1])]
            barrier.wait()
            return summed
        return reduce

    def run(rank):
        windows[rank].labels.reduce(all_reduce_for(rank))
        results[rank] = windows[rank].labels.state()

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.testing.assert_close(results[0], results[1])
    torch.testing.assert_close(results[0], whole.labels.state(), rtol=1e-12, atol=1e-6)


def test_label_statistics_load_from_a_checkpoint_of_raw_sums():
    """Checkpoints before the statistics were centred hold s1 = sum w y and s2 = sum w y y^T: they still load."""
    from mmoe_rec.training.monitoring import LabelStats

    y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    w = torch.tensor([1.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    old = {"s1": (w[:, None] * y).sum(0), "s2": (w[:, None] * y).T @ y, "count": w.sum(),
           "rows": torch.tensor(4.0, dtype=torch.float64)}
    loaded = LabelStats.from_state(["a", "b"], old)
    fresh = LabelStats.empty(["a", "b"])
    fresh.update({"a": y[:, 0], "b": y[:, 1]}, w)
    torch.testing.assert_close(loaded.state(), fresh.state())
    # a label the raw sums held as constant (0.3 under uneven weights) stays constant: the rounding noise of
    # s2 - n mean^2 must not read as a variance (it made the pair "uncorrelated", 0, instead of undefined)
    rng = np.random.default_rng(0)
    for _ in range(20):
        w = torch.tensor(rng.random(300) * 3, dtype=torch.float64)
        y = torch.stack([torch.tensor(rng.normal(size=300)), torch.full((300,), 0.3, dtype=torch.float64)], 1)
        old = {"s1": (w[:, None] * y).sum(0), "s2": (w[:, None] * y).T @ y, "count": w.sum(),
               "rows": torch.tensor(300.0, dtype=torch.float64)}
        stats = LabelStats.from_state(["a", "flat"], old)
        assert label_correlation(stats)[1][1].isnan().all()


def test_a_ple_gates_entropy_is_normalized_over_the_experts_it_can_reach():
    """The README: a PLE task gate's E counts its own and the shared experts, not the level's. Spread evenly over
    the 2 it reaches in a level of 3 it reads 1, not log 2 / log 3 = 0.63 (the test above only bounds it by 1)."""
    p = torch.tensor([[0.5, 0.0, 0.5]] * 4)
    stats = GateStats.empty(3)
    stats.update(GateRecord(combine=p, probs=p, expert_groups={"own": [0], "shared": [2]}))
    assert utilization_metrics("0/click", stats)["experts/0/click/entropy_norm"] == pytest.approx(1.0)


def test_an_expert_chosen_once_in_the_window_is_not_dead():
    chosen = torch.tensor([[0], [1], [1], [2]])  # counts (1, 2, 1)
    combine = torch.zeros(4, 3).scatter(1, chosen, 1.0)
    stats = GateStats.empty(3)
    stats.update(GateRecord(combine=combine, probs=torch.full((4, 3), 1 / 3), chosen=chosen,
                            dropped=torch.tensor(0)))
    assert utilization_metrics("g", stats)["experts/g/dead"] == 0.0


def _label_corr(labels: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    from mmoe_rec.training.callbacks import Window

    window = Window(["a", "b"])
    window.update({}, {"a": labels[:, 0], "b": labels[:, 1]}, weights)
    return window.relatedness()["label_corr"][1]


LABELS = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
WEIGHTS = torch.tensor([3.0, 1.0, 1.0, 1.0, 2.0])


def test_the_windows_label_correlation_weighs_rows_as_their_repeats():
    """The README promises a sample-weighted label correlation: weight w is the row w times (a constant weight,
    the only one a window test used, changes no correlation)."""
    repeated = torch.repeat_interleave(LABELS, WEIGHTS.long(), dim=0)
    weighted = _label_corr(LABELS, WEIGHTS)
    torch.testing.assert_close(weighted, _label_corr(repeated, None))
    assert abs(float(weighted[0, 1]) - float(_label_corr(LABELS, None)[0, 1])) > 0.05


def test_importance_cv2_is_that_of_the_gate_weights_before_capacity_as_the_importance_loss():
    """MOE_NOTES: Importance_i = sum over rows of g(x)_i, the gate's weights; the model's importance loss takes them
    before the capacity limit. The monitor's importance CV^2 must measure the same thing: summed after capacity,
    the drops (which hit the overloaded experts) take weight off exactly the experts that make the imbalance."""
    from mmoe_rec.models.sparse_mmoe import SparseMMoE
    from mmoe_rec.training.callbacks import Window

    spec = FeatureSpec(sparse_features=[SparseFeature("user", 5)], dense_features=["d0"],
                       tasks=[Task("click"), Task("buy")]).finalize()
    torch.manual_seed(2)
    model = SparseMMoE(spec, embedding_dim=3, num_experts=5, expert_hidden=[4], tower_hidden=[3], k=2,
                       noise=False, capacity_factor=1.0)
    model.train()
    x = torch.randn(23, model.front.out_dim) * 3
    out = model.forward_dense(x)
    assert int(out.routing["click"].dropped) > 0  # the capacity limit dropped assignments
    gate_weights = model.gates["click"](x).combine.detach().double()  # (T, E) g(x), before capacity
    window = Window(["click", "buy"])
    window.update(out.routing, {t: torch.ones(23) for t in ("click", "buy")})
    m = window.metrics("experts", "relatedness")
    assert m["experts/click/importance_cv2"] == pytest.approx(float(cv_squared(gate_weights.sum(0))), rel=1e-6)
    # a checkpoint's window keeps it; one saved before the field was kept reads the combine weights' sum
    state = window.state_dict()
    assert Window.from_state_dict(state).metrics("experts", "relatedness") == m
    del state["gates"]["click"]["importance_sum"]
    old = Window.from_state_dict(state).metrics("experts", "relatedness")["experts/click/importance_cv2"]
    assert old == pytest.approx(float(cv_squared(out.routing["click"].combine.double().sum(0))), rel=1e-6)


# Tests that kill surviving mutants of a mutation review of the monitoring statistics


def test_a_ple_gates_groups_survive_being_added_into_an_empty_window():
    """RoutingMonitor adds every segment into fresh window / epoch sums (GateStats.empty(...).add(...)): the groups
    must come along, or a PLE task gate loses its own / shared shares and its balance statistics count the other
    tasks' own experts as dead."""
    chosen = [[0], [1], [4], [5]]  # level of 6 experts: click's own 0-1, buy's own 2-3, shared 4-5
    rec = sparse_record(chosen, [[1.0]] * 4, 6)
    rec.expert_groups = {"own": [0, 1], "shared": [4, 5]}
    direct = GateStats.empty(6)
    direct.update(rec)
    added = GateStats.empty(6)
    added.add(direct)
    assert added.groups == {"own": [0, 1], "shared": [4, 5]}
    want = utilization_metrics("0/click", direct)
    got = utilization_metrics("0/click", added)
    assert got == pytest.approx(want)
    assert got["experts/0/click/dead"] == 0.0 and got["experts/0/click/share/own"] == pytest.approx(0.5)


def test_gate_js_leaves_out_a_row_only_one_gate_weighed():
    """A row one gate dropped (no weight) is left out of the JS sum as well as of the cosine and the row count
    (counted, it added JS 0.5 to gates that are identical on every row they both weigh)."""
    g = torch.softmax(torch.randn(10, 4, generator=torch.Generator().manual_seed(0)), -1)
    h = g.clone()
    h[2] = 0.0
    js, cos, rows = gate_pair_sums(torch.stack([g, h]))[0].tolist()
    assert rows == 9 and cos == pytest.approx(9.0, rel=1e-5)
    assert js == pytest.approx(0.0, abs=1e-5)


def test_the_diagonal_of_the_expert_overlap_matrix_is_one():
    """Each task's chosen experts overlap fully with themselves (the JSON matrix and the plot show the diagonal)."""
    from mmoe_rec.training.callbacks import Window

    window = Window(["a", "b"])
    window.update({"a": sparse_record([[0], [1]], [[1.0], [1.0]], 2), "b": sparse_record([[1], [1]], [[1.0], [1.0]], 2)},
                  {"a": torch.tensor([0.0, 1]), "b": torch.tensor([1.0, 0])})
    names, mat = window.relatedness()["expert_jaccard"]
    assert names == ["a", "b"]
    assert mat.tolist() == [[1.0, 0.5], [0.5, 1.0]]


def test_gates_over_other_experts_are_left_out_and_the_others_still_compared():
    """Tasks a and b have gates over 4 experts, c over 3: a and b are compared (the largest group of gates of the
    same shape), c is not."""
    from mmoe_rec.training.callbacks import Window

    g = torch.softmax(torch.randn(6, 4, generator=torch.Generator().manual_seed(2)), -1)
    c = torch.softmax(torch.randn(6, 3, generator=torch.Generator().manual_seed(3)), -1)
    window = Window(["a", "b", "c"])
    labels = {t: torch.tensor([0.0, 1, 0, 1, 1, 0]) for t in "abc"}
    window.update({"a": GateRecord(combine=g, probs=g), "b": GateRecord(combine=g.clone(), probs=g),
                   "c": GateRecord(combine=c, probs=c)}, labels)
    names, js = window.relatedness()["gate_js"]
    assert names == ["a", "b"] and float(js[0, 1]) == pytest.approx(0.0, abs=1e-6)


def test_a_partial_epoch_stays_out_of_the_epoch_load_history():
    """An epoch cut short is logged under partial_epoch/, but not drawn as an epoch's point of the load plot."""
    from types import SimpleNamespace

    from mmoe_rec.training.callbacks import RoutingMonitor, Window

    g = torch.softmax(torch.randn(6, 4, generator=torch.Generator().manual_seed(2)), -1)
    window = Window(["a"])
    window.update({"a": GateRecord(combine=g, probs=g)}, {"a": torch.tensor([0.0, 1, 0, 1, 1, 0])})
    monitor = RoutingMonitor(every_n_steps=5, plots=False)
    trainer = SimpleNamespace(global_step=15, is_global_zero=False, logger=None)
    monitor._close_epoch(trainer, window, 0, partial=True)
    assert monitor.epoch_history_steps == [] and monitor.epoch_history == {}
    monitor._close_epoch(trainer, window, 0)
    assert monitor.epoch_history_steps == [15] and list(monitor.epoch_history) == ["a"]
