"""Real multi-process training on CPU (gloo): `mmoe-rec fit --trainer.devices 2` in a subprocess.

- DDP: 2 processes x batch 32 against 1 process x batch 64 (same global batch, same seed, 2 epochs). The ranks
  see different row orders (each rank streams its own contiguous slice), so runs are not bitwise equal:
  validation AUCs must agree within AUC_TOLERANCE. Every training row is seen exactly once per epoch: per-rank
  row counts and the sum of feature d0 over the rows seen add up to the train split's, and the logged
  `train/rows_seen` (summed over steps and ranks) equals the split size. RoutingMonitor's all-reduced epoch
  label correlation equals the 1-process one.
- torchrec DMP: table-wise sharded embedding tables under Lightning, 2 processes; the checkpoint (tables
  gathered to rank 0) reloads into an unsharded module that reproduces the run's validation AUC, and a sharded
  run resumed from it ends bitwise equal to one that ran straight through (tables and their fused optimizer
  state go back into each rank's shards). With single-valued features only, the front's one fused table
  trains sharded the same way and reloads unsharded. GradNorm's step is the same sharded as under plain DDP.
  column_wise (tables of 256 columns, split across the ranks) ends as table_wise, bitwise; data_parallel
  replicates the tables.
- Ranks forked from the launching process (ddp_fork; the sharded strategy with start_method fork) where the test is
  about the numbers (PLAIN_FORK / SHARDED_FORK below); each rank a process of its own (ddp) where the launcher is.
"""
from __future__ import annotations

import copy
import importlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import time
import sys
from pathlib import Path

import lightning as L
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from conftest import MMOE, SPARSE, metric_history, mlflow_run
from mmoe_rec.data.datamodule import FeatureDataModule
from mmoe_rec.features.spec import FeatureSpec
from mmoe_rec.nn.embedding import FUSED_TABLE
from mmoe_rec.training.cli import run_lightning_cli
from mmoe_rec.training.module import MultiTaskModule
from mmoe_rec.training.sharding import SHARDED_OPTIMIZER_KEY, ShardedEmbeddingStrategy

pytestmark = pytest.mark.seeded_mlflow_store  # tmp_path/mlflow.db: a copy of an empty store (tests/conftest.py)

AUC_TOLERANCE = 0.02
HERE = Path(__file__).resolve().parent
# Where a test is about the numbers, not about how ranks are started, its ranks are forked from the launching
# process (Lightning's launcher for notebooks): they do not import torch, Lightning, MLflow and torchrec again, some
# 8-10 s a run on a slow VM. The default `ddp` (each rank a process of its own, as `mmoe-rec fit` runs on a cluster)
# is kept where it is the point: the comparison with one process, the launcher's failure and SIGTERM tests, and one
# sharded fit (the table-wise test's straight run; its resumed run, forked, must end bitwise equal to it).
PLAIN_FORK = ("--trainer.strategy", "ddp_fork")
SHARDED_FORK = ("--trainer.strategy.class_path", "mmoe_rec.training.sharding.ShardedEmbeddingStrategy",
                "--trainer.strategy.init_args.start_method", "fork")


def write_config(path: Path, feature_dir: Path, batch_size: int, audit_dir: Path, epochs: int = 2,
                 checkpoint: bool = False, every_epoch: bool = False, plots: bool = False) -> Path:
    """`checkpoint`: last.ckpt and the latest epoch's under <config folder>/ckpt; `every_epoch`: every epoch's kept.
    `plots`: the RoutingMonitor's epoch-end PNGs (rank 0; ~2.5 s an epoch on a slow VM, while the other rank waits),
    drawn in the test that compares with one process; the statistics are all-reduced and logged either way."""
    callbacks = [{"class_path": "row_audit.RowAudit", "init_args": {"out_dir": str(audit_dir)}},
                 {"class_path": "mmoe_rec.training.callbacks.RoutingMonitor",
                  "init_args": {"every_n_steps": 5, "plots": plots}}]
    if checkpoint:
        callbacks.append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                          "init_args": {"dirpath": str(path.parent / "ckpt"), "save_last": True,
                                        **({"save_top_k": -1} if every_epoch else {})}})
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": epochs, "enable_progress_bar": False,
                    "enable_model_summary": False, "num_sanity_val_steps": 0, "log_every_n_steps": 5,
                    "enable_checkpointing": checkpoint, "callbacks": callbacks},
        "model": {"class_path": "mmoe_rec.training.module.MultiTaskModule",
                  "init_args": {"model": MMOE, "optimizer": {"class_path": "torch.optim.Adam",
                                                             "init_args": {"lr": 0.01}}}},
        "data": {"class_path": "mmoe_rec.data.datamodule.FeatureDataModule",
                 "init_args": {"data_dir": str(feature_dir), "batch_size": batch_size, "seed": 0}},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


SEED_STORE = None  # tests/conftest.py's seed_mlflow_store, set for each test by the fixture below


@pytest.fixture(autouse=True)
def _seed_store(seed_mlflow_store):
    global SEED_STORE
    SEED_STORE = seed_mlflow_store


def run_two_processes(workdir: Path, config: Path, *extra: str, check: bool = True, subcommand: str = "fit",
                      timeout: float = 240) -> subprocess.CompletedProcess:
    """The job's MLflow store, the default one in `workdir`, starts as a copy of the session's empty one."""
    if not (workdir / "mlflow.db").exists():
        SEED_STORE(workdir)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "mmoe_rec.cli", subcommand, "--config", str(config),
           "--trainer.devices", "2", *extra]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0 or not check, proc.stderr[-4000:]
    return proc


def audit(audit_dir: Path) -> dict[int, dict[str, float]]:
    """epoch -> rows and d0 summed over ranks (and the per-rank rows)."""
    out: dict[int, dict[str, float]] = {}
    for f in sorted(audit_dir.glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            e = out.setdefault(r["epoch"], {"rows": 0, "d0": 0.0, "ranks": []})
            e["rows"] += r["rows"]
            e["d0"] += r["d0"]
            e["ranks"].append(r["rows"])
    return out


def train_d0_sum(feature_dir: Path) -> float:
    return sum(float(pq.read_table(p, columns=["d0"]).column("d0").to_numpy().astype("float64").sum())
               for p in sorted((feature_dir / "train").glob("*.parquet")))


def test_ddp_two_processes_match_one_process_and_see_every_row_once(feature_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.syspath_prepend(str(HERE))
    one, two = tmp_path / "one", tmp_path / "two"
    cfg1 = write_config(one / "c.yaml", feature_dir, 64, one / "audit")
    cfg2 = write_config(two / "c.yaml", feature_dir, 32, two / "audit", plots=True)
    run_two_processes(two, cfg2, "--trainer.strategy", "ddp")
    SEED_STORE(one)
    monkeypatch.chdir(one)
    run_lightning_cli(["fit", "--config", str(cfg1)])

    run1, c1 = mlflow_run(one / "mlflow.db")
    run2, c2 = mlflow_run(two / "mlflow.db")
    for task in ["click", "convert"]:
        a1, a2 = run1.data.metrics[f"val/{task}/auc"], run2.data.metrics[f"val/{task}/auc"]
        assert a1 > 0.65 and abs(a1 - a2) < AUC_TOLERANCE, (task, a1, a2)
    assert metric_history(c2, run2, "train/rows_seen") == [2000.0, 2000.0]
    # the split's loss is the tasks' log-losses summed, each reduced exactly over both ranks' rows
    for run in (run1, run2):
        m = run.data.metrics
        assert m["val/loss"] == pytest.approx(m["val/click/logloss"] + m["val/convert/logloss"], rel=1e-6)
    # routing statistics are all-reduced over ranks: the epoch's label correlation (data only) is the same
    key = "relatedness/epoch/label_corr/click.vs.convert"
    assert run2.data.metrics[key] == pytest.approx(run1.data.metrics[key], abs=1e-9)
    util = [run2.data.metrics[f"experts/epoch/click/util/e{i}"] for i in range(4)]
    assert sum(util) == pytest.approx(1.0, abs=1e-6)
    plots = {a.path.rsplit("/", 1)[-1] for a in c2.list_artifacts(run2.info.run_id, "plots")}
    assert {"utilization_heatmap.png", "task_relatedness.png"} <= plots, plots  # drawn on rank 0 from both ranks' window
    d0 = train_d0_sum(feature_dir)
    rows2 = audit(two / "audit")
    assert sorted(rows2) == [0, 1]
    for epoch in rows2.values():
        assert epoch["rows"] == 2000 and epoch["ranks"] == [1000, 1000]
        assert epoch["d0"] == pytest.approx(d0, rel=1e-9, abs=1e-6)
    assert audit(one / "audit")[1]["rows"] == 2000
    # the logged training loss is the mean over both ranks' batches, not rank 0's alone
    per_rank = [[json.loads(line)["losses"] for line in (two / "audit" / f"rank{r}.jsonl").read_text().splitlines()]
                for r in (0, 1)]
    logged_steps = 0
    for epoch0, epoch1 in zip(*per_rank):
        for (step, own0, logged0), (step1, own1, logged1) in zip(epoch0, epoch1):
            assert step == step1
            if step % 5 == 0:  # log_every_n_steps 5: the steps whose loss was logged
                logged_steps += 1
                assert logged0 == pytest.approx(logged1, rel=1e-6)
                assert logged0 == pytest.approx((own0 + own1) / 2, rel=1e-5)
                assert own0 != pytest.approx(own1, rel=1e-5)  # the ranks' losses differ: the mean is a real check
    assert logged_steps >= 4
    # each rank draws its own dropout masks and router noise (Lightning seeds every rank alike)
    rngs = [[json.loads(line)["rng"] for line in (two / "audit" / f"rank{r}.jsonl").read_text().splitlines()]
            for r in (0, 1)]
    assert all(a != b for a, b in zip(*rngs)), rngs


def test_torchrec_table_wise_sharding_under_lightning(feature_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    straight = write_config(tmp_path / "straight" / "c.yaml", feature_dir, 64, tmp_path / "straight" / "audit",
                            epochs=2, checkpoint=True, every_epoch=True)
    probe = ("--model.init_args.grad_similarity_every", "5")
    proc = run_two_processes(tmp_path / "straight", straight, "--trainer.strategy", "ddp_sharded_embeddings", *probe)
    # the tables' own optimizer is named: the configured Adam (lr 0.01) trains the dense part only
    stderr = " ".join(proc.stderr.split())
    assert "trained by fbgemm's fused exact_adagrad at lr 0.01" in stderr
    assert "covers the dense shared parameters only" in stderr
    (first,) = (tmp_path / "straight" / "ckpt").glob("epoch=0-*.ckpt")
    saved = torch.load(first, map_location="cpu", weights_only=False)
    tables = {k: v for k, v in saved["state_dict"].items() if ".embedding_bags." in k}
    assert len(tables) == 3
    # the fused Adagrad accumulators of every table, whichever rank held it, gathered in full and trained (> 0)
    optimizer_state = saved[SHARDED_OPTIMIZER_KEY]
    assert sorted(optimizer_state) == sorted(tables)
    for key, per in optimizer_state.items():
        (accumulator,) = per.values()
        assert accumulator.shape == tables[key].shape and float(accumulator.sum()) > 0
    run, client = mlflow_run(tmp_path / "straight" / "mlflow.db")
    logged_auc = run.data.metrics["val/click/auc"]  # the last epoch's
    assert logged_auc > 0.6
    assert [epoch["rows"] for epoch in audit(tmp_path / "straight" / "audit").values()] == [2000, 2000]
    cosines = metric_history(client, run, "relatedness/grad_cos/click.vs.convert")  # the probe ran, sharded
    assert len(cosines) >= 3 and all(-1.0 <= c <= 1.0 for c in cosines)
    # the sharded tables were gathered into the checkpoint: an unsharded module reproduces the validation AUC
    module = MultiTaskModule.load_from_checkpoint(tmp_path / "straight" / "ckpt" / "last.ckpt", map_location="cpu")
    dm = FeatureDataModule(str(feature_dir), batch_size=64, seed=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    (result,) = trainer.validate(module, dm, verbose=False)
    assert result["val/click/auc"] == pytest.approx(logged_auc, abs=1e-5)

    # resumed from the first epoch's checkpoint for the second, in forked ranks: the same weights and table optimizer
    # state as the run that went straight through (tables and their fused optimizer state go back into each rank's
    # shards; how the ranks were started changes nothing)
    resumed = write_config(tmp_path / "resumed" / "c.yaml", feature_dir, 64, tmp_path / "resumed" / "audit",
                           epochs=2, checkpoint=True)
    run_two_processes(tmp_path / "resumed", resumed, *SHARDED_FORK, *probe, "--ckpt_path", str(first))
    a = torch.load(tmp_path / "straight" / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"] == 2 * saved["global_step"]
    assert audit(tmp_path / "resumed" / "audit") == {1: audit(tmp_path / "straight" / "audit")[1]}
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=0, atol=0, msg=key)
    for key, per in a[SHARDED_OPTIMIZER_KEY].items():
        for name, value in per.items():
            torch.testing.assert_close(value, b[SHARDED_OPTIMIZER_KEY][key][name], rtol=0, atol=0, msg=key)


def test_gradnorm_under_sharded_embeddings_makes_the_step_plain_ddp_makes(feature_dir, tmp_path, monkeypatch):
    """GradNorm's per-task gradients of the shared layer (one extra backward per task, averaged over the ranks) do
    not depend on where the tables live: one step from the same start gives, sharded, the learnt task weights, the
    reference losses and the dense parameters of plain DDP. One step only: from the second on the tables differ
    (fused Adagrad against Adam)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    states = {}
    for strategy, args in (("ddp", PLAIN_FORK), ("ddp_sharded_embeddings", SHARDED_FORK)):
        cfg = write_config(tmp_path / strategy / "c.yaml", feature_dir, 64, tmp_path / strategy / "audit", epochs=1,
                           checkpoint=True)
        run_two_processes(tmp_path / strategy, cfg, *args, "--trainer.max_steps", "1",
                          "--model.init_args.weighting", "gradnorm")
        saved = torch.load(tmp_path / strategy / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
        states[strategy] = saved["state_dict"]
    plain, sharded = states["ddp"], states["ddp_sharded_embeddings"]
    assert sorted(plain) == sorted(sharded)
    learnt = plain["weighting.learnt_weights"]
    assert float((learnt - 1).abs().max()) > 1e-4  # the step moved the weights (away from 1 each)
    for key in plain:
        torch.testing.assert_close(sharded[key], plain[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_fused_table_trains_sharded_and_reloads_unsharded(make_feature_dir, tmp_path, monkeypatch):
    """Single-valued features only: the front fuses its tables into one, which DMP places on one rank; the
    sharded collection is called through torchrec with the ids shifted to the fused rows."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    feature_dir = make_feature_dir("single_valued")
    spec = FeatureSpec.load(feature_dir / "spec.json")
    single_valued = [f for f in spec.sparse_features if not f.multi_valued]
    dataclasses.replace(spec, sparse_features=single_valued).finalize().save(feature_dir / "spec.json")
    cfg = write_config(tmp_path / "c.yaml", feature_dir, 64, tmp_path / "audit", epochs=1, checkpoint=True)
    proc = run_two_processes(tmp_path, cfg, *SHARDED_FORK)
    # the tables' own optimizer is named: the configured Adam (lr 0.01) trains the dense part only
    assert "trained by fbgemm's fused exact_adagrad at lr 0.01" in " ".join(proc.stderr.split())
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    tables = [k for k in saved["state_dict"] if ".embedding_bags." in k]
    assert tables == [f"model.front.ebc.embedding_bags.{FUSED_TABLE}.weight"]
    assert saved["state_dict"][tables[0]].shape[0] == sum(f.num_embeddings for f in single_valued)
    run, _ = mlflow_run(tmp_path / "mlflow.db")
    assert run.data.metrics["val/click/auc"] > 0.6
    module = MultiTaskModule.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", map_location="cpu")
    assert module.model.front.fused
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    (result,) = trainer.validate(module, FeatureDataModule(str(feature_dir), batch_size=64, seed=0), verbose=False)
    assert result["val/click/auc"] == pytest.approx(run.data.metrics["val/click/auc"], abs=1e-5)


FORKED_SHARDED_FIT = """
import json, sys
from pathlib import Path
import lightning as L, torch
from lightning.pytorch.callbacks import ModelCheckpoint
from mmoe_rec.data.datamodule import FeatureDataModule
from mmoe_rec.training.module import MultiTaskModule
from mmoe_rec.training.sharding import ShardedEmbeddingStrategy

data_dir, root, model = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
L.seed_everything(0)
dm = FeatureDataModule(data_dir, batch_size=64, seed=0)
module = MultiTaskModule(model=model, feature_spec=dm.spec)
before = {k: v.clone() for k, v in module.state_dict().items()}
trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=2, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, limit_val_batches=0, default_root_dir=root,
                    strategy=ShardedEmbeddingStrategy(start_method="fork"),
                    callbacks=[ModelCheckpoint(dirpath=root, save_last=True)])
trainer.fit(module, dm)
saved = torch.load(root / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
after = module.state_dict()  # this process's module: given back by rank 0 at the end of the fit
assert sorted(after) == sorted(saved)
for key, value in saved.items():
    torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=key)
tables = [k for k in saved if ".embedding_bags." in k]
assert tables and all(not torch.equal(after[k], before[k]) for k in tables), tables  # trained
print("checked", len(tables), "tables")
"""


def test_a_sharded_fit_in_forked_ranks_gives_the_trained_tables_back_to_the_launching_process(feature_dir, tmp_path):
    """start_method fork (or spawn; Lightning's launcher for notebooks): rank 0 gives its weights back to the process
    that launched the ranks, in a file. Its sharded tables were written as ShardedTensors, which that process failed
    to read after the whole fit; now they come back in full and load into its unsharded module. The file's folder
    in $TMPDIR goes with it (Lightning removed the file only: every such fit left an empty folder)."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "TMPDIR": str(temp)}
    proc = subprocess.run([sys.executable, "-c", FORKED_SHARDED_FIT, str(feature_dir), str(tmp_path / "ckpt"),
                           json.dumps(MMOE)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "checked 3 tables" in proc.stdout
    assert not list(temp.glob("tmp*")), list(temp.iterdir())


def test_column_wise_shards_train_as_whole_tables_and_data_parallel_tables_are_replicated(feature_dir, tmp_path):
    """column_wise and data_parallel, the other sharding types gloo runs, each one fit in forked ranks from the same
    seeded module. Tables of 256 columns (torchrec splits columns in shards of at least 128): column_wise puts one
    half of every table on each rank and ends with the tables and fused Adagrad state of table_wise, bitwise
    (Adagrad's state is per element, a pooled sum per column). data_parallel: every rank holds every whole table,
    trained by the configured optimizer, and the checkpoint has no fused optimizer state."""
    wide = copy.deepcopy(MMOE)
    wide["init_args"]["embedding_dim"] = 256
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    fits = {}
    for model, types in ((wide, ["table_wise", "column_wise"]), (MMOE, ["data_parallel"])):
        proc = subprocess.run([sys.executable, str(HERE / "sharding_types.py"), str(feature_dir), str(tmp_path),
                               json.dumps(model), *types], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=240)
        assert proc.returncode == 0, proc.stderr[-4000:]
        fits.update((f["sharding_type"], f) for f in map(json.loads, proc.stdout.splitlines()))

    def shards(fit):  # table key -> sorted [rank, offsets, sizes] of every shard on every rank
        out = {}
        for rank, layout in fit["layout"].items():
            for key, pieces in layout.items():
                out.setdefault(key, []).extend([int(rank), offsets, sizes] for offsets, sizes in pieces)
        return {key: sorted(pieces) for key, pieces in out.items()}

    def ckpt(sharding_type):
        return torch.load(tmp_path / sharding_type / "last.ckpt", map_location="cpu", weights_only=False)

    table_wise, column_wise, replicated = (shards(fits[t]) for t in ("table_wise", "column_wise", "data_parallel"))
    assert len(table_wise) == 3 and sorted(table_wise) == sorted(column_wise) == sorted(replicated)
    for key, pieces in table_wise.items():
        rows = ckpt("table_wise")["state_dict"][key].shape[0]
        ((_, offsets, sizes),) = pieces  # the whole table on one rank
        assert offsets == [0, 0] and sizes == [rows, 256]
        assert column_wise[key] == [[0, [0, 0], [rows, 128]], [1, [0, 128], [rows, 128]]], column_wise[key]
        assert [p[0] for p in replicated[key]] == [0, 1] and all(p[1:] == [[0, 0], [rows, 4]] for p in replicated[key])
    for fit in fits.values():
        assert fit["trained"] == sorted(table_wise), fit  # every table trained and given back in full

    a, b = ckpt("table_wise"), ckpt("column_wise")
    assert a["global_step"] == b["global_step"] > 0 and sorted(a["state_dict"]) == sorted(b["state_dict"])
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=0, atol=0, msg=key)
    assert sorted(a[SHARDED_OPTIMIZER_KEY]) == sorted(b[SHARDED_OPTIMIZER_KEY]) == sorted(table_wise)
    for key, per in a[SHARDED_OPTIMIZER_KEY].items():
        for name, value in per.items():
            torch.testing.assert_close(value, b[SHARDED_OPTIMIZER_KEY][key][name], rtol=0, atol=0, msg=key)
    dense = ckpt("data_parallel")
    assert not dense.get(SHARDED_OPTIMIZER_KEY)
    module = MultiTaskModule.load_from_checkpoint(tmp_path / "data_parallel" / "last.ckpt", map_location="cpu")
    assert sorted(k for k in module.state_dict() if ".embedding_bags." in k) == sorted(table_wise)


def test_a_checkpoint_without_sharded_optimizer_state_cannot_resume_a_sharded_run():
    class FusedOptimizer:  # stands in for DMP's fused optimizer: only its state's keys matter here
        def state_dict(self):
            return {"state": {"model.front.ebc.embedding_bags.t_user.weight": {"t_user.momentum1": torch.ones(2)}}}

    strategy = ShardedEmbeddingStrategy()
    strategy._fused_optimizer = lambda: FusedOptimizer()
    with pytest.raises(RuntimeError, match="not written under ddp_sharded_embeddings"):
        strategy.load_optimizer_state_dict({"optimizer_states": []})


def test_a_sharded_checkpoint_cannot_resume_a_fit_under_another_strategy(feature_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path / "c.yaml", feature_dir, 256, tmp_path / "audit", epochs=1, checkpoint=True)
    run_lightning_cli(["fit", "--config", str(cfg)])
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    saved[SHARDED_OPTIMIZER_KEY] = {"model.front.ebc.embedding_bags.t_user.weight": {"t_user.momentum1": torch.ones(2)}}
    torch.save(saved, tmp_path / "sharded.ckpt")  # what a ddp_sharded_embeddings run writes besides the weights
    cfg2 = write_config(tmp_path / "again" / "c.yaml", feature_dir, 256, tmp_path / "again" / "audit", epochs=2,
                        checkpoint=True)
    with pytest.raises(ValueError, match="written under ddp_sharded_embeddings"):
        run_lightning_cli(["fit", "--config", str(cfg2), "--ckpt_path", str(tmp_path / "sharded.ckpt")])
    # evaluating it is fine: the weights are full tensors
    run_lightning_cli(["validate", "--config", str(cfg2), "--ckpt_path", str(tmp_path / "sharded.ckpt")])


def test_sharding_on_a_device_without_fbgemm_kernels_is_refused_with_the_install_advice():
    from mmoe_rec.training.sharding import require_fbgemm_kernels

    require_fbgemm_kernels("cpu")  # the pinned fbgemm-gpu-cpu has them
    importlib.import_module("fbgemm_gpu")  # registers the fbgemm ops
    if torch._C._dispatch_has_kernel_for_dispatch_key("fbgemm::permute_2D_sparse_data", "CUDA"):
        pytest.skip("this fbgemm has CUDA kernels")
    with pytest.raises(RuntimeError, match="no CUDA kernels.*install fbgemm-gpu"):
        require_fbgemm_kernels("cuda")


def test_a_sharded_per_table_front_refuses_an_id_outside_its_table(tmp_path):
    """Sharded, the tables are looked up by fbgemm's kernels, which read row 0 for an id outside its table (a log
    line, no error): the front checks the ids itself, as the unsharded lookups do. One gloo process suffices."""
    import torch.distributed as dist
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from mmoe_rec.data.batch import Batch
    from mmoe_rec.features.spec import SparseFeature, Task
    from mmoe_rec.nn.embedding import EmbeddingFront
    from mmoe_rec.training.sharding import shard_module

    spec = FeatureSpec([SparseFeature("user", 5), SparseFeature("tags", 4, multi_valued=True)], ["d"],
                       [Task("y")]).finalize()
    assert not dist.is_initialized()  # conftest's no_state_left destroys what a test leaves
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        front = EmbeddingFront(spec, embedding_dim=4)
        assert not front.fused  # a multi-valued feature: one table per feature
        sharded = shard_module(front, "table_wise", torch.device("cpu"))

        def batch(user_ids):
            values = torch.tensor([*user_ids, 1, 2, 3])  # user: one id per row; tags: [1, 2], [3]
            sparse = KeyedJaggedTensor.from_lengths_sync(keys=["user", "tags"], values=values,
                                                         lengths=torch.tensor([1, 1, 2, 1]))
            return Batch(sparse=sparse, dense=torch.ones(2, 1), labels={})

        assert sharded(batch([4, 0])).shape == (2, 4 + 4 + 1)
        with pytest.raises(IndexError, match="'user': id 5 is outside its table of 5 rows"):
            sharded(batch([5, 0]))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sharding_type", ["table_wise", "data_parallel"])
@pytest.mark.parametrize("fused", [False, True], ids=["per-table", "fused-table"])
def test_sharding_keeps_the_tables_the_model_starts_with(tmp_path, sharding_type, fused):
    """torchrec's DMP builds the sharded tables anew and copies the module's weights only to a GPU: on the CPU they
    were drawn again, so a sharded fit started elsewhere than the model (and plain ddp) did, and a model loaded
    for fine-tuning lost its tables. One gloo process suffices."""
    import torch.distributed as dist

    from mmoe_rec.features.spec import SparseFeature, Task
    from mmoe_rec.nn.embedding import EmbeddingFront
    from mmoe_rec.training.sharding import _is_sharded, gather_full, shard_module

    features = [SparseFeature("user", 50), SparseFeature("item", 30)]
    if not fused:
        features.append(SparseFeature("tags", 4, multi_valued=True))
    spec = FeatureSpec(features, ["d"], [Task("y")]).finalize()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        front = EmbeddingFront(spec, embedding_dim=4)
        assert front.fused == fused
        with torch.no_grad():  # weights of its own, as a model loaded from a checkpoint has
            for p in front.parameters():
                p.copy_(torch.arange(p.numel(), dtype=p.dtype).view_as(p) / p.numel())
        before = {k: v.clone() for k, v in front.state_dict().items()}
        sharded = shard_module(front, sharding_type, torch.device("cpu"))
        after = front.state_dict()
        assert before.keys() == after.keys()
        for key, want in before.items():
            got = gather_full(after[key], 0) if _is_sharded(after[key]) else after[key]
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=key)
        assert sharded is not None
    finally:
        dist.destroy_process_group()


def test_a_sharded_fit_with_a_stateless_embedding_optimizer_resumes(feature_dir, tmp_path):
    """exact_sgd keeps no state: its checkpoint holds none, and a resume must not ask for it (one gloo process);
    a resume under another embedding optimizer than the checkpoint's is refused."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(root, epochs, ckpt_path=None, optimizer="exact_sgd"):
        L.seed_everything(0)
        dm = FeatureDataModule(str(feature_dir), batch_size=200, seed=0)
        module = MultiTaskModule(model=MMOE, feature_spec=dm.spec)
        trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            strategy=ShardedEmbeddingStrategy(embedding_optimizer=optimizer),
                            callbacks=[ModelCheckpoint(dirpath=root, save_last=True)], default_root_dir=root)
        trainer.fit(module, dm, ckpt_path=ckpt_path)
        return torch.load(root / "last.ckpt", map_location="cpu", weights_only=False)

    straight = fit(tmp_path / "straight", 2)
    first = fit(tmp_path / "first", 1)
    assert not first[SHARDED_OPTIMIZER_KEY]  # nothing to keep
    resumed = fit(tmp_path / "resumed", 2, ckpt_path=tmp_path / "first" / "last.ckpt")
    assert resumed["global_step"] == straight["global_step"]
    for key, value in straight["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=0, msg=key)
    # another embedding optimizer at the resume: exact_sgd dropped exact_adagrad's state without a word, and
    # exact_row_wise_adagrad found it the wrong shape ("momentum1 has shape (1043, 8)")
    fit(tmp_path / "adagrad", 1, optimizer="exact_adagrad")
    for other in ("exact_sgd", "exact_row_wise_adagrad"):
        with pytest.raises(ValueError, match=f"trained by embedding_optimizer 'exact_adagrad'.* asks for '{other}'"):
            fit(tmp_path / other, 2, ckpt_path=tmp_path / "adagrad" / "last.ckpt", optimizer=other)
    # exact_sgd keeps no state: another optimizer may take over, from fresh state, with a word
    with pytest.warns(UserWarning, match="trained by 'exact_sgd', which keeps no state; 'exact_adagrad' starts"):
        later = fit(tmp_path / "sgd_then_adagrad", 2, ckpt_path=tmp_path / "first" / "last.ckpt",
                    optimizer="exact_adagrad")
    assert later["global_step"] == straight["global_step"]


def config_with_callbacks(tmp_path: Path, feature_dir: Path, batch_size: int, **callbacks: dict) -> Path:
    """A one-epoch config with rank_failure's `callbacks` (class name, or another class's full path -> init_args)
    added."""
    cfg = write_config(tmp_path / "c.yaml", feature_dir, batch_size, tmp_path / "audit", epochs=1)
    config = yaml.safe_load(cfg.read_text())
    config["trainer"]["callbacks"] += [{"class_path": name if "." in name else f"rank_failure.{name}",
                                        "init_args": init_args}
                                       for name, init_args in callbacks.items()]
    cfg.write_text(yaml.safe_dump(config))
    return cfg


def fit_with_rank_1_callback(tmp_path: Path, feature_dir: Path, callback: str) -> subprocess.CompletedProcess:
    cfg = config_with_callbacks(tmp_path, feature_dir, 64, **{callback: {"rank": 1}})
    return run_two_processes(tmp_path, cfg, "--trainer.strategy", "ddp", check=False)


def test_a_rank_that_fails_after_rank_0_finished_fails_the_job_and_its_run(feature_dir, tmp_path):
    """Rank 1 raises in on_fit_end, after the ranks' last collective: rank 0 waits for it and fails the job (before,
    rank 0 exited 0 and the MLflow run ended FINISHED; the traceback was the only sign)."""
    proc = fit_with_rank_1_callback(tmp_path, feature_dir, "FailOnRank")
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "rank 1 fails in on_fit_end" in proc.stderr
    assert re.search(r"error: rank 1 \(pid \d+\) exited with code 1 after rank 0 finished", proc.stderr), \
        proc.stderr[-2000:]
    assert mlflow_run(tmp_path / "mlflow.db")[0].info.status == "FAILED"


def test_a_rank_that_fails_before_the_rendezvous_fails_the_job_and_its_run(feature_dir, tmp_path):
    """Rank 1 fails before the ranks' rendezvous (rank 0 waits there: only the launcher's observer can end it, by
    SIGKILL, which had left the MLflow run RUNNING): the job fails and the run is FAILED. (Rank 1 failing
    mid-training, where rank 0's collective fails and Lightning ends the run: the next test's ("ddp", 1).)"""
    proc = fit_with_rank_1_callback(tmp_path, feature_dir, "FailBeforeRendezvous")
    assert proc.returncode != 0, proc.stderr[-4000:]
    assert "rank 1 fails before the rendezvous" in proc.stderr
    assert re.search(r"mmoe-rec: rank 1 \(pid \d+\) exited with code 1 before its work was done",
                     proc.stderr), proc.stderr[-2000:]
    assert mlflow_run(tmp_path / "mlflow.db")[0].info.status == "FAILED"


ON_EXCEPTION = "lightning.pytorch.callbacks.OnExceptionCheckpoint"
CHECKPOINTING = ("--trainer.enable_checkpointing", "true")  # Lightning refuses a Checkpoint callback without it


@pytest.mark.parametrize("strategy,rank", [("ddp", 0), ("ddp", 1), ("ddp_fork", 0)])
def test_a_rank_that_fails_alone_writes_no_on_exception_checkpoint_and_fails_the_job_at_once(feature_dir, tmp_path,
                                                                                            strategy, rank):
    """Lightning runs OnExceptionCheckpoint in the failing rank alone, and a checkpoint's save is a collective: the
    rank waited there for the other, itself waiting in the gradient all-reduce, until the process group's timeout
    (30 minutes; a review's job hung). It now skips it with a warning and fails the job at once, its run FAILED.
    ddp_fork's ranks run no on_exception; the launching process, which holds none of their state, failed in it
    ("MultiTaskModule is not attached to a `Trainer`", in place of the rank's error) and now skips it too."""
    cfg = config_with_callbacks(tmp_path, feature_dir, 64, FailMidTraining={"rank": rank},
                                **{ON_EXCEPTION: {"dirpath": str(tmp_path / "exc")}})
    proc = run_two_processes(tmp_path, cfg, "--trainer.strategy", strategy, *CHECKPOINTING, check=False,
                             timeout=150)
    assert proc.returncode != 0, proc.stderr[-4000:]
    assert f"rank {rank} fails mid-training" in proc.stderr
    why = f"rank {rank}'s RuntimeError is its own" if strategy == "ddp" else "the trained state is in the ranks"
    assert re.search(r"no on-exception checkpoint written to \S+on_exception.ckpt: " + re.escape(why) +
                     r".*; the last periodic checkpoint stands", proc.stderr), proc.stderr[-3000:]
    assert "not attached" not in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "exc" / "on_exception.ckpt").exists()
    assert mlflow_run(tmp_path / "mlflow.db")[0].info.status == "FAILED"


def test_a_rank_killed_mid_training_is_named_by_rank_0(feature_dir, tmp_path):
    """Rank 1 is SIGKILLed mid-training (the out-of-memory killer's way: it prints nothing). Rank 0's collective
    fails with gloo's "Connection closed by peer", which names no rank: rank 0 says which rank died and how, and
    the job fails with its run FAILED."""
    proc = fit_with_rank_1_callback(tmp_path, feature_dir, "KilledMidTraining")
    assert proc.returncode != 0, proc.stderr[-4000:]
    assert re.search(r"rank 1 \(pid \d+\) was killed by signal 9 \(SIGKILL", proc.stderr), proc.stderr[-3000:]
    assert mlflow_run(tmp_path / "mlflow.db")[0].info.status == "FAILED"


def test_a_sigterm_to_rank_0_stops_every_rank_at_the_same_batch_with_exit_143(feature_dir, tmp_path):
    """`timeout` / a scheduler signals rank 0: Lightning's handler forwarded it to rank 1 and broadcast inside the
    handler, mid-collective (rank 1: gloo "collective mismatch", rank 0: "Connection reset by peer", exit 1). Every
    rank now stops at the next batch together; rank 0 exits 143 with one line and its run is FAILED."""
    # rank 0's on-exception work outlasts the launcher's observer poll (5 s) after rank 1 has exited 143: the
    # observer spares it (it SIGKILLed rank 0 for a rank that exited before its work was done: exit -9)
    cfg = config_with_callbacks(tmp_path, feature_dir, 16, SigtermAt={"batch": 3, "rank": 0},
                                **{ON_EXCEPTION: {"dirpath": str(tmp_path / "exc")}},
                                SlowOnException={"seconds": 7.0, "rank": 0})
    proc = run_two_processes(tmp_path, cfg, "--trainer.strategy", "ddp", *CHECKPOINTING, check=False)
    assert proc.returncode == 143, proc.stderr[-4000:]
    # the ranks stopped together: they write the on-exception checkpoint together (rank-local errors skip it)
    assert (tmp_path / "exc" / "on_exception.ckpt").exists() and "no on-exception checkpoint" not in proc.stderr
    assert proc.stderr.count("error: mmoe-rec fit stopped by SIGTERM before it finished") == 1  # rank 0's alone
    assert "collective mismatch" not in proc.stderr and "Connection reset" not in proc.stderr, proc.stderr[-3000:]
    assert mlflow_run(tmp_path / "mlflow.db")[0].info.status == "FAILED"


@pytest.mark.parametrize("strategy,callback", [
    ("ddp", {"SigtermEveryRankAfterBackward": {"batch": 3}}),
    ("ddp_spawn", {"SigtermAt": {"batch": 3, "rank": 1}}),
])
def test_a_sigterm_to_any_rank_stops_every_rank_at_the_same_batch_with_exit_143(feature_dir, tmp_path, strategy,
                                                                                callback):
    """Each rank acted on its own SIGTERM at its batch's end: a rank signalled alone, or signalled after its gradient
    all-reduce while another rank was already in the next step (a process-group kill), stopped while the others
    waited in a collective (exit 1, gloo's "Connection closed by peer"); a ddp_spawn rank ran Lightning's own
    handler, which broadcast inside it (exit 1, SIGABRT). The ranks now agree on any rank's SIGTERM at the next
    batch's start: exit 143, one line, the run FAILED."""
    cfg = config_with_callbacks(tmp_path, feature_dir, 16, **callback)
    proc = run_two_processes(tmp_path, cfg, "--trainer.strategy", strategy, check=False)
    assert proc.returncode == 143, proc.stderr[-4000:]
    assert proc.stderr.count("error: mmoe-rec fit stopped by SIGTERM before it finished") == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Connection" not in proc.stderr, proc.stderr[-3000:]
    assert mlflow_run(tmp_path / "mlflow.db")[0].info.status == "FAILED"


def test_a_sigterm_during_a_long_validation_stops_every_rank_at_the_next_validation_batch(feature_dir, tmp_path,
                                                                                          monkeypatch):
    """As one process does, the ranks stop at the next validation batch (they agree at each one's start): a SIGTERM
    kept pending to a validation's end was not acted on, and a validation longer than the stop limit (120 s by
    default; 8 s here) was ended by the watch instead ("did not stop within"), with no on-exception checkpoint.
    Rank 1 alone is signalled; rank 0, told by the agreement alone, outlasts the launcher's observer poll (5 s) in
    its on-exception work: it is spared as when it is signalled itself (it was SIGKILLed for a rank that exited
    before its work was done, exit -9)."""
    monkeypatch.setenv("MMOE_REC_SIGTERM_STOP_LIMIT_S", "8")
    cfg = config_with_callbacks(tmp_path, feature_dir, 16,
                                SigtermInValidation={"batch": 1, "rank": 1, "seconds": 0.6},
                                SlowOnException={"seconds": 7.0, "rank": 0})
    proc = run_two_processes(tmp_path, cfg, "--trainer.strategy", "ddp", check=False)
    assert proc.returncode == 143, proc.stderr[-4000:]
    assert "did not stop within" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("error: mmoe-rec fit stopped by SIGTERM before it finished") == 1, proc.stderr[-3000:]
    assert mlflow_run(tmp_path / "mlflow.db")[0].info.status == "FAILED"


@pytest.fixture(scope="module")
def trained_checkpoint(feature_dir, tmp_path_factory) -> Path:
    """last.ckpt of a one-epoch fit in this process, without an MLflow run: what validate / test / predict load."""
    folder = tmp_path_factory.mktemp("trained")
    cfg = write_config(folder / "c.yaml", feature_dir, 64, folder / "audit", epochs=1, checkpoint=True)
    run_lightning_cli(["fit", "--config", str(cfg), "--trainer.logger", "false"])
    return folder / "ckpt" / "last.ckpt"


@pytest.mark.parametrize("subcommand,callbacks", [
    ("validate", {"SigtermInValidation": {"batch": 1, "rank": 1, "seconds": 0.3}}),
    ("test", {"SigtermInValidation": {"batch": 1, "rank": 1, "seconds": 0.3}}),
    ("predict", {"SigtermAt": {"batch": 1, "rank": 1}}),
    ("predict", {"SlowPredictRank": {"rank": 1, "seconds": 1.0}, "SigtermAt": {"batch": 1, "rank": 1}}),
], ids=["validate", "test", "predict", "predict-rank-0-done"])
def test_a_sigterm_to_one_rank_of_validate_test_or_predict_stops_every_rank_with_exit_143(
        feature_dir, tmp_path, trained_checkpoint, subcommand, callbacks):
    """Rank 1 alone is signalled at its second batch. The ranks agreed on a SIGTERM under fit only: rank 1 stopped
    alone, and the launcher's observer SIGKILLed rank 0 (exit -9, no word of the SIGTERM, validate's run RUNNING),
    or predict's rank 0, its own batches done, failed in the prediction writer's collective (exit 1, gloo's
    "Connection closed by peer"). validate and test's ranks now agree at each batch's start as fit's do; predict's
    ranks (each runs its own number of batches) are told through rank 0 and each stops at its next batch, a rank
    with none left as its collective fails. Exit 143, one line, the run FAILED, no predictions file."""
    cfg = config_with_callbacks(tmp_path, feature_dir, 16, **callbacks)
    out = tmp_path / "out"
    proc = run_two_processes(tmp_path, cfg, "--trainer.strategy", "ddp", "--ckpt_path", str(trained_checkpoint),
                             *(["--predictions_path", str(out / "p.parquet")] if subcommand == "predict" else []),
                             check=False, subcommand=subcommand)
    assert proc.returncode == 143, proc.stderr[-4000:]
    assert proc.stderr.count(f"error: mmoe-rec {subcommand} stopped by SIGTERM before it finished") == 1, \
        proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Connection" not in proc.stderr, proc.stderr[-3000:]
    assert mlflow_run(tmp_path / "mlflow.db")[0].info.status == "FAILED"
    assert not out.exists() or not list(out.rglob("*"))  # neither a rank's file nor a partial one


def test_a_sigterm_to_rank_0_in_the_rendezvous_fails_its_run_and_ends_the_ranks_it_launched(feature_dir, tmp_path,
                                                                                            monkeypatch):
    """Before Lightning's handler (rank 0 waiting for its ranks in the rendezvous, its MLflow run made) a SIGTERM
    killed rank 0 at once: the run was left RUNNING and rank 1 ran on, orphaned. Now the run is FAILED, rank 1 is
    ended and rank 0 exits 143, leaving no folder of the ranks' done markers behind (a review found one)."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    pid_file = tmp_path / "rank1.pid"
    cfg = config_with_callbacks(tmp_path, feature_dir, 64, SigtermRank0BeforeRendezvous={"pid_file": str(pid_file)})
    proc = run_two_processes(tmp_path, cfg, "--trainer.strategy", "ddp", check=False)
    assert proc.returncode == 143, proc.stderr[-4000:]
    assert "error: mmoe-rec fit stopped by SIGTERM before it finished; ending the ranks it launched" in proc.stderr
    assert mlflow_run(tmp_path / "mlflow.db")[0].info.status == "FAILED"
    assert_ends(int(pid_file.read_text()), within_s=20)
    assert not list(temp.glob("mmoe-rec-ranks-*"))


def test_a_sigterm_to_rank_0_held_in_a_collective_by_a_stalled_rank_ends_the_job(feature_dir, tmp_path,
                                                                                  monkeypatch):
    """Lightning's handler runs only when rank 0's main thread is back in Python: rank 0 waiting in the gradient
    all-reduce for a rank that stalled (alive) ran on for as long as the stall lasted, its run RUNNING and the
    stalled rank never told (a review: 90 s and counting). After the stop limit rank 0 ends the job: exit 143, the
    run FAILED, rank 1 ended."""
    monkeypatch.setenv("MMOE_REC_SIGTERM_STOP_LIMIT_S", "3")
    pid_file = tmp_path / "rank1.pid"
    cfg = config_with_callbacks(tmp_path, feature_dir, 16, StallAndSigtermRank0={"pid_file": str(pid_file)})
    start = time.monotonic()
    proc = run_two_processes(tmp_path, cfg, "--trainer.strategy", "ddp", check=False)
    assert proc.returncode == 143, proc.stderr[-4000:]
    assert time.monotonic() - start < 100  # rank 1 stalls for 120 s
    # rank 0's line alone: rank 1, told by rank 0 and then orphaned, stops at once (it waited out a limit of its own)
    assert proc.stderr.count("did not stop within 3 s of a SIGTERM") == 1, proc.stderr[-3000:]
    assert "error: mmoe-rec fit did not stop within 3 s of a SIGTERM" in proc.stderr
    assert mlflow_run(tmp_path / "mlflow.db")[0].info.status == "FAILED"
    assert_ends(int(pid_file.read_text()), within_s=30)


def test_a_rank_0_killed_by_sigkill_has_its_run_marked_failed_by_the_rank_that_outlives_it(feature_dir, tmp_path,
                                                                                          monkeypatch):
    """SIGKILL (the out-of-memory killer) runs none of rank 0's cleanup: its MLflow run stayed RUNNING for good, and
    its folder of the ranks' done markers stayed in $TMPDIR. Rank 1, ended by rank 0's death (its collective fails,
    or the SIGTERM Linux sends it), marks the run FAILED and removes the folder."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    pid_file = tmp_path / "rank1.pid"
    cfg = config_with_callbacks(tmp_path, feature_dir, 16, KillsRank0={"pid_file": str(pid_file)})
    proc = run_two_processes(tmp_path, cfg, "--trainer.strategy", "ddp", check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert_ends(int(pid_file.read_text()), within_s=30)
    assert mlflow_run(tmp_path / "mlflow.db")[0].info.status == "FAILED", proc.stderr[-3000:]
    assert not list(temp.glob("mmoe-rec-ranks-*"))


def assert_ends(rank1_pid: int, within_s: float) -> None:
    """Rank 1 ends within `within_s` (rank 0 has exited)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline and _alive(rank1_pid):
        time.sleep(0.2)
    assert not _alive(rank1_pid), "rank 1 outlived rank 0"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie not yet reaped by init has ended
        return f.read().split(") ", 1)[1][0] != "Z"


@pytest.mark.parametrize("strategy", ["ddp_fork"])  # ddp_spawn takes the same path, with slower starts
def test_a_sigterm_to_the_process_that_waits_for_spawned_ranks_fails_the_run_and_ends_them(feature_dir, tmp_path,
                                                                                           strategy):
    """ddp_spawn / ddp_fork: the launching process only waits for its ranks and never installs Lightning's
    handler; a SIGTERM killed it with its run RUNNING (and the ranks were left to notice)."""
    cfg = write_config(tmp_path / "c.yaml", feature_dir, 16, tmp_path / "audit", epochs=3)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen([sys.executable, "-m", "mmoe_rec.cli", "fit", "--config", str(cfg), "--trainer.devices",
                             "2", "--trainer.strategy", strategy], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((tmp_path / "audit").glob("rank*.jsonl")) \
            and proc.poll() is None:
        time.sleep(0.5)  # the ranks train (their row audit is written at each epoch's end)
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "error: mmoe-rec fit stopped by SIGTERM before it finished; ending the ranks it launched" in err
    assert mlflow_run(tmp_path / "mlflow.db")[0].info.status == "FAILED"


def test_a_rank_that_aborts_at_exit_after_its_work_is_done_is_a_warning(feature_dir, tmp_path):
    """The gloo exit race's shape (SIGABRT as the interpreter exits, the fit done): the job's results are whole."""
    proc = fit_with_rank_1_callback(tmp_path, feature_dir, "AbortAtExit")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert re.search(r"rank 1 \(pid \d+\) was killed by signal 6 after finishing its work", proc.stderr), \
        proc.stderr[-2000:]
    assert mlflow_run(tmp_path / "mlflow.db")[0].info.status == "FINISHED"


def test_two_process_predict_writes_every_test_row_once_and_replaces_an_earlier_runs_file(feature_dir, tmp_path,
                                                                                          monkeypatch):
    """The rank files are renamed only after the ranks' row counts add up to the split's (a collective that a
    dead rank fails); a 1-process run's file under the same path is removed, so the folder holds each row once."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path / "c.yaml", feature_dir, 64, tmp_path / "audit", epochs=1, checkpoint=True)
    run_lightning_cli(["fit", "--config", str(cfg)])
    (tmp_path / "pred.parquet").write_bytes(b"an earlier 1-process run")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "mmoe_rec.cli", "predict", "--config", str(cfg),
                           "--trainer.devices", "2", *PLAIN_FORK,
                           "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"),
                           "--predictions_path", str(tmp_path / "pred.parquet")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "removed the predictions an earlier run wrote" in proc.stderr
    assert not (tmp_path / "pred.parquet").exists()
    ids = [i for r in (0, 1) for i in pq.read_table(tmp_path / f"pred.rank{r}.parquet")["row_id"].to_pylist()]
    test_ids = [i for p in sorted((feature_dir / "test").glob("*.parquet"))
                for i in pq.read_table(p)["row_id"].to_pylist()]
    assert ids == test_ids  # every test row, once, and the rank files in rank order are the split's order

    # rank 1 killed as it renames its file into place: the earlier run's rank files are gone before any new one
    # comes (it left rank 1's file of the earlier run beside rank 0's new one: two models' scores, the rows adding
    # up; review 2026-12-07)
    for r in (0, 1):  # marked as the earlier run's (the new run writes the same bytes: same model, same rows)
        (tmp_path / f"pred.rank{r}.parquet").write_bytes(b"the earlier run's file")
    proc = subprocess.run([sys.executable, "-m", "mmoe_rec.cli", "predict", "--config", str(cfg),
                           "--trainer.devices", "2", *PLAIN_FORK,
                           "--trainer.callbacks+", "rank_failure.DieAtPredictionRename",
                           "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"),
                           "--predictions_path", str(tmp_path / "pred.parquet")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    left = {p.name: p.read_bytes() for p in tmp_path.glob("pred.rank*.parquet")}
    assert b"the earlier run's file" not in left.values(), left.keys()
    assert "pred.rank1.parquet" not in left


def test_a_rank_without_a_predict_batch_writes_the_id_and_score_columns_of_the_others(feature_dir, tmp_path,
                                                                                     monkeypatch):
    """A custom data module gives rank 1 no predict batch: its empty file has the columns and types rank 0 wrote
    (ids included, taken from rank 0's file through a collective), so the rank files read as one table."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path / "c.yaml", feature_dir, 64, tmp_path / "audit", epochs=1, checkpoint=True)
    run_lightning_cli(["fit", "--config", str(cfg)])
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "mmoe_rec.cli", "predict", "--config", str(cfg),
                           "--data.class_path", "uneven_predict.RankZeroPredicts",
                           "--trainer.devices", "2", *PLAIN_FORK,
                           "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"),
                           "--predictions_path", str(tmp_path / "pred.parquet")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rank0, rank1 = (pq.read_table(tmp_path / f"pred.rank{r}.parquet") for r in (0, 1))
    assert rank1.num_rows == 0 and rank1.schema.equals(rank0.schema)
    assert "row_id" in rank0.column_names
    test_ids = [i for p in sorted((feature_dir / "test").glob("*.parquet"))
                for i in pq.read_table(p)["row_id"].to_pylist()]
    assert pa.concat_tables([rank0, rank1])["row_id"].to_pylist() == test_ids


def test_a_dwa_fit_resumed_mid_epoch_under_ddp_ends_as_the_straight_fit(feature_dir, tmp_path, monkeypatch):
    """2 processes, dynamic weight average over 3 epochs (11 batches each at batch 96), dropout, gradients accumulated
    over 2 batches, a checkpoint in the middle of epoch 1 inside an accumulation window (after its batch 4): resumed,
    the fit ends bitwise where the straight fit ends. The epoch's float32 task-loss sums came back summed over the
    ranks on rank 0, which rounds otherwise than each rank's own sum: DWA's weights and then every weight differed
    in the last bits. The window's gradients so far, each rank's own, were in no checkpoint: the resumed fit left
    that batch out."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # dropout: each rank's own random stream (seeded per rank at setup) must continue where the checkpoint left it
    dropout_mmoe = copy.deepcopy(MMOE)
    dropout_mmoe["init_args"]["dropout"] = 0.2
    mid = tmp_path / "mid.ckpt"

    def config(name: str, *, save_mid: bool) -> Path:
        callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                      "init_args": {"dirpath": str(tmp_path / name / "final"), "filename": "final",
                                    "save_on_train_epoch_end": True}}]
        if save_mid:  # the straight fit's own mid-window checkpoint is the one resumed (writing it changes nothing)
            callbacks.append({"class_path": "save_at_batch.SaveAtBatch",
                              "init_args": {"path": str(mid), "epoch": 1, "batch": 4}})
        cfg = {
            "seed_everything": 0,
            "trainer": {"accelerator": "cpu", "max_epochs": 3, "logger": False, "accumulate_grad_batches": 2,
                        "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
                        "limit_val_batches": 0, "callbacks": callbacks},
            "model": {"class_path": "mmoe_rec.training.module.MultiTaskModule",
                      "init_args": {"model": dropout_mmoe, "weighting": "dwa",
                                    "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.01}}}},
            "data": {"class_path": "mmoe_rec.data.datamodule.FeatureDataModule",
                     "init_args": {"data_dir": str(feature_dir), "batch_size": 96, "seed": 3, "shuffle_buffer": 256}},
        }
        (tmp_path / name).mkdir()
        (tmp_path / name / "c.yaml").write_text(yaml.safe_dump(cfg))
        return tmp_path / name / "c.yaml"

    run_two_processes(tmp_path, config("straight", save_mid=True), *PLAIN_FORK)
    saved = torch.load(mid, map_location="cpu", weights_only=False)
    grads = saved["mmoe_rec_accumulated_grads"]["grads"]
    assert grads and all(has.tolist() == [True, True] for has, _ in grads.values())
    assert any(not torch.equal(values[0], values[1]) for _, values in grads.values())  # each rank's own
    run_two_processes(tmp_path, config("resumed", save_mid=False), *PLAIN_FORK, "--ckpt_path", str(mid))
    a = torch.load(tmp_path / "straight" / "final" / "final.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "final" / "final.ckpt", map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"] == 18  # 6 optimizer steps an epoch (the last window of 1 batch)
    assert a["state_dict"]["weighting.current"].tolist() != [1.0, 1.0]  # epoch 2 weighted by DWA
    for key in a["state_dict"]:
        torch.testing.assert_close(b["state_dict"][key], a["state_dict"][key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("kwargs,message", [
    ({"embedding_lr": -1.0}, "embedding_lr must be a finite number > 0, got -1.0"),  # trained the tables uphill
    ({"embedding_lr": float("nan")}, "embedding_lr must be a finite number > 0"),
    ({"embedding_optimizer": "adagrad"}, "unknown embedding_optimizer 'adagrad'"),
    ({"embedding_lr": 0}, "embedding_lr must be a finite number > 0, got 0"),  # the tables would never move
    ({"embedding_optimizer": "none"}, "unknown embedding_optimizer 'none'"),  # fbgemm's no-optimizer value
])
def test_the_sharded_strategy_refuses_bad_embedding_optimizer_settings_when_made(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ShardedEmbeddingStrategy(**kwargs)


@pytest.mark.parametrize("strategy_kwargs,trainer_kwargs,message", [
    # an optimizer fbgemm has no CPU kernel for: a 37-frame AssertionError traceback on every rank before
    ({"embedding_optimizer": "adam"}, {}, "embedding_optimizer 'adam' has no CPU kernel"),
    # the fused tables step in every backward: with accumulation they took a step per micro-batch
    ({}, {"accumulate_grad_batches": 2}, "accumulate_grad_batches=2 with sharding_type 'table_wise'"),
])
def test_the_sharded_strategy_refuses_what_its_fused_tables_cannot_do(feature_dir, tmp_path, strategy_kwargs,
                                                                      trainer_kwargs, message):
    dm = FeatureDataModule(str(feature_dir), batch_size=100, seed=0)
    module = MultiTaskModule(model=copy.deepcopy(MMOE), feature_spec=dm.spec)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=tmp_path, strategy=ShardedEmbeddingStrategy(**strategy_kwargs),
                        **trainer_kwargs)
    with pytest.raises(ValueError, match=message):
        trainer.fit(module, dm)


def test_loss_free_biases_are_updated_from_every_ranks_loads(feature_dir, tmp_path):
    """The sparse model under 2-process DDP: after every optimizer step (before the next forward, whose DDP buffer
    broadcast would mend it) both ranks hold the same biases, i.e. each updated from the loads summed over ranks.
    A rank updating from its own loads alone differed at 4 of 10 batch ends (a review's probe). In forked ranks
    (ddp_fork), which also checks that such a fit finishes with every row once: it failed at its end (rank 0's wait
    for its ranks read multiprocessing processes as Popen ones)."""
    cfg = write_config(tmp_path / "c.yaml", feature_dir, 64, tmp_path / "audit", epochs=1)
    config = yaml.safe_load(cfg.read_text())
    config["model"]["init_args"]["model"] = copy.deepcopy(SPARSE)
    config["model"]["init_args"]["model"]["init_args"].update(loss_free_bias=True, bias_update_rate=0.01)
    config["trainer"]["callbacks"].append({"class_path": "rank_failure.BiasAudit",
                                           "init_args": {"out_dir": str(tmp_path / "bias")}})
    cfg.write_text(yaml.safe_dump(config))
    run_two_processes(tmp_path, cfg, *PLAIN_FORK)
    rank0, rank1 = (json.loads((tmp_path / "bias" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert len(rank0) == len(rank1) > 10 and rank0[0]
    assert rank0 == rank1
    assert rank0[-1] != rank0[0]  # the biases moved
    assert mlflow_run(tmp_path / "mlflow.db")[0].info.status == "FINISHED"
    assert sum(e["rows"] for e in audit(tmp_path / "audit").values()) == 2000  # every row once


def test_data_parallel_tables_take_accumulation_and_any_embedding_optimizer():
    """data_parallel tables are plain parameters of the configured optimizer: no fused step, no fbgemm kernel."""
    ShardedEmbeddingStrategy(sharding_type="data_parallel", embedding_optimizer="adam").check_settings(4)


def test_a_sharded_table_state_that_does_not_fit_the_model_is_refused(tmp_path):
    """One gloo process: a sharding type that needs NCCL, a full tensor of another shape than the shards', and a
    checkpoint missing a sharded table are refused, not passed over."""
    import torch.distributed as dist

    from mmoe_rec.features.spec import SparseFeature, Task
    from mmoe_rec.nn.embedding import EmbeddingFront
    from mmoe_rec.training.sharding import _is_sharded, copy_into_shards, shard_module

    spec = FeatureSpec([SparseFeature("user", 5), SparseFeature("tags", 4, multi_valued=True)], ["d"],
                       [Task("y")]).finalize()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        for sharding_type in ("row_wise", "table_row_wise"):
            with pytest.raises(ValueError, match=f"sharding_type '{sharding_type}' needs the NCCL backend"):
                shard_module(EmbeddingFront(spec, embedding_dim=4), sharding_type, torch.device("cpu"))
        front = EmbeddingFront(spec, embedding_dim=4)
        shard_module(front, "table_wise", torch.device("cpu"))
        state = front.state_dict()
        tables = sorted(k for k, v in state.items() if _is_sharded(v))
        assert len(tables) == 2
        with pytest.raises(ValueError, match=r"has shape \(6, 4\), the sharded model expects \(5, 4\)"):
            copy_into_shards(state[tables[1]], torch.zeros(6, 4), tables[1])
        strategy = ShardedEmbeddingStrategy()
        strategy._lightning_module = front
        full = {k: torch.full(tuple(v.size()), 0.5) if _is_sharded(v) else v for k, v in state.items()}
        strategy.load_model_state_dict({"state_dict": full})  # every table: loads
        with pytest.raises(RuntimeError, match=f"missing \\['{re.escape(tables[0])}'\\]"):
            strategy.load_model_state_dict({"state_dict": {k: v for k, v in full.items() if k != tables[0]}})
        strategy.load_model_state_dict({"state_dict": {k: v for k, v in full.items() if k != tables[0]}},
                                       strict=False)
    finally:
        dist.destroy_process_group()


def test_a_sharded_checkpoint_missing_a_tables_optimizer_state_is_refused():
    class FusedOptimizer:  # stands in for DMP's fused optimizer: two tables with Adagrad state
        def state_dict(self):
            return {"state": {"t_user": {"t_user.momentum1": torch.ones(2)},
                              "t_item": {"t_item.momentum1": torch.ones(3)}}}

    strategy = ShardedEmbeddingStrategy()
    strategy._fused_optimizer = lambda: FusedOptimizer()
    with pytest.raises(RuntimeError, match="no embedding optimizer state for 't_item'"):
        strategy.load_optimizer_state_dict({"optimizer_states": [], SHARDED_OPTIMIZER_KEY: {
            "t_user": {"t_user.momentum1": torch.zeros(2)}}})
    with pytest.raises(RuntimeError, match="no embedding optimizer state 't_item.momentum1' for 't_item'"):
        strategy.load_optimizer_state_dict({"optimizer_states": [], SHARDED_OPTIMIZER_KEY: {
            "t_user": {"t_user.momentum1": torch.zeros(2)}, "t_item": {"t_item.momentum2": torch.zeros(3)}}})
