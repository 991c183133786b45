"""A SIGTERM (`kill`, `timeout`, a scheduler's cancel) under DDP: every rank stops at the same batch.

Lightning's SIGTERM handler (lightning 2.6, `_SignalConnector._sigterm_notifier_fn`) forwards the signal to the
ranks its launcher started and then runs a `dist.broadcast` inside the handler, at whatever point of its collectives
each rank happens to be: rank 1 aborted on a gloo "collective mismatch" and rank 0 failed with "Connection reset by
peer", exit 1, without a word about the SIGTERM. The handler installed here does the rest of Lightning's work and
leaves the broadcast to the training loop, which broadcasts rank 0's flag at every batch start anyway (all ranks
then raise Lightning's SIGTERMException together).

`sigterm_received_at()` tells the launcher's observer (child_ranks) when rank 0 was told to stop: the other ranks
then exit non-zero before their work is done, and rank 0, still writing its on-exception checkpoint or ending its
MLflow run, is spared for `SIGTERM_GRACE_S` instead of being SIGKILLed at once.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Optional

SIGTERM_GRACE_S = 120.0  # after a SIGTERM, rank 0 finishes its on-exception work (a checkpoint, the MLflow run)

_log = logging.getLogger(__name__)
_received_at: Optional[float] = None


def sigterm_received_at() -> Optional[float]:
    """time.monotonic() of this process's first SIGTERM under a Lightning run, or None."""
    return _received_at


def _notifier(self: Any, signum: int, frame: Any) -> None:
    """Lightning's `_sigterm_notifier_fn` without its broadcast: note it, forward it to the launched ranks once."""
    global _received_at
    _log.info("rank %s received SIGTERM (%s)", getattr(self.trainer, "global_rank", "?"), signum)
    if not self.received_sigterm:
        if _received_at is None:
            _received_at = time.monotonic()
        launcher = self.trainer.strategy.launcher
        if launcher is not None:
            launcher.kill(signum)
    self.received_sigterm = True


def install() -> None:
    """Put `_notifier` in place of Lightning's (before a Trainer registers its handlers; idempotent)."""
    try:
        from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector
    except ImportError:  # another Lightning layout: its own handler stays
        return
    if hasattr(_SignalConnector, "_sigterm_notifier_fn"):
        _SignalConnector._sigterm_notifier_fn = _notifier
