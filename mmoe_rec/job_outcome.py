"""What a job has done so far, for its last line when a SIGTERM ends it: `collecting()` scopes one job (in the
thread that runs it), `done(what)` records a step that is complete ("wrote out", "registered m version 3")."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

_current: ContextVar[list[str] | None] = ContextVar("mmoe_rec_job_outcome", default=None)


@contextlib.contextmanager
def collecting() -> Iterator[list[str]]:
    """The steps `done` records while the block runs, in this thread (another thread starts with a context of its
    own: a library caller's work there is not this job's)."""
    steps: list[str] = []
    token = _current.set(steps)
    try:
        yield steps
    finally:
        _current.reset(token)


def done(what: str) -> None:
    """Record a completed step of the job being collected (nothing outside `collecting`)."""
    steps = _current.get()
    if steps is not None:
        steps.append(what)
