"""ExpertStack: E expert MLPs of one shape, evaluated together as batched matmuls.

Layer l holds W_l (E, d_l, d_{l+1}) and b_l (E, d_{l+1}): the layout of `nn.dispatch.StackedExperts`, and the
same parameter names (`weights`, `biases`), so weights copy between the dense and the sparse experts. W_0 is
stored input-major in memory ((D, E, h0) strides, seen as (E, D, h0)) so that the first layer's wide GEMM reads
it without a copy.
Each layer is Linear -> norm -> activation -> dropout, like `nn.mlp.MLP`, the last layer activated too.

Compute paths:
- `forward(x)`: every expert on every row of one shared input, (B, D) -> (B, E, H). The first layer is ONE
  GEMM (B, D) @ (D, E*h) for all experts; deeper layers are one `baddbmm` over E each. ReLU experts without
  norm or dropout on the CPU go through `nn.relu_experts` (the same arithmetic, backward written by hand, GEMMs
  through `nn.cpu_gemm`: on AMD CPUs with AVX-512 the first layer in oneDNN, on a Zen 5 every layer as one
  oneDNN call per expert, twice MKL's batched rate there, the first layer's backward GEMMs still wide; elsewhere
  one bmm per layer, no Python loop over experts). Under CPU autocast to bfloat16 (`--trainer.precision
  bf16-mixed`) the same path runs in bfloat16, its operands cast once (2x the float32 step on a Xeon 6 with AMX).
- `forward_each(xs)`: each expert on its own rows, (E', N, D) -> (E', N, H): PLE's upper levels (each expert
  reads its task's input) and per-expert / padded sparse dispatch; `experts` picks a subset of the E experts.
- `forward_one(x, e)`: expert e alone, (N, D) -> (N, H).

Init: every expert's weights are drawn independently, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as nn.Linear does:
experts that start identical get identical gradients under a symmetric gate and never separate (an
"expert collapse" reported against peer libraries).

Norm per (expert, channel): "layer" normalizes each expert's output vector with its own affine; "batch" keeps
running statistics per (expert, channel) over the rows that expert saw.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmoe_rec.nn.mlp import check_activation, check_dropout, check_norm
from mmoe_rec.nn.relu_experts import first_layer_matrix, relu_experts

BN_MOMENTUM = 0.1  # as nn.BatchNorm1d
NORM_EPS = 1e-5


class ExpertStack(nn.Module):
    def __init__(
        self,
        num_experts: int,
        in_dim: int,
        hidden: list[int] | tuple[int, ...],
        *,
        activation: str = "relu",
        dropout: float = 0.0,
        norm: str = "none",
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not hidden or in_dim < 1 or any(h < 1 for h in hidden):
            raise ValueError(f"experts need at least one layer of width >= 1: in_dim={in_dim}, hidden={list(hidden)}")
        self.num_experts = num_experts
        self.in_dim = in_dim
        self.activation = check_activation(activation)
        self.dropout = check_dropout(dropout)
        self.norm = check_norm(norm)
        dims = [in_dim, *hidden]
        E = num_experts
        # The first layer's weight is stored input-major, (D, E, h0) in memory, and seen as (E, D, h0): its
        # (D, E*h0) matrix for the one wide GEMM is then a view, not a copy per step.
        self.weights = nn.ParameterList([nn.Parameter(torch.empty(in_dim, E, dims[1]).permute(1, 0, 2))])
        self.weights.extend(nn.Parameter(torch.empty(E, a, b)) for a, b in zip(dims[1:], dims[2:]))
        self.biases = nn.ParameterList(nn.Parameter(torch.empty(E, b)) for b in dims[1:])
        widths = dims[1:]
        # Per-(expert, channel) extras: PReLU slopes, norm affine, batch-norm running statistics.
        self.slopes = nn.ParameterList(nn.Parameter(torch.empty(E, b)) for b in widths) if activation == "prelu" else None
        self.norm_weights = nn.ParameterList(nn.Parameter(torch.empty(E, b)) for b in widths) if norm != "none" else None
        self.norm_biases = nn.ParameterList(nn.Parameter(torch.empty(E, b)) for b in widths) if norm != "none" else None
        if norm == "batch":
            for i, b in enumerate(widths):
                self.register_buffer(f"running_mean_{i}", torch.zeros(E, b))
                self.register_buffer(f"running_var_{i}", torch.ones(E, b))
        self.reset_parameters()

    @property
    def output_dim(self) -> int:
        return self.weights[-1].shape[-1]

    out_dim = output_dim  # the name nn.dispatch.StackedExperts uses

    @property
    def num_layers(self) -> int:
        return len(self.weights)

    def reset_parameters(self) -> None:
        # One draw over the whole (E, a, b) tensor: every expert gets its own independent sample.
        for w, b in zip(self.weights, self.biases):
            bound = 1.0 / math.sqrt(w.shape[1])
            with torch.no_grad():  # drawn in (E, d, h) order whatever the memory layout: same values per seed
                w.copy_(torch.empty(w.shape, dtype=w.dtype, device=w.device).uniform_(-bound, bound))
            nn.init.uniform_(b, -bound, bound)
        if self.slopes is not None:
            for a in self.slopes:
                nn.init.constant_(a, 0.25)  # nn.PReLU's default
        if self.norm_weights is not None:
            for g, beta in zip(self.norm_weights, self.norm_biases):
                nn.init.ones_(g)
                nn.init.zeros_(beta)
        if self.norm == "batch":
            for i in range(self.num_layers):
                getattr(self, f"running_mean_{i}").zero_()
                getattr(self, f"running_var_{i}").fill_(1.0)

    # ------------------------------------------------------------------------------------------------------------

    def _post(self, z: torch.Tensor, layer: int, idx: torch.Tensor | None) -> torch.Tensor:
        """Norm, activation, dropout on z (N, E', b): rows first, experts second (idx: which experts, None = all)."""

        def per_expert(p: torch.Tensor) -> torch.Tensor:  # (E, b) -> (E', b), broadcasts over rows
            return p if idx is None else p.index_select(0, idx)

        if self.norm == "layer":
            z = F.layer_norm(z, z.shape[-1:], eps=NORM_EPS)
            z = z * per_expert(self.norm_weights[layer]) + per_expert(self.norm_biases[layer])
        elif self.norm == "batch":
            z = self._batch_norm(z, layer, idx)
            z = z * per_expert(self.norm_weights[layer]) + per_expert(self.norm_biases[layer])
        if self.activation == "relu":
            z = torch.relu(z)
        elif self.activation == "gelu":
            z = F.gelu(z)
        elif self.activation == "silu":
            z = F.silu(z)
        elif self.activation == "tanh":
            z = torch.tanh(z)
        else:  # prelu
            z = torch.where(z >= 0, z, per_expert(self.slopes[layer]) * z)
        if self.dropout > 0 and self.training:
            z = F.dropout(z, self.dropout, training=True)
        return z

    def _batch_norm(self, z: torch.Tensor, layer: int, idx: torch.Tensor | None) -> torch.Tensor:
        """Statistics per (expert, channel) over the rows (dim 0); running statistics updated only for idx."""
        running_mean = getattr(self, f"running_mean_{layer}")
        running_var = getattr(self, f"running_var_{layer}")
        if self.training:
            if z.shape[0] < 2:
                raise ValueError("batch norm in training needs at least 2 rows per expert")
            mean = z.mean(0)  # (E', b)
            var = z.var(0, unbiased=False)
            with torch.no_grad():
                n = z.shape[0]
                new_mean = (1 - BN_MOMENTUM) * _rows(running_mean, idx) + BN_MOMENTUM * mean
                new_var = (1 - BN_MOMENTUM) * _rows(running_var, idx) + BN_MOMENTUM * var * n / (n - 1)
                if idx is None:
                    running_mean.copy_(new_mean)
                    running_var.copy_(new_var)
                else:
                    running_mean.index_copy_(0, idx, new_mean)
                    running_var.index_copy_(0, idx, new_var)
        else:
            mean, var = _rows(running_mean, idx), _rows(running_var, idx)
        return (z - mean) * torch.rsqrt(var + NORM_EPS)

    # ------------------------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on every row: x (B, D) -> (B, E, H)."""
        if x.dim() != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"expected input (B, {self.in_dim}), got {tuple(x.shape)}")
        dtype = self._relu_fast_path_dtype(x)
        if dtype is not None:
            # under bfloat16 autocast the operands are cast once here, to what autocast would make of every
            # product; without it every operand has `dtype` already and `.to` returns it as it is
            with torch.autocast("cpu", enabled=False):
                return relu_experts(x.to(dtype), [w.to(dtype) for w in self.weights],
                                    [b.to(dtype) for b in self.biases])
        B, E = x.shape[0], self.num_experts
        w0, b0 = self.weights[0], self.biases[0]
        # One GEMM for the first layer of all experts: (B, D) @ (D, E*h) -> (B, E*h).
        w_flat = first_layer_matrix(w0)  # (D, E*h), a view (w0 is stored input-major)
        h = torch.addmm(b0.reshape(-1), x, w_flat).view(B, E, w0.shape[2])  # (B, E, h) (B may be 0)
        h = self._post(h, 0, None)
        for layer in range(1, self.num_layers):
            w, b = self.weights[layer], self.biases[layer]
            z = torch.baddbmm(b.unsqueeze(1), h.transpose(0, 1), w)  # (E, B, h') one bmm for all experts
            h = self._post(z.transpose(0, 1), layer, None)  # (B, E, h')
        return h  # (B, E, H)

    def _relu_fast_path_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The dtype nn.relu_experts runs in where it computes what the autograd path would, with fewer memory
        passes (None: not here). ReLU experts without norm or active dropout, on the CPU (where it was measured):
        without autocast, x's dtype when every parameter has it; under CPU autocast to bfloat16, bfloat16 for
        float32 or bfloat16 inputs and parameters (autocast casts each product's operands to it, as this path
        casts them once). Other autocast dtypes keep the autograd path: not measured."""
        if not (self.activation == "relu" and self.norm == "none" and (self.dropout == 0 or not self.training)
                and x.device.type == "cpu"):
            return None
        if torch.is_autocast_enabled("cpu"):
            autocast_to = torch.get_autocast_dtype("cpu")
            castable = (torch.float32, autocast_to)
            if autocast_to == torch.bfloat16 and x.dtype in castable and all(
                    p.dtype in castable for p in self.parameters()):
                return autocast_to
            return None
        return x.dtype if all(p.dtype == x.dtype for p in self.parameters()) else None

    def forward_each(self, xs: torch.Tensor, experts: torch.Tensor | None = None) -> torch.Tensor:
        """Each expert on its own rows: xs (E', N, D) -> (E', N, H); experts: (E',) int64 indices (None = all E)."""
        n_exp = self.num_experts if experts is None else experts.numel()
        if xs.dim() != 3 or xs.shape[0] != n_exp or xs.shape[2] != self.in_dim:
            raise ValueError(f"expected input ({n_exp}, N, {self.in_dim}), got {tuple(xs.shape)}")
        h = xs
        for layer in range(self.num_layers):
            w, b = _rows(self.weights[layer], experts), _rows(self.biases[layer], experts)
            z = torch.baddbmm(b.unsqueeze(1), h, w)  # (E', N, h')
            h = self._post(z.transpose(0, 1), layer, experts).transpose(0, 1)
        return h  # (E', N, H)

    def forward_one(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """Expert `expert` alone: x (N, D) -> (N, H)."""
        if not 0 <= expert < self.num_experts:
            raise IndexError(f"expert {expert} out of range [0, {self.num_experts})")
        idx = torch.tensor([expert], device=x.device)
        return self.forward_each(x.unsqueeze(0), idx)[0]

    def expert_parameters(self, expert: int) -> dict[str, torch.Tensor]:
        """Views of one expert's parameters, e.g. {"weights.0": (d_in, h), "biases.0": (h,), ...}."""
        return {name: p[expert] for name, p in self.named_parameters()}


def _rows(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    return t if idx is None else t.index_select(0, idx)
