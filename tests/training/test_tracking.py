"""Tracking store resolution, fail-fast checks, git commit, parameter flattening."""
import re
import socket
import time

import pytest

from mmoe_rec.training.tracking import (
    DEFAULT_TRACKING_URI,
    MLflowTracker,
    TrackingUnavailable,
    flatten_params,
    git_commit,
    resolve_tracking_uri,
)


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
    assert time.monotonic() - start < 10


def test_sqlite_in_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(TrackingUnavailable, match="does not exist"):
        MLflowTracker(tracking_uri=f"sqlite:///{tmp_path}/nope/mlflow.db")


def test_git_commit_is_read_without_git():
    commit = git_commit()
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}", commit)


def test_flatten_params_nested_and_long_values():
    flat = flatten_params({"model": {"class_path": "a.B", "init_args": {"k": 2, "h": [64, 32]}}, "x": "y" * 900})
    assert flat["model/class_path"] == "a.B"
    assert flat["model/init_args/h"] == "[64, 32]"
    assert len(flat["x"]) == 500 and flat["x"].endswith("...")
