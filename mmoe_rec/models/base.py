"""The base every multi-task model derives from: an embedding front, a body, one tower per task."""
from __future__ import annotations

import abc
from typing import Iterator

import torch
from torch import nn

from mmoe_rec.features.spec import FeatureSpec
from mmoe_rec.models.output import ModelOutput


class MultiTaskModel(nn.Module, abc.ABC):
    """Models take the fitted FeatureSpec as first argument and hyper-parameters as keywords.

    Subclasses implement `forward(batch) -> ModelOutput` and `shared_parameters()`. They know nothing of
    training: no losses are stored on modules, no Lightning, no MLflow.
    """

    def __init__(self, feature_spec: FeatureSpec, tasks: list[str] | None = None) -> None:
        super().__init__()
        self.feature_spec = feature_spec
        names = feature_spec.task_names
        if tasks is None:
            tasks = names
        unknown = [t for t in tasks if t not in names]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; the feature spec has tasks {names}")
        if not tasks:
            raise ValueError("a multi-task model needs at least one task")
        self.tasks = list(tasks)

    @abc.abstractmethod
    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters every task's loss reaches (embeddings, shared experts): used for task-gradient similarity."""

    @torch.no_grad()
    def after_optimizer_step(self, output: ModelOutput) -> None:
        """Hook for state updated outside autograd after each step (loss-free balancing biases). Default: none."""
        return None
