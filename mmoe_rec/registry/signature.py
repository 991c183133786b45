"""What a registered pyfunc takes and gives: its MLflow signature and an input example, both from its FeatureSpec."""
from __future__ import annotations

import math

import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import AnyType, ColSpec, ParamSchema, ParamSpec, Schema

from mmoe_rec.features.spec import FeatureSpec
from mmoe_rec.features.transform import compiled
from mmoe_rec.registry.scorer import feature_only_columns, score_column


def model_signature(spec: FeatureSpec, tasks: list[str] | None = None) -> ModelSignature:
    """Inputs: the raw columns the FeatureSpec reads (id columns, then each feature's source column), and feature
    Parquet's own columns as optional ones (see below). Outputs: the
    id columns, then `score_<task>` per task the model scores (`tasks`, default every task of the spec).
    Params: `precision`, "32" (default) or "bf16" (registry.scorer.Scorer).

    Input columns are declared without a type: the feature transform takes a column as strings, integers or
    floats, as lists or delimited strings, with nulls, and MLflow's type enforcement would refuse some of these
    (an integer age for a `double` column) or convert others before the transform sees them. What the signature
    enforces is that every column is there, with an MLflow error naming the missing ones.
    """
    inputs = [ColSpec(AnyType(), column) for column in compiled(spec).input_columns(with_labels=False)]
    # optional, so that MLflow hands them on where present: feature Parquet's own columns, by which the model
    # refuses already-encoded rows (MLflow dropped them before the model saw them: the rows were transformed twice)
    inputs += [ColSpec(AnyType(), column, required=False) for column in sorted(feature_only_columns(spec))]
    outputs = [ColSpec(AnyType(), column) for column in spec.id_columns]
    outputs += [ColSpec("float", score_column(task)) for task in (spec.task_names if tasks is None else tasks)]
    # predict(..., params={"precision": "bf16"}): the model under bfloat16 autocast, as `score --precision bf16`
    params = ParamSchema([ParamSpec("precision", "string", "32")])
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs), params=params)


def example_input(spec: FeatureSpec) -> pd.DataFrame:
    """One raw row in the columns of `model_signature`: each vocabulary feature's most frequent training value,
    each numeric feature's training mean (or a middle bucket boundary) in raw units, null where the spec keeps no
    raw value (id columns, hashed features). A column read by several features takes its first vocabulary value."""
    row: dict[str, object] = {column: None for column in compiled(spec).input_columns(with_labels=False)}
    for state in spec.transforms.get("features", {}).values():
        column = state["column"]
        if state["kind"] == "vocab" and state["values"]:
            value = state["values"][0]
            if state.get("multi_valued"):
                value = str(value) if state.get("delimiter") else [value]
            if row[column] is None or isinstance(row[column], float):
                row[column] = value
        elif state["kind"] == "numeric" and row[column] is None:
            row[column] = _raw_numeric(state)
    return pd.DataFrame([row], columns=list(row))


def _raw_numeric(state: dict) -> float:
    if state["transform"] == "bucketize":
        bounds = state["boundaries"]
        return float(bounds[len(bounds) // 2]) if bounds else 0.0
    mean = float(state["mean"]) if state["transform"] != "none" else float(state["impute"])
    if state["transform"] == "log1p":  # the statistics are of sign(x) log1p(|x|)
        return math.copysign(math.expm1(abs(mean)), mean)
    return mean
