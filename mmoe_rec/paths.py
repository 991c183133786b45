"""Input paths read by the jobs (features, score): one rule for "the same file named twice"."""
from __future__ import annotations

import os
from collections.abc import Iterable


def first_repeated_file(files: Iterable[str]) -> tuple[str, str] | None:
    """The first file named twice, as (its earlier spelling, its later one), by real path (a relative and an
    absolute spelling, a symlink, a file named itself and through its folder); None if every file is named once."""
    seen: dict[str, str] = {}
    for f in files:
        real = os.path.realpath(f)
        if real in seen:
            return seen[real], f
        seen[real] = f
    return None
