"""Sparse multi-gate MoE: per-task gates each pick k of E shared experts, so E can grow at constant compute.

x = embedding front(batch)                                   # (B, D_in)
for every task t: routing_t = router_t(x)                    # k of E experts per row (or expert choice)
mixed_t = sum over chosen experts of weight * expert(x)      # one vectorized dispatch for all tasks together
        + sum of the always-on shared experts(x)             # DeepSeekMoE, num_shared_experts > 0
        + dropped mass * fallback(x)                         # capacity drops never zero a task's input
logit_t = tower_t(mixed_t)

- Fine-grained experts (DeepSeekMoE): fine_grained = m splits every expert into m experts whose intermediate
  widths are divided by m and activates m·k of them; the output width is shared by all experts (they are mixed),
  so it is not split, and the experts need at least two layers. Not with the top-1 Switch router (refused).
- Capacity: capacity_factor cf gives C = ceil(k·T/E·cf) per expert and task gate; first choices win over second
  choices, then row order. A dropped assignment's combine weight goes to a fallback: the mean of the shared
  experts if there are any, else a dedicated dense fallback expert run on the affected rows only. Drops are
  counted in GateRecord.dropped. None = dropless (a factor must be finite: `.inf` is refused). At evaluation the limit is eval_capacity_factor, by default
  None (dropless): with a limit, which of a row's choices fit depends on the other rows of the batch, so a row's
  score would change with the batch it is scored in.
- Expert choice (training only, see nn/routing/expert_choice.py): each expert takes c = ceil(T·cf/E) rows,
  cf = (capacity_factor or k) · fine_grained: like k, capacity_factor counts experts before the fine-grained
  split, so that m·cf of the split experts take a row on average (the compute of cf unsplit ones). A row that
  no expert took counts as dropped (GateRecord.dropped counts rows, out of T, not assignments) and gets the
  fallback with the weight evaluation gives the row (the sum of its top eval_k probabilities). Its record carries the (T, E) assignment mask
  (GateRecord.assigned) instead of `chosen`. At evaluation it is token-choice top-k and dropless:
  eval_capacity_factor is refused with it.
- Aux losses (unweighted, averaged over task gates) under "importance", "load", "switch", "router_z". Defaults
  (DEFAULT_BALANCE, then `default_balance`): importance + load for noisy top-k, switch for Switch, router_z for
  all; load only with noise (without it the loss is a constant 0: asking for it is an error); with loss_free_bias
  only router_z (the bias alone balances, no loss competes with the task losses), unless `balance` asks.
- dropout and norm ("none" or "layer"): in every activated expert layer (routed, shared, fallback; inside the
  fused dispatch too) and in the towers; dropout in training only.
- Loss-free balancing: per-gate selection bias, updated by `after_optimizer_step(output)` (b += rate · sign(mean
  load − load)) from the loads of every training forward since the last update: all micro-batches of a step under
  gradient accumulation, summed over DDP ranks.
"""
from __future__ import annotations

import numbers
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from mmoe_rec.features.spec import FeatureSpec
from mmoe_rec.models.base import MultiTaskModel
from mmoe_rec.models.output import ModelOutput
from mmoe_rec.nn.balance import BALANCE_LOSSES, cv_squared, load_loss, router_z_loss, switch_loss
from mmoe_rec.nn.dispatch import (
    LAYOUTS, StackedExperts, apply_capacity, capacity_for, check_capacity_factor, compute_dtype, exact_factor,
)
from mmoe_rec.nn.embedding import EmbeddingFront
from mmoe_rec.nn.routing import ROUTERS, ExpertChoiceRouter, NoisyTopKRouter, Routing, SwitchRouter
from mmoe_rec.nn.routing.topk import NORMALIZE_MODES
from mmoe_rec.nn.routing_record import GateRecord
from mmoe_rec.nn.softmax import softmax_last_dim
from mmoe_rec.nn.towers import Tower

DEFAULT_BALANCE = {
    "noisy_topk": {"importance": True, "load": True, "switch": False, "router_z": True},
    "switch": {"importance": False, "load": False, "switch": True, "router_z": True},
    "expert_choice": {"importance": False, "load": False, "switch": False, "router_z": True},
}


def default_balance(router: str, noise: bool, loss_free_bias: bool) -> dict[str, bool]:
    """The balance losses on unless `balance` says otherwise."""
    out = dict(DEFAULT_BALANCE[router])
    if loss_free_bias:  # DeepSeek-V3 balances with the bias alone: no aux loss competing with the task losses
        out.update(importance=False, load=False, switch=False)
    if not noise:  # the load loss needs the noise scale: without it, a constant 0 with no gradient
        out["load"] = False
    return out


def fine_expert_hidden(expert_hidden: list[int], m: int) -> list[int]:
    """Intermediate widths divided by m; the output width stays (every expert's output is mixed together)."""
    if m == 1:
        return list(expert_hidden)
    if len(expert_hidden) < 2:
        raise ValueError("fine_grained > 1 splits the experts' intermediate widths: expert_hidden needs at least "
                         f"two layers (e.g. [64, 32]), got {expert_hidden}")
    inner = expert_hidden[:-1]
    if any(w % m for w in inner):
        raise ValueError(f"fine_grained={m} must divide every intermediate width {inner}")
    return [w // m for w in inner] + [expert_hidden[-1]]


class SparseMMoE(MultiTaskModel):
    def __init__(
        self,
        feature_spec: FeatureSpec,
        *,
        tasks: list[str] | None = None,
        embedding_dim: int = 8,
        num_experts: int = 16,
        k: int = 2,
        router: str = "noisy_topk",
        expert_hidden: list[int] | tuple[int, ...] = (64,),
        tower_hidden: list[int] | tuple[int, ...] = (16,),
        expert_activation: str = "relu",
        dropout: float = 0.0,
        norm: str = "none",
        num_shared_experts: int = 0,
        fine_grained: int = 1,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        noise: bool | None = None,
        normalize: str = "topk_softmax",
        router_init: str = "auto",
        balance: dict[str, bool] | None = None,
        loss_free_bias: bool = False,
        bias_update_rate: float = 1e-3,
        dispatch_layout: str = "auto",
    ) -> None:
        super().__init__(feature_spec, tasks)
        if router not in ROUTERS:
            raise ValueError(f"unknown router {router!r}; expected one of {ROUTERS}")
        # from Python (the CLI's typed parser catches these): k=2.0 failed in the first forward with a TypeError
        # naming no setting, capacity_factor=True was taken as 1
        # (numpy scalars, as a sweep over np.arange gives, are numbers: taken as Python ones)
        for name, value in (("num_experts", num_experts), ("k", k), ("num_shared_experts", num_shared_experts),
                            ("fine_grained", fine_grained)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        num_experts, k, num_shared_experts, fine_grained = map(int, (num_experts, k, num_shared_experts,
                                                                     fine_grained))
        for name, value in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor),
                            ("bias_update_rate", bias_update_rate), ("dropout", dropout)):
            if isinstance(value, bool) or not (value is None or isinstance(value, numbers.Real)):
                raise ValueError(f"{name} must be a number, got {value!r}")
        capacity_factor, eval_capacity_factor = (None if v is None else float(v)
                                                 for v in (capacity_factor, eval_capacity_factor))
        bias_update_rate, dropout = float(bias_update_rate), float(dropout)
        if num_experts < 1 or fine_grained < 1 or num_shared_experts < 0:
            raise ValueError("num_experts and fine_grained must be >= 1, num_shared_experts >= 0")
        if not 1 <= k <= num_experts:
            raise ValueError(f"k must be in [1, num_experts={num_experts}], got {k}")
        if router == "switch" and k != 1:
            raise ValueError(f"the switch router is top-1: use k=1 (got k={k})")
        if router == "switch" and fine_grained > 1:
            raise ValueError(f"fine_grained={fine_grained} activates fine_grained * k experts per row, the switch "
                             "router exactly one: use router='noisy_topk' (noise=False for a deterministic top-k)")
        check_capacity_factor(capacity_factor)
        check_capacity_factor(eval_capacity_factor, "eval_capacity_factor")
        if noise is None:  # noisy top-k is noisy by definition; Switch uses none (nn/routing/switch.py)
            noise = router == "noisy_topk"
        if router == "expert_choice" and (noise or router_init == "zeros"):
            raise ValueError("the expert-choice router has no training noise and starts from small normal weights: "
                             f"noise={noise} / router_init={router_init!r} would be ignored; leave them unset, or use "
                             "router='noisy_topk'")
        if normalize not in NORMALIZE_MODES:  # the switch and expert-choice routers never read it
            raise ValueError(f"unknown normalize mode {normalize!r}; expected one of {NORMALIZE_MODES}")
        if loss_free_bias and router == "expert_choice":
            raise ValueError("loss-free bias balancing needs token choice; expert choice is balanced by construction")
        if router == "expert_choice" and eval_capacity_factor is not None:
            raise ValueError("expert choice scores with dropless token-choice top-k at evaluation (a row is scored on "
                             "its own): eval_capacity_factor does not apply; leave it None")
        if eval_capacity_factor is not None and capacity_factor is None and not num_shared_experts:
            raise ValueError("eval_capacity_factor without capacity_factor or shared experts: the rows evaluation drops "
                             "would go to the dense fallback expert, which dropless training never trains (it stays "
                             "at its random start); set capacity_factor too, or num_shared_experts >= 1")
        if dispatch_layout not in LAYOUTS:
            raise ValueError(f"unknown dispatch_layout {dispatch_layout!r}; expected one of {LAYOUTS}")
        balance = {**default_balance(router, noise, loss_free_bias), **(balance or {})}
        unknown = set(balance) - set(BALANCE_LOSSES)
        if unknown:
            raise ValueError(f"unknown balance loss(es) {sorted(unknown)}; expected some of {BALANCE_LOSSES}")
        if balance["load"] and (router == "expert_choice" or not noise):
            raise ValueError("the load balance loss is defined by the router's training noise; without it "
                             f"(router={router!r}, noise={noise}) it is always 0 and never balances: set noise=True "
                             "with a token-choice router, or leave load out of `balance`")
        if balance["switch"] and router == "expert_choice":
            raise ValueError("the switch loss E * sum_i f_i * P_i is the constant 1 under expert choice (every expert "
                             "takes the same number of rows, f_i = 1/E) and never balances: leave switch out of "
                             "`balance`")
        self.balance = [name for name in BALANCE_LOSSES if balance[name]]

        self.router_name = router
        self.num_experts = num_experts * fine_grained  # routed experts after the fine-grained split
        self.k = k * fine_grained
        self.fine_grained = fine_grained
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.dispatch_layout = dispatch_layout
        hidden = fine_expert_hidden(list(expert_hidden), fine_grained)

        self.front = EmbeddingFront(feature_spec, embedding_dim=embedding_dim)
        d_in = self.front.out_dim
        mlp = dict(activation=expert_activation, dropout=dropout, norm=norm)
        self.experts = StackedExperts(self.num_experts, d_in, hidden, **mlp)
        self.shared_experts = StackedExperts(num_shared_experts, d_in, hidden, **mlp) if num_shared_experts else None
        # Drops fall back to the shared experts; without any, to one dense fallback expert.
        needs_fallback = capacity_factor is not None or eval_capacity_factor is not None or router == "expert_choice"
        self.fallback = (StackedExperts(1, d_in, hidden, **mlp)
                         if needs_fallback and self.shared_experts is None else None)
        self.gates = nn.ModuleDict({t: self._make_router(router, d_in, noise, normalize, router_init, loss_free_bias,
                                                         bias_update_rate) for t in self.tasks})
        self.towers = nn.ModuleDict({t: Tower(self.experts.out_dim, list(tower_hidden), dropout=dropout, norm=norm)
                                     for t in self.tasks})

    def emitted_aux_losses(self) -> tuple[str, ...]:
        return (*self.balance, *self.aux_loss_names())

    def _make_router(self, router, d_in, noise, normalize, init, loss_free_bias, rate) -> nn.Module:
        if router == "noisy_topk":
            return NoisyTopKRouter(d_in, self.num_experts, self.k, noise=noise, normalize=normalize, init=init,
                                   loss_free_bias=loss_free_bias, bias_update_rate=rate)
        if router == "switch":
            return SwitchRouter(d_in, self.num_experts, noise=noise, init=init, loss_free_bias=loss_free_bias,
                                bias_update_rate=rate)
        # experts per row on average, in split experts: self.k is already k * fine_grained; the product exact, so
        # that the capacity is the ceiling of the decimal cf as written times m (see ceil_scaled)
        if self.capacity_factor is None:
            return ExpertChoiceRouter(d_in, self.num_experts, capacity_factor=self.k)
        per_row = exact_factor(self.capacity_factor) * self.fine_grained
        # evaluation's k rounds the float product, as it did before the capacity was exact (a trained model's eval
        # k stays what it was where cf * m is a half: 1.1 * 55 is 60.50000000000001 in floats, 61)
        eval_k = round(self.capacity_factor * self.fine_grained)
        return ExpertChoiceRouter(d_in, self.num_experts, capacity_factor=per_row, eval_k=eval_k)

    def eval_batch_dependence(self) -> str | None:
        if self.eval_capacity_factor is None:
            return None
        return (f"eval_capacity_factor={self.eval_capacity_factor}: each expert takes at most its capacity of a "
                f"batch's rows at evaluation and drops the rest to the fallback, so a row's score depends on the "
                f"rows it is scored with (the batch size, --batch-rows, a Parquet file's row groups, a request's "
                f"other rows); leave eval_capacity_factor None (dropless) for scores that are the row's own")

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.front.parameters()
        yield from self.experts.parameters()
        for always in (self.shared_experts, self.fallback):  # the fallback takes every task's dropped rows
            if always is not None:
                yield from always.parameters()

    def last_shared_layer(self) -> list[nn.Parameter]:
        # routed (and always-on shared, or fallback) experts' last layers
        return [self.experts.weights[-1], *(m.weights[-1] for m in (self.shared_experts, self.fallback)
                                            if m is not None)]

    # ------------------------------------------------------------------------------------------------------------

    def _kept_assignments(self, r: Routing, T: int):
        """Assignments after the capacity limit, each row's dropped combine mass (T,) (None if nothing can drop) and
        the number dropped () on the device (read by the monitor, not here: no host wait)."""
        experts, rows, weights = r.assignments()  # (N,)
        if r.chosen is None:  # expert choice: rows no expert took are the "dropped" ones
            taken = torch.zeros(T, dtype=torch.bool, device=rows.device)
            taken[rows] = True
            # such a row's fallback weight is the mass evaluation gives it (its top eval_k probabilities), on the
            # scale the towers see then, not 1 (~10x a taken row's ~1/E per expert at E = 16), and it carries
            # the router's gradient as a taken row's weights do
            eval_k = self.gates[self.tasks[0]].eval_k  # every gate's router is made alike (_make_router)
            mass = r.probs.topk(eval_k, dim=1).values.sum(1)  # (T,)
            return experts, rows, weights, mass * (~taken).to(mass.dtype), (~taken).sum()
        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        cap = capacity_for(T, self.k, self.num_experts, cf)
        if cap is None:
            return experts, rows, weights, None, torch.zeros((), dtype=torch.int64, device=rows.device)
        keep = apply_capacity(r.chosen, self.num_experts, cap)  # (T, k)
        dropped_mass = (r.weights * (~keep)).sum(1)  # (T,)
        flat_keep = keep.t().reshape(-1)  # assignments are choice-major, like keep.t()
        return experts[flat_keep], rows[flat_keep], weights[flat_keep], dropped_mass, (~keep).sum()

    def _importance(self, r: Routing) -> torch.Tensor:
        """(E,) float32 Importance_i = sum over rows of the gate's weights, before capacity: what the gate asked for
        (the importance loss balances it; the record carries it for the monitor's importance CV²)."""
        experts, _, weights = r.assignments()
        return torch.zeros(self.num_experts, device=weights.device, dtype=torch.float32).index_add(
            0, experts, weights.float())

    def _aux(self, r: Routing) -> dict[str, torch.Tensor]:
        out = {}
        if "importance" in self.balance:
            out["importance"] = cv_squared(self._importance(r))
        if "load" in self.balance:
            out["load"] = load_loss(r.load_prob).to(r.logits.device)
        if "switch" in self.balance:
            out["switch"] = switch_loss(r.probs, r.counts)
        if "router_z" in self.balance:
            out["router_z"] = router_z_loss(r.logits)
        return out

    def forward_dense(self, x: torch.Tensor) -> ModelOutput:
        """The model after the embedding front: x (B, D_in) -> ModelOutput."""
        T, G = x.shape[0], len(self.tasks)
        routings = {t: self.gates[t](x) for t in self.tasks}
        if self.training:
            self._count_loads(routings)
        parts, drops = [], {}
        for g, t in enumerate(self.tasks):
            experts, rows, weights, dropped_mass, n_dropped = self._kept_assignments(routings[t], T)
            parts.append((experts, rows, rows + g * T, weights))
            drops[t] = (dropped_mass, n_dropped, experts, rows, weights)
        experts, rows, out_rows, weights = (torch.cat(p) for p in zip(*parts))
        plan = self.experts.plan(experts, rows, out_rows=out_rows, num_out=G * T, layout=self.dispatch_layout,
                                 dtype=compute_dtype(x))
        mixed = self.experts(x, plan, weights).view(G, T, self.experts.out_dim)  # (G, T, D) one dispatch, all gates

        shared_sum = shared_mean = None
        if self.shared_experts is not None:
            shared_all = self.shared_experts.forward_all(x)  # (S, T, D)
            shared_sum, shared_mean = shared_all.sum(0), shared_all.mean(0)

        logits, routing, aux_sum = {}, {}, {}
        for g, t in enumerate(self.tasks):
            h = mixed[g]
            if shared_sum is not None:
                h = h + shared_sum
            dropped_mass, n_dropped, kept_e, kept_r, kept_w = drops[t]
            if dropped_mass is not None:
                h = self._fallback(x, h, dropped_mass, shared_mean)
            logits[t] = self.towers[t](h)
            r = routings[t]
            for name, value in self._aux(r).items():
                aux_sum[name] = aux_sum.get(name, 0.0) + value
            routing[t] = self._record(t, r, kept_e, kept_r, kept_w, n_dropped, T)
        aux = {name: value / G for name, value in aux_sum.items()}
        return ModelOutput(logits=logits, aux=aux, routing=routing)

    def _count_loads(self, routings: dict[str, Routing]) -> None:
        """Loss-free balancing: add this forward's loads to the count the next bias update reads (every
        micro-batch of an optimizer step, not only the last)."""
        for t, r in routings.items():
            balancer = getattr(self.gates[t], "balancer", None)
            if balancer is not None:
                balancer.add_load(r.counts)  # (E,) before capacity: what the selection asked for

    def _fallback(self, x, h, dropped_mass, shared_mean):
        """Give each row's dropped combine mass to the shared experts' mean, or to the fallback expert."""
        if shared_mean is not None:
            return h + (dropped_mass.unsqueeze(1) * shared_mean).to(h.dtype)
        idx = (dropped_mass > 0).nonzero().squeeze(1)
        if idx.numel() == 0 and not (self.training and torch.is_grad_enabled()):
            return h
        # in training even on no rows: the fallback's parameters then get a (zero) gradient, which DDP needs of
        # every parameter each step unless find_unused_parameters is set
        fb = self.fallback.forward_all(x.index_select(0, idx))[0]  # (n, D) only the affected rows
        # cast after the product: under autocast a layer-norm fallback comes back in float32 while h may be bf16
        return h.index_add(0, idx, (dropped_mass.index_select(0, idx).unsqueeze(1) * fb).to(h.dtype))

    def _record(self, task: str, r: Routing, experts, rows, weights, n_dropped: torch.Tensor, T: int) -> GateRecord:
        with torch.no_grad():
            combine = torch.zeros(T, self.num_experts, device=r.logits.device, dtype=torch.float32)
            combine.index_put_((rows, experts), weights.detach().float(), accumulate=True)  # after capacity
            importance = self._importance(r)  # (E,) before capacity (expert choice keeps all: combine's sum)
            # on the gate's device: the monitor adds them to device sums every step without a host copy
            # (the dropped fraction is the monitor's own `dropped_frac`, from `dropped` and the assignments)
            extra = {"router_z": router_z_loss(r.logits.detach())}
            balancer = getattr(self.gates[task], "balancer", None)
            if balancer is not None:
                bias = balancer.bias.detach()  # (E,) what the selection adds to each expert's score
                # its size, its spread across experts, its largest: a bias that keeps growing (an expert the router
                # never wants) shows in the max while the mean stays small
                extra["bias_abs_mean"] = bias.abs().mean()
                extra["bias_std"] = bias.std(unbiased=False)
                extra["bias_abs_max"] = bias.abs().max()
        token_choice = r.chosen is not None  # expert choice: a row has any number of experts, so a (T, E) mask
        # what the router prefers, for the entropy: the training noise's softmax would read as the noise scale
        probs = r.probs.detach() if r.load_prob is None else softmax_last_dim(r.logits.detach())  # (T, E)
        return GateRecord(combine=combine, probs=probs,
                          chosen=r.chosen.detach() if token_choice else None,
                          assigned=None if token_choice else r.mask,
                          dropped=n_dropped.to(torch.int64), extra=extra, importance=importance)

    @torch.no_grad()
    def after_optimizer_step(self, output: ModelOutput) -> None:
        """Loss-free balancing: move each gate's selection bias towards an even load. The load is counted by the
        training forwards since the last update (all micro-batches of the step), not read from `output`, which
        holds only the last one."""
        for t in self.tasks:
            balancer = getattr(self.gates[t], "balancer", None)
            if balancer is None:
                continue
            load = balancer.take_load()  # (E,) int64
            if dist.is_available() and dist.is_initialized():
                # every rank must apply the same update, or DDP replicas' biases (and choices) drift apart
                dist.all_reduce(load)
            balancer.update(load)
