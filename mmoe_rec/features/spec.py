"""FeatureSpec: what a fitted feature pipeline learnt, and the contract between features, data and models.

A spec is fitted on the train split only and saved as ``spec.json``. The feature Parquet it produces has:

- id columns: passed through unchanged (never features);
- one int64 column per single-valued sparse feature, ids in ``[0, num_embeddings)``;
- one ``list<int64>`` column per multi-valued sparse feature;
- one float32 column per dense feature, in ``dense_features`` order (missing indicators are dense features too);
- one float32 column per task label, named ``label_column(task)``;
- optionally a float32 sample-weight column named ``WEIGHT_COLUMN``.

Each such file records the spec's version in its key-value metadata under ``SPEC_VERSION_KEY``, so a file made with
another spec is recognised wherever it is dropped (mmoe_rec.data.parquet_stream.ParquetIndex).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

from mmoe_rec.features.errors import FeatureDataError

SPEC_FORMAT = 1
# The layout of `transforms` (what the transform pass reads per feature); raise it when a feature's state gains
# a key that changes ids, so that an older mmoe-rec refuses such a spec instead of ignoring the key. This one reads
# every format up to its own. 2: categorical features' `canonical_text` (2026-12-06).
TRANSFORMS_FORMAT = 2
WEIGHT_COLUMN = "sample_weight"
SPEC_VERSION_KEY = "mmoe_rec.spec_version"  # feature Parquet footer metadata: the version of the spec it was made with
TaskType = Literal["binary", "regression"]


def label_column(task: str) -> str:
    """Name of the feature-Parquet column holding a task's label."""
    return f"label_{task}"


def score_column(task: str) -> str:
    """Name of the column holding a task's score in predictions and scored files (beside the id columns)."""
    return f"score_{task}"


JOB_COLUMNS = ("model_name", "model_version")  # added beside the ids and scores by the batch scoring job


def check_ids_are_not_outputs(id_columns: list[str], tasks: list[str], job_columns: bool = False) -> None:
    """Refuse id columns named as the score columns of `tasks` (and the scoring job's columns): written beside
    the ids, a score would overwrite one, or the file have a column twice. (Schemas are refused earlier, at
    parse; this covers specs made by hand.)"""
    taken = {score_column(t) for t in tasks} | (set(JOB_COLUMNS) if job_columns else set())
    clash = [c for c in id_columns if c in taken]
    if clash:
        raise ValueError(f"id columns {clash} have the names of output columns ({sorted(taken)}): rename them in the "
                         "feature schema")


@dataclasses.dataclass(frozen=True)
class SparseFeature:
    name: str
    num_embeddings: int  # ids are in [0, num_embeddings), OOV / hash buckets included
    multi_valued: bool = False


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    type: TaskType = "binary"


@dataclasses.dataclass
class FeatureSpec:
    sparse_features: list[SparseFeature]
    dense_features: list[str]
    tasks: list[Task]
    id_columns: list[str] = dataclasses.field(default_factory=list)
    has_weight: bool = False
    # How each raw column becomes a feature (vocabularies, statistics, ...): owned by mmoe_rec.features.
    transforms: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Content hash of everything above; filled by `finalize()`.
    version: str = ""

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def dense_dim(self) -> int:
        return len(self.dense_features)

    def task(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"unknown task {name!r}; the feature spec has tasks {self.task_names}")

    def _content(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("version")
        d["format"] = SPEC_FORMAT
        return d

    def finalize(self) -> "FeatureSpec":
        blob = json.dumps(self._content(), sort_keys=True, default=str).encode()
        self.version = hashlib.sha256(blob).hexdigest()[:16]
        return self

    def to_dict(self) -> dict[str, Any]:
        d = self._content()
        d["version"] = self.version
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FeatureSpec":
        """The spec of `d`, its version recomputed: checkpoints and caches key on it, so content edited by hand
        under an old version is an error (a FeatureDataError, which is a ValueError)."""
        if not isinstance(d, dict):
            raise FeatureDataError(f"not a feature spec: a JSON object was expected, not {type(d).__name__}")
        fmt = d.get("format", SPEC_FORMAT)
        if fmt != SPEC_FORMAT:
            raise FeatureDataError(f"feature spec format {fmt!r} is not supported (this mmoe-rec reads format "
                                   f"{SPEC_FORMAT!r})")
        transforms_fmt = (d.get("transforms") or {}).get("format", 1)
        if isinstance(transforms_fmt, bool) or not (isinstance(transforms_fmt, int)
                                                   and 1 <= transforms_fmt <= TRANSFORMS_FORMAT):
            raise FeatureDataError(f"the feature spec's transforms have format {transforms_fmt!r}, this mmoe-rec "
                                   f"reads formats 1 to {TRANSFORMS_FORMAT}: it was written by a newer mmoe-rec, "
                                   "whose ids this one would not reproduce; use that version or refit the spec")
        try:
            spec = cls(
                sparse_features=[SparseFeature(**s) for s in d["sparse_features"]],
                dense_features=list(d["dense_features"]),
                tasks=[Task(**t) for t in d["tasks"]],
                id_columns=list(d.get("id_columns", [])),
                has_weight=bool(d.get("has_weight", False)),
                transforms=dict(d.get("transforms", {})),
            )
        except KeyError as e:
            raise FeatureDataError(f"not a valid feature spec: it has no {e.args[0]!r}") from None
        except TypeError as e:  # an entry that is not an object, or has fields a feature or task does not take
            raise FeatureDataError(f"not a valid feature spec: {e}") from None
        spec.finalize()
        stored = d.get("version") or spec.version  # a spec written without a version just gets one
        if stored != spec.version:
            raise FeatureDataError(f"the feature spec's content does not match its version {stored} (it hashes to "
                                   f"{spec.version}): was it edited? Refit it instead")
        return spec

    def save(self, path: str | os.PathLike) -> None:
        """Write spec.json atomically (temporary file, then rename)."""
        path = Path(path)
        if not self.version:
            self.finalize()
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureSpec":
        path = Path(path)
        if path.is_dir():
            path = path / "spec.json"
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raw = path.parent.is_dir() and any(p.suffix in (".parquet", ".csv", ".tsv", ".gz", ".bz2", ".xz")
                                               for p in path.parent.iterdir())
            hint = (f" ({path.parent} holds data files but no spec.json: raw data? `mmoe-rec features --schema ... "
                    f"--input {path.parent} --output <folder>` makes the feature folder to give here)" if raw else
                    " (a feature folder is made by `mmoe-rec features`: the config's header, or the README, says how)")
            raise FileNotFoundError(f"feature spec not found: {path}{hint}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a valid spec.json ({e})") from None
        try:
            return cls.from_dict(d)
        except FeatureDataError as e:
            raise e.at(str(path)) from None
