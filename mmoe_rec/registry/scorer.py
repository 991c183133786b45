"""Raw rows -> per-task scores with a trained model and the FeatureSpec it was trained with."""
from __future__ import annotations

import warnings

import pandas as pd
import pyarrow as pa
import torch

from mmoe_rec.data.collate import BatchCollator
from mmoe_rec.features.errors import FeatureDataError
from mmoe_rec.features.frames import table_from_pandas
from mmoe_rec.features.spec import SPEC_VERSION_KEY, FeatureSpec, check_ids_are_not_outputs, label_column, score_column
from mmoe_rec.features.transform import compiled, transform_table
from mmoe_rec.models.base import MultiTaskModel


def feature_only_columns(spec: FeatureSpec) -> set[str]:
    """Columns the feature Parquet of `spec` has and its raw input does not: `label_<task>` and the `<name>_missing`
    indicators, less any raw column the spec reads under the same name (a label column may be called label_click).
    Feature Parquet keeps the raw names of the features themselves, so only these tell the two apart."""
    transforms = spec.transforms
    own = {label_column(t) for t in spec.task_names}
    own |= {s["indicator_name"] for s in transforms.get("features", {}).values() if s.get("indicator")}
    raw = set(spec.id_columns) | {s["column"] for s in transforms.get("features", {}).values()}
    raw |= {t.get("column") for t in transforms.get("tasks", {}).values()} | {transforms.get("weight_column")}
    return own - raw


PRECISIONS = ("32", "bf16")


def checked_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


class Scorer:
    """Applies the model's own FeatureSpec (never refits): unseen categories land in the OOV bucket.

    `precision`: "32" (float32, the default) or "bf16": the model under CPU autocast to bfloat16, as
    `--trainer.precision bf16-mixed` trains (products in bfloat16, softmaxes and each tower's output layer in
    float32): 1.8x the rows/s of float32 for the large MMoE on a Xeon 6 with AMX (`benchmarks/precision.py`), where
    the CPU has bfloat16 instructions (AMX, AVX512-BF16); scores then differ from float32's by bfloat16 rounding."""

    def __init__(self, model: MultiTaskModel, precision: str = "32") -> None:
        self.precision = checked_precision(precision)
        self.model = model.eval()
        self.spec = model.feature_spec
        dependence = model.eval_batch_dependence()
        if dependence:
            warnings.warn(f"scores depend on the batch: {dependence}", stacklevel=2)
        check_ids_are_not_outputs(self.spec.id_columns, model.tasks, job_columns=True)
        self.collator = BatchCollator(self.spec, tasks=model.tasks, with_ids=False, with_labels=False)
        self.feature_only = feature_only_columns(self.spec)

    def check_raw_columns(self, columns: list[str], source: str = "input",
                          metadata: dict[bytes, bytes] | None = None) -> None:
        """Refuse input that lacks raw columns the spec reads (all of them named), and feature Parquet: its features
        have their raw names, so it would be transformed a second time (ids looked up as raw values, standardized
        values standardized again) and score wrong without an error. `metadata`: the input's Arrow schema
        metadata, where `mmoe-rec features` records its spec's version (a sure sign, where the columns may not
        tell: a spec without missing indicators whose raw labels are named label_<task>)."""
        version = (metadata or {}).get(SPEC_VERSION_KEY.encode())
        if version is not None:
            raise FeatureDataError(f"this is feature Parquet written by `mmoe-rec features` (spec version "
                                   f"{version.decode(errors='replace')} in its metadata); score raw rows", file=source)
        # all of them: feature Parquet always has every label and indicator column, while a wide raw table may
        # happen to carry one such name (a precomputed label_click, the user's own age_missing flag)
        if self.feature_only and self.feature_only <= set(columns):
            raise FeatureDataError(f"this looks like feature Parquet written by `mmoe-rec features` (it has the "
                                   f"columns {sorted(self.feature_only)}); score raw rows (raw rows that carry "
                                   f"these columns: drop them first, the model does not read them)", file=source)
        compiled(self.spec).check_columns(list(columns), with_labels=False, file=source)

    @torch.no_grad()
    def score_table(self, table: pa.Table | pa.RecordBatch | pd.DataFrame, source: str = "input",
                    row_offset: int = 0, precision: str | None = None) -> pa.Table:
        """(N rows of raw columns: an Arrow table or a pandas DataFrame) -> (N rows: id columns, score_<task> per
        task).

        `source` names where the rows come from (a file path) and `row_offset` is the first row's index in it,
        so that a bad value is reported at its row in that file, not at its row in this batch. `precision`: this
        call's, instead of the Scorer's.
        """
        precision = self.precision if precision is None else checked_precision(precision)
        if isinstance(table, pd.DataFrame):
            table = table_from_pandas(table, source, row_offset)
        self.check_raw_columns(table.column_names, source, table.schema.metadata)
        features = transform_table(self.spec, table, with_labels=False, file=source, row_offset=row_offset)
        columns: dict[str, pa.Array] = {col: features.column(col) for col in self.spec.id_columns}
        if features.num_rows == 0:  # no rows, no model call (a batch of none is not one torchrec can pool)
            return pa.table({**columns, **{score_column(t): pa.array([], pa.float32()) for t in self.model.tasks}})
        record_batch = features.combine_chunks().to_batches()[0]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = self.model(self.collator(record_batch))
        for task in self.model.tasks:
            logits = out.logits[task].float()  # (N,)
            score = torch.sigmoid(logits) if self.spec.task(task).type == "binary" else logits
            columns[score_column(task)] = pa.array(score.numpy(), pa.float32())
        return pa.table(columns)
