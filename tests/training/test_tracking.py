"""Tracking store resolution, fail-fast checks, git commit, parameter flattening."""
import http.server
import json
import os
import re
import socket
import sqlite3
import threading
import time
import warnings
from pathlib import Path

import pytest

from mmoe_rec.training.tracking import (
    DEFAULT_TRACKING_URI,
    MAX_PARAM_CHARS,
    MLflowTracker,
    TrackingUnavailable,
    check_tracking_uri,
    configure_tracking,
    flatten_params,
    git_commit,
    log_run_files,
    resolve_tracking_uri,
)

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "mmoe_synthetic.yaml"

pytestmark = pytest.mark.seeded_mlflow_store  # tmp_path/mlflow.db: a copy of an empty store (tests/conftest.py)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed on exit: nothing listens there


def test_default_and_env_uri(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert DEFAULT_TRACKING_URI == "sqlite:///mlflow.db"
    # relative SQLite paths are pinned to the working directory (MLflow caches stores by URI string)
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path.resolve()}/elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////abs/x.db")
    assert resolve_tracking_uri() == "sqlite:////abs/x.db"
    assert resolve_tracking_uri("http://x:1") == "http://x:1"


def test_unreachable_server_fails_fast_with_clear_error(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    start = time.monotonic()
    with pytest.raises(TrackingUnavailable, match="unreachable"):
        MLflowTracker()
    assert time.monotonic() - start < 60  # a hang guard (the probe gives up after 5 s), not a speed test


def test_sqlite_in_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(TrackingUnavailable, match="does not exist"):
        MLflowTracker(tracking_uri=f"sqlite:///{tmp_path}/nope/mlflow.db")


def test_git_commit_is_read_without_git():
    commit = git_commit()
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}", commit)


def test_git_commit_of_a_checkout_a_packed_ref_and_a_worktree(tmp_path):
    main_sha, feature_sha, detached = "a" * 40, "b" * 40, "c" * 40
    git = tmp_path / "main" / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    (git / "packed-refs").write_text(f"# pack-refs with: peeled\n{main_sha} refs/heads/main\n")
    (git / "refs" / "heads" / "feature").write_text(feature_sha + "\n")
    (tmp_path / "main" / "pkg").mkdir()
    assert git_commit(tmp_path / "main" / "pkg") == main_sha  # from packed-refs
    # a worktree: .git is a file naming its git dir, whose HEAD is its own and whose refs are the main repo's
    for name, head in (("wt", "ref: refs/heads/feature"), ("wt2", detached)):
        own = git / "worktrees" / name
        own.mkdir(parents=True)
        (own / "HEAD").write_text(head + "\n")
        (own / "commondir").write_text("../..\n")
        (tmp_path / name / "pkg").mkdir(parents=True)
        (tmp_path / name / ".git").write_text(f"gitdir: {own}\n")
    assert git_commit(tmp_path / "wt" / "pkg") == feature_sha
    assert git_commit(tmp_path / "wt2" / "pkg") == detached
    assert git_commit(tmp_path) is None or git_commit(tmp_path) != main_sha  # above the checkout: not this one


@pytest.mark.parametrize("where", ["unwritable", "not-a-database"])
def test_a_sqlite_store_that_cannot_be_written_fails_at_once_naming_it(tmp_path, where):
    if where == "unwritable":
        uri = "sqlite:////proc/mlflow.db"  # a folder no one can create files in, root included
    else:
        (tmp_path / "x.db").write_bytes(b"this is no sqlite file" * 100)
        uri = f"sqlite:///{tmp_path / 'x.db'}"
    start = time.monotonic()
    with pytest.raises(TrackingUnavailable, match="MLflow SQLite store"):
        MLflowTracker(tracking_uri=uri)
    assert time.monotonic() - start < 60  # a hang guard: MLflow's own retries took about 110 s


def test_a_fit_can_continue_an_existing_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = MLflowTracker(tracking_uri=uri)
    first.log_metrics({"x": 1.0}, step=0)
    again = MLflowTracker(tracking_uri=uri, run_id=first.run_id)
    again.log_metrics({"x": 2.0}, step=1)
    assert again.run_id == first.run_id
    history = again.experiment.get_metric_history(first.run_id, "x")
    assert sorted(m.value for m in history) == [1.0, 2.0]


def test_flatten_params_nested_and_long_values():
    # MLflow takes 6000 characters: 900 (an expert_hidden of 200 layers) was cut to 500 without a word
    flat = flatten_params({"model": {"class_path": "a.B", "init_args": {"k": 2, "h": [64, 32]}}, "x": "y" * 900})
    assert flat["model/class_path"] == "a.B"
    assert flat["model/init_args/h"] == "[64, 32]"
    assert flat["x"] == "y" * 900
    with pytest.warns(UserWarning, match="param 'x' is 7000 characters"):
        cut = flatten_params({"x": "y" * 7000})["x"]
    assert len(cut) == MAX_PARAM_CHARS == 6000 and cut.endswith("...")


def test_param_names_mlflow_refuses_are_logged_under_names_it_takes(tmp_path):
    """An empty dict key, a character MLflow does not take in a param name, a name over 250 characters: each made
    log_hyperparams raise and the run end FAILED. Now each is logged under a name MLflow takes, none overwritten."""
    nested = {"model": {"": 1, "a@b": 2, "a_b": 3, "..": 4, "k" * 300: 5, "ok": 6}}
    with pytest.warns(UserWarning, match="is not a name MLflow takes"):
        flat = flatten_params(nested)
    assert sorted(flat.values()) == ["1", "2", "3", "4", "5", "6"] and flat["model/a_b"] == "3"
    assert flat["model/ok"] == "6" and all(len(k) <= 250 for k in flat)
    tracker = MLflowTracker(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.warns(UserWarning):
        tracker.log_hyperparams(nested)
    logged = tracker.experiment.get_run(tracker.run_id).data.params
    assert sorted(logged.values()) == ["1", "2", "3", "4", "5", "6"]


def test_keys_mlflow_would_refuse_after_a_resume_prefix_or_for_a_leading_dotdot_and_namespaces_are_logged(tmp_path):
    """A key that fitted MLflow's 250 characters no longer did as `resume-<n>/<key>`, a key starting with '..'
    (`..a`) is one MLflow refuses as a path out of the run, and an argparse.Namespace (which Lightning's loggers
    take) was not iterable: each failed the run."""
    from argparse import Namespace

    long_key = "p" * 245
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = MLflowTracker(tracking_uri=uri)
    with pytest.warns(UserWarning, match="is not a name MLflow takes"):
        first.log_hyperparams({long_key: 1, "..a": 2})
    again = MLflowTracker(tracking_uri=uri, run_id=first.run_id)
    again.log_hyperparams(Namespace(**{long_key: 3, "lr": 0.1, "model": Namespace(hidden=[8])}))
    params = again.experiment.get_run(first.run_id).data.params
    assert params[long_key] == "1" and params["_..a"] == "2" and params["lr"] == "0.1"
    assert params["model/hidden"] == "[8]"  # a nested Namespace flattened, as Lightning's own loggers do
    resumed = [k for k in params if k.startswith("resume-1/")]
    assert len(resumed) == 1 and len(resumed[0]) <= 250 and params[resumed[0]] == "3"


@pytest.mark.parametrize("task,ok", [("click", True), ("ctr/v2", True), ("a b-c.d", True), ("ctr@7d", False),
                                     ("点击", False), ("a//b", False), ("/a", False), ("a/..", False)])
def test_a_task_name_mlflow_metrics_cannot_hold_is_refused_before_the_run(tmp_path, task, ok):
    """Lightning deletes characters outside [A-Za-z0-9_/. -] from metric names: `ctr@7d`'s metrics were renamed
    `val/ctr7d/auc`, and `点击`'s `train//loss` failed the fit at its first log, once training had started."""
    from types import SimpleNamespace

    from mmoe_rec.training.cli import check_task_names_for_mlflow

    module = SimpleNamespace(tasks=["other", task])
    tracker = MLflowTracker(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    if ok:
        check_task_names_for_mlflow(SimpleNamespace(loggers=[tracker]), module)
    else:
        with pytest.raises(ValueError, match=f"task {re.escape(repr(task))} cannot be named in MLflow metrics"):
            check_task_names_for_mlflow(SimpleNamespace(loggers=[tracker]), module)
    check_task_names_for_mlflow(SimpleNamespace(loggers=[]), module)  # no MLflow logger: no such limit


def test_a_run_logged_into_again_keeps_its_params_and_config(tmp_path, monkeypatch):
    """A fit resumed into its earlier run with another batch size: MLflow refused the changed param, which left
    the finished run FAILED with its config.yaml replaced by one that never trained it."""
    from mmoe_rec.training.tracking import log_run_files

    monkeypatch.chdir(tmp_path)  # the run's artifacts go to ./mlruns: here, not into the checkout
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = MLflowTracker(tracking_uri=uri)
    log_run_files(first, "batch_size: 256\n", None)
    first.log_hyperparams({"batch_size": 256, "lr": 0.01})
    for batch_size in (128, 64):
        again = MLflowTracker(tracking_uri=uri, run_id=first.run_id)
        log_run_files(again, f"batch_size: {batch_size}\n", None)
        again.log_hyperparams({"batch_size": batch_size, "lr": 0.01, "workers": 2})
    params = again.experiment.get_run(first.run_id).data.params
    assert params == {"batch_size": "256", "lr": "0.01", "workers": "2", "resume-1/batch_size": "128",
                      "resume-2/batch_size": "64"}
    files = {a.path for a in again.experiment.list_artifacts(first.run_id)}
    assert files == {"config.yaml", "config.resume-1.yaml", "config.resume-2.yaml"}
    local = again.experiment.download_artifacts(first.run_id, "config.yaml", str(tmp_path))
    assert open(local).read() == "batch_size: 256\n"


def test_one_resume_logs_its_params_and_config_under_one_number(tmp_path, monkeypatch):
    """A resume that changed nothing still logs its config (config.resume-1.yaml), so the next one is resume 2 for
    its params too; and the CLI logs the trainer's params and Lightning the model's in two calls, both of one
    resume (they were numbered 1 and 2)."""
    from mmoe_rec.training.tracking import log_run_files

    monkeypatch.chdir(tmp_path)  # the run's artifacts go to ./mlruns: here, not into the checkout
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = MLflowTracker(tracking_uri=uri)
    log_run_files(first, "lr: 0.01\n", None)
    first.log_hyperparams({"trainer": {"max_epochs": 2}, "model": {"lr": 0.01}})
    same = MLflowTracker(tracking_uri=uri, run_id=first.run_id)
    log_run_files(same, "lr: 0.01\n", None)
    same.log_hyperparams({"trainer": {"max_epochs": 2}})
    same.log_hyperparams({"model": {"lr": 0.01}})
    changed = MLflowTracker(tracking_uri=uri, run_id=first.run_id)
    log_run_files(changed, "lr: 0.001\n", None)
    changed.log_hyperparams({"trainer": {"max_epochs": 4}})
    changed.log_hyperparams({"model": {"lr": 0.001}})
    params = changed.experiment.get_run(first.run_id).data.params
    assert {k: v for k, v in params.items() if k.startswith("resume-")} == {
        "resume-2/trainer/max_epochs": "4", "resume-2/model/lr": "0.001"}
    files = {a.path for a in changed.experiment.list_artifacts(first.run_id)}
    assert files == {"config.yaml", "config.resume-1.yaml", "config.resume-2.yaml"}


def test_an_existing_sqlite_store_in_a_folder_that_takes_no_file_fails_at_once(tmp_path):
    """SQLite writes a journal beside the database: the lock probe passed, and MLflow failed 7 s later with an
    autoflush message and a hint about HTTP servers. `chattr +i` keeps even root from creating files."""
    import shutil
    import subprocess

    folder = tmp_path / "ro"
    folder.mkdir()
    MLflowTracker(tracking_uri=f"sqlite:///{folder / 'x.db'}")  # an existing store
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        if os.access(folder, os.W_OK) and _can_create(folder):
            pytest.skip("the folder still takes files")
        with pytest.raises(TrackingUnavailable, match=f"its folder {folder} cannot be written"):
            check_tracking_uri(f"sqlite:///{folder / 'x.db'}")
    finally:
        subprocess.run(["chattr", "-i", str(folder)])


def _can_create(folder) -> bool:
    try:
        (folder / "probe").write_bytes(b"")
    except OSError:
        return False
    (folder / "probe").unlink()
    return True


@pytest.fixture
def blackhole():
    """A server that accepts TCP connections and never answers (a hung proxy or server): its URI."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    held, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    server.close()


@pytest.fixture
def http_server():
    """A tiny HTTP server: /health answers 200 'OK' as an MLflow server does, anything else 404. Its URI."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"OK" if self.path == "/health" else b"not found"
            self.send_response(200 if self.path == "/health" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_server_that_accepts_but_never_answers_is_unreachable_not_a_hang(blackhole):
    start = time.monotonic()
    with pytest.raises(TrackingUnavailable, match="unreachable") as info:
        check_tracking_uri(blackhole)
    assert time.monotonic() - start < 60  # a hang guard (the probe gives up after 5 s), not a speed test
    assert blackhole in str(info.value) and "no HTTP answer" in str(info.value) and "5 s" in str(info.value)


def test_tracker_on_a_silent_server_fails_fast(blackhole, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", blackhole)
    start = time.monotonic()
    with pytest.raises(TrackingUnavailable, match="unreachable"):
        MLflowTracker()
    assert time.monotonic() - start < 60  # a hang guard (the probe gives up after 5 s), not a speed test


@pytest.fixture
def no_http_limits(monkeypatch):
    """MLflow's HTTP limit variables unset for the test and restored (or removed) after it."""
    import mlflow

    for name in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES"):
        monkeypatch.setenv(name, "x")  # recorded, so that teardown removes what configure_tracking sets
        monkeypatch.delenv(name)
    yield
    mlflow.set_tracking_uri(None)


def test_server_answering_like_mlflow_passes_and_gets_short_http_limits(http_server, no_http_limits, monkeypatch):
    check_tracking_uri(http_server)
    check_tracking_uri(http_server + "/")
    check_tracking_uri(http_server + "/behind/a/prefix")  # answers 404 there: still a server, as before
    assert configure_tracking(http_server) == http_server
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "30"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "600")  # the user's own value wins
    configure_tracking(http_server)
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "600"


def test_sqlite_store_keeps_mlflow_http_limits(tmp_path, no_http_limits):
    configure_tracking(f"sqlite:///{tmp_path}/mlflow.db")
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ


def test_a_run_whose_files_cannot_be_logged_ends_failed_not_running(tmp_path, monkeypatch):
    """An artifact folder that cannot be written failed the run's first files after the run existed: it stayed
    RUNNING in the store. MultiTaskCLI._log_config marks it FAILED before the error goes on."""
    from types import SimpleNamespace

    from mmoe_rec.training import cli
    from mmoe_rec.training.cli import MultiTaskCLI

    tracker = MLflowTracker(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = tracker.run_id  # the run exists

    def refuse(*args, **kwargs):
        raise PermissionError("[Errno 1] Operation not permitted: './mlruns'")

    monkeypatch.setattr(cli, "log_run_files", refuse)
    fake = SimpleNamespace(subcommand="fit", trainer=SimpleNamespace(logger=tracker),
                           model=SimpleNamespace(spec=SimpleNamespace(to_dict=dict)), datamodule=None,
                           config={"fit": {}}, _parser=lambda sub: SimpleNamespace(dump=lambda *a, **k: "{}\n"))
    with pytest.raises(PermissionError, match="not permitted"):
        MultiTaskCLI._log_config(fake)
    assert tracker.experiment.get_run(run_id).info.status == "FAILED"


def test_a_server_uri_with_a_login_is_probed_with_it_and_errors_hide_the_password():
    """urllib takes no user:password@ in a URL: such a store (MLflow's own client takes it) was called unreachable,
    and the message printed the password."""
    import base64

    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        check_tracking_uri(f"http://ann:s%40cret@127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert seen == ["Basic " + base64.b64encode(b"ann:s@cret").decode()]
    with pytest.raises(TrackingUnavailable, match="unreachable") as info:
        check_tracking_uri(f"http://ann:secret@127.0.0.1:{free_port()}", timeout=2)
    assert "ann:***@127.0.0.1" in str(info.value) and "secret" not in str(info.value)


@pytest.mark.fresh_mlflow_store  # the file must not be there before
def test_a_sqlite_uri_with_options_checks_and_creates_the_database_file_itself(tmp_path, monkeypatch):
    """`?timeout=30` was taken as part of the file name: an empty `mlflow.db?timeout=30` was made and checked."""
    monkeypatch.chdir(tmp_path)
    uri = resolve_tracking_uri("sqlite:///mlflow.db?timeout=30")
    assert uri == f"sqlite:///{tmp_path / 'mlflow.db'}?timeout=30"
    check_tracking_uri(uri)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]


# Gaps a mutation review found (2026-12-07): the cut's boundary, an empty mapping, a locked store, the data
# manifest, the spec kept out of params, the commit tag on every path, an unborn branch
def test_a_value_of_exactly_the_limit_is_logged_whole_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flat = flatten_params({"x": "y" * MAX_PARAM_CHARS})
    assert flat["x"] == "y" * MAX_PARAM_CHARS


def test_an_empty_mapping_is_logged_not_dropped():
    assert flatten_params({"model": {"task_weights": {}, "k": 2}}) == {"model/task_weights": "{}", "model/k": "2"}


def test_a_store_another_process_is_writing_is_busy_not_broken(tmp_path):
    db = tmp_path / "mlflow.db"
    holder = sqlite3.connect(str(db))
    holder.execute("create table t (x)")
    holder.commit()
    holder.execute("begin immediate")  # another writer holds the write lock
    try:
        check_tracking_uri(f"sqlite:///{db}")  # must not raise TrackingUnavailable
    finally:
        holder.rollback()
        holder.close()


def test_the_data_folders_manifest_is_logged_as_data_manifest_json(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "features"
    data.mkdir()
    (data / "manifest.json").write_text('{"rows": {"train": 3}}')
    tracker = MLflowTracker(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    log_run_files(tracker, "a: 1\n", {"x": 1}, data_dir=data, command="fit")
    client = tracker.experiment
    files = {a.path for a in client.list_artifacts(tracker.run_id, "data")}
    assert files == {"data/manifest.json"}
    tags = client.get_run(tracker.run_id).data.tags
    assert tags["mmoe_rec.data_dir"] == str(data.resolve()) and tags["mmoe_rec.command"] == "fit"


def test_the_feature_spec_is_not_logged_as_params(tmp_path):
    tracker = MLflowTracker(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracker.log_hyperparams({"feature_spec": {"sparse": [{"name": "u", "vocab": 3}], "version": "abc"}, "lr": 0.1,
                             "_instantiator": "x", "_class_path": "y"})
    assert tracker.experiment.get_run(tracker.run_id).data.params == {"lr": "0.1"}


def test_a_tracker_made_outside_the_cli_tags_its_run_with_the_commit(tmp_path):
    from mmoe_rec.training.tracking import git_commit

    commit = git_commit()
    assert commit  # run from a checkout
    tracker = MLflowTracker(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert tracker.experiment.get_run(tracker.run_id).data.tags.get("mlflow.source.git.commit") == commit


def test_log_run_files_tags_the_commit_for_any_mlflow_logger(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import MLFlowLogger

    from mmoe_rec.training.tracking import git_commit

    monkeypatch.chdir(tmp_path)
    logger = MLFlowLogger(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    log_run_files(logger, None, None)
    assert logger.experiment.get_run(logger.run_id).data.tags.get("mlflow.source.git.commit") == git_commit()


def test_an_unborn_branch_is_not_read_as_a_longer_packed_refs_branch(tmp_path):
    from mmoe_rec.training.tracking import git_commit

    git = tmp_path / ".git"
    git.mkdir()
    (git / "HEAD").write_text("ref: refs/heads/ma\n")  # a new branch, no commit yet
    (git / "packed-refs").write_text(f"{'a' * 40} refs/heads/main\n")
    assert git_commit(tmp_path) is None


@pytest.mark.parametrize("scheme", ["postgresql+psycopg2", "mysql+pymysql"])
def test_an_unreachable_database_store_is_a_clear_error_before_the_run(scheme):
    """A SQLAlchemy store (postgresql, mysql) nobody listens on: refused by the check, naming the store, as a
    http or sqlite store is (MLflow itself retries its engine for about 100 s, and a server that accepts but never
    answers blocks psycopg2's connect with no timeout at all)."""
    uri = f"{scheme}://u:pw@127.0.0.1:{free_port()}/db"
    start = time.monotonic()
    with pytest.raises(TrackingUnavailable, match="127.0.0.1") as info:
        check_tracking_uri(uri)
    assert time.monotonic() - start < 60
    assert "pw" not in str(info.value)


@pytest.mark.parametrize("scheme", ["postgresql", "mysql+pymysql"])
def test_a_database_store_that_accepts_but_never_answers_is_unreachable_not_a_hang(blackhole, scheme):
    uri = f"{scheme}://u:pw@{blackhole.removeprefix('http://')}/db"
    start = time.monotonic()
    with pytest.raises(TrackingUnavailable, match=r"unreachable \(no answer from 127.0.0.1:\d+ within 5 s") as info:
        check_tracking_uri(uri)
    assert time.monotonic() - start < 60  # a hang guard (the probe gives up after 5 s), not a speed test
    assert "u:***@" in str(info.value) and "pw" not in str(info.value)


@pytest.mark.parametrize("scheme, greeting", [("postgresql+psycopg2", b"N"), ("mysql", b"J\x00\x00\x00\n8.0")])
def test_a_database_server_that_answers_passes_the_check(scheme, greeting):
    """PostgreSQL answers the probe's SSL request with one byte (S or N); a MySQL server greets first."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    received = []

    def serve():
        conn, _ = server.accept()
        with conn:
            if scheme.startswith("postgresql"):
                received.append(conn.recv(8))
            conn.sendall(greeting)
            conn.recv(1)  # until the probe closes

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        check_tracking_uri(f"{scheme}://u:pw@127.0.0.1:{server.getsockname()[1]}/db")
    finally:
        thread.join(5)
        server.close()
    if scheme.startswith("postgresql"):
        assert received == [bytes.fromhex("0000000804d2162f")]  # the SSLRequest message: length 8, code 80877103


@pytest.mark.parametrize("uri", [
    "postgresql://u:pw@127.0.0.1/db?port={port}",  # the driver reads the query's port over the URI's
    "postgresql://u@localhost/db?host=/var/run/postgresql",  # a Unix socket
    "mysql+pymysql://u:pw@localhost/db?unix_socket=/run/mysqld/mysqld.sock",
    "mysql://u:pw@localhost/mlflow",  # mysqlclient: localhost is its Unix socket
    "mssql+pyodbc://u:pw@my_dsn",  # a DSN name, not a host
])
def test_a_database_store_not_addressed_by_host_and_port_is_left_to_mlflow(uri):
    """The probe refused working stores: it tried TCP to the URI's host on the dialect's default port (review)."""
    check_tracking_uri(uri.format(port=free_port()))  # no TrackingUnavailable: not probed


def _store_setup_job(role: str, db, signals) -> None:
    """A job that sets up the SQLite store `db` and makes an experiment in it, in a process of its own. A holds inside MLflow's setup, once it has read the schema version, until B is done
    or waits; B starts once A is inside and says so where it has to wait for the setup lock."""
    import fcntl
    import traceback

    import alembic.runtime.migration as migration
    from mlflow import MlflowClient

    def wait_for(*names):
        deadline = time.monotonic() + 60
        while not any((signals / n).exists() for n in names) and time.monotonic() < deadline:
            time.sleep(0.02)

    try:
        if role == "A":
            read_heads = migration.MigrationContext.get_current_heads

            def paused(self):
                heads = read_heads(self)
                if not (signals / "a_inside").exists():
                    (signals / "a_inside").touch()
                    wait_for("b_done", "b_waits")
                return heads

            migration.MigrationContext.get_current_heads = paused
        else:
            flock = fcntl.flock

            def flock_saying_it_waits(fd, op):
                if op == fcntl.LOCK_EX:
                    try:
                        return flock(fd, op | fcntl.LOCK_NB)
                    except BlockingIOError:
                        (signals / "b_waits").touch()
                return flock(fd, op)

            fcntl.flock = flock_saying_it_waits
            wait_for("a_inside")
        uri = configure_tracking(f"sqlite:///{db}")
        MlflowClient(uri).create_experiment(f"job-{role}")
        (signals / f"{role.lower()}_done").touch()
    except BaseException:
        (signals / f"{role}_error").write_text(traceback.format_exc())
        raise


@pytest.mark.fresh_mlflow_store  # the store is made by the two jobs
def test_jobs_started_together_on_a_new_sqlite_store_both_set_it_up(tmp_path):
    """3 fits started at once on a folder without mlflow.db: all but one failed (`table _alembic_tmp_experiments
    already exists`, `duplicate column name: step`), and where all did, the store was left half migrated for good:
    MLflow does not serialise its schema setup; configure_tracking does (sqlite_setup_lock). Job A holds inside
    MLflow's setup (schema version read, migrations not run) while job B starts."""
    import multiprocessing

    from mlflow import MlflowClient

    db, signals = tmp_path / "mlflow.db", tmp_path / "signals"
    signals.mkdir()
    # spawned, not forked: a child forked from a pytest worker's threads (xdist's, MLflow's) hung for good, now and
    # then, on a lock one of them held at the fork (both jobs past 240 s in a fresh-clone CI run)
    spawn = multiprocessing.get_context("spawn")
    jobs = {role: spawn.Process(target=_store_setup_job, args=(role, db, signals)) for role in "AB"}
    for job in jobs.values():
        job.start()
    for job in jobs.values():
        job.join(timeout=300)  # two MLflow schema setups one after the other: over 120 s on a loaded 2-core VM
    assert (signals / "a_inside").exists()  # the jobs overlapped
    for role, job in jobs.items():
        error = signals / f"{role}_error"
        assert job.exitcode == 0, f"job {role}: {error.read_text()[-2000:] if error.exists() else job.exitcode}"
    assert {"job-A", "job-B"} <= {e.name for e in MlflowClient(f"sqlite:///{db}").search_experiments()}


@pytest.mark.fresh_mlflow_store
def test_a_half_migrated_store_is_one_line_naming_the_file_and_what_to_do(tmp_path):
    """A store whose first setup was cut short (the schema version not at head, a leftover alembic temporary table:
    what the race above left) failed every later job with SQLAlchemy's ten-line dump of the failed statement."""
    import sqlalchemy
    from alembic import command
    from mlflow.store.db.utils import InitialBase, _get_alembic_config

    db = tmp_path / "mlflow.db"
    engine = sqlalchemy.create_engine(f"sqlite:///{db}")
    InitialBase.metadata.create_all(engine)  # MLflow's setup, stopped inside the migration that copies `tags`
    with engine.begin() as connection:
        config = _get_alembic_config(f"sqlite:///{db}")
        config.attributes["connection"] = connection
        command.upgrade(config, "4465047574b1")
        connection.exec_driver_sql("create table _alembic_tmp_tags (key varchar(250))")
    engine.dispose()
    with pytest.raises(TrackingUnavailable) as info:
        configure_tracking(f"sqlite:///{db}")
    message = str(info.value)
    assert "\n" not in message and "_alembic_tmp_tags already exists" in message, message
    assert f"mv {db} {db}.broken" in message


def test_a_tracking_uri_without_a_scheme_names_the_setting(feature_dir, in_tmp, capsys, monkeypatch):
    """MLFLOW_TRACKING_URI=localhost:5000 (http:// forgotten) passed MLflow's 'Model registry functionality is
    unavailable; got unsupported URI' through, naming neither MLFLOW_TRACKING_URI nor the logger's tracking_uri."""
    from mmoe_rec.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "localhost:5000")
    code = main(["fit", "--config", str(CONFIG), "--data.init_args.data_dir", str(feature_dir),
                 "--trainer.max_epochs", "1", "--checkpoint_dir", str(in_tmp / "ck")])
    err = capsys.readouterr().err
    assert code == 1 and "MLFLOW_TRACKING_URI" in err, err


@pytest.mark.parametrize("uri", ["sqlite://mlflow.db", "sqlite:/mlflow.db"])
def test_a_sqlite_uri_with_too_few_slashes_makes_no_stray_file(feature_dir, in_tmp, capsys, monkeypatch, uri):
    """check_tracking_uri cut a fixed len("sqlite:///") off any sqlite: URI: `sqlite://mlflow.db` (a slash short)
    made an empty file `lflow.db` in the working directory (`sqlite:/mlflow.db`: `flow.db`) before the error."""
    from mmoe_rec.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    code = main(["fit", "--config", str(CONFIG), "--data.init_args.data_dir", str(feature_dir),
                 "--trainer.max_epochs", "1", "--checkpoint_dir", str(in_tmp / "ck")])
    err = capsys.readouterr().err
    assert code == 1 and uri in err, err
    assert not (in_tmp / "lflow.db").exists() and not (in_tmp / "flow.db").exists()


@pytest.mark.parametrize("uri", ["bogus://x", "mlflow.db"])
def test_a_tracking_uri_of_no_supported_scheme_is_one_line_naming_it(uri, monkeypatch):
    """MLflow's own error is a paragraph (unsupported registry URI, or its file store's maintenance notice)."""
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(TrackingUnavailable, match=re.escape(uri)) as info:
        check_tracking_uri(uri, setting="--tracking-uri")
    assert "--tracking-uri" in str(info.value) and "sqlite:///" in str(info.value)
    assert "\n" not in str(info.value)


def test_a_tracking_uri_of_a_plugins_scheme_is_left_to_its_store(monkeypatch):
    """A package may add a tracking store for its own scheme (an `mlflow.tracking_store` entry point): it is not
    refused as unsupported."""
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    monkeypatch.setitem(_tracking_store_registry._registry, "myplugin", lambda store_uri, artifact_uri=None: None)
    check_tracking_uri("myplugin://somewhere", setting="--tracking-uri")
    with pytest.raises(TrackingUnavailable, match="bogus://x"):
        check_tracking_uri("bogus://x", setting="--tracking-uri")


@pytest.mark.parametrize("uri", ["databricks", "databricks-uc"])
def test_a_bare_databricks_tracking_uri_is_not_taken_for_a_file_store(uri):
    """MLflow's documented Databricks URIs `databricks` and `databricks-uc` have no `scheme:` (urlparse gives
    ''): the scheme check took them for a folder path (MLflow's file store) and refused them, while its own
    message listed databricks as supported."""
    from mmoe_rec.training.tracking import check_tracking_uri

    check_tracking_uri(uri, timeout=0.1)


def test_an_installed_copy_inside_another_projects_checkout_is_not_tagged_with_that_projects_commit(tmp_path):
    """A virtual environment inside a user's own git checkout: the package's folder walked up to that checkout, and
    its runs claimed the user's commit as the code that ran (a review). An installed copy records its version."""
    import shutil
    import subprocess
    import sys

    import mmoe_rec

    project = tmp_path / "project"
    (project / ".git" / "refs" / "heads").mkdir(parents=True)
    (project / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (project / ".git" / "refs" / "heads" / "main").write_text("d" * 40 + "\n")
    site = project / ".venv" / "lib" / "python3" / "site-packages"
    shutil.copytree(Path(mmoe_rec.__file__).parent, site / "mmoe_rec",
                    ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import json, mmoe_rec.training.tracking as t; assert t.__file__.startswith(%r), t.__file__; "
            "print(json.dumps(t.code_tags()))" % str(site))
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(site)},
                          cwd=project, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tags = json.loads(proc.stdout.splitlines()[-1])
    assert "mlflow.source.git.commit" not in tags and "mmoe_rec.git_dirty" not in tags
    assert tags["mmoe_rec.version"]  # the installed distribution's


def test_a_pip_install_from_git_records_the_commit_pip_installed(monkeypatch):
    import importlib.metadata

    from mmoe_rec.training import tracking

    class Installed:
        version = "9.9"

        def read_text(self, name):
            assert name == "direct_url.json"
            return json.dumps({"url": "https://example.org/mmoe-rec.git",
                               "vcs_info": {"vcs": "git", "commit_id": "e" * 40}})

    monkeypatch.setattr(tracking, "_package_in_checkout", lambda: None)
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: Installed())
    tags = tracking.code_tags()
    assert tags == {"mmoe_rec.version": "9.9", "mlflow.source.git.commit": "e" * 40}
