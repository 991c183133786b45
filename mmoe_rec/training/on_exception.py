"""An on-exception checkpoint (Lightning's OnExceptionCheckpoint, or any callback that saves in `on_exception`) of a
multi-rank run is written only where every rank writes it together: after a SIGTERM the ranks agreed on
(sigterm.py: every rank raises SIGTERMException at the same batch).

Lightning runs the callbacks' `on_exception` in the rank that raised (lightning 2.6, `call._interrupt`), and
`trainer.save_checkpoint` is a collective (its barrier, MultiTaskModule.on_save_checkpoint's reduce and all_gather):
a rank that failed alone (an error of its own; a KeyboardInterrupt, which reaches the ranks at different points)
waited there while the others waited in the step's gradient all-reduce, until the process group's timeout (30
minutes), the job neither failed nor went on. Such a checkpoint is now skipped with a one-line warning: the rank
fails the job at once, and the last periodic checkpoint stands. The process that launched ddp_spawn / ddp_fork ranks
holds none of their trained state (its module was never attached to a trainer that ran): it skips it too (it
failed with "MultiTaskModule is not attached to a `Trainer`", in place of the rank's error)."""
from __future__ import annotations

import functools
import warnings
from typing import Any

from mmoe_rec.training import sigterm


def install() -> None:
    """Wrap Lightning's exception handling (idempotent)."""
    try:
        from lightning.pytorch.trainer import call
    except ImportError:  # another Lightning layout
        return
    original = getattr(call, "_interrupt", None)
    if original is None or getattr(original, "_skips_lone_checkpoints", False):
        return

    @functools.wraps(original)
    def interrupt(trainer: Any, exception: BaseException) -> None:
        why = _why_not(trainer, exception)
        if why is None:
            return original(trainer, exception)
        trainer.save_checkpoint = functools.partial(_skip, why)  # for the callbacks' on_exception only
        try:
            original(trainer, exception)
        finally:
            del trainer.save_checkpoint

    interrupt._skips_lone_checkpoints = True  # type: ignore[attr-defined]
    call._interrupt = interrupt


def _why_not(trainer: Any, exception: BaseException) -> str | None:
    """Why this process cannot write an on-exception checkpoint, or None where it can (one process; a SIGTERM
    every rank stopped at together)."""
    import torch.distributed as dist
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    if getattr(trainer, "world_size", 1) <= 1 or sigterm.stopped_together(trainer, exception):
        return None
    if isinstance(trainer.strategy.launcher, _MultiProcessingLauncher) \
            and not (dist.is_available() and dist.is_initialized()):
        return "the trained state is in the ranks this process launched (ddp_spawn / ddp_fork), not in this process"
    return (f"rank {trainer.global_rank}'s {type(exception).__name__} is its own (not a SIGTERM every rank stopped "
            "at), and writing one needs every rank (it would wait for the others until the process group's timeout)")


def _skip(why: str, filepath: Any, *args: Any, **kwargs: Any) -> None:
    warnings.warn(f"no on-exception checkpoint written to {filepath}: {why}; the last periodic checkpoint stands",
                  UserWarning, stacklevel=2)
