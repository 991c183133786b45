"""Every expert on every row for ReLU experts, forward and backward written out: `relu_experts(x, weights, biases)`.

The same arithmetic as `ExpertStack.forward` for activation "relu", no norm, no dropout, with the backward pass
written by hand so that it makes fewer passes over the large activations:
- forward: the first layer is one GEMM for all experts, (B, D) @ (D, E*h0), or, where oneDNN runs every
  expert's products one by one anyway (`first_layer_per_expert`: a Zen 5), one product per expert whose (B, h0)
  output the next layer and the weight gradient read as a dense matrix; every ReLU is applied by the GEMM as it
  writes its output (oneDNN) or in place on the GEMM's fresh output (MKL); autograd's ReLU writes a second tensor
  and keeps both.
- backward: the ReLU gradient is applied in place on gradients this function made itself (autograd allocates
  a new tensor for each); the gradient of the first layer's output is written by its bmm straight into the
  (B, E*h0) layout the two wide GEMMs of the first layer read (no transposing copy); where oneDNN makes the first
  layer's weight gradient, the same GEMM makes its bias gradient (x^T over a row of ones: no pass over the gradient).
- every GEMM goes through nn.cpu_gemm, which sends float32 products to oneDNN where that was measured faster than
  PyTorch's MKL (AMD CPUs with AVX-512; 2x on a Zen 5 EPYC, 1.04-1.45x on a Zen 4): the first layer's three
  GEMMs, and on a Zen 5 also the deeper layers as one oneDNN call per expert (on a Zen 4 MKL's bmm does those
  faster). With the policy set to "blas" the arithmetic is exactly ExpertStack's autograd path.
`benchmarks/expert_stack.py` measures it against autograd on the large MMoE of the throughput benchmark (E = 8,
358 -> 256 -> 128, batch 1024, 2 CPU threads): with PyTorch's own GEMMs 1-3 % on the experts with the mixture and
on the whole training step (together with ExpertStack's input-major first-layer weight); with the default GEMM
policy 1.7x on the experts and 1.6x on the step on a Zen 5, 1.13x and 1.07x on a Zen 4 (benchmarks/README.md).
In bfloat16 (ExpertStack under CPU autocast casts x and the parameters once and calls it) the same passes run in
bfloat16; on CPUs with bfloat16 instructions the first layer's products go to oneDNN (`nn.cpu_gemm`), and the
weight gradient of the strided (E, B, h0) activation is made from a contiguous copy (`benchmarks/precision.py`).
Under `create_graph=True` (a gradient penalty, a double backward) the backward is autograd's through the same
arithmetic in plain ops (`_autograd_forward`), so that the gradient it returns can be differentiated again.

Layouts: weights[l] is (E, d_l, d_{l+1}); the first layer's output is kept as (B, E*h0) and read by layer 1 as
an (E, B, h0) strided view, or as E contiguous (B, h0) matrices; deeper outputs are (E, B, h_l) contiguous; the
first layer's input and weight gradients are one wide GEMM each on a (B, E*h0) gradient either way. The result
is (B, E, H) (a transposed view of the last layer's (E, B, H) output when there are two layers or more). Being a
view of an activation the backward reads, it must not be modified in place; autograd refuses that with an error
(tested).
"""
from __future__ import annotations

import torch

from mmoe_rec.nn import cpu_gemm

_threshold_backward = torch.ops.aten.threshold_backward


def relu_experts(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor]) -> torch.Tensor:
    """x (B, D) -> (B, E, H): every expert (Linear -> ReLU per layer) on every row."""
    params = [t for pair in zip(weights, biases) for t in pair]
    return _ReluExperts.apply(x, *params)


def first_layer_matrix(w0: torch.Tensor) -> torch.Tensor:
    """(E, D, h0) -> (D, E*h0): a view when w0 is stored input-major, as ExpertStack stores it."""
    return w0.permute(1, 0, 2).reshape(w0.shape[1], -1)


def first_layer_per_expert(x: torch.Tensor, ws: list[torch.Tensor]) -> bool:
    """Whether the first layer runs as one oneDNN product per expert rather than one wide GEMM: when there is a
    deeper layer and the policy sends both layers' per-expert products to oneDNN (a Zen 5; on a Zen 4 the deeper
    layer stays in MKL's bmm). Each expert's activation is then its own contiguous (B, h0) matrix, which the
    deeper layer's products read and the weight gradient's take without the copy a column slice of the wide
    output needs: 2-3 % of the large MMoE's training step on a Zen 5 (benchmarks/expert_stack.py,
    relu_experts against relu_experts/wide; benchmarks/README.md)."""
    if len(ws) < 2 or not 0 < ws[0].shape[0] <= cpu_gemm.MAX_LOOPED_BATCH or not cpu_gemm.row_major(x):
        return False
    B, (_, D, h0), h1 = x.shape[0], ws[0].shape, ws[1].shape[2]
    return cpu_gemm.picks_onednn(x, ws[0], B * D * h0) and cpu_gemm.picks_onednn(x, ws[1], B * h0 * h1)


class _ReluExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ws, bs = params[0::2], params[1::2]
        B, E = x.shape[0], ws[0].shape[0]
        per_expert = first_layer_per_expert(x, ws)
        if per_expert:
            w0 = ws[0].contiguous()  # (E, D, h0): each expert's block dense (input-major rows are E*h0 apart)
            firsts = [cpu_gemm.addmm(bs[0][e], x, w0[e], relu=True) for e in range(E)]  # E x (B, h0)
            h = firsts
        else:
            first = cpu_gemm.addmm(bs[0].reshape(-1), x, first_layer_matrix(ws[0]), relu=True)  # (B, E*h0)
            firsts = [first]
            h = first.view(B, E, ws[0].shape[2]).transpose(0, 1)  # (E, B, h0), strided (widths explicit: B may be 0)
        acts = []
        for w, b in zip(ws[1:], bs[1:]):
            h = cpu_gemm.bmm(h, w, b, relu=True)  # (E, B, h_l)
            acts.append(h)
        ctx.save_for_backward(x, *params, *firsts, *acts)
        ctx.num_layers, ctx.per_expert = len(ws), per_expert
        return firsts[0].view(B, E, ws[0].shape[2]) if len(ws) == 1 else h.transpose(0, 1)  # (B, E, H)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if torch.is_grad_enabled():  # create_graph=True: the hand-written passes below are first derivatives only
            return _differentiable_backward(ctx, grad_out)
        L = ctx.num_layers
        x, *rest = ctx.saved_tensors
        params, rest = rest[:2 * L], rest[2 * L:]
        ws = params[0::2]
        needs = ctx.needs_input_grad  # (x, w0, b0, w1, b1, ...)
        B, E = x.shape[0], ws[0].shape[0]
        # the first layer's activation: E contiguous (B, h0) matrices, or one (B, E*h0) matrix
        firsts, acts = (rest[:E], rest[E:]) if ctx.per_expert else (rest[:1], rest[1:])
        h0 = ws[0].shape[2]
        first_ebh = firsts if ctx.per_expert else firsts[0].view(B, E, h0).transpose(0, 1)  # (E, B, h0)
        acts = [first_ebh, *acts]
        grads: list[torch.Tensor | None] = [None] * (2 * L)

        # The incoming gradient belongs to autograd: its ReLU gradient goes to a new tensor. The ones below are
        # made here and take theirs in place.
        if L == 1:
            g = _threshold_backward(grad_out.reshape(B, E * h0), firsts[0], 0)  # (B, E*h0)
        else:
            g = _threshold_backward(grad_out.transpose(0, 1), acts[-1], 0)  # (E, B, H)
        for layer in range(L - 1, 0, -1):
            below = acts[layer - 1]  # (E, B, h_{l-1}), or E (B, h0) matrices
            if needs[1 + 2 * layer]:
                grads[2 * layer] = cpu_gemm.bmm_transposed_a(below, g)  # (E, h_{l-1}, h_l)
            if needs[2 + 2 * layer]:
                grads[2 * layer + 1] = g.sum(1)  # (E, h_l)
            w_t = ws[layer].transpose(1, 2)
            if layer == 1 and ctx.per_expert:  # each expert's gradient against its own activation, then side by side
                g_each = [cpu_gemm.mm(g[e], w_t[e]) for e in range(E)]  # E x (B, h0)
                for g_e, h_e in zip(g_each, firsts):
                    _threshold_backward.grad_input(g_e, h_e, 0, grad_input=g_e)
                g = torch.stack(g_each, dim=1).view(B, E * h0)  # (B, E*h0): the layout of the wide GEMMs below
                continue
            if layer == 1:  # made in the (B, E*h0) layout of the first layer's output
                g_below = cpu_gemm.bmm(g, w_t, batch_dim=1).view(B, E * h0)
                below = firsts[0]
            else:
                g_below = cpu_gemm.bmm(g, w_t)  # (E, B, h_{l-1})
            g = _threshold_backward.grad_input(g_below, below, 0, grad_input=g_below)

        w0 = ws[0]
        D = w0.shape[1]
        if needs[1] and needs[2] and cpu_gemm.uses_onednn(x.t(), g):
            # oneDNN copies a column-major x^T into a row-major matrix anyway: made here with a row of ones below
            # it, the one GEMM also sums g's columns, the bias gradient, instead of a pass over g (B, E*h0) after the
            # GEMM has pushed it out of cache (benchmarks/README.md: the large MMoE's step on a Zen 4)
            both = cpu_gemm.mm(_transposed_over_ones(x), g)  # (D+1, E*h0)
            grads[0] = both[:D].view(D, E, h0).permute(1, 0, 2)  # (E, D, h0), input-major
            grads[1] = both[D].view(E, h0)  # (E, h0)
        else:
            if needs[1]:
                grads[0] = cpu_gemm.mm(x.t(), g).view(D, E, h0).permute(1, 0, 2)  # (E, D, h0), input-major
            if needs[2]:
                grads[1] = g.sum(0).view(E, h0)  # (E, h0)
        grad_x = cpu_gemm.mm(g, first_layer_matrix(w0).t()) if needs[0] else None  # (B, D)
        return (grad_x, *grads)


def _transposed_over_ones(x: torch.Tensor) -> torch.Tensor:
    """x (B, D) -> (D+1, B): x^T, row-major, over a row of ones."""
    B, D = x.shape
    x_t1 = torch.empty(D + 1, B, dtype=x.dtype, device=x.device)
    x_t1[:D].copy_(x.t())
    x_t1[D].fill_(1.0)
    return x_t1


def _autograd_forward(x: torch.Tensor, ws: list[torch.Tensor], bs: list[torch.Tensor]) -> torch.Tensor:
    """The forward in plain autograd ops (ExpertStack's general path for ReLU): x (B, D) -> (B, E, H)."""
    B, E = x.shape[0], ws[0].shape[0]
    h = torch.relu(torch.addmm(bs[0].reshape(-1), x, first_layer_matrix(ws[0]))).view(B, E, ws[0].shape[2])
    for w, b in zip(ws[1:], bs[1:]):
        h = torch.relu(torch.baddbmm(b.unsqueeze(1), h.transpose(0, 1), w)).transpose(0, 1)  # (B, E, h_l)
    return h


def _differentiable_backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """The input gradients as autograd makes them with create_graph=True, from the saved inputs: the forward is
    recomputed in plain ops (inside a backward that builds a graph, its cost is the least of it)."""
    L = ctx.num_layers
    x, *params = ctx.saved_tensors[:1 + 2 * L]
    inputs = [x, *params]
    wanted = [t for t, need in zip(inputs, ctx.needs_input_grad) if need]
    with torch.enable_grad():
        out = _autograd_forward(x, params[0::2], params[1::2])
        got = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=True, allow_unused=True))
    return tuple(next(got) if need else None for need in ctx.needs_input_grad)
