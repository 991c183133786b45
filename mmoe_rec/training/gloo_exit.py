"""A rank's exit after gloo collectives, clear of a PyTorch race that aborts it: `settle_gloo_workers()`.

A gloo worker thread destroys each collective's work object after it completed; the object's thread-local state
may hold a Python object, whose release takes the GIL. When that happens while the main thread is already in
interpreter finalization, Python ends the worker with pthread_exit, and the unwinding through C++ calls
std::terminate: the rank dies with SIGABRT ("terminate called without an active exception") after its work was
done. DistributedDataParallel keeps its process group (and so the worker threads) alive past
destroy_process_group, so no destruction joins them first. Seen about once in 50-75 two-process runs under load
on this 2-core machine with torch 2.13 (core dumps, 2026-12-06: ProcessGroupGloo::runLoop ->
~AsyncAllreduceWork -> ~ThreadLocalState -> decref -> take_gil -> pthread_exit -> terminate).

The workers drop finished work right after they complete it; giving them a moment with the GIL free before the
process exits lets them do so while the interpreter is whole. A bare two-process DDP script in a loop on the
loaded 2-core machine aborted in 1 of 74 runs without the pause, 0 of 136 with it (2026-12-06).
"""
from __future__ import annotations

import time

import torch.distributed as dist

SETTLE_SECONDS = 0.2


def settle_gloo_workers(seconds: float = SETTLE_SECONDS) -> bool:
    """Sleeps (GIL released) when this process has a gloo process group; returns whether it did."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    try:
        if dist.get_backend() != "gloo":
            return False
    except (RuntimeError, ValueError):
        return False
    time.sleep(seconds)
    return True
