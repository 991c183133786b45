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


def _observe(procs, done_dir, stand_in, on_child_failure=None, wait_s=5.0):
    """The marker-aware observer over `procs`, with a sleeper standing in for rank 0; whether it was killed."""
    from mmoe_rec.training.child_ranks import _marker_aware_observer

    observer = _marker_aware_observer(procs, done_dir, main_pid=stand_in.pid, sleep_period=0.1,
                                      on_child_failure=on_child_failure)
    observer.start()
    observer.join(timeout=wait_s)
    time.sleep(0.2)
    return observer, stand_in.poll() is not None


def test_the_launchers_observer_names_the_first_rank_that_failed_and_ends_rank_0_even_if_recording_fails(
        tmp_path, capfd):
    stand_in = child("import time; time.sleep(30)")
    procs = [child("import os; os.abort()"), child("import sys; sys.exit(3)")]
    for p in procs:
        p.wait()

    def failing_record():
        raise ConnectionError("store down")

    try:
        _, killed = _observe(procs, tmp_path, stand_in, on_child_failure=failing_record)
        assert killed  # the MLflow store not answering does not keep a job with a dead rank running
        err = capfd.readouterr().err
        assert f"mmoe-rec: rank 1 (pid {procs[0].pid}) was killed by signal 6 before its work was done" in err
        assert "could not record the failure: store down" in err
    finally:
        stand_in.kill()
        stand_in.wait()


def test_the_launchers_observer_passes_over_a_rank_that_exited_0_and_watches_the_others(tmp_path, capfd):
    """A rank that ended well (exit 0, marker or not) is no failure; the observer goes on watching the ranks still
    running, and one that fails later still ends the job."""
    stand_in = child("import time; time.sleep(30)")
    ok = child("pass")
    ok.wait()
    try:
        observer, killed = _observe([ok], tmp_path, stand_in)
        assert not killed and not observer.is_alive()
        assert tmp_path.exists() and "before its work was done" not in capfd.readouterr().err  # no failure seen
        late = child("import os, time; time.sleep(1.0); os.abort()")
        observer, killed = _observe([ok, late], tmp_path, stand_in)
        assert killed
    finally:
        stand_in.kill()
        stand_in.wait()


def test_the_launchers_observer_spares_rank_0_after_a_sigterm_for_the_grace_only(tmp_path, monkeypatch):
    """Told to stop, the ranks exit 143 on their own while rank 0 writes its on-exception checkpoint: not killed
    then, but once the grace has run out (rank 0 held somewhere) the job is ended as for a failed rank."""
    failing = child("import sys; sys.exit(143)")
    failing.wait()
    stand_in = child("import time; time.sleep(30)")
    try:
        monkeypatch.setattr(child_ranks, "sigterm_received_at", lambda: time.monotonic())
        observer, killed = _observe([failing], tmp_path, stand_in, wait_s=1.0)
        assert not killed and observer.is_alive()  # still watching
        monkeypatch.setattr(child_ranks, "sigterm_received_at",
                            lambda: time.monotonic() - child_ranks.SIGTERM_GRACE_S - 1)
        observer.join(timeout=5)
        time.sleep(0.2)
        assert stand_in.poll() is not None
    finally:
        stand_in.kill()
        stand_in.wait()


def test_the_launcher_passes_its_pid_and_its_recorder_to_what_it_launches(monkeypatch):
    """Launched ranks read the launcher's pid (die_with_parent, the SIGTERM watch); the observer the launcher starts
    records the failure (on_child_failure) before it ends rank 0 (here a stand-in process that plays rank 0)."""
    monkeypatch.delenv(DONE_DIR_ENV, raising=False)
    with child_rank_reports():
        assert os.environ[child_ranks.LAUNCHER_PID_ENV] == str(os.getpid())
    assert child_ranks.LAUNCHER_PID_ENV not in os.environ
    code = ("import os, subprocess, sys, time\n"
            "import lightning.pytorch.strategies.launchers.subprocess_script as launcher\n"
            "from mmoe_rec.training.child_ranks import child_rank_reports\n"
            "with child_rank_reports(on_child_failure=lambda: print('recorded', flush=True)):\n"
            "    rank = subprocess.Popen([sys.executable, '-c', 'import os; os.abort()'])\n"
            "    rank.wait()\n"
            "    launcher._launch_process_observer([rank])\n"
            "    time.sleep(30)\n"
            "print('ran on', flush=True)\n")
    env = {k: v for k, v in os.environ.items() if k not in (DONE_DIR_ENV, child_ranks.LAUNCHER_PID_ENV)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == -9 and proc.stdout == "recorded\n", (proc.returncode, proc.stdout, proc.stderr)


def test_rank_0_failing_waits_for_all_its_ranks_together():
    procs = [child("import time; time.sleep(30)"), child("import time; time.sleep(30)")]
    try:
        start = time.monotonic()
        assert name_failed_child_ranks(trainer_with(procs), wait_s=2.0) == []
        assert time.monotonic() - start < 3.5
        start = time.monotonic()
        with pytest.raises(ChildRankFailed, match="rank 2 .* had not exited 2 s after rank 0 finished"):
            join_child_ranks(trainer_with(procs), timeout_s=2.0)
        assert time.monotonic() - start < 3.5
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_a_rank_whose_marker_folder_is_gone_marks_nothing_and_spawned_ranks_are_not_waited_for(tmp_path, monkeypatch):
    """The observer removes the folder before it ends rank 0; multiprocessing ranks (ddp_spawn) have no wait()."""
    monkeypatch.setenv(DONE_DIR_ENV, str(tmp_path / "gone"))
    mark_rank_done(SimpleNamespace(local_rank=1))
    assert not (tmp_path / "gone").exists()
    spawned = SimpleNamespace(exitcode=None, join=lambda timeout=None: None)
    join_child_ranks(trainer_with([spawned]))
    assert name_failed_child_ranks(trainer_with([spawned])) == []
