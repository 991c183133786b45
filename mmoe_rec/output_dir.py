"""Directories written whole or not at all: the checks before writing, and the swap once the new one is complete.

Both `mmoe-rec features` and `mmoe-rec synth` write into a temporary directory beside the target and call
`replace_dir` when it is complete, so a failure leaves the old output (or nothing) and never half of a new one;
`mmoe-rec score` puts its file in place with `publish_file`. Without --overwrite neither replaces an output that
another job wrote after this job's checks.
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
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


def spelt_as_folder(output: str | os.PathLike) -> bool:
    """Whether a file output is written as a folder (`out/`): Path drops the trailing separator, and the job wrote a
    file named `out` where the user meant a folder."""
    text = os.fspath(output)
    return text.endswith(os.sep) or bool(os.altsep and text.endswith(os.altsep))


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


def temp_path(output: Path, kind: str) -> Path:
    """`.<name>.<kind>-<pid>-<random>` beside `output`: hidden from every reader here (a leading '.'), and of this
    process alone, also where jobs of several machines or containers (whose pids repeat) share the folder."""
    return output.with_name(f".{output.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


# the errors of a rename onto a name another job has taken (a non-empty folder, a file where a folder goes)
_TAKEN = {errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR}


def replace_dir(new: Path, output: Path, *, overwrite: bool) -> None:
    """Put the complete directory `new` at `output`.

    Without `overwrite` the rename itself refuses an output that another job finished after this job's checks at
    its start (a rename onto a non-empty directory fails: ENOTEMPTY / EEXIST, onto a file ENOTDIR), so its output
    stays whole and this job fails saying so; the caller removes `new`. With `overwrite` an existing output is moved
    aside first and deleted only after the rename, so that a failure in between leaves one of the two whole; the
    output is missing for a moment between the two renames (a job that starts to read it then stops at the missing
    spec.json or files, with an error saying so). Where another job renamed its output in during that moment, this
    one fails, that output stays, and the old one (both were asked to replace it) is deleted; after any other
    failure of the second rename the old output is put back. A SIGTERM waits until the swap and the removal of the
    old output are done: between the renames the output would be missing, and an old output left at
    `.<name>.old-<pid>-<random>` is removed by nothing later; the job's last line then says the output is whole
    (job_outcome)."""
    with sigterm_held():
        if not overwrite:
            try:
                os.replace(new, output)
            except OSError as e:
                # what a rename onto another job's output gives; any other refusal (a mount point: EBUSY) is its own
                if not os.path.lexists(output) or e.errno not in _TAKEN:
                    raise
                raise FileExistsError(f"{output}: another job wrote this output while this one ran (it was missing "
                                      f"or empty when this job started): it is left as it is, and this job's output "
                                      f"is not written; use --overwrite to replace it") from None
        elif output.exists():
            old = temp_path(output, "old")
            os.replace(output, old)
            try:
                os.replace(new, output)
            except OSError as e:
                if not os.path.lexists(output):
                    os.replace(old, output)  # nothing came in its place: the old output goes back
                    raise
                shutil.rmtree(old)  # something else holds the name now: the old output is not put back
                if e.errno not in _TAKEN:
                    raise
                # another job's output came in between the renames and stays
                raise FileExistsError(f"{output}: another job replaced this output while this one replaced it too: "
                                      f"its output is kept, and this job's is not written") from None
            shutil.rmtree(old)
        else:
            os.replace(new, output)
        job_outcome.done(f"wrote {output}")


def publish_file(tmp: Path, output: Path, *, overwrite: bool) -> None:
    """Put the complete file `tmp` at `output`. Without `overwrite` a hard link makes it (it fails with EEXIST where
    `output` exists, whatever wrote it since this job's check at its start: a rename would replace it), then `tmp`
    goes; on a file system without hard links the name is claimed by an exclusive create and then replaced. With
    `overwrite` a rename replaces what is there."""
    if overwrite:
        os.replace(tmp, output)
        return
    try:
        os.link(tmp, output)
        linked = True
    except FileExistsError:
        raise _written_meanwhile(output) from None
    except OSError:  # no hard links here (vfat, some network and FUSE file systems)
        linked = False
    if linked:
        tmp.unlink()
        return
    try:
        os.close(os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
        raise _written_meanwhile(output) from None
    try:
        os.replace(tmp, output)
    except BaseException:
        output.unlink(missing_ok=True)  # the empty file that claimed the name
        raise


def _written_meanwhile(output: Path) -> FileExistsError:
    return FileExistsError(f"{output}: another job wrote this file while this one ran (it did not exist when this job "
                           f"started): it is left as it is, and this job's output is not written; use --overwrite to "
                           f"replace it")


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
