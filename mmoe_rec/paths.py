"""Input paths read by the jobs (features, score): one rule for a folder's files, one for "the same file named
twice"."""
from __future__ import annotations

import os
from collections.abc import Iterable


def first_repeated_file(files: Iterable[str]) -> tuple[str, str] | None:
    """The first file named twice, as (its earlier spelling, its later one), by device and inode (a relative and an
    absolute spelling, a symlink, a hard link: a `cp -al` or `rsync --link-dest` snapshot beside the data, a file
    named itself and through its folder), by real path where it cannot be stat'ed; None if every file is named
    once."""
    seen: dict[object, str] = {}
    for f in files:
        try:
            st = os.stat(f)
            key: object = (st.st_dev, st.st_ino)
        except OSError:  # missing or unreadable: the reader names it
            key = os.path.realpath(f)
        if key in seen:
            return seen[key], f
        seen[key] = f
    return None


def skipped_name(name: str) -> bool:
    """A name a folder's listing passes over: "." or "_" first (`_SUCCESS`, `.crc`, a writer's temporary file), as
    pyarrow's dataset discovery does."""
    return name.startswith((".", "_"))


def folder_files(folder: str, exclude: str | os.PathLike | None = None) -> list[str]:
    """Every file under `folder`, recursively (partition folders such as `day=2/` included), sorted, passing over
    `skipped_name`s (files, and folders with all below them) and the folder `exclude` (a job's own output inside
    its input folder); links are followed, a link back up the tree once."""
    files, visited = [], set()
    if exclude is not None:
        visited.add(os.path.realpath(exclude))
    for root, dirs, names in os.walk(folder, followlinks=True):
        visited.add(os.path.realpath(root))  # a link back up the tree is walked once, not forever
        dirs[:] = [d for d in dirs if not skipped_name(d) and os.path.realpath(os.path.join(root, d)) not in visited]
        files += [os.path.join(root, n) for n in names if not skipped_name(n)]
    return sorted(files)
