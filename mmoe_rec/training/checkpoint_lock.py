"""One fit at a time per checkpoint folder.

Two fits into one folder each renamed their saves over the same best.ckpt / last.ckpt and both exited 0: best.ckpt
from one, last.ckpt from the other, whose "best" entry named a file that now held another model. A fit's rank 0
takes a non-blocking flock on `<folder>/.lock` for the whole fit (it writes its pid there, for the refusal's
message); a second fit is refused before its MLflow run is made. The kernel drops the lock of a process that dies.
The file stays: removing it on release would let a fit waiting to open it and a later one lock two different files.
Holding the folder, a fit removes the partial saves a killed fit left there (remove_partial_saves).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
from pathlib import Path
from typing import Iterable

LOCK_NAME = ".lock"
# a save in progress: checkpoint_io.AtomicCheckpointIO writes output_dir.temp_path(<checkpoint>, PARTIAL_SAVE_KIND),
# then renames; a kind of its own, so that another job's temporary file in the folder (`score --output` there:
# `.<name>.tmp-...`, written without this lock) is never taken for one
PARTIAL_SAVE_KIND = "partial-checkpoint"
PARTIAL_SAVE = re.compile(r"\..+\." + PARTIAL_SAVE_KIND + r"-\d+-[0-9a-f]{8}")


class CheckpointFolderInUse(ValueError):
    """Another fit holds the checkpoint folder."""


def lock_checkpoint_folders(folders: Iterable[str | os.PathLike]) -> list[int]:
    """Lock each folder (made if missing); the open descriptors, for release_checkpoint_folders. Raises
    CheckpointFolderInUse, holding none, where another fit holds one."""
    fds: list[int] = []
    try:
        # one folder under two spellings (a symlink, a relative default_root_dir) is locked once: a second flock of
        # it, even by this process, would refuse it
        for folder in sorted({Path(os.path.realpath(os.path.expanduser(str(f)))) for f in folders}):
            fds.append(_lock(folder))
    except BaseException:
        release_checkpoint_folders(fds)
        raise
    return fds


def _lock(folder: Path) -> int:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # "[Errno 17] File exists" named no setting
        raise ValueError(f"checkpoint folder {folder} (--checkpoint_dir, or a ModelCheckpoint's dirpath) is a file "
                         "or lies under one: give a folder") from None
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()  # empty while the holder is writing it
        os.close(fd)
        raise CheckpointFolderInUse(
            f"checkpoint folder {folder} is in use by another fit{f' (pid {holder})' if holder.isdigit() else ''}: "
            "one fit at a time writes a folder's checkpoints; wait for it to end, or give this fit another "
            "--checkpoint_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def release_checkpoint_folders(fds: list[int]) -> None:
    """Unlock and close (LOCK_UN first: a copy of the descriptor in a forked loader worker would keep the lock)."""
    for fd in fds:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()


def remove_partial_saves(folder: str | os.PathLike) -> list[str]:
    """Remove the partial checkpoints in a folder this process holds (lock_checkpoint_folders): a fit killed while
    it wrote one (SIGKILL, a power cut) left it there, a hidden file as large as a checkpoint, which nothing else
    removes; no other fit writes the folder while it is held. Returns the names removed."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            if PARTIAL_SAVE.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(entry.name)
    return sorted(removed)
