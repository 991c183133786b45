"""`mmoe-rec features`: fit a FeatureSpec on the train split, write feature Parquet for every split.

    mmoe-rec features --schema S.yaml --input RAW --output DIR [--valid-fraction F --test-fraction G --seed N]
    mmoe-rec features --schema S.yaml --input RAW --output DIR --split-column split
    mmoe-rec features --schema S.yaml --input train=TRAIN --input valid+test=TEST --output DIR --seed N

``--input`` takes a file, a directory or a glob, optionally prefixed by the splits its rows go to:
``train=PATH`` (all rows to train), ``valid+test=PATH`` (each row to valid or test with equal chance) or
weighted ``train:0.9+valid:0.1=PATH``. Unprefixed inputs are split by ``--split-column`` (values train /
valid / test) or at random by ``--valid-fraction`` / ``--test-fraction``. Random assignment hashes
(seed, file's path relative to its input, row in file), so it does not depend on batch sizes, on the other
files or on where the input directory lies. The relative path is the path below the directory for a directory,
below the last directory without wildcards for a glob (``raw/*/part-0.parquet`` -> ``day=1/part-0.parquet``),
and empty for an input that names one file (its hash is 0: such a file keeps the split of the earlier rule,
which keyed files by their position among the input's files, so the census split and published results stand).
Two single-file inputs split at random therefore put their rows at the same positions in the same split (a
warning says so): give such files as one directory or glob input to split them independently.

Output: DIR/spec.json, DIR/manifest.json (row counts, inputs, seed) and DIR/{train,valid,test}/part-NNNNN.parquet
of at most ``--rows-per-file`` rows, with row groups of ``--row-group-rows`` (a file's last group may be shorter);
each file records the spec's version in its key-value metadata (spec.SPEC_VERSION_KEY) for the data loader's check.
Everything is written to a temporary directory beside DIR and renamed when complete; on error the temporary
directory is removed and DIR is left as it was. Id columns are written with one type, which every input file's
type must widen to without loss (mmoe_rec/features/id_columns.py), checked before anything is read.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import queue
import re
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mmoe_rec.features.columns import dictionary_fast_path
from mmoe_rec.features.errors import FeatureDataError
from mmoe_rec.features.fit import SpecFitter
from mmoe_rec.features.id_columns import cast_ids, plan_id_types
from mmoe_rec.features.label_check import TrainLabelCheck
from mmoe_rec.features.schema import Schema, load_schema
from mmoe_rec.features.sources import file_header, file_identity, glob_root, iter_batches, resolve_inputs
from mmoe_rec.features.spec import SPEC_VERSION_KEY, FeatureSpec
from mmoe_rec.features.transform import CompiledSpec, compiled
from mmoe_rec.output_dir import (missing_parents, output_dir_problem, remove_empty_folders, replace_dir,
                                 resolved_output, temp_path)
from mmoe_rec.paths import first_repeated_file

logger = logging.getLogger(__name__)
SPLITS = ("train", "valid", "test")
DICTIONARY_MAX_IDS = 1 << 14  # sparse outputs with at most this many ids are Parquet dictionary-encoded
_PREFIX = re.compile(r"^([a-z]+(?::[0-9.]+)?(?:\+[a-z]+(?::[0-9.]+)?)*)=(.+)$")


@dataclasses.dataclass(frozen=True)
class Source:
    """Input files and how their rows are assigned to splits.

    rule: "fixed" (all rows to splits[0]), "random" (by weights), "column" (by the split column's values).
    """

    files: tuple[str, ...]
    rule: str
    splits: tuple[str, ...] = ("train",)
    weights: tuple[float, ...] = (1.0,)
    keys: tuple[str, ...] = ()  # per file: its path relative to the input (the split hash's key); default: see key()

    def may_hold(self, split: str) -> bool:
        return self.rule == "column" or split in [s for s, w in zip(self.splits, self.weights) if w > 0]

    def key(self, file_index: int) -> str:
        if self.keys:
            return self.keys[file_index]
        # a Source made without keys splits as the CLI would: one file is its own input, several a folder's (each
        # keyed by its path below the files' common folder, so that day=1/part-0 and day=2/part-0 differ)
        if len(self.files) == 1:
            return ""
        root = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in self.files])
        return Path(os.path.relpath(os.path.abspath(self.files[file_index]), root)).as_posix()


def input_keys(spec: str, files: Iterable[str]) -> tuple[str, ...]:
    """Each file's path relative to the root of `spec` (a directory, a file's directory, or a glob's leading
    directories without wildcards), so that adding files or moving the tree leaves it unchanged."""
    p = Path(spec)
    if p.is_file():
        return ("",)  # the input is the file itself
    root = p if p.is_dir() else glob_root(spec)
    return tuple(Path(os.path.relpath(f, root)).as_posix() for f in files)


def parse_input(arg: str, split_column: str | None, valid_fraction: float, test_fraction: float,
                output: str | os.PathLike | None = None) -> Source:
    """One --input: `[split[:weight][+...]=]FILES`; `output` (the build's) is passed over inside an input folder."""
    m = _PREFIX.match(arg)
    if m and not os.path.exists(arg):
        splits, weights = [], []
        for part in m.group(1).split("+"):
            name, _, w = part.partition(":")
            if name not in SPLITS:
                raise FeatureDataError(f"unknown split {name!r} in --input {arg!r} (known: {SPLITS}); a path that "
                                       f"begins with '{name}=' (a Hive partition folder) is read as a path when "
                                       f"written ./{arg}")
            splits.append(name)
            try:
                weights.append(float(w) if w else 1.0)
            except ValueError:  # the pattern takes digits and dots: '.', '1.2.3'
                raise FeatureDataError(f"--input {arg!r}: the weight of split {name!r}, {w!r}, is not a number "
                                       "(e.g. train:0.8+valid:0.1+test:0.1=FILES)") from None
        files = tuple(resolve_inputs(m.group(2), output))
        keys = input_keys(m.group(2), files)
        if len(splits) == 1:
            return Source(files, "fixed", (splits[0],), (1.0,), keys)
        total = sum(weights)
        if total <= 0 or len(set(splits)) < len(splits):
            raise FeatureDataError(f"--input {arg!r}: the split weights must add up to more than 0, each split named "
                                   "once")
        return Source(files, "random", tuple(splits), tuple(w / total for w in weights), keys)
    files = tuple(resolve_inputs(arg, output))
    keys = input_keys(arg, files)
    if split_column:
        return Source(files, "column", SPLITS, (0.0, 0.0, 0.0), keys)
    train = 1.0 - valid_fraction - test_fraction
    if not (0 < train <= 1 and valid_fraction >= 0 and test_fraction >= 0):
        raise FeatureDataError(f"--valid-fraction {valid_fraction} and --test-fraction {test_fraction} must be >= 0 "
                               "and leave rows for train")
    return Source(files, "random", SPLITS, (train, valid_fraction, test_fraction), keys)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _key_hash(key: str) -> np.uint64:
    """64-bit hash of a file's key; 0 for the empty key of a single-file input (the earlier rule's first file)."""
    if not key:
        return np.uint64(0)
    return np.uint64(int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little"))


def assign_splits(source: Source, file_index: int, row_offset: int, batch: pa.RecordBatch,
                  seed: int, split_column: str | None, file: str) -> np.ndarray:
    """(n,) int8 split index into SPLITS for each row of a batch (random: a hash of the seed, the file's key,
    never its position among the inputs, and the row in the file)."""
    n = batch.num_rows
    if source.rule == "fixed":
        return np.full(n, SPLITS.index(source.splits[0]), np.int8)
    if source.rule == "column":
        col = batch.column(split_column)
        idx = pc.index_in(pc.cast(col, pa.string()), value_set=pa.array(SPLITS))
        if idx.null_count:
            row = int(np.argmax(~idx.is_valid().to_numpy(zero_copy_only=False)))
            raise FeatureDataError(f"split value {col[row].as_py()!r} is not one of {SPLITS}",
                                   file=file, column=split_column, row=row_offset + row)
        return idx.to_numpy(zero_copy_only=False).astype(np.int8)
    rows = np.arange(row_offset, row_offset + n, dtype=np.uint64)
    key = _splitmix64(np.uint64(seed & 0xFFFFFFFF) << np.uint64(32) ^ _key_hash(source.key(file_index))) ^ rows
    u = (_splitmix64(key) >> np.uint64(11)).astype(np.float64) / float(1 << 53)  # uniform in [0, 1)
    edges = np.cumsum(source.weights)[:-1]
    which = np.searchsorted(edges, u, side="right")
    return np.asarray([SPLITS.index(s) for s in source.splits], np.int8)[which]


class SplitWriter:
    """Appends feature tables to DIR/<split>/part-NNNNN.parquet, at most `rows_per_file` rows each, in row
    groups of `row_group_rows` (fewer in a file's last group when rows_per_file is not a multiple of it).
    `spec_version`: recorded in every file's key-value metadata (SPEC_VERSION_KEY), so that a file is known as made
    with that spec wherever it ends up (the data loader refuses one whose version is not its folder's spec.json's)."""

    def __init__(self, directory: Path, row_group_rows: int, rows_per_file: int,
                 use_dictionary: bool | list[str] = True, spec_version: str | None = None) -> None:
        self.dir = directory
        self.use_dictionary = use_dictionary
        self.metadata = {SPEC_VERSION_KEY: spec_version} if spec_version else {}
        self.dir.mkdir(parents=True)
        self.row_group_rows, self.rows_per_file = row_group_rows, rows_per_file
        self.schema: pa.Schema | None = None
        self._buf: list[pa.Table] = []
        self._buffered = 0
        self._writer: pq.ParquetWriter | None = None
        self._file_rows = 0
        self._files = 0
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        if self.schema is None:
            self.schema = table.schema
        elif table.schema != self.schema:  # build() gives the id columns one type (id_columns.cast_ids) first
            raise ValueError(f"feature table schema changed between writes: {table.schema} after {self.schema}")
        self._buf.append(table)
        self._buffered += table.num_rows
        if self._buffered >= self.row_group_rows:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self._buf:
            return
        t = pa.concat_tables(self._buf)  # zero-copy; the writer encodes chunk by chunk
        start = 0
        while start < t.num_rows:
            size = min(self.row_group_rows, self._room())  # a group never passes the file's end
            if t.num_rows - start < size and not final:
                break
            n = min(size, t.num_rows - start)
            self._write_group(t.slice(start, n))
            start += n
        rest = t.slice(start)
        self._buf, self._buffered = ([rest], rest.num_rows) if rest.num_rows else ([], 0)

    def _room(self) -> int:
        """Rows the next group may hold: what is left of the current file, or a new file's worth."""
        if self._writer is None or self._file_rows >= self.rows_per_file:
            return self.rows_per_file
        return self.rows_per_file - self._file_rows

    def _write_group(self, t: pa.Table) -> None:
        if self._writer is None or self._file_rows >= self.rows_per_file:
            self._new_file()
        self._writer.write_table(t, row_group_size=self.row_group_rows)
        self._file_rows += t.num_rows
        self.rows += t.num_rows

    def _new_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
        path = self.dir / f"part-{self._files:05d}.parquet"
        schema = self.schema.with_metadata({**(self.schema.metadata or {}), **self.metadata}) if self.metadata \
            else self.schema
        self._writer = pq.ParquetWriter(path, schema, compression="snappy", use_dictionary=self.use_dictionary)
        self._files += 1
        self._file_rows = 0

    def close(self, empty_schema: pa.Schema) -> None:
        self._flush(final=True)
        if self._writer is None:  # an empty split still gets one (empty) file with the right columns
            self.schema = self.schema or empty_schema
            self._new_file()
        self._writer.close()


def prefetch(it: Iterator, depth: int = 2) -> Iterator:
    """Run `it` in a background thread, `depth` items ahead (Arrow decoding releases the GIL, so reading
    overlaps the transform on another core). Exceptions are re-raised here, in order."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def put(entry) -> bool:
        """Queue `entry`; give up once the consumer has stopped (it takes nothing more: a plain put on a
        full queue would block forever, and the consumer's join with it)."""
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run():
        try:
            for item in it:
                if not put((True, item)):
                    return
            put((True, done))
        except BaseException as e:  # handed to the consumer
            put((False, e))
        finally:  # here, before the consumer's join returns: a CSV reader's own threads stop now, not at exit
            close = getattr(it, "close", None)
            if close is not None:
                close()

    th = threading.Thread(target=run, daemon=True)
    th.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                raise item
            if item is done:
                return
            yield item
    finally:
        stop.set()
        th.join()


class BackgroundWrites:
    """Runs SplitWriter.write calls on one background thread, in submission order, at most `depth` pending,
    so Parquet encoding overlaps the next batch's transform."""

    def __init__(self, depth: int = 4) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pending: list = []
        self.depth = depth

    def submit(self, fn, *args) -> None:
        self._pending.append(self._pool.submit(fn, *args))
        while len(self._pending) > self.depth:
            self._pending.pop(0).result()

    def drain(self) -> None:
        try:
            while self._pending:
                self._pending.pop(0).result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _batches(sources: list[Source], columns: list[str], schema: Schema, batch_rows: int,
             dictionary: Iterable[str] = (), split_columns: list[str] = (), quote_scans: dict | None = None
             ) -> Iterator[tuple[int, Source, int, str, int, pa.RecordBatch]]:
    """Each file's batches; `split_columns` (--split-column) read only from the inputs split by it. Id columns
    that nothing else reads are read from a CSV as written; `quote_scans` is the build's (sources.iter_batches)."""
    used = ({c.column for c in schema.categorical} | {n.column for n in schema.numeric}
            | {t.column for t in schema.tasks} | {schema.sample_weight} | set(split_columns))
    as_written = [c for c in schema.id_columns if c not in used]
    for si, src in enumerate(sources):
        read = list(dict.fromkeys(columns + list(split_columns))) if src.rule == "column" else columns
        for fi, path in enumerate(src.files):
            for offset, batch in iter_batches(path, read, schema.reader, batch_rows, dictionary, as_written,
                                              quote_scans):
                yield si, src, fi, path, offset, batch


def dictionary_inputs(cs: CompiledSpec, extra: list[str]) -> list[str]:
    """Raw (string) columns to read dictionary-encoded in the transform pass: those used only by categorical
    features that then compute ids once per distinct value (CompiledSpec._dictionary_ids); never id columns
    (passed through as read), labels, weights, numeric or split columns. A column whose dictionary outgrows a batch
    arrives decoded from there on (sources.iter_batches)."""
    as_dict = pa.dictionary(pa.int32(), pa.string())
    uses: dict[str, list[bool]] = {}
    for st in cs.features.values():
        uses.setdefault(st["column"], []).append(st["kind"] in ("vocab", "hash") and dictionary_fast_path(st, as_dict))
    other = set(cs.spec.id_columns) | {t["column"] for t in cs.tasks.values()} | {cs.weight_column} | set(extra)
    return [c for c, ok in uses.items() if c not in other and all(ok)]


def dictionary_outputs(spec: FeatureSpec) -> list[str]:
    """Output columns worth Parquet dictionary encoding: sparse features with few ids. Row ids, hashed /
    large-vocabulary ids and float columns are written plain: their dictionaries are large or cost more
    encoding time than they save space."""
    return [f.name for f in spec.sparse_features if f.num_embeddings <= DICTIONARY_MAX_IDS]


def group_by_split(table: pa.Table, split: np.ndarray) -> list[tuple[int, pa.Table]]:
    """[(split index, its rows in input order)] for the splits present: one stable sort and one gather per
    column, then zero-copy slices (instead of one filter per split)."""
    counts = np.bincount(split, minlength=len(SPLITS))
    if table.num_rows == 0:
        return []
    if counts.max() == table.num_rows:
        return [(int(split[0]), table)]
    order = pa.array(np.argsort(split, kind="stable"))
    grouped = pa.table([c.take(order) for c in table.columns], schema=table.schema)
    parts, start = [], 0
    for k, n in enumerate(counts.tolist()):
        if n:
            parts.append((k, grouped.slice(start, n)))
            start += n
    return parts


def _refuse_repeated_files(sources: list[Source]) -> None:
    """A file named by two inputs (or twice by one glob list) would be read twice: its rows duplicated, or the same
    rows in train and in valid / test."""
    repeated = first_repeated_file(f for src in sources for f in src.files)
    if repeated:
        raise FeatureDataError(f"the input file is given twice ({repeated[0]!r} and {repeated[1]!r}): its rows would "
                               "be read twice, duplicated or in two splits", file=repeated[1])


def _refuse_inputs_in_output(sources: list[Source], output: Path) -> None:
    """--overwrite replaces the output directory whole: an input inside it would be deleted (or half read)."""
    out = Path(os.path.realpath(output))
    for src in sources:
        for f in src.files:
            if Path(os.path.realpath(f)).is_relative_to(out):
                raise FeatureDataError(f"the input file lies inside the output directory {str(output)!r}, which the "
                                       "build replaces: choose an output directory apart from the inputs", file=f)


def _warn_single_file_inputs(sources: list[Source]) -> None:
    """Single-file inputs are keyed by nothing but the row (Source.key), so their random splits coincide."""
    single = [s.files[0] for s in sources if s.rule == "random" and len(s.files) == 1 and s.key(0) == ""]
    if len(single) > 1:
        logger.warning("inputs %s are single files split at random: a single-file input is keyed by nothing but "
                       "the row, so their rows at the same positions go to the same split; give them as one directory "
                       "or glob input to split them independently", ", ".join(single))


def _refuse_changed(identities: dict[str, tuple | None]) -> None:
    """Each input is read twice (fit, then transform): a file another job rewrote meanwhile would be transformed
    with a spec fitted on other rows (its vocabularies, statistics and train row count those of the old bytes)."""
    for path, identity in identities.items():
        if file_identity(path) != identity:
            raise FeatureDataError("changed while the build read it (its size, inode, modification or status-change "
                                   "time are not those it had when the build started: rewritten, or touched, chmod-ed "
                                   "or linked), so the spec might not describe the rows written; build again once "
                                   "nothing writes to it", file=path)


def id_column_types(schema: Schema, sources: list[Source]) -> dict[str, pa.DataType]:
    """The type each id column is written with, from the input files' schemas (id_columns.plan_id_types). A CSV
    file's header is read for it (its ids are text): an empty file is reported as such, not as text ids that clash
    with a Parquet file's integers."""
    ids = list(schema.id_columns)
    return plan_id_types((f, file_header(f, schema.reader).types(ids)) for s in sources for f in s.files)


def build(schema: Schema, sources: list[Source], output: str | os.PathLike, seed: int = 0,
          split_column: str | None = None, batch_rows: int = 65_536, row_group_rows: int = 65_536,
          rows_per_file: int = 1_048_576, overwrite: bool = False, log=None) -> FeatureSpec:
    """Fit on the train rows of `sources` (pass 1), transform every row into its split (pass 2)."""
    output = resolved_output(output)
    problem = output_dir_problem(output, overwrite)
    if problem:
        raise FeatureDataError(f"{output}: {problem}")  # a folder: not "file <output>"
    _refuse_inputs_in_output(sources, output)
    if row_group_rows < 1 or rows_per_file < 1 or batch_rows < 1:
        raise FeatureDataError(f"--batch-rows {batch_rows}, --row-group-rows {row_group_rows} and --rows-per-file "
                               f"{rows_per_file} must be positive")
    if not 0 <= seed < 2 ** 32:  # the split keys take 32 bits of it: 3 and 2**32 + 3 made the same split
        raise FeatureDataError(f"--seed must be in [0, 2**32), got {seed}")
    _refuse_repeated_files(sources)
    _warn_single_file_inputs(sources)
    identities = {f: file_identity(f) for s in sources for f in s.files}  # before any read: see _refuse_changed
    id_types = id_column_types(schema, sources)
    if split_column and any(s.rule == "column" for s in sources):
        extra = [split_column]
    else:
        extra = []
    columns, fit_columns = schema.raw_columns(), schema.raw_columns(with_labels=False)
    t0 = time.perf_counter()

    fitter = SpecFitter(schema)
    seen_rows = 0
    quote_scans: dict = {}  # a CSV file's quote scan, made in the fit pass, read again in the transform pass
    for si, src, fi, path, offset, batch in prefetch(_batches([s for s in sources if s.may_hold("train")],
                                                              fit_columns, schema, batch_rows,
                                                              split_columns=extra, quote_scans=quote_scans)):
        seen_rows += batch.num_rows
        split = assign_splits(src, fi, offset, batch, seed, split_column, path)
        mask = split == 0
        if mask.any():
            fitter.update(batch, None if mask.all() else mask, file=path, row_offset=offset)
    if seen_rows == 0 and all(s.may_hold("train") for s in sources):
        raise FeatureDataError("empty input: no rows in " + ", ".join(f for s in sources for f in s.files))
    _refuse_changed(identities)
    spec = fitter.spec()
    t_fit = time.perf_counter() - t0
    if log:
        log(f"fitted spec {spec.version} on {fitter.rows} train rows in {t_fit:.1f}s")

    tmp = temp_path(output, "tmp")
    made = missing_parents(tmp)  # removed again if the build fails
    tmp.mkdir(parents=True)
    try:
        cs = compiled(spec)
        encode = dictionary_outputs(spec)
        writers = {s: SplitWriter(tmp / s, row_group_rows, rows_per_file, encode, spec.version) for s in SPLITS}
        total = 0
        labels = TrainLabelCheck(cs.tasks, cs.weight_column)
        bg = BackgroundWrites()
        try:
            for si, src, fi, path, offset, batch in prefetch(_batches(sources, columns, schema, batch_rows,
                                                                      dictionary_inputs(cs, extra), extra,
                                                                      quote_scans)):
                split = assign_splits(src, fi, offset, batch, seed, split_column, path)
                out = cast_ids(cs.transform(batch, with_labels=True, file=path, row_offset=offset), id_types, path)
                total += out.num_rows
                labels.update(batch, out, split == 0)
                for k, part in group_by_split(out, split):
                    bg.submit(writers[SPLITS[k]].write, part)
        finally:
            bg.drain()
        _refuse_changed(identities)
        if total == 0:
            raise FeatureDataError("empty input: no rows in " + ", ".join(f for s in sources for f in s.files))
        labels.check()
        empty = cs.output_schema(True, id_types)
        for w in writers.values():
            w.close(empty)
        spec.save(tmp / "spec.json")
        elapsed = time.perf_counter() - t0
        manifest = {
            "spec_version": spec.version,
            "rows": {s: writers[s].rows for s in SPLITS},
            "seed": seed,
            "split_column": split_column,
            "inputs": [{"files": list(s.files), "rule": s.rule, "splits": list(s.splits), "weights": list(s.weights)}
                       for s in sources],
            "schema": schema.source,
            "seconds": {"fit": round(t_fit, 3), "total": round(elapsed, 3)},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        replace_dir(tmp, output, overwrite=overwrite)
        if log:
            rows = ", ".join(f"{s} {writers[s].rows}" for s in SPLITS)
            log(f"wrote {output} ({rows} rows) in {elapsed:.1f}s ({total / elapsed:,.0f} rows/s incl. fit)")
        return spec
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_empty_folders(made)
        raise


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmoe-rec features",
        description="Fit a FeatureSpec on the train split and write feature Parquet (DIR/spec.json, "
                    "DIR/{train,valid,test}/part-*.parquet).",
        epilog="examples:\n"
               "  mmoe-rec features --schema configs/features/synthetic_rec.yaml --input demo_out/raw/synthetic_rec "
               "--output demo_out/features/synthetic_rec --valid-fraction 0.1 --test-fraction 0.1 --seed 0\n"
               "  mmoe-rec features --schema configs/features/census.yaml "
               "--input train=data/census_income/train.csv.xz --input valid+test=data/census_income/test.csv.xz "
               "--output data/census_features --seed 0",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--schema", required=True, help="feature schema YAML (configs/features/*.yaml)")
    p.add_argument("--input", action="append", required=True, metavar="[SPLITS=]PATH",
                   help="CSV/Parquet file, directory or glob; optional prefix train=, valid+test=, "
                        "train:0.9+valid:0.1= says which splits its rows go to (repeatable)")
    p.add_argument("--output", required=True, help="output directory DIR")
    p.add_argument("--split-column", help="column of unprefixed inputs holding train / valid / test")
    p.add_argument("--valid-fraction", type=float, default=0.0, help="unprefixed inputs: fraction to valid")
    p.add_argument("--test-fraction", type=float, default=0.0, help="unprefixed inputs: fraction to test")
    p.add_argument("--seed", type=int, default=0, help="seed of the random split assignment (default 0)")
    p.add_argument("--batch-rows", type=int, default=65_536, help="rows per streamed batch")
    p.add_argument("--row-group-rows", type=int, default=65_536, help="rows per Parquet row group")
    p.add_argument("--rows-per-file", type=int, default=1_048_576, help="rows per output Parquet file")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.split_column and (args.valid_fraction or args.test_fraction):
        print("error: --split-column excludes --valid-fraction / --test-fraction", file=sys.stderr)
        return 2
    try:
        schema = load_schema(args.schema)
        sources = [parse_input(a, args.split_column, args.valid_fraction, args.test_fraction, args.output)
                   for a in args.input]
        build(schema, sources, args.output, seed=args.seed, split_column=args.split_column,
              batch_rows=args.batch_rows, row_group_rows=args.row_group_rows, rows_per_file=args.rows_per_file,
              overwrite=args.overwrite, log=lambda m: print(m, file=sys.stderr))
    except (FeatureDataError, FileExistsError) as e:  # FileExistsError: an output another job wrote meanwhile
        from mmoe_rec.cli import print_user_error

        print_user_error(e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
