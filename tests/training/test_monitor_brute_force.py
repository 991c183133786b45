"""RoutingMonitor's logged numbers against a brute-force recomputation from the gates each batch recorded: every
window (every N optimizer steps, across epoch ends, with gradient accumulation and a partial last accumulation
group) and every epoch, the sparse statistics with capacity drops, the sample-weighted label correlation; and the
module's gradient cosine against per-task gradients computed on a copy of the model."""
from __future__ import annotations

import copy
import itertools
import math

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers.logger import Logger

from conftest import MMOE, SPARSE
from mmoe_rec.data.datamodule import FeatureDataModule
from mmoe_rec.training.callbacks import RoutingMonitor
from mmoe_rec.training.losses import task_losses
from mmoe_rec.training.module import MultiTaskModule

FAST = dict(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, limit_val_batches=0)


class Capture(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, dict[str, float]]] = []

    name = "capture"
    version = 0

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.calls.append((step, dict(metrics)))


class Recorder(L.Callback):
    """Every training batch's gate records, labels and weights (CPU copies), its epoch, index and global step."""

    def __init__(self) -> None:
        self.batches: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        fields = ("combine", "probs", "chosen", "dropped", "assigned", "importance")
        rec = {}
        for name, r in pl_module.last_output.routing.items():
            rec[name] = {f: (getattr(r, f).detach().cpu().clone() if torch.is_tensor(getattr(r, f)) else None)
                         for f in fields}
            rec[name]["groups"] = copy.deepcopy(r.expert_groups)
            rec[name]["extra"] = {k: float(v.detach().double().mean()) for k, v in r.extra.items()}
        self.batches.append(dict(epoch=trainer.current_epoch, idx=batch_idx, step=trainer.global_step, rec=rec,
                                 labels={t: v.detach().cpu().double() for t, v in batch.labels.items()},
                                 w=None if batch.weights is None else batch.weights.cpu().double()))


def _mask(r) -> torch.Tensor | None:
    if r["assigned"] is not None:
        return r["assigned"].bool()
    if r["chosen"] is None:
        return None
    m = torch.zeros_like(r["combine"], dtype=torch.bool)
    for i, row in enumerate(r["chosen"].tolist()):
        for e in row:
            m[i, e] = True
    return m


def brute(batches: list[dict], tasks: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    """(experts/<gate>/... suffixes, relatedness/... suffixes) computed row by row from the records."""
    ex: dict[str, float] = {}
    for g in batches[0]["rec"]:
        recs = [b["rec"][g] for b in batches]
        comb = torch.cat([r["combine"].double() for r in recs])
        probs = torch.cat([r["probs"].double() for r in recs])
        rows, E = comb.shape
        groups = recs[0]["groups"]
        reach = sorted({i for v in groups.values() for i in v}) if groups else list(range(E))
        for e in range(E):
            ex[f"{g}/util/e{e}"] = float(comb[:, e].mean())
        imp = sum(r["importance"].double() if r["importance"] is not None else r["combine"].double().sum(0)
                  for r in recs)[reach]
        ex[f"{g}/importance_cv2"] = float(imp.var(unbiased=False) / imp.mean() ** 2)
        ent = float(np.mean([-sum(p * math.log(p) for p in row if p > 0) for row in probs.tolist()]))
        ex[f"{g}/entropy"], ex[f"{g}/entropy_norm"] = ent, ent / math.log(len(reach))
        if _mask(recs[0]) is not None:
            counts = torch.cat([_mask(r) for r in recs]).double().sum(0)
            for e in range(E):
                ex[f"{g}/fraction/e{e}"] = float(counts[e] / counts.sum())
                ex[f"{g}/sent/e{e}"] = float(counts[e] / rows)
            c = counts[reach]
            ex[f"{g}/load_cv2"] = float(c.var(unbiased=False) / c.mean() ** 2)
            ex[f"{g}/max_vio"] = float((c.max() - c.mean()) / c.mean())
            ex[f"{g}/dead"] = float((c == 0).sum())
            base = sum(r["chosen"].numel() if r["chosen"] is not None else r["combine"].shape[0] for r in recs)
            ex[f"{g}/dropped_frac"] = sum(int(r["dropped"]) for r in recs) / base
        if groups:
            for k, idx in groups.items():
                ex[f"{g}/share/{k}"] = float(comb[:, idx].sum(1).mean())
        for k in recs[0]["extra"]:
            ex[f"{g}/{k}"] = sum(r["extra"][k] * r["combine"].shape[0] for r in recs) / rows
    rel: dict[str, float] = {}
    y = {t: torch.cat([b["labels"][t] for b in batches]) for t in tasks}
    w = torch.ones_like(y[tasks[0]]) if batches[0]["w"] is None else torch.cat([b["w"] for b in batches])
    for a, b in itertools.combinations(tasks, 2):
        ma, mb = (w * y[a]).sum() / w.sum(), (w * y[b]).sum() / w.sum()
        va, vb = (w * (y[a] - ma) ** 2).sum(), (w * (y[b] - mb) ** 2).sum()
        if va > 0 and vb > 0:
            rel[f"label_corr/{a}.vs.{b}"] = float((w * (y[a] - ma) * (y[b] - mb)).sum() / (va * vb).sqrt())
        A = torch.cat([x["rec"][a]["combine"].double() for x in batches]).tolist()
        B = torch.cat([x["rec"][b]["combine"].double() for x in batches]).tolist()
        js = cs = n = 0.0
        for pa, pb in zip(A, B):
            sa, sb = sum(pa), sum(pb)
            if sa <= 0 or sb <= 0:
                continue
            p, q = [x / sa for x in pa], [x / sb for x in pb]
            m = [(u + v) / 2 for u, v in zip(p, q)]
            js += sum(0.5 * u * math.log2(u / mm) for u, mm in zip(p, m) if u > 0)
            js += sum(0.5 * v * math.log2(v / mm) for v, mm in zip(q, m) if v > 0)
            cs += sum(u * v for u, v in zip(pa, pb)) / math.sqrt(sum(u * u for u in pa) * sum(v * v for v in pb))
            n += 1
        rel[f"gate_js/{a}.vs.{b}"], rel[f"gate_cos/{a}.vs.{b}"] = js / n, cs / n
        if _mask(batches[0]["rec"][a]) is not None:
            MA = torch.cat([_mask(x["rec"][a]) for x in batches])
            MB = torch.cat([_mask(x["rec"][b]) for x in batches])
            inter, union = (MA & MB).sum(1).double(), (MA | MB).sum(1).double()
            rel[f"expert_jaccard/{a}.vs.{b}"] = float((inter[union > 0] / union[union > 0]).mean())
    return ex, rel


def _compare(metrics, experts_prefix, related_prefix, batches, tasks, where):
    ex, rel = brute(batches, tasks)
    def suffixes(prefix: str, nested: tuple[str, ...]) -> dict[str, float]:
        """The keys under `prefix/`, without those of the epoch logs nested under the window's prefix."""
        return {k[len(prefix) + 1:]: v for k, v in metrics.items()
                if k.startswith(prefix + "/") and not k.startswith(nested) and "/grad_cos/" not in k}

    nested = ("epoch/", "partial_epoch/")
    got_ex = suffixes(experts_prefix, tuple(f"{experts_prefix}/{n}" for n in nested))
    got_rel = suffixes(related_prefix, tuple(f"{related_prefix}/{n}" for n in nested))
    for want, got in ((ex, got_ex), (rel, got_rel)):
        assert set(got) == set(want), where
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), f"{where}: {key}"


SPARSE_CAPPED = {"class_path": SPARSE["class_path"], "init_args": {**SPARSE["init_args"], "capacity_factor": 1.0}}


@pytest.mark.parametrize("model, every, accumulate, weighted", [(MMOE, 4, 1, False), (MMOE, 2, 3, True),
                                                                (SPARSE_CAPPED, 3, 2, True)],
                         ids=["mmoe", "mmoe-accumulate-weighted", "sparse-capacity-accumulate-weighted"])
def test_every_logged_window_and_epoch_equals_a_brute_force_over_its_batches(make_feature_dir, tmp_path, model,
                                                                             every, accumulate, weighted):
    # 900 rows in batches of 96: 10 batches an epoch, the last of 36; accumulating 2 or 3 leaves a partial group
    features = make_feature_dir("brute", rows={"train": 900, "valid": 100}, with_weight=weighted)
    L.seed_everything(0)
    dm = FeatureDataModule(str(features), batch_size=96, seed=3, shuffle_buffer=256)
    module = MultiTaskModule(model=copy.deepcopy(model), feature_spec=dm.spec,
                             optimizer={"class_path": "torch.optim.Adam", "init_args": {"lr": 0.05}})
    recorder, logger = Recorder(), Capture()
    trainer = L.Trainer(max_epochs=2, logger=logger, callbacks=[recorder, RoutingMonitor(every, plots=False)],
                        accumulate_grad_batches=accumulate, default_root_dir=tmp_path, **FAST)
    trainer.fit(module, dm)
    tasks, batches = list(module.tasks), recorder.batches
    # each batch belongs to the optimizer step it ended in (the step at the batch that completed its group)
    for i, b in enumerate(batches):
        last = i + 1 == len(batches) or batches[i + 1]["epoch"] != b["epoch"]
        b["ends_step"] = (b["idx"] + 1) % accumulate == 0 or last
    pending = []
    for b in batches:
        pending.append(b)
        if b["ends_step"]:
            for p in pending:
                p["opt_step"] = b["step"]
            pending = []
    window_logs = [(s, m) for s, m in logger.calls if f"experts/{tasks[0]}/util/e0" in m]
    assert [s for s, _ in window_logs] == list(range(every, trainer.global_step + 1, every))
    previous = 0
    for step, metrics in window_logs:
        _compare(metrics, "experts", "relatedness", [b for b in batches if previous < b["opt_step"] <= step],
                 tasks, f"window at {step}")
        previous = step
    epoch_logs = [m for _, m in logger.calls if f"experts/epoch/{tasks[0]}/util/e0" in m]
    assert len(epoch_logs) == 2
    for epoch, metrics in enumerate(epoch_logs):
        _compare(metrics, "experts/epoch", "relatedness/epoch", [b for b in batches if b["epoch"] == epoch], tasks,
                 f"epoch {epoch}")


class FirstBatch(L.Callback):
    """A copy of the model and the batch as they were when the first training step began."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0 and trainer.current_epoch == 0:
            self.model, self.batch = copy.deepcopy(pl_module.model), copy.deepcopy(batch)


def test_the_gradient_cosine_is_that_of_each_tasks_own_gradient_on_the_experts_and_embeddings(feature_dir,
                                                                                                tmp_path):
    L.seed_everything(0)
    dm = FeatureDataModule(str(feature_dir), batch_size=96, seed=3)
    module = MultiTaskModule(model=copy.deepcopy(MMOE), feature_spec=dm.spec, grad_similarity_every=5)
    first, logger = FirstBatch(), Capture()
    trainer = L.Trainer(max_steps=1, logger=logger, callbacks=[first], default_root_dir=tmp_path, **FAST)
    trainer.fit(module, dm)
    logged = [m["relatedness/grad_cos/click.vs.convert"] for s, m in logger.calls
              if "relatedness/grad_cos/click.vs.convert" in m and s == 0]
    model = first.model
    shared = [p for n, p in model.named_parameters() if n.startswith(("front.", "experts."))]  # MMoE's shared part
    grads = []
    for task in ("click", "convert"):
        model.zero_grad()
        out = model(first.batch)
        task_losses(out.logits, first.batch.labels, dm.spec, ["click", "convert"])[task].backward()
        grads.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().double()
                                for p in shared]))
    want = float(grads[0] @ grads[1] / (grads[0].norm() * grads[1].norm()))
    assert logged == [pytest.approx(want, rel=1e-5, abs=1e-7)]


def test_a_gradient_probe_on_rows_that_all_weigh_0_logs_no_cosine_as_a_constant_label_logs_no_correlation(
        make_feature_dir, tmp_path):
    # FAILS on 4f40d27 (the defect): every task's loss gradient is 0, their cosine undefined, and it was logged as
    # 0.0 ("orthogonal tasks"), with 0 on the matrix's diagonal (a task unlike itself), while the label correlation
    # of that window (total weight 0) is left out as undefined
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmoe_rec.features.spec import WEIGHT_COLUMN

    features = make_feature_dir("zero_weights", rows={"train": 300, "valid": 100}, with_weight=True)
    for path in (features / "train").glob("*.parquet"):
        table = pq.read_table(path)
        column = table.schema.get_field_index(WEIGHT_COLUMN)
        table = table.set_column(column, WEIGHT_COLUMN, pa.array(np.zeros(table.num_rows, np.float32)))
        pq.write_table(table, path, row_group_size=300)
    L.seed_everything(0)
    dm = FeatureDataModule(str(features), batch_size=100, seed=3)
    module = MultiTaskModule(model=copy.deepcopy(MMOE), feature_spec=dm.spec, grad_similarity_every=1)
    logger = Capture()
    trainer = L.Trainer(max_steps=1, logger=logger, callbacks=[RoutingMonitor(1, plots=False)],
                        default_root_dir=tmp_path, **FAST)
    trainer.fit(module, dm)
    logged = {k: v for _, m in logger.calls for k, v in m.items() if "grad_cos" in k or "label_corr" in k}
    assert "relatedness/label_corr/click.vs.convert" not in logged  # undefined: left out
    assert "relatedness/grad_cos/click.vs.convert" not in logged, logged  # undefined too, not 0.0
    assert not torch.isfinite(module.last_grad_cosine[1]).any()
