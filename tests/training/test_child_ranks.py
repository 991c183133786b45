"""join_child_ranks: rank 0 of a subprocess-launched job waits for the ranks it launched, with real processes in
place of the ranks; Lightning's observer thread (which would SIGKILL rank 0 on a failed child) is switched off.
The 2-process fit whose rank 1 fails after rank 0 finished is in test_ddp.py."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver

from mmoe_rec.training import child_ranks
from mmoe_rec.training.child_ranks import (DONE_DIR_ENV, ChildRankFailed, child_rank_reports, join_child_ranks,
                                           mark_rank_done, name_failed_child_ranks)


def child(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code])


def trainer_with(procs: list[subprocess.Popen]) -> SimpleNamespace:
    return SimpleNamespace(strategy=SimpleNamespace(launcher=SimpleNamespace(procs=procs)))


def test_children_that_exit_0_are_waited_for():
    procs = [child("import time; time.sleep(0.3)"), child("pass")]
    join_child_ranks(trainer_with(procs))
    assert [p.returncode for p in procs] == [0, 0]


def test_no_children_no_wait():
    join_child_ranks(SimpleNamespace(strategy=SimpleNamespace(launcher=None)))
    join_child_ranks(SimpleNamespace())


def test_a_failed_child_is_named_by_rank_and_exit_code():
    procs = [child("pass"), child("import sys; sys.exit(3)")]
    with pytest.raises(ChildRankFailed, match=rf"rank 2 \(pid {procs[1].pid}\) exited with code 3"):
        join_child_ranks(trainer_with(procs))


def test_a_child_that_does_not_exit_is_killed_and_named():
    procs = [child("import time; time.sleep(60)")]
    start = time.monotonic()
    with pytest.raises(ChildRankFailed, match=r"rank 1 .* had not exited 1 s after rank 0 finished and was killed"):
        join_child_ranks(trainer_with(procs), timeout_s=1.0)
    assert time.monotonic() - start < 10
    assert procs[0].returncode is not None


def test_lightnings_observer_no_longer_kills_rank_0_once_it_waits():
    # the observer's "main process" is a stand-in sleeper: killed if the observer acts on the failed child
    stand_in = child("import time; time.sleep(30)")
    failing = child("import sys, time; time.sleep(0.6); sys.exit(5)")
    observer = _ChildProcessObserver(main_pid=stand_in.pid, child_processes=[failing], sleep_period=0.2)
    observer.start()
    try:
        with pytest.raises(ChildRankFailed, match="exited with code 5"):
            join_child_ranks(trainer_with([failing]))
        observer.join(timeout=2)
        assert not observer.is_alive()
        assert stand_in.poll() is None, "the observer killed the process it took for rank 0"
    finally:
        stand_in.kill()
        stand_in.wait()


def test_a_child_that_marked_its_work_done_and_then_failed_is_a_warning(tmp_path):
    procs = [child("import os; os.abort()"), child("import sys; sys.exit(2)")]
    (tmp_path / "rank1").touch()  # rank 1 finished its subcommand; rank 2 did not
    with pytest.warns(RuntimeWarning, match=r"rank 1 \(pid \d+\) was killed by signal 6 after finishing its work"):
        with pytest.raises(ChildRankFailed, match=r"^rank 2 \(pid \d+\) exited with code 2 after rank 0 finished"):
            join_child_ranks(trainer_with(procs), tmp_path)


def test_rank_0_failing_names_the_ranks_that_died_before_it_and_not_those_still_waiting(capsys):
    """A rank SIGKILLed (the out-of-memory killer) prints nothing and rank 0's gloo error names no rank: rank 0's
    failure path names it. One still running (waiting for rank 0 in a collective) has not failed."""
    procs = [child("import os, signal; os.kill(os.getpid(), signal.SIGKILL)"), child("import time; time.sleep(30)"),
             child("import sys; sys.exit(4)")]
    try:
        start = time.monotonic()
        named = name_failed_child_ranks(trainer_with(procs), wait_s=3.0)
        assert time.monotonic() - start < 6  # the sleeper does not hold it past the wait
        assert named == [f"rank 1 (pid {procs[0].pid}) was killed by signal 9 (SIGKILL: the kernel's out-of-memory "
                         "killer sends it too)", f"rank 3 (pid {procs[2].pid}) exited with code 4"]
        assert procs[1].poll() is None
        assert "; ".join(named) + " before its work was done, while rank 0 was working: rank 0's error below may " \
            "follow from it" in capsys.readouterr().err
    finally:
        procs[1].kill()
        procs[1].wait()


def test_rank_0_failing_names_no_rank_that_had_marked_its_work_done(tmp_path, capsys):
    """A rank that exited non-zero after its work (the gloo exit race: SIGABRT at exit) is join_child_ranks'
    warning, not a cause of rank 0's failure (a review saw it named as one)."""
    procs = [child("import os; os.abort()")]
    procs[0].wait()
    (tmp_path / "rank1").touch()
    assert name_failed_child_ranks(trainer_with(procs), tmp_path) == []
    assert name_failed_child_ranks(trainer_with(procs)) == [f"rank 1 (pid {procs[0].pid}) was killed by signal 6"]
    assert capsys.readouterr().err.count("rank 1") == 1


def test_rank_0_failing_after_a_sigterm_names_no_rank(monkeypatch, capsys):
    """After a SIGTERM every rank stops on its own (exit 143): naming them would read as the cause."""
    monkeypatch.setattr(child_ranks, "sigterm_received_at", lambda: time.monotonic())
    procs = [child("import sys; sys.exit(143)")]
    procs[0].wait()
    assert name_failed_child_ranks(trainer_with(procs)) == []
    assert capsys.readouterr().err == ""


def test_rank_0_failing_without_launched_ranks_waits_for_nothing():
    start = time.monotonic()
    assert name_failed_child_ranks(SimpleNamespace(strategy=SimpleNamespace(launcher=None))) == []
    assert time.monotonic() - start < 0.5


def test_the_launcher_makes_the_report_folder_and_a_launched_rank_marks_itself_done(monkeypatch):
    monkeypatch.delenv(DONE_DIR_ENV, raising=False)
    with child_rank_reports() as folder:
        assert os.environ[DONE_DIR_ENV] == str(folder) and folder.is_dir()
        with child_rank_reports() as inner:  # what a launched rank, which inherits the variable, sees
            assert inner is None
        mark_rank_done(SimpleNamespace(local_rank=0))  # rank 0 marks nothing
        mark_rank_done(SimpleNamespace(local_rank=1))
        assert sorted(p.name for p in folder.iterdir()) == ["rank1"]
    assert DONE_DIR_ENV not in os.environ and not folder.exists()


@pytest.mark.parametrize("marked", [True, False])
def test_the_launchers_observer_spares_rank_0_for_a_child_that_failed_after_its_work(tmp_path, marked):
    """Lightning's observer SIGKILLed rank 0 as soon as a child exited non-zero, even one that had finished its work
    and aborted at exit (rank 0 still finishing its MLflow run was killed, the run left RUNNING). A child without
    its marker still ends the job as Lightning's does."""
    from mmoe_rec.training.child_ranks import _marker_aware_observer

    stand_in = child("import time; time.sleep(30)")  # the observer's "rank 0"
    failing = child("import os; os.abort()")
    failing.wait()
    if marked:
        (tmp_path / "rank1").touch()
    recorded = []  # the CLI's on_child_failure marks the MLflow runs FAILED before rank 0 is killed
    observer = _marker_aware_observer([failing], tmp_path, main_pid=stand_in.pid, sleep_period=0.1,
                                      on_child_failure=lambda: recorded.append(stand_in.poll()))
    observer.start()
    try:
        observer.join(timeout=5)
        assert not observer.is_alive()
        time.sleep(0.2)
        assert (stand_in.poll() is None) == marked, stand_in.poll()
        assert recorded == ([] if marked else [None])  # called while "rank 0" still ran
        # rank 0's `finally` will not run after the SIGKILL: the folder of markers goes before it (it was left in
        # the temporary directory, one per failed job)
        assert tmp_path.exists() == marked
    finally:
        stand_in.kill()
        stand_in.wait()


def test_child_rank_reports_puts_its_observer_in_the_launcher_and_takes_it_out_again():
    import lightning.pytorch.strategies.launchers.subprocess_script as launcher

    original = launcher._launch_process_observer
    with child_rank_reports() as folder:
        assert folder is not None and launcher._launch_process_observer is not original
    assert launcher._launch_process_observer is original
