"""Per-task metrics: the weighted AUC against torchmetrics' unweighted AUROC and a brute-force pairwise reference."""
from __future__ import annotations

import math

import pytest
import torch
from gloo_ranks import gloo_rank
from torchmetrics.classification import BinaryAUROC

from mmoe_rec.features.spec import FeatureSpec, SparseFeature, Task
from mmoe_rec.training.metrics import TaskMetrics, WeightedBinaryAUROC, weighted_auc


def pairwise_auc(scores, labels, weights):
    """O(n^2) definition: sum over (positive, negative) pairs of w_p * w_n * (1 if s_p > s_n, 1/2 if equal)."""
    num = den = 0.0
    for sp, yp, wp in zip(scores.tolist(), labels.tolist(), weights.tolist()):
        if yp != 1:
            continue
        for sn, yn, wn in zip(scores.tolist(), labels.tolist(), weights.tolist()):
            if yn != 0:
                continue
            num += wp * wn * (1.0 if sp > sn else 0.5 if sp == sn else 0.0)
            den += wp * wn
    return num / den


def data(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 40, (n,), generator=g).float() / 40  # many ties on purpose
    labels = (torch.rand(n, generator=g) < 0.3 + 0.5 * scores).float()
    weights = torch.rand(n, generator=g) * 3
    return scores, labels, weights


def test_equal_weights_give_torchmetrics_auroc():
    scores, labels, _ = data()
    ref = BinaryAUROC()
    ref.update(scores, labels.long())
    ours = WeightedBinaryAUROC()
    ours.update(scores[:100], labels[:100])  # several updates, as over validation batches
    ours.update(scores[100:], labels[100:])
    torch.testing.assert_close(ours.compute(), ref.compute(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weighted_auc_equals_the_pairwise_definition(seed):
    scores, labels, weights = data(120, seed)
    assert weighted_auc(scores.double(), labels.double(), weights.double()).item() == pytest.approx(
        pairwise_auc(scores, labels, weights), abs=1e-6)


def test_weight_two_is_the_row_twice():
    scores, labels, _ = data(80)
    w = torch.ones(80)
    w[:10] = 2.0
    dup = torch.cat([torch.arange(80), torch.arange(10)])
    a = weighted_auc(scores.double(), labels.double(), w.double())
    b = weighted_auc(scores[dup].double(), labels[dup].double(), torch.ones(90, dtype=torch.float64))
    torch.testing.assert_close(a, b)


def test_one_class_only_warns_and_returns_nan():
    """Not 0, which reads as a perfectly inverted ranking (the worst model to a checkpoint watching mode=max)."""
    m = WeightedBinaryAUROC()
    m.update(torch.rand(10), torch.zeros(10))
    with pytest.warns(RuntimeWarning, match="undefined"):
        assert math.isnan(m.compute().item())
    weighted = WeightedBinaryAUROC()  # both classes present, but no weight on the positives
    weighted.update(torch.rand(4), torch.tensor([0.0, 1.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 1.0, 0.0]))
    with pytest.warns(RuntimeWarning, match="undefined"):
        assert math.isnan(weighted.compute().item())
    with pytest.warns(RuntimeWarning, match="no rows"):
        assert math.isnan(WeightedBinaryAUROC().compute().item())


def test_task_metrics_weight_auc_and_logloss():
    spec = FeatureSpec([SparseFeature("u", 3)], ["d"], [Task("click")]).finalize()
    scores, labels, weights = data(200)
    logits = torch.logit(scores.clamp(0.01, 0.99))
    metrics = TaskMetrics(spec, ["click"], "val")
    metrics.update({"click": logits[:120]}, {"click": labels[:120]}, weights[:120])
    metrics.update({"click": logits[120:]}, {"click": labels[120:]}, weights[120:])
    out = metrics.compute()
    assert out["val/click/auc"].item() == pytest.approx(
        pairwise_auc(torch.sigmoid(logits), labels, weights), abs=1e-6)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    assert out["val/click/logloss"].item() == pytest.approx(float((bce * weights).sum() / weights.sum()), rel=1e-5)


def test_split_loss_is_the_sum_of_the_task_losses_over_all_rows():
    spec = FeatureSpec([SparseFeature("u", 3)], ["d"], [Task("click"), Task("dwell", "regression")]).finalize()
    scores, labels, weights = data(200)
    logits, dwell, target = torch.logit(scores.clamp(0.01, 0.99)), torch.randn(200), torch.randn(200)
    metrics = TaskMetrics(spec, ["click", "dwell"], "test")
    for part in (slice(0, 7), slice(7, 200)):  # batches of very different sizes: a mean of batch means would differ
        metrics.update({"click": logits[part], "dwell": dwell[part]}, {"click": labels[part], "dwell": target[part]},
                       weights[part])
    out = metrics.compute()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    want = float((bce * weights).sum() / weights.sum() + ((dwell - target) ** 2 * weights).sum() / weights.sum())
    assert out["test/loss"].item() == pytest.approx(want, rel=1e-5)
    assert out["test/loss"].item() == pytest.approx((out["test/click/logloss"] + out["test/dwell/mse"]).item())


def test_a_row_with_a_nan_output_makes_the_split_metrics_nan_not_finite():
    """A model that diverged on some rows must not get a finite validation loss from the rows that are left:
    early stopping and checkpoints read it (the training loss of the same batch is NaN)."""
    import math

    spec = FeatureSpec([SparseFeature("u", 3)], ["d"], [Task("click"), Task("dwell", "regression")]).finalize()
    metrics = TaskMetrics(spec, ["click", "dwell"], "val")
    metrics.update({"click": torch.tensor([2.0, -1.0, 0.5]), "dwell": torch.tensor([0.1, 0.2, 0.3])},
                   {"click": torch.tensor([1.0, 0.0, 1.0]), "dwell": torch.tensor([0.0, 0.0, 0.0])})
    metrics.update({"click": torch.tensor([float("nan"), 0.3]), "dwell": torch.tensor([float("nan"), 0.1])},
                   {"click": torch.tensor([0.0, 1.0]), "dwell": torch.tensor([0.0, 0.0])})
    out = metrics.compute()
    for key in ("val/click/logloss", "val/click/auc", "val/dwell/mse", "val/loss"):
        assert math.isnan(float(out[key])), (key, out[key])


def test_auc_ranks_confident_logits_that_a_float32_sigmoid_would_tie():
    spec = FeatureSpec([SparseFeature("u", 3)], ["d"], [Task("click")]).finalize()
    logits, labels = torch.tensor([-3.0, 17.0, 18.0, 19.0, 20.0]), torch.tensor([0.0, 0.0, 1.0, 0.0, 1.0])
    assert torch.sigmoid(logits[1:]).unique().numel() == 1  # all 1.0 in float32
    metrics = TaskMetrics(spec, ["click"], "val")
    metrics.update({"click": logits}, {"click": labels})
    assert metrics.compute()["val/click/auc"].item() == pytest.approx(pairwise_auc(logits, labels, torch.ones(5)))
    assert metrics.compute()["val/click/auc"].item() == pytest.approx(5 / 6)
    infinite = TaskMetrics(spec, ["click"], "val")  # an infinite logit is the largest score, not a NaN AUC
    infinite.update({"click": torch.tensor([float("inf"), 0.0, float("-inf")])}, {"click": torch.tensor([1.0, 0, 0])})
    assert infinite.compute()["val/click/auc"].item() == 1.0


def test_a_nan_output_leaves_the_callers_weights_and_the_other_tasks_alone():
    spec = FeatureSpec([SparseFeature("u", 3)], ["d"], [Task("click"), Task("convert")]).finalize()
    weights = torch.tensor([3.0, 3.0, 3.0, 1.0])
    metrics = TaskMetrics(spec, ["click", "convert"], "val")
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0])
    convert = torch.tensor([0.5, -0.5, 2.0, 1.0])
    metrics.update({"click": torch.tensor([float("nan"), 0.1, 0.2, 0.3]), "convert": convert},
                   {"click": labels, "convert": labels}, weights)
    assert weights.tolist() == [3.0, 3.0, 3.0, 1.0]
    bce = torch.nn.functional.binary_cross_entropy_with_logits(convert, labels, reduction="none")
    want = float((bce * weights).sum() / weights.sum())
    assert metrics.compute()["val/convert/logloss"].item() == pytest.approx(want, rel=1e-6)


def test_split_loss_weights_the_tasks_as_the_static_task_weights_do():
    spec = FeatureSpec([SparseFeature("u", 3)], ["d"], [Task("click"), Task("dwell", "regression")]).finalize()
    metrics = TaskMetrics(spec, ["click", "dwell"], "val", task_weights={"dwell": 0.25})
    metrics.update({"click": torch.tensor([0.3, -0.2]), "dwell": torch.tensor([1.0, 2.0])},
                   {"click": torch.tensor([1.0, 0.0]), "dwell": torch.tensor([0.0, 0.0])})
    out = metrics.compute()
    assert out["val/loss"].item() == pytest.approx((out["val/click/logloss"] + 0.25 * out["val/dwell/mse"]).item())


def test_a_task_name_holding_a_double_underscore_is_measured():
    """Metric keys are `<task>__<metric>`: a task `add__cart` failed to unpack at the first validation."""
    from mmoe_rec.features.spec import FeatureSpec, SparseFeature, Task
    from mmoe_rec.training.metrics import TaskMetrics

    tasks = ["add__cart", "buy"]
    spec = FeatureSpec([SparseFeature("u", 2)], [], [Task(t) for t in tasks]).finalize()
    metrics = TaskMetrics(spec, tasks, "val")
    metrics.update({t: torch.tensor([2.0, -1.0]) for t in tasks}, {t: torch.tensor([1.0, 0.0]) for t in tasks})
    out = metrics.compute()
    assert sorted(out) == sorted(metrics.names()) and float(out["val/add__cart/auc"]) == 1.0


def test_metrics_of_a_model_cast_to_bfloat16_keep_their_sums_in_float32():
    """precision "bf16-true" casts the module with .to(bfloat16), metrics included (torchmetrics guards .half(),
    not .to(dtype)): the running sums became bfloat16 and a validation log-loss over 51,200 rows came out 0.89
    where it was 0.80."""
    spec = FeatureSpec([SparseFeature("u", 3)], ["d"], [Task("click"), Task("dwell", "regression")]).finalize()
    g = torch.Generator().manual_seed(0)
    n = 51_200
    logits, labels = torch.randn(n, generator=g), (torch.rand(n, generator=g) < 0.3).float()
    dwell, target, weights = torch.randn(n, generator=g), torch.randn(n, generator=g), torch.rand(n, generator=g) + 0.5
    outs = []
    for dtype in (torch.float32, torch.bfloat16):
        metrics = TaskMetrics(spec, ["click", "dwell"], "val").to(dtype)
        for part in range(0, n, 512):  # as many batches as a validation epoch
            rows = slice(part, part + 512)
            metrics.update({"click": logits[rows].to(dtype), "dwell": dwell[rows].to(dtype)},
                           {"click": labels[rows], "dwell": target[rows]}, weights[rows])
        outs.append({k: float(v) for k, v in metrics.compute().items()})
    # the bf16 run's inputs are bf16-rounded logits; the sums are not rounded again
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits.bfloat16().float(), labels, reduction="none")
    assert outs[1]["val/click/logloss"] == pytest.approx(float((bce * weights).sum() / weights.sum()), rel=1e-5)
    mse = ((dwell.bfloat16().float() - target) ** 2 * weights).sum() / weights.sum()
    assert outs[1]["val/dwell/mse"] == pytest.approx(float(mse), rel=1e-5)
    assert outs[1]["val/loss"] == pytest.approx(outs[0]["val/loss"], rel=1e-2)


def _weighted_auc_ddp_rank(rank: int, world: int, init_file: str, out_file: str) -> None:
    with gloo_rank(rank, world, init_file):
        scores, labels, weights = data(n=40, seed=7)
        metric = WeightedBinaryAUROC()
        for lo, hi in ((0, 7), (7, 14), (14, 20)):  # several updates on each rank, of different sizes
            rows = slice(20 * rank + lo, 20 * rank + hi)
            metric.update(scores[rows], labels[rows], weights[rows])
        auc = metric.compute()
        if rank == 0:
            torch.save(auc, out_file)


def test_under_ddp_the_weighted_auc_of_several_updates_per_rank_is_that_of_all_rows(tmp_path):
    """Each rank's list states are joined before the gather ("cat"): gathered update by update instead, the
    weights came back in another order than the scores (a review's mutation; one update per rank hid it)."""
    import torch.multiprocessing as mp

    mp.spawn(_weighted_auc_ddp_rank, args=(2, str(tmp_path / "init"), str(tmp_path / "auc.pt")), nprocs=2)
    scores, labels, weights = data(n=40, seed=7)
    assert torch.load(tmp_path / "auc.pt").item() == pytest.approx(pairwise_auc(scores, labels, weights), abs=1e-6)


def test_reset_starts_the_next_epochs_metrics_from_no_rows():
    spec = FeatureSpec([SparseFeature("u", 3)], ["d"], [Task("click"), Task("dwell", "regression")]).finalize()
    metrics = TaskMetrics(spec, ["click", "dwell"], "val")
    metrics.update({"click": torch.tensor([5.0, -5.0]), "dwell": torch.tensor([10.0, 10.0])},
                   {"click": torch.tensor([0.0, 1.0]), "dwell": torch.tensor([0.0, 0.0])})
    metrics.reset()
    logits, labels = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 0.0, 0.0])
    metrics.update({"click": logits, "dwell": torch.tensor([1.0, 2.0, 3.0])},
                   {"click": labels, "dwell": torch.tensor([1.0, 1.0, 1.0])})
    out = metrics.compute()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
    assert out["val/click/logloss"].item() == pytest.approx(bce.item(), rel=1e-5)
    assert out["val/click/auc"].item() == pytest.approx(1.0)
    assert out["val/dwell/mse"].item() == pytest.approx(5 / 3, rel=1e-6)


def test_an_infinite_logit_ranks_above_every_finite_one_however_large():
    """+inf is the largest score, above a finite logit of 1e4 (mapped to a finite stand-in smaller than that, the
    two swapped places)."""
    spec = FeatureSpec([SparseFeature("u", 3)], ["d"], [Task("click")]).finalize()
    m = TaskMetrics(spec, ["click"], "val")
    m.update({"click": torch.tensor([float("inf"), 1e4, 0.0, float("-inf"), -1e4])},
             {"click": torch.tensor([1.0, 0, 0, 0, 1])})
    # positive at +inf above all 3 negatives; positive at -1e4 above only the -inf negative: (3 + 1) / 6
    assert m.compute()["val/click/auc"].item() == pytest.approx(4 / 6)
