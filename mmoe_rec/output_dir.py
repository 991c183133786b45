"""Directories written whole or not at all: the checks before writing, and the swap once the new one is complete.

Both `mmoe-rec features` and `mmoe-rec synth` write into a temporary directory beside the target and call
`replace_dir` when it is complete, so a failure leaves the old output (or nothing) and never half of a new one.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def output_dir_problem(output: Path, overwrite: bool) -> str | None:
    """Why `output` may not be written to (a file; a non-empty directory without `overwrite`), or None."""
    if output.exists() and not output.is_dir():
        return "output exists and is not a directory"
    if output.exists() and any(output.iterdir()) and not overwrite:
        return "output directory exists and is not empty (use --overwrite to replace it)"
    return None


def replace_dir(new: Path, output: Path) -> None:
    """Put the complete directory `new` at `output`. An existing output is moved aside first and deleted only
    after the rename, so that a failure in between leaves one of the two whole."""
    if output.exists():
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        os.replace(output, old)
        os.replace(new, output)
        shutil.rmtree(old)
    else:
        os.replace(new, output)
