"""id_columns: string and large_string widen to large_string; a column whose type changed after the plan is named."""
from __future__ import annotations

import pyarrow as pa
import pytest

from mmoe_rec.features.errors import FeatureDataError
from mmoe_rec.features.id_columns import cast_ids, common_type, plan_id_types


def test_string_and_large_string_ids_are_written_as_large_string():
    assert common_type(pa.string(), pa.large_string()) == pa.large_string()
    assert plan_id_types([("a", {"uid": pa.string()}), ("b", {"uid": pa.large_string()})]) == {"uid": pa.large_string()}


def test_cast_ids_refuses_a_type_the_plan_does_not_hold():
    table = pa.table({"uid": pa.array(["007", "8"])})
    with pytest.raises(FeatureDataError, match="int64 was planned"):
        cast_ids(table, {"uid": pa.int64()}, "late.parquet")
