"""vocab: OOV / null ids of a sparse integer vocabulary, the float-text fold of a mixed one, bool text."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from mmoe_rec.features.vocab import VocabLookup, canonical_text


def test_a_null_is_oov_in_a_sparse_int_vocabulary_holding_int64_min():
    """Values too spread for the direct table take the binary search, where a null is filled with int64 min:
    a vocabulary holding that very value must still give the null id 0."""
    lo = int(np.iinfo(np.int64).min)
    lookup = VocabLookup([lo, 5, 10**15], "int")
    got = lookup(pa.array([None, lo, 10**15, 7], pa.int64()))
    np.testing.assert_array_equal(got, [0, 1, 3, 0])


def test_a_mixed_vocabulary_finds_an_integers_entry_from_its_float_text():
    """Fitted on integers and text together ("mixed"): a CSV's "10.0" is the 10 of the integers."""
    lookup = VocabLookup(["10", "abc", "7"], "mixed")
    got = lookup(pa.array(["10.0", "abc", "7", "1e1", "10.5", None]))
    np.testing.assert_array_equal(got, [1, 2, 3, 1, 0, 0])


def test_canonical_text_lowers_false_as_well_as_true():
    assert canonical_text(pa.array(["False", "x"])).to_pylist() == ["false", "x"]
    assert canonical_text(pa.array(["FALSE", "True"])).to_pylist() == ["false", "true"]
