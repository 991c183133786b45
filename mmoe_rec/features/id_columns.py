"""Id columns pass through a build unchanged, so every input file must give each one a type that the written type
holds without loss.

The written type is decided from the files' schemas before any row is read (so it does not depend on which file
comes first): the one type every file's column widens to. Allowed widening: an integer into a wider integer that
holds all its values (int32 -> int64, uint32 -> int64; int64 and uint64 have none in common), string <->
large_string (string_view is written as string), a dictionary column into its value type. A column of Arrow type
null (all null, as pandas writes an all-None column) takes any type. Anything else (string "007" in one file, int 7
in another) is an error naming the file, the column and both types, instead of a cast that changes the ids or fails
on the writer thread.
"""
from __future__ import annotations

from typing import Iterable

import pyarrow as pa

from mmoe_rec.features.errors import FeatureDataError

_INTS = (pa.int8(), pa.uint8(), pa.int16(), pa.uint16(), pa.int32(), pa.uint32(), pa.int64(), pa.uint64())
_STRINGS = (pa.string(), pa.large_string())
ALLOWED = "integers into wider integers, string <-> large_string, a dictionary into its values"


def _values(t: pa.DataType) -> pa.DataType:
    """The values' type: a dictionary's value type; string_view (pyarrow writes it) as string."""
    t = t.value_type if pa.types.is_dictionary(t) else t
    return pa.string() if pa.types.is_string_view(t) else t


def _holds(wide: pa.DataType, t: pa.DataType) -> bool:
    """Whether every value of type `t` is a value of type `wide`."""
    t = _values(t)
    if t == wide or pa.types.is_null(t) or (t in _STRINGS and wide in _STRINGS):
        return True
    if not (pa.types.is_integer(t) and pa.types.is_integer(wide)):
        return False
    if pa.types.is_signed_integer(t) == pa.types.is_signed_integer(wide):
        return t.bit_width <= wide.bit_width
    return pa.types.is_unsigned_integer(t) and t.bit_width < wide.bit_width  # uint32 fits int64, int8 no uint


def common_type(a: pa.DataType, b: pa.DataType) -> pa.DataType | None:
    """The narrowest type that holds the values of both, or None."""
    a, b = _values(a), _values(b)
    if a in _STRINGS and b in _STRINGS:
        return pa.large_string() if pa.large_string() in (a, b) else pa.string()
    for t in (a, b) + _INTS:
        if _holds(t, a) and _holds(t, b):
            return t
    return None


def schema_types(schema: pa.Schema, columns: list[str]) -> dict[str, pa.DataType]:
    """The type of each of `columns` that `schema` has (a missing one is left out: the reader reports it)."""
    return {c: schema.field(c).type for c in columns if schema.get_field_index(c) >= 0}


def plan_id_types(files: Iterable[tuple[str, dict[str, pa.DataType]]]) -> dict[str, pa.DataType]:
    """(file, {id column: its type there}) for every input file -> the type each id column is written with."""
    types: dict[str, pa.DataType] = {}
    since: dict[str, str] = {}  # the file that set the type so far
    for path, cols in files:
        for col, t in cols.items():
            if col not in types:
                types[col], since[col] = _values(t), path
                continue
            wide = common_type(types[col], t)
            if wide is None:
                raise FeatureDataError(f"id column of type {t} here, {types[col]} in {since[col]}: an id column must "
                                       f"have one type in all input files ({ALLOWED})", file=path, column=col)
            if wide != types[col] and not pa.types.is_null(t):
                types[col], since[col] = wide, path
    return types


def cast_ids(table: pa.Table, types: dict[str, pa.DataType], file: str) -> pa.Table:
    """`table` with its id columns in their planned types (every batch of a build is then written alike)."""
    for col, wide in types.items():
        i = table.schema.get_field_index(col)
        t = table.schema.field(i).type
        if t == wide:
            continue
        if not _holds(wide, t):  # the plan read the same schemas: only a file changed during the build lands here
            raise FeatureDataError(f"id column of type {t}, but {wide} was planned from the files' schemas",
                                   file=file, column=col)
        table = table.set_column(i, col, table.column(i).cast(wide))
    return table
