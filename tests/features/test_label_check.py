"""label_check: only train rows count, and the error shows at most SHOWN_VALUES values."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from mmoe_rec.features.errors import FeatureDataError
from mmoe_rec.features.label_check import SHOWN_VALUES, TrainLabelCheck
from mmoe_rec.features.spec import label_column

TASKS = {"click": {"type": "binary", "column": "clicked", "positive": ["yes"], "negative": None}}


def test_a_positive_outside_the_train_split_does_not_count():
    raw = pa.table({"clicked": ["no", "yes", "no"]})
    features = pa.table({label_column("click"): pa.array([0.0, 1.0, 0.0], pa.float32())})
    check = TrainLabelCheck(TASKS)
    check.update(raw, features, np.array([True, False, True]))  # the only positive is a validation row
    with pytest.raises(FeatureDataError, match="no positive row in the train split"):
        check.check()


def test_the_error_shows_at_most_a_few_label_values():
    values = [f"v{i}" for i in range(12)]
    raw = pa.table({"clicked": values})
    features = pa.table({label_column("click"): pa.array([0.0] * 12, pa.float32())})
    check = TrainLabelCheck(TASKS)
    check.update(raw, features, np.ones(12, bool))
    assert len(check.seen["click"]) == SHOWN_VALUES
