"""FeatureSpec: a weighted spec round-trips; a spec saved unfinalized gets its version."""
from __future__ import annotations

import json

import pytest

from mmoe_rec.features.spec import FeatureSpec, SparseFeature, Task, check_ids_are_not_outputs


def test_a_weighted_spec_round_trips_through_its_dict():
    spec = FeatureSpec([SparseFeature("u", 3)], ["d"], [Task("click")], id_columns=["uid"], has_weight=True).finalize()
    back = FeatureSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert back.has_weight is True and back.version == spec.version


def test_saving_an_unfinalized_spec_writes_its_version(tmp_path):
    spec = FeatureSpec([SparseFeature("u", 3)], ["d"], [Task("click")])
    spec.save(tmp_path / "spec.json")
    assert spec.version and json.loads((tmp_path / "spec.json").read_text())["version"] == spec.version


def test_id_columns_named_as_score_or_job_columns_are_refused():
    with pytest.raises(ValueError, match=r"id columns \['score_click'\]"):
        check_ids_are_not_outputs(["uid", "score_click"], ["click"])
    with pytest.raises(ValueError, match=r"id columns \['model_name'\]"):
        check_ids_are_not_outputs(["model_name"], ["click"], job_columns=True)
    check_ids_are_not_outputs(["model_name"], ["click"])  # the job's columns only when the job writes them
