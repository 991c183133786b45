"""Noisy top-k gating (Shazeer et al. 2017).

H(x) = x·W_g + N(0,1) * softplus(x·W_noise), noise only in training. The k largest H (plus the loss-free bias, if
any) are chosen. Combine weights: softmax over the k chosen noisy logits, g(x) = softmax(KeepTopK(H(x), k)).

`normalize` accepts two names for this one rule: "topk_softmax" (the paper's) and "softmax_topk" (softmax over
all E, keep the chosen, renormalise to sum 1). They are the same function of the same noisy logits: the softmax's
normaliser over all E cancels in the renormalisation, leaving exp(H_i) / sum over the chosen of exp(H_j). Both
names are accepted so that existing configs still load; both run the first form.

With k = 1 that weight is the constant 1 and the router would get no gradient from the task loss. For k = 1 the
weight is therefore the raw probability softmax(H)_i over all E experts, as Switch does.

Initialisation: the paper starts W_g and W_noise at zero, which is symmetric: only the training noise breaks the
ties. With noise off (and at evaluation before training) all logits tie and every row would pick experts 0..k-1.
init="auto" therefore takes zeros when noise is on and a small normal init when it is off; init="zeros" with
noise=False is refused. Ties that remain go to the lower expert index (`top_indices`), deterministically.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmoe_rec.nn.routing import Routing
from mmoe_rec.nn.routing.loss_free import LossFreeBias
from mmoe_rec.nn.softmax import softmax_last_dim

NORMALIZE_MODES = ("topk_softmax", "softmax_topk")  # two names of one rule (module doc)
INITS = ("auto", "zeros", "normal")
# Up to this k, top-k on CPU runs as k passes of argmax: 3x faster than torch.topk for (16384, 64) and k = 2
# (benchmarks/README.md, sparse MoE layer), ties going to the first maximal index. Otherwise a stable sort.
MAX_PASSES_UP_TO_K = 4


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores per row, largest first: (T, E) -> (T, k) int64. Ties: lower index first
    (torch.topk gives no order among ties, so it is not used: fine-grained routing reaches k = 8 and more)."""
    if k > MAX_PASSES_UP_TO_K or scores.device.type != "cpu" or not bool(torch.isfinite(scores).all()):
        # a stable descending sort keeps tied scores in index order; masking a pick with -inf (below) would
        # repeat it in a row of non-finites
        return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    picked = []
    work = scores
    for i in range(k):
        idx = work.argmax(1, keepdim=True)  # (T, 1) first maximal index of each row
        picked.append(idx)
        if i < k - 1:  # mask the pick for the next pass (a copy: the caller's scores stay as they are)
            work = work.scatter(1, idx, float("-inf"))
    return torch.cat(picked, 1)


def top_values(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest scores per row, largest first: (T, E) -> (T, k)."""
    return scores.gather(1, top_indices(scores, k))


def init_router_weight(w: torch.Tensor, init: str, std: float) -> None:
    if init == "zeros":
        nn.init.zeros_(w)
    else:
        nn.init.normal_(w, 0.0, std)


def smooth_load(clean: torch.Tensor, noisy: torch.Tensor, std: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """P(x, i) = Phi((clean_i - kth_excluding(noisy, k, i)) / std_i): (T, E), differentiable in clean and std.

    The threshold an expert must beat is the k-th largest of the *other* experts' noisy values: the (k+1)-th value
    overall if the expert is in the top k, the k-th otherwise.
    """
    E = clean.shape[1]
    if k >= E:
        return torch.ones_like(clean)  # every expert is always chosen
    top = top_values(noisy, k + 1)  # (T, k+1)
    thr_if_in, thr_if_out = top[:, k : k + 1], top[:, k - 1 : k]
    p_in = torch.special.ndtr((clean - thr_if_in) / std)
    p_out = torch.special.ndtr((clean - thr_if_out) / std)
    return torch.where(mask, p_in, p_out)


class NoisyTopKRouter(nn.Module):
    def __init__(self, d_in: int, num_experts: int, k: int = 2, *, noise: bool = True,
                 normalize: str = "topk_softmax", init: str = "auto", init_std: float = 1e-2,
                 noise_epsilon: float = 1e-2, loss_free_bias: bool = False, bias_update_rate: float = 1e-3) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not 1 <= k <= num_experts:
            raise ValueError(f"k must be in [1, num_experts={num_experts}], got {k}")
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"unknown normalize mode {normalize!r}; expected one of {NORMALIZE_MODES}")
        if init not in INITS:
            raise ValueError(f"unknown router init {init!r}; expected one of {INITS}")
        if init == "zeros" and not noise:
            raise ValueError("router init='zeros' without noise never breaks the tie between experts; "
                             "use init='normal' (or 'auto') or noise=True")
        self.num_experts, self.k, self.noise, self.normalize = num_experts, k, noise, normalize
        self.noise_epsilon = noise_epsilon
        init = ("zeros" if noise else "normal") if init == "auto" else init
        self.w_gate = nn.Parameter(torch.empty(d_in, num_experts))  # (d, E)
        init_router_weight(self.w_gate, init, init_std)
        self.w_noise = nn.Parameter(torch.zeros(d_in, num_experts)) if noise else None  # (d, E)
        if self.w_noise is not None:
            init_router_weight(self.w_noise, init, init_std)
        self.balancer = LossFreeBias(num_experts, bias_update_rate) if loss_free_bias else None

    def _select(self, scores: torch.Tensor) -> torch.Tensor:
        ranked = self.balancer.selection_scores(scores) if self.balancer is not None else scores
        return top_indices(ranked, self.k)  # (T, k)

    def forward(self, x: torch.Tensor) -> Routing:
        # routers in float32 whatever the model's precision (autocast would run these GEMMs in bf16 / fp16)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._route(x.float())

    def _route(self, x: torch.Tensor) -> Routing:
        clean = x @ self.w_gate.float()  # (T, E)
        std = None
        if self.noise and self.training:
            std = F.softplus(x @ self.w_noise.float()) + self.noise_epsilon  # (T, E) > 0: never divides by zero
            noisy = clean + torch.randn_like(clean) * std
        else:
            noisy = clean
        chosen = self._select(noisy)  # (T, k)
        probs = softmax_last_dim(noisy)  # (T, E)
        if self.k == 1:  # raw probability: a normalised single weight is 1 and has no gradient (module doc)
            weights = probs.gather(1, chosen)  # (T, 1)
        else:  # either normalize name: softmax over all then renormalised over the chosen is this
            weights = softmax_last_dim(noisy.gather(1, chosen))  # (T, k)
        load_prob = None
        if std is not None:
            bias = self.balancer.bias.detach() if self.balancer is not None else 0.0
            mask = torch.zeros_like(clean, dtype=torch.bool).scatter_(1, chosen, True)
            load_prob = smooth_load(clean + bias, noisy + bias, std, mask, self.k)
        return Routing(logits=clean, probs=probs, chosen=chosen, weights=weights, load_prob=load_prob)
