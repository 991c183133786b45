"""GateRecord / concat_records: records that do not line up are not concatenated (a mutation review's gap)."""
from __future__ import annotations

import torch

from mmoe_rec.nn.routing_record import GateRecord, concat_records


def token_choice(rows: int, k: int, experts: int = 4) -> GateRecord:
    p = torch.softmax(torch.randn(rows, experts, generator=torch.Generator().manual_seed(rows * 10 + k)), -1)
    chosen = p.topk(k, -1).indices
    return GateRecord(combine=torch.zeros_like(p).scatter_(1, chosen, p.gather(1, chosen)), probs=p, chosen=chosen,
                      dropped=torch.tensor(1))


def test_records_of_one_kind_concatenate_and_other_k_other_experts_or_kinds_do_not():
    joined = concat_records([token_choice(3, 2), token_choice(5, 2)])
    assert joined.chosen.shape == (8, 2) and joined.combine.shape == (8, 4) and int(joined.dropped) == 2
    assert joined.drop_base == 16
    assert concat_records([token_choice(3, 1), token_choice(5, 2)]) is None  # a row's k differs
    assert concat_records([token_choice(3, 2), token_choice(5, 2, experts=6)]) is None
    dense = GateRecord(combine=torch.full((2, 4), 0.25), probs=torch.full((2, 4), 0.25))
    assert concat_records([token_choice(3, 2), dense]) is None


def test_the_importance_before_capacity_adds_up_and_a_record_without_it_does_not_line_up():
    a, b = token_choice(3, 2), token_choice(5, 2)
    a.importance, b.importance = torch.arange(4.0), torch.ones(4)
    assert torch.equal(concat_records([a, b]).importance, torch.arange(4.0) + 1)
    assert concat_records([a, token_choice(5, 2)]) is None
