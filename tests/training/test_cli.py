"""LightningCLI: committed configs, --print_config round trip, a CLI fit logged to MLflow, bad input errors."""
from __future__ import annotations

import argparse
import logging
import re
import json
import warnings
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from conftest import mlflow_run, mlflow_runs
from mmoe_rec.training.cli import run_lightning_cli

pytestmark = pytest.mark.seeded_mlflow_store  # tmp_path/mlflow.db: a copy of an empty store (tests/conftest.py)

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*_*.yaml"))
CONFIG = CONFIGS[0].parent / "mmoe_synthetic.yaml"
TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
        "--trainer.num_sanity_val_steps", "0", "--trainer.log_every_n_steps", "1",
        "--data.init_args.batch_size", "128"]


def cli_error(argv, capsys) -> str:
    """Run the CLI expecting failure; returns the error text (exception message or parser output)."""
    with pytest.raises((SystemExit, ValueError, KeyError, TypeError, OSError, argparse.ArgumentError)) as info:
        run_lightning_cli(argv)
    if isinstance(info.value, SystemExit):
        assert info.value.code != 0
        captured = capsys.readouterr()
        return captured.err + captured.out
    return str(info.value)


def test_every_model_has_a_synthetic_and_a_census_config():
    names = {p.stem for p in CONFIGS}
    for model in ["shared_bottom", "omoe", "mmoe", "ple", "sparse_mmoe"]:
        assert {f"{model}_synthetic", f"{model}_census"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_committed_config_parses_to_a_full_config(config, capsys):
    with pytest.raises(SystemExit) as info:
        run_lightning_cli(["fit", "--config", str(config), "--print_config"])
    assert info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    inner = printed["model"]["init_args"]["model"]
    assert inner["class_path"].startswith("mmoe_rec.models.")
    assert "tower_hidden" in inner["init_args"]  # defaults expanded: a full config
    assert printed["trainer"]["logger"]["class_path"] == "mmoe_rec.training.tracking.MLflowTracker"


@pytest.mark.fresh_mlflow_store  # the default store made where the fit runs, by the fit
def test_printed_config_runs_and_logs_config_spec_commit(feature_dir, in_tmp, capsys):
    with pytest.raises(SystemExit):
        run_lightning_cli(["fit", "--config", str(CONFIGS[0].parent / "sparse_mmoe_synthetic.yaml"),
                           "--data.init_args.data_dir", str(feature_dir), "--print_config"])
    printed = capsys.readouterr().out
    (in_tmp / "printed.yaml").write_text(printed)
    run_lightning_cli(["fit", "--config", "printed.yaml", *TINY, "--checkpoint_dir", str(in_tmp / "ck"),
                       "--model.init_args.optimizer.init_args.lr", "0.004"])
    run, client = mlflow_run(in_tmp / "mlflow.db")
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "spec.json", "plots", "relatedness"} <= files
    matrices = json.load(open(client.download_artifacts(run.info.run_id, "relatedness/epoch_000.json", str(in_tmp))))
    label = matrices["label_corr"]
    assert label["tasks"] == ["click", "convert"] and label["matrix"][0][0] == pytest.approx(1.0)
    assert label["matrix"][0][1] == pytest.approx(run.data.metrics["relatedness/epoch/label_corr/click.vs.convert"])
    grad = matrices["grad_cos"]  # the epoch's last gradient probe (step 0 here) as numbers too, not only drawn
    assert grad["tasks"] == ["click", "convert"] and grad["matrix"][0][0] == pytest.approx(1.0)
    assert grad["matrix"][0][1] == pytest.approx(run.data.metrics["relatedness/grad_cos/click.vs.convert"])
    logged = yaml.safe_load(open(client.download_artifacts(run.info.run_id, "config.yaml", str(in_tmp))))
    assert logged["model"]["init_args"]["model"]["init_args"]["num_experts"] == 16
    optimizer = logged["model"]["init_args"]["optimizer"]  # the override where it took effect, not beside it
    assert optimizer["init_args"]["lr"] == 0.004 and set(optimizer) == {"class_path", "init_args"}
    params = run.data.params  # the trainer's settings and the seed are params too, not only in config.yaml
    assert params["trainer/max_epochs"] == str(logged["trainer"]["max_epochs"])
    assert params["seed_everything"] == str(logged["seed_everything"]) and "trainer/accelerator" in params
    assert run.data.tags.get("mlflow.source.git.commit")
    assert run.data.tags.get("mmoe_rec.git_dirty") in ("true", "false")  # a modified tree does not pass as clean
    assert run.data.tags["mmoe_rec.data_dir"] == str(feature_dir.resolve())
    assert "val/click/auc" in run.data.metrics and "experts/epoch/click/load_cv2" in run.data.metrics
    assert list((in_tmp / "ck").glob("*.ckpt"))


def test_unknown_task_is_an_error_before_training(feature_dir, in_tmp, capsys):
    msg = cli_error(["fit", "--config", str(CONFIGS[0].parent / "mmoe_synthetic.yaml"), *TINY,
                     "--data.init_args.data_dir", str(feature_dir),
                     "--model.init_args.model.init_args.tasks", "[click, purchase]"], capsys)
    assert "purchase" in msg and "unknown task" in msg


def test_a_monitored_metric_the_model_does_not_log_is_an_error_before_training(feature_dir, in_tmp, capsys):
    # the config's ModelCheckpoint and EarlyStopping watch val/click/auc: a model of the other task alone failed at
    # the first validation, after a whole epoch, with Lightning's traceback
    msg = cli_error(["fit", "--config", str(CONFIGS[0].parent / "mmoe_synthetic.yaml"), *TINY,
                     "--data.init_args.data_dir", str(feature_dir),
                     "--model.init_args.model.init_args.tasks", "[convert]"], capsys)
    assert "monitors 'val/click/auc'" in msg and "val/convert/auc" in msg
    assert not (in_tmp / "checkpoints").exists() and not list(in_tmp.rglob("*.ckpt"))
    # the scheduler's monitor too (ReduceLROnPlateau)
    msg = cli_error(["fit", "--config", str(CONFIGS[0].parent / "mmoe_synthetic.yaml"), *TINY,
                     "--data.init_args.data_dir", str(feature_dir), "--model.init_args.lr_scheduler",
                     "{class_path: torch.optim.lr_scheduler.ReduceLROnPlateau, monitor: val/clik/auc}"], capsys)
    assert "the lr_scheduler monitors 'val/clik/auc'" in msg


def test_missing_label_column_is_an_error_before_training(make_feature_dir, in_tmp, capsys):
    fd = make_feature_dir("nolabel", rows={"train": 300, "valid": 100, "test": 100})
    for path in (fd / "valid").glob("*.parquet"):
        pq.write_table(pq.read_table(path).drop_columns(["label_convert"]), path)
    msg = cli_error(["fit", "--config", str(CONFIGS[0].parent / "mmoe_synthetic.yaml"), *TINY,
                     "--data.init_args.data_dir", str(fd)], capsys)
    assert "label_convert" in msg and "missing" in msg
    assert not (in_tmp / "checkpoints").exists()


def test_wrong_class_path_is_an_error(feature_dir, in_tmp, capsys):
    msg = cli_error(["fit", "--config", str(CONFIGS[0].parent / "mmoe_synthetic.yaml"), *TINY,
                     "--data.init_args.data_dir", str(feature_dir),
                     "--model.init_args.model", '{"class_path": "mmoe_rec.models.mmoe.MMOE"}'], capsys)
    assert "MMOE" in msg


@pytest.mark.parametrize("override, expected", [
    (["--model.init_args.model", '{"class_path": "mmoe_rec.models.mmoe.MMOE"}'], "has no attribute 'MMOE'"),
    (["--model.init_args.model.init_args.num_expert", "3"], "Option 'num_expert' is not accepted"),
    (["--trainer.max_epochs", "abc"], "trainer.max_epochs: Expected a <class 'int'>. Got value: abc"),
    (["--model.init_args.model.init_args.num_experts", "eight"], "num_experts: Expected a <class 'int'>"),
    # an abbreviation was taken for the option it begins (max_epochs), where the same key in YAML is refused
    (["--trainer.max_epoch", "7"], "unrecognized arguments: --trainer.max_epoch 7"),
    # named by the option written, not "model" nor nothing; without the class's sub-config printed back
    (["--model.init_args.model.class_path", "mmoe_rec.models.mmoe.MMoEx"],
     "error: model.init_args.model: Type typing.Callable"),
    (["--model.init_args.model.init_args.num_experts", "eight"],
     "error: model.init_args.model.init_args.num_experts: Expected"),
    # a union type (the logger) names its key once per alternative: it printed ...log_model.init_args.log_model
    (["--trainer.logger.init_args.log_model", "maybe"], "error: trainer.logger.init_args.log_model: Expected"),
    # the strategy's own refusal, not the union's str alternative ("error: Expected a <class 'str'>.")
    (["--trainer.strategy", "mmoe_rec.training.sharding.ShardedEmbeddingStrategy",
      "--trainer.strategy.init_args.embedding_lr", "-1"], "error: embedding_lr must be a finite number > 0, got -1.0"),
    (["--trainer.strategy", "ddp_sharded_embeddings", "--trainer.strategy.init_args.embedding_lr", "0.02"],
     "init_args given to a short name (NestedArg(key='embedding_lr', val='0.02')): a short name such as"),
])
def test_mmoe_rec_reports_a_setting_the_parser_refuses_in_a_few_lines(feature_dir, in_tmp, capsys, override,
                                                                      expected):
    """jsonargparse printed ~45 lines of usage before the message; now the parser raises and mmoe-rec prints the
    message alone."""
    from mmoe_rec.cli import main

    code = main(["fit", "--config", str(CONFIGS[0].parent / "mmoe_synthetic.yaml"), *TINY,
                 "--data.init_args.data_dir", str(feature_dir), *override])
    err = capsys.readouterr().err
    assert code == 1 and expected in err and "usage:" not in err and "Namespace(" not in err
    assert len(err.strip().splitlines()) <= 4, err


@pytest.mark.parametrize("override, expected", [
    (["--model.init_args.model.init_args.k", "17"], "k must be in"),
    (["--model.init_args.model.init_args.capacity_factor", "0"], "capacity_factor must be a finite number > 0"),
])
def test_bad_sparse_settings_are_errors(feature_dir, in_tmp, capsys, override, expected):
    msg = cli_error(["fit", "--config", str(CONFIGS[0].parent / "sparse_mmoe_synthetic.yaml"), *TINY,
                     "--data.init_args.data_dir", str(feature_dir), *override], capsys)
    assert expected in msg


def test_unreachable_tracking_server_is_an_error_not_a_hang(feature_dir, in_tmp, capsys, monkeypatch):
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    msg = cli_error(["fit", "--config", str(CONFIGS[0].parent / "mmoe_synthetic.yaml"), *TINY,
                     "--data.init_args.data_dir", str(feature_dir)], capsys)
    assert "unreachable" in msg and time.monotonic() - start < 60  # a hang guard, not a speed test


def test_a_server_that_answers_but_is_no_mlflow_is_named_as_the_tracking_store(feature_dir, in_tmp, monkeypatch,
                                                                                capsys):
    """Its /health probe gets an answer (404 here), so the run's first store call is where it fails: the error
    names the store instead of passing on MLflow's raw 'API request ... failed with error code 404'."""
    import http.server
    import threading

    from mmoe_rec.training.tracking import TrackingUnavailable

    class NotMlflow(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404)

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotMlflow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    args = ["fit", "--config", str(CONFIGS[0].parent / "mmoe_synthetic.yaml"), *TINY,
            "--data.init_args.data_dir", str(feature_dir)]
    try:
        with pytest.raises(TrackingUnavailable, match=f"MLflow tracking store {uri} .*is it an MLflow tracking server"):
            run_lightning_cli(args)
        from mmoe_rec.cli import main

        monkeypatch.delenv("MMOE_REC_TRACEBACK", raising=False)
        assert main(args) == 1  # and the command prints that, not MLflow's raw text from further down the chain
        assert capsys.readouterr().err.startswith(f"error: MLflow tracking store {uri} refused")
    finally:
        server.shutdown()
        server.server_close()


def test_committed_configs_keep_the_best_and_the_latest_epoch(feature_dir, in_tmp):
    # lr 0: validation never improves after the first epoch, so the best checkpoint stays at epoch 0 while
    # last.ckpt must follow the run (Lightning's save_last alone writes it only when the best one is saved)
    steps_per_epoch = 3
    run_lightning_cli(["fit", "--config", str(CONFIGS[0].parent / "mmoe_synthetic.yaml"), *TINY,
                       "--trainer.max_epochs", "3", "--trainer.callbacks.init_args.patience", "10",
                       "--model.init_args.optimizer.init_args.lr", "0", "--data.init_args.data_dir", str(feature_dir),
                       "--checkpoint_dir", str(in_tmp / "ck")])
    assert sorted(p.name for p in (in_tmp / "ck").glob("*.ckpt")) == ["best.ckpt", "last.ckpt"]
    best = torch.load(in_tmp / "ck" / "best.ckpt", map_location="cpu", weights_only=False)
    last = torch.load(in_tmp / "ck" / "last.ckpt", map_location="cpu", weights_only=False)
    # the dotted override reached the optimizer (jsonargparse puts it beside class_path in the dict)
    assert last["hyper_parameters"]["optimizer"]["init_args"]["lr"] == 0
    assert last["optimizer_states"][0]["param_groups"][0]["lr"] == 0
    assert (best["epoch"], best["global_step"]) == (0, steps_per_epoch)
    assert (last["epoch"], last["global_step"]) == (2, 3 * steps_per_epoch)


def test_optimizer_and_scheduler_settings_beside_class_path_go_to_init_args():
    from mmoe_rec.training.module import component_config

    assert component_config({"class_path": "torch.optim.Adam", "init_args": {"lr": 1e-3, "fused": True}, "lr": 0.5},
                            "optimizer") == {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.5, "fused": True}}
    sched = component_config({"class_path": "torch.optim.lr_scheduler.StepLR", "step_size": 2, "interval": "step"},
                             "lr_scheduler", ("interval", "frequency", "monitor"))
    assert sched == {"class_path": "torch.optim.lr_scheduler.StepLR", "interval": "step", "init_args": {"step_size": 2}}
    with pytest.raises(ValueError, match="class_path"):
        component_config({"init_args": {"lr": 1.0}}, "optimizer")


def test_predict_writes_ids_and_scores_of_every_row_once(feature_dir, in_tmp):
    run_lightning_cli(["fit", "--config", str(CONFIGS[0].parent / "mmoe_synthetic.yaml"), *TINY,
                       "--data.init_args.data_dir", str(feature_dir), "--checkpoint_dir", str(in_tmp / "ck")])
    cli = run_lightning_cli(["predict", "--config", str(CONFIGS[0].parent / "mmoe_synthetic.yaml"),
                             "--data.init_args.data_dir", str(feature_dir), "--data.init_args.batch_size", "128",
                             "--ckpt_path", str(in_tmp / "ck" / "best.ckpt"), "--predictions_path", "out/pred.parquet"])
    assert cli.trainer.predict_loop.return_predictions is False  # written out, not also kept in memory
    got = pq.read_table(in_tmp / "out" / "pred.parquet")
    test = pq.read_table(feature_dir / "test")
    assert got.num_rows == test.num_rows
    assert {"score_click", "score_convert"} <= set(got.column_names)
    assert got.column_names == ["row_id", "request_id", "score_click", "score_convert"]  # the spec's id columns
    for id_column in ("row_id", "request_id"):  # every row of the split once
        assert sorted(got.column(id_column).to_pylist()) == sorted(test.column(id_column).to_pylist())
    scores = got.column("score_click").to_numpy()
    assert ((scores > 0) & (scores < 1)).all()
    assert not list((in_tmp / "out").glob(".*partial*"))
    # the predict run records what made it, as fit / validate / test runs do
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{in_tmp / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 2
    for run in runs:
        assert {"config.yaml", "spec.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    # both runs carry the config's run name: the tag says which command made each
    assert sorted(r.data.tags.get("mmoe_rec.command") for r in runs) == ["fit", "predict"]
    # predict reads no labels: a data module loading fewer tasks than the model's is fine
    run_lightning_cli(["predict", "--config", str(CONFIGS[0].parent / "mmoe_synthetic.yaml"),
                       "--data.init_args.data_dir", str(feature_dir), "--data.init_args.tasks", "[click]",
                       "--ckpt_path", str(in_tmp / "ck" / "best.ckpt"), "--predictions_path", "out/pred1.parquet"])
    assert pq.read_table(in_tmp / "out" / "pred1.parquet").num_rows == test.num_rows


def test_predict_keeps_integer_ids_with_nulls_and_past_2_53_exactly(make_feature_dir, in_tmp):
    """Ids go through as Arrow arrays: numpy would make an int64 column with a null float64 (2**53 + 1 rounded,
    or a writer schema that changes between batches)."""
    import pyarrow as pa

    features = make_feature_dir("null_ids")
    test = pq.read_table(features / "test")
    ids = test.column("row_id").to_pylist()
    ids[0], ids[200] = 2 ** 53 + 1, None  # the null in a later batch than the first
    for f in (features / "test").glob("*.parquet"):
        f.unlink()
    pq.write_table(test.set_column(0, "row_id", pa.array(ids, pa.int64())), features / "test" / "part-00000.parquet")
    _fit_tiny(features, in_tmp / "ck")
    run_lightning_cli(["predict", "--config", str(CONFIGS[0].parent / "mmoe_synthetic.yaml"),
                       "--data.init_args.data_dir", str(features), "--data.init_args.batch_size", "128",
                       "--ckpt_path", str(in_tmp / "ck" / "best.ckpt"), "--predictions_path", "pred.parquet"])
    got = pq.read_table(in_tmp / "pred.parquet").column("row_id")
    assert got.type == pa.int64() and got.to_pylist() == ids


def _fit_tiny(feature_dir, ck_dir, *extra):
    run_lightning_cli(["fit", "--config", str(CONFIGS[0].parent / "mmoe_synthetic.yaml"), *TINY,
                       "--data.init_args.data_dir", str(feature_dir), "--checkpoint_dir", str(ck_dir), *extra])


def test_a_checkpoint_is_refused_on_features_of_another_spec(feature_dir, in_tmp, capsys):
    import shutil

    from mmoe_rec.features.spec import FeatureSpec

    _fit_tiny(feature_dir, in_tmp / "ck")
    other = in_tmp / "refitted"  # the same columns and table sizes, another fitted spec (e.g. vocabularies reordered)
    shutil.copytree(feature_dir, other)
    spec = FeatureSpec.load(other / "spec.json")
    spec.transforms = {**spec.transforms, "refitted": True}
    spec.version = ""
    (other / "spec.json").unlink()
    spec.save(other / "spec.json")
    runs_before = len(mlflow_runs(in_tmp / "mlflow.db"))
    for sub, ckpt in (("test", "best.ckpt"), ("predict", "best.ckpt"), ("validate", "best.ckpt"),
                      ("fit", "best.ckpt"), ("test", "last"), ("fit", "last")):
        msg = cli_error([sub, "--config", str(CONFIGS[0].parent / "mmoe_synthetic.yaml"),
                         "--data.init_args.data_dir", str(other), "--checkpoint_dir", str(in_tmp / "ck"),
                         "--ckpt_path", ckpt if ckpt == "last" else str(in_tmp / "ck" / ckpt)], capsys)
        assert "spec version" in msg and FeatureSpec.load(feature_dir / "spec.json").version in msg
        assert spec.version in msg
    # refused before the run is made (the module refused it once loading: a FAILED run each time)
    assert len(mlflow_runs(in_tmp / "mlflow.db")) == runs_before


def test_a_fit_resumed_from_another_models_checkpoint_is_refused_before_any_run(feature_dir, in_tmp, capsys):
    """The MMoE config resumed from a PLE checkpoint trained the PLE under the MMoE run's name and wrote it over
    the MMoE config's checkpoints, with only a warning."""
    _fit_tiny(feature_dir, in_tmp / "ck_ple", "--model.init_args.model", "mmoe_rec.models.ple.PLE")
    runs_before = len(mlflow_runs(in_tmp / "mlflow.db"))
    for ckpt, folder in ((str(in_tmp / "ck_ple" / "last.ckpt"), in_tmp / "ck"), ("last", in_tmp / "ck_ple")):
        msg = cli_error(["fit", "--config", str(CONFIGS[0].parent / "mmoe_synthetic.yaml"), *TINY,
                         "--data.init_args.data_dir", str(feature_dir), "--checkpoint_dir", str(folder),
                         "--ckpt_path", ckpt], capsys)
        assert re.search(r"holds a mmoe_rec\.models(\.ple)?\.PLE model; the config trains a "
                         r"mmoe_rec\.models(\.mmoe)?\.MMoE", msg), msg
    assert len(mlflow_runs(in_tmp / "mlflow.db")) == runs_before and not (in_tmp / "ck").exists()
    # the same class under another of its paths resumes
    _fit_tiny(feature_dir, in_tmp / "ck_mmoe")
    _fit_tiny(feature_dir, in_tmp / "ck_mmoe", "--model.init_args.model", "mmoe_rec.models.mmoe.MMoE",
              "--trainer.max_epochs", "2", "--ckpt_path", str(in_tmp / "ck_mmoe" / "last.ckpt"))


@pytest.mark.parametrize("subcommand", ["test", "fit"])
def test_last_takes_the_checkpoints_model_settings_as_a_named_file_does(feature_dir, in_tmp, capsys, monkeypatch,
                                                                        subcommand):
    """`--ckpt_path last` was resolved after Lightning had read a named checkpoint's model settings over the config's:
    a checkpoint of 4 experts under a config of 8 failed loading its weights (size mismatch), after the MLflow run
    was made. Now the checkpoint's settings are used, the config's named in a warning, as for a named file."""
    from mmoe_rec.cli import main

    monkeypatch.delenv("MMOE_REC_TRACEBACK", raising=False)
    _fit_tiny(feature_dir, in_tmp / "ck", "--model.init_args.model.init_args.num_experts", "4")
    argv = [subcommand, "--config", str(CONFIGS[0].parent / "mmoe_synthetic.yaml"), *TINY,
            "--data.init_args.data_dir", str(feature_dir), "--checkpoint_dir", str(in_tmp / "ck")]
    if subcommand == "fit":
        argv[argv.index("--trainer.max_epochs") + 1] = "2"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main([*argv, "--ckpt_path", "last"]) == 0, capsys.readouterr().err
    said = " ".join(str(w.message) for w in caught)
    assert "model.init_args.model.init_args.num_experts: given 8, checkpoint 4" in said, said
    if subcommand == "fit":  # resumed: epoch 2 trained on the 4 experts, written over last.ckpt
        import torch
        state = torch.load(in_tmp / "ck" / "last.ckpt", map_location="cpu", weights_only=False)
        assert state["epoch"] == 1 and state["hyper_parameters"]["model"]["init_args"]["num_experts"] == 4


def test_fit_with_last_and_none_to_resume_starts_a_new_fit(feature_dir, in_tmp, caplog):
    caplog.set_level(logging.INFO)
    _fit_tiny(feature_dir, in_tmp / "ck", "--ckpt_path", "last")
    assert f"--ckpt_path last: no last.ckpt in {in_tmp / 'ck'}; a new fit starts" in caplog.text
    assert (in_tmp / "ck" / "last.ckpt").is_file()


def test_a_predictions_path_that_is_a_folder_is_refused_before_any_run(feature_dir, in_tmp, capsys):
    _fit_tiny(feature_dir, in_tmp / "ck")
    (in_tmp / "out").mkdir()
    runs_before = len(mlflow_runs(in_tmp / "mlflow.db"))
    msg = cli_error(["predict", "--config", str(CONFIGS[0].parent / "mmoe_synthetic.yaml"),
                     "--data.init_args.data_dir", str(feature_dir), "--ckpt_path", str(in_tmp / "ck" / "best.ckpt"),
                     "--predictions_path", str(in_tmp / "out")], capsys)
    assert msg == f"predictions output {in_tmp / 'out'} is a directory; give a file path"
    assert len(mlflow_runs(in_tmp / "mlflow.db")) == runs_before


def test_evaluating_without_a_checkpoint_is_an_error(feature_dir, in_tmp, capsys):
    for sub in ("validate", "test", "predict"):
        msg = cli_error([sub, "--config", str(CONFIGS[0].parent / "mmoe_synthetic.yaml"),
                         "--data.init_args.data_dir", str(feature_dir)], capsys)
        assert "--ckpt_path" in msg and "random" in msg


def test_settings_that_lose_to_the_checkpoint_are_named(feature_dir, in_tmp):
    _fit_tiny(feature_dir, in_tmp / "ck")
    with pytest.warns(UserWarning, match=r"come from the checkpoint") as record:
        run_lightning_cli(["test", "--config", str(CONFIGS[0].parent / "mmoe_synthetic.yaml"),
                           "--data.init_args.data_dir", str(feature_dir),
                           "--ckpt_path", str(in_tmp / "ck" / "best.ckpt"),
                           "--model.init_args.model.init_args.num_experts", "3",
                           "--model.init_args.optimizer.init_args.lr", "0.5"])
    text = " ".join(str(w.message) for w in record if "come from the checkpoint" in str(w.message))
    assert "model.init_args.model.init_args.num_experts: given 3" in text
    assert "model.init_args.optimizer.init_args.lr: given 0.5" in text
    assert "feature_spec" not in text  # the data's spec is linked in and checked separately


def test_a_second_fit_replaces_best_and_last_instead_of_writing_versions(feature_dir, in_tmp):
    _fit_tiny(feature_dir, in_tmp / "ck")
    first = torch.load(in_tmp / "ck" / "last.ckpt", map_location="cpu", weights_only=False)
    _fit_tiny(feature_dir, in_tmp / "ck", "--seed_everything", "1")
    assert sorted(p.name for p in (in_tmp / "ck").glob("*.ckpt")) == ["best.ckpt", "last.ckpt"]
    second = torch.load(in_tmp / "ck" / "last.ckpt", map_location="cpu", weights_only=False)
    weights = [k for k in second["state_dict"] if k.endswith("weight")]
    assert any(not torch.equal(first["state_dict"][k], second["state_dict"][k]) for k in weights)


def _lock_is_free(folder: Path) -> bool:
    import fcntl

    with open(folder / ".lock") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
    return True


@pytest.mark.parametrize("where", ["--checkpoint_dir", "config"])
def test_a_fit_into_a_checkpoint_folder_another_fit_holds_is_refused_before_its_run(feature_dir, in_tmp, capsys,
                                                                                     where):
    """Two fits into one folder both exited 0 with their checkpoints mixed: best.ckpt from one, last.ckpt from the
    other, whose "best" named a file that held the other's model. A fit holds its folders (`.lock`) while it runs."""
    import fcntl
    import os

    folder = in_tmp / ("ck" if where == "--checkpoint_dir" else "checkpoints/mmoe_synthetic")
    folder.mkdir(parents=True)
    extra = ["--checkpoint_dir", str(folder)] if where == "--checkpoint_dir" else []
    runs_before = len(mlflow_runs(in_tmp / "mlflow.db"))
    with open(folder / ".lock", "w") as other_fit:  # as a fit running in another process holds it
        fcntl.flock(other_fit, fcntl.LOCK_EX | fcntl.LOCK_NB)
        other_fit.write("4242\n")
        other_fit.flush()
        msg = cli_error(["fit", "--config", str(CONFIGS[0].parent / "mmoe_synthetic.yaml"), *TINY,
                         "--data.init_args.data_dir", str(feature_dir), *extra], capsys)
    assert f"checkpoint folder {os.path.realpath(folder)} is in use by another fit (pid 4242)" in msg, msg
    assert len(mlflow_runs(in_tmp / "mlflow.db")) == runs_before and not list(folder.glob("*.ckpt"))


def test_a_fit_without_a_logger_holds_the_default_checkpoint_folder_too(feature_dir, in_tmp, capsys):
    """No dirpath and no logger: Lightning writes into <default_root_dir>/checkpoints, the same folder for every fit
    started there (not a run's own), and that folder was not held."""
    import fcntl
    import os

    config = yaml.safe_load((CONFIGS[0].parent / "mmoe_synthetic.yaml").read_text())
    for cb in config["trainer"]["callbacks"]:
        (cb.get("init_args") or {}).pop("dirpath", None)
    path = in_tmp / "no_dirpath.yaml"
    path.write_text(yaml.safe_dump(config))
    folder = in_tmp / "checkpoints"
    folder.mkdir()
    with open(folder / ".lock", "w") as other_fit:  # as a fit running in another process holds it
        fcntl.flock(other_fit, fcntl.LOCK_EX | fcntl.LOCK_NB)
        other_fit.write("4242\n")
        other_fit.flush()
        msg = cli_error(["fit", "--config", str(path), *TINY, "--data.init_args.data_dir", str(feature_dir),
                         "--trainer.logger", "false"], capsys)
    assert f"checkpoint folder {os.path.realpath(folder)} is in use by another fit (pid 4242)" in msg, msg
    assert not list(folder.glob("*.ckpt"))


def test_a_fit_releases_its_checkpoint_folder_when_it_ends_or_fails(feature_dir, in_tmp, monkeypatch):
    import os

    from mmoe_rec.training.cli import MultiTaskCLI

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _fit_tiny(feature_dir, in_tmp / "ck")
    assert not [w for w in seen if "is not empty" in str(w.message)]  # its own lock file is no earlier fit's files
    _fit_tiny(feature_dir, in_tmp / "ck", "--seed_everything", "1")  # one after the other: not refused
    assert _lock_is_free(in_tmp / "ck") and (in_tmp / "ck" / ".lock").read_text().strip() == str(os.getpid())

    def store_fails(self):
        raise RuntimeError("the store went away")

    monkeypatch.setattr(MultiTaskCLI, "_log_config", store_fails)  # fails once the folder is held
    with pytest.raises(RuntimeError, match="went away"):
        _fit_tiny(feature_dir, in_tmp / "ck2")
    assert _lock_is_free(in_tmp / "ck2")


def test_a_fit_removes_the_partial_checkpoint_a_killed_fit_left_in_its_folder(feature_dir, in_tmp, caplog):
    """A fit SIGKILLed as it wrote a checkpoint left the partial file (hidden, as large as a checkpoint) for good;
    the next fit into the folder, holding it, removes it and says so."""
    import os
    import subprocess
    import sys

    here = Path(__file__).resolve().parent
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join([str(here), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "mmoe_rec.cli", "fit", "--config",
                           str(CONFIGS[0].parent / "mmoe_synthetic.yaml"), *TINY, "--data.init_args.data_dir",
                           str(feature_dir), "--checkpoint_dir", str(in_tmp / "ck"),
                           "--trainer.callbacks+=rank_failure.KilledWhileSaving"],
                          cwd=in_tmp, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == -9, proc.stderr[-3000:]
    (partial,) = [p.name for p in (in_tmp / "ck").iterdir() if p.name != ".lock"]
    assert partial.startswith(".") and ".ckpt.partial-checkpoint-" in partial
    (in_tmp / "ck" / "notes.tmp-1-abcdef01").write_text("a user's")  # not hidden: not a partial save
    with caplog.at_level("INFO"):
        _fit_tiny(feature_dir, in_tmp / "ck")
    names = {p.name for p in (in_tmp / "ck").iterdir()}
    assert partial not in names and "notes.tmp-1-abcdef01" in names and "last.ckpt" in names
    assert f"removed 1 partial checkpoint file(s) from {in_tmp / 'ck'}" in caplog.text


def test_optimizer_arguments_alone_override_the_default_optimizer(feature_dir):
    from mmoe_rec.features.spec import FeatureSpec
    from mmoe_rec.training.module import MultiTaskModule

    model = {"class_path": "mmoe_rec.models.mmoe.MMoE",
             "init_args": {"embedding_dim": 4, "num_experts": 2, "expert_hidden": [8], "tower_hidden": [4]}}
    spec = FeatureSpec.load(feature_dir / "spec.json")
    for given in ({"init_args": {"lr": 3e-3}}, {"lr": 3e-3}):  # `--model.init_args.optimizer.init_args.lr 3e-3`
        module = MultiTaskModule(model=model, feature_spec=spec, optimizer=given)
        assert module.optimizer_config == {"class_path": "torch.optim.Adam", "init_args": {"lr": 3e-3, "fused": True}}


def test_the_command_prints_a_bad_model_setting_in_one_line(feature_dir, in_tmp, capsys, monkeypatch):
    from mmoe_rec.cli import main

    monkeypatch.delenv("MMOE_REC_TRACEBACK", raising=False)
    rc = main(["fit", "--config", str(CONFIGS[0].parent / "sparse_mmoe_synthetic.yaml"), *TINY,
               "--data.init_args.data_dir", str(feature_dir), "--model.init_args.model.init_args.k", "17"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.splitlines()[0].startswith("error: k must be in [1, num_experts=")
    assert "Given value" not in err and len(err) < 300  # not jsonargparse's dump of the whole config


@pytest.mark.parametrize("setting, message", [
    pytest.param(["--trainer.accelerator", "gpu"], "No supported gpu backend found",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there: the setting works")),
    (["--trainer.devices", "0"], "devices"),
])
def test_a_trainer_setting_lightning_refuses_is_one_line(feature_dir, in_tmp, capsys, monkeypatch, setting, message):
    """Lightning's MisconfigurationException printed ~40 lines of traceback where every other refused setting is
    one line."""
    from mmoe_rec.cli import main

    monkeypatch.delenv("MMOE_REC_TRACEBACK", raising=False)
    rc = main(["fit", "--config", str(CONFIGS[0].parent / "mmoe_synthetic.yaml"), *TINY,
               "--data.init_args.data_dir", str(feature_dir), *setting])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc == 1 and len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err
    assert not mlflow_runs(in_tmp / "mlflow.db")  # refused before the run was made


@pytest.mark.parametrize("config", [c for c in CONFIGS if c.name.endswith("_synthetic.yaml")][:1])
def test_a_fit_stopped_mid_epoch_by_max_steps_ends_cleanly(config, feature_dir, in_tmp):
    """No validation ran, so early stopping has nothing to check: it must wait for a validation, not fail
    (Lightning's default checks at the end of the training epoch and raised 'val/click/auc not available')."""
    run_lightning_cli(["fit", "--config", str(config), "--data.init_args.data_dir", str(feature_dir),
                       "--data.init_args.batch_size", "64", "--trainer.max_steps", "2",
                       "--checkpoint_dir", str(in_tmp / "ck")])
    assert (in_tmp / "ck" / "last.ckpt").exists()


def test_every_committed_early_stopping_checks_after_validation():
    for config in CONFIGS:
        callbacks = yaml.safe_load(config.read_text())["trainer"].get("callbacks") or []
        for cb in callbacks:
            if cb["class_path"].endswith("EarlyStopping"):
                assert cb["init_args"].get("check_on_train_epoch_end") is False, config.name


def test_a_missing_feature_directory_is_named_by_its_spec_path(in_tmp, capsys, monkeypatch):
    from mmoe_rec.cli import main

    monkeypatch.delenv("MMOE_REC_TRACEBACK", raising=False)
    rc = main(["fit", "--config", str(CONFIGS[0].parent / "mmoe_synthetic.yaml"), *TINY,
               "--data.init_args.data_dir", str(in_tmp / "nowhere")])
    err = capsys.readouterr().err
    assert rc == 1
    # the message raised `from None`, not the OSError it replaced ("[Errno 2] No such file or directory")
    assert err.splitlines()[0].startswith(f"error: feature spec not found: {in_tmp / 'nowhere' / 'spec.json'} (a "
                                          "feature folder is made by `mmoe-rec features`"), err


@pytest.mark.fresh_mlflow_store  # no store made
@pytest.mark.parametrize("subcommand", ["fit", "test"])
def test_a_ckpt_path_that_is_no_checkpoint_is_one_line_before_any_run(feature_dir, in_tmp, capsys, monkeypatch,
                                                                      subcommand):
    # a Parquet file gave torch.load's traceback advising weights_only=False; a missing file was found only after
    # the trainer and its MLflow run were made (a FAILED run left behind)
    from mmoe_rec.cli import main

    monkeypatch.delenv("MMOE_REC_TRACEBACK", raising=False)
    not_a_checkpoint = next((feature_dir / "train").glob("*.parquet"))
    torch.save({"model.w": torch.ones(2)}, in_tmp / "weights.pt")  # a bare state_dict: Lightning's KeyError
    for path, expected in ((not_a_checkpoint, "not a checkpoint written by `mmoe-rec fit`"),
                           (in_tmp / "nope.ckpt", "no such file"),
                           (in_tmp / "weights.pt", "but not a Lightning checkpoint")):
        rc = main([subcommand, "--config", str(CONFIGS[0].parent / "mmoe_synthetic.yaml"), *TINY,
                   "--data.init_args.data_dir", str(feature_dir), "--ckpt_path", str(path)])
        err = capsys.readouterr().err
        assert rc == 1 and err.startswith(f"error: checkpoint {path}") and expected in err, err
        assert "weights_only" not in err and "Traceback" not in err
    assert not (in_tmp / "mlflow.db").exists()


def test_mmoe_rec_help_lists_every_subcommand(capsys):
    from mmoe_rec.cli import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("fit", "predict", "synth", "features", "register", "score"))


@pytest.mark.parametrize("overrides,message", [
    # a loss watched for its maximum: early stopping ended the fit while it fell, best.ckpt was the worst epoch
    ({"monitor": "val/click/logloss"}, "'val/click/logloss' with mode 'max', but val/click/logloss is better when "
                                       "lower: set its mode to 'min'"),
    ({"monitor": "val/loss"}, "set its mode to 'min'"),
    ({"monitor": "val/click/auc", "mode": "min"}, "is better when higher: set its mode to 'max'"),
    # names Lightning's own examples use, or a split the fit does not validate on: refused with the list
    ({"monitor": "val_loss"}, "monitors 'val_loss', which this fit does not log"),
    ({"monitor": "test/click/auc"}, "monitors 'test/click/auc', which this fit does not log"),
    ({"monitor": "experts/click/load_cv2"}, "go to MLflow only"),
])
def test_a_monitor_in_the_wrong_direction_or_not_logged_is_an_error_before_training(feature_dir, in_tmp, capsys,
                                                                                   overrides, message):
    config = yaml.safe_load((CONFIGS[0].parent / "mmoe_synthetic.yaml").read_text())
    for cb in config["trainer"]["callbacks"]:
        if cb["class_path"].endswith("EarlyStopping"):
            cb["init_args"].update(overrides)
    path = in_tmp / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    msg = cli_error(["fit", "--config", str(path), *TINY, "--data.init_args.data_dir", str(feature_dir)], capsys)
    assert f"EarlyStopping {message}" in msg or message in msg, msg
    assert not list(in_tmp.rglob("*.ckpt"))
    if (in_tmp / "mlflow.db").exists():  # the store may be made; no run in it
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{in_tmp / 'mlflow.db'}")
        assert not [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def test_a_loss_watched_for_its_minimum_and_the_lr_scheduler_mode_are_accepted_or_checked(feature_dir, in_tmp,
                                                                                            capsys):
    config = yaml.safe_load((CONFIGS[0].parent / "mmoe_synthetic.yaml").read_text())
    for cb in config["trainer"]["callbacks"]:
        if "monitor" in cb.get("init_args", {}):
            cb["init_args"].update(monitor="train/loss", mode="min")
    path = in_tmp / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    run_lightning_cli(["fit", "--config", str(path), *TINY, "--data.init_args.data_dir", str(feature_dir)])
    plateau = "{class_path: torch.optim.lr_scheduler.ReduceLROnPlateau, monitor: val/click/auc}"  # mode min: wrong
    msg = cli_error(["fit", "--config", str(path), *TINY, "--data.init_args.data_dir", str(feature_dir),
                     "--model.init_args.lr_scheduler", plateau], capsys)
    assert "the lr_scheduler monitors 'val/click/auc' with mode 'min'" in msg


def test_a_fit_from_the_best_checkpoint_is_refused_before_its_run_is_made(feature_dir, in_tmp, capsys, monkeypatch):
    """`fit --ckpt_path best` failed in Lightning after the MLflow run was made (left FAILED), saying the config's
    monitored ModelCheckpoint was "not configured to save the best model"."""
    from mmoe_rec.cli import main

    monkeypatch.delenv("MMOE_REC_TRACEBACK", raising=False)
    assert main(["fit", "--config", str(CONFIGS[0].parent / "mmoe_synthetic.yaml"), *TINY, "--data.init_args.data_dir",
                 str(feature_dir), "--checkpoint_dir", str(in_tmp / "ck"), "--ckpt_path", "best"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --ckpt_path best: `mmoe-rec fit` runs in a process of its own, with no earlier fit"), \
        err
    if (in_tmp / "mlflow.db").exists():  # the store may be made; no run in it
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{in_tmp / 'mlflow.db'}")
        assert not [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert not (in_tmp / "ck").exists()


@pytest.mark.parametrize("subcommand", ["fit", "test"])
def test_hpc_without_its_checkpoint_and_registry_are_refused_before_a_run_is_made(feature_dir, in_tmp, capsys,
                                                                                   monkeypatch, subcommand):
    """`--ckpt_path hpc` with no SLURM requeue checkpoint and `registry` (a download from Lightning's model
    registry) failed in Lightning after the MLflow run was made (left FAILED): the README says a ckpt_path that is no
    checkpoint fails before the run. `--help` describes what is taken instead of Lightning's list."""
    from mmoe_rec.cli import main

    monkeypatch.delenv("MMOE_REC_TRACEBACK", raising=False)
    argv = [subcommand, "--config", str(CONFIGS[0].parent / "mmoe_synthetic.yaml"), *TINY,
            "--data.init_args.data_dir", str(feature_dir), "--checkpoint_dir", str(in_tmp / "ck")]
    assert main([*argv, "--ckpt_path", "hpc"]) == 1
    assert capsys.readouterr().err.startswith(f"error: --ckpt_path hpc: no hpc_ckpt_<n>.ckpt in {in_tmp}")
    for name in ("registry", "registry:my-model:v1"):
        assert main([*argv, "--ckpt_path", name]) == 1
        assert capsys.readouterr().err.startswith(f"error: --ckpt_path {name}: mmoe-rec reads checkpoints from files")
    if (in_tmp / "mlflow.db").exists():  # the store may be made; no run in it
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{in_tmp / 'mlflow.db'}")
        assert not [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    with pytest.raises(SystemExit):
        main([subcommand, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    entry = help_text.split("--ckpt_path CKPT_PATH ")[-1].split("(type:")[0]  # the option's own help
    assert "or last: the newest last.ckpt in the checkpoint folders" in entry and "hpc" not in entry, entry


def test_a_fit_without_a_config_says_to_give_one(capsys, monkeypatch):
    """jsonargparse named its internal keys ("the following arguments are required: fit.data, fit.model")."""
    from mmoe_rec.cli import main

    monkeypatch.delenv("MMOE_REC_TRACEBACK", raising=False)
    assert main(["fit"]) == 1
    assert "takes its model and data from a config file: --config configs/<name>.yaml" in capsys.readouterr().err


@pytest.mark.parametrize("subcommand", ["test", "predict"])
def test_best_and_a_missing_last_checkpoint_are_refused_where_no_fit_ran(feature_dir, in_tmp, capsys, monkeypatch,
                                                                        caplog, subcommand):
    """`--ckpt_path last` with no last.ckpt where the config's callbacks look: Lightning warned "No checkpoint will
    be loaded" and tested (or predicted with) the untrained model, exit 0; `best` failed after the MLflow run. A
    last.ckpt on disk is what Lightning finds in a fresh process: taken."""
    from mmoe_rec.cli import main

    monkeypatch.delenv("MMOE_REC_TRACEBACK", raising=False)
    argv = [subcommand, "--config", str(CONFIGS[0].parent / "mmoe_synthetic.yaml"), *TINY,
            "--data.init_args.data_dir", str(feature_dir), "--checkpoint_dir", str(in_tmp / "ck")]
    assert main([*argv, "--ckpt_path", "best"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: --ckpt_path best: `mmoe-rec {subcommand}` runs in a process of its own"), err
    assert main([*argv, "--ckpt_path", "last"]) == 1
    err = capsys.readouterr().err
    assert f"error: --ckpt_path last: no last.ckpt in {in_tmp / 'ck'} (--checkpoint_dir)" in err, err
    assert not (in_tmp / "predictions.parquet").exists()
    if (in_tmp / "mlflow.db").exists():  # the store may be made; no run in it
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{in_tmp / 'mlflow.db'}")
        assert not [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    run_lightning_cli(["fit", *argv[1:]])
    caplog.set_level(logging.INFO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main([*argv, "--ckpt_path", "last"]) == 0
    # the file under --checkpoint_dir, not Lightning's lookup in the config's folder (which found none and went on
    # with the untrained model)
    assert not [w for w in caught if "No checkpoint will be loaded" in str(w.message)]
    assert f"Restoring states from the checkpoint path at {in_tmp / 'ck' / 'last.ckpt'}" in caplog.text
    no_folder = yaml.safe_load((CONFIGS[0].parent / "mmoe_synthetic.yaml").read_text())
    for cb in no_folder["trainer"]["callbacks"]:
        cb.get("init_args", {}).pop("dirpath", None)
    (in_tmp / "nodir.yaml").write_text(yaml.safe_dump(no_folder))
    assert main([subcommand, "--config", str(in_tmp / "nodir.yaml"), *TINY, "--data.init_args.data_dir",
                 str(feature_dir), "--ckpt_path", "last"]) == 1
    assert "the config's checkpoint callbacks name no folder" in capsys.readouterr().err


def test_an_unknown_data_task_is_one_line_naming_it(feature_dir, in_tmp, capsys, monkeypatch):
    """The data module's KeyError reached the user as jsonargparse's "Does not validate against any of the Union
    subtypes" and a dump of the data config, the reason in its middle."""
    from mmoe_rec.cli import main

    monkeypatch.delenv("MMOE_REC_TRACEBACK", raising=False)
    for tasks, expected in (("[click, foo]", "error: data tasks ['foo'] are not in the feature spec, whose tasks "
                                             "are ['click', 'convert']"),
                            ("click", "data.init_args.tasks: Expected a <class 'list'>")):
        rc = main(["fit", "--config", str(CONFIGS[0].parent / "mmoe_synthetic.yaml"), *TINY,
                   "--data.init_args.data_dir", str(feature_dir), "--data.init_args.tasks", tasks])
        err = capsys.readouterr().err
        assert rc == 1 and expected in err.splitlines()[0] and "Namespace(" not in err, err


def test_only_lightnings_watchers_are_checked_not_a_callback_that_logs_its_own_metric():
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import EarlyStopping

    from mmoe_rec.training.cli import check_monitors

    class OwnMetric:  # a user's callback with a `monitor` it logs itself (pl_module.log("my/metric", ...))
        monitor, mode = "my/metric", "max"

    module = SimpleNamespace(monitorable_metrics=lambda: {"val/click/auc": "max"}, lr_scheduler_config=None,
                             tasks=["click"])
    check_monitors(SimpleNamespace(callbacks=[OwnMetric()]), module)
    with pytest.raises(ValueError, match="EarlyStopping monitors 'my/metric', which this fit does not log"):
        check_monitors(SimpleNamespace(callbacks=[OwnMetric(), EarlyStopping(monitor="my/metric")]), module)


def test_a_sigterm_stops_fit_and_predict_with_exit_143_and_no_partial_output(feature_dir, in_tmp):
    """A SIGTERM (a scheduler's cancel, `timeout`): Lightning stopped a fit with a SystemExit of no code, exit 0
    as if it had finished, and its predict loop did not stop at all (the run went on to write every row, exit 0).
    Both now stop, exit 143 with one line, the MLflow run FAILED, and predict leaves no partial file."""
    import os
    import subprocess
    import sys

    here = Path(__file__).resolve().parent
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join([str(here), env.get("PYTHONPATH", "")])
    config = str(CONFIGS[0].parent / "mmoe_synthetic.yaml")
    sigterm = ["--trainer.callbacks+=rank_failure.SigtermAt", "--trainer.callbacks.batch=2"]
    common = ["--data.init_args.data_dir", str(feature_dir), "--data.init_args.batch_size", "32",
              "--trainer.enable_progress_bar", "false"]

    def run(*argv):
        return subprocess.run([sys.executable, "-m", "mmoe_rec.cli", *argv], cwd=in_tmp, env=env,
                              capture_output=True, text=True, timeout=240)

    proc = run("fit", "--config", config, *common, "--checkpoint_dir", str(in_tmp / "ck"), *sigterm)
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "error: mmoe-rec fit stopped by SIGTERM before it finished" in proc.stderr
    assert mlflow_run(in_tmp / "mlflow.db")[0].info.status == "FAILED"
    # before Lightning's handler (a callback's setup): the watch ends it, leaving no folder of rank markers behind
    temp = in_tmp / "tmp"
    temp.mkdir()
    env["TMPDIR"] = str(temp)
    proc = run("fit", "--config", config, *common, "--checkpoint_dir", str(in_tmp / "ck"),
               "--trainer.callbacks+=rank_failure.SigtermInSetup")
    del env["TMPDIR"]
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "error: mmoe-rec fit stopped by SIGTERM before it finished" in proc.stderr
    assert [r.info.status for r in mlflow_runs(in_tmp / "mlflow.db")] == ["FAILED"] * 2
    assert not list(temp.glob("mmoe-rec-ranks-*"))
    # the checkpoint to predict from, made in this process (a third process start: ~10 s on a slow VM)
    run_lightning_cli(["fit", "--config", config, *TINY, "--data.init_args.data_dir", str(feature_dir),
                       "--checkpoint_dir", str(in_tmp / "ck")])
    proc = run("predict", "--config", config, *common, "--ckpt_path", str(in_tmp / "ck" / "last.ckpt"),
               "--predictions_path", str(in_tmp / "out" / "p.parquet"), *sigterm)
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "error: mmoe-rec predict stopped by SIGTERM" in proc.stderr
    assert not (in_tmp / "out").exists()  # neither the file nor a partial one, nor the folder made for them
    # a predict that does not stop within the limit is ended by the watch, past the writer's on_exception: its
    # partial file was left behind (a review)
    env["MMOE_REC_SIGTERM_STOP_LIMIT_S"] = "3"
    proc = run("predict", "--config", config, *common, "--ckpt_path", str(in_tmp / "ck" / "last.ckpt"),
               "--predictions_path", str(in_tmp / "out" / "p.parquet"),
               "--trainer.callbacks+=rank_failure.SigtermAndHold")
    del env["MMOE_REC_SIGTERM_STOP_LIMIT_S"]
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "error: mmoe-rec predict did not stop within 3 s of a SIGTERM" in proc.stderr
    assert not (in_tmp / "out").exists()


def test_a_job_that_fails_inside_lightnings_failure_handling_still_ends_its_run_failed(feature_dir, in_tmp):
    """Lightning marks the run FAILED after the callbacks' on_exception: an exception there (or one raised into it
    asynchronously: a review saw a SIGTERMed fit whose DataLoader worker died end with its run RUNNING) skipped it."""
    import signal

    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(RuntimeError, match="and so does the cleanup"):
            _fit_tiny(feature_dir, in_tmp / "ck", "--trainer.callbacks+=rank_failure.FailDuringItsCleanup")
        after = signal.getsignal(signal.SIGTERM)
    finally:  # a later test in this worker must not meet a handler left behind, whatever this one finds
        signal.signal(signal.SIGTERM, before)
    assert mlflow_run(in_tmp / "mlflow.db")[0].info.status == "FAILED"
    # the failed handling skipped Lightning's teardown, which puts the signal handlers back; run_lightning_cli does
    assert after == before


def test_a_half_written_hidden_file_in_a_split_folder_is_passed_over(make_feature_dir, in_tmp):
    """`.x.parquet` (a writer's file in progress): the loader passes it over, and so does the CLI's check before
    the fit, which read the first file's schema, the hidden one ("Parquet magic bytes not found", no file named)."""
    root = make_feature_dir("hidden_cli")
    (root / "train" / ".part-00001.parquet.inprogress.parquet").write_bytes(b"not yet Parquet")
    run_lightning_cli(["fit", "--config", str(CONFIGS[0].parent / "mmoe_synthetic.yaml"), *TINY,
                       "--data.init_args.data_dir", str(root), "--checkpoint_dir", str(in_tmp / "ck")])


@pytest.mark.parametrize("override, expected", [
    (["--trainer.strategy", "mmoe_rec.training.sharding.ShardedEmbeddingStrategy",
      "--trainer.strategy.init_args.embedding_optimizer", "adam"], "embedding_optimizer 'adam' has no CPU kernel"),
    (["--trainer.strategy", "ddp_sharded_embeddings", "--trainer.accumulate_grad_batches", "2"],
     "accumulate_grad_batches=2 with sharding_type 'table_wise'"),
])
def test_sharded_settings_the_device_cannot_train_are_refused_before_the_run(feature_dir, in_tmp, capsys, override,
                                                                             expected):
    """They were refused at setup: after the MLflow run was made (left FAILED) and on every rank."""
    from mmoe_rec.cli import main

    code = main(["fit", "--config", str(CONFIGS[0].parent / "mmoe_synthetic.yaml"), *TINY,
                 "--data.init_args.data_dir", str(feature_dir), *override])
    err = capsys.readouterr().err
    assert code == 1 and expected in err
    assert not (in_tmp / "mlflow.db").exists() or not mlflow_runs(in_tmp / "mlflow.db")


def test_an_empty_validation_split_is_refused_before_the_run(make_feature_dir, in_tmp, capsys):
    """Its loader failed after the MLflow run was made (left FAILED); without validation the fit runs."""
    from mmoe_rec.cli import main

    root = make_feature_dir("empty_valid", rows={"train": 400, "valid": 0, "test": 50})
    argv = ["fit", "--config", str(CONFIGS[0].parent / "mmoe_synthetic.yaml"), *TINY,
            "--data.init_args.data_dir", str(root), "--checkpoint_dir", str(in_tmp / "ck")]
    assert main(argv) == 1
    assert "split 'valid' in" in capsys.readouterr().err
    assert not (in_tmp / "mlflow.db").exists() or not mlflow_runs(in_tmp / "mlflow.db")
    assert main([*argv, "--trainer.limit_val_batches", "0", "--trainer.callbacks", "[]",
                 "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                 "--trainer.callbacks.dirpath", str(in_tmp / "ck"), "--trainer.callbacks.save_last", "true"]) == 0
    runs = len(mlflow_runs(in_tmp / "mlflow.db"))
    assert main(["predict", "--config", str(CONFIGS[0].parent / "mmoe_synthetic.yaml"), "--data.init_args.data_dir",
                 str(root), "--data.init_args.predict_split", "valid", "--ckpt_path", str(in_tmp / "ck" / "last.ckpt"),
                 "--checkpoint_dir", str(in_tmp / "ck")]) == 1
    assert "split 'valid' in" in capsys.readouterr().err and len(mlflow_runs(in_tmp / "mlflow.db")) == runs



@pytest.mark.parametrize("yaml_value, option, expected", [
    (None, "1", 1), (None, "1.0", 1.0), (1, None, 1), (1, "1.0", 1.0), (1.0, "1", 1), (None, "3", 3),
])
def test_one_batch_written_as_the_integer_1_is_one_batch(feature_dir, in_tmp, yaml_value, option, expected):
    """`--trainer.limit_val_batches 1` reached Lightning as 1.0, every batch (the parser reads Union[int, float]
    float first, Lightning #21259); the integer 1 written in the config or on the command line is one batch."""
    config = yaml.safe_load((CONFIGS[0].parent / "mmoe_synthetic.yaml").read_text())
    if yaml_value is not None:
        config["trainer"]["limit_val_batches"] = yaml_value
    (in_tmp / "c.yaml").write_text(yaml.safe_dump(config))
    cli = run_lightning_cli(["fit", "--config", str(in_tmp / "c.yaml"), "--data.init_args.data_dir", str(feature_dir),
                             "--data.init_args.batch_size", "128", "--trainer.max_steps", "1",
                             "--checkpoint_dir", str(in_tmp / "ck"),
                             *([f"--trainer.limit_val_batches={option}"] if option else [])])
    value = cli.trainer.limit_val_batches
    assert value == expected and type(value) is type(expected)


def test_more_cpu_ranks_than_cores_is_a_warning():
    """64 CPU ranks on a 2-core machine sat minutes in the rendezvous without a word."""
    import os
    from types import SimpleNamespace

    from lightning.pytorch.accelerators import CPUAccelerator

    from mmoe_rec.training.cli import MultiTaskCLI

    cores = len(os.sched_getaffinity(0))
    stub = SimpleNamespace(trainer=SimpleNamespace(accelerator=CPUAccelerator(), num_devices=cores + 1))
    with pytest.warns(UserWarning, match=f"--trainer.devices {cores + 1} CPU processes on {cores} cores"):
        MultiTaskCLI._warn_oversubscribed(stub)
    stub.trainer.num_devices = cores
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MultiTaskCLI._warn_oversubscribed(stub)


def test_last_finds_a_checkpoint_folder_written_with_a_tilde(feature_dir, in_tmp, monkeypatch, caplog):
    """A config's `dirpath: ~/ck`: ModelCheckpoint writes to $HOME/ck, while `--ckpt_path last` looked in a
    folder literally named "~/ck", found none, and a fit started anew over the checkpoint it was to resume."""
    from mmoe_rec.cli import main

    monkeypatch.setenv("HOME", str(in_tmp / "home"))
    config = yaml.safe_load((CONFIGS[0].parent / "mmoe_synthetic.yaml").read_text())
    for cb in config["trainer"]["callbacks"]:
        if "dirpath" in cb.get("init_args", {}):
            cb["init_args"]["dirpath"] = "~/ck"
    (in_tmp / "tilde.yaml").write_text(yaml.safe_dump(config))
    argv = ["--config", str(in_tmp / "tilde.yaml"), *TINY, "--data.init_args.data_dir", str(feature_dir)]
    run_lightning_cli(["fit", *argv])
    assert (in_tmp / "home" / "ck" / "last.ckpt").is_file()
    caplog.set_level(logging.INFO)
    assert main(["test", *argv, "--ckpt_path", "last"]) == 0
    assert f"Restoring states from the checkpoint path at {in_tmp / 'home' / 'ck' / 'last.ckpt'}" in caplog.text


def test_the_integer_1_is_read_from_every_way_the_setting_can_be_given(tmp_path):
    """`--trainer.limit_val_batches 1` (the form the docstring names), `=1`, `-c`/`--config`/`--config=` files; the
    last of the files and the options in their order wins."""
    from mmoe_rec.training.cli import written_as_integer_one

    one, one_float = tmp_path / "one.yaml", tmp_path / "one_float.yaml"
    one.write_text("trainer:\n  limit_val_batches: 1\n")
    one_float.write_text("trainer:\n  limit_val_batches: 1.0\n")
    key = "limit_val_batches"
    for args in (["--trainer.limit_val_batches", "1"], ["--trainer.limit_val_batches=1"], ["-c", str(one)],
                 ["--config", str(one)], [f"--config={one}"],
                 ["--trainer.limit_val_batches", "1.0", "--config", str(one)],
                 ["--config", str(one_float), "--trainer.limit_val_batches", "1"]):
        assert written_as_integer_one(args, key), args
    for args in (["--trainer.limit_val_batches", "1.0"], ["--config", str(one_float)], ["-c", str(one_float)],
                 ["--config", str(one), "--config", str(one_float)], ["--config", str(one), f"--config={one_float}"],
                 ["--trainer.limit_val_batches", "1", "--config", str(one_float)],
                 ["--trainer.limit_train_batches", "1"], []):
        assert not written_as_integer_one(args, key), args


def test_a_missing_weight_column_is_an_error_before_training(make_feature_dir, in_tmp, capsys):
    fd = make_feature_dir("noweight", rows={"train": 300, "valid": 100, "test": 100}, with_weight=True)
    from mmoe_rec.features.spec import WEIGHT_COLUMN

    for path in (fd / "valid").glob("*.parquet"):
        pq.write_table(pq.read_table(path).drop_columns([WEIGHT_COLUMN]), path)
    msg = cli_error(["fit", "--config", str(CONFIGS[0].parent / "mmoe_synthetic.yaml"), *TINY,
                     "--data.init_args.data_dir", str(fd)], capsys)
    assert f"label / weight column(s) ['{WEIGHT_COLUMN}'] missing" in msg, msg
    assert not (in_tmp / "mlflow.db").exists() or not mlflow_runs(in_tmp / "mlflow.db")


def _last_stub(sub, config):
    from types import SimpleNamespace

    from mmoe_rec.training.cli import MultiTaskCLI

    stub = SimpleNamespace(config={sub: config})
    stub._last_checkpoint_folders = lambda s: MultiTaskCLI._last_checkpoint_folders(stub, s)
    return stub


def test_last_resolves_to_the_newest_last_checkpoint_and_passes_over_a_dangling_link(tmp_path, monkeypatch):
    import os

    from mmoe_rec.training.cli import MultiTaskCLI

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    ck = tmp_path / "home" / "ck"
    ck.mkdir(parents=True)
    for name, mtime in (("last.ckpt", 1_000), ("last-v1.ckpt", 3_000), ("other.ckpt", 5_000)):
        (ck / name).write_bytes(b"x")
        os.utime(ck / name, (mtime, mtime))
    (ck / "last-v2.ckpt").symlink_to(tmp_path / "gone.ckpt")  # a dangling link: not a checkpoint to take
    stub = _last_stub("test", {"checkpoint_dir": "~/ck"})  # --checkpoint_dir ~/ck: the home folder's ck
    assert MultiTaskCLI._resolve_last_checkpoint(stub, "test") == str(ck / "last-v1.ckpt")
    assert stub.config["test"]["ckpt_path"] == str(ck / "last-v1.ckpt")
    # from the config: the ModelCheckpoint callbacks' folders only, not another callback's `dirpath`
    other = tmp_path / "other"
    other.mkdir()
    (other / "last.ckpt").write_bytes(b"x")
    callbacks = [{"class_path": "lightning.pytorch.callbacks.EarlyStopping", "init_args": {"dirpath": str(other)}},
                 {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"dirpath": "~/ck"}}]
    stub = _last_stub("test", {"trainer": {"callbacks": callbacks}})
    assert MultiTaskCLI._last_checkpoint_folders(stub, "test") == {ck}
    assert MultiTaskCLI._resolve_last_checkpoint(stub, "test") == str(ck / "last-v1.ckpt")


def test_a_resume_compares_model_classes_not_their_paths_and_only_for_fit(feature_dir, in_tmp):
    """`mmoe_rec.models.MMoE` and `mmoe_rec.models.mmoe.MMoE` are one class; validate / test / predict take the
    checkpoint's model whatever the config names."""
    from types import SimpleNamespace

    from mmoe_rec.training.cli import MultiTaskCLI

    key = "init_args.model.class_path"
    used = {key: "mmoe_rec.models.mmoe.MMoE"}
    for sub in ("fit", "test"):
        stub = SimpleNamespace(config={sub: {"ckpt_path": "x.ckpt", "data": {"init_args": {"data_dir": str(feature_dir)}}}})
        MultiTaskCLI._check_checkpoint_matches(stub, sub, {key: "mmoe_rec.models.MMoE"}, used)
        if sub == "fit":
            with pytest.raises(ValueError, match="holds a mmoe_rec.models.mmoe.MMoE model; the config trains a "
                                                 "mmoe_rec.models.PLE"):
                MultiTaskCLI._check_checkpoint_matches(stub, sub, {key: "mmoe_rec.models.PLE"}, used)
        else:
            MultiTaskCLI._check_checkpoint_matches(stub, sub, {key: "mmoe_rec.models.PLE"}, used)


def test_a_step_watcher_and_a_scheduler_without_a_mode_are_not_checked_for_a_mode():
    """ModelCheckpoint(monitor="step", mode="max") keeps the latest k; a scheduler other than ReduceLROnPlateau has
    no mode to check, only its monitor."""
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import ModelCheckpoint

    from mmoe_rec.training.cli import check_monitors

    module = SimpleNamespace(monitorable_metrics=lambda: {"val/click/auc": "max"}, tasks=["click"],
                             lr_scheduler_config={"class_path": "torch.optim.lr_scheduler.StepLR",
                                                  "monitor": "val/click/auc"})
    check_monitors(SimpleNamespace(callbacks=[ModelCheckpoint(monitor="step", mode="max", save_top_k=2)]), module)
    module.lr_scheduler_config = {"class_path": "torch.optim.lr_scheduler.StepLR", "monitor": "val/clik/auc"}
    with pytest.raises(ValueError, match="the lr_scheduler monitors 'val/clik/auc', which this fit does not log"):
        check_monitors(SimpleNamespace(callbacks=[]), module)


def test_printed_config_holds_one_learning_rate_for_an_overridden_optimizer_setting(capsys):
    """`--model.init_args.optimizer.init_args.lr 0.01 --print_config` printed `init_args: {lr: 0.001}` and a stray
    `lr: 0.01` beside it; the stray key wins when the printed file runs, so editing the visible init_args.lr in it
    changed nothing, silently."""
    with pytest.raises(SystemExit):
        run_lightning_cli(["fit", "--config", str(CONFIGS[0].parent / "mmoe_synthetic.yaml"),
                           "--model.init_args.optimizer.init_args.lr", "0.01", "--print_config"])
    optimizer = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["optimizer"]
    assert set(optimizer) <= {"class_path", "init_args"}, optimizer
    assert optimizer["init_args"]["lr"] == 0.01


@pytest.mark.parametrize("key", ["limit_train_batches", "limit_val_batches"])
def test_print_config_keeps_one_batch_as_the_integer_1(key, capsys):
    """`--trainer.limit_val_batches 1` is one batch (instantiate_trainer's fix for Lightning #21259), but
    `--print_config` printed `limit_val_batches: 1.0`, which Lightning reads as every batch: the printed config
    (and the config.yaml logged to MLflow, the same dump) ran something else than the command that printed it."""
    with pytest.raises(SystemExit):
        run_lightning_cli(["fit", "--config", str(CONFIG), f"--trainer.{key}", "1", "--print_config"])
    value = yaml.safe_load(capsys.readouterr().out)["trainer"][key]
    assert value == 1 and type(value) is int, value


@pytest.mark.parametrize("text", ["trainer:\n  max_epochs: [1\n", "", "- a\n- b\n", "trainer: caf\xe9\n"],
                         ids=["yaml_syntax", "empty", "not_a_mapping", "not_utf8"])
def test_a_config_file_that_cannot_be_read_is_named(feature_dir, in_tmp, capsys, text):
    """A second --config file with a YAML mistake was reported as `Problems parsing config: ... in "<unicode
    string>", line 2` (an empty one as `Unexpected config: `, one in Latin-1 as "'utf-8' codec can't decode"),
    naming no file."""
    from mmoe_rec.cli import main

    broken = in_tmp / "override.yaml"
    broken.write_bytes(text.encode("latin-1"))
    code = main(["fit", "--config", str(CONFIG), "--config", str(broken),
                 "--data.init_args.data_dir", str(feature_dir)])
    err = capsys.readouterr().err
    assert code == 1 and "override.yaml" in err, err


def test_an_unreadable_first_feature_file_is_named(make_feature_dir, in_tmp, capsys):
    """The first file of a split that is no Parquet failed in check_data_for_module's pq.read_schema with Arrow's
    "Parquet magic bytes not found in footer" alone; a later file of the split is named by the data module."""
    from mmoe_rec.cli import main

    fd = make_feature_dir("corrupt", rows={"train": 300, "valid": 100, "test": 100})
    first = sorted((fd / "valid").glob("*.parquet"))[0]
    first.write_bytes(b"not parquet")
    code = main(["fit", "--config", str(CONFIG), "--data.init_args.data_dir", str(fd),
                 "--trainer.max_epochs", "1", "--checkpoint_dir", str(in_tmp / "ck")])
    err = capsys.readouterr().err
    assert code == 1 and str(first) in err, err


def test_an_optimizer_class_given_by_its_class_path_key_names_the_optimizer(feature_dir, in_tmp, capsys):
    """`--model.init_args.optimizer.class_path torch.optim.SGD` (the way every other class of the config is
    changed) failed with "model: Problem with given class_path 'mmoe_rec.training.module.MultiTaskModule': 'dict'
    object has no attribute 'init_args'": neither the optimizer nor the form that works is named."""
    from mmoe_rec.cli import main

    code = main(["fit", "--config", str(CONFIG), "--data.init_args.data_dir", str(feature_dir),
                 "--model.init_args.optimizer.class_path", "torch.optim.SGD",
                 "--trainer.max_epochs", "1", "--checkpoint_dir", str(in_tmp / "ck")])
    err = capsys.readouterr().err
    assert code == 1 and "optimizer" in err and "'dict' object has no attribute" not in err, err


def test_a_checkpoint_dir_that_is_a_file_is_named(feature_dir, in_tmp, capsys):
    """--checkpoint_dir naming an existing file failed with "[Errno 17] File exists: '...'" from the folder lock,
    naming neither the setting nor that a folder was wanted."""
    from mmoe_rec.cli import main

    (in_tmp / "ck").write_text("")
    code = main(["fit", "--config", str(CONFIG), "--data.init_args.data_dir", str(feature_dir),
                 "--trainer.max_epochs", "1", "--checkpoint_dir", str(in_tmp / "ck")])
    err = capsys.readouterr().err
    assert code == 1 and "--checkpoint_dir" in err and "Errno" not in err, err
