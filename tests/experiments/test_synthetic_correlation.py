"""experiments/synthetic_correlation.py: the statistics of its OMoE / MMoE table (no training here)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
from synthetic_correlation import geometric_mean_interval, print_tables  # noqa: E402


def test_geometric_mean_is_symmetric_in_the_ratio_where_the_arithmetic_mean_is_not():
    mean, lo, hi = geometric_mean_interval([2.0, 0.5])
    assert mean == pytest.approx(1.0)  # the arithmetic mean would say 1.25: MMoE "better" for no reason
    assert lo == pytest.approx(0.5) and hi == pytest.approx(2.0)  # resamples: both 2.0, both 0.5 or one of each


def test_interval_holds_the_mean_shrinks_with_agreement_and_is_reproducible():
    spread = [0.6, 1.7, 0.9, 1.4, 1.1, 0.8, 1.9, 1.2]
    mean, lo, hi = geometric_mean_interval(spread)
    assert mean == pytest.approx(math.exp(sum(math.log(v) for v in spread) / len(spread)))
    assert lo < mean < hi
    assert geometric_mean_interval(spread) == (mean, lo, hi)  # fixed resampling seed
    _, lo_tight, hi_tight = geometric_mean_interval([1.19, 1.2, 1.21, 1.2, 1.2, 1.19, 1.21, 1.2])
    assert lo < lo_tight < 1.2 < hi_tight < hi
    assert geometric_mean_interval([1.5]) == (pytest.approx(1.5),) * 3


def test_table_reports_mmoes_lead_and_its_change_with_p_paired_by_seed(capsys):
    # Two seeds, MMoE 1.5x better than OMoE at p = 0.0 and equal at p = 1.0 on both: lead 1 -> 1.5, relative 1.5.
    table = {("shared-bottom", 1.0): [1.0, 2.0], ("OMoE", 1.0): [0.5, 1.0], ("MMoE", 1.0): [0.5, 1.0],
             ("shared-bottom", 0.0): [1.0, 2.0], ("OMoE", 0.0): [0.6, 1.2], ("MMoE", 0.0): [0.4, 0.8]}
    print_tables(table, "test", [1.0, 0.0], [0, 1])
    out = capsys.readouterr().out
    assert "| OMoE / MMoE | 1.00 [1.00, 1.00] (0/2) | 1.50 [1.50, 1.50] (2/2) |" in out
    assert "| MMoE's lead relative to p = 1.0 | 1 | 1.50 [1.50, 1.50] |" in out
    assert "| OMoE | 0.50 | 0.60 |" in out  # relative to shared-bottom on the same data
