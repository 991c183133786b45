"""columns: float categorical values beyond int64 are refused; "1_0" is no number in a label column."""
from __future__ import annotations

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


def test_a_label_text_with_an_underscore_is_not_the_number_python_reads_in_it():
    state = {"type": "binary", "positive": [10.0], "negative": None}
    got = label_values(pa.array(["10", "1_0", "10.0", "7"]), "y", state)
    np.testing.assert_array_equal(got, [1.0, 0.0, 1.0, 0.0])
