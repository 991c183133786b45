"""The scoring job's `--input`: files and folders -> one flat list of files (Parquet, as read), each file once.

A folder gives its files recursively, sorted, skipping any name (file or folder below it) that starts with "." or
"_" (`_SUCCESS`, `.crc`, a writer's temporary file), as pyarrow's dataset discovery does. A file named explicitly is
taken as it is. One flat list lets a folder and files be scored together (pyarrow takes a folder or a list of
files, not both), and lets a file named twice be refused instead of scored twice.
"""
from __future__ import annotations

import os

from mmoe_rec.paths import first_repeated_file, folder_files


def expand_inputs(inputs: str | os.PathLike | list) -> list[str]:
    """Every input file, folders expanded in place, in the order given; a file named twice (by any spelling, or
    once itself and once through its folder) is an error naming both spellings."""
    files: list[str] = []
    for item in [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs):
        item = os.path.expanduser(str(item))  # from a YAML file or a quoted argument no shell expanded it
        if os.path.isdir(item):
            files += folder_files(item)
        elif os.path.exists(item):
            files.append(item)
        else:
            raise FileNotFoundError(f"--input {item}: no such file or folder")
    refuse_repeated_files(files)
    return files


def refuse_repeated_files(files: list[str]) -> None:
    """A file read twice would be scored twice: duplicated rows that the row-count check counts as expected."""
    repeated = first_repeated_file(files)
    if repeated:
        raise ValueError(f"the input file is given twice ({repeated[0]!r} and {repeated[1]!r}): its rows would be "
                         "scored twice; name each file once")

