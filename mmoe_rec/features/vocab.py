"""Categorical values -> int64 ids: vocabularies (min-count, OOV bucket) and stable hashing.

Id 0 is always the out-of-vocabulary / missing bucket, so an unseen value at scoring time is just id 0.

- Vocabulary: ids 1..V for the values seen at least ``min_count`` times in the train split, most frequent first
  (ties by value), so ids do not depend on the order rows arrive in.
- Hashing: id = 1 + FNV-1a-64(utf-8 of the value) mod N. FNV-1a is computed with numpy over the Arrow string
  buffers (one vectorized step per byte position), so it is the same in every process and on every machine
  (Python's ``hash()`` is salted per process). Integers are hashed as their decimal string, so ``123`` in a
  Parquet int column and ``"123"`` in a CSV give the same bucket.

Integer columns are int64 values; uint64 values beyond int64 make their column decimal strings, which find the
same vocabulary entry and hash bucket as that text in a CSV. A vocabulary fitted on integers also finds the
integral-float text of its values (``"10.0"``, ``"1e3"``: how a CSV export writes an int column with gaps).
Specs fitted since 2026-12-06 fold such text, and a bool's ``"True"``, into one canonical form before counting,
looking up and hashing (``canonical_text``), so that a CSV and the same rows from Parquet give the same ids.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmoe_rec.features.arrow_kernels import if_else

FNV_OFFSET = np.uint64(0xCBF29CE484222325)
FNV_PRIME = np.uint64(0x100000001B3)
_DIRECT_MAX = 1 << 22  # int vocabularies spanning fewer values than this use a direct-address table
_CONSOLIDATE_AT = 1 << 21  # merge buffered per-batch counts once this many (value, count) pairs pile up
_PADDED_MAX_LEN = 24  # fnv1a64 hashes values up to this long all rows at once, without sorting by length
_INT64_MAX = (1 << 63) - 1
_FLOAT_TEXT = r"^[+-]?(\d+\.\d*|\.\d+|\d+(\.\d*)?[eE][+-]?\d+)$"  # a decimal point or an exponent


def normalize_values(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Categorical values as int64 (integer columns) or string (everything else), one chunk."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    t = arr.type
    if t == pa.uint64() and (pc.max(arr).as_py() or 0) > _INT64_MAX:
        return pc.cast(arr, pa.string())  # no int64 holds them: their decimal text, as a CSV would give them
    if pa.types.is_integer(t):
        return arr if t == pa.int64() else pc.cast(arr, pa.int64())
    if t == pa.string():
        return arr
    return pc.cast(arr, pa.string())


def integral_float_text_as_int(arr: pa.Array) -> pa.Array:
    """String values such as "10.0" or "1e3" as their integer's decimal text ("10", "1000"); other values as
    they are (so "007" or "10.5" still match no integer)."""
    is_float = pc.match_substring_regex(arr, _FLOAT_TEXT)
    if not pc.any(is_float).as_py():
        return arr
    x = pc.cast(if_else(is_float, arr, pa.scalar(None, pa.string())), pa.float64())
    # below 2**53 a float64 is its integer exactly; above, "9007199254740993.0" would find ...992's entry
    integral = pc.fill_null(pc.and_(pc.equal(x, pc.round(x)), pc.less(pc.abs(x), 2.0 ** 53)), False)
    as_int = pc.cast(pc.cast(if_else(integral, x, 0.0), pa.int64()), pa.string())
    return if_else(integral, as_int, arr)


_BOOL_TEXTS = pa.array(["True", "TRUE", "False", "FALSE"], pa.string())  # pandas' and others' bool text in a CSV


def canonical_text(values: pa.Array) -> pa.Array:
    """Categorical text as the one form every input format gives (specs fitted since 2026-12-06, a feature's
    `canonical_text`): a bool's text lower case, as a bool column gives it ("True" in a CSV written by pandas is
    the `true` of the same rows read from Parquet), and an integral float's text as its integer ("10.0", how a CSV
    export writes an int column with gaps, is the 10 of a float or int column). Integer values pass as they are."""
    if not pa.types.is_string(values.type) or len(values) == 0 or not _may_fold(values):
        return values
    if len(values) <= 1024:
        return _canonical_distinct(values)
    # on the distinct values (a column holds few; the regex costs ~40 ns a value), gathered back if any changed
    encoded = pc.dictionary_encode(values)
    distinct = encoded.dictionary
    canonical = _canonical_distinct(distinct)
    return values if canonical is distinct else canonical.take(encoded.indices)


_NUMBER_FIRST = np.zeros(256, bool)  # bytes a float's text can start with
_NUMBER_FIRST[list(b"0123456789+-.")] = True
_FLOAT_INNER = np.zeros(256, bool)  # bytes a float's text that is no plain integer holds
_FLOAT_INNER[list(b".eE")] = True


def _may_fold(values: pa.StringArray) -> bool:
    """Whether canonical_text could change any value: a bool's text ("True", "FALSE": T or F and 4 or 5 bytes), or
    a float's (a digit, sign or point first, and a point or an exponent in it). A byte scan of the buffers (~1 ns a
    byte), so that a column of ids or words, nearly every one, skips the regex and the dictionary (which took 3.6x
    the hash's own time on unique ids)."""
    _, offsets_buf, data_buf = values.buffers()
    if data_buf is None:
        return False
    n = len(values)
    offsets = np.frombuffer(offsets_buf, dtype=np.int32)[values.offset: values.offset + n + 1].astype(np.int64)
    data = np.frombuffer(data_buf, dtype=np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    first = np.zeros(n, np.uint8)  # (n,) each value's first byte (0 for an empty one)
    first[lengths > 0] = data[starts[lengths > 0]]
    if (((first == ord("T")) & (lengths == 4)) | ((first == ord("F")) & (lengths == 5))).any():
        return True
    number_first = _NUMBER_FIRST[first] & (lengths > 0)
    if not number_first.any():
        return False
    lo, hi = int(offsets[0]), int(offsets[-1])
    inner = np.flatnonzero(_FLOAT_INNER[data[lo:hi]]) + lo  # byte positions of '.', 'e', 'E'
    rows = np.searchsorted(offsets, inner, side="right") - 1  # (k,) the value each is in
    return bool(number_first[rows].any())


def _canonical_distinct(values: pa.Array) -> pa.Array:
    """canonical_text's rules; `values` itself when nothing changes."""
    is_bool = pc.is_in(values, value_set=_BOOL_TEXTS)
    if pc.any(is_bool).as_py():
        values = if_else(is_bool, pc.utf8_lower(values), values)
    return integral_float_text_as_int(values)


class VocabCounter:
    """Counts values over a stream of arrays in bounded extra memory (the distinct values themselves)."""

    def __init__(self) -> None:
        self._parts: dict[str, list[pa.Table]] = {"int": [], "str": []}
        self._pending = 0

    def update(self, values: pa.Array, canonical: bool = False) -> None:
        """canonical: count each value's canonical_text (taken on the distinct values; equal ones merge later)."""
        values = normalize_values(values)
        if len(values) == 0:
            return
        vc = pc.value_counts(values.drop_null())
        if len(vc) == 0:
            return
        kind = "int" if vc.type.field(0).type == pa.int64() else "str"
        distinct = canonical_text(vc.field("values")) if canonical else vc.field("values")
        self._parts[kind].append(pa.table({"v": distinct, "c": vc.field("counts")}))
        self._pending += len(vc)
        if self._pending >= _CONSOLIDATE_AT:
            self._consolidate()

    def _consolidate(self) -> None:
        for kind, parts in self._parts.items():
            if len(parts) > 1:
                t = pa.concat_tables(parts).group_by("v").aggregate([("c", "sum")]).rename_columns(["v", "c"])
                self._parts[kind] = [t]
        self._pending = 0

    def vocabulary(self, min_count: int = 1, max_size: int | None = None, fold: bool = True) -> tuple[list, str]:
        """(values ordered by count desc then value, value type "int", "str" or "mixed": text values fitted on
        integers and text together, Parquet ints and a CSV's text in one split). fold=False (`text: as_written`):
        integers and text together are compared as written ("250.0" is not 250), value type "str"."""
        ints, strs = self._parts["int"], self._parts["str"]
        kind = "int" if ints else "str"
        if ints and strs:  # compared as text, where a CSV's "10.0" is the 10 of the integers (as a vocabulary
            # fitted on integers finds it), not a value of its own; the lookup folds such text likewise ("mixed")
            if fold:
                strs = [pa.table({"v": integral_float_text_as_int(t["v"].combine_chunks()), "c": t["c"]})
                        for t in strs]
            strs += [pa.table({"v": pc.cast(t["v"], pa.string()), "c": t["c"]}) for t in ints]
            ints, kind = [], "mixed" if fold else "str"
        parts = ints or strs
        if not parts:
            return [], kind
        t = pa.concat_tables(parts).group_by("v").aggregate([("c", "sum")]).rename_columns(["v", "c"])
        t = t.filter(pc.greater_equal(t["c"], min_count))
        t = t.sort_by([("c", "descending"), ("v", "ascending")])
        if max_size is not None:
            t = t.slice(0, max_size)
        return t["v"].to_pylist(), kind


class VocabLookup:
    """Value -> id lookup built once per spec; ids 1..V, 0 for OOV and null."""

    def __init__(self, values: list, kind: str) -> None:
        self.size = len(values)
        # "mixed": text values (as "str") fitted on integers and text, where "10.0" that is no entry finds the 10
        self.fold_float_text = kind == "mixed"
        self.kind = "str" if kind == "mixed" else kind
        self._str_values = pa.array([str(v) for v in values], pa.string())
        # what an integer column can match in a vocabulary fitted on text: integer texts ("007" is not the 7 an
        # integer column gives, "7" is)
        self._int_texts = bool(pc.any(pc.match_substring_regex(self._str_values, r"^-?[1-9]\d*$|^0$")).as_py())
        self._table = None
        if kind == "int":
            vals = np.asarray(values, dtype=np.int64)
            self._order = np.argsort(vals, kind="stable")
            self._sorted = vals[self._order]
            if self.size and int(vals.max()) - int(vals.min()) < max(_DIRECT_MAX, 8 * self.size):
                # dense ids (the usual case): a direct-address table, one gather per value. It is padded with
                # a 0 at both ends so that out-of-range offsets clip onto OOV (np.take mode="clip").
                self._lo = int(vals.min())
                self._table = np.zeros(int(vals.max()) - self._lo + 3, np.int64)
                self._table[vals - self._lo + 1] = np.arange(1, self.size + 1)

    def type_mismatch(self, arr: pa.Array) -> str | None:
        """Why the values `arr` cannot match this vocabulary at all (every row would be out of vocabulary,
        silently), or None: an integer column with values, against a vocabulary of text values none of which
        is an integer's text."""
        if self.kind != "str" or self.size == 0 or len(arr) == arr.null_count:
            return None
        t = arr.type
        if pa.types.is_dictionary(t):
            t = t.value_type
        if pa.types.is_integer(t) and not self._int_texts:
            shown = self._str_values.slice(0, 3).to_pylist()
            return (f"the column is {t}, but its vocabulary was fitted on text values ({shown}, ...) none of which a "
                    f"{t} column can give: every row would be out of vocabulary. Give the raw text values (is this "
                    f"already-encoded feature data?)")
        return None

    def __call__(self, arr: pa.Array) -> np.ndarray:
        arr = normalize_values(arr)
        n = len(arr)
        if self.size == 0:
            return np.zeros(n, np.int64)
        if self.kind == "int" and arr.type == pa.int64():
            # sorted-array binary search: no hash table rebuilt per batch
            x = (arr.fill_null(np.iinfo(np.int64).min) if arr.null_count else arr).to_numpy(zero_copy_only=False)
            if self._table is not None:
                off = x - self._lo  # (n,) wraps like int64; in [0, span] inside the vocabulary range
                off += 1
                ids = np.take(self._table, off, mode="clip")  # out-of-range values clip onto a 0
                if arr.null_count:  # the int64-min fill may itself be in the vocabulary: nulls are OOV explicitly
                    ids[~arr.is_valid().to_numpy(zero_copy_only=False)] = 0
                return ids
            pos = np.searchsorted(self._sorted, x).clip(0, self.size - 1)
            hit = self._sorted[pos] == x
            if arr.null_count:
                hit &= arr.is_valid().to_numpy(zero_copy_only=False)
            return np.where(hit, self._order[pos] + 1, 0).astype(np.int64)
        if arr.type != pa.string():
            arr = pc.cast(arr, pa.string())
        elif self.kind == "int":  # "10.0" from a CSV is the 10 a float column gives (categorical_column)
            arr = integral_float_text_as_int(arr)
        idx = pc.index_in(arr, value_set=self._str_values)
        ids = idx.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64) + 1
        if self.fold_float_text and idx.null_count > arr.null_count:
            # the values no entry matched as written, and only those: "10.0" finds the 10 of the integers
            missed = np.flatnonzero((ids == 0) & arr.is_valid().to_numpy(zero_copy_only=False))
            folded = integral_float_text_as_int(arr.take(pa.array(missed)))
            again = pc.index_in(folded, value_set=self._str_values)
            ids[missed] = again.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64) + 1
        return ids


def fnv1a64(arr: pa.Array) -> np.ndarray:
    """FNV-1a 64-bit hash of each value's utf-8 bytes, (n,) uint64. Nulls hash like the empty string."""
    arr = normalize_values(arr)
    if arr.type != pa.string():
        arr = pc.cast(arr, pa.string())
    n = len(arr)
    h = np.full(n, FNV_OFFSET, dtype=np.uint64)
    if n == 0:
        return h
    _, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int32)[arr.offset: arr.offset + n + 1].astype(np.int64)
    lengths = np.diff(offsets)
    if arr.null_count:
        lengths = np.where(arr.is_valid().to_numpy(zero_copy_only=False), lengths, 0)
    if data_buf is None or lengths.max(initial=0) == 0:
        return h
    data = np.frombuffer(data_buf, dtype=np.uint8)
    starts = offsets[:-1]
    longest, shortest = int(lengths.max()), int(lengths.min())
    if longest <= _PADDED_MAX_LEN or n * longest <= 2 * int(lengths.sum()):
        return _fnv_padded(h, data, starts, lengths, shortest, longest)
    # process rows from longest to shortest so each byte position touches a prefix of the order
    order = np.argsort(-lengths, kind="stable")
    sorted_len = lengths[order]
    hs = h[order]
    ascending = sorted_len[::-1]
    with np.errstate(over="ignore"):
        for j in range(int(sorted_len[0])):
            k = n - int(np.searchsorted(ascending, j, side="right"))  # rows with length > j
            rows = order[:k]
            hs[:k] = (hs[:k] ^ data[starts[rows] + j].astype(np.uint64)) * FNV_PRIME
    h[order] = hs
    return h


def _fnv_padded(h: np.ndarray, data: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
                shortest: int, longest: int) -> np.ndarray:
    """FNV-1a over every row at once, one byte position per step (short or similar-length values, e.g. ids
    as decimal strings): full-width numpy steps with no sort; rows shorter than a position keep their hash."""
    data = np.concatenate([data, np.zeros(longest, np.uint8)])  # reads past a row's end stay in bounds
    pos = starts.copy()  # (n,) byte offset of position j of each row
    byte = np.empty(len(h), np.uint8)
    step = np.empty_like(h)
    with np.errstate(over="ignore"):
        for j in range(longest):
            np.take(data, pos, out=byte)
            np.bitwise_xor(h, byte, out=step)
            np.multiply(step, FNV_PRIME, out=step)
            if j < shortest:
                h, step = step, h
            else:
                np.copyto(h, step, where=lengths > j)
            pos += 1
    return h


def hash_ids(arr: pa.Array, buckets: int) -> np.ndarray:
    """Stable bucket ids in 1..buckets; 0 for null."""
    arr = normalize_values(arr)
    ids = (fnv1a64(arr) % np.uint64(buckets)).astype(np.int64) + 1
    if arr.null_count:
        ids[~arr.is_valid().to_numpy(zero_copy_only=False)] = 0
    return ids
