"""nn.row_gather against index_select's own autograd: the same rows and the same table gradient, bit for bit."""
from __future__ import annotations

import pytest
import torch

from mmoe_rec.nn.row_gather import gather_rows, row_gradient


def reference(table: torch.Tensor, ids: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    t = table.detach().clone().requires_grad_(True)
    out = t.index_select(0, ids)
    out.backward(grad)
    return out.detach(), t.grad


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dim", [1, 4, 8, 17])
def test_rows_and_gradient_equal_index_select_bitwise(threads, dim):
    g = torch.Generator().manual_seed(dim)
    num_rows, n = 300, 5000
    table = torch.randn(num_rows, dim, generator=g)
    ids = torch.randint(0, num_rows - 20, (n,), generator=g)  # the last 20 rows are never taken
    ids[:50] = 7  # one row taken many times: its gradient sums them all
    grad = torch.randn(n, dim, generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        want_out, want_grad = reference(table, ids, grad)
        t = table.clone().requires_grad_(True)
        out = gather_rows(t, ids)
        out.backward(grad)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out, want_out)
    assert torch.equal(t.grad, want_grad)  # same terms summed in the same (id) order
    assert t.grad.is_contiguous() and t.grad.shape == (num_rows, dim)
    unseen = torch.ones(num_rows, dtype=torch.bool)
    unseen[ids] = False
    assert unseen.any() and t.grad[unseen].abs().sum() == 0


def test_a_non_contiguous_incoming_gradient_and_untouched_rows():
    table = torch.randn(10, 3, requires_grad=True)
    ids = torch.tensor([2, 2, 5])
    out = gather_rows(table, ids)
    grad = torch.arange(18, dtype=torch.float32).view(3, 6)[:, ::2]  # (3, 3), strided
    out.backward(grad)
    want = torch.zeros(10, 3)
    want[2] = grad[0] + grad[1]
    want[5] = grad[2]
    assert torch.equal(table.grad, want)


def test_row_gradient_of_a_view_of_a_batch_matches_a_hand_sum():
    grad = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    assert torch.equal(row_gradient(grad, torch.tensor([1, 0, 1]), 3),
                       torch.tensor([[3.0, 4.0], [6.0, 8.0], [0.0, 0.0]]))


def test_without_a_gradient_or_off_the_cpu_it_is_index_select():
    table = torch.randn(5, 2)
    ids = torch.tensor([4, 0])
    out = gather_rows(table, ids)
    assert out.grad_fn is None and torch.equal(out, table[ids])
    meta = torch.empty(5, 2, device="meta", requires_grad=True)
    assert gather_rows(meta, ids.to("meta")).grad_fn.name() == "IndexSelectBackward0"


def test_gradcheck_in_double():
    table = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([0, 5, 5, 2])
    assert torch.autograd.gradcheck(lambda t: gather_rows(t, ids), (table,))


def test_a_double_backward_equals_index_selects():
    """create_graph=True through the gather (a penalty on the rows' gradient): differentiable like index_select's."""
    table = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([0, 5, 5, 2])
    scale = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)

    def penalized(gather):
        g, = torch.autograd.grad((gather(table, ids) * scale).pow(2).sum(), table, create_graph=True)
        return torch.autograd.grad(g.pow(2).sum(), [table, scale])

    for got, want in zip(penalized(gather_rows), penalized(lambda t, i: t.index_select(0, i))):
        torch.testing.assert_close(got, want)
    assert torch.autograd.gradgradcheck(lambda t: gather_rows(t, ids), (table,))
