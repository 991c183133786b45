"""The SIGTERM watch before Lightning's handler (mmoe_rec/training/sigterm.py), in-process."""
from __future__ import annotations

import os
import re
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


class _Launcher:
    def __init__(self) -> None:
        self.killed: list[int] = []

    def kill(self, signum: int) -> None:
        self.killed.append(signum)


def _connector(launcher):
    from types import SimpleNamespace

    return SimpleNamespace(received_sigterm=False,
                           trainer=SimpleNamespace(global_rank=0, strategy=SimpleNamespace(launcher=launcher)))


def test_the_notifier_forwards_a_sigterm_to_the_launched_ranks_once_and_notes_when_the_first_came(monkeypatch):
    """Lightning's handler without its broadcast: the ranks it launched are told once (a second SIGTERM is not
    forwarded again), and the time of the first SIGTERM stays what the launcher's observer measures its grace from."""
    monkeypatch.setattr(sigterm, "_received_at", None)
    launcher = _Launcher()
    first = _connector(launcher)
    sigterm._notifier(first, signal.SIGTERM, None)
    at = sigterm.sigterm_received_at()
    assert first.received_sigterm and launcher.killed == [signal.SIGTERM] and at is not None
    sigterm._notifier(first, signal.SIGTERM, None)
    assert launcher.killed == [signal.SIGTERM] and first.received_sigterm
    other = _connector(_Launcher())  # a later trainer of this process (fit, then test)
    sigterm._notifier(other, signal.SIGTERM, None)
    assert sigterm.sigterm_received_at() == at
    alone = _connector(None)  # no launcher (one process, ddp_spawn): nothing to forward to
    sigterm._notifier(alone, signal.SIGTERM, None)
    assert alone.received_sigterm


def test_install_puts_the_notifier_without_a_broadcast_in_lightnings_handler(monkeypatch, tmp_path):
    import lightning as L

    monkeypatch.setattr(sigterm, "_received_at", None)
    sigterm.install()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, default_root_dir=tmp_path)
    trainer._signal_connector._sigterm_notifier_fn(signal.SIGTERM, None)
    assert trainer._signal_connector.received_sigterm and sigterm.sigterm_received_at() is not None


def test_a_sigint_under_the_watch_is_ctrl_c_not_a_sigterm():
    """Python's SIGINT handler writes to the same wakeup fd: the watcher passes over any signal but SIGTERM."""
    import subprocess
    import sys

    code = ("import os, signal, time\nfrom mmoe_rec.training import sigterm\n"
            "with sigterm.watch(lambda: print('on_sigterm ran', flush=True)):\n"
            "    try:\n"
            "        os.kill(os.getpid(), signal.SIGINT)\n"
            "        time.sleep(5)\n"
            "    except KeyboardInterrupt:\n"
            "        time.sleep(1.0)  # time for a watcher that took it for a SIGTERM to end the process\n"
            "        print('interrupted', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (0, "interrupted\n"), proc.stderr
    assert "SIGTERM" not in proc.stderr


def test_under_lightnings_handler_a_launched_rank_whose_launcher_is_gone_does_not_defer():
    watch = sigterm._Watch(lambda: None, "mmoe-rec fit", launcher_pid=os.getppid())
    try:
        watch.lightning_handles = True
        assert watch._defers()
        watch.launcher_pid = 999_999_999  # rank 0 ended the job: this rank is now another's child
        assert not watch._defers()
        watch.launcher_pid = None  # rank 0 itself
        assert watch._defers()
        watch.lightning_handles = False
        assert not watch._defers()
    finally:
        os.close(watch.read_fd)
        os.close(watch.write_fd)


def test_a_second_sigterm_after_lightnings_teardown_ends_the_job_at_once():
    """A SIGTERM left to Lightning's handler, then the handler torn down (rank 0 waiting for its ranks, the logger's
    finalize): a second SIGTERM is not left to a handler that is gone for the rest of the limit."""
    import subprocess
    import sys
    import time

    code = ("import os, signal, time\nfrom mmoe_rec.training import sigterm\n"
            "with sigterm.watch(lambda: print('on_sigterm ran', flush=True), job='mmoe-rec fit'):\n"
            "    sigterm._watch.lightning_handles = True\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(0.5)\n"
            "    sigterm._watch.lightning_handles = False  # as install()'s teardown says\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(600)\n")
    env = {**os.environ, sigterm.STOP_LIMIT_ENV: "20"}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 143, proc.stderr
    assert time.monotonic() - start < 15
    assert "error: mmoe-rec fit stopped by SIGTERM before it finished" in proc.stderr
    assert "did not stop within" not in proc.stderr and "on_sigterm ran" in proc.stdout


def test_the_stop_limit_defaults_to_the_observers_grace_and_takes_a_whole_day(monkeypatch):
    monkeypatch.delenv(sigterm.STOP_LIMIT_ENV, raising=False)
    assert sigterm.stop_limit_s() == sigterm.SIGTERM_GRACE_S  # rank 0 is spared as long as the job may take
    monkeypatch.setenv(sigterm.STOP_LIMIT_ENV, "86400")
    assert sigterm.stop_limit_s() == 86_400.0


def test_a_host_programs_sigterm_handling_is_left_alone():
    """Its own handler, its own wakeup fd, or a watch started from another thread: no watch, nothing replaced."""
    import threading

    def host(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, host)
    try:
        with sigterm.watch(lambda: None):
            assert sigterm._watch is None and signal.getsignal(signal.SIGTERM) is host
        assert signal.getsignal(signal.SIGTERM) is host
    finally:
        signal.signal(signal.SIGTERM, previous)
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd)
    try:
        with sigterm.watch(lambda: None):
            assert sigterm._watch is None and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        assert signal.set_wakeup_fd(write_fd) == write_fd
    finally:
        signal.set_wakeup_fd(-1)
        os.close(read_fd)
        os.close(write_fd)
    seen = []

    def in_thread():
        try:
            with sigterm.watch(lambda: None):
                seen.append(sigterm._watch)
        except Exception as e:  # noqa: BLE001
            seen.append(e)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert seen == [None]


def test_a_launched_rank_ends_when_its_launcher_dies():
    """PR_SET_PDEATHSIG: a rank whose rank 0 was killed (in the rendezvous) waited there, orphaned, 30 minutes."""
    import subprocess
    import sys

    rank = ("import os, sys, time\nfrom mmoe_rec.training import sigterm\n"
            "sigterm.die_with_parent(os.getppid())\nprint('ready', flush=True)\ntime.sleep(60)\n")
    launcher = ("import subprocess, sys\n"
                f"p = subprocess.Popen([sys.executable, '-c', {rank!r}], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)\n"
                "assert p.stdout.readline() == 'ready\\n'\nprint(p.pid, flush=True)\n"
                "import os; os._exit(0)\n")
    out = subprocess.run([sys.executable, "-c", launcher], capture_output=True, text=True, timeout=60)
    pid = int(out.stdout)
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":  # dead, not yet reaped by its new parent
                    break
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        raise AssertionError("the rank outlived its launcher")


def test_a_process_that_was_not_launched_does_not_stop_itself():
    import subprocess
    import sys

    code = "from mmoe_rec.training import sigterm\nsigterm.die_with_parent(None)\nprint('alive')\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "alive"


def test_a_rank_ended_by_its_launchers_death_says_so_not_that_it_was_stopped_by_sigterm(tmp_path):
    """Linux's SIGTERM to an orphaned rank (die_with_parent): it said "stopped by SIGTERM", as if someone had sent
    one, beside rank 0's own error (a full disk, a SIGKILL; review 2026-12-07)."""
    import subprocess
    import sys
    import time

    err = tmp_path / "rank1.err"
    rank = ("import os, time\nfrom mmoe_rec.training import sigterm\nparent = os.getppid()\n"
            "with sigterm.watch(lambda: None, job='mmoe-rec fit', launcher_pid=parent):\n"
            "    sigterm.die_with_parent(parent)\n    print('ready', flush=True)\n    time.sleep(30)\n")
    launcher = ("import subprocess, sys\n"
                f"p = subprocess.Popen([sys.executable, '-c', {rank!r}], stdout=subprocess.PIPE, "
                f"stderr=open({str(err)!r}, 'w'), text=True)\n"
                "assert p.stdout.readline() == 'ready\\n'\nprint(p.pid, flush=True)\nimport os; os._exit(0)\n")
    out = subprocess.run([sys.executable, "-c", launcher], capture_output=True, text=True, timeout=60)
    pid = int(out.stdout)
    deadline = time.monotonic() + 20
    while "rank ends" not in err.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    text = err.read_text()
    if "rank ends" not in text:
        os.kill(pid, signal.SIGKILL)
    assert re.search(r"error: mmoe-rec fit: this rank ends, as rank 0 \(pid \d+\), which launched it, has ended",
                     text), text
    assert "stopped by SIGTERM" not in text
