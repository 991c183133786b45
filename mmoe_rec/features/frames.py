"""pandas DataFrames of raw rows to Arrow, for the transform: `table_from_pandas(frame, file)`.

pyarrow converts an object column of one kind of value (all strings, all ints, ...) directly, and refuses one that
mixes numbers and strings (`df.loc[i, "price"] = "abc"` in a float column, an unseen id "u5" among ints). Such a
column goes to the transform as text instead: the transform parses numeric text, matches integer text against an
integer vocabulary, and names the file, column and row of a value it cannot read, as it does for CSV input."""
from __future__ import annotations

import decimal
import math
import numbers

import numpy as np
import pandas as pd
import pyarrow as pa

from mmoe_rec.features.errors import FeatureDataError


def table_from_pandas(frame: pd.DataFrame, file: str | None = None, row_offset: int = 0) -> pa.Table:
    """The frame's columns as an Arrow table (its index left out); a mixed object column as text (see above).
    A value that is neither a scalar nor missing in such a column (a list among strings) is an error naming it.
    A name the frame gives two columns is kept twice (pyarrow's from_pandas refuses it): the transform refuses a
    column it reads named twice, and ignores one it does not read, as for a file (errors.check_columns)."""
    if frame.columns.is_unique:
        try:
            return pa.Table.from_pandas(frame, preserve_index=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):  # OverflowError: an int past 64 bits among others
            pass
    arrays = []
    for i, name in enumerate(frame.columns):
        column = frame.iloc[:, i]  # by position: frame[name] of a repeated name is a DataFrame
        try:
            arrays.append(pa.array(column, from_pandas=True))
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as err:
            arrays.append(_as_text(column, str(name), file, row_offset, err))
    return pa.Table.from_arrays(arrays, names=[str(name) for name in frame.columns])


def _as_text(column: pd.Series, name: str, file: str | None, row_offset: int, err: Exception) -> pa.Array:
    texts: list[str | None] = []
    for row, value in enumerate(column.tolist()):
        if isinstance(value, np.generic):
            value = value.item()
        if value is None or value is pd.NA or value is pd.NaT or (isinstance(value, float) and math.isnan(value)):
            texts.append(None)
        elif isinstance(value, str):
            texts.append(value)
        elif isinstance(value, (numbers.Real, decimal.Decimal)):
            texts.append(_number_text(value))
        else:
            raise FeatureDataError(f"a {type(value).__name__} ({value!r:.60}) among values of another kind: pyarrow "
                                   f"cannot read the column ({err})", file=file, column=name, row=row_offset + row)
    return pa.array(texts, type=pa.string())


def _number_text(value: numbers.Real | decimal.Decimal) -> str:
    """A number's text, read by the transform as that number: an integral float as its integer (a categorical
    column takes 4034.0 as 4034, whose text is hashed and looked up), any other float as its shortest round-trip
    text (a numeric feature parses it back to the float itself), a bool as Arrow casts it to text ("true")."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 2.0 ** 63 else repr(value)
    return str(value)
