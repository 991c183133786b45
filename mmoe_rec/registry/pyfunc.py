"""The MLflow pyfunc flavour of a mmoe-rec model: raw rows in, one score column per task out."""
from __future__ import annotations

import mlflow.pyfunc
import pandas as pd

from mmoe_rec.features.frames import table_from_pandas


class MultiTaskPyfunc(mlflow.pyfunc.PythonModel):
    """Holds no weights itself: `load_context` rebuilds the model from the logged package artifact."""

    def load_context(self, context) -> None:
        from mmoe_rec.registry.package import load_package
        from mmoe_rec.registry.scorer import Scorer

        self.scorer = Scorer(load_package(context.artifacts["package"]))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        frame = pd.DataFrame(model_input)
        table = table_from_pandas(frame, "pyfunc input")
        # per call (a server shares the scorer); None: the scorer's own, float32
        out = self.scorer.score_table(table, source="pyfunc input",
                                      precision=(params or {}).get("precision")).to_pandas()
        out.index = frame.index  # row for row: scores assigned back onto a filtered or re-indexed frame align
        for column in self.scorer.spec.id_columns:  # the caller's ids as given: through Arrow, a nullable integer
            out[column] = frame[column].array  # column would come back as float64 (ids above 2**53 merged)
        return out
