"""The one error the feature pipeline raises for bad data or a bad schema."""
from __future__ import annotations


class FeatureDataError(ValueError):
    """Bad input data or schema. The message names the file, the column and the row where they are known.

    ``row`` is the 0-based data row inside ``file`` (header lines not counted).
    """

    def __init__(self, message: str, file: str | None = None, column: str | None = None, row: int | None = None):
        self.file, self.column, self.row, self.reason = file, column, row, message
        where = []
        if file is not None:
            where.append(f"file {file}")
        if column is not None:
            where.append(f"column {column!r}")
        if row is not None:
            where.append(f"row {row} (0-based)")  # a file's first data row is row 0 (its header not counted)
        super().__init__(f"{', '.join(where)}: {message}" if where else message)

    def at(self, file: str | None = None, row_offset: int = 0) -> "FeatureDataError":
        """The same error, placed in a file and shifted by the batch's first row in that file."""
        row = None if self.row is None else self.row + row_offset
        return FeatureDataError(self.reason, file=self.file or file, column=self.column, row=row)


def missing_columns_error(missing: list[str], have: list[str], file: str | None, holder: str = "the input"
                          ) -> FeatureDataError:
    """The error for input lacking `missing` columns (all named at once: one at a time takes a run each)."""
    if len(missing) == 1:
        return FeatureDataError(f"missing column ({holder} has {have})", file=file, column=missing[0])
    return FeatureDataError(f"missing columns {', '.join(map(repr, missing))} ({holder} has {have})", file=file)


def check_columns(have: list[str], needed, file: str | None, holder: str = "the input") -> None:
    """Refuse input (`holder`: "the file", "the input") that lacks `needed` columns (all named at once) or names one
    of them twice: which one is meant is unclear (Arrow would read the first of a file's, pyarrow fails on a
    table's). A column nothing reads may repeat: files, Tables and DataFrames alike."""
    missing = list(dict.fromkeys(c for c in needed if c not in set(have)))
    if missing:
        raise missing_columns_error(missing, have, file, holder)
    twice = [c for c in dict.fromkeys(needed) if have.count(c) > 1]
    if twice:
        raise FeatureDataError(f"{holder} names this column twice (its columns are {have}): which one is meant is "
                               "unclear", file=file, column=twice[0])
