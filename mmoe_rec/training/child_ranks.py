"""Rank 0's end of a multi-process job: `join_child_ranks(trainer)` waits for the ranks Lightning launched.

Lightning's subprocess launcher (`--trainer.strategy ddp` on one machine) starts ranks 1..n-1 as child processes
of rank 0 and never waits for them: a rank that fails after rank 0's last collective (in `on_fit_end`, a
callback's teardown, at exit) printed its traceback while rank 0 returned 0 and its MLflow run ended FINISHED.
Lightning's observer thread kills rank 0 with SIGKILL when it sees a failed child, but it only looks every few
seconds, so it misses children that fail as rank 0 finishes, and it would kill rank 0 while rank 0 waits here:
it is switched off first, and this wait reports a failed or hung child as the job's error instead.
"""
from __future__ import annotations

import signal
import subprocess
import threading
import time
from typing import Any

CHILD_EXIT_TIMEOUT_S = 120.0  # after rank 0 finished: a child only tears down (seconds, even on a loaded machine)


class ChildRankFailed(RuntimeError):
    """A rank other than 0 failed or hung after rank 0 finished its part of the job."""


def _child_processes(trainer: Any) -> list[subprocess.Popen]:
    launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
    return list(getattr(launcher, "procs", None) or [])


def _stop_lightning_observers() -> None:
    """Lightning's child-process observer (a daemon thread) calls `_run()` after each sleep; from now on that
    reports 'all done' without looking, so it neither kills rank 0 nor the children this wait is reading."""
    try:
        from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
    except ImportError:  # another Lightning layout: nothing of its kind to stop
        return
    for thread in threading.enumerate():
        if isinstance(thread, _ChildProcessObserver):
            thread._run = lambda: True  # type: ignore[method-assign]


def join_child_ranks(trainer: Any, timeout_s: float = CHILD_EXIT_TIMEOUT_S) -> None:
    """Waits for every child rank of this process (none outside rank 0 of a subprocess-launched job); raises
    ChildRankFailed naming each that exited non-zero, or that had not exited after `timeout_s` (then killed)."""
    procs = _child_processes(trainer)
    if not procs:
        return
    _stop_lightning_observers()
    problems = []
    deadline = time.monotonic() + timeout_s
    for rank, proc in enumerate(procs, start=1):  # the launcher starts local ranks 1.. in this order
        try:
            code = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            problems.append(f"rank {rank} (pid {proc.pid}) had not exited {timeout_s:.0f} s after rank 0 finished "
                            "and was killed")
            continue
        if code != 0:
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            problems.append(f"rank {rank} (pid {proc.pid}) {how}")
    if problems:
        raise ChildRankFailed("; ".join(problems) + " after rank 0 finished: the job failed (that rank's own "
                              "output, above, says why)")
