"""Arrow compute calls that need a guard on the pinned pyarrow (22.0.0): `if_else`.

pyarrow 22's `if_else` with a null scalar on one side and a *sliced* string / binary array (offset > 0) on the other
returns wrong values, not an error: the array's strings are read from the wrong place in its data buffer
("hello" came back as "he\\x00\\x00\\x00"; apache/arrow#41479). Slices are everywhere on the read paths: a Parquet
fragment's `to_batches(batch_size=...)` and `RecordBatch.slice` hand out zero-copy slices of one decoded chunk,
so every batch after a file's first was hit (the score job scored rows with other rows' feature values).
"""
from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc


def _variable_width(t: pa.DataType) -> bool:
    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
            or pa.types.is_large_binary(t))


def unsliced(value: Any) -> Any:
    """A sliced variable-width array copied to offset 0 (a chunked array chunk by chunk); anything else as it is."""
    if isinstance(value, pa.ChunkedArray):
        if any(c.offset and _variable_width(c.type) for c in value.chunks):
            return pa.chunked_array([unsliced(c) for c in value.chunks], value.type)
        return value
    if isinstance(value, pa.Array) and value.offset and _variable_width(value.type):
        return pa.concat_arrays([value])
    return value


def if_else(cond: Any, left: Any, right: Any) -> Any:
    """`pc.if_else(cond, left, right)`, with sliced string / binary operands copied first (module docstring)."""
    return pc.if_else(cond, unsliced(left), unsliced(right))
