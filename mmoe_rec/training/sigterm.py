"""A SIGTERM (`kill`, `timeout`, a scheduler's cancel) under DDP: every rank stops at the same batch.

Lightning's SIGTERM handler (lightning 2.6, `_SignalConnector._sigterm_notifier_fn`) forwards the signal to the
ranks its launcher started and then runs a `dist.broadcast` inside the handler, at whatever point of its collectives
each rank happens to be: rank 1 aborted on a gloo "collective mismatch" and rank 0 failed with "Connection reset by
peer", exit 1, without a word about the SIGTERM. The handler installed here does the rest of Lightning's work
(`_notifier`) and, under a multi-rank fit, validate or test, leaves the SIGTERM pending: Lightning's loops check
each rank's own flag at each batch's end, so a rank signalled alone, or after its gradient all-reduce while another
was already in the next step (a process-group kill, as `scancel` sends), stopped while the others waited in the next
collective (exit 1, gloo's "Connection closed by peer"). The ranks agree on a pending SIGTERM (an all-reduce of
their flags, max) where all of them stand at the same point: each training batch's start (in place of Lightning's
broadcast of rank 0's flag), each validation batch's start and an epoch's end; then every rank raises Lightning's
SIGTERMException together (validate and test: at each batch's start; a rank signalled alone stopped alone there
too, and the launcher's observer SIGKILLed rank 0, exit -9). A predict's ranks run different numbers of batches (no
common point): a launched rank passes its SIGTERM on to rank 0, which forwards it to every rank (`_tell_launcher`).
A ddp_spawn / ddp_fork rank so stopped exits 143, which its launcher reports as the stop (`stopped_by_sigterm`).

`sigterm_received_at()` tells the launcher's observer (child_ranks) when rank 0 was told to stop: the other ranks
then exit non-zero before their work is done, and rank 0, still writing its on-exception checkpoint or ending its
MLflow run, is spared for `SIGTERM_GRACE_S` instead of being SIGKILLed at once.
"""
from __future__ import annotations

import functools
import logging
import os
import select
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

from mmoe_rec.exit_now import exit_now

SIGTERM_GRACE_S = 120.0  # after a SIGTERM, rank 0 finishes its on-exception work (a checkpoint, the MLflow run)

_log = logging.getLogger(__name__)
_received_at: Optional[float] = None


def sigterm_received_at() -> Optional[float]:
    """time.monotonic() of this process's first SIGTERM under a Lightning run (or of the ranks' agreement on another
    rank's), or None."""
    return _received_at


def _notifier(self: Any, signum: int, frame: Any) -> None:
    """Lightning's `_sigterm_notifier_fn` without its broadcast: note it, forward it to the launched ranks (or, from
    a launched rank of a predict, to rank 0) once; under a multi-rank fit, validate or test, leave it pending for the
    ranks to agree on (`_agree`)."""
    global _received_at, _pending
    _log.info("rank %s received SIGTERM (%s)", getattr(self.trainer, "global_rank", "?"), signum)
    if not self.received_sigterm and not _pending:
        if _received_at is None:
            _received_at = time.monotonic()
        launcher = self.trainer.strategy.launcher
        if launcher is not None:
            if getattr(launcher, "procs", None) and not _ranks_agree(self.trainer):
                _forwarded_marker(create=True)  # the ranks told by rank 0 do not pass it back (`_tell_launcher`)
            launcher.kill(signum)
        _tell_launcher(self.trainer, signum)
    if _ranks_agree(self.trainer):
        _pending = True
    else:
        self.received_sigterm = True


_pending = False  # a SIGTERM under a multi-rank fit / validate / test that the ranks have not agreed on yet


def _ranks_agree(trainer: Any) -> bool:
    """Whether a SIGTERM is for the ranks to agree on: a fit, validate or test of more than one rank (every rank runs
    as many batches), its process group made."""
    import torch.distributed as dist
    from lightning.pytorch.trainer.states import TrainerFn

    return (getattr(trainer, "world_size", 1) > 1
            and trainer.state.fn in (TrainerFn.FITTING, TrainerFn.VALIDATING, TrainerFn.TESTING)
            and dist.is_available() and dist.is_initialized())


def _tell_launcher(trainer: Any, signum: int) -> None:
    """A launched rank of a multi-rank job its ranks cannot agree on (predict: each rank runs its own number of
    batches) passes its SIGTERM on to rank 0, its launcher, which forwards it to every rank: each stops at its own
    next batch (a rank stopped alone left rank 0 to fail in the writer's collective, exit 1, or to be SIGKILLed by
    the launcher's observer). Rank 0 told last fails in that collective: `stopped_by_sigterm_in_predict`."""
    launcher_pid = _watch.launcher_pid if _watch is not None else None
    if getattr(trainer, "world_size", 1) > 1 and not _ranks_agree(trainer) and launcher_pid is not None \
            and os.getppid() == launcher_pid and not _forwarded_marker():
        os.kill(launcher_pid, signum)


def _forwarded_marker(create: bool = False) -> bool:
    """Whether rank 0 has forwarded a SIGTERM to the ranks it launched (a file in their done-marker folder, made
    first with `create`): passed back, it came to rank 0 after its teardown and was taken as a second SIGTERM."""
    from mmoe_rec.training.child_ranks import DONE_DIR_ENV  # it imports this module

    folder = os.environ.get(DONE_DIR_ENV)
    if not folder or not os.path.isdir(folder):
        return False
    path = os.path.join(folder, "sigterm-forwarded")
    if create:
        open(path, "a").close()
    return os.path.exists(path)


def _agree(trainer: Any) -> bool:
    """Whether any rank has a SIGTERM pending (a collective: every rank calls it at the same point); if so, every
    rank's Lightning flag is set. A collective that fails (a rank died) leaves this rank's own flag to decide: the
    next collective reports the death."""
    import torch
    import torch.distributed as dist

    global _pending, _received_at
    if not _ranks_agree(trainer):
        return bool(trainer.received_sigterm)
    mine = 1 if (_pending or trainer.received_sigterm) else 0
    try:
        flag = torch.tensor([mine], device=trainer.strategy.root_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop = bool(flag.item())
    except Exception:  # noqa: BLE001 - see the docstring
        stop = bool(mine)
    if stop:
        _pending = False
        if _received_at is None:  # a rank told by the agreement alone: the launcher's observer spares it too
            _received_at = time.monotonic()
        trainer._signal_connector.received_sigterm = True
    return stop


def _stop_at_batch_start(self: Any) -> None:
    """In place of `_TrainingEpochLoop._broadcast_sigterm_tensor` (which broadcast rank 0's flag alone): every
    rank raises SIGTERMException at this batch's start if any rank has a SIGTERM pending."""
    import torch.distributed as dist
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    if _agree(self.trainer):
        try:
            dist.barrier()  # as Lightning does: every rank has agreed before any leaves
        except Exception:  # noqa: BLE001
            pass
        raise SIGTERMException()


def _agreeing_first(original: Callable[..., Any]) -> Callable[..., Any]:
    """`original` (a loop's hook that every rank runs at the same point) after the ranks agree on a pending SIGTERM:
    Lightning's own check of its flag, then, stops every rank (at an epoch's end, or a validation batch's end)."""
    if getattr(original, "_agrees_first", False):
        return original

    def hook(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _ranks_agree(self.trainer):
            _agree(self.trainer)
        return original(self, *args, **kwargs)

    hook._agrees_first = True  # type: ignore[attr-defined]
    return hook


def install() -> None:
    """Put `_notifier` in place of Lightning's, and tell the watch (below) when Lightning's handler is in place
    (before a Trainer registers its handlers; idempotent)."""
    try:
        from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector
    except ImportError:  # another Lightning layout: its own handler stays
        return
    if hasattr(_SignalConnector, "_sigterm_notifier_fn"):
        _SignalConnector._sigterm_notifier_fn = _notifier
        _agree_at_common_points()
        _spawned_ranks_exit_143()
    original = _SignalConnector.register_signal_handlers
    if not getattr(original, "_tells_the_watch", False):
        def register_signal_handlers(self: Any) -> None:
            original(self)  # Lightning's handler calls the watch's (`_ignore`, which does nothing) after its own
            if _watch is not None:
                _watch.lightning_handles = True

        register_signal_handlers._tells_the_watch = True  # type: ignore[attr-defined]
        _SignalConnector.register_signal_handlers = register_signal_handlers
    original_teardown = _SignalConnector.teardown
    if not getattr(original_teardown, "_tells_the_watch", False):
        def teardown(self: Any) -> None:
            global _pending
            _pending = False  # a SIGTERM after the ranks' last agreement: the job has ended anyway
            original_teardown(self)  # the handlers it replaced back: the watch's
            if _watch is not None:
                _watch.lightning_handles = False

        teardown._tells_the_watch = True  # type: ignore[attr-defined]
        _SignalConnector.teardown = teardown


def _agree_at_common_points() -> None:
    """The ranks agree on a pending SIGTERM at each training and validation (test) batch's start and at an epoch's
    end."""
    from lightning.pytorch.loops.evaluation_loop import _EvaluationLoop
    from lightning.pytorch.loops.fit_loop import _FitLoop
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

    if hasattr(_TrainingEpochLoop, "_broadcast_sigterm_tensor"):
        _TrainingEpochLoop._broadcast_sigterm_tensor = _stop_at_batch_start
    _FitLoop.on_advance_end = _agreeing_first(_FitLoop.on_advance_end)
    # at each validation batch's start: Lightning stops a validation at a batch's end where its flag is set (every
    # rank has as many validation batches, parquet_stream's plan; one 1-element all-reduce a batch)
    _EvaluationLoop._evaluation_step = _agreeing_first(_EvaluationLoop._evaluation_step)


def _spawned_ranks_exit_143() -> None:
    """A ddp_spawn / ddp_fork rank stopped by SIGTERM exits 143 at once (its launcher says so in one line, and ends
    the run FAILED): the exception went to the launcher as a traceback, exit 1, and the rank's interpreter exit
    could abort in gloo's threads (gloo_exit.py)."""
    try:
        from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
    except ImportError:
        return
    original = _MultiProcessingLauncher._wrapping_function
    if getattr(original, "_exits_143", False):
        return

    @functools.wraps(original)  # its name too: the spawned rank unpickles the bound method by name
    def wrapping_function(self: Any, *args: Any, **kwargs: Any) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        try:
            original(self, *args, **kwargs)
        except SIGTERMException:
            exit_now(_EXIT_CODE)

    wrapping_function._exits_143 = True  # type: ignore[attr-defined]
    _MultiProcessingLauncher._wrapping_function = wrapping_function


def stopped_together(trainer: Any, error: BaseException) -> bool:
    """Whether `error` is a SIGTERMException every rank raised at the same point (a fit, validate or test whose
    ranks agreed on the SIGTERM): the ranks can still meet in a collective, an on-exception checkpoint's."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    return isinstance(error, SIGTERMException) and _ranks_agree(trainer)


def stopped_by_sigterm_in_predict(trainer: Any) -> bool:
    """Whether an error of a multi-rank predict is its stop by SIGTERM: each rank stops at its own next batch, and a
    rank that had none left waited in the prediction writer's collective for one that stopped (gloo's "Connection
    closed by peer"); the SIGTERM reached this rank too (`_tell_launcher`), before or as the collective failed."""
    from lightning.pytorch.trainer.states import TrainerFn

    return (getattr(trainer, "world_size", 1) > 1 and trainer.state.fn == TrainerFn.PREDICTING
            and (trainer.received_sigterm or _received_at is not None))


def stopped_by_sigterm(error: BaseException) -> bool:
    """Whether `error` is a stop by SIGTERM: Lightning's, or a spawned rank's exit with 143 (see above)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    if isinstance(error, SIGTERMException):
        return True
    try:
        from torch.multiprocessing import ProcessExitedException
    except ImportError:
        return False
    return isinstance(error, ProcessExitedException) and error.exit_code == _EXIT_CODE


# --- the watch -----------------------------------------------------------------------------------------------
# Outside Lightning's handler (from the CLI's start until Trainer._run installs it once the ranks have met, and
# after its teardown puts it back) a SIGTERM had its default action: rank 0 died in the ranks' rendezvous with its
# MLflow run left RUNNING and the ranks it had launched left running, orphaned. A Python handler alone would not
# help there: it runs only once the main thread is back in Python, and the rendezvous waits in C++ (for up to its
# 30-minute timeout). But the C-level handler Python installs writes the signal's number to the wakeup fd at once,
# whichever thread receives it: a watcher thread reads it there, runs `on_sigterm` (the CLI marks its run FAILED
# and ends the ranks it launched) and ends the process with 143. A process that launches ddp_spawn / ddp_fork ranks
# only waits for them and never installs Lightning's handler: the watch is its SIGTERM handling for the whole job.
# While Lightning's handler is in place the watch stays armed, as a backstop: Lightning stops the job at its next
# batch, but a main thread held in C++ never gets there (rank 0 in a collective waiting for a rank that stalled
# without dying: a review saw it run on for minutes, its run RUNNING, its ranks never told). The job gets
# `stop_limit_s()` to end on its own; then the watch ends it as above.

_EXIT_CODE = 143  # 128 + SIGTERM: the shell's code for "killed by SIGTERM"
# what `on_sigterm` may take (ending the ranks, marking the run FAILED): a tracking store that does not answer
# (MLflow's HTTP timeout and retries: minutes) must not keep a process that was told to stop
RECORD_LIMIT_S = 15.0
_STOP = b"\0"  # written by stop(): the watcher's end (no signal has number 0)
STOP_LIMIT_ENV = "MMOE_REC_SIGTERM_STOP_LIMIT_S"
# how long a job under Lightning's handler may take to stop on its own after a SIGTERM: its on-exception work
# included (a checkpoint of large tables, the run's end), as long as the launcher's observer spares rank 0 for
STOP_LIMIT_S = SIGTERM_GRACE_S
MAX_STOP_LIMIT_S = 86_400.0
_watch: Optional["_Watch"] = None


def stop_limit_s() -> float:
    """STOP_LIMIT_S, or the environment's MMOE_REC_SIGTERM_STOP_LIMIT_S (seconds, > 0, at most a day)."""
    value = os.environ.get(STOP_LIMIT_ENV)
    if value is None:
        return STOP_LIMIT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= MAX_STOP_LIMIT_S:  # NaN fails too; inf overflowed select's timeout
        raise ValueError(f"{STOP_LIMIT_ENV}={value!r}: expected a number of seconds > 0 and at most "
                         f"{MAX_STOP_LIMIT_S:g}")
    return seconds


def _ignore(signum: int, frame: Any) -> None:
    """The Python-level handler while the watcher is on: the watcher does the work (this runs, if ever, only once
    the main thread is back in Python)."""


class _Watch:
    def __init__(self, on_sigterm: Callable[[], None], job: str, launcher_pid: int | None) -> None:
        self.on_sigterm, self.job, self.stop_limit_s = on_sigterm, job, stop_limit_s()
        self.launcher_pid = launcher_pid  # a launched rank's launcher (rank 0), or None
        self.lightning_handles = False  # Lightning's handler in place (install() keeps this up to date)
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.write_fd, False)  # the C handler must never block
        self.thread = threading.Thread(target=self._wait, name="mmoe-rec-sigterm-watch", daemon=True)
        self.previous_fd: int | None = None

    def _wait(self) -> None:
        while True:
            byte = os.read(self.read_fd, 1)
            if not byte or byte == _STOP:
                return
            if byte[0] != signal.SIGTERM:
                continue
            timed_out = False
            if self._defers():
                # Lightning's handler stops the job at its next batch, unless the main thread is held in C++
                stopped = self._stopped_within(self.stop_limit_s)
                if stopped:
                    return
                timed_out = stopped is False
            if timed_out:
                print(f"error: {self.job} did not stop within {self.stop_limit_s:g} s of a SIGTERM (held in a "
                      "collective by a stalled rank, or its on-exception work took longer); ending it and the "
                      "ranks it launched", file=sys.stderr, flush=True)
            elif self.launcher_pid is not None and os.getppid() != self.launcher_pid:
                # the SIGTERM Linux sends a launched rank when rank 0 dies (die_with_parent): nobody stopped it
                print(f"error: {self.job}: this rank ends, as rank 0 (pid {self.launcher_pid}), which launched it, "
                      "has ended (see rank 0's error)", file=sys.stderr, flush=True)
            elif self.launcher_pid is not None and _received_at is not None:
                pass  # a launched rank told again after its stop (rank 0 forwarding one it was passed): rank 0 says it
            else:  # before Lightning's handler took over (ddp: the ranks still meeting), after its teardown, in the
                # process that only waits for ddp_spawn / ddp_fork ranks (it never installs it), in an orphaned rank
                print(f"error: {self.job} stopped by SIGTERM before it finished; ending the ranks it launched, if "
                      "any", file=sys.stderr, flush=True)
            recorder = threading.Thread(target=self._record, name="mmoe-rec-sigterm-record", daemon=True)
            recorder.start()
            recorder.join(RECORD_LIMIT_S)
            if recorder.is_alive():
                print(f"mmoe-rec: the stop was not recorded within {RECORD_LIMIT_S:g} s (is the tracking store "
                      "answering?); exiting without it", file=sys.stderr, flush=True)
            exit_now(_EXIT_CODE)

    def _defers(self) -> bool:
        """Whether a SIGTERM is left to Lightning's handler for now: while it is in place, unless this is a
        launched rank whose launcher is gone (rank 0 ended the job: it must not wait out a limit of its own)."""
        return self.lightning_handles and not (self.launcher_pid is not None and os.getppid() != self.launcher_pid)

    def _stopped_within(self, seconds: float) -> bool | None:
        """True: the watch is stopped (the job ended in this process) within `seconds`; False: not; None: a later
        SIGTERM that is not to be left to Lightning (its handler torn down since, the launcher gone)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.read_fd], [], [], left)
            if ready:
                byte = os.read(self.read_fd, 1)
                if not byte or byte == _STOP:
                    return True
                if byte[0] == signal.SIGTERM and not self._defers():
                    return None
        return False

    def _record(self) -> None:
        try:
            self.on_sigterm()
        except Exception as e:  # noqa: BLE001 - ending the process matters more
            print(f"mmoe-rec: could not record the stop: {e}", file=sys.stderr, flush=True)

    def start(self) -> None:
        _forget_in_forked_children()
        signal.signal(signal.SIGTERM, _ignore)
        self.previous_fd = signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        self.thread.start()

    def stop(self) -> None:
        """SIGTERM back to its default action: the job is over."""
        signal.set_wakeup_fd(self.previous_fd if self.previous_fd is not None else -1)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.write(self.write_fd, _STOP)
        self.thread.join()
        os.close(self.read_fd)
        os.close(self.write_fd)


@contextmanager
def watch(on_sigterm: Callable[[], None], job: str = "mmoe-rec", launcher_pid: int | None = None) -> Iterator[None]:
    """SIGTERM in the block runs `on_sigterm` and exits 143: at once outside Lightning's handler, after
    `stop_limit_s()` under it if the job has not ended by then (see above); at once in a launched rank
    (`launcher_pid`: its launcher's) once its launcher is gone. `job` names it in the one-line error.
    Only from the main thread where SIGTERM has its default action and no wakeup fd is set (a host program's own
    signal handling is left alone)."""
    global _watch
    if threading.current_thread() is not threading.main_thread() or _watch is not None \
            or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    previous = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(previous)
    if previous != -1:
        yield
        return
    _watch = _Watch(on_sigterm, job, launcher_pid)
    _watch.start()
    try:
        yield
    finally:
        stop_watch()


def stop_watch() -> None:
    global _watch
    watch, _watch = _watch, None
    if watch is not None:
        watch.stop()


_fork_hook_registered = False


def _forget_in_forked_children() -> None:
    """A process forked during the watch (a `ddp_fork` rank) has no watcher thread but the parent's handler and
    wakeup fd: its SIGTERM would reach the parent's watcher through the shared pipe. It starts with SIGTERM's
    default action instead, as before the watch."""
    global _fork_hook_registered
    if _fork_hook_registered or not hasattr(os, "register_at_fork"):
        return
    _fork_hook_registered = True

    def in_child() -> None:
        global _watch
        if _watch is None:
            return
        _watch = None
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        except ValueError:  # forked from another thread than the main one: nothing of the watch's to undo
            pass

    os.register_at_fork(after_in_child=in_child)


def die_with_parent(parent_pid: int | None) -> None:
    """A launched rank ends (SIGTERM) when the rank that launched it (`parent_pid`) dies, however it dies (Linux's
    PR_SET_PDEATHSIG): rank 0 killed in the rendezvous left its ranks waiting there, orphaned, for 30 minutes."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if parent_pid is not None and os.getppid() != parent_pid:  # it died before the request: nobody will send it
        os.kill(os.getpid(), signal.SIGTERM)
