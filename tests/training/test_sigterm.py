"""The SIGTERM watch before Lightning's handler (mmoe_rec/training/sigterm.py), in-process."""
from __future__ import annotations

import os
import signal

from mmoe_rec.training import sigterm


def test_a_process_forked_during_the_watch_starts_with_sigterms_default_and_the_parent_keeps_its_watch():
    """A `ddp_fork` rank inherited the parent's handler and wakeup fd: its SIGTERM (or its hand-over) reached the
    parent's watcher through the shared pipe, which then ended, leaving the parent ignoring SIGTERM for the fit."""
    with sigterm.watch(lambda: None):
        watch = sigterm._watch
        assert watch is not None and signal.getsignal(signal.SIGTERM) is sigterm._ignore
        pid = os.fork()
        if pid == 0:  # the child: SIGTERM's default action, no wakeup fd, no watch
            fd = signal.set_wakeup_fd(-1)
            ok = signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and fd == -1 and sigterm._watch is None
            sigterm.stop_watch()  # a rank reaching Lightning's handler: nothing of the parent's to stop
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert watch.thread.is_alive() and sigterm._watch is watch  # the parent's watch goes on
    assert sigterm._watch is None and not watch.thread.is_alive()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and signal.set_wakeup_fd(-1) == -1


def test_a_launched_rank_whose_launcher_is_already_gone_ends(tmp_path):
    """die_with_parent compares the parent with the launcher's pid (a rank 0 that is pid 1, as in a container,
    made every rank stop itself at start)."""
    import subprocess
    import sys

    code = ("import os, sys\nfrom mmoe_rec.training import sigterm\n"
            "sigterm.die_with_parent(int(sys.argv[1]))\nprint('alive')\n")
    alive = subprocess.run([sys.executable, "-c", code, str(os.getpid())], capture_output=True, text=True,
                           timeout=60)
    assert alive.returncode == 0 and alive.stdout.strip() == "alive"  # its parent is the launcher
    gone = subprocess.run([sys.executable, "-c", code, "999999999"], capture_output=True, text=True, timeout=60)
    assert gone.returncode == -signal.SIGTERM and "alive" not in gone.stdout


def test_a_stop_that_cannot_be_recorded_still_ends_the_process_with_143():
    """The watcher marked the run FAILED before exiting: a tracking store that did not answer (MLflow's HTTP timeout
    and retries: minutes) kept the process that was told to stop."""
    import subprocess
    import sys
    import time

    code = ("import os, signal, time\nfrom mmoe_rec.training import sigterm\n"
            "sigterm.RECORD_LIMIT_S = 1.0\n"
            "with sigterm.watch(lambda: time.sleep(600)):\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(600)\n")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 143, proc.stderr
    assert time.monotonic() - start < 60
    assert "the stop was not recorded within 1 s" in proc.stderr


WATCHED_JOB = ("import os, signal, sys, time\nfrom mmoe_rec.training import sigterm\n"
               "with sigterm.watch(lambda: print('on_sigterm ran', flush=True), job='mmoe-rec fit'):\n"
               "    sigterm._watch.lightning_handles = True  # as install()'s register_signal_handlers says\n"
               "    os.kill(os.getpid(), signal.SIGTERM)\n"
               "    time.sleep(float(sys.argv[1]))  # the main thread busy, as in a collective\n"
               "print('ended on its own', flush=True)\n")


def test_under_lightnings_handler_a_job_that_does_not_stop_is_ended_after_the_limit():
    """Lightning's handler runs only when the main thread is back in Python: rank 0 held in a collective by a stalled
    rank ran on for minutes after its SIGTERM, its run RUNNING and its ranks never told (a review). The watch stays
    armed under Lightning's handler and ends such a job after the limit."""
    import subprocess
    import sys
    import time

    env = {**os.environ, sigterm.STOP_LIMIT_ENV: "2"}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", WATCHED_JOB, "600"], capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 143, proc.stderr
    assert 2 <= time.monotonic() - start < 60
    assert "error: mmoe-rec fit did not stop within 2 s of a SIGTERM" in proc.stderr
    assert "on_sigterm ran" in proc.stdout and "ended on its own" not in proc.stdout


def test_under_lightnings_handler_a_job_that_stops_in_time_is_left_to_do_so():
    import subprocess
    import sys

    env = {**os.environ, sigterm.STOP_LIMIT_ENV: "30"}
    proc = subprocess.run([sys.executable, "-c", WATCHED_JOB, "0.5"], capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["ended on its own"] and "SIGTERM" not in proc.stderr


def test_the_watch_knows_when_lightnings_handler_is_in_place(tmp_path):
    """Lightning's handler composes the watch's (which does nothing) and its teardown puts the watch's back; a
    SIGTERM after that teardown (its hooks, the logger's finalize, rank 0 waiting for its ranks) had SIGTERM's
    default action: killed without a word, its run RUNNING."""
    import lightning as L

    sigterm.install()
    with sigterm.watch(lambda: None):
        watch = sigterm._watch
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, default_root_dir=tmp_path)
        trainer._signal_connector.register_signal_handlers()
        assert watch.lightning_handles and signal.getsignal(signal.SIGTERM) is not sigterm._ignore
        assert signal.set_wakeup_fd(watch.write_fd) == watch.write_fd  # the watcher still hears every SIGTERM
        trainer._signal_connector.teardown()
        assert not watch.lightning_handles and signal.getsignal(signal.SIGTERM) is sigterm._ignore
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and signal.set_wakeup_fd(-1) == -1


def test_a_bad_stop_limit_is_refused(monkeypatch):
    import pytest

    for bad in ("0", "-1", "soon", "nan", "inf", "1e300"):  # inf overflowed select's timeout: the watcher died
        monkeypatch.setenv(sigterm.STOP_LIMIT_ENV, bad)
        with pytest.raises(ValueError, match=sigterm.STOP_LIMIT_ENV):
            sigterm.stop_limit_s()
    monkeypatch.setenv(sigterm.STOP_LIMIT_ENV, "2.5")
    assert sigterm.stop_limit_s() == 2.5
