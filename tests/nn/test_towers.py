"""Tower: the output layer computes in float32 under bf16 (autocast or bf16 weights), so scores do not tie."""
import torch

from mmoe_rec.nn.towers import Tower, make_towers


def test_under_bf16_autocast_the_logits_are_float32_and_do_not_tie():
    """A bf16 logit keeps 8 bits of mantissa: a bf16-mixed predict gave 151 distinct scores in 2,057 rows."""
    torch.manual_seed(0)
    tower = Tower(32, [16])
    x = torch.randn(2048, 32)
    reference = tower(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = tower(x)
    assert logits.dtype == torch.float32
    assert len(torch.unique(logits)) > 0.99 * len(x)
    torch.testing.assert_close(logits, reference, rtol=0.05, atol=0.05)  # the hidden layer still ran in bf16
    # Tight: the output layer is exactly a float32 Linear (bias included) on the bf16 hidden activations that
    # autocast gives; the loose check above cannot see a dropped output bias (0.034 at this seed).
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = tower.mlp(x)
    assert hidden.dtype == torch.bfloat16  # what the float32 output layer reads
    w, b = tower.out.weight.detach().double(), tower.out.bias.detach().double()
    want = (hidden.double() @ w.t() + b).squeeze(-1)
    torch.testing.assert_close(logits.double(), want, rtol=1e-5, atol=1e-6)
    # and the bias enters as it is: a large known bias shifts every logit by exactly that much more
    with torch.no_grad():
        tower.out.bias.fill_(3.0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            shifted = tower(x)
    assert shifted.dtype == torch.float32
    torch.testing.assert_close(shifted.double(), want - b + 3.0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shifted - logits, torch.full_like(logits, 3.0 - float(b)), rtol=0, atol=1e-5)


def test_a_bf16_tower_gives_float32_logits_and_bf16_gradients():
    torch.manual_seed(0)
    tower = Tower(8, []).to(torch.bfloat16)  # one Linear: every row its own logit
    x = torch.randn(64, 8, dtype=torch.bfloat16)
    logits = tower(x)
    assert logits.dtype == torch.float32 and len(torch.unique(logits)) > 60
    # exactly the float32 Linear on the bf16 input and weights, bias included (a float32 logit, not a bf16 one)
    w, b = tower.out.weight.detach().double(), tower.out.bias.detach().double()
    torch.testing.assert_close(logits.double(), (x.double() @ w.t() + b).squeeze(-1), rtol=1e-5, atol=1e-6)
    logits.sum().backward()
    assert tower.out.weight.grad.dtype == torch.bfloat16 and tower.out.weight.grad.abs().sum() > 0


def test_a_towers_dropout_and_norm_are_applied():
    """Tower dropout and the towers' norm were silently droppable (a review's mutations survived every test)."""
    torch.manual_seed(0)
    tower = Tower(8, [64], dropout=0.5).train()
    x = torch.randn(4, 8)
    assert not torch.equal(tower(x), tower(x))
    assert torch.equal(tower.eval()(x), tower(x))
    towers = make_towers(["a"], 8, [16], norm="layer")
    assert any(isinstance(m, torch.nn.LayerNorm) for m in towers.modules())


def test_a_tower_without_hidden_layers_gives_float32_logits_under_bf16_autocast():
    """With hidden = [] the tower's input is the float32 mixture, not a bf16 activation: the output layer must still
    leave autocast (a bf16 Linear rounds every logit to 8 bits of mantissa and ties the scores)."""
    torch.manual_seed(0)
    tower = Tower(32, [])
    x = torch.randn(2048, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = tower(x)
    assert logits.dtype == torch.float32
    assert len(torch.unique(logits)) > 0.99 * len(x)
    torch.testing.assert_close(logits, tower(x), rtol=1e-5, atol=1e-6)
