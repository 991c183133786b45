"""Raw Arrow columns -> checked numpy / Arrow values, or a FeatureDataError naming the column and row.

Rows in errors are relative to the array passed in; callers shift them to the row inside the file.
"""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmoe_rec.features.arrow_kernels import if_else
from mmoe_rec.features.errors import FeatureDataError
from mmoe_rec.features.numeric import column_values, to_float32
from mmoe_rec.features.schema import label_keys
from mmoe_rec.features.vocab import normalize_values


def one_chunk(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One array; string_view (which pyarrow writes to and reads back from Parquet) as plain string."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    t = arr.type
    if pa.types.is_string_view(t):
        return pc.cast(arr, pa.string())
    if pa.types.is_dictionary(t) and pa.types.is_string_view(t.value_type):
        return pc.cast(arr, pa.dictionary(t.index_type, pa.string()))
    return arr


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) \
        or pa.types.is_decimal(t) or pa.types.is_null(t)


def _first_failure(arr: pa.Array, convert) -> int:
    """Row of the first element `convert` rejects (bisection: O(log n) conversions, only on the error path)."""
    lo, hi = 0, len(arr)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            convert(arr.slice(lo, mid - lo))
            lo = mid
        except (pa.ArrowInvalid, ValueError):
            hi = mid
    return lo


def null_fields(text: pa.Array, null_values, strip: bool) -> pa.Array:
    """`text` (strings) with the fields the CSV reader reads as null made null: a field that is one of `null_values`
    as written, or, with strip (sources._strip), once trimmed (`" ?"` is null for `?`, and so is `" ?"` itself
    when it is the null value). Nothing else is changed (not trimmed)."""
    if not len(null_values):
        return text
    value_set = pa.array(list(null_values), pa.string())
    is_null = pc.is_in(text, value_set=value_set)
    if strip:
        is_null = pc.or_(is_null, pc.is_in(pc.utf8_trim_whitespace(text), value_set=value_set))
    if not pc.any(is_null).as_py():
        return text
    return if_else(is_null, pa.scalar(None, pa.string()), text)


def numeric_null_values(null_values, strip: bool) -> tuple[list[str], bool]:
    """(the null values numeric text is matched against, whether the feature's state records them). Text that is no
    number ("?") was an error before it was a null value, so it is matched in every spec; a null value that reads
    as a number ("-1") was that number in specs fitted before 2026-12-06, and is matched only where the state says
    so (`null_numbers`), so that an older spec keeps its values."""
    numbers = [v for v in null_values if _reads_as_number(v.strip() if strip else v)]
    return [v for v in null_values if v not in numbers], bool(numbers)


def _reads_as_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _strings_to_float(arr: pa.Array, column: str, null_values=(), strip: bool = False) -> pa.Array:
    # a null value is missing, as the CSV reader makes it, not an error (matched before the trim the parse needs,
    # so that without strip " -1" stays the number -1 for a null value "-1", as in a CSV)
    arr = null_fields(pc.cast(arr, pa.string()), null_values, strip)
    arr = pc.utf8_trim_whitespace(arr)
    arr = if_else(pc.equal(arr, ""), pa.scalar(None, pa.string()), arr)  # "" is missing, not an error
    try:
        return pc.cast(arr, pa.float64())
    except pa.ArrowInvalid:
        row = _first_failure(arr, lambda a: pc.cast(a, pa.float64()))
        raise FeatureDataError(f"expected a number, found {arr[row].as_py()!r}", column=column, row=row) from None


def numeric_column(arr, column: str, null_values=(), strip: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(float64 values with 0 at missing, missing mask). inf, -inf and numbers beyond float64 ("1e999") are
    errors: one of them would make the train mean and every transformed value inf or NaN. Numbers as text (a
    Parquet string column, a DataFrame): a field the CSV reader reads as null (`null_fields`) is missing, as in
    a CSV (whose reader nulled it already)."""
    arr = raw = one_chunk(arr)
    if pa.types.is_dictionary(arr.type):
        arr = raw = arr.dictionary_decode()
    t = arr.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        arr = _strings_to_float(arr, column, null_values, strip)
    elif not _is_numeric(t):
        raise FeatureDataError(f"expected a numeric column, found type {t}", column=column)
    elif not pa.types.is_floating(t):
        # unsafe: an integer beyond 2**53 rounds to the nearest float64 (a safe cast refuses it, naming no row)
        arr = pc.cast(arr, pa.float64(), safe=False)
    x, missing = column_values(arr)
    bad = ~np.isfinite(x)  # missing values are 0 here
    if bad.any():
        row = int(np.argmax(bad))
        raise FeatureDataError(f"expected a finite number, found {raw[row].as_py()!r}", column=column, row=row)
    return x, missing


def categorical_column(arr, column: str) -> pa.Array:
    """int64 or string values (nulls kept); integral floats are accepted as integers."""
    arr = one_chunk(arr)
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    t = arr.type
    if pa.types.is_floating(t):
        # nulls arrive as NaN; float64: 2.0 ** 63 overflows a float16 comparison (a RuntimeWarning every batch)
        x = arr.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
        missing = np.isnan(x)
        fraction = ~missing & (x != np.round(x))
        bad = fraction | (~missing & ~(np.abs(x) < 2.0 ** 63))  # inf, or beyond int64
        if bad.any():
            row = int(np.argmax(bad))
            kind = "non-integral" if fraction[row] else "out-of-range"
            raise FeatureDataError(f"expected a categorical value, found the {kind} number {x[row].item()!r}",
                                   column=column, row=row)
        # NaN is missing like null (a plain cast would turn it into the value -2**63, with an id of its own)
        return pa.array(np.where(missing, 0.0, x).astype(np.int64), mask=missing if missing.any() else None)
    if not (pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)
            or pa.types.is_boolean(t) or pa.types.is_null(t)):
        raise FeatureDataError(f"expected a categorical (string or integer) column, found type {t}", column=column)
    return normalize_values(arr)


def single_categorical_column(arr, column: str, strip: bool = False, null_values=(),
                              null_unstripped: bool = False) -> pa.Array:
    """categorical_column for a single-valued feature, where "" is missing (id 0) like null whatever the format:
    the CSV reader gives null for an empty field, a Parquet file or a DataFrame the empty string.

    strip (the reader's strip_whitespace): a value the CSV reader reads as null (one of `null_values` as written
    or once trimmed: `null_fields`) is null, and string values are trimmed (sources._strip), so a Parquet file or a
    DataFrame with the CSV's padded fields (' Private') gives the ids of the CSV's. Done again on CSV input,
    which the reader trimmed already: both steps are idempotent. null_unstripped (a feature's `null_fields`,
    specs fitted since 2026-12-06): without strip, a value that is one of `null_values` is null too (the CSV
    reader's "?" was missing, a Parquet file's "?" a category of its own)."""
    values = categorical_column(arr, column)
    if strip and pa.types.is_string(values.type):
        values = pc.utf8_trim_whitespace(null_fields(values, null_values, strip))
    elif null_unstripped and pa.types.is_string(values.type):
        values = null_fields(values, null_values, False)
    if pa.types.is_string(values.type):
        empty = pc.equal(values, "")
        if pc.any(empty).as_py():
            values = if_else(empty, pa.scalar(None, pa.string()), values)
    return values


def multi_valued_column(arr, column: str, delimiter: str | None, strip: bool = False,
                        null_values=()) -> tuple[pa.Array, np.ndarray]:
    """(flat values, offsets (n+1,) int64); a null list or null string is an empty list.
    strip: trim the pieces of a delimited string (the reader's strip_whitespace: "a | b" is "a", "b").
    null_values (given for specs fitted since they are: a feature's `null_fields`): a whole string the CSV reader
    reads as null (`null_fields`) is an empty list, as that reader makes it before the field is split, so that
    Parquet / DataFrame rows get the CSV's ids."""
    arr = one_chunk(arr)
    if pa.types.is_dictionary(arr.type):  # pandas' `category` dtype, a Parquet dictionary column
        arr = arr.dictionary_decode()
    t = arr.type
    # every row missing: Arrow / pandas type an all-None column as null, and pandas reads a CSV column with no value
    # (or a DataFrame column of NaN) as float64 NaN: every list empty, as when some rows have values
    if pa.types.is_null(t) or (pa.types.is_floating(t) and not pc.any(pc.invert(pc.is_nan(arr))).as_py()):
        return pa.array([], pa.int64()), np.zeros(len(arr) + 1, dtype=np.int64)
    split = (pa.types.is_string(t) or pa.types.is_large_string(t)) and delimiter is not None
    if split:
        arr = pc.split_pattern(null_fields(pc.cast(arr, pa.string()), null_values, strip), delimiter)
        t = arr.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)):
        hint = " (declare 'delimiter' for a delimited string column)" if pa.types.is_string(t) else ""
        raise FeatureDataError(f"expected a list column, found type {t}{hint}", column=column)
    if arr.null_count:
        arr = pc.fill_null(arr, pa.scalar([], arr.type))
    if arr.offset or pa.types.is_large_list(t):
        arr = pa.concat_arrays([arr])  # offsets start at 0 after a copy
    offsets = np.asarray(arr.offsets.to_numpy(zero_copy_only=False), dtype=np.int64)
    values = arr.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
    offsets = offsets - offsets[0]
    if split and strip:
        values = pc.utf8_trim_whitespace(values)
    try:
        values = categorical_column(values, column)
    except FeatureDataError as e:
        if e.row is None:
            raise
        # the error's row is a position among the flat values: name the row whose list holds it
        row = int(np.searchsorted(offsets, e.row, side="right")) - 1
        raise FeatureDataError(e.reason, column=column, row=row) from None
    if delimiter is not None and pa.types.is_string(values.type):
        # empty pieces ("a||b", "") are no values: drop them and rebuild the offsets
        keep = pc.not_equal(values, "").fill_null(True).to_numpy(zero_copy_only=False)
        if not keep.all():
            kept_before = np.concatenate([[0], np.cumsum(keep)]).astype(np.int64)
            offsets = kept_before[offsets]
            values = values.filter(pa.array(keep))
    return values, offsets


def dictionary_fast_path(state: dict, t: pa.DataType) -> bool:
    """Whether a categorical feature can be computed on a dictionary column's distinct values and gathered
    per row (string or integer values: no per-row errors possible; multi-valued only as delimited strings)."""
    if not pa.types.is_dictionary(t):
        return False
    v = t.value_type
    if state["multi_valued"]:
        return state["delimiter"] is not None and (pa.types.is_string(v) or pa.types.is_large_string(v))
    return pa.types.is_string(v) or pa.types.is_large_string(v) or pa.types.is_integer(v)


def weight_column(arr, column: str) -> np.ndarray:
    x, missing = numeric_column(arr, column)
    if missing.any():
        raise FeatureDataError("sample weight is missing", column=column, row=int(np.argmax(missing)))
    if (x < 0).any():
        raise FeatureDataError(f"sample weight is negative ({x[np.argmax(x < 0)]})", column=column,
                               row=int(np.argmax(x < 0)))
    return to_float32(x, column, "sample weight")


def label_values(arr, column: str, state: dict, strip: bool = False) -> np.ndarray:
    """(n,) float32 label from a raw label column; NaN / null / disallowed values are errors.
    strip (the reader's strip_whitespace): text labels are trimmed (' 50000+.' of a Parquet file made from the
    CSV matches '50000+.' as the CSV reader's trimmed field does)."""
    arr = one_chunk(arr)
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    n = len(arr)
    if arr.null_count:
        row = int(np.argmax(~arr.is_valid().to_numpy(zero_copy_only=False)))
        raise FeatureDataError("label is missing (null)", column=column, row=row)
    if state["type"] == "regression" or state.get("positive") is None:
        x, missing = numeric_column(arr, column)
        if missing.any():
            raise FeatureDataError("label is NaN", column=column, row=int(np.argmax(missing)))
        if state["type"] == "binary":
            bad = (x != 0) & (x != 1)
            if bad.any():
                row = int(np.argmax(bad))
                raise FeatureDataError(f"binary label must be 0 or 1, found {x[row].item()!r}", column=column,
                                       row=row)
        return to_float32(x, column, "label")
    pos, neg = state["positive"], state.get("negative")
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        vals = pc.cast(arr, pa.string())
        if strip:
            vals = pc.utf8_trim_whitespace(vals)
        pos_set, neg_set = _matching_texts(vals, pos), None if neg is None else _matching_texts(vals, neg)
        _refuse_nan_text(vals, tuple(pos) + tuple(neg or ()), column)
    else:
        x, missing = numeric_column(arr, column)
        if missing.any():
            raise FeatureDataError("label is NaN", column=column, row=int(np.argmax(missing)))
        vals = pa.array(x)
        is_bool = pa.types.is_boolean(arr.type)
        try:
            pos_set = pa.array([_label_number(v, is_bool) for v in pos])
            neg_set = None if neg is None else pa.array([_label_number(v, is_bool) for v in neg])
        except (TypeError, ValueError):
            kind, expected = ("bool", "true / false or numbers") if is_bool else ("numeric", "numbers")
            raise FeatureDataError(f"{kind} label column, but the schema's positive/negative values {pos}/{neg} "
                                   f"are not {expected}", column=column) from None
    is_pos = pc.is_in(vals, value_set=pos_set).to_numpy(zero_copy_only=False)
    if neg_set is not None:
        ok = is_pos | pc.is_in(vals, value_set=neg_set).to_numpy(zero_copy_only=False)
        if not ok.all():
            row = int(np.argmax(~ok))
            raise FeatureDataError(f"label value {vals[row].as_py()!r} is neither positive {list(pos)} "
                                   f"nor negative {list(neg)}", column=column, row=row)
    return is_pos.astype(np.float32)[:n]


def _label_number(value, is_bool: bool) -> float:
    """A declared positive / negative value as the number a label column holds. For a bool column (1 / 0) "true" and
    "false" in any case too: its rows in a CSV are such text ("True" written by pandas, "true" by Arrow), which a
    declared `positive: ["True"]` matches there, as a bool categorical's text matches the CSV's
    (vocab.canonical_text)."""
    if is_bool and str(value).lower() in ("true", "false"):
        return float(str(value).lower() == "true")
    return float(value)


def _refuse_nan_text(vals: pa.Array, declared: tuple, column: str) -> None:
    """Numbers declared (`positive: [1]`): a text that reads as NaN ("NaN", "nan") is a missing label, an error as
    a NaN in a float column is; with `positive` alone it had counted as a negative."""
    if not any(isinstance(k, float) for k in label_keys(declared)):
        return
    nan_texts = [v for v in pc.unique(vals).to_pylist() if v is not None and "_" not in v and _is_nan_text(v)]
    if nan_texts:
        row = int(np.argmax(pc.is_in(vals, value_set=pa.array(nan_texts, pa.string())).to_numpy(
            zero_copy_only=False)))
        raise FeatureDataError(f"label is NaN ({vals[row].as_py()!r})", column=column, row=row)


def _is_nan_text(text: str) -> bool:
    try:
        return math.isnan(float(text))
    except ValueError:
        return False


def _matching_texts(vals: pa.Array, wanted) -> pa.Array:
    """The distinct texts of `vals` that match a schema value, as text or as a number (schema.label_keys):
    `positive: [1]` matches "1" and "1.0" alike; "50000+." is no number and matches as text only."""
    keys = label_keys(tuple(wanted))
    numbers = {k for k in keys if isinstance(k, float)}
    out = []
    for v in pc.unique(vals).to_pylist():
        if v is None:
            continue
        if v in keys:
            out.append(v)
        elif numbers and "_" not in v:  # Python's float() takes "1_0"; a number in a CSV does not
            try:
                if float(v) in numbers:
                    out.append(v)
            except ValueError:
                pass
    return pa.array(out, pa.string())
