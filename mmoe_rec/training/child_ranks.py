"""Rank 0's end of a multi-process job: it waits for the ranks Lightning launched and fails when one failed.

Lightning's subprocess launcher (`--trainer.strategy ddp` on one machine) starts ranks 1..n-1 as child processes
of rank 0 and never waits for them: a rank that failed after rank 0's last collective (in `on_fit_end`, a
callback's teardown) printed its traceback while rank 0 returned 0 and its MLflow run ended FINISHED.

A child that finished its subcommand says so with a marker file (`mark_rank_done`) in a folder rank 0 makes
(`child_rank_reports`) and passes on in the environment the launcher copies. Exiting non-zero after that is the
gloo exit race (gloo_exit.py: SIGABRT at interpreter exit, work done): a warning, not a failed job.

Lightning watches the children with an observer thread that SIGKILLs rank 0 (and the other children) as soon as it
sees one exit non-zero: right for a child that died mid-training (rank 0 could hang in a collective), wrong for one
that exited after its work (rank 0 still finishing its MLflow run was killed, the run left RUNNING). While
`child_rank_reports` is open, the launcher starts `MarkerAwareObserver` instead, which passes over a child that
marked its work done, and for one that failed during the work names it and lets rank 0 mark its MLflow run FAILED
(`on_child_failure`) before the SIGKILL; `join_child_ranks` switches any observer off before it waits.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from mmoe_rec.training.sigterm import SIGTERM_GRACE_S, sigterm_received_at

DONE_DIR_ENV = "MMOE_REC_RANKS_DONE_DIR"
LAUNCHER_PID_ENV = "MMOE_REC_RANKS_LAUNCHER_PID"  # the pid of the rank that launched the others (die_with_parent)
CHILD_EXIT_TIMEOUT_S = 120.0  # after rank 0 finished: a child only tears down (seconds, even on a loaded machine)
CHILD_FAILURE_WAIT_S = 2.0  # rank 0 failed: how long the ranks it launched get to show that one failed first


class ChildRankFailed(RuntimeError):
    """A rank other than 0 failed or hung after rank 0 finished its part of the job."""


def _observer_base() -> Any:
    try:
        from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
    except ImportError:  # another Lightning layout
        return None
    return _ChildProcessObserver


def _marker_aware_observer(procs: list[subprocess.Popen], done_dir: Path, main_pid: Optional[int] = None,
                           sleep_period: float = 5, on_child_failure: Optional[Callable[[], None]] = None) -> Any:
    """Lightning's observer (a daemon thread polling the children every few seconds), except that a child that
    exited non-zero after marking its work done is left to `join_child_ranks` instead of ending rank 0. Before it
    ends rank 0 for a child that failed during the work, it says which and calls `on_child_failure` (rank 0's
    last chance to record the failure: the MLflow run, left RUNNING by a SIGKILL)."""
    base = _observer_base()

    class MarkerAwareObserver(base):
        def _run(self) -> bool:
            for proc in self._child_processes:
                proc.poll()
            codes = [proc.returncode for proc in self._child_processes]
            unmarked = [(rank, proc) for rank, proc in enumerate(self._child_processes, start=1)
                        if proc.returncode and not marked_done(done_dir, rank)]  # marker written before exit
            received = sigterm_received_at()
            if unmarked and received is not None and time.monotonic() - received < SIGTERM_GRACE_S:
                return False  # told to stop: every rank exits on its own, rank 0 after its on-exception work
            if unmarked:
                rank, proc = unmarked[0]
                print(f"mmoe-rec: rank {rank} (pid {proc.pid}) {_exit_text(proc.returncode)} before its work was "
                      "done (its own output, above, says why); ending every rank, rank 0 included (one waiting for "
                      "it in a collective would hang)", file=sys.stderr, flush=True)
                if on_child_failure is not None:
                    try:
                        on_child_failure()
                    except Exception as e:  # noqa: BLE001 - ending the ranks matters more
                        print(f"mmoe-rec: could not record the failure: {e}", file=sys.stderr, flush=True)
                shutil.rmtree(done_dir, ignore_errors=True)  # rank 0's own cleanup will not run after the SIGKILL
                return base._run(self)  # Lightning's own: ends the other children and rank 0
            return all(code is not None for code in codes)  # all exited (failed ones after their work): done

    return MarkerAwareObserver(main_pid=os.getpid() if main_pid is None else main_pid, child_processes=procs,
                               sleep_period=sleep_period)


def _exit_text(code: int) -> str:
    return f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"


def launcher_ended(pid: int, wait_s: float = CHILD_FAILURE_WAIT_S) -> bool:
    """In a launched rank: whether its launcher (`pid`, rank 0) has ended, waiting up to `wait_s` for it. A rank 0
    killed by a signal closes its sockets before it ends (its ranks' collectives fail first), and Linux reparents
    its ranks and sends their death signal only at its very end: a rank that failed in a collective as rank 0 was
    being killed saw its launcher still its parent."""
    deadline = time.monotonic() + wait_s
    while True:
        if os.getppid() != pid:  # reparented: its parent ended
            return True
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):  # dead, not yet reaped
                    return True
        except (OSError, IndexError):  # no /proc (then the parent check above is all there is)
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


@contextmanager
def child_rank_reports(on_child_failure: Optional[Callable[[], None]] = None) -> Iterator[Optional[Path]]:
    """On the process that may launch ranks (no folder in the environment yet): a fresh folder for their done
    markers, in the environment while the block runs (the launcher copies it into each child's), and the
    launcher's observer made `MarkerAwareObserver` (calling `on_child_failure` before it ends rank 0); all undone
    after."""
    if os.environ.get(DONE_DIR_ENV):  # a launched rank: the folder is its launcher's
        yield None
        return
    folder = Path(tempfile.mkdtemp(prefix="mmoe-rec-ranks-"))
    os.environ[DONE_DIR_ENV] = str(folder)
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
    launcher_module, original = None, None
    if _observer_base() is not None:
        try:
            import lightning.pytorch.strategies.launchers.subprocess_script as launcher_module
        except ImportError:
            launcher_module = None
        original = getattr(launcher_module, "_launch_process_observer", None)
        if original is not None:
            launcher_module._launch_process_observer = lambda procs: _marker_aware_observer(
                procs, folder, on_child_failure=on_child_failure).start()
    try:
        yield folder
    finally:
        if original is not None:
            launcher_module._launch_process_observer = original
        os.environ.pop(DONE_DIR_ENV, None)
        os.environ.pop(LAUNCHER_PID_ENV, None)
        shutil.rmtree(folder, ignore_errors=True)


def name_failed_child_ranks(trainer: Any, done_dir: Optional[Path] = None,
                            wait_s: float = CHILD_FAILURE_WAIT_S) -> list[str]:
    """Rank 0's part of the job failed: says which ranks it launched had already exited non-zero before their work
    was done (returned too, for tests). A rank killed by a signal (the kernel's out-of-memory killer sends SIGKILL)
    prints nothing, and rank 0's error is then gloo's "Connection reset by peer", which names no rank. A peer's
    sockets close as it dies, a moment before its exit can be read: the ranks get `wait_s` together to show theirs
    (one still waiting in a collective for rank 0 has not failed: left to end with rank 0). A rank that marked its
    work done in `done_dir` is passed over (an exit after the work, as in the gloo exit race, is join_child_ranks'
    warning, not a failure); so is every rank after a SIGTERM, which every rank obeys on its own. Whether rank 0
    failed because of it is not known here (every rank may hit the same bug): said as a possibility."""
    procs = _child_processes(trainer)
    if not procs or sigterm_received_at() is not None:
        return []
    named = []
    deadline = time.monotonic() + wait_s
    for rank, proc in enumerate(procs, start=1):
        try:
            code = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            continue
        if code and not marked_done(done_dir, rank):
            hint = " (SIGKILL: the kernel's out-of-memory killer sends it too)" if code == -signal.SIGKILL else ""
            named.append(f"rank {rank} (pid {proc.pid}) {_exit_text(code)}{hint}")
    if named:
        print(f"mmoe-rec: {'; '.join(named)} before its work was done, while rank 0 was working: rank 0's error "
              "below may follow from it (a rank that dies fails the others' collectives)", file=sys.stderr, flush=True)
    return named


def marked_done(done_dir: Optional[Path], rank: int) -> bool:
    """Whether local rank `rank` left its done marker (mark_rank_done) in `done_dir` (None: no folder, no marker)."""
    return done_dir is not None and (done_dir / f"rank{rank}").exists()


def mark_rank_done(trainer: Any) -> None:
    """A launched rank's subcommand returned: leaves `rank<local rank>` in its launcher's folder."""
    folder, local_rank = os.environ.get(DONE_DIR_ENV), getattr(trainer, "local_rank", 0)
    if folder and local_rank and os.path.isdir(folder):
        (Path(folder) / f"rank{local_rank}").touch()


def _child_processes(trainer: Any) -> list[subprocess.Popen]:
    """The ranks the subprocess launcher started (ddp); ddp_spawn / ddp_fork's launcher joins its own processes
    (multiprocessing ones, which have no wait(): a ddp_fork fit failed at its end)."""
    launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
    return [p for p in getattr(launcher, "procs", None) or [] if isinstance(p, subprocess.Popen)]


def _stop_lightning_observers() -> None:
    """Lightning's child-process observer (a daemon thread; ours is one too) calls `_run()` after each sleep; from
    now on that reports 'all done' without looking, so it neither kills rank 0 nor the children this wait reads."""
    base = _observer_base()
    if base is None:  # nothing of its kind to stop
        return
    for thread in threading.enumerate():
        if isinstance(thread, base):
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
            how = "" if code == 0 else _exit_text(code)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            how = f"had not exited {timeout_s:.0f} s after rank 0 finished and was killed"
        if how:
            done = marked_done(done_dir, rank)
            (after_done if done else failed).append(f"rank {rank} (pid {proc.pid}) {how}")
    if after_done:
        warnings.warn("; ".join(after_done) + " after finishing its work (the gloo exit race, README 'Scaling "
                      "out'): the job's results are complete", RuntimeWarning, stacklevel=2)
    if failed:
        raise ChildRankFailed("; ".join(failed) + " after rank 0 finished, before its own work was done: the job "
                              "failed (that rank's own output, above, says why)")
