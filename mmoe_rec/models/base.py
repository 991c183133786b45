"""The base every multi-task model derives from: an embedding front, a body, one tower per task."""
from __future__ import annotations

import abc
from typing import Iterator

import torch
from torch import nn

from mmoe_rec.data.batch import Batch
from mmoe_rec.features.spec import FeatureSpec
from mmoe_rec.models.output import ModelOutput


class MultiTaskModel(nn.Module, abc.ABC):
    """Models take the fitted FeatureSpec as first argument and hyper-parameters as keywords.

    Subclasses build `self.front` (the embedding front: Batch -> (B, D_in)) and implement
    `forward_dense(x) -> ModelOutput` (everything after it) and `shared_parameters()`. They know nothing of
    training: no losses are stored on modules, no Lightning, no MLflow.
    """

    def __init__(self, feature_spec: FeatureSpec, tasks: list[str] | None = None) -> None:
        super().__init__()
        self.feature_spec = feature_spec
        names = feature_spec.task_names
        if tasks is None:
            tasks = names
        if isinstance(tasks, str):  # a YAML `tasks: click` would be read letter by letter
            raise ValueError(f"tasks must be a list of task names, got the string {tasks!r} (write [{tasks}])")
        dotted = [t for t in tasks if "." in t]
        if dotted:  # (feature schemas refuse such names since 2026-12-06)
            raise ValueError(f"task names {dotted} hold '.': each task names a gate and a tower, torch modules "
                             "whose names take no '.'; rename the task in the feature schema and rebuild the features")
        unknown = [t for t in tasks if t not in names]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; the feature spec has tasks {names}")
        if not tasks:
            raise ValueError("a multi-task model needs at least one task")
        if len(set(tasks)) != len(tasks):  # a second gate would overwrite the first's logits and routing
            raise ValueError(f"tasks {list(tasks)} name a task twice")
        self.tasks = list(tasks)

    def forward(self, batch: Batch) -> ModelOutput:
        return self.forward_dense(self.front(batch))

    @abc.abstractmethod
    def forward_dense(self, x: torch.Tensor) -> ModelOutput:
        """Everything after the embedding front: x (B, D_in) -> ModelOutput."""

    @abc.abstractmethod
    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters every task's loss reaches (embeddings, shared experts): used for task-gradient similarity."""

    def last_shared_layer(self) -> list[nn.Parameter]:
        """The weights of the last layer every task's loss reaches, where GradNorm (Chen et al. 2018) measures and
        balances the tasks' gradient norms. Empty: the model has none (GradNorm then refuses it)."""
        return []

    def aux_loss_names(self) -> tuple[str, ...]:
        """Names of the auxiliary losses this model may put in `ModelOutput.aux` beside the balance losses of
        the sparse models (the training module refuses coefficients for any other name, to catch a misspelt one).
        A model with aux losses of its own names them here. Default: none."""
        return ()

    def emitted_aux_losses(self) -> tuple[str, ...]:
        """Every name this model's training forward may put in `ModelOutput.aux`: its own (aux_loss_names) and, for
        a sparse model, the balance losses it is set to compute. The training module wants a coefficient for each
        when it is made (else the first step fails)."""
        return self.aux_loss_names()

    def eval_batch_dependence(self) -> str | None:
        """Why this model's scores in eval mode depend on the other rows of the batch, or None when a row's score
        is its own (every model by default; the scoring job and the pyfunc warn otherwise)."""
        return None

    @torch.no_grad()
    def after_optimizer_step(self, output: ModelOutput) -> None:
        """Hook for state updated outside autograd after each step (loss-free balancing biases). Default: none."""
        return None
