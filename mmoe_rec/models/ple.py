"""PLE (Tang et al., RecSys 2020): stacked CGC extraction levels with task-specific and shared experts.

Level l has, per task t, K_t experts of its own and K_s shared experts (E = T*K_t + K_s in all).
- task gate t mixes [own experts of t ; shared experts], its input is task t's output of level l-1;
- every non-final level also has a shared gate mixing ALL E experts of the level, input the shared output of l-1;
- task t's experts at level l read task t's output of level l-1, the shared experts read the shared output;
  level 0 reads the embedding front's x everywhere. The towers read the final level's task outputs.
CGC is num_levels = 1. num_task_experts = 0 is allowed: then one level is exactly MMoE with K_s experts.
With num_shared_experts = 0 nothing reads a shared output, so no shared gate is built.

Vectorized per level: each expert group is one ExpertStack (one GEMM / bmm per layer for all its experts), the
task gates are one DenseGates (one GEMM or bmm), and one bmm mixes every gate: the gate weights are scattered
into a (B, G, E) matrix over the level's experts (zeros off the gate's members).

Routing names: "<level>/<task>" (expert_groups {"own": [...], "shared": [...]}, indices into that gate's
weights) and "<level>/shared" (groups: each task's experts and "shared"); levels count from 0.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from mmoe_rec.features.spec import FeatureSpec
from mmoe_rec.models.base import MultiTaskModel
from mmoe_rec.models.output import ModelOutput
from mmoe_rec.nn.embedding import EmbeddingFront
from mmoe_rec.nn.experts import ExpertStack
from mmoe_rec.nn.gates import DenseGates
from mmoe_rec.nn.routing_record import GateRecord
from mmoe_rec.nn.towers import make_towers

SHARED = "shared"


class ExtractionLevel(nn.Module):
    """One CGC level. forward: x (B, D) at level 0, else (B, G_prev, D) -> (B, G, H) and its gate records,
    G = T task outputs (+ 1 shared output if the level has a shared gate), in that order."""

    def __init__(
        self,
        in_dim: int,
        tasks: list[str],
        num_task_experts: int,
        num_shared_experts: int,
        hidden: list[int],
        *,
        final: bool,
        activation: str,
        dropout: float,
        norm: str,
        gate: str,
        gate_temperature: float,
    ) -> None:
        super().__init__()
        T, Kt, Ks = len(tasks), num_task_experts, num_shared_experts
        self.tasks, self.Kt, self.Ks = list(tasks), Kt, Ks
        self.num_experts = T * Kt + Ks
        kw = dict(activation=activation, dropout=dropout, norm=norm)
        # Experts ordered [task 0's, task 1's, ..., shared]; task experts of all tasks in one stack.
        self.task_experts = ExpertStack(T * Kt, in_dim, hidden, **kw) if Kt else None
        self.shared_experts = ExpertStack(Ks, in_dim, hidden, **kw) if Ks else None
        self.output_dim = hidden[-1]
        self.task_gates = DenseGates(in_dim, Kt + Ks, T, kind=gate, temperature=gate_temperature)
        self.shared_gate = (DenseGates(in_dim, self.num_experts, 1, kind=gate, temperature=gate_temperature)
                            if not final and Ks else None)
        members = [[t * Kt + i for i in range(Kt)] + [T * Kt + j for j in range(Ks)] for t in range(T)]
        self.register_buffer("members", torch.tensor(members, dtype=torch.long).view(T, Kt + Ks), persistent=False)
        # a task gate's record spans the whole level (the other tasks' experts at weight 0): monitoring compares
        # tasks expert by expert, and position j of two task gates is not the same expert
        self.task_groups = {t: {"own": members[i][:Kt], SHARED: members[i][Kt:]} for i, t in enumerate(tasks)}
        self.shared_groups = {t: list(range(i * Kt, (i + 1) * Kt)) for i, t in enumerate(tasks)}
        self.shared_groups[SHARED] = list(range(T * Kt, T * Kt + Ks))

    @property
    def num_outputs(self) -> int:
        return len(self.tasks) + (self.shared_gate is not None)

    def _experts(self, x: torch.Tensor) -> torch.Tensor:
        """-> (B, E, H) outputs of all experts of the level, in [task experts ; shared experts] order."""
        T, Kt = len(self.tasks), self.Kt
        outs = []
        if self.task_experts is not None:
            if x.dim() == 2:
                outs.append(self.task_experts(x))  # (B, T*Kt, H)
            else:  # each task's experts read that task's input
                xs = x[:, :T].transpose(0, 1).repeat_interleave(Kt, dim=0)  # (T*Kt, B, D)
                outs.append(self.task_experts.forward_each(xs).transpose(0, 1))  # (B, T*Kt, H)
        if self.shared_experts is not None:
            outs.append(self.shared_experts(x if x.dim() == 2 else x[:, T]))  # (B, Ks, H)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, GateRecord]]:
        T = len(self.tasks)
        expert_out = self._experts(x)  # (B, E, H)
        task_in = x if x.dim() == 2 else x[:, :T].transpose(0, 1)  # (B, D) or (T, B, D)
        w_task, p_task = self.task_gates(task_in)  # (B, T, Kt+Ks) float32
        B = w_task.shape[0]
        members = self.members.expand(B, -1, -1)  # (B, T, Kt+Ks)
        combine = w_task.new_zeros(B, T, self.num_experts).scatter(2, members, w_task)  # (B, T, E)
        with torch.no_grad():
            probs = p_task.new_zeros(B, T, self.num_experts).scatter(2, members, p_task)  # (B, T, E)
        records = {t: self.task_gates.record(combine.detach(), probs, i, self.task_groups[t])
                   for i, t in enumerate(self.tasks)}
        if self.shared_gate is not None:
            w_sh, p_sh = self.shared_gate(x if x.dim() == 2 else x[:, T])  # (B, 1, E)
            combine = torch.cat([combine, w_sh], dim=1)  # (B, T+1, E)
            records[SHARED] = self.shared_gate.record(w_sh, p_sh, 0, self.shared_groups)
        return torch.bmm(combine.to(expert_out.dtype), expert_out), records  # (B, G, H)


class PLE(MultiTaskModel):
    def __init__(
        self,
        feature_spec: FeatureSpec,
        *,
        tasks: list[str] | None = None,
        embedding_dim: int = 8,
        embedding_dims: dict[str, int] | None = None,
        pooling: str | dict[str, str] = "sum",
        num_levels: int = 2,
        num_task_experts: int = 1,
        num_shared_experts: int = 1,
        expert_hidden: list[int] | tuple[int, ...] = (64,),
        tower_hidden: list[int] | tuple[int, ...] = (16,),
        activation: str = "relu",
        dropout: float = 0.0,
        norm: str = "none",
        gate: str = "softmax",
        gate_temperature: float = 1.0,
    ) -> None:
        super().__init__(feature_spec, tasks)
        if num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {num_levels}")
        if num_task_experts < 0 or num_shared_experts < 0 or num_task_experts + num_shared_experts == 0:
            raise ValueError("PLE needs num_task_experts >= 0, num_shared_experts >= 0 and at least one expert per "
                             f"gate, got {num_task_experts} and {num_shared_experts}")
        if SHARED in self.tasks:
            raise ValueError(f"a task may not be named {SHARED!r} in PLE (it names the shared gate)")
        self.front = EmbeddingFront(feature_spec, embedding_dim=embedding_dim, embedding_dims=embedding_dims,
                                    pooling=pooling)
        d = self.front.output_dim
        levels = []
        for level in range(num_levels):
            levels.append(ExtractionLevel(
                d, self.tasks, num_task_experts, num_shared_experts, list(expert_hidden),
                final=level == num_levels - 1, activation=activation, dropout=dropout, norm=norm, gate=gate,
                gate_temperature=gate_temperature,
            ))
            d = levels[-1].output_dim
        self.levels = nn.ModuleList(levels)
        self.towers = make_towers(self.tasks, d, list(tower_hidden), activation=activation, dropout=dropout,
                                  norm=norm)

    def last_shared_layer(self) -> list[nn.Parameter]:
        """The last layer of the highest level's shared experts (the final gates mix them into every task)."""
        for level in reversed(self.levels):
            if level.shared_experts is not None:
                return [level.shared_experts.weights[-1]]
        return []

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """What every task's loss reaches: the embeddings; each level's shared experts; and below the final level
        its shared gate and its task experts too, since the shared gate mixes every expert of the level into the
        shared output that all tasks read one level up; a level's task gates when the level above is not the
        final one and has task experts and a shared gate (their outputs feed that level's task experts, hence its
        shared gate). Left out: the final level's task experts and gates, and task gates whose outputs reach one
        task only (below the final level, or below a level without task experts or shared experts)."""
        yield from self.front.parameters()
        last = len(self.levels) - 1
        for i, level in enumerate(self.levels):
            if level.shared_experts is not None:
                yield from level.shared_experts.parameters()
            if level.shared_gate is not None:  # every level but the final one
                yield from level.shared_gate.parameters()
                if level.task_experts is not None:
                    yield from level.task_experts.parameters()
            if i + 1 < last and self._reaches_every_task(self.levels[i + 1]):
                yield from level.task_gates.parameters()

    @staticmethod
    def _reaches_every_task(level: nn.Module) -> bool:
        """Whether a task's output fed into `level` reaches every task: through its task experts, which its shared
        gate mixes into the shared output (without either, a task's output stays with that task)."""
        return level.task_experts is not None and level.shared_gate is not None

    def forward_dense(self, x: torch.Tensor) -> ModelOutput:
        """Everything after the embedding front: x (B, D_in) -> ModelOutput."""
        h, routing = x, {}
        for i, level in enumerate(self.levels):
            h, records = level(h)  # (B, G, H)
            routing.update({f"{i}/{name}": r for name, r in records.items()})
        logits = {t: self.towers[t](h[:, j]) for j, t in enumerate(self.tasks)}
        return ModelOutput(logits=logits, aux={}, routing=routing)
