"""Rank 0's end of a multi-process job: it waits for the ranks Lightning launched and fails when one failed.

Lightning's subprocess launcher (`--trainer.strategy ddp` on one machine) starts ranks 1..n-1 as child processes
of rank 0 and never waits for them: a rank that failed after rank 0's last collective (in `on_fit_end`, a
callback's teardown) printed its traceback while rank 0 returned 0 and its MLflow run ended FINISHED. Lightning's
observer thread kills rank 0 with SIGKILL when it sees a failed child, but it looks only every few seconds, so it
misses children that fail as rank 0 finishes, and it would kill rank 0 while rank 0 waits here: it is switched
off first, and the wait reports a failed or hung child as the job's error instead.

A child that finished its subcommand says so with a marker file (`mark_rank_done`) in a folder rank 0 makes
(`child_rank_reports`) and passes on in the environment the launcher copies. Exiting non-zero after that is the
gloo exit race (gloo_exit.py: SIGABRT at interpreter exit, work done): a warning, not a failed job.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

DONE_DIR_ENV = "MMOE_REC_RANKS_DONE_DIR"
CHILD_EXIT_TIMEOUT_S = 120.0  # after rank 0 finished: a child only tears down (seconds, even on a loaded machine)


class ChildRankFailed(RuntimeError):
    """A rank other than 0 failed or hung after rank 0 finished its part of the job."""


@contextmanager
def child_rank_reports() -> Iterator[Optional[Path]]:
    """On the process that may launch ranks (no folder in the environment yet): a fresh folder for their done
    markers, in the environment while the block runs (the launcher copies it into each child's), removed after."""
    if os.environ.get(DONE_DIR_ENV):  # a launched rank: the folder is its launcher's
        yield None
        return
    folder = Path(tempfile.mkdtemp(prefix="mmoe-rec-ranks-"))
    os.environ[DONE_DIR_ENV] = str(folder)
    try:
        yield folder
    finally:
        os.environ.pop(DONE_DIR_ENV, None)
        shutil.rmtree(folder, ignore_errors=True)


def mark_rank_done(trainer: Any) -> None:
    """A launched rank's subcommand returned: leaves `rank<local rank>` in its launcher's folder."""
    folder, local_rank = os.environ.get(DONE_DIR_ENV), getattr(trainer, "local_rank", 0)
    if folder and local_rank and os.path.isdir(folder):
        (Path(folder) / f"rank{local_rank}").touch()


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


def join_child_ranks(trainer: Any, done_dir: Optional[Path] = None, timeout_s: float = CHILD_EXIT_TIMEOUT_S) -> None:
    """Waits for every child rank of this process (none outside rank 0 of a subprocess-launched job); raises
    ChildRankFailed naming each that exited non-zero, or that had not exited after `timeout_s` (then killed),
    without having marked its work done in `done_dir`; warns about those that had."""
    procs = _child_processes(trainer)
    if not procs:
        return
    _stop_lightning_observers()
    failed, after_done = [], []
    deadline = time.monotonic() + timeout_s
    for rank, proc in enumerate(procs, start=1):  # the launcher starts local ranks 1.. in this order
        try:
            code = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            how = "" if code == 0 else (f"was killed by signal {-code}" if code < 0 else f"exited with code {code}")
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            how = f"had not exited {timeout_s:.0f} s after rank 0 finished and was killed"
        if how:
            done = done_dir is not None and (done_dir / f"rank{rank}").exists()
            (after_done if done else failed).append(f"rank {rank} (pid {proc.pid}) {how}")
    if after_done:
        warnings.warn("; ".join(after_done) + " after finishing its work (the gloo exit race, README 'Scaling "
                      "out'): the job's results are complete", RuntimeWarning, stacklevel=2)
    if failed:
        raise ChildRankFailed("; ".join(failed) + " after rank 0 finished, before its own work was done: the job "
                              "failed (that rank's own output, above, says why)")
