"""Switch routing (Fedus et al. 2021): top-1, the expert output scaled by the raw router probability.

Scaling by the raw (not renormalised) probability is what gives the router a gradient from the task loss; a
renormalised top-1 weight would be the constant 1. Noise is off by default (Switch uses none; the option adds the
noisy-gating noise in training).
"""
from __future__ import annotations

from mmoe_rec.nn.routing.topk import NoisyTopKRouter


class SwitchRouter(NoisyTopKRouter):
    def __init__(self, d_in: int, num_experts: int, *, noise: bool = False, init: str = "auto", init_std: float = 1e-2,
                 loss_free_bias: bool = False, bias_update_rate: float = 1e-3) -> None:
        super().__init__(d_in, num_experts, k=1, noise=noise, normalize="softmax_topk", init=init, init_std=init_std,
                         loss_free_bias=loss_free_bias, bias_update_rate=bias_update_rate)
