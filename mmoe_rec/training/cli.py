"""`mmoe-rec fit|validate|test|predict`: LightningCLI with the model and data chosen by class path in YAML.

    mmoe-rec fit --config configs/mmoe_synthetic.yaml
    mmoe-rec fit --config configs/mmoe_synthetic.yaml --trainer.devices 2 --trainer.strategy ddp
    mmoe-rec fit --config configs/mmoe_synthetic.yaml --print_config    # full, runnable config

The FeatureSpec is linked from the data module (`data.spec`) into the module (`model.init_args.feature_spec`) at
instantiation, so configs never repeat it. Lightning's SaveConfigCallback is off (it cannot write into an
SQLite-backed MLflow run); the resolved config is logged to MLflow by `before_<subcommand>` instead.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from jsonargparse import Namespace
from lightning.pytorch.callbacks import BasePredictionWriter, EarlyStopping, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mmoe_rec.data.datamodule import FeatureDataModule
from mmoe_rec.data.parquet_stream import feature_files
from mmoe_rec.features.spec import WEIGHT_COLUMN, label_column
from mmoe_rec.training import on_exception, sigterm
from mmoe_rec.training.checkpoint_file import check_checkpoint_file
from mmoe_rec.training.checkpoint_lock import (LOCK_NAME, lock_checkpoint_folders, release_checkpoint_folders,
                                               remove_partial_saves)
from mmoe_rec.training.child_ranks import (DONE_DIR_ENV, LAUNCHER_PID_ENV, ChildRankFailed, child_rank_reports,
                                           join_child_ranks, launcher_ended, mark_rank_done,
                                           name_failed_child_ranks)
from mmoe_rec.training.gloo_exit import settle_gloo_workers
from mmoe_rec.training.module import SCHEDULER_KEYS, MultiTaskModule, check_tasks_loaded, component_config
from mmoe_rec.training.predictions import ParquetPredictionWriter
from mmoe_rec.training.sharding import ShardedEmbeddingStrategy, register_strategy
from mmoe_rec.training.tracking import TrackingUnavailable, log_run_files, metric_name_part_problem, redacted

DEFAULT_LOGGER = {
    "class_path": "mmoe_rec.training.tracking.MLflowTracker",
    "init_args": {"experiment_name": "mmoe-rec"},
}


def check_data_for_module(datamodule, module: MultiTaskModule, splits: tuple[str, ...]) -> None:
    """Before any step: the module's tasks are loaded by the data and their label columns exist in every split
    (predict, given no splits, reads no labels)."""
    if splits:
        check_tasks_loaded(module.tasks, getattr(datamodule, "tasks", None))
    data_dir = getattr(datamodule, "data_dir", None)
    if data_dir is None:
        return
    spec = datamodule.spec
    for split in splits:
        files = feature_files(data_dir / split)
        try:
            names = set(pq.read_schema(files[0]).names)
        except (OSError, pa.ArrowException) as e:  # named, as ParquetIndex names a later file of the split
            raise ValueError(f"{files[0]}: not a readable Parquet file ({e})") from None
        wanted = [label_column(t) for t in module.tasks] + ([WEIGHT_COLUMN] if spec.has_weight else [])
        absent = [c for c in wanted if c not in names]
        if absent:
            raise ValueError(f"{files[0]}: label / weight column(s) {absent} missing from the features "
                             f"(tasks {module.tasks}); rebuild the features or drop the task from the config")


def check_monitors(trainer, module: MultiTaskModule) -> None:
    """Before any step: a callback that watches a metric (EarlyStopping, ModelCheckpoint, ReduceLROnPlateau) watches
    one the fit logs, and in the direction that means better. Lightning finds a missing one only at the first
    validation, after a whole epoch of training, and never a wrong mode: early stopping then ends the fit while the
    metric improves, and the "best" checkpoint is the worst."""
    logged = module.monitorable_metrics()
    # Lightning's own watchers (a callback of the user's with a `monitor` may log that metric itself)
    watchers = [(type(cb).__name__, cb.monitor, cb.mode) for cb in trainer.callbacks
                if isinstance(cb, (EarlyStopping, ModelCheckpoint))]
    scheduler = module.lr_scheduler_config
    if scheduler:  # ReduceLROnPlateau's `monitor` key, its `mode` argument (PyTorch's default "min")
        mode = None
        if str(scheduler.get("class_path", "")).endswith("ReduceLROnPlateau"):
            mode = (scheduler.get("init_args") or {}).get("mode", "min")
        watchers.append(("the lr_scheduler", scheduler.get("monitor"), mode))
    for who, monitor, mode in watchers:
        if not isinstance(monitor, str) or monitor in ("epoch", "step"):
            continue  # ModelCheckpoint's own candidates (monitor="step", mode="max": keep the latest k)
        if monitor not in logged:
            raise ValueError(f"{who} monitors {monitor!r}, which this fit does not log (tasks {module.tasks}; it "
                             f"logs {', '.join(logged)}; experts/ and relatedness/ metrics go to MLflow only)")
        better = logged[monitor]
        if better is not None and mode is not None and mode != better:
            raise ValueError(f"{who} monitors {monitor!r} with mode {mode!r}, but {monitor} is better when "
                             f"{'higher' if better == 'max' else 'lower'}: set its mode to {better!r}")


def check_task_names_for_mlflow(trainer, module: MultiTaskModule) -> None:
    """Before the MLflow run is made: every task name can stand in a metric name (`val/<task>/auc`). Lightning would
    log others with characters deleted, or fail at the first metric once training has started."""
    if not any(isinstance(logger, MLFlowLogger) for logger in trainer.loggers):
        return
    for task in module.tasks:
        problem = metric_name_part_problem(task)
        if problem:
            raise ValueError(f"task {task!r} cannot be named in MLflow metrics (val/{task}/auc, ...): {problem}; "
                             "rename it in the feature schema and rebuild the features, or train without the "
                             "MLflow logger (--trainer.logger false)")


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as {"a.b.c": leaf}; an optimizer's or scheduler's stray keys folded into its init_args (as
    the module reads them), so that `--...optimizer.init_args.lr` and `--...optimizer.lr` compare as one key."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if not isinstance(value, dict):
        return {prefix: value}
    if "class_path" in value and not prefix.endswith("feature_spec"):
        value = component_config(value, prefix, SCHEDULER_KEYS)
    out: dict[str, Any] = {}
    for key, item in value.items():
        out.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


# Trainer settings typed Union[int, float]: the parser reads "1" as 1.0 (a typing cache puts float first, Lightning
# issue #21259), which Lightning takes as 100 % of the batches; 2, 3, ... come out as ints again by Lightning's rule
ONE_BATCH_SETTINGS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches",
                      "val_check_interval", "overfit_batches")


def written_as_integer_one(args: list[str], key: str) -> bool:
    """Whether the setting trainer.<key> that wins in `args` (the last of the --config files' YAML and the options
    in their order) was written as the integer 1 (`1`, not `1.0`)."""
    found, i = None, 0
    while i < len(args):
        arg, value = args[i], None
        if arg in ("-c", "--config", f"--trainer.{key}") and i + 1 < len(args):
            name, value, i = arg, args[i + 1], i + 2
        elif arg.startswith(("--config=", f"--trainer.{key}=")):
            (name, value), i = arg.split("=", 1), i + 1
        else:
            i += 1
            continue
        if name in ("-c", "--config"):
            try:
                trainer = (yaml.safe_load(Path(value).read_text()) or {}).get("trainer")
            except (OSError, yaml.YAMLError, AttributeError):
                continue
            if isinstance(trainer, dict) and key in trainer:
                found = trainer[key]
        else:
            try:
                found = yaml.safe_load(value)
            except yaml.YAMLError:
                found = value
    return type(found) is int and found == 1


def check_config_files(args: list[str]) -> None:
    """Each --config file in `args` holds a YAML mapping of settings: jsonargparse reported a syntax error as
    `Problems parsing config: ... in "<unicode string>", line 2` and an empty file or a list as `Unexpected
    config:`, naming no file. A --config value that is no file (inline YAML) is left to jsonargparse."""
    for i, arg in enumerate(args):
        if arg in ("-c", "--config") and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        else:
            continue
        path = Path(os.path.expanduser(value))
        if not path.is_file():
            continue
        try:
            loaded = yaml.safe_load(path.read_text())
        except UnicodeDecodeError as e:
            raise ValueError(f"--config {value}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ValueError(f"--config {value}: not valid YAML{where}: {problem}") from None
        if loaded is None:
            raise ValueError(f"--config {value} is empty: a config file is a YAML mapping of settings "
                             "(trainer:, model:, data:, ...)")
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {value} holds a YAML {type(loaded).__name__}, not a mapping of settings "
                             "(trainer:, model:, data:, ...)")


def component_class_override(args: list[str]) -> None:
    """Raise a ValueError naming `--model[.init_args].optimizer.class_path X` (or lr_scheduler's) in `args`: the
    module takes the optimizer as a plain dict, and the parser reported such an option as "Problem with given
    class_path 'mmoe_rec.training.module.MultiTaskModule': 'dict' object has no attribute 'init_args'"."""
    for arg in args:
        m = re.fullmatch(r"--(model\.(?:init_args\.)?(optimizer|lr_scheduler))\.class_path(=.*)?", arg)
        if m:
            example = ("{class_path: torch.optim.SGD, init_args: {lr: 0.1}}" if m.group(2) == "optimizer" else
                       "{class_path: torch.optim.lr_scheduler.StepLR, init_args: {step_size: 10}}")
            raise ValueError(f"{arg.split('=', 1)[0]}: another {m.group(2)} class takes the whole entry, e.g. "
                             f"--{m.group(1)} '{example}' (its settings one by one: --{m.group(1)}.init_args.<name> "
                             "<value>)") from None


CKPT_PATH_HELP = {  # --ckpt_path, by whether the subcommand is fit
    True: "a checkpoint file to resume the fit from (e.g. checkpoints/<run>/last.ckpt), or last: the newest "
          "last.ckpt in the checkpoint folders (none: the fit starts anew)",
    False: "the checkpoint file whose model this runs (e.g. checkpoints/<run>/best.ckpt), or last: the newest "
           "last.ckpt in the checkpoint folders (required)",
}
_running_cli: list["MultiTaskCLI"] = []  # the CLI of this process, for a SIGTERM before Lightning handles it


def _running_trainer() -> Any:
    """The trainer of this process's CLI, once it has made one (else None)."""
    return getattr(_running_cli[-1], "trainer", None) if _running_cli else None


def _end_job_on_sigterm() -> None:
    """A SIGTERM outside Lightning's handler, or one Lightning's could not act on in time (sigterm.watch): the
    ranks this process launched, if any, are ended, then the run, if made, is marked FAILED (the tracking store
    may be slow). The ranks' marker folder and the prediction writers' temporary files go too (the process ends by
    os._exit, past the cleanup that would have removed them)."""
    folder = os.environ.get(DONE_DIR_ENV)
    if folder and os.environ.get(LAUNCHER_PID_ENV) == str(os.getpid()):  # made by this process
        shutil.rmtree(folder, ignore_errors=True)
    _end_orphaned_run()  # the SIGTERM Linux sends a launched rank as rank 0 dies (sigterm.die_with_parent)
    trainer = _running_trainer()
    if trainer is None:
        return
    writers = [c for c in trainer.callbacks if isinstance(c, ParquetPredictionWriter)]
    for writer in writers:  # their on_exception, which removes them, will not run
        writer.remove_temporary_files()
    launcher = getattr(trainer.strategy, "launcher", None)
    for proc in getattr(launcher, "procs", None) or []:
        if isinstance(proc, subprocess.Popen):  # ddp: the ranks it started
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        elif callable(getattr(proc, "terminate", None)):  # ddp_spawn / ddp_fork: this process only waits for them
            proc.terminate()
    _end_runs_failed(trainer)
    for writer in writers:  # again: the main thread may have opened a part meanwhile
        writer.remove_temporary_files()


def folded_components(cfg: Namespace) -> Namespace:
    """A copy of `cfg` (the root's or a subcommand's) with each module optimizer / lr_scheduler in the
    {"class_path", "init_args", own keys} form (component_config): jsonargparse keeps a dotted override such as
    `--model.init_args.optimizer.init_args.lr 0.01` as a key `lr` beside `init_args`, which the module lets win."""
    cfg = cfg.clone()
    for prefix in ("", *(f"{sub}." for sub in LightningCLI.subcommands())):
        for key, own in (("optimizer", ()), ("lr_scheduler", SCHEDULER_KEYS)):
            path = f"{prefix}model.init_args.{key}"
            value = cfg.get(path) if path in cfg else None
            if isinstance(value, dict) and "class_path" in value:
                cfg[path] = component_config(value, key, own)
    return cfg


class MultiTaskParser(LightningArgumentParser):
    """Every dump (`--print_config`, the config logged to MLflow) with the optimizer and lr_scheduler settings the
    module uses in one place: `--print_config` printed a dotted override beside `init_args.lr` and the old value
    inside it, so editing the value in view in the printed file changed nothing. A one-batch setting written as the
    integer 1 is dumped as 1, as instantiate_trainer passes it (dumped as 1.0, the file ran every batch)."""

    def dump(self, cfg: Namespace, *args: Any, **kwargs: Any) -> str:
        text = super().dump(folded_components(cfg), *args, **kwargs)
        given = _running_cli[-1]._given_args if _running_cli else []
        ones = [path for prefix in ("", *(f"{sub}." for sub in LightningCLI.subcommands()))
                for path in (f"{prefix}trainer.{key}" for key in ONE_BATCH_SETTINGS)
                if path in cfg and cfg.get(path) == 1 and written_as_integer_one(given, path.rpartition(".")[2])]
        yaml_out = kwargs.get("format", "parser_mode") in ("parser_mode", "yaml") and not kwargs.get("with_comments")
        if not ones or not yaml_out:
            return text
        # the union type serializes the 1 as 1.0 again (float first): set in the dumped YAML, dumped as jsonargparse
        # dumps it; a header's comment lines kept
        header = "".join(line for line in text.splitlines(keepends=True)[:len(self.dump_header or [])])
        data = yaml.safe_load(text)
        for path in ones:
            *parents, key = path.split(".")
            node = data
            for part in parents:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict) and key in node:
                node[key] = 1
        return header + yaml.safe_dump(data, default_flow_style=False, allow_unicode=True, sort_keys=False)


class MultiTaskCLI(LightningCLI):
    def parse_arguments(self, parser, args) -> None:
        _running_cli[:] = [self]
        self._checkpoint_locks: list[int] = []  # a fit's checkpoint folders, held by its rank 0 for the whole fit
        self._given_args = [str(a) for a in (args if args is not None else sys.argv[1:])]
        check_config_files(self._given_args)
        try:
            super().parse_arguments(parser, args)
        except Exception:
            component_class_override(self._given_args)  # a clearer error where the parser's names the model
            raise

    def instantiate_trainer(self, **kwargs: Any):
        """`--trainer.limit_val_batches 1` (one batch) reached Lightning as 1.0 (every batch): given as the integer
        1, it is the integer 1 again (set here: the parser's instantiation reads the config's 1 as 1.0 once more)."""
        for key in ONE_BATCH_SETTINGS:
            value = self._get(self.config_init, "trainer", default={}).get(key)
            if key not in kwargs and isinstance(value, float) and value == 1.0 \
                    and written_as_integer_one(self._given_args, key):
                kwargs[key] = 1
        return super().instantiate_trainer(**kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.spec", "model.init_args.feature_spec", apply_on="instantiate")
        parser.set_defaults({"trainer.logger": DEFAULT_LOGGER})
        parser.add_argument("--checkpoint_dir", type=Optional[str], default=None,
                            help="directory of every ModelCheckpoint callback (overrides their dirpath)")
        parser.add_argument("--predictions_path", type=str, default="predictions.parquet",
                            help="predict: the Parquet file of ids and score_<task> columns (unless the config "
                                 "has its own prediction writer callback)")

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        for action in parser._actions:  # Lightning's help offers "best", "hpc", "registry" and None, refused here
            if action.dest == "ckpt_path":
                action.help = CKPT_PATH_HELP[subcommand == "fit"]
        return parser

    def _run_subcommand(self, subcommand: str) -> None:
        # a rank that fails during the work: Lightning SIGKILLs rank 0, which ends its MLflow runs FAILED first
        with child_rank_reports(on_child_failure=lambda: _end_runs_failed(self.trainer)) as done_dir:
            try:
                super()._run_subcommand(subcommand)
            except Exception as e:  # not Ctrl+C's SystemExit: Lightning SIGKILLs the ranks itself then
                if sigterm.stopped_by_sigterm_in_predict(self.trainer):  # Lightning has marked its run FAILED
                    raise SIGTERMException() from e
                name_failed_child_ranks(self.trainer, done_dir)  # rank 0's gloo error names no rank
                raise
            finally:
                _unshare_run()
                release_checkpoint_folders(self._checkpoint_locks)
            mark_rank_done(self.trainer)  # a launched rank: its work is done, whatever its exit brings
            try:  # rank 0 of a multi-process job: its job succeeded only if every other rank's did
                join_child_ranks(self.trainer, done_dir)
            except ChildRankFailed:
                _end_runs_failed(self.trainer)  # the run ended FINISHED with rank 0's part
                raise

    def _parse_ckpt_path(self) -> None:
        """Lightning puts the checkpoint's model settings over the config's and the command line's: say which
        given settings lose (a changed layer size or learning rate would otherwise be ignored without a word)."""
        sub = self.config.get("subcommand")
        given = _flat(self.config[sub].get("model")) if sub else {}
        if sub and self.config[sub].get("ckpt_path"):  # before the trainer and its MLflow run are made
            path = str(self.config[sub]["ckpt_path"])
            if path == "best":
                # Lightning takes "best" from the ModelCheckpoint of a fit earlier in this same process; in a fresh
                # one it fails after the MLflow run is made, saying the callback is "not configured to save the
                # best model" (a fit's own monitored callback included)
                raise ValueError(f"--ckpt_path best: `mmoe-rec {sub}` runs in a process of its own, with no earlier "
                                 "fit whose best checkpoint Lightning could look up; give the file, e.g. "
                                 "checkpoints/<run>/best.ckpt")
            if path == "registry" or path.startswith("registry:"):  # Lightning's model registry: a download
                raise ValueError(f"--ckpt_path {path}: mmoe-rec reads checkpoints from files (Lightning's model "
                                 "registry downloads them); give the checkpoint file, or last")
            if path == "hpc":  # Lightning's SLURM requeue checkpoint: hpc_ckpt_<n>.ckpt in default_root_dir
                root = Path(self.config[sub].get("trainer", {}).get("default_root_dir") or ".").expanduser()
                if not list(root.glob("hpc_ckpt_*.ckpt")):
                    raise ValueError(f"--ckpt_path hpc: no hpc_ckpt_<n>.ckpt in {root.resolve()} (the trainer's "
                                     "default_root_dir, where Lightning's SLURM requeue writes them); give the "
                                     "checkpoint file, or last")
            if path == "last":  # resolved before Lightning reads the checkpoint's settings, as a named file is
                path = self._resolve_last_checkpoint(sub)
            if path != "last":
                check_checkpoint_file(path)
        super()._parse_ckpt_path()
        if not sub:
            return
        used = _flat(self.config[sub].get("model"))
        if self.config[sub].get("ckpt_path") not in (None, "last"):  # "last": a fit with none to resume
            self._check_checkpoint_matches(sub, given, used)
        lost = {k: (v, used[k]) for k, v in given.items()
                if k in used and used[k] != v and ".feature_spec" not in f".{k}"}
        if lost:
            rank_zero_warn(
                "these settings come from the checkpoint (--ckpt_path), not from the config or the command line: "
                + "; ".join(f"model.{k}: given {g!r}, checkpoint {u!r}" for k, (g, u) in sorted(lost.items()))
                + ". To train with other settings, start a new fit.")

    def _check_checkpoint_matches(self, sub: str, given: dict[str, Any], used: dict[str, Any],
                                  path: Any = None) -> None:
        """Before the trainer and its MLflow run are made: a checkpoint of features of another spec (its ids mean
        other values; the module refused it only once loading, leaving a FAILED run), and a fit resumed from another
        model class (it trained the checkpoint's model under this config's run name and wrote it over this
        config's checkpoints, with a warning)."""
        from mmoe_rec.features.spec import FeatureSpec

        path = path or self.config[sub]["ckpt_path"]
        saved = next((v for k, v in used.items() if k.endswith("feature_spec.version")), None)
        data_dir = _flat(self.config[sub].get("data")).get("init_args.data_dir")
        spec_file = Path(str(data_dir)) / "spec.json" if data_dir else None
        if saved and spec_file is not None and spec_file.is_file():
            version = FeatureSpec.load(spec_file).version
            if version != saved:
                raise ValueError(f"--ckpt_path {path} was trained on features of spec version {saved}; {data_dir} "
                                 f"has spec version {version}: their ids mean other values. Use the feature folder "
                                 "the model was trained on (its spec.json), or train again")
        key = "init_args.model.class_path"
        if sub == "fit" and key in given and key in used and _class_of(given[key]) is not _class_of(used[key]):
            raise ValueError(f"--ckpt_path {path} holds a {used[key]} model; the config trains a {given[key]}: "
                             "resuming would train the checkpoint's model under this config's run and checkpoint "
                             "folder. Resume with the config that model was trained with, or start a new fit")

    def _log_config(self) -> None:
        sub = self.subcommand
        config = yaml.safe_load(self._parser(sub).dump(self.config[sub], skip_none=False))  # folded_components
        from mlflow.exceptions import MlflowException

        try:  # the run's first call to the store: a server that answers but is no MLflow fails here
            log_run_files(self.trainer.logger, yaml.safe_dump(config, sort_keys=False), self.model.spec.to_dict(),
                          getattr(self.datamodule, "data_dir", None), command=sub)
            _share_run_with_ranks(self.trainer.logger)
            if isinstance(self.trainer.logger, MLFlowLogger):  # the model's and data's own come from Lightning
                self.trainer.logger.log_hyperparams({"trainer": config.get("trainer") or {},
                                                     "seed_everything": config.get("seed_everything")})
        except Exception as e:
            _end_run_failed(self.trainer.logger)  # not left RUNNING (an artifact folder that cannot be written)
            if not isinstance(e, MlflowException):
                raise
            import mlflow

            # from None: the CLI prints the last user error of a chain, which would be MLflow's raw text again
            store = redacted(mlflow.get_tracking_uri())
            raise TrackingUnavailable(f"MLflow tracking store {store} refused the run's first call (is it an MLflow "
                                      f"tracking server?): {e.message[:300]}") from None

    def _warn_oversubscribed(self) -> None:
        """More CPU processes than cores: each rank imports torch and meets the others at its own slow pace (64 ranks
        on 2 cores sat minutes in the rendezvous without a word)."""
        from lightning.pytorch.accelerators import CPUAccelerator

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        if isinstance(self.trainer.accelerator, CPUAccelerator) and self.trainer.num_devices > cores:
            rank_zero_warn(f"--trainer.devices {self.trainer.num_devices} CPU processes on {cores} cores: the ranks "
                           "start slowly (minutes to meet) and train slower than fewer would; use at most one per "
                           "core")

    def _before(self, splits: tuple[str, ...]) -> None:
        self._warn_oversubscribed()
        check_data_for_module(self.datamodule, self.model, splits)
        check_splits = getattr(self.datamodule, "check_split_has_rows", None)
        for split in splits if check_splits else ():  # an empty one failed its loader after the run was made
            if not (split == "valid" and self.trainer.limit_val_batches == 0):
                check_splits(split)
        check_task_names_for_mlflow(self.trainer, self.model)
        directory = self.config[self.subcommand].get("checkpoint_dir")
        if directory:
            for cb in self.trainer.checkpoint_callbacks:
                cb.dirpath = os.path.realpath(os.path.expanduser(directory))
        if self.subcommand == "fit":
            self._lock_checkpoint_folders()
        self._log_config()

    def _lock_checkpoint_folders(self) -> None:
        """Rank 0 (under ddp_spawn the main process) holds each local checkpoint folder for the whole fit, before its
        run is made (checkpoint_lock). A callback without a folder writes into its own run's, or, without a logger,
        into <default_root_dir>/checkpoints (Lightning's choice: the same folder for every fit started there)."""
        if not self.trainer.is_global_zero:
            return
        from fsspec.implementations.local import LocalFileSystem
        from lightning.fabric.utilities.cloud_io import get_filesystem

        default = None if self.trainer.loggers else os.path.join(self.trainer.default_root_dir, "checkpoints")
        dirpaths = [cb.dirpath or default for cb in self.trainer.checkpoint_callbacks]
        folders = {str(d) for d in dirpaths if d and isinstance(get_filesystem(str(d)), LocalFileSystem)}
        self._checkpoint_locks = lock_checkpoint_folders(folders)
        for folder in sorted(folders):
            if removed := remove_partial_saves(folder):
                rank_zero_info(f"removed {len(removed)} partial checkpoint file(s) from {folder}, left by a fit that "
                               f"was killed as it wrote them: {', '.join(removed)}")
        fresh = {f for f in folders if not set(os.listdir(f)) - {LOCK_NAME}}
        for folder in fresh:  # the lock file alone: not a folder holding another fit's checkpoints
            warnings.filterwarnings("ignore", message=re.escape(f"Checkpoint directory {folder} exists and is not "
                                                                "empty"))

    def before_fit(self) -> None:
        if self.config["fit"].get("ckpt_path") == "last":  # none to resume (`_resolve_last_checkpoint`): a fresh fit
            folders = ", ".join(sorted(map(str, self._last_checkpoint_folders("fit")))) or "no checkpoint folder"
            rank_zero_info(f"--ckpt_path last: no last.ckpt in {folders}; a new fit starts")
            self.config_init["fit"]["ckpt_path"] = None  # not Lightning's own lookup (the config's folders again)
        check_monitors(self.trainer, self.model)
        if isinstance(self.trainer.strategy, ShardedEmbeddingStrategy):  # before the run and the ranks exist
            self.trainer.strategy.check_settings(self.trainer.accumulate_grad_batches, self.model)
        self._before(("train", "valid"))

    def _require_checkpoint(self) -> None:
        # validate / test / predict run in a fresh process: without a checkpoint the model is untrained
        if not self.config[self.subcommand].get("ckpt_path"):
            raise ValueError(f"`mmoe-rec {self.subcommand}` needs --ckpt_path (a checkpoint written by `mmoe-rec "
                             f"fit`, e.g. checkpoints/<run>/best.ckpt): without it the model's weights are random")

    def _last_checkpoint_folders(self, sub: str) -> set[Path]:
        """Where `--ckpt_path last` looks: --checkpoint_dir, or the folders of the config's ModelCheckpoint
        callbacks (read from the config: the trainer is not made yet)."""
        override = self.config[sub].get("checkpoint_dir")
        if override:
            return {Path(os.path.expanduser(str(override)))}
        callbacks = (self.config[sub].get("trainer") or {}).get("callbacks") or []
        folders = set()
        for cb in callbacks if isinstance(callbacks, list) else [callbacks]:
            if not isinstance(cb, (dict, Namespace)):
                continue
            kind, dirpath = _class_of(cb.get("class_path")), (cb.get("init_args") or {}).get("dirpath")
            if isinstance(kind, type) and issubclass(kind, ModelCheckpoint) and dirpath:
                folders.add(Path(os.path.expanduser(str(dirpath))))  # as ModelCheckpoint reads it
        return folders

    def _resolve_last_checkpoint(self, sub: str) -> str:
        """`--ckpt_path last`: the newest last.ckpt (last-v<n>.ckpt) in the checkpoint folders, resolved to its path
        before Lightning reads a named checkpoint's model settings over the config's (with "last" it read none: a
        config of other layer sizes failed loading the weights, after the MLflow run was made). Lightning's own
        lookup read the config's folders even under --checkpoint_dir, and a callback without a folder looks in the
        new MLflow run's; where it found none it warned "No checkpoint will be loaded" and went on with the
        untrained model. A fit with none to resume starts afresh ("last"); the other subcommands refuse."""
        folders = self._last_checkpoint_folders(sub)
        found = [p for folder in folders if folder.is_dir() for p in folder.iterdir()
                 if re.fullmatch(r"last(-v?\d+)?\.ckpt", p.name) and p.is_file()]  # not a dangling link
        if found:
            newest = str(max(found, key=lambda p: p.stat().st_mtime))
            self.config[sub]["ckpt_path"] = newest
            return newest
        if sub == "fit":
            return "last"
        if not folders:
            raise ValueError("--ckpt_path last: the config's checkpoint callbacks name no folder (dirpath) to look "
                             "in; give the checkpoint file, or --checkpoint_dir (the folder the fit wrote to)")
        where = "--checkpoint_dir" if self.config[sub].get("checkpoint_dir") else "the config's checkpoint folders"
        raise ValueError(f"--ckpt_path last: no last.ckpt in {', '.join(sorted(map(str, folders)))} ({where}); "
                         "give the checkpoint file, or the --checkpoint_dir the fit wrote to")

    def before_validate(self) -> None:
        self._require_checkpoint()
        self._before(("valid",))

    def before_test(self) -> None:
        self._require_checkpoint()
        self._before(("test",))

    def before_predict(self) -> None:
        self._require_checkpoint()
        self._warn_oversubscribed()
        check_data_for_module(self.datamodule, self.model, ())
        check_split = getattr(self.datamodule, "check_split_has_rows", None)
        if check_split is not None:  # before the run: its loader failed after it (the run left FAILED)
            check_split(self.datamodule.predict_split, with_ids=True)
        if not any(isinstance(cb, BasePredictionWriter) for cb in self.trainer.callbacks):
            path = self.config[self.subcommand].get("predictions_path") or "predictions.parquet"
            writer = ParquetPredictionWriter(path)
            writer.check_output(self.trainer.world_size)  # a folder there failed after the run was made
            self.trainer.callbacks.append(writer)
        config = self.config_init[self.subcommand]
        if config.get("return_predictions") is None:  # the writer has them: not every batch's scores in memory too
            config["return_predictions"] = False
        self._log_config()  # a predict run records what made it, as every other run does


def _class_of(class_path: Any) -> Any:
    """The class a class path names (one class has several paths: mmoe_rec.models.MMoE, ...mmoe.MMoE)."""
    from mmoe_rec.models.factory import import_class

    try:
        return import_class(str(class_path))
    except (ImportError, AttributeError, ValueError):
        return class_path


def _end_run_failed(logger: Any) -> None:
    """Marks the logger's MLflow run FAILED if it was created (best effort: the store may be what failed)."""
    if not isinstance(logger, MLFlowLogger) or getattr(logger, "_run_id", None) is None:
        return
    try:
        logger.experiment.set_terminated(logger.run_id, "FAILED")
    except Exception:  # noqa: BLE001 - the original error is the one to report
        pass


def _end_runs_failed(trainer: Any) -> None:
    """`_end_run_failed` for each of the trainer's loggers (none without a trainer)."""
    for logger in getattr(trainer, "loggers", None) or []:
        _end_run_failed(logger)


RUN_ID_ENV = "MMOE_REC_RANKS_RUN_ID"  # rank 0's MLflow run and its store, for the ranks it launches
RUN_URI_ENV = "MMOE_REC_RANKS_RUN_TRACKING_URI"


def _share_run_with_ranks(logger: Any) -> None:
    """Rank 0's run, in the environment its launcher copies into the ranks' (the run is made before they are
    launched): a rank that outlives rank 0 marks it FAILED (`_end_orphaned_run`)."""
    if isinstance(logger, MLFlowLogger) and getattr(logger, "_run_id", None) is not None \
            and os.environ.get(LAUNCHER_PID_ENV) == str(os.getpid()):
        import mlflow

        os.environ[RUN_ID_ENV] = logger.run_id
        os.environ[RUN_URI_ENV] = getattr(logger, "_tracking_uri", None) or mlflow.get_tracking_uri()


def _unshare_run() -> None:
    if os.environ.get(LAUNCHER_PID_ENV) in (None, str(os.getpid())):  # not a launched rank's inherited ones
        os.environ.pop(RUN_ID_ENV, None)
        os.environ.pop(RUN_URI_ENV, None)


def _end_orphaned_run() -> None:
    """In a launched rank whose launcher, rank 0, has died: rank 0's run, if still RUNNING, is marked FAILED, and its
    folder of done markers is removed. A rank 0 killed by SIGKILL (the out-of-memory killer's way) runs no cleanup of
    its own: it left the run RUNNING for good and an empty mmoe-rec-ranks-* folder in $TMPDIR."""
    launcher = os.environ.get(LAUNCHER_PID_ENV, "")
    run_id, uri, folder = os.environ.get(RUN_ID_ENV), os.environ.get(RUN_URI_ENV), os.environ.get(DONE_DIR_ENV)
    if not ((run_id and uri) or folder) or not launcher.isdigit() or int(launcher) == os.getpid() \
            or not launcher_ended(int(launcher)):
        return
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
    if not (run_id and uri):
        return
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "FAILED")
    except Exception:  # noqa: BLE001 - best effort: the store may be what failed
        pass


def _end_failed_job() -> None:
    """The job failed: its run, if made, says so. Lightning marks it FAILED in its own exception handling, after the
    callbacks' on_exception; an exception there (or one raised asynchronously into it, as a DataLoader worker's
    death is, by PyTorch's SIGCHLD handler) skipped that and left the run RUNNING. It also skipped Lightning's
    teardown, which puts back the signal handlers it replaced: done first, so that the watch (sigterm.watch) acts
    at once on a SIGTERM while a slow store is written (Lightning's handler only takes note), and so that a caller
    in this process does not keep a handler that reads a finished trainer."""
    trainer = _running_trainer()
    connector = getattr(trainer, "_signal_connector", None)
    if connector is not None:
        try:
            connector.teardown()
        except Exception:  # noqa: BLE001 - the original error is the one to report
            pass
    _end_runs_failed(trainer)
    _end_orphaned_run()  # this rank's error may be rank 0's death (gloo's "Connection closed by peer")


def run_lightning_cli(argv: list[str]) -> MultiTaskCLI:
    # `mmoe-rec` passes sys.argv[1:] on as args; LightningCLI warns when both are set, needlessly here
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    register_strategy()
    sigterm.install()  # every rank stops at the same batch (Lightning's handler broadcast inside the handler)
    on_exception.install()  # a rank that fails alone writes no on-exception checkpoint (it hung, waiting for the rest)
    launcher_pid = None
    if os.environ.get(DONE_DIR_ENV):  # a rank rank 0 launched: it ends with rank 0, however rank 0 ends
        launcher = os.environ.get(LAUNCHER_PID_ENV, "")
        launcher_pid = int(launcher) if launcher.isdigit() else None
        sigterm.die_with_parent(launcher_pid)
    try:
        with sigterm.watch(_end_job_on_sigterm, job=f"mmoe-rec {argv[0]}" if argv else "mmoe-rec",
                           launcher_pid=launcher_pid):
            try:
                return MultiTaskCLI(
                    model_class=MultiTaskModule,
                    datamodule_class=FeatureDataModule,
                    subclass_mode_model=True,
                    subclass_mode_data=True,
                    save_config_callback=None,
                    parser_class=MultiTaskParser,
                    auto_configure_optimizers=False,
                    # a bad setting raises (mmoe-rec prints its message) instead of printing ~45 lines of usage
                    # before it; no abbreviations: `--trainer.max_epoch 7` was taken as max_epochs (a YAML
                    # `max_epoch:` is refused)
                    parser_kwargs={"exit_on_error": False, "allow_abbrev": False,
                                   **{sub: {"exit_on_error": False, "allow_abbrev": False}
                                      for sub in MultiTaskCLI.subcommands()}},
                    args=argv,
                )
            except Exception:
                _end_failed_job()  # inside the watch: a SIGTERM meanwhile ends the process
                raise
    finally:
        _running_cli.clear()
        settle_gloo_workers()  # a multi-process CPU run: see gloo_exit (a rank could abort at exit)
