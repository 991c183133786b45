"""Each fast path of the feature pipeline equals a plain slow reference written here (pure python / numpy):
dictionary-column ids, FNV-1a-64 hashing, the vocabulary lookup table, bucketize by comparisons and
group_by_split."""
from __future__ import annotations

import bisect

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmoe_rec.features import numeric, vocab
from mmoe_rec.features.build import SPLITS, Source, build, dictionary_inputs, group_by_split
from mmoe_rec.features.columns import dictionary_fast_path, numeric_column
from mmoe_rec.features.numeric import apply_numeric
from mmoe_rec.features.schema import parse_schema
from mmoe_rec.features.spec import FeatureSpec, SparseFeature, Task
from mmoe_rec.features.transform import CompiledSpec, compiled, transform_table
from mmoe_rec.features.vocab import VocabLookup, fnv1a64, hash_ids

M64 = (1 << 64) - 1
I64_MIN, I64_MAX = int(np.iinfo(np.int64).min), int(np.iinfo(np.int64).max)


# ---------------------------------------------------------------- slow references

def fnv_ref(s: str | None) -> int:
    """FNV-1a 64 over the utf-8 bytes (published offset basis and prime); None hashes like ""."""
    h = 0xCBF29CE484222325
    for byte in (s or "").encode("utf-8"):
        h = ((h ^ byte) * 0x100000001B3) & M64
    return h


def id_ref(v, st: dict) -> int:
    """Id of one categorical value: 0 for missing / OOV, vocabulary position + 1, or 1 + hash % buckets."""
    if v is None:
        return 0
    if st["kind"] == "vocab":
        vals = st["values"] if st["value_type"] == "int" else [str(x) for x in st["values"]]
        key = v if st["value_type"] == "int" and isinstance(v, int) else str(v)
        return vals.index(key) + 1 if key in vals else 0
    return 1 + fnv_ref(str(v)) % st["buckets"]


def ids_ref(v, st: dict):
    if not st["multi_valued"]:
        return id_ref(None if v == "" else v, st)  # "" is missing, even where an old vocabulary holds it
    pieces = [] if v is None else [p for p in v.split(st["delimiter"]) if p != ""]  # empty pieces are no values
    return [id_ref(p, st) for p in pieces]


# ---------------------------------------------------------------- dictionary-encoded categorical columns

POOL = ["alice", "bob", "", "a||b", "|c|", "a|b|c", "日本|語", "émoji😀|a", "c", "zed|", "||", "b|b", None]
S_VOCAB = ["alice", "", "bob", "émoji😀|a", "日本|語", "|c|"]
M_VOCAB = ["a", "b", "日本", "émoji😀", "zed"]


def _state(kind, column, multi, **kw):
    st = {"kind": kind, "column": column, "multi_valued": multi, "delimiter": "|" if multi else None}
    if kind == "vocab":
        st.update(value_type=kw.get("value_type", "str"), values=kw["values"], num_embeddings=len(kw["values"]) + 1)
    else:
        st.update(buckets=kw["buckets"], num_embeddings=kw["buckets"] + 1)
    return st


FEATURES = {
    "s_vocab": _state("vocab", "s", False, values=S_VOCAB),
    "s_hash": _state("hash", "s", False, buckets=97),
    "m_vocab": _state("vocab", "m", True, values=M_VOCAB),
    "m_hash": _state("hash", "m", True, buckets=13),
    "i_vocab": _state("vocab", "i", False, values=[7, -3, 40, 0], value_type="int"),
    "i_hash": _state("hash", "i", False, buckets=31),
}


@pytest.fixture(scope="module")
def cspec() -> CompiledSpec:
    spec = FeatureSpec(sparse_features=[SparseFeature(n, st["num_embeddings"], st["multi_valued"])
                                        for n, st in FEATURES.items()],
                       dense_features=[], tasks=[Task("click")],
                       transforms={"features": FEATURES, "tasks": {}, "weight_column": None}).finalize()
    return CompiledSpec(spec)


def _rows(n: int, seed: int) -> tuple[list, list]:
    rng = np.random.default_rng(seed)
    strs = [POOL[i] for i in rng.integers(0, len(POOL), n)] + POOL  # every pool value at least once
    picks = rng.choice([7, -3, 40, 0, 5, 99], len(strs))  # 5 and 99 are out of the int vocabulary
    ints = [None if r < 0.1 else int(v) for r, v in zip(rng.random(len(strs)), picks)]
    return strs, ints


def _check(cspec: CompiledSpec, s_col, m_col, i_col, s_py: list, m_py: list, i_py: list) -> None:
    """transform() of (possibly dictionary-encoded) columns == the reference and == the plain-column transform."""
    table = pa.table({"s": s_col, "m": m_col, "i": i_col})
    got = cspec.transform(table, with_labels=False)
    plain = pa.table({"s": pa.array(s_py, pa.string()), "m": pa.array(m_py, pa.string()),
                      "i": pa.array(i_py, pa.int64())})
    assert got.to_pylist() == cspec.transform(plain, with_labels=False).to_pylist()
    for name, st in FEATURES.items():
        raw = {"s": s_py, "m": m_py, "i": i_py}[st["column"]]
        assert got[name].to_pylist() == [ids_ref(v, st) for v in raw], name


def test_dictionary_path_is_taken_for_these_columns():
    # the tests below must reach CompiledSpec._dictionary_ids, not the decoding fallback
    for t in (pa.dictionary(pa.int32(), pa.string()), pa.dictionary(pa.int8(), pa.large_string())):
        assert dictionary_fast_path(FEATURES["s_vocab"], t) and dictionary_fast_path(FEATURES["m_hash"], t)
    assert dictionary_fast_path(FEATURES["i_vocab"], pa.dictionary(pa.int32(), pa.int64()))
    assert not dictionary_fast_path(FEATURES["m_vocab"], pa.string())


def test_dictionary_column_equals_plain_column(cspec):
    s, i = _rows(400, seed=0)
    enc = pa.array(s, pa.string()).dictionary_encode()  # nulls are null indices
    assert pa.types.is_dictionary(enc.type) and enc.null_count > 0
    _check(cspec, enc, enc, pa.array(i, pa.int64()).dictionary_encode(), s, s, i)


def test_dictionary_with_null_duplicate_and_unused_entries(cspec):
    # a dictionary may hold a null, repeat a value and hold values no row uses
    dictionary = pa.array(["a||b", None, "alice", "alice", "unused|x", "|c|", "", "日本|語", "never"])
    rng = np.random.default_rng(1)
    idx = rng.integers(0, 8, 300).astype(np.int32)
    valid = rng.random(300) > 0.15
    indices = pa.array(idx, mask=~valid)
    col = pa.DictionaryArray.from_arrays(indices, dictionary)
    py = [dictionary[int(k)].as_py() if ok else None for k, ok in zip(idx, valid)]
    ints = pa.DictionaryArray.from_arrays(indices, pa.array([7, None, 40, 40, 1, 0, -3, 99, 5], pa.int64()))
    i_py = [ints.dictionary[int(k)].as_py() if ok else None for k, ok in zip(idx, valid)]
    _check(cspec, col, col, ints, py, py, i_py)


@pytest.mark.parametrize("index_type", [pa.int8(), pa.int16(), pa.int64()])
@pytest.mark.parametrize("value_type", [pa.string(), pa.large_string()])
def test_dictionary_index_and_value_types(cspec, index_type, value_type):
    s, i = _rows(200, seed=2)
    enc = pa.array(s, value_type).dictionary_encode()
    col = pa.DictionaryArray.from_arrays(enc.indices.cast(index_type), enc.dictionary)
    ienc = pa.array(i, {pa.int8(): pa.int16(), pa.int16(): pa.int32()}.get(index_type, pa.int64())).dictionary_encode()
    icol = pa.DictionaryArray.from_arrays(ienc.indices.cast(index_type), ienc.dictionary)
    _check(cspec, col, col, icol, s, s, i)


def test_dictionary_sliced_chunked_and_empty(cspec):
    s, i = _rows(300, seed=3)
    enc, ienc = pa.array(s).dictionary_encode(), pa.array(i, pa.int64()).dictionary_encode()
    for start, length in [(0, 1), (7, 50), (123, 177), (299, 1), (50, 0)]:
        _check(cspec, enc.slice(start, length), enc.slice(start, length), ienc.slice(start, length),
               s[start:start + length], s[start:start + length], i[start:start + length])
    # chunks with different dictionaries (as from different row groups), one of them sliced
    cut = [s[:100], s[150:] + ["new|one"]]
    icut = [i[:100], i[150:] + [12345]]
    chunks = [pa.array(cut[0]).dictionary_encode(), pa.array(cut[1]).dictionary_encode().slice(3)]
    ichunks = [pa.array(icut[0], pa.int64()).dictionary_encode(),
               pa.array(icut[1], pa.int64()).dictionary_encode().slice(3)]
    s_py, i_py = cut[0] + cut[1][3:], icut[0] + icut[1][3:]
    _check(cspec, pa.chunked_array(chunks), pa.chunked_array(chunks), pa.chunked_array(ichunks), s_py, s_py, i_py)


def test_dictionary_all_null_rows(cspec):
    n = 5
    col = pa.DictionaryArray.from_arrays(pa.array([None] * n, pa.int32()), pa.array(["a|b", "alice"]))
    icol = pa.DictionaryArray.from_arrays(pa.array([None] * n, pa.int32()), pa.array([7], pa.int64()))
    _check(cspec, col, col, icol, [None] * n, [None] * n, [None] * n)


def test_int8_dictionary_with_128_values_and_a_null(cspec):
    # int8 indices address 128 dictionary values (0..127); a null index must still be a missing value
    dictionary = pa.array([f"v{k}" for k in range(127)] + ["alice"])
    col = pa.DictionaryArray.from_arrays(pa.array([127, None, 0], pa.int8()), dictionary)
    got = cspec.transform(pa.table({"s": col, "m": col, "i": pa.array([1, 2, 3])}), with_labels=False)
    plain = col.cast(pa.string())
    ref = cspec.transform(pa.table({"s": plain, "m": plain, "i": pa.array([1, 2, 3])}), with_labels=False)
    assert got["s_vocab"].to_pylist() == ref["s_vocab"].to_pylist() == [1, 0, 0]
    # 'alice' and 'v0' are single OOV pieces (id 0); the null row is an empty list
    assert got["m_vocab"].to_pylist() == ref["m_vocab"].to_pylist() == [[0], [], [0]]


def test_build_reads_dictionary_columns_and_matches_plain_transform(tmp_path):
    # end to end: the Parquet transform pass reads these string columns dictionary-encoded
    schema = parse_schema({
        "categorical": [{"name": "s"}, {"name": "sh", "column": "s", "buckets": 53},
                        {"name": "m", "multi_valued": True, "delimiter": "|"},
                        {"name": "mh", "column": "m", "multi_valued": True, "delimiter": "|", "buckets": 11}],
        "tasks": [{"name": "click"}]})
    s, _ = _rows(600, seed=4)
    rng = np.random.default_rng(5)
    m = [POOL[k] for k in rng.integers(0, len(POOL), len(s))]
    raw = pa.table({"s": pa.array(s), "m": pa.array(m), "click": pa.array(rng.integers(0, 2, len(s)))})
    path = tmp_path / "raw.parquet"
    pq.write_table(raw, path, row_group_size=150)
    spec = build(schema, [Source((str(path),), "random", SPLITS, (0.6, 0.2, 0.2))], tmp_path / "out",
                 seed=1, batch_rows=200)
    assert sorted(dictionary_inputs(compiled(spec), [])) == ["m", "s"]
    expected = transform_table(spec, raw, with_labels=True)  # plain string columns: the slow path
    got = {s_: pq.read_table(tmp_path / "out" / s_) for s_ in SPLITS}
    rows = []
    for s_ in SPLITS:
        rows += got[s_].to_pylist()
    assert sorted(rows, key=repr) == sorted(expected.to_pylist(), key=repr)
    feats = spec.transforms["features"]
    ref = {name: [ids_ref(v, st) for v in raw.column(st["column"]).to_pylist()] for name, st in feats.items()}
    for name in feats:
        assert expected[name].to_pylist() == ref[name], name


# ---------------------------------------------------------------- FNV-1a 64

def test_fnv_constants_and_published_vectors():
    assert int(vocab.FNV_OFFSET) == 0xCBF29CE484222325 and int(vocab.FNV_PRIME) == 0x100000001B3
    # FNV-1a 64 test vectors from the reference implementation's test suite
    got = fnv1a64(pa.array(["", "a", "foobar"])).tolist()
    assert got == [0xCBF29CE484222325, 0xAF63DC4C8601EC8C, 0x85944171F73967E8]
    assert [fnv_ref(v) for v in ["", "a", "foobar"]] == got


def _random_strings(rng, n: int, lo: int, hi: int, alphabet: str) -> list[str]:
    return ["".join(rng.choice(list(alphabet), int(k))) for k in rng.integers(lo, hi + 1, n)]


def _padded(values: list) -> bool:
    """Which branch fnv1a64 takes (mirrors its rule) so that the cases below cover both."""
    lengths = np.array([len((v or "").encode()) for v in values])
    longest = int(lengths.max(initial=0))
    return longest <= vocab._PADDED_MAX_LEN or len(values) * longest <= 2 * int(lengths.sum())


ASCII = "abcdefghijklmnopqrstuvwxyz0123456789_-|"
UNI = "aé日本語😀ßЖ\u0301"  # 1- to 4-byte utf-8 characters and a combining mark


def _fnv_cases() -> dict[str, list]:
    rng = np.random.default_rng(7)
    return {
        "short": _random_strings(rng, 500, 0, 24, ASCII) + ["", "a", "123", "x" * 24],
        "short_unicode": _random_strings(rng, 300, 0, 6, UNI) + ["", "日本語", "😀"],
        "long_similar": _random_strings(rng, 200, 40, 60, ASCII),
        "long_uneven": _random_strings(rng, 200, 0, 3, ASCII) + _random_strings(rng, 20, 40, 200, ASCII) + [""],
        "long_unicode": _random_strings(rng, 100, 0, 2, UNI) + _random_strings(rng, 10, 40, 120, UNI),
        "mixed_with_nulls": [None, ""] + _random_strings(rng, 150, 0, 200, ASCII + UNI) + [None],
        "long_padded_uneven": ["k" * 100] * 10 + ["", None, "ab", "z" * 30, "é" * 20],  # padded, rows end early
        "one_long": ["q" * 200],
        "all_empty": ["", "", None],
        "empty": [],
    }


@pytest.mark.parametrize("case", list(_fnv_cases()))
def test_fnv1a64_equals_pure_python(case):
    values = _fnv_cases()[case]
    arr = pa.array(values, pa.string())
    assert fnv1a64(arr).tolist() == [fnv_ref(v) for v in values]
    assert fnv1a64(pa.array(values, pa.large_string())).tolist() == [fnv_ref(v) for v in values]
    if len(values) > 10:  # sliced arrays: the buffers start before the first row
        for a, b in [(3, len(values)), (1, len(values) - 2), (len(values) // 2, len(values) // 2 + 5)]:
            assert fnv1a64(arr.slice(a, b - a)).tolist() == [fnv_ref(v) for v in values[a:b]]


def test_fnv_cases_cover_both_branches():
    cases = _fnv_cases()
    assert _padded(cases["short"]) and _padded(cases["long_similar"]) and _padded(cases["long_padded_uneven"])
    assert max(len(v or "") for v in cases["long_padded_uneven"]) > vocab._PADDED_MAX_LEN
    assert not _padded(cases["long_uneven"]) and not _padded(cases["long_unicode"])
    assert not _padded(cases["mixed_with_nulls"])


@pytest.mark.parametrize("long", [False, True])
def test_fnv_null_with_bytes_hashes_like_empty(long):
    # a null slot may still own bytes in the data buffer; it must hash like ""
    values = ["abc", "x" * (150 if long else 10), "", "de", "f" * 40]
    base = pa.array(values)
    validity = pa.py_buffer(np.packbits([1, 0, 1, 1, 1], bitorder="little").tobytes())
    arr = pa.StringArray.from_buffers(len(values), base.buffers()[1], base.buffers()[2], validity, 1)
    assert arr.to_pylist()[1] is None
    assert fnv1a64(arr).tolist() == [fnv_ref(v) for v in ["abc", None, "", "de", "f" * 40]]


def test_hash_ids_of_ints_are_the_decimal_strings():
    ints = [0, 7, -3, 123, I64_MAX, I64_MIN, None]
    want = [0 if v is None else 1 + fnv_ref(str(v)) % 1000 for v in ints]
    assert hash_ids(pa.array(ints, pa.int64()), 1000).tolist() == want
    assert hash_ids(pa.array(ints, pa.int64()).cast(pa.int32(), safe=False).slice(0, 4), 1000).tolist() == want[:4]


# ---------------------------------------------------------------- vocabulary lookup

@pytest.mark.parametrize("vals", [
    [5, 7, 100, 6],                      # small span: direct-address table
    [-50, 3, 0, -1],
    [0, 10 ** 12, 17],                   # huge span: sorted binary search
    [I64_MAX, I64_MAX - 3, I64_MAX - 1],  # table touching int64 max
    [I64_MIN + 1, I64_MIN + 5],          # table touching int64 min
])
def test_vocab_lookup_int_equals_dict(vals):
    lk = VocabLookup(vals, "int")
    queries = [None] + vals + [v + d for v in vals for d in (-2, -1, 1, 2) if I64_MIN <= v + d <= I64_MAX] \
        + [I64_MIN, I64_MAX, 0, -1, 1, 10 ** 15, -(10 ** 15)]
    ref = {v: k + 1 for k, v in enumerate(vals)}
    want = [0 if q is None else ref.get(q, 0) for q in queries]
    assert lk(pa.array(queries, pa.int64())).tolist() == want
    assert lk(pa.array(queries, pa.int64()).slice(1)).tolist() == want[1:]
    # integers given as another int type or as strings find the same ids
    small = [q for q in queries if q is None or -(2 ** 31) <= q < 2 ** 31]
    assert lk(pa.array(small, pa.int32())).tolist() == [0 if q is None else ref.get(q, 0) for q in small]
    assert lk(pa.array([None if q is None else str(q) for q in queries])).tolist() == want


def test_vocab_lookup_uses_table_for_dense_ids():
    assert VocabLookup([5, 7, 100], "int")._table is not None
    assert VocabLookup([0, 10 ** 12], "int")._table is None


def test_vocab_lookup_null_is_oov_when_vocab_holds_int64_min():
    # nulls are filled with int64 min before the table lookup; they must not take that value's id
    lk = VocabLookup([I64_MIN + 1, I64_MIN], "int")
    assert lk(pa.array([None, I64_MIN, I64_MIN + 1, 0], pa.int64())).tolist() == [0, 2, 1, 0]


def test_vocab_lookup_strings_and_empty_vocab():
    lk = VocabLookup(["b", "", "日本", "a|b"], "str")
    q = ["b", "", None, "日本", "a|b", "a", "B"]
    assert lk(pa.array(q)).tolist() == [1, 2, 0, 3, 4, 0, 0]
    assert VocabLookup([], "int")(pa.array([1, None])).tolist() == [0, 0]


# ---------------------------------------------------------------- bucketize

def _bucket_ref(bounds: np.ndarray, x: np.ndarray, missing: np.ndarray) -> np.ndarray:
    ref = np.searchsorted(bounds, x, side="right").astype(np.int64) + 1  # id - 1 = boundaries <= x
    ref[missing] = 0
    # and a pure-python second opinion
    assert ref.tolist() == [0 if m else bisect.bisect_right(bounds.tolist(), v) + 1 for v, m in zip(x, missing)]
    return ref


@pytest.mark.parametrize("nb", [0, 1, 2, 5, 15, 16, 17, 40])
def test_bucketize_equals_searchsorted(nb):
    rng = np.random.default_rng(nb)
    bounds = np.unique(np.round(rng.normal(0, 10, nb), 1))
    while len(bounds) < nb:
        bounds = np.unique(np.append(bounds, rng.normal(0, 10)))
    assert len(bounds) == nb
    if nb:
        bounds[0] = 0.0 if 0.0 not in bounds else bounds[0]
        bounds = np.unique(bounds)
    assert (len(bounds) <= numeric._COMPARE_MAX_BOUNDARIES) == (nb <= 16)
    mids = (bounds[:-1] + bounds[1:]) / 2 if nb > 1 else np.empty(0)
    x = np.concatenate([bounds, np.nextafter(bounds, -np.inf), np.nextafter(bounds, np.inf), mids,
                        rng.normal(0, 15, 300), [-np.inf, np.inf, -0.0, 0.0, 1e300, -1e300, 0.0, 0.0]])
    missing = np.zeros(len(x), bool)
    missing[-2:] = True  # missing values arrive as 0 with the mask set (column_values)
    st = {"transform": "bucketize", "boundaries": [float(b) for b in bounds]}
    ids, none = apply_numeric(st, x.copy(), missing)
    assert none is None and ids.dtype == np.int64
    np.testing.assert_array_equal(ids, _bucket_ref(bounds, x, missing))


@pytest.mark.parametrize("nb", [3, 16, 17])
def test_bucketize_from_arrow_with_nulls_and_nan(nb):
    bounds = np.arange(nb, dtype=np.float64)  # 0, 1, 2, ...
    raw = [None, float("nan"), 0.0, 1.0, -0.5, nb - 1.0, nb + 3.0, 2.5, None]
    x, missing = numeric_column(pa.array(raw, pa.float64()), "pos")
    ids, _ = apply_numeric({"transform": "bucketize", "boundaries": bounds.tolist()}, x, missing)
    assert ids.tolist() == _bucket_ref(bounds, x, missing).tolist()
    assert ids[[0, 1, 8]].tolist() == [0, 0, 0] and ids[2] == 2 and ids[4] == 1 and ids[6] == nb + 1


# ---------------------------------------------------------------- group_by_split

def _table(n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    lists = [None if r < 0.1 else list(range(int(k))) for r, k in zip(rng.random(n), rng.integers(0, 4, n))]
    t = pa.table({"row": pa.array(np.arange(n, dtype=np.int64)),
                  "s": pa.array([None if r < 0.2 else f"v{int(r * 100)}" for r in rng.random(n)]),
                  "l": pa.array(lists, pa.list_(pa.int64())),
                  "f": pa.array(rng.normal(size=n).astype(np.float32))})
    if n > 4:  # several chunks per column, as from concatenated batches
        t = pa.concat_tables([t.slice(0, n // 3), t.slice(n // 3)])
    return t


def _check_groups(table: pa.Table, split: np.ndarray) -> list:
    parts = group_by_split(table, split)
    rows = table.to_pylist()
    want = [(k, [r for r, s in zip(rows, split.tolist()) if s == k]) for k in range(len(SPLITS))]
    want = [(k, r) for k, r in want if r]
    assert [(k, p.to_pylist()) for k, p in parts] == want
    assert all(p.schema == table.schema for _, p in parts)
    assert sorted(r["row"] for _, p in parts for r in p.to_pylist()) == sorted(r["row"] for r in rows)
    return parts


@pytest.mark.parametrize("n", [1, 2, 17, 1000])
def test_group_by_split_random(n):
    rng = np.random.default_rng(n)
    _check_groups(_table(n, n), rng.integers(0, 3, n).astype(np.int8))


def test_group_by_split_empty_splits_and_one_split():
    t = _table(500, 9)
    rng = np.random.default_rng(9)
    _check_groups(t, np.where(rng.random(500) < 0.7, 2, 0).astype(np.int8))  # valid is empty
    _check_groups(t, np.where(rng.random(500) < 0.5, 1, 2).astype(np.int8))  # train is empty
    one = np.zeros(500, np.int8)
    one[-1] = 1  # all but one row in a split: not the pass-through
    _check_groups(t, one)
    for k in range(len(SPLITS)):  # the whole batch in one split is passed through
        parts = _check_groups(t, np.full(500, k, np.int8))
        assert len(parts) == 1 and parts[0][0] == k and parts[0][1].equals(t)


def test_group_by_split_empty_table():
    assert group_by_split(_table(0, 0), np.zeros(0, np.int8)) == []
