"""A binary task with declared positive values whose train split has no positive row (or, with declared negatives,
no negative row) usually means that the schema's values match none of the data's (``1`` vs ``"1.0"``, an unquoted
YAML ``yes``), which would silently give every row one label: the build refuses it, naming the task, its label
column and some values seen. Tasks with 0 / 1 labels are not checked (a value other than 0 or 1 is an error
already; a small train split may lack positives). A train split whose sample weights are all 0 is refused too:
every weighted loss would be 0 and training would change nothing, with no error."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmoe_rec.features.errors import FeatureDataError
from mmoe_rec.features.spec import WEIGHT_COLUMN, label_column

SHOWN_VALUES = 5


class TrainLabelCheck:
    """Counts positive / negative train labels per binary task, batch by batch (tasks: CompiledSpec.tasks)."""

    def __init__(self, tasks: dict, weight_column: str | None = None) -> None:
        self.tasks = {t: st for t, st in tasks.items() if st["type"] == "binary" and st.get("positive") is not None}
        self.weight_column = weight_column  # the raw sample-weight column, if the spec has one
        self.train_rows = 0
        self.weighted = False  # a train row of weight > 0 seen
        self.positives = dict.fromkeys(self.tasks, 0)
        self.negatives = dict.fromkeys(self.tasks, 0)
        self.seen: dict[str, list] = {t: [] for t in self.tasks}

    def _ok(self, task: str) -> bool:
        return self.positives[task] > 0 and (self.tasks[task].get("negative") is None or self.negatives[task] > 0)

    def update(self, raw: pa.RecordBatch | pa.Table, features: pa.Table, train: np.ndarray) -> None:
        """raw: the input rows; features: their transformed rows (labels included); train: (n,) bool mask."""
        if not train.any():
            return
        self.train_rows += int(train.sum())
        if self.weight_column and not self.weighted:
            self.weighted = bool((features.column(WEIGHT_COLUMN).to_numpy()[train] > 0).any())
        for t, st in self.tasks.items():
            if self._ok(t):
                continue  # after the first batches, as a rule: nothing more to do
            y = features.column(label_column(t)).to_numpy()[train]
            self.positives[t] += int((y == 1).sum())
            self.negatives[t] += int((y == 0).sum())
            seen = self.seen[t]
            if not self._ok(t) and len(seen) < SHOWN_VALUES:
                values = pc.unique(raw.column(st["column"]).filter(pa.array(train))).to_pylist()
                seen.extend(v for v in values if v not in seen)
                del seen[SHOWN_VALUES:]

    def check(self) -> None:
        if self.weight_column and self.train_rows and not self.weighted:
            raise FeatureDataError(f"every one of the {self.train_rows} train rows has sample weight 0: every "
                                   "weighted loss would be 0 and training would change nothing",
                                   column=self.weight_column)
        for t, st in self.tasks.items():
            if self._ok(t):
                continue
            kind = "positive" if self.positives[t] == 0 else "negative"
            raise FeatureDataError(f"binary task {t!r} has no {kind} row in the train split (no value matches the "
                                   f"schema's {kind} {st[kind]}); label values seen there: {self.seen[t]}",
                                   column=st["column"])
