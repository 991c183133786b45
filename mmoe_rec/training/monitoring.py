"""Expert utilization and task relatedness: pure functions from GateRecords / labels / gradients to numbers.

Nothing here logs or keeps state; `callbacks.RoutingMonitor` accumulates window sums with `GateStats` and
turns them into metrics with `utilization_metrics` / `relatedness_metrics`.

Definitions (E experts, T rows in the window, k chosen per row; sparse = the record says which experts each row
was sent to: `chosen` (token choice) or the `assigned` mask (expert choice, a row gets any number of experts)):
- utilization[e]: mean over rows of the combine weight on expert e (what each task's gate actually uses).
- fraction f[e] (sparse): share of assignments that went to e, counts / all assignments (k T for token choice);
  uniform routing gives 1/E.
- sent[e] (sparse): fraction of rows sent to e, counts / T (sums to k over the experts for token choice, to the
  mean number of experts per row for expert choice).
  fraction, sent, load CV^2, MaxVio and dead experts count the router's choices, before capacity: with a capacity
  factor an expert processes at most its capacity of them, the rest are the dropped fraction (below); the
  utilization (combine weights) is after capacity.
- importance CV^2: var / mean^2 (+eps) of Importance_i, the gate's weights summed per expert (Shazeer et al. 2017),
  before capacity as in the importance loss (GateRecord.importance; a dense gate's combine weights, it drops nothing;
  expert choice: the weights of the rows each expert took): the combine weights after capacity miss what the limit
  took off the overloaded experts and understate the imbalance.
- load CV^2: the same on per-expert assignment counts. MaxVio = (max load - mean load) / mean load.
- dead experts: experts with no assignment in the window.
- entropy: mean over rows of -sum_e p log p of the router probabilities, also divided by log E (1 = uniform),
  E counting the experts the gate can weigh (a PLE task gate: its own and the shared ones).
- dropped fraction: token choice: assignments dropped by capacity / all assignments (k T); expert choice: rows no
  expert took / T.
- router extras (router z, bias statistics): means over rows (each batch's value weighted by its rows).
- label correlation: Pearson, sample-weighted (a row of weight 2 counts twice, as in the losses and metrics).
- PLE share: per task gate, mean combine weight on each expert group ("own", "shared").
- gate similarity between tasks: mean over rows of the Jensen-Shannon divergence (base 2, in [0, 1]) and of the
  cosine of the two tasks' gate distributions on that row (their combine weights; rows either gate left without
  weight, dropped to the fallback, are left out); chosen-expert overlap: mean
  over rows of Jaccard(|S_a ∩ S_b| / |S_a ∪ S_b|). Per row, not of the window's mean distributions: balancing
  pulls every gate's mean towards uniform, and the means of two gates that route each row differently agree.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from mmoe_rec.nn.routing_record import GateRecord

EPS = 1e-10
PAIR_CHUNK_ELEMENTS = 1 << 20  # gate_pair_sums' temporaries: about 4 MB of float32 each


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """var / mean^2 of a (E,) vector (population variance); 0 for a constant vector."""
    x = x.double()
    return x.var(unbiased=False) / (x.mean() ** 2 + EPS)


def max_violation(load: torch.Tensor) -> torch.Tensor:
    load = load.double()
    mean = load.mean()
    return (load.max() - mean) / (mean + EPS)


def entropy_rows(probs: torch.Tensor) -> torch.Tensor:
    """(B, E) -> (B,) entropy in nats."""
    p = probs.double().clamp_min(0)
    return -(p * torch.log(p.clamp_min(EPS))).sum(-1)


def chosen_mask(record: GateRecord) -> torch.Tensor | None:
    """(B, E) bool of experts each row was sent to, or None for a dense gate."""
    if record.assigned is not None:
        return record.assigned.bool()
    if record.chosen is None:
        return None
    mask = torch.zeros_like(record.combine, dtype=torch.bool)
    mask.scatter_(1, record.chosen.long(), True)
    return mask


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos(a, b), whatever their scale (gradients of 1e-6 are as aligned as gradients of 1); NaN (undefined: left out
    of the logged scalars, null in the JSON, a grey cell in the plot) if either is 0, as a step whose rows all weigh
    0 gives every task: logged as 0 it read as orthogonal tasks, and each task as unlike itself."""
    a, b = a.double().flatten(), b.double().flatten()
    den = a.norm() * b.norm()
    return torch.where(den > 0, (a @ b) / den.clamp_min(torch.finfo(den.dtype).tiny), torch.nan)


def _ratio_or_zero(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den where den > 0, else 0 (no epsilon, which would shrink ratios of small numbers)."""
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), 0.0)


def pairwise_matrix(vectors: dict[str, torch.Tensor], fn) -> tuple[list[str], torch.Tensor]:
    names = list(vectors)
    n = len(names)
    mat = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            mat[i, j] = fn(vectors[names[i]], vectors[names[j]])
    return names, mat


def pair_scalars(prefix: str, names: list[str], matrix: torch.Tensor) -> dict[str, float]:
    """Upper-triangle entries as `<prefix>/<a>.vs.<b>` scalars (MLflow allows no other separator); an undefined
    entry (NaN: the correlation of a label that did not vary) is left out, not logged as a number."""
    pairs = ((i, j) for i in range(len(names)) for j in range(i + 1, len(names)))
    return {f"{prefix}/{names[i]}.vs.{names[j]}": float(matrix[i, j]) for i, j in pairs
            if math.isfinite(float(matrix[i, j]))}


def matrix_for_json(matrix: torch.Tensor) -> list[list[float | None]]:
    """A matrix as nested lists, an undefined (NaN) entry as null (JSON has no NaN)."""
    return [[v if math.isfinite(v) else None for v in row] for row in matrix.tolist()]


def label_correlation(sums: "LabelStats") -> tuple[list[str], torch.Tensor]:
    """Pearson correlation of the tasks' labels from their centred sums; NaN (undefined) in the row and column of
    a label that did not vary in the window (a rare task with no positive), whose 0 read as "uncorrelated"."""
    n = float(sums.count)
    cov = sums.m2 / n  # (T, T)
    var = cov.diagonal()
    # The sums are centred, so a constant label's variance is the rounding of its mean (~(1e-16 |mean|)^2), not of
    # E[y^2]: a label of mean 1e6 and std 1 still varies, while one of std 1e-10 of its mean reads constant.
    # Judged against the label's own scale, not an absolute epsilon (labels of scale 1e-6 are as correlated as 1).
    sd = torch.where(var > 1e-20 * sums.mean.square(), var.clamp_min(0).sqrt(), 0.0)  # (T,)
    corr = _ratio_or_zero(cov, torch.outer(sd, sd)).clamp(-1.0, 1.0)
    constant = sd == 0  # (T,)
    corr[constant, :] = float("nan")
    corr[:, constant] = float("nan")
    return list(sums.tasks), corr


def _zeros(*shape: int) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.float64)


@dataclasses.dataclass
class LabelStats:
    """Label statistics for the correlation, centred so that a label of large mean keeps its variance: count =
    sum w (), mean = the weighted mean (T,), m2 = sum w (y - mean)(y - mean)^T (T, T), and the number of rows ()
    (weights may be any non-negative scale: "more than one row" is judged on rows, not on sum w). Batches, windows
    and ranks merge by Chan et al.'s pairwise update (plain sums of y y^T lose a variance of 1 under a mean of
    1e6 to rounding).

    The statistics live on the labels' device and are read back only when the window is reduced, so that a
    training step on a GPU never waits for them."""

    tasks: list[str]
    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor
    rows: torch.Tensor

    @classmethod
    def empty(cls, tasks: list[str]) -> "LabelStats":
        t = len(tasks)
        return cls(list(tasks), _zeros(), _zeros(t), _zeros(t, t), _zeros())

    @classmethod
    def from_sums(cls, tasks: list[str], s1: torch.Tensor, s2: torch.Tensor, count: torch.Tensor,
                  rows: torch.Tensor) -> "LabelStats":
        """From the raw sums (sum w y, sum w y y^T) that checkpoints before 2026-12-07 hold."""
        mean = s1 / count if float(count) > 0 else torch.zeros_like(s1)
        m2 = s2 - count * torch.outer(mean, mean)
        # what the raw sums read as constant (their old rule: variance <= 1e-12 E[y^2]) stays constant: their
        # rounding noise would otherwise read as a variance in the centred statistics
        constant = m2.diagonal() <= 1e-12 * s2.diagonal()  # (T,)
        m2[constant, :] = 0.0
        m2[:, constant] = 0.0
        return cls(list(tasks), count, mean, m2, rows)

    def _merge(self, count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, rows: torch.Tensor | int) -> None:
        """Adds a group of rows given by its own count, mean and centred m2 (Chan et al.)."""
        total = self.count + count
        share = torch.where(total > 0, count / total.clamp_min(torch.finfo(total.dtype).tiny), 0.0)  # ()
        delta = mean - self.mean  # (T,)
        self.m2 = self.m2 + m2 + torch.outer(delta, delta) * (self.count * share)
        self.mean = self.mean + delta * share
        self.count, self.rows = total, self.rows + rows

    def _move_to(self, device: torch.device) -> None:
        if self.mean.device != device:
            self.count, self.mean, self.m2, self.rows = (v.to(device) for v in (self.count, self.mean, self.m2,
                                                                                self.rows))

    def update(self, labels: dict[str, torch.Tensor], weights: torch.Tensor | None = None) -> None:
        y = torch.stack([labels[t].detach().double() for t in self.tasks], dim=1)  # (B, T)
        self._move_to(y.device)
        w = torch.ones_like(y[:, 0]) if weights is None else weights.detach().double()  # (B,)
        count = w.sum()
        mean = (w @ y) / count.clamp_min(torch.finfo(count.dtype).tiny)  # (T,); 0 for a batch of weight 0
        centred = y - mean
        m2 = (centred * w[:, None]).T @ centred  # (T, T)
        self._merge(count, mean, m2, y.shape[0])  # rows from the shape: no read back from the device

    def add(self, other: "LabelStats") -> None:
        """Adds another window's statistics (the same tasks) into these."""
        self._move_to(other.mean.device)
        self._merge(other.count, other.mean, other.m2, other.rows)

    def reduce(self, all_reduce) -> None:
        """Merges every rank's statistics in place with `all_reduce` (a sum over ranks, returned on the CPU): first
        the counts and weighted means, then each rank's m2 re-centred on the common mean. Collective: every rank
        calls it at the same point."""
        count, rows, weighted = all_reduce([self.count, self.rows, self.count * self.mean])
        mean = weighted / count if float(count) > 0 else torch.zeros_like(weighted)
        delta = self.mean.cpu() - mean  # (T,)
        (m2,) = all_reduce([self.m2 + self.count * torch.outer(delta, delta).to(self.m2.device)])
        self.count, self.mean, self.m2, self.rows = count, mean, m2, rows

    def state(self) -> dict[str, torch.Tensor]:
        return {"count": self.count.cpu(), "mean": self.mean.cpu(), "m2": self.m2.cpu(), "rows": self.rows.cpu()}

    @classmethod
    def from_state(cls, tasks: list[str], state: dict[str, torch.Tensor]) -> "LabelStats":
        if "m2" not in state:  # a checkpoint written before the statistics were centred
            return cls.from_sums(tasks, state["s1"], state["s2"], state["count"], state["rows"])
        return cls(list(tasks), state["count"], state["mean"], state["m2"], state["rows"])

    @property
    def defined(self) -> bool:
        """Whether a correlation can be computed: more than one row, of positive total weight."""
        return bool(self.rows > 1) and bool(self.count > 0)


@dataclasses.dataclass
class GateStats:
    """Window sums for one gate: everything needed for its utilization metrics, and summable across ranks.

    Sums are tensors on the gate's device (rows and the drop base are counted from shapes), so updating them never
    reads a value back to the host; `utilization_metrics` reads them once per window."""

    combine_sum: torch.Tensor  # (E,) sum over rows of combine weights (after capacity)
    probs_sum: torch.Tensor  # (E,) sum over rows of router probabilities
    counts: torch.Tensor  # (E,) assignments per expert (sparse gates; zeros for dense)
    dropped: torch.Tensor  # () dropped assignments (token choice) or untaken rows (expert choice)
    entropy_sum: torch.Tensor  # () sum over rows of the router entropy (nats)
    rows: float = 0.0
    drop_base: float = 0.0  # what `dropped` is out of: assignments (token choice) or rows (expert choice)
    sparse: bool = False
    groups: dict[str, list[int]] | None = None
    extra_sum: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # () value x rows, per extra
    importance_sum: torch.Tensor | None = None  # (E,) Importance_i: gate weights before capacity (None: combine_sum)

    def __post_init__(self) -> None:
        if self.importance_sum is None:  # sums saved before it was kept: the combine weights'
            self.importance_sum = self.combine_sum.clone()

    @classmethod
    def empty(cls, num_experts: int) -> "GateStats":
        return cls(_zeros(num_experts), _zeros(num_experts), _zeros(num_experts), _zeros(), _zeros())

    def _move_to(self, device: torch.device) -> None:
        for field in ("combine_sum", "importance_sum", "probs_sum", "counts", "dropped", "entropy_sum"):
            setattr(self, field, getattr(self, field).to(device))
        self.extra_sum = {k: v.to(device) for k, v in self.extra_sum.items()}

    def update(self, record: GateRecord) -> None:
        combine = record.combine.detach().double()  # (B, E)
        probs = record.probs.detach().double()  # (B, E)
        if self.combine_sum.device != combine.device:
            self._move_to(combine.device)
        rows = combine.shape[0]
        combine_sum = combine.sum(0)  # (E,)
        self.combine_sum += combine_sum
        self.importance_sum += combine_sum if record.importance is None else record.importance.detach().double()
        self.probs_sum += probs.sum(0)
        self.rows += rows
        self.entropy_sum += entropy_rows(probs).sum()
        mask = chosen_mask(record)
        if mask is not None:
            self.sparse = True
            self.counts += mask.sum(0)
            self.drop_base += record.drop_base
        if record.dropped is not None:
            self.dropped += record.dropped.detach().to(self.dropped.device)
        self.groups = record.expert_groups
        for key, value in record.extra.items():
            v = value.detach().double().mean().to(self.dropped.device)  # a per-expert extra (bias statistics): mean
            self.extra_sum[key] = self.extra_sum.get(key, torch.zeros_like(self.dropped)) + rows * v

    def add(self, other: "GateStats") -> None:
        """Adds another window's sums for the same gate into these (new tensors: `other` is left as it is)."""
        device = other.dropped.device
        if self.dropped.device != device:
            self._move_to(device)
        for field in ("combine_sum", "importance_sum", "probs_sum", "counts", "dropped", "entropy_sum"):
            setattr(self, field, getattr(self, field) + getattr(other, field))
        self.rows += other.rows
        self.drop_base += other.drop_base
        self.sparse = self.sparse or other.sparse
        self.groups = other.groups if other.groups is not None else self.groups
        for key, total in other.extra_sum.items():
            self.extra_sum[key] = self.extra_sum[key] + total if key in self.extra_sum else total.clone()

    # flat view for an all-reduce (sum) across ranks; order is fixed by the fields
    def tensors(self) -> list[torch.Tensor]:
        device = self.dropped.device
        counted = torch.tensor([self.rows, self.drop_base], dtype=torch.float64, device=device)
        summed = torch.stack([self.dropped, self.entropy_sum] + [self.extra_sum[k] for k in sorted(self.extra_sum)])
        return [self.combine_sum, self.importance_sum, self.probs_sum, self.counts, torch.cat([counted, summed])]

    def load_tensors(self, tensors: list[torch.Tensor]) -> None:
        self.combine_sum, self.importance_sum, self.probs_sum, self.counts, s = tensors
        self.rows, self.drop_base = float(s[0]), float(s[1])
        self.dropped, self.entropy_sum = s[2], s[3]
        for key, v in zip(sorted(self.extra_sum), s[4:]):
            self.extra_sum[key] = v

    @property
    def utilization(self) -> torch.Tensor:
        return self.combine_sum / max(self.rows, 1.0)

    @property
    def mean_probs(self) -> torch.Tensor:
        return self.probs_sum / max(self.rows, 1.0)

    @property
    def assignments(self) -> torch.Tensor:
        """() all assignments: k per row for token choice, any number per row for expert choice."""
        return self.counts.sum()

    @property
    def fraction(self) -> torch.Tensor:
        return self.counts / self.assignments.clamp_min(1.0)


def reachable_experts(stats: GateStats) -> list[int]:
    """The experts a gate can weigh: a PLE task gate is recorded over its whole level, with weight 0 on the other
    tasks' own experts (its groups name the ones it reaches); any other gate reaches all of them."""
    if stats.groups:
        return sorted({i for idx in stats.groups.values() for i in idx})
    return list(range(stats.utilization.numel()))


def utilization_metrics(name: str, stats: GateStats, prefix: str = "experts") -> dict[str, float]:
    """Scalars for one gate: `<prefix>/<gate>/util/e<i>`, `.../entropy`, sparse load statistics, extras."""
    out: dict[str, float] = {}
    base = f"{prefix}/{name}"
    util = stats.utilization
    for i, u in enumerate(util.tolist()):
        out[f"{base}/util/e{i}"] = u
    # Balance statistics over the experts the gate can reach (a PLE task gate: its own + the shared ones); the other
    # tasks' own experts would count as dead and inflate CV^2 and MaxVio. The per-expert util / fraction / sent
    # keys stay level-wide so that tasks compare expert by expert.
    reach = reachable_experts(stats)
    out[f"{base}/importance_cv2"] = float(cv_squared(stats.importance_sum[reach]))
    entropy = float(stats.entropy_sum) / max(stats.rows, 1.0)
    out[f"{base}/entropy"] = entropy
    out[f"{base}/entropy_norm"] = entropy / math.log(len(reach)) if len(reach) > 1 else 0.0
    if stats.sparse:
        for i, f in enumerate(stats.fraction.tolist()):
            out[f"{base}/fraction/e{i}"] = f
        for i, f in enumerate((stats.counts / max(stats.rows, 1.0)).tolist()):
            out[f"{base}/sent/e{i}"] = f
        counts = stats.counts[reach]
        out[f"{base}/load_cv2"] = float(cv_squared(counts))
        out[f"{base}/max_vio"] = float(max_violation(counts))
        out[f"{base}/dead"] = float((counts == 0).sum())
        out[f"{base}/dropped_frac"] = float(stats.dropped) / max(stats.drop_base, 1.0)
    if stats.groups:
        for group, idx in stats.groups.items():
            out[f"{base}/share/{group}"] = float(util[list(idx)].sum())
    for key, total in stats.extra_sum.items():
        out[f"{base}/{key}"] = float(total) / max(stats.rows, 1.0)
    return out


def _level_number(gate: str) -> int:
    """'10/click' or 'level10/click' -> 10: levels compare as numbers, so level 10 follows level 9."""
    digits = "".join(ch for ch in gate.split("/", 1)[0] if ch.isdigit())
    return int(digits) if digits else -1


def task_gates(gate_names: list[str], tasks: list[str]) -> dict[str, str]:
    """task -> the gate that feeds its tower: gate `task`, or for PLE the last level's `<level>/<task>`."""
    out = {}
    for task in tasks:
        if task in gate_names:
            out[task] = task
            continue
        # `<level>/<task>`: the level is before the first "/", the task all after it (a task name may hold "/")
        levels = [g for g in gate_names if "/" in g and g.split("/", 1)[1] == task]
        if levels:
            out[task] = max(levels, key=_level_number)
    return out


def js_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(..., E) x2 -> (...,) Jensen-Shannon divergence of each row's two distributions, base 2 (rows normalised)."""
    p = p / p.sum(-1, keepdim=True).clamp_min(EPS)
    q = q / q.sum(-1, keepdim=True).clamp_min(EPS)
    m = 0.5 * (p + q)

    def kl(a, b):  # 0 log 0 = 0
        return (a * (torch.log2(a.clamp_min(EPS)) - torch.log2(b.clamp_min(EPS)))).sum(-1)

    return (0.5 * kl(p, m) + 0.5 * kl(q, m)).clamp_min(0.0)  # rounding can leave -1e-8


def cosine_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., E) x2 -> (...,) cosine of each row pair; 0 where either row is 0."""
    return _ratio_or_zero((a * b).sum(-1), a.norm(dim=-1) * b.norm(dim=-1))


def gate_pair_sums(combines: torch.Tensor) -> torch.Tensor:
    """(T, B, E) combine weights of T tasks' gates over the same experts -> (P, 3) float64 for the P = T(T-1)/2
    pairs in `torch.triu_indices(T, T, 1)` order: [sum of the JS divergence, sum of the cosine, rows], over the
    rows both gates weigh. A row a gate left without weight (expert choice: no expert took it; token choice:
    every choice dropped by capacity; it goes to the fallback) has no distribution to compare: counted as 0 it
    would read identical gates as cosine 0.8 when a fifth of the rows are dropped.
    On the gates' device, all pairs in one pass over rows taken in chunks of at most `PAIR_CHUNK_ELEMENTS`
    pair-row-expert values, which bounds the temporaries of a monitor that settles many batches at once."""
    T, B, E = combines.shape
    i, j = torch.triu_indices(T, T, 1, device=combines.device)
    step = max(1, PAIR_CHUNK_ELEMENTS // max(1, len(i) * E))
    out = torch.zeros(len(i), 3, dtype=torch.float64, device=combines.device)
    for start in range(0, B, step):
        chunk = combines[:, start:start + step].float()
        a, b = chunk[i], chunk[j]  # (P, rows, E)
        both = ((a.sum(-1) > 0) & (b.sum(-1) > 0)).to(torch.float32)  # (P, rows)
        js, cos = (js_rows(a, b) * both).sum(-1), (cosine_rows(a, b) * both).sum(-1)  # (P,)
        out += torch.stack([js, cos, both.sum(-1)], dim=1).double()
    return out


def gate_similarity(names: list[str], pair_sums: torch.Tensor) -> dict[str, tuple[list[str], torch.Tensor]]:
    """Tasks whose gates span the same experts, their `gate_pair_sums` summed over a window -> per-row means
    {"gate_js": (names, matrix), "gate_cos": (names, matrix)} (diagonal: JS 0, cosine 1).

    PLE task gates are recorded over all experts of their level (zero weight on the other tasks' own experts),
    so a task that uses only its own experts and one that uses only its own are disjoint (JS 1, cosine 0).
    A pair no row was weighted by both gates of is NaN (undefined), as the label correlation of a constant label.
    """
    T = len(names)
    if T < 2:
        return {}
    i, j = torch.triu_indices(T, T, 1)
    rows = pair_sums[:, 2:].double().cpu()  # (P, 1) rows both gates weigh
    # a pair with no such row has no similarity (NaN, not JS 0 "identical"): expert choice's disjoint rows
    means = torch.where(rows > 0, pair_sums[:, :2].double().cpu() / rows.clamp_min(1.0), float("nan"))  # (P, 2)
    js, cos = torch.zeros(T, T, dtype=torch.float64), torch.eye(T, dtype=torch.float64)
    js[i, j] = js[j, i] = means[:, 0]
    cos[i, j] = cos[j, i] = means[:, 1]
    return {"gate_js": (list(names), js), "gate_cos": (list(names), cos)}


def jaccard_sums(mask_a: torch.Tensor, mask_b: torch.Tensor) -> torch.Tensor:
    """(B, E) bool x2 -> (2,) float64: the sum of |A ∩ B| / |A ∪ B| over the rows either gate sent somewhere, and
    the number of those rows. A row neither sent anywhere (expert choice: no expert took it) says nothing about
    overlap and is left out (scored 1, it made disjoint gates look alike); a row only one gate sent scores 0."""
    inter = (mask_a & mask_b).sum(-1).double()
    union = (mask_a | mask_b).sum(-1).double()
    return torch.stack([(inter / union.clamp_min(1)).sum(), (union > 0).sum().double()])


def gradient_cosine(grads: dict[str, torch.Tensor]) -> tuple[list[str], torch.Tensor]:
    """task -> flat gradient of its loss on the shared parameters  ->  cosine matrix."""
    return pairwise_matrix(grads, cosine)
