"""RoutingMonitor windows under two real gloo processes: every statistic after `Window.reduce` is the one a single
process computes over both ranks' rows (the end-to-end DDP fit checks only the label correlation and that rank 0's
utilization sums to 1, which rank 0's own rows satisfy too: a reduce that skipped the gate sums went unnoticed)."""
from __future__ import annotations

import math

import pytest
import torch
from gloo_ranks import gloo_rank

from mmoe_rec.nn.routing_record import GateRecord

TASKS = ["click", "buy"]
E = 5
K = 2
# uneven ranks and uneven batches (an epoch's last batches differ in size across ranks)
ROWS = {0: (9, 4), 1: (6, 1)}
PLE_GROUPS = {"click": {"own": [0, 1], "shared": [4]}, "buy": {"own": [2, 3], "shared": [4]}}


def _records(rank: int, batch: int, rows: int) -> tuple[dict[str, GateRecord], dict[str, torch.Tensor], torch.Tensor]:
    """One rank's batch: token-choice top-2 gates with drops, their importance before the drops and router extras
    (task gates `<task>`) and PLE-like hard task gates over a level of five experts (`1/<task>`); regression and
    binary labels with sample weights."""
    g = torch.Generator().manual_seed(1000 * rank + batch)
    routing = {}
    for t in TASKS:
        logits = torch.randn(rows, E, generator=g) * 2
        probs = logits.softmax(-1)
        chosen = logits.topk(K, dim=1).indices
        keep = torch.rand(rows, K, generator=g) > 0.2  # some assignments dropped by capacity
        weights = probs.gather(1, chosen)
        weights = weights / weights.sum(1, keepdim=True)  # (rows, K) the gate's weights, before capacity
        combine = torch.zeros(rows, E).scatter(1, chosen, weights * keep)
        importance = torch.zeros(rows, E).scatter(1, chosen, weights).sum(0)  # (E,)
        routing[t] = GateRecord(combine=combine, probs=probs, chosen=chosen, dropped=(~keep).sum(),
                                importance=importance,
                                extra={"router_z": torch.logsumexp(logits, 1).pow(2).mean(),
                                       "bias_abs_max": torch.rand((), generator=g)})
        members = PLE_GROUPS[t]["own"] + PLE_GROUPS[t]["shared"]
        p = torch.zeros(rows, E)
        p[:, members] = torch.randn(rows, len(members), generator=g).softmax(-1)
        hard = torch.zeros(rows, E).scatter(1, p.argmax(1, keepdim=True), 1.0)
        routing[f"1/{t}"] = GateRecord(combine=hard, probs=p, chosen=p.argmax(1, keepdim=True),
                                       dropped=torch.zeros((), dtype=torch.int64), expert_groups=PLE_GROUPS[t])
    labels = {"click": (torch.rand(rows, generator=g) > 0.5).float(), "buy": torch.randn(rows, generator=g) * 3 + 7}
    return routing, labels, torch.rand(rows, generator=g) * 2


def _window_rank(rank: int, world: int, init_file: str, out_file: str, buffered: bool) -> None:
    from mmoe_rec.training.callbacks import Window

    with gloo_rank(rank, world, init_file):
        # the monitor's path: steps go into a (buffered) segment, which is added to the window before the reduce
        segment = Window(list(TASKS), buffer_elements=1 << 21 if buffered else 0)
        for batch, rows in enumerate(ROWS[rank]):
            segment.update(*_records(rank, batch, rows))
        window = Window(list(TASKS))
        window.add(segment)
        window.reduce()
        metrics = window.metrics("experts", "relatedness")
        if rank == 0:
            torch.save(metrics, out_file)


@pytest.mark.parametrize("buffered", [False, True])
def test_two_ranks_reduce_every_window_statistic_to_that_of_one_process_over_their_rows(tmp_path, buffered):
    import torch.multiprocessing as mp

    from mmoe_rec.training.callbacks import Window

    mp.spawn(_window_rank, args=(2, str(tmp_path / "init"), str(tmp_path / "m.pt"), buffered), nprocs=2)
    got = torch.load(tmp_path / "m.pt")
    one = Window(list(TASKS))
    for rank, sizes in ROWS.items():
        for batch, rows in enumerate(sizes):
            one.update(*_records(rank, batch, rows))
    want = one.metrics("experts", "relatedness")
    # every kind of statistic is there to compare (a key missing on either side fails below too)
    for key in ["experts/click/util/e0", "experts/click/importance_cv2", "experts/click/load_cv2",
                "experts/click/max_vio", "experts/click/dead", "experts/click/entropy", "experts/click/dropped_frac",
                "experts/click/router_z", "experts/click/bias_abs_max", "experts/1/click/share/own",
                "relatedness/label_corr/click.vs.buy", "relatedness/gate_js/click.vs.buy",
                "relatedness/gate_cos/click.vs.buy", "relatedness/expert_jaccard/click.vs.buy"]:
        assert key in want, key
    assert set(got) == set(want)
    # the per-row gate similarity is computed in float32 (monitoring.gate_pair_sums): its sums are exact to ~1e-7
    bad = {k: (got[k], v) for k, v in want.items() if not math.isclose(got[k], v, rel_tol=1e-6, abs_tol=1e-12)}
    assert not bad, bad
    # and rank 0's rows alone give other numbers: the comparison can fail
    alone = Window(list(TASKS))
    for batch, rows in enumerate(ROWS[0]):
        alone.update(*_records(0, batch, rows))
    alone_m = alone.metrics("experts", "relatedness")
    for key in ["experts/click/util/e0", "experts/click/importance_cv2", "experts/click/dropped_frac",
                "experts/click/router_z",
                "relatedness/label_corr/click.vs.buy", "relatedness/gate_js/click.vs.buy",
                "relatedness/expert_jaccard/click.vs.buy", "experts/1/click/share/own"]:
        assert alone_m[key] != pytest.approx(want[key], rel=1e-6), key
