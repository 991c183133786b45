"""numeric: float32 range checks both ways, the reservoir's uniform sample, an explicit missing indicator."""
from __future__ import annotations

import numpy as np
import pytest

from mmoe_rec.features.errors import FeatureDataError
from mmoe_rec.features.numeric import NumericStats, apply_numeric, fit_numeric, to_float32
from mmoe_rec.features.schema import NumericSpec


def test_a_value_below_minus_float32_max_is_an_error_too():
    with pytest.raises(FeatureDataError, match="does not fit a float32"):
        to_float32(np.array([1.0, -1e39]), "x")


def test_the_quantile_sample_is_uniform_not_the_first_values_seen():
    stats = NumericStats("x", reservoir_size=500)
    for part in np.array_split(np.arange(20_000, dtype=np.float64), 4):  # sorted: the first values are the smallest
        stats.update(part, np.zeros(part.size, bool))
    median = float(stats.quantiles(np.array([0.5]))[0])
    assert median == pytest.approx(10_000, rel=0.15)


@pytest.mark.parametrize("indicator, missing, want", [(True, 0, True), (False, 3, False), ("auto", 3, True),
                                                      ("auto", 0, False)])
def test_an_explicit_missing_indicator_setting_wins_over_the_train_split(indicator, missing, want):
    stats = NumericStats("x")
    x = np.arange(10, dtype=np.float64)
    mask = np.zeros(10, bool)
    mask[:missing] = True
    stats.update(x, mask)
    state = fit_numeric(NumericSpec("x", "x", missing_indicator=indicator), stats)
    assert state["indicator"] is want
    _, ind = apply_numeric(state, np.array([1.0, 0.0]), np.array([False, True]))
    assert (ind is not None) == want


def _constant_state(value: float, n: int = 10_000) -> dict:
    stats = NumericStats("x")
    for part in np.array_split(np.full(n, value), 3):
        stats.update(part, np.zeros(part.size, bool))
    return fit_numeric(NumericSpec("x", "x"), stats)


def test_a_constant_column_whose_mean_rounds_is_still_constant():
    # 0.1 * 10,000 rows: the block means carry a rounding error, M2 ~ 1e-30 (std ~ 1e-17); that is no spread
    state = _constant_state(0.1)
    assert state["std"] == 1.0
    value, _ = apply_numeric(state, np.array([0.1, 1.1]), np.zeros(2, bool))
    np.testing.assert_allclose(value, [0.0, 1.0], atol=1e-6)


@pytest.mark.parametrize("value", [12_345.67, 98_765.4321, 1_234_567.89])
def test_a_constant_column_of_large_non_integral_values_stays_0_and_unit_scaled(value):
    # fails on 41cc2db: the rounding error of the mean (~1e-12 .. 1e-10) passes the absolute 1e-12 guard as a
    # standard deviation, so the train value itself becomes -1 and value + 1 about 3e11
    state = _constant_state(value)
    assert state["std"] == 1.0
    out, _ = apply_numeric(state, np.array([value, value + 1.0]), np.zeros(2, bool))
    np.testing.assert_allclose(out, [0.0, 1.0], atol=1e-3)
