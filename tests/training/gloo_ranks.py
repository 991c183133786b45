"""Test helper: the gloo process group of one rank that a test starts with torch.multiprocessing.spawn."""
import contextlib
import os
import sys
from typing import Iterator


@contextlib.contextmanager
def gloo_rank(rank: int, world: int, init_file: str) -> Iterator[None]:
    """The rank's gloo process group for the block. Once the block is done, a barrier (neither rank tears gloo down
    while the other still talks to it: that aborted rank 1), the group's end, and the rank's end without the
    interpreter's finalization; a block that raises ends the group and passes the error on to spawn.

    Why the ending: a DistributedDataParallel module keeps its gloo process group alive from C++ after
    destroy_process_group (a weakref to the group outlives both, even after gc.collect()), so its worker threads
    run on. A core dump of a rank that aborted with "terminate called without an active exception" (SIGABRT; CI,
    and 2 of about 160 runs under load here, 2026-12-06) shows the race: a gloo worker drops a finished allreduce's
    AsyncWork while the main thread is in Py_FinalizeEx; the work's thread-local state holds a Python object, whose
    decref takes the GIL, and a thread taking the GIL during finalization is ended by pthread_exit, whose unwinding
    through C++ calls std::terminate. A forked multiprocessing child ends with os._exit likewise."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
