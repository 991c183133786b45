"""Feature schema: the user-written YAML that says which raw column becomes which feature.

```yaml
id_columns: [row_id]                 # passed through unchanged, never features
categorical:
  - {name: user_id, min_count: 2}    # vocabulary from the train split; id 0 = OOV / missing
  - {name: item_id, transform: hash, buckets: 131072}   # stable FNV-1a hash into buckets 1..N; 0 = missing
  - {name: tags, multi_valued: true}                    # list column -> list<int64>
  - {name: interests, multi_valued: true, delimiter: "|"}  # "a|b|c" string column -> list<int64>
numeric:
  - {name: price, transform: log1p}                     # signed log1p, then standardized
  - {name: age, transform: standardize, impute: median} # missing -> imputed value + indicator "age_missing"
  - {name: position, transform: bucketize, buckets: 8}  # quantile buckets from train -> sparse ids (0 = missing)
  - {name: spend, transform: bucketize, buckets: 32, zero_bucket: true}  # 0 alone; quantiles of the non-zero values
  - {names: [x0, x1, x2], transform: standardize}       # one entry for several columns
tasks:
  - {name: click, type: binary}                         # column defaults to the name; values 0/1
  - {name: income, column: income_50k, type: binary, positive: ["50000+."], negative: ["- 50000."]}
  - {name: dwell, type: regression}
sample_weight: w                     # optional raw column -> float32 "sample_weight"
reader: {header: false, column_names: [...], delimiter: ",", strip_whitespace: true}   # CSV only, but:
```

``reader.strip_whitespace`` also trims the categorical and text-label strings of Parquet / DataFrame input (then a
single value that is one of ``reader.null_values`` once trimmed is missing), so such rows get the CSV's ids; a value
that is one of ``reader.null_values`` as written is missing in every format, with or without strip.

Every entry may give ``column:`` when the raw column name differs from the feature name.
Unknown keys, kinds or transforms are errors naming the schema file and the entry, and so are values of the wrong
type or range (``min_count`` / ``max_size`` / ``buckets`` not positive integers, ``multi_valued`` not a boolean,
``id_columns`` not a list, a ``sample_weight`` that is a label column, a value both positive and negative) and two
entries that would write the same output column (an id column and a feature, ``<name>_missing``, ``label_<task>``,
``sample_weight``).
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import yaml

from mmoe_rec.features.errors import FeatureDataError
from mmoe_rec.features.spec import JOB_COLUMNS, WEIGHT_COLUMN, label_column, score_column

CATEGORICAL_TRANSFORMS = ("vocab", "hash")
NUMERIC_TRANSFORMS = ("standardize", "log1p", "bucketize", "none")
TASK_TYPES = ("binary", "regression")
IMPUTE_KINDS = ("mean", "median", "zero")
MAX_HASH_BUCKETS = 2**63 - 1  # ids 1..N as int64

@dataclasses.dataclass(frozen=True)
class CategoricalSpec:
    name: str
    column: str
    transform: str = "vocab"
    min_count: int = 1
    max_size: int | None = None
    buckets: int | None = None  # hash buckets
    multi_valued: bool = False
    delimiter: str | None = None
    # "canonical": a bool's text and an integral float's text fold ("True" is true, "10.0" is 10), so that CSV and
    # Parquet give one id; "as_written": codes whose text matters ("250.0" and "250" are two ICD codes)
    text: str = "canonical"


TEXT_MODES = ("canonical", "as_written")


@dataclasses.dataclass(frozen=True)
class NumericSpec:
    name: str
    column: str
    transform: str = "standardize"
    buckets: int = 10  # bucketize only
    zero_bucket: bool = False  # bucketize only: 0 alone in its bucket, quantiles over the non-zero values
    impute: str | float = "mean"
    missing_indicator: str | bool = "auto"  # auto: add one when the train split had missing values


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    column: str
    type: str = "binary"
    positive: tuple | None = None
    negative: tuple | None = None  # with `positive` and no `negative`, every other value is a negative


@dataclasses.dataclass(frozen=True)
class ReaderSpec:
    header: bool = True
    column_names: tuple[str, ...] | None = None
    delimiter: str = ","
    strip_whitespace: bool = False
    null_values: tuple[str, ...] = ("",)


@dataclasses.dataclass(frozen=True)
class Schema:
    id_columns: tuple[str, ...]
    categorical: tuple[CategoricalSpec, ...]
    numeric: tuple[NumericSpec, ...]
    tasks: tuple[TaskSpec, ...]
    sample_weight: str | None = None
    reader: ReaderSpec = ReaderSpec()
    source: str = "<schema>"

    def raw_columns(self, with_labels: bool = True) -> list[str]:
        """Raw columns the pipeline reads, without duplicates, in schema order."""
        cols = list(self.id_columns) + [c.column for c in self.categorical] + [n.column for n in self.numeric]
        if with_labels:
            cols += [t.column for t in self.tasks]
            if self.sample_weight:
                cols.append(self.sample_weight)
        return list(dict.fromkeys(cols))


def _entries(raw: Any, section: str, src: str) -> list[dict]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(e, dict) for e in raw):
        raise FeatureDataError(f"section {section!r} must be a list of mappings", file=src)
    out = []
    for e in raw:
        if "names" in e:  # one entry for several columns
            names = e["names"]
            if "name" in e or "column" in e or not isinstance(names, list):
                raise FeatureDataError(f"{section}: 'names' must be a list and excludes 'name'/'column'", file=src)
            rest = {k: v for k, v in e.items() if k != "names"}
            out.extend({"name": str(n), **rest} for n in names)
        else:
            out.append(dict(e))
    for e in out:
        if "name" not in e:
            raise FeatureDataError(f"{section}: every entry needs a 'name' ({e})", file=src)
        for key in ("name", "column"):  # a list or mapping here would become a column called "['a']"
            if key in e and not _is_name(e[key]):
                raise FeatureDataError(f"{section}: {key!r} must be one column name, got {e[key]!r}", file=src)
        e["name"] = str(e["name"])
        e["column"] = str(e.get("column", e["name"]))
    return out


def _is_name(v: Any) -> bool:
    """A column name as YAML may give it: text, or an integer (a CSV header "2019")."""
    return isinstance(v, (str, int)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # YAML `true` is an int to Python


def _require(ok: bool, message: str, src: str, entry: str | None = None) -> None:
    if not ok:
        raise FeatureDataError(message, file=src, column=entry)


def _check_categorical(c: CategoricalSpec, src: str) -> None:
    _require(_is_int(c.min_count) and c.min_count >= 1, f"min_count must be an integer >= 1, got {c.min_count!r}",
             src, c.name)
    _require(c.max_size is None or (_is_int(c.max_size) and c.max_size >= 1),
             f"max_size must be an integer >= 1, got {c.max_size!r}", src, c.name)
    _require(isinstance(c.multi_valued, bool), f"multi_valued must be true or false, got {c.multi_valued!r}",
             src, c.name)
    _require(c.delimiter is None or (isinstance(c.delimiter, str) and c.delimiter != ""),
             f"delimiter must be a non-empty string, got {c.delimiter!r}", src, c.name)
    _require(c.text in TEXT_MODES, f"text must be one of {TEXT_MODES}, got {c.text!r}", src, c.name)


def label_keys(values: tuple) -> set:
    """How a positive / negative value may match: as text, and as a number (numeric labels, or the text of a
    number in a string column: columns.label_values)."""
    keys = set()
    for v in values:
        keys.add(str(v))
        try:
            keys.add(float(v))
        except (TypeError, ValueError):
            pass
    return keys


def _check_task_values(t: TaskSpec, src: str) -> None:
    for k in ("positive", "negative"):
        for v in getattr(t, k) or ():
            _require(isinstance(v, (str, int, float)), f"{k} values must be strings or numbers, got {v!r}", src, t.name)
            # YAML 1.1 reads unquoted yes / no / true / on as booleans, which would match no label value
            _require(not isinstance(v, bool), f"{k} value {v!r} is a YAML boolean, not a label value: quote it "
                     f"(\"yes\", \"true\")", src, t.name)
    for v in t.negative or ():
        _require(not (label_keys((v,)) & label_keys(t.positive)), f"label value {v!r} is both positive and negative",
                 src, t.name)


def _id_columns(raw: Any, src: str) -> tuple[str, ...]:
    """A list of column names (a bare string would be read as its characters)."""
    if raw is None:
        return ()
    _require(isinstance(raw, list) and all(isinstance(c, (str, int)) and not isinstance(c, bool) for c in raw),
             f"id_columns must be a list of column names, got {raw!r}", src)
    return tuple(str(c) for c in raw)


def _build(cls, e: dict, section: str, src: str):
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(e) - fields
    if unknown:
        raise FeatureDataError(f"{section} entry has unknown keys {sorted(unknown)} (known: {sorted(fields)})",
                               file=src, column=e.get("name"))
    return cls(**e)


def parse_schema(d: dict, source: str = "<schema>") -> Schema:
    """Validate a schema mapping (as loaded from YAML) into a Schema."""
    if not isinstance(d, dict):
        raise FeatureDataError("a feature schema must be a mapping", file=source)
    known = {"id_columns", "categorical", "numeric", "tasks", "sample_weight", "reader", "description"}
    unknown = set(d) - known
    if unknown:
        raise FeatureDataError(f"unknown schema sections {sorted(unknown)} (known: {sorted(known)})", file=source)

    cats = []
    for e in _entries(d.get("categorical"), "categorical", source):
        if "buckets" in e and "transform" not in e:
            e["transform"] = "hash"
        c = _build(CategoricalSpec, e, "categorical", source)
        if c.transform not in CATEGORICAL_TRANSFORMS:
            raise FeatureDataError(f"unknown categorical transform {c.transform!r} (known: {CATEGORICAL_TRANSFORMS})",
                                   file=source, column=c.name)
        _check_categorical(c, source)
        if c.transform == "hash" and (not _is_int(c.buckets) or c.buckets < 1):
            raise FeatureDataError("hash transform needs 'buckets: <positive int>'", file=source, column=c.name)
        if c.transform == "hash" and c.buckets > MAX_HASH_BUCKETS:  # ids 1..N are int64: it failed at transform
            raise FeatureDataError(f"hash buckets {c.buckets} is more than ids hold (at most 2**63 - 1)",
                                   file=source, column=c.name)
        if c.delimiter is not None and not c.multi_valued:
            raise FeatureDataError("'delimiter' only applies to multi_valued features", file=source, column=c.name)
        # an option the transform does not read is an error, not silently ignored
        not_read = ("min_count", "max_size") if c.transform == "hash" else ("buckets",)
        unused = [k for k in not_read if e.get(k) is not None]
        if unused:
            raise FeatureDataError(f"{unused} do not apply to transform {c.transform} ('buckets' is for hash, "
                                   "'min_count' / 'max_size' for vocab)", file=source, column=c.name)
        cats.append(c)

    nums = []
    for e in _entries(d.get("numeric"), "numeric", source):
        n = _build(NumericSpec, e, "numeric", source)
        if n.transform not in NUMERIC_TRANSFORMS:
            raise FeatureDataError(f"unknown numeric transform {n.transform!r} (known: {NUMERIC_TRANSFORMS})",
                                   file=source, column=n.name)
        is_number = isinstance(n.impute, (int, float)) and not isinstance(n.impute, bool)
        if (not is_number and n.impute not in IMPUTE_KINDS) or (is_number and not math.isfinite(n.impute)):
            raise FeatureDataError(f"impute must be one of {IMPUTE_KINDS} or a finite number, got {n.impute!r}",
                                   file=source, column=n.name)
        if n.missing_indicator not in ("auto", True, False):
            raise FeatureDataError("missing_indicator must be auto, true or false", file=source, column=n.name)
        if n.transform == "bucketize" and (not _is_int(n.buckets) or n.buckets < 2):
            raise FeatureDataError("bucketize needs 'buckets: <int >= 2>'", file=source, column=n.name)
        if n.zero_bucket is not False and (n.transform != "bucketize" or n.zero_bucket is not True):
            raise FeatureDataError("'zero_bucket: true' only applies to transform bucketize", file=source,
                                   column=n.name)
        # bucketize gives a missing value its own bucket: no impute, no indicator; only bucketize has buckets
        not_read = ("impute",) if n.transform == "bucketize" else ("buckets",)
        unused = [k for k in not_read if e.get(k) is not None]
        if n.transform == "bucketize" and e.get("missing_indicator") is True:
            unused.append("missing_indicator")
        if unused:
            raise FeatureDataError(f"{unused} do not apply to transform {n.transform} (bucketize gives a missing "
                                   "value its own bucket; only bucketize has 'buckets')", file=source, column=n.name)
        nums.append(n)

    tasks = []
    for e in _entries(d.get("tasks"), "tasks", source):
        for k in ("positive", "negative"):
            if e.get(k) is not None:
                v = e[k]
                e[k] = tuple(v) if isinstance(v, (list, tuple)) else (v,)
                _require(len(e[k]) > 0, f"{k} must list at least one label value (or be left out)", source,
                         e["name"])
        t = _build(TaskSpec, e, "tasks", source)
        _require("." not in t.name, "a task name must not hold '.' (it names the model's gate and tower: torch "
                 "module names, which take no '.')", source, t.name)
        if t.type not in TASK_TYPES:
            raise FeatureDataError(f"unknown task type {t.type!r} (known: {TASK_TYPES})", file=source, column=t.name)
        if t.type == "regression" and (t.positive or t.negative):
            raise FeatureDataError("positive/negative values only apply to binary tasks", file=source, column=t.name)
        if t.negative and not t.positive:
            raise FeatureDataError("'negative' needs 'positive' too", file=source, column=t.name)
        _check_task_values(t, source)
        tasks.append(t)
    if not tasks:
        raise FeatureDataError("the schema declares no tasks", file=source)

    reader_raw = d.get("reader") or {}
    _require(isinstance(reader_raw, dict), f"reader must be a mapping, got {reader_raw!r}", source)
    reader_raw = dict(reader_raw)
    for k in ("column_names", "null_values"):
        if reader_raw.get(k) is not None:  # a bare string would be read as its characters
            v = reader_raw[k]
            _require(isinstance(v, list) and all(_is_name(x) or (k == "null_values" and isinstance(x, float)
                                                 and math.isfinite(x)) for x in v),
                     f"reader {k} must be a list of strings (YAML numbers are taken as their text: -999.0 as "
                     f"'-999.0'), got {v!r}", source)
            reader_raw[k] = tuple(str(x) for x in v)
    reader = _build(ReaderSpec, reader_raw, "reader", source)
    for k in ("header", "strip_whitespace"):
        _require(isinstance(getattr(reader, k), bool), f"reader {k} must be true or false", source)
    _require(isinstance(reader.delimiter, str) and len(reader.delimiter) == 1,
             f"reader delimiter must be one character, got {reader.delimiter!r}", source)
    weight = d.get("sample_weight")
    _require(weight is None or isinstance(weight, str), f"sample_weight must be one column name, got {weight!r}",
             source)
    _require(weight not in {t.column for t in tasks},
             f"sample_weight {weight!r} is also a task's label column", source)

    schema = Schema(
        id_columns=_id_columns(d.get("id_columns"), source),
        categorical=tuple(cats),
        numeric=tuple(nums),
        tasks=tuple(tasks),
        sample_weight=weight,
        reader=reader,
        source=source,
    )
    names = [c.name for c in cats] + [n.name for n in nums]
    dup = {x for x in names if names.count(x) > 1}
    if dup:
        raise FeatureDataError(f"feature names used twice: {sorted(dup)}", file=source)
    task_names = [t.name for t in tasks]
    if len(set(task_names)) != len(task_names):
        raise FeatureDataError(f"task names used twice: {task_names}", file=source)
    label_cols = {t.column for t in tasks} | ({schema.sample_weight} if schema.sample_weight else set())
    feature_columns = {c.column for c in cats} | {n.column for n in nums}
    leaked = label_cols & (feature_columns | set(schema.id_columns))
    if leaked:  # a label used as a feature gives AUC 1.0; refuse it
        raise FeatureDataError(f"label / weight columns also declared as features or ids: {sorted(leaked)}", file=source)
    id_features = set(schema.id_columns) & feature_columns
    if id_features:  # ids are passed through, never features (a row id as a feature memorises rows)
        raise FeatureDataError(f"id columns also read as features: {sorted(id_features)}; an id column is passed "
                               f"through only (drop it from id_columns to make it a feature)", file=source)
    _check_output_names(schema)
    return schema


def _output_names(schema: Schema) -> list[tuple[str, str]]:
    """(feature-Parquet column, what it holds) for every column a build may write."""
    out = [(c, f"id column {c!r}") for c in schema.id_columns]
    out += [(c.name, f"categorical feature {c.name!r}") for c in schema.categorical]
    for n in schema.numeric:
        out.append((n.name, f"numeric feature {n.name!r}"))
        if n.transform != "bucketize" and n.missing_indicator is not False:  # "auto" may add it
            out.append((f"{n.name}_missing", f"missing indicator of numeric feature {n.name!r}"))
    out += [(label_column(t.name), f"label of task {t.name!r}") for t in schema.tasks]
    if schema.sample_weight:
        out.append((WEIGHT_COLUMN, "sample weight"))
    return out


def _check_output_names(schema: Schema) -> None:
    """Two outputs with one name would overwrite each other (or give a file two equal column names)."""
    seen: dict[str, str] = {}
    for name, what in _output_names(schema):
        if name in seen:
            raise FeatureDataError(f"output column {name!r} would hold both the {seen[name]} and the {what}; "
                                   "rename one of them", file=schema.source)
        seen[name] = what
    # predictions and scored files hold the ids and, beside them, these columns
    beside_ids = {score_column(t.name): f"the score column of task {t.name!r}" for t in schema.tasks}
    beside_ids.update({c: "a column the batch scoring job adds" for c in JOB_COLUMNS})
    for c in schema.id_columns:
        if c in beside_ids:
            raise FeatureDataError(f"id column {c!r} has the name of {beside_ids[c]}, which predictions and scored "
                                   "files hold beside the ids; rename the id column", file=schema.source)


def load_schema(path: str | os.PathLike) -> Schema:
    path = Path(path)
    try:
        d = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FeatureDataError("schema file not found", file=str(path)) from None
    except yaml.YAMLError as e:
        raise FeatureDataError(f"not valid YAML ({e})", file=str(path)) from None
    return parse_schema(d, source=str(path))
