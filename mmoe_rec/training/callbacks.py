"""RoutingMonitor: accumulates what the gates did over a window of steps and logs it.

Every `every_n_steps` training steps and at each epoch end it sums the window's statistics across ranks
(one all-reduce per tensor, the same order on every rank) and logs, on rank 0:
- `experts/<gate>/...` (window) and `experts/epoch/<gate>/...` (epoch): see monitoring.utilization_metrics;
- `relatedness/label_corr/<a>.vs.<b>`, `relatedness/gate_js/...`, `relatedness/gate_cos/...`,
  `relatedness/expert_jaccard/...` (sparse gates), the same under `relatedness/epoch/...`;
  `relatedness/grad_cos/...` is logged by the module itself when it samples gradients.
At epoch end it writes PNGs as MLflow artifacts under `plots/` (overwritten each epoch, so they show the
latest epoch): utilization_heatmap.png, expert_load.png, task_relatedness.png.
"""
from __future__ import annotations

import copy
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
import numpy as np
import torch
import torch.distributed as dist

from mmoe_rec.nn.routing_record import concat_records
from mmoe_rec.training import plots
from mmoe_rec.training.epochs import epoch_cut_short
from mmoe_rec.training.monitoring import (
    GateStats,
    LabelStats,
    reachable_experts,
    chosen_mask,
    gate_pair_sums,
    gate_similarity,
    jaccard_sums,
    label_correlation,
    matrix_for_json,
    pair_scalars,
    task_gates,
    utilization_metrics,
)
from mmoe_rec.training.tracking import log_json, log_png


# the monitor's segment computes its batches' statistics together once they hold this many gate weights (rows x
# experts over the gates): 8 MB of float32 each for the kept combine weights and probabilities (a settle's
# temporaries: a few times that, the pair statistics in chunks); a dense 2-gate model of 8 experts at batch 1024
# settles every 128 steps, or at the window's or the epoch's end if sooner
SEGMENT_BUFFER_ELEMENTS = 1 << 21
MAX_LOAD_HISTORY = 2000  # log points kept for the expert-load plot (more are thinned: see _thin_history)


def _append_loads(history: dict[str, list[np.ndarray]], window: "Window") -> None:
    """Each gate's load in `window` (sparse: share of assignments; dense: mean gate weight) as a history point."""
    for name, stats in window.gates.items():
        load = stats.fraction if stats.sparse else stats.utilization
        history.setdefault(name, []).append(load.numpy().copy())


def _all_reduce(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sums across ranks, returned on the CPU (where the metrics and plots are made from them)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [t.cpu() for t in tensors]
    out = []
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    for t in tensors:
        t = t.to(device).clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        out.append(t.cpu())
    return out


class Window:
    """Sums of one window (or one epoch): per gate, labels, and per task pair the per-row gate similarity and
    chosen-expert Jaccard."""

    def __init__(self, tasks: list[str], buffer_elements: int = 0) -> None:
        """buffer_elements > 0: `update` keeps the batches (references to their records, labels and weights)
        until they hold that many gate weights (rows x experts, over the gates), then computes their statistics
        in one pass over all their rows (`settle`): about a hundred small ops a batch become as many for the
        lot. Every reader of the sums settles first."""
        self.tasks = tasks
        self.gates: dict[str, GateStats] = {}
        self.labels = LabelStats.empty(tasks)
        self.jaccard: dict[tuple[str, str], torch.Tensor] = {}  # pair -> [sum, rows]
        # tasks whose gates span the same experts (the largest such group) -> (pairs, 3) per-row gate similarity
        # sums [JS, cosine, rows] (monitoring.gate_pair_sums)
        self.gate_pairs: dict[tuple[str, ...], torch.Tensor] = {}
        self.buffer_elements = buffer_elements
        self._pending: list[tuple[dict[str, Any], dict[str, torch.Tensor], torch.Tensor | None]] = []
        self._pending_elements = 0

    def update(self, routing: dict[str, Any], labels: dict[str, torch.Tensor],
               weights: torch.Tensor | None = None) -> None:
        if not self.buffer_elements:
            self._update(routing, labels, weights)
            return
        self._pending.append((routing, labels, weights))
        self._pending_elements += sum(r.combine.numel() for r in routing.values())
        if self._pending_elements >= self.buffer_elements:
            self.settle()

    def settle(self) -> None:
        """The statistics of the buffered batches, in one pass over their rows (batch by batch where their
        records do not line up: another set of gates, experts or extras)."""
        steps, self._pending, self._pending_elements = self._pending, [], 0
        if len(steps) > 1 and all(s[0].keys() == steps[0][0].keys() for s in steps):
            routing = {name: concat_records([s[0][name] for s in steps]) for name in steps[0][0]}
            if all(r is not None for r in routing.values()) and all(
                    s[1].keys() == steps[0][1].keys() and (s[2] is None) == (steps[0][2] is None) for s in steps):
                labels = {t: torch.cat([s[1][t] for s in steps]) for t in steps[0][1]}
                weights = None if steps[0][2] is None else torch.cat([s[2] for s in steps])
                steps = [(routing, labels, weights)]
        for step in steps:
            self._update(*step)

    def _update(self, routing: dict[str, Any], labels: dict[str, torch.Tensor],
                weights: torch.Tensor | None = None) -> None:
        for name, record in routing.items():
            if name not in self.gates:
                self.gates[name] = GateStats.empty(record.num_experts)
            self.gates[name].update(record)
        self.labels.update(labels, weights)
        per_task = task_gates(list(routing), self.tasks)
        by_shape: dict[tuple[int, ...], list[str]] = {}  # gates over different experts are not compared
        for t in self.tasks:
            if t in per_task:
                by_shape.setdefault(tuple(routing[per_task[t]].combine.shape), []).append(t)
        names = max(by_shape.values(), key=len, default=[])
        if len(names) > 1:
            total = gate_pair_sums(torch.stack([routing[per_task[t]].combine.detach() for t in names]))
            acc = self.gate_pairs.get(tuple(names))
            self.gate_pairs[tuple(names)] = total if acc is None else acc.to(total.device) + total
        masks = {t: chosen_mask(routing[g]) for t, g in per_task.items()}
        masks = {t: m for t, m in masks.items() if m is not None}
        names = [t for t in self.tasks if t in masks]
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                if masks[a].shape != masks[b].shape:
                    continue
                total = jaccard_sums(masks[a], masks[b])  # (2,) on the gates' device: summed there, no host read
                acc = self.jaccard.get((a, b))
                self.jaccard[(a, b)] = total if acc is None else acc.to(total.device) + total

    def add(self, other: "Window") -> None:
        """Adds another window's sums (the same tasks) into this one; `other` is left as it is."""
        self.settle()
        other.settle()
        for name, stats in other.gates.items():
            if name not in self.gates:
                self.gates[name] = GateStats.empty(stats.combine_sum.numel())
            self.gates[name].add(stats)
        self.labels.add(other.labels)
        for mine, theirs in ((self.jaccard, other.jaccard), (self.gate_pairs, other.gate_pairs)):
            for key, total in theirs.items():
                mine[key] = mine[key].to(total.device) + total if key in mine else total.clone()

    def reduce(self) -> None:
        """Sums (merges, for the labels) across ranks in place (every rank must call it at the same point: same
        gates, same pairs)."""
        self.settle()
        flat: list[torch.Tensor] = []
        for name in sorted(self.gates):
            flat += self.gates[name].tensors()
        per_gate = len(flat) // max(len(self.gates), 1)  # every gate gives the same fields
        pairs = sorted(self.jaccard)
        flat += [self.jaccard[p] for p in pairs]
        gate_pairs = sorted(self.gate_pairs)
        flat += [self.gate_pairs[p] for p in gate_pairs]
        flat = _all_reduce(flat)
        pos = 0
        for name in sorted(self.gates):
            self.gates[name].load_tensors(flat[pos:pos + per_gate])
            pos += per_gate
        for p in pairs:
            self.jaccard[p] = flat[pos]
            pos += 1
        for p in gate_pairs:
            self.gate_pairs[p] = flat[pos]
            pos += 1
        self.labels.reduce(_all_reduce)  # centred statistics: merged, not summed

    def state_dict(self) -> dict[str, Any]:
        """The sums as CPU tensors and plain values (a checkpoint loads them with weights_only)."""
        self.settle()
        gates = {}
        for name, stats in self.gates.items():
            gates[name] = {"combine_sum": stats.combine_sum.cpu(), "importance_sum": stats.importance_sum.cpu(),
                           "probs_sum": stats.probs_sum.cpu(),
                           "counts": stats.counts.cpu(), "dropped": stats.dropped.cpu(),
                           "entropy_sum": stats.entropy_sum.cpu(), "rows": stats.rows,
                           "drop_base": stats.drop_base, "sparse": stats.sparse, "groups": stats.groups,
                           "extra_sum": {k: v.cpu() for k, v in stats.extra_sum.items()}}
        labels = self.labels
        return {"tasks": list(self.tasks), "gates": gates,
                "labels": labels.state(),
                "jaccard": [[list(pair), total.cpu()] for pair, total in self.jaccard.items()],
                "gate_pairs": [[list(names), total.cpu()] for names, total in self.gate_pairs.items()]}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "Window":
        window = cls(list(state["tasks"]))
        for name, g in state["gates"].items():
            window.gates[name] = GateStats(g["combine_sum"], g["probs_sum"], g["counts"], g["dropped"],
                                           g["entropy_sum"], g["rows"], g["drop_base"], g["sparse"], g["groups"],
                                           dict(g["extra_sum"]), g.get("importance_sum"))
        window.labels = LabelStats.from_state(list(state["tasks"]), state["labels"])
        window.jaccard = {tuple(pair): total for pair, total in state["jaccard"]}
        window.gate_pairs = {tuple(names): total for names, total in state["gate_pairs"]}
        return window

    @property
    def empty(self) -> bool:
        self.settle()
        return not self.gates and self.labels.rows == 0

    def relatedness(self) -> dict[str, tuple[list[str], torch.Tensor]]:
        self.settle()
        out: dict[str, tuple[list[str], torch.Tensor]] = {}
        if len(self.tasks) > 1 and self.labels.defined:
            out["label_corr"] = label_correlation(self.labels)
        if self.gate_pairs:  # one group in practice; the one seen with the most rows if the gates changed shape
            names = max(self.gate_pairs, key=lambda key: float(self.gate_pairs[key][0, 2]))
            out.update(gate_similarity(list(names), self.gate_pairs[names]))
        if self.jaccard:
            names = [t for t in self.tasks if any(t in p for p in self.jaccard)]
            mat = torch.eye(len(names), dtype=torch.float64)
            for (a, b), (s, n) in self.jaccard.items():
                i, j = names.index(a), names.index(b)
                mat[i, j] = mat[j, i] = s / float(n) if float(n) > 0 else float("nan")  # no row sent: undefined
            out["expert_jaccard"] = (names, mat)
        return out

    def metrics(self, experts_prefix: str, related_prefix: str) -> dict[str, float]:
        self.settle()
        out: dict[str, float] = {}
        for name, stats in self.gates.items():
            out.update(utilization_metrics(name, stats, experts_prefix))
        for kind, (names, mat) in self.relatedness().items():
            out.update(pair_scalars(f"{related_prefix}/{kind}", names, mat))
        return out


def _unless_it_fails(what: str, write) -> None:
    """Write an epoch's optional artifact; a failure (a full disk, an artifact store that went away) is a warning:
    the metrics go on being logged and the training goes on (it stopped the fit at the epoch's end)."""
    try:
        write()
    except Exception as e:
        rank_zero_warn(f"{what} could not be logged ({type(e).__name__}: {e}); training goes on")


class RoutingMonitor(L.Callback):
    """Args:
        every_n_steps: window length in training steps (logged at global steps divisible by it).
        plots: write PNG plots at each training epoch end (rank 0).
    """

    def __init__(self, every_n_steps: int = 50, plots: bool = True) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.plots = plots
        self.history_steps: list[int] = []
        self.history: dict[str, list[np.ndarray]] = {}  # gate -> per log point (E,) load (share or util)
        self.history_every = 1  # the history keeps every k-th log point (doubled when it grows too long)
        # the load at each epoch's end: the plot's points while no window has been logged (a fit shorter than
        # every_n_steps drew no load plot at all)
        self.epoch_history_steps: list[int] = []
        self.epoch_history: dict[str, list[np.ndarray]] = {}
        self._window: Window | None = None  # since the last log: runs on across epoch ends
        self._epoch: Window | None = None
        # the steps since the last log or epoch end: each step updates this one only, and it is added to the
        # window and the epoch when either ends (a step's statistics are computed once, not once per window)
        self._segment: Window | None = None
        self._last_logged_step: int | None = None
        self._step: int | None = None  # the global step at the last batch's end (a checkpoint records it)
        self._current_epoch: int | None = None  # the trainer's epoch, for the checkpoint (state_dict has no trainer)
        self._restored: dict[str, Any] | None = None  # open sums from a checkpoint, until the fit takes them

    def _fresh(self, pl_module) -> Window:
        return Window(list(pl_module.tasks))

    def state_dict(self) -> dict[str, Any]:
        """The load history behind the expert-load plot, so that a resumed fit plots the whole run (plain lists: a
        checkpoint loads without numpy objects), and the sums of the open window and epoch summed over ranks, so
        that a fit resumed mid-epoch logs the statistics a straight run logs. Collective: Lightning builds the
        checkpoint on every rank (and writes it on rank 0), as the module's epoch totals rely on too."""
        state = {"history_steps": list(self.history_steps), "history_every": self.history_every,
                 "history": {name: [load.tolist() for load in loads] for name, loads in self.history.items()},
                 "epoch_history_steps": list(self.epoch_history_steps),
                 "epoch_history": {name: [load.tolist() for load in loads]
                                   for name, loads in self.epoch_history.items()},
                 "last_logged_step": self._last_logged_step}
        if self._segment is None and self._window is None and self._epoch is None:
            return state  # no training step yet on any rank (they step together)
        tasks = next(w.tasks for w in (self._segment, self._window, self._epoch) if w is not None)
        open_sums = {}
        for key, target in (("window", self._window), ("epoch", self._epoch)):
            total = Window(tasks)  # the live sums stay this rank's own
            for part in (target, self._segment):
                if part is not None:
                    total.add(part)
            total.reduce()
            open_sums[key] = total.state_dict()
        state["open"] = {"epoch_index": self._current_epoch, "step": self._step, **open_sums}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history_steps = list(state_dict.get("history_steps", []))
        self.history_every = int(state_dict.get("history_every", 1))
        self.history = {name: [np.asarray(load, dtype=np.float64) for load in loads]
                        for name, loads in state_dict.get("history", {}).items()}
        self.epoch_history_steps = list(state_dict.get("epoch_history_steps", []))
        self.epoch_history = {name: [np.asarray(load, dtype=np.float64) for load in loads]
                              for name, loads in state_dict.get("epoch_history", {}).items()}
        self._last_logged_step = state_dict.get("last_logged_step")
        self._restored = state_dict.get("open")

    def _take_restored(self, trainer, pl_module) -> None:
        """A resumed fit's open sums go to rank 0 (they are the sums over the ranks of the saved run): the window
        always (it runs across epoch ends), the epoch's when the fit resumes inside the epoch they belong to. Sums
        of an epoch that ended with the checkpoint (written on its last batch: the resumed fit starts the next
        one) are that epoch's statistics: logged now, at the checkpoint's step, as the straight run logged them."""
        restored, self._restored = self._restored, None
        if restored is None or not trainer.is_global_zero:
            return
        self._window.add(Window.from_state_dict(restored["window"]))
        if restored["epoch_index"] == trainer.current_epoch:
            self._epoch.add(Window.from_state_dict(restored["epoch"]))
        elif restored["epoch"] is not None:  # with that epoch's last gradient probe, which the checkpoint holds
            names, matrix, probe_step = getattr(pl_module, "checkpoint_grad_probe", None) or (None, None, None)
            self._close_epoch(trainer, Window.from_state_dict(restored["epoch"]), restored["epoch_index"],
                              None if names is None else (names, matrix),
                              step=restored.get("step", trainer.global_step), probe_step=probe_step)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch = self._fresh(pl_module)
        self._current_epoch = trainer.current_epoch
        if self._restored is not None:
            if self._window is None:
                self._window = self._fresh(pl_module)
            self._take_restored(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        out = getattr(pl_module, "last_output", None)
        if out is None:
            return
        # made here when missing: a fit resumed from a checkpoint of an epoch's last batch starts the next epoch
        # without on_train_epoch_start (the checkpoint's open epoch sums then belong to the skipped epoch)
        if self._window is None:
            self._window = self._fresh(pl_module)
        if self._epoch is None:
            self._epoch = self._fresh(pl_module)
            self._current_epoch = trainer.current_epoch
        if self._restored is not None:
            self._take_restored(trainer, pl_module)
        if self._segment is None:
            self._segment = Window(list(pl_module.tasks), buffer_elements=SEGMENT_BUFFER_ELEMENTS)
        self._segment.update(out.routing, batch.labels, batch.weights)
        step = self._step = trainer.global_step
        # only on a batch that ended an optimizer step (Lightning's rule): with gradient accumulation the batches
        # before it end at the step before, and the first ones at step 0, which logged a window of one batch
        stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0 or bool(trainer.is_last_batch)
        if stepped and step % self.every_n_steps == 0 and step != self._last_logged_step:
            self._last_logged_step = step
            self._flush_segment()
            self._window.reduce()
            self._log(trainer, self._window.metrics("experts", "relatedness"), step)
            if step % (self.every_n_steps * self.history_every) == 0:
                self.history_steps.append(step)
                _append_loads(self.history, self._window)
                if len(self.history_steps) > MAX_LOAD_HISTORY:
                    self._thin_history()
            self._window = self._fresh(pl_module)

    def _thin_history(self) -> None:
        """Keep every other log point of the load history (those at multiples of twice the spacing), and record
        only those from now on: the history is bounded (it goes into every checkpoint, and a plot cannot show
        more columns than that anyway)."""
        self.history_every *= 2
        spacing = self.every_n_steps * self.history_every
        keep = [i for i, step in enumerate(self.history_steps) if step % spacing == 0]
        self.history_steps = [self.history_steps[i] for i in keep]
        self.history = {name: [loads[i] for i in keep if i < len(loads)] for name, loads in self.history.items()}

    def _flush_segment(self) -> None:
        if self._segment is not None:
            for target in (self._window, self._epoch):
                if target is not None:
                    target.add(self._segment)
            self._segment = None

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._flush_segment()
        if epoch_cut_short(trainer):
            # the epoch's sums stay open for a fit that resumes it (which logs the whole epoch at its end); what
            # this fit saw of it is logged as a partial epoch, its plots too: a fit that ends here (max_steps,
            # early stopping mid-epoch, a fit shorter than one epoch) logged no epoch statistics at all
            if self._epoch is not None:
                seen = copy.deepcopy(self._epoch)
                seen.reduce()
                self._close_epoch(trainer, seen, trainer.current_epoch, getattr(pl_module, "last_grad_cosine", None),
                                  probe_step=getattr(pl_module, "last_grad_cosine_step", None), partial=True)
            return
        # the epoch is closed: a checkpoint written after this (at the epoch's end) holds no open epoch sums, and
        # the sums below, already over all ranks, are never summed over the ranks again
        epoch, self._epoch = self._epoch, None
        if epoch is None:
            return
        epoch.reduce()
        # the epoch's last gradient probe, if it had one, and its step
        self._close_epoch(trainer, epoch, trainer.current_epoch, getattr(pl_module, "last_grad_cosine", None),
                          probe_step=getattr(pl_module, "last_grad_cosine_step", None))

    def _close_epoch(self, trainer, epoch: Window, index: int, grad_cosine=None, step: int | None = None,
                     probe_step: int | None = None, partial: bool = False) -> None:
        """Log a finished epoch's statistics (its sums over all ranks) at `step` (default: the current step);
        `partial`: an epoch cut short, logged under experts/partial_epoch/, relatedness/partial_epoch/ and
        relatedness/epoch_<nnn>_partial.json, and left out of the load history."""
        if epoch.empty:
            return
        step = trainer.global_step if step is None else step
        kind = "partial_epoch" if partial else "epoch"
        self._log(trainer, epoch.metrics(f"experts/{kind}", f"relatedness/{kind}"), step)
        if not partial and len(self.epoch_history_steps) < MAX_LOAD_HISTORY:  # one point an epoch; drawn while no
            self.epoch_history_steps.append(step)  # window has one
            _append_loads(self.epoch_history, epoch)
        if trainer.is_global_zero:  # the matrices as numbers too (the scalars are one triangle, the plot a picture)
            matrices = {kind: {"tasks": list(names), "matrix": matrix_for_json(mat)}
                        for kind, (names, mat) in epoch.relatedness().items()}
            if grad_cosine is not None:
                matrices["grad_cos"] = {"tasks": list(grad_cosine[0]), "matrix": matrix_for_json(grad_cosine[1])}
            name = f"relatedness/epoch_{index:03d}{'_partial' if partial else ''}.json"
            if matrices and self._artifact_logger(trainer):
                _unless_it_fails(name, lambda: log_json(trainer.logger, matrices, name))
        if self.plots and trainer.is_global_zero and self._artifact_logger(trainer):
            label = f"{index} (cut short at step {step})" if partial else index
            _unless_it_fails(f"epoch {index}'s plots", lambda: self.write_plots(trainer.logger, epoch, grad_cosine,
                                                                                   epoch=label, probe_step=probe_step))

    @staticmethod
    def _log(trainer, metrics: dict[str, float], step: int) -> None:
        if metrics and trainer.logger is not None and trainer.is_global_zero:
            trainer.logger.log_metrics(metrics, step=step)

    def figures(self, window: Window, grad_cosine=None, epoch: int | str | None = None,
                probe_step: int | None = None) -> dict[str, Any]:
        """The plots of a window; `epoch` (the one it closes) and `probe_step` (the gradient probe's) go into the
        titles."""
        figs = {}
        of_epoch = "" if epoch is None else f", epoch {epoch}"
        # experts a gate cannot reach (a PLE task gate over its level: the other tasks' own experts) as NaN, which
        # the plots leave blank and leave out of the gate's uniform share 1/E
        unreachable = {g: sorted(set(range(s.utilization.numel())) - set(reachable_experts(s)))
                       for g, s in window.gates.items()}

        def blank(gate: str, values: np.ndarray) -> np.ndarray:  # (..., E)
            values = np.array(values, dtype=float)
            values[..., unreachable.get(gate, [])] = np.nan
            return values

        if window.gates:
            figs["utilization_heatmap"] = plots.utilization_heatmap(
                {g: blank(g, s.utilization.numpy()) for g, s in window.gates.items()},
                title=f"Expert utilization (mean gate weight{of_epoch})")
        # the window points (every N steps); before the first, the epochs' ends
        steps, history = self.history_steps, self.history
        to_epoch = [f"to epoch {epoch}"] if epoch is not None else []
        title = "Per-expert load over training (" + ", ".join([f"every {self.every_n_steps * self.history_every} "
                                                               "steps", *to_epoch]) + ")"
        if not steps:
            steps, history = self.epoch_history_steps, self.epoch_history
            title = "Per-expert load at each epoch's end" + (f" ({to_epoch[0]})" if to_epoch else "")
        drawn = {g: v for g, v in history.items() if len(v) == len(steps)}
        if steps and drawn:  # a model without gates (shared-bottom) has no load to draw: no empty axes
            sparse = any(s.sparse for s in window.gates.values())
            figs["expert_load"] = plots.load_over_training(
                steps, {g: blank(g, np.stack(v)) for g, v in drawn.items()},
                ylabel="share of assignments" if sparse else "mean gate weight", title=title)
        matrices = {k: (n, m.numpy()) for k, (n, m) in window.relatedness().items()}
        if grad_cosine is not None:
            matrices["grad_cos"] = (grad_cosine[0], grad_cosine[1].numpy())
        if matrices:
            figs["task_relatedness"] = plots.relatedness_matrices(
                matrices, title=f"Task relatedness{of_epoch}" + (f" (gradient cosine: step {probe_step})"
                                                                 if grad_cosine is not None and probe_step is not None
                                                                 else ""))
        return figs

    def _artifact_logger(self, trainer) -> bool:
        """Whether the trainer's logger takes the plots and JSON (MLflow's does); says once when it does not,
        rather than drawing figures every epoch that nothing keeps."""
        from lightning.pytorch.loggers import MLFlowLogger

        if isinstance(trainer.logger, MLFlowLogger):
            return True
        if not getattr(self, "_said_no_artifacts", False):
            self._said_no_artifacts = True
            rank_zero_warn(f"RoutingMonitor: the plots and the relatedness JSON go to an MLflow logger only; this "
                           f"trainer's logger is {type(trainer.logger).__name__ if trainer.logger else 'none'}, so "
                           "they are not made (the experts/ and relatedness/ scalars are logged)")
        return False

    def write_plots(self, logger, window: Window, grad_cosine=None, epoch: int | str | None = None,
                    probe_step: int | None = None) -> None:
        for name, fig in self.figures(window, grad_cosine, epoch, probe_step).items():
            try:
                log_png(logger, fig, name)
            finally:
                plots.close(fig)
