"""Sparse dispatch of rows to stacked experts, with no Python loop over experts in the hot path.

Experts are MLPs whose weights are stacked: layer l holds W_l (E, d_l, d_{l+1}) and b_l (E, d_{l+1}), the layout
and parameter names of the dense `nn.experts.ExpertStack`, so weights copy between them. A routing decision is a
list of N assignments (expert, source row, output row, weight); several task gates share one dispatch by giving
gate g the output rows g*T .. g*T+T-1. `plan_dispatch` lays the assignments out by expert (one stable argsort,
a bincount, a cumsum):

- padded layout: E x C slots, C = the largest expert load (in bfloat16 / float16 on the CPU rounded up to one of a
  few sizes, `few_shapes_capacity`); one `torch.bmm` per layer over (E, C, d). Padding slots point at row 0 with
  weight 0, so they cost FLOPs but change no value and no gradient.
- grouped layout: the N assignments sorted by expert, one `torch._grouped_mm` per layer (no padding). Chosen when
  experts get many rows each (per-group overhead is then negligible), this torch has the op, and (on CUDA) the
  dtype is bfloat16, the one its fast kernel takes; CUDA float32 takes the padded layout. On CPU it runs
  in blocks of whole experts of ~CPU_BLOCK_SLOTS slots, so each block's activations are still in cache when the
  next layer reads them (benchmarks/README.md, sparse MoE layer).

`ExpertDispatch` is one autograd Function: gather rows (index_select), the per-layer batched matmuls, the
weighted scatter-add back (index_add_), and a hand-written backward doing the same with bmm / grouped_mm.

Also here: capacity with dropping (`capacity_for`, `apply_capacity`), the dense "run every expert" reference path
and the naive per-expert loop, both for tests and benchmarks.
"""
from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mmoe_rec.nn import cpu_gemm
from mmoe_rec.nn.experts import NORM_EPS  # the dense experts' layer norm epsilon: the two stacks compute alike

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "identity": lambda z: z,
}
LAYOUTS = ("auto", "padded", "grouped")
HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")
# Below this many rows per expert on average the grouped matmul's per-group overhead dominates: use padded bmm.
GROUPED_MIN_ROWS_PER_EXPERT = 128
# Grouped dispatch on CPU runs in blocks of whole experts of about this many slots (see ExpertDispatch).
CPU_BLOCK_SLOTS = 4096
NORMS = ("none", "layer")


# ----------------------------------------------------------------------------------------------------------------
# Capacity


def exact_factor(factor: float | Fraction) -> Fraction:
    """A factor as the decimal it was written as (1.1 is 11/10, not 1.100000000000000088...); a Fraction as it is."""
    return factor if isinstance(factor, Fraction) else Fraction(repr(float(factor)))


def ceil_scaled(count: int, factor: float | Fraction, divisor: int) -> int:
    """ceil(count * factor / divisor), with factor taken as the decimal it was written as: in floats
    100 * 1.1 / 2 is 55.000000000000007, and its ceiling 56 would give every expert one slot too many. A product
    of factors is passed as a Fraction (exact_factor(cf) * m), since in floats 1.1 * 3 is 3.3000000000000003."""
    return math.ceil(exact_factor(factor) * count / divisor)


def check_capacity_factor(capacity_factor: float | None, name: str = "capacity_factor") -> None:
    """A finite number > 0, or None for dropless (YAML `null`; `.inf` is refused rather than taken as "no limit")."""
    if capacity_factor is not None and not (math.isfinite(capacity_factor) and capacity_factor > 0):
        raise ValueError(f"{name} must be a finite number > 0, or None (dropless), got {capacity_factor}")


def capacity_for(num_rows: int, k: int, num_experts: int, capacity_factor: float | None) -> int | None:
    """C = ceil(k * T / E * cf); None when dropless (cf None)."""
    check_capacity_factor(capacity_factor)
    if capacity_factor is None:
        return None
    return max(1, ceil_scaled(k * num_rows, capacity_factor, num_experts))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the experts compute in: autocast's where it is on for x's device and x is floating, else x's."""
    device = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def apply_capacity(chosen: torch.Tensor, num_experts: int, capacity: int | None) -> torch.Tensor:
    """Which assignments fit: (T, k) bool. Priority: all first choices (in row order), then all second choices, ...

    The position of each assignment inside its expert comes from one stable sort, no loop over experts.
    """
    T, k = chosen.shape
    if capacity is None:
        return torch.ones_like(chosen, dtype=torch.bool)
    flat = chosen.t().reshape(-1)  # (k*T,) priority order: choice rank major, row minor
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    starts = counts.cumsum(0) - counts  # (E,) first sorted index of each expert
    pos_sorted = torch.arange(flat.numel(), device=chosen.device) - starts[flat[order]]
    pos = torch.empty_like(pos_sorted)
    pos[order] = pos_sorted
    return (pos < capacity).view(k, T).t()  # (T, k)


# ----------------------------------------------------------------------------------------------------------------
# Plan


@dataclasses.dataclass
class DispatchPlan:
    """N assignments (expert, source row, output row) laid out in S slots grouped by expert."""

    slot_assign: torch.Tensor  # (S,) assignment held by each slot; N on padding slots
    rows: torch.Tensor  # (S,) int64 source row in x (0 on padding)
    out_rows: torch.Tensor  # (S,) int64 row of the output the slot adds into (0 on padding, with weight 0)
    experts: torch.Tensor  # (S,) int64 expert of each slot
    counts: torch.Tensor  # (E,) int64 assignments per expert
    capacity: int  # padded layout: slots per expert (S = E * capacity); 0 for grouped
    offsets: torch.Tensor | None  # (E,) int32 cumulative counts: grouped layout only
    num_out: int  # rows of the output (T, or G * T for G gates)

    @property
    def layout(self) -> str:
        return "grouped" if self.offsets is not None else "padded"

    @property
    def padding_fraction(self) -> float:
        s = self.rows.numel()
        return 0.0 if s == 0 else 1.0 - float(self.counts.sum()) / s

    def slot_weights(self, weights: torch.Tensor) -> torch.Tensor:
        """(N,) assignment weights -> (S,) slot weights, 0 on padding (differentiable gather)."""
        return torch.cat([weights, weights.new_zeros(1)]).index_select(0, self.slot_assign)


def plan_dispatch(experts: torch.Tensor, rows: torch.Tensor, num_experts: int, *, out_rows: torch.Tensor | None = None,
                  num_out: int | None = None, layout: str = "auto", grouped_ok: bool = True,
                  dtype: torch.dtype = torch.float32) -> DispatchPlan:
    """Lay out N assignments by expert: one stable argsort, a bincount and a cumsum; no loop over experts.

    experts, rows: (N,) int64; out_rows: (N,) output row of each assignment (default: rows), num_out rows in all.
    grouped_ok: whether the experts can run grouped (`StackedExperts.supports_grouped`); "auto" then picks grouped
    when experts average at least GROUPED_MIN_ROWS_PER_EXPERT rows and, on CUDA, the compute dtype is bfloat16
    (CUDA's grouped matmul has its fast kernel for bf16; in float32 the padded bmm was 2.8x faster on an H100,
    torch 2.11, `benchmarks/moe_layer.py --device cuda` case 1: 4.1 ms against 11.6 ms fwd+bwd); padded bmm otherwise.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown dispatch layout {layout!r}; expected one of {LAYOUTS}")
    out_rows = rows if out_rows is None else out_rows
    num_out = int(out_rows.max()) + 1 if num_out is None and out_rows.numel() else (num_out or 0)
    E, N, dev = num_experts, experts.numel(), experts.device
    order = torch.argsort(experts, stable=True)  # (N,) assignments sorted by expert, then by given order
    counts = torch.bincount(experts, minlength=E)  # (E,)
    if layout == "auto":
        fast = grouped_ok and HAS_GROUPED_MM and (dev.type != "cuda" or dtype == torch.bfloat16)
        layout = "grouped" if fast and N >= GROUPED_MIN_ROWS_PER_EXPERT * E else "padded"
    if layout == "grouped":
        if not (HAS_GROUPED_MM and grouped_ok):
            raise ValueError(f"dispatch layout 'grouped' cannot run in {dtype} here: it needs torch._grouped_mm, "
                             "float32 or bfloat16, and every width a multiple of 16 bytes (4 float32 or 8 bfloat16 "
                             "values; under bf16-mixed the experts compute in bfloat16): use 'auto' (padded where "
                             "grouped cannot run) or 'padded'")
        return DispatchPlan(order, rows[order], out_rows[order], experts[order], counts, 0,
                            counts.cumsum(0).to(torch.int32), num_out)
    cap = int(counts.max()) if N else 0
    if cap and dev.type == "cpu" and dtype in cpu_gemm.REDUCED_PRECISION:
        cap = few_shapes_capacity(cap)
    sorted_experts = experts[order]
    starts = counts.cumsum(0) - counts  # (E,) first sorted index of each expert
    slot = sorted_experts * cap + (torch.arange(N, device=dev) - starts[sorted_experts])  # (N,)
    slot_assign = torch.full((E * cap,), N, dtype=torch.long, device=dev)
    slot_assign[slot] = order
    zero = torch.zeros(1, dtype=torch.long, device=dev)
    slot_rows = torch.cat([rows, zero]).index_select(0, slot_assign)
    slot_out = slot_rows if out_rows is rows else torch.cat([out_rows, zero]).index_select(0, slot_assign)
    slot_experts = torch.arange(E, device=dev).repeat_interleave(cap)
    return DispatchPlan(slot_assign, slot_rows, slot_out, slot_experts, counts, cap, None, num_out)


def few_shapes_capacity(cap: int) -> int:
    """`cap` rounded up to a multiple of 1/8 to 1/16 of it (its 4 leading bits kept): a few padded shapes over
    training instead of one per largest load. PyTorch's reduced-precision CPU bmm builds a oneDNN kernel for each new
    shape: (16, C, 358) @ (16, 358, 256) in bfloat16 took 5.3 ms for a new C against 1.0-1.5 ms for one seen before
    (a Xeon 6 with AMX), so a sparse model under bf16-mixed built kernels every step. At most 1/8 more slots."""
    step = 1 << max(0, cap.bit_length() - 4)
    return -(-cap // step) * step


# ----------------------------------------------------------------------------------------------------------------
# The autograd Function


def _layer_mm(h: torch.Tensor, w: torch.Tensor, plan_cap: int, offsets: torch.Tensor | None) -> torch.Tensor:
    """(S, a) rows grouped by expert @ (E, a, b) -> (S, b)."""
    if offsets is not None:
        return torch._grouped_mm(h, w, offs=offsets)
    E = w.shape[0]
    return torch.bmm(h.view(E, plan_cap, h.shape[1]), w).view(E * plan_cap, w.shape[2])


def _weight_grad(h: torch.Tensor, g: torch.Tensor, plan_cap: int, offsets: torch.Tensor | None, E: int) -> torch.Tensor:
    """dW = h^T g per expert: (S, a), (S, b) -> (E, a, b)."""
    if offsets is not None:
        return torch._grouped_mm(h.t(), g, offs=offsets)
    return torch.bmm(h.view(E, plan_cap, h.shape[1]).transpose(1, 2), g.view(E, plan_cap, g.shape[1]))


def expert_blocks(offsets: torch.Tensor | None, num_slots: int, num_experts: int,
                  block_slots: int) -> list[tuple[int, int, int, int]]:
    """Split the slots into blocks of whole experts, (e0, e1, s0, s1) each: experts [e0, e1) own slots [s0, s1).

    Grouped layout only (offsets = cumulative slot counts); a block closes at the first expert that starts at or
    past the next multiple of block_slots. One block for the padded layout or block_slots <= 0.
    """
    if offsets is None or block_slots <= 0 or num_slots <= block_slots:
        return [(0, num_experts, 0, num_slots)]
    ends = offsets.long()
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])  # (E,) first slot of each expert
    window = starts // block_slots
    firsts = [0, *(torch.nonzero(window[1:] != window[:-1]).flatten() + 1).tolist()]  # experts opening a block
    bounds = starts[firsts].tolist() + [num_slots]
    return [(e0, e1, bounds[i], bounds[i + 1])
            for i, (e0, e1) in enumerate(zip(firsts, firsts[1:] + [num_experts]))]


def _per_expert_affine(t: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor | None, experts: torch.Tensor,
                       E: int, capacity: int, grouped: bool) -> torch.Tensor:
    """t * gamma[e(s)] (+ beta[e(s)]) per slot: (s, b), gamma / beta (E, b) -> (s, b)."""
    if grouped:
        g = gamma.index_select(0, experts)
        return g.mul_(t) if beta is None else torch.addcmul(beta.index_select(0, experts), t, g)
    shaped = t.view(E, capacity, t.shape[1])
    out = shaped * gamma.unsqueeze(1) if beta is None else torch.addcmul(beta.unsqueeze(1), shaped, gamma.unsqueeze(1))
    return out.view(t.shape)


def _per_expert_sum(t: torch.Tensor, experts: torch.Tensor, E: int, capacity: int, grouped: bool) -> torch.Tensor:
    """Sum of the slots' rows per expert: (s, b) -> (E, b); experts counted from 0 within the block."""
    if grouped:
        return t.new_zeros(E, t.shape[1]).index_add_(0, experts, t)
    return t.view(E, capacity, t.shape[1]).sum(1)


def _cleared(t: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
    """`t` (s, d) with the rows of padding slots (`pad` (s, 1) True) set to 0; `t` itself where `pad` is None."""
    return t if pad is None else t.masked_fill(pad, 0.0)


class ExpertDispatch(torch.autograd.Function):
    """out[out_row(s)] += slot_w[s] * expert_{e(s)}(x[row(s)]) over all slots s. Shapes:

    x (T, d); slot_w, rows, out_rows, experts (S,); params = W_0, b_0, W_1, b_1, ... with W_l (E, d_l, d_l+1).
    Returns (num_out, D). Backward: the same gathers / batched matmuls / scatters, nothing per expert in Python.

    The grouped layout runs in blocks of whole experts of about `block_slots` slots (a few per call, not one per
    expert): each block's gathered rows and activations are made, used and saved while they are still in cache,
    instead of every layer streaming (S, d) tensors through memory.
    """

    @staticmethod
    def forward(ctx, x, slot_w, rows, out_rows, experts, offsets, capacity, num_out, activation, activate_last,
                dropout, norm, block_slots, num_layers, *params):
        L = num_layers
        n_act = L if activate_last else L - 1  # activated (and, with norm, normalized) layers: the first n_act
        E = params[0].shape[0]
        norm_params = params[2 * L :]  # gamma_0, beta_0, gamma_1, ... for the normalized (activated) layers
        act = ACTIVATIONS[activation]
        blocks = expert_blocks(offsets, rows.numel(), E, block_slots)
        out = x.new_zeros(num_out, params[2 * L - 2].shape[-1])
        saved: list[torch.Tensor] = []  # per block: L layer inputs, L activations, y, norm (x_hat, rstd)s, masks
        for e0, e1, s0, s1 in blocks:
            offs = None if offsets is None else offsets[e0:e1] - s0
            h = x.index_select(0, rows[s0:s1])  # (s, d)
            ins, acts, normed, masks = [], [], [], []
            for layer in range(L):
                w, b = params[2 * layer][e0:e1], params[2 * layer + 1]
                ins.append(h)
                z = _layer_mm(h, w, capacity, offs)  # (s, d_l+1)
                if offs is not None:
                    z += b.index_select(0, experts[s0:s1])
                else:
                    z.view(E, capacity, z.shape[1]).add_(b.unsqueeze(1))
                if norm and layer < n_act:  # layer norm per row, affine per expert
                    # the row statistics in float32, as F.layer_norm takes them: a float16 variance overflows for
                    # deviations near 256 (rstd 0, the row zeroed); bfloat16's loses digits
                    zs = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
                    rstd = torch.rsqrt(zs.var(1, unbiased=False, keepdim=True) + NORM_EPS)  # (s, 1)
                    x_hat = (zs - zs.mean(1, keepdim=True)).mul_(rstd).to(z.dtype)
                    rstd = rstd.to(z.dtype)
                    gamma, beta = norm_params[2 * layer], norm_params[2 * layer + 1]  # (E, d_l+1)
                    z = _per_expert_affine(x_hat, gamma, beta, experts[s0:s1], E, capacity, offs is not None)
                    normed += [x_hat, rstd]
                if layer < n_act:
                    if activation == "relu":
                        h = z.relu_()
                        if dropout > 0:  # after a ReLU the kept mask is (h > 0): nothing more to save
                            F.dropout(h, dropout, training=True, inplace=True)
                        acts.append(h)
                    else:
                        h = act(z)
                        acts.append(z)
                        if dropout > 0:
                            mask = torch.empty_like(h).bernoulli_(1.0 - dropout).div_(1.0 - dropout)
                            h = h.mul_(mask)
                            masks.append(mask)
                else:
                    h = z
                    acts.append(torch.empty(0))
            w = slot_w[s0:s1].unsqueeze(1)  # (s, 1)
            # a padding slot (weight 0) ran its expert on row 0: 0 * y is NaN where y overflowed (float16), which
            # would make row 0's output NaN though row 0 never chose that expert; a 0 weight adds exactly 0
            out.index_add_(0, out_rows[s0:s1], torch.where(w != 0, h * w, 0.0))  # h is y (s, D) now
            saved += [*ins, *acts, h, *normed, *masks]
        ctx.meta = (capacity, activation, activate_last, L, E, dropout, norm, blocks)
        ctx.save_for_backward(x, slot_w, rows, out_rows, experts, offsets if offsets is not None else torch.empty(0),
                              *params, *saved)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        capacity, activation, activate_last, L, E, dropout, norm, blocks = ctx.meta
        saved = ctx.saved_tensors
        x, slot_w, rows, out_rows, experts, offsets = saved[:6]
        offsets = offsets if offsets.numel() else None  # saved as an empty tensor for the padded layout
        n_act = L if activate_last else L - 1  # activated (and, with norm, normalized) layers: the first n_act
        n_norm = 2 * n_act if norm else 0  # norm parameters, and per block the saved (x_hat, rstd) pairs
        n_params = 2 * L + n_norm
        params = saved[6 : 6 + n_params]
        per_block = saved[6 + n_params :]
        n_masks = n_act if dropout > 0 and activation != "relu" else 0
        stride = 2 * L + 1 + n_norm + n_masks

        grad_x = x.new_zeros(x.shape) if ctx.needs_input_grad[0] else None
        grad_w = slot_w.new_empty(slot_w.shape) if ctx.needs_input_grad[1] else None
        param_grads = [torch.empty_like(p) for p in params]
        for i, (e0, e1, s0, s1) in enumerate(blocks):
            block = per_block[i * stride : (i + 1) * stride]
            ins, acts, y = block[:L], block[L : 2 * L], block[2 * L]
            normed, masks = block[2 * L + 1 : 2 * L + 1 + n_norm], list(block[2 * L + 1 + n_norm :])
            offs = None if offsets is None else offsets[e0:e1] - s0
            grouped, ex, local = offs is not None, experts[s0:s1], experts[s0:s1] - e0  # local: ids within the block
            gy = grad_out.index_select(0, out_rows[s0:s1])  # (s, D) gradient of each slot's weighted output
            if grad_w is not None:
                grad_w[s0:s1] = torch.linalg.vecdot(gy, y)  # one fused pass
            gy.mul_(slot_w[s0:s1].unsqueeze(1))  # padding slots: weight 0, so no gradient flows from them anywhere
            # ... but their saved activations may be inf (float16 overflows on row 0, which never chose that
            # expert), and 0 * inf is NaN: NaN weight gradients, and with norm or a smooth activation NaN in row 0's
            # input gradient. Cleared where they meet (float16 alone: the other types do not overflow there).
            pad = (slot_w[s0:s1] == 0).unsqueeze(1) if y.dtype == torch.float16 else None  # (s, 1)
            for layer in reversed(range(L)):
                w = params[2 * layer][e0:e1]
                if layer < n_act:
                    a = acts[layer]
                    if activation == "relu":
                        # gy is ours (gathered or computed here): its ReLU gradient is taken in place
                        torch.ops.aten.threshold_backward.grad_input(gy, a, 0.0, grad_input=gy)  # a: after dropout
                        if dropout > 0:
                            gy.mul_(1.0 / (1.0 - dropout))
                    else:
                        if dropout > 0:
                            gy = gy * masks.pop()
                        with torch.enable_grad():
                            z = a.detach().requires_grad_(True)
                            (gy,) = torch.autograd.grad(ACTIVATIONS[activation](z), z, gy)
                        gy = _cleared(gy, pad)
                    if norm:  # back through gamma * x_hat + beta and the row normalization
                        x_hat, rstd = normed[2 * layer], normed[2 * layer + 1]
                        gamma = params[2 * L + 2 * layer]
                        param_grads[2 * L + 2 * layer][e0:e1] = _per_expert_sum(gy * _cleared(x_hat, pad), local,
                                                                                e1 - e0, capacity, grouped)
                        param_grads[2 * L + 2 * layer + 1][e0:e1] = _per_expert_sum(gy, local, e1 - e0, capacity,
                                                                                    grouped)
                        g_hat = _per_expert_affine(gy, gamma, None, ex, E, capacity, grouped)
                        gy = _cleared(rstd * (g_hat - g_hat.mean(1, keepdim=True)
                                              - x_hat * (g_hat * x_hat).mean(1, keepdim=True)), pad)
                param_grads[2 * layer][e0:e1] = _weight_grad(_cleared(ins[layer], pad), gy, capacity, offs, e1 - e0)
                param_grads[2 * layer + 1][e0:e1] = _per_expert_sum(gy, local, e1 - e0, capacity, grouped)
                if layer > 0 or grad_x is not None:
                    gy = _layer_mm(gy, w.transpose(1, 2), capacity, offs)  # (s, d_l)
            if grad_x is not None:
                grad_x.index_add_(0, rows[s0:s1], gy)
        return (grad_x, grad_w, None, None, None, None, None, None, None, None, None, None, None, None,
                *param_grads)


# ----------------------------------------------------------------------------------------------------------------
# The stacked experts and their three compute paths


class StackedExperts(nn.Module):
    """E expert MLPs d_in -> hidden[0] -> ... -> hidden[-1], weights stacked as (E, d_l, d_l+1).

    Every activated layer (all but the last unless activate_last) is Linear -> norm -> activation -> dropout, as
    in `nn.experts.ExpertStack`, with the same parameter names. norm: "none" or "layer" (each row normalized,
    then a per-(expert, channel) affine). Batch norm is not offered: its statistics would be over each expert's
    routed rows, which change with the routing. Dropout in training only. Init as nn.Linear, per expert.
    """

    def __init__(self, num_experts: int, d_in: int, hidden: list[int] | tuple[int, ...], activation: str = "relu",
                 activate_last: bool = True, dropout: float = 0.0, norm: str = "none") -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not hidden:
            raise ValueError("experts need at least one layer (hidden sizes may not be empty)")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if norm not in NORMS:
            raise ValueError(f"sparse experts take norm in {NORMS}, got {norm!r} (batch statistics per expert "
                             "would follow the routing)")
        self.num_experts = num_experts
        self.activation = activation
        self.activate_last = activate_last
        self.dropout = float(dropout)
        self.norm = norm
        dims = [d_in, *hidden]
        self.weights = nn.ParameterList(nn.Parameter(torch.empty(num_experts, a, b)) for a, b in zip(dims, dims[1:]))
        self.biases = nn.ParameterList(nn.Parameter(torch.empty(num_experts, b)) for b in dims[1:])
        normed = dims[1:] if activate_last else dims[1:-1]  # widths of the activated layers
        self.norm_weights = nn.ParameterList(nn.Parameter(torch.empty(num_experts, b)) for b in normed) \
            if norm == "layer" else None
        self.norm_biases = nn.ParameterList(nn.Parameter(torch.empty(num_experts, b)) for b in normed) \
            if norm == "layer" else None
        self.reset_parameters()

    @property
    def out_dim(self) -> int:
        return self.weights[-1].shape[-1]

    def reset_parameters(self) -> None:
        for w, b in zip(self.weights, self.biases):
            bound = 1.0 / math.sqrt(w.shape[1])  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)
        if self.norm_weights is not None:
            for g, beta in zip(self.norm_weights, self.norm_biases):
                nn.init.ones_(g)
                nn.init.zeros_(beta)

    def supports_grouped(self, dtype: torch.dtype) -> bool:
        """torch._grouped_mm takes float32 / bfloat16 with rows 16-byte aligned: widths divisible by 16 bytes."""
        if not HAS_GROUPED_MM or dtype not in (torch.float32, torch.bfloat16):
            return False
        per_16_bytes = 16 // torch.empty((), dtype=dtype).element_size()
        widths = [self.weights[0].shape[1], *(w.shape[2] for w in self.weights)]
        return all(n % per_16_bytes == 0 for n in widths)

    def plan(self, experts: torch.Tensor, rows: torch.Tensor, *, out_rows: torch.Tensor | None = None,
             num_out: int | None = None, layout: str = "auto", dtype: torch.dtype = torch.float32) -> DispatchPlan:
        return plan_dispatch(experts, rows, self.num_experts, out_rows=out_rows, num_out=num_out, layout=layout,
                             grouped_ok=self.supports_grouped(dtype), dtype=dtype)

    def _params(self) -> list[torch.Tensor]:
        """W_0, b_0, W_1, b_1, ..., then the norm's gamma_0, beta_0, ... (ExpertDispatch's parameter order)."""
        params = [t for pair in zip(self.weights, self.biases) for t in pair]
        if self.norm_weights is not None:
            params += [t for pair in zip(self.norm_weights, self.norm_biases) for t in pair]
        return params

    def _act(self, z: torch.Tensor, layer: int, expert: int | None = None) -> torch.Tensor:
        """Norm, activation, dropout of layer `layer` on z: (E, T, b) for all experts, or (T, b) for `expert`."""
        if not (layer < len(self.weights) - 1 or self.activate_last):
            return z
        if self.norm_weights is not None:
            g, beta = self.norm_weights[layer], self.norm_biases[layer]
            g, beta = (g.unsqueeze(1), beta.unsqueeze(1)) if expert is None else (g[expert], beta[expert])
            z = F.layer_norm(z, z.shape[-1:], eps=NORM_EPS) * g + beta
        return F.dropout(ACTIVATIONS[self.activation](z), self.dropout, training=self.training)

    def forward(self, x: torch.Tensor, plan: DispatchPlan, weights: torch.Tensor) -> torch.Tensor:
        """Vectorized sparse path. x (T, d); weights (N,) per assignment -> (num_out, D), in `compute_dtype(x)`.

        Under autocast the experts run in autocast's dtype: x, the weights and the parameters are cast once here
        (the casts are differentiable, so float32 parameters get float32 gradients) and the custom function runs
        with autocast off, so that its forward and backward see one dtype throughout."""
        device = x.device.type
        dtype = compute_dtype(x)
        if plan.layout == "grouped" and not self.supports_grouped(dtype):
            raise ValueError(f"dispatch layout 'grouped' cannot run in {dtype} with these widths (a multiple of 16 "
                             "bytes each: 4 float32 or 8 bfloat16 values): use 'auto' or 'padded'")
        params = [p.to(dtype) for p in self._params()]
        with torch.autocast(device_type=device, enabled=False):
            slot_w = plan.slot_weights(weights.to(dtype))  # (S,)
            return ExpertDispatch.apply(x.to(dtype), slot_w, plan.rows, plan.out_rows, plan.experts, plan.offsets,
                                        plan.capacity, plan.num_out, self.activation, self.activate_last,
                                        self.dropout if self.training else 0.0, self.norm == "layer",
                                        CPU_BLOCK_SLOTS if device == "cpu" else 0, len(self.weights), *params)

    def forward_all(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on every row: (T, d) -> (E, T, D). Reference path (E/k times the FLOPs)."""
        E, T = self.num_experts, x.shape[0]
        w0 = self.weights[0].permute(1, 0, 2).reshape(x.shape[1], -1)  # (d, E*h): all first layers in one GEMM
        h0 = w0.shape[1] // E  # widths explicit, not -1: T may be 0
        h = self._act(torch.addmm(self.biases[0].reshape(-1), x, w0).view(T, E, h0).transpose(0, 1), 0)  # (E, T, h)
        for layer in range(1, len(self.weights)):
            w, b = self.weights[layer], self.biases[layer]
            h = self._act(torch.baddbmm(b.unsqueeze(1), h, w), layer)  # (E, T, d_l+1)
        return h

    def forward_dense(self, x: torch.Tensor, combine: torch.Tensor) -> torch.Tensor:
        """Dense reference: run all experts, mix with combine (..., T, E) -> (..., T, D)."""
        return torch.einsum("...te,etd->...td", combine.to(x.dtype), self.forward_all(x))

    def forward_loop(self, x: torch.Tensor, experts: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor,
                     out_rows: torch.Tensor | None = None, num_out: int | None = None) -> torch.Tensor:
        """Naive reference over the same N assignments: per expert mask -> index -> matmuls -> index_add.

        Each expert's weights are taken by one `unbind` per layer, as a loop over per-expert modules would hold
        them: indexing the stacked tensor per expert (`w[e]`) would make the backward write a full-size zero
        gradient per expert and layer (4 GB a step in benchmarks/moe_layer.py's case 1), a handicap no naive
        implementation with per-expert weights has."""
        out_rows = rows if out_rows is None else out_rows
        out = x.new_zeros(x.shape[0] if num_out is None else num_out, self.out_dim)
        per_expert = [(w.unbind(0), b.unbind(0)) for w, b in zip(self.weights, self.biases)]  # layer -> E views
        for e in range(self.num_experts):
            sel = (experts == e).nonzero().squeeze(1)
            if sel.numel() == 0:
                continue
            h = x.index_select(0, rows.index_select(0, sel))
            for layer, (ws, bs) in enumerate(per_expert):
                h = self._act(h @ ws[e] + bs[e], layer, e)
            w = weights.index_select(0, sel).unsqueeze(1).to(x.dtype)
            out.index_add_(0, out_rows.index_select(0, sel), h * w)  # in place: autograd records it
        return out
