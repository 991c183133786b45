"""Directories written whole or not at all: the checks before writing, and the swap once the new one is complete.

Both `mmoe-rec features` and `mmoe-rec synth` write into a temporary directory beside the target and call
`replace_dir` when it is complete, so a failure leaves the old output (or nothing) and never half of a new one.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

from mmoe_rec import job_outcome


def resolved_output(output: str | os.PathLike) -> Path:
    """The path a run writes: a symlinked output is its target, so that the temporary sits beside the target and
    the swap happens there (the link stays). Swapped in place of the link, the new output landed beside the link,
    the link's target kept the old data, and a folder's old link could not be removed. A leading '~' is the home
    folder (a path from a YAML file or a quoted argument, which no shell expanded)."""
    output = Path(output).expanduser()
    return Path(os.path.realpath(output)) if output.is_symlink() else output


def missing_parents(path: Path) -> list[Path]:
    """The folders above `path` that do not exist yet, deepest first: those `mkdir(parents=True)` would make."""
    missing = []
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    return missing


def remove_empty_folders(folders: list[Path]) -> None:
    """Removes `folders` in order (deepest first) while each is empty: what a failed job made for its output
    goes with it, and folders that something else wrote into meanwhile stay."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty, or gone
            break


def output_dir_problem(output: Path, overwrite: bool) -> str | None:
    """Why `output` may not be written to (a file; a non-empty directory without `overwrite`), or None."""
    if output.exists() and not output.is_dir():
        return "output exists and is not a directory"
    if output.exists() and any(output.iterdir()) and not overwrite:
        return "output directory exists and is not empty (use --overwrite to replace it)"
    return None


def replace_dir(new: Path, output: Path) -> None:
    """Put the complete directory `new` at `output`. An existing output is moved aside first and deleted only
    after the rename, so that a failure in between leaves one of the two whole. A SIGTERM waits until the swap and
    the removal of the old output are done: between the renames the output would be missing, and an old output
    left at `.<name>.old-<pid>` is removed by nothing later; the job's last line then says the output is whole
    (job_outcome)."""
    with sigterm_held():
        if output.exists():
            old = output.parent / f".{output.name}.old-{os.getpid()}"
            os.replace(output, old)
            os.replace(new, output)
            shutil.rmtree(old)
        else:
            os.replace(new, output)
        job_outcome.done(f"wrote {output}")


@contextlib.contextmanager
def sigterm_held() -> Iterator[None]:
    """A SIGTERM that arrives in the block is taken after it, by the handler in force before (the process default
    included). Signals cannot be blocked for Python code alone: any thread may receive one, and Python runs its
    handler in the main thread at once; so the handler is swapped for one that only notes the signal."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is None:
        yield  # another thread, or a handler not set from Python (which could not be put back)
        return
    got: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if got:
            os.kill(os.getpid(), signal.SIGTERM)  # now, to the handler before
