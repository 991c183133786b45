"""columns: float categorical values beyond int64 are refused (float16 ones checked without an overflow warning);
"1_0" is no number in a label column; a bool label matches declared "true" / "false" text."""
from __future__ import annotations

import warnings

import numpy as np
import pyarrow as pa
import pytest

from mmoe_rec.features.columns import categorical_column, label_values
from mmoe_rec.features.errors import FeatureDataError


@pytest.mark.parametrize("value", [1e19, -1e19, float("inf")])
def test_a_float_categorical_value_beyond_int64_is_refused_not_wrapped(value):
    with pytest.raises(FeatureDataError, match="out-of-range number"):
        categorical_column(pa.array([1.0, value, None]), "c")
    assert categorical_column(pa.array([1.0, 2.0**62, None]), "c").to_pylist() == [1, 2**62, None]


def test_a_float16_categorical_column_is_checked_without_an_overflow_warning():
    """2.0 ** 63 compared with float16 values warned "overflow encountered in cast" on every batch."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = categorical_column(pa.array([1.0, None, 7.0, 2048.0]).cast(pa.float16()), "c")
        with pytest.raises(FeatureDataError, match="out-of-range number inf"):
            categorical_column(pa.array([1.0, float("inf")]).cast(pa.float16()), "c")
    assert got.to_pylist() == [1, None, 7, 2048]


def test_a_label_text_with_an_underscore_is_not_the_number_python_reads_in_it():
    state = {"type": "binary", "positive": [10.0], "negative": None}
    got = label_values(pa.array(["10", "1_0", "10.0", "7"]), "y", state)
    np.testing.assert_array_equal(got, [1.0, 0.0, 1.0, 0.0])


@pytest.mark.parametrize("positive, negative", [(["True"], None), (["true"], ["FALSE"]), ([1], [0]), (["1"], ["false"])])
def test_a_bool_label_matches_declared_true_and_false_text_as_its_csv_text_does(positive, negative):
    """A bool Parquet label with `positive: ["True"]` was refused ("not numbers"), the same rows as CSV built."""
    state = {"type": "binary", "positive": positive, "negative": negative}
    got = label_values(pa.array([True, False, True]), "y", state)
    np.testing.assert_array_equal(got, [1.0, 0.0, 1.0])


def test_a_bool_label_refuses_declared_text_that_is_neither_true_false_nor_a_number():
    state = {"type": "binary", "positive": ["yes"], "negative": None}
    with pytest.raises(FeatureDataError, match=r"bool label column.*\['yes'\].*not true / false or numbers"):
        label_values(pa.array([True, False]), "y", state)
