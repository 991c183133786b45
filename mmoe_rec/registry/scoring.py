"""Batch scoring job: raw Parquet or CSV in, score Parquet out, with a registered model.

Output columns: the spec's id columns passed through, `score_<task>` per task, `model_name`, `model_version` (the
registry's version number, an alias or "latest" resolved; for a package folder "package-" and a hash of its
model.json, spec.json and weights).
Id columns keep their values exactly: files whose id columns are typed differently are written in the one type
every file converts to without loss (int32 and int64 as int64), found before scoring; ids that would change
("007" as 7) are an error naming the files. Files without rows give an output without rows.
The output is written to a temporary file beside the target and renamed when complete; the row count out is
checked against the row count in. `--input` takes files and folders together (a folder: all its files,
skipping names that start with "." or "_"); a file named twice is refused. An output that is an input file, lies
inside an input folder or is a folder is refused before anything is read. Feature Parquet (written by
`mmoe-rec features`) is refused: scoring transforms raw rows itself. A bad value is reported at its file and its
row inside that file. CSV files (.csv / .tsv / .txt, optionally .gz / .bz2 / .xz) are read as `mmoe-rec features`
reads them, with the reader settings the model's feature spec was fitted with; their columns are text, as in
training on CSV. `--precision bf16` runs the model under CPU autocast to bfloat16, as `--trainer.precision
bf16-mixed` trains (`registry.scorer.Scorer`); the output's Arrow schema metadata records the precision
(`mmoe_rec.score_precision`: "32" or "bf16").
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import os
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mmoe_rec import job_outcome
from mmoe_rec.features.id_columns import cast_ids, plan_id_types
from mmoe_rec.features.schema import ReaderSpec
from mmoe_rec.features.sources import file_header, input_format, iter_batches
from mmoe_rec.features.transform import compiled
from mmoe_rec.nn import cpu_gemm
from mmoe_rec.output_dir import (missing_parents, publish_file, remove_empty_folders, resolved_output, sigterm_held,
                                 spelt_as_folder, temp_path)
from mmoe_rec.registry.code_version import code_mismatch
from mmoe_rec.registry.inputs import expand_inputs
from mmoe_rec.registry.scorer import PRECISIONS, Scorer, checked_precision
from mmoe_rec.registry.versions import model_versions


PRECISION_KEY = "mmoe_rec.score_precision"  # the score Parquet's schema metadata: "32" or "bf16"
USAGE = "--model must be models:/<name>@<alias>, models:/<name>/<version>, models:/<name>/latest or a package folder"


def resolve_model(model_uri: str, precision: str = "32") -> tuple[Scorer, str, str]:
    """Load `models:/name@alias`, `models:/name/version`, `models:/name/latest`, or a local package folder.
    Returns (scorer, name, version): the registry's version number (an alias or "latest" resolved to it), or for
    a package folder "package-" + the first 16 hex digits of a SHA-256 over its model.json, spec.json and weights
    (two packages that score otherwise, by their weights or by a setting such as k, must not write the same
    model_version). `precision`: the Scorer's, "32" or "bf16"."""
    if os.path.isdir(model_uri) and os.path.exists(os.path.join(model_uri, "model.json")):
        from mmoe_rec.registry.package import PACKAGE_FILES, load_package

        model = load_package(model_uri)
        digest = hashlib.sha256("".join(_file_sha256(Path(model_uri) / name) for name in PACKAGE_FILES).encode())
        return Scorer(model, precision), Path(model_uri).resolve().name, f"package-{digest.hexdigest()[:16]}"
    import mlflow.pyfunc
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if not model_uri.startswith("models:/"):
        raise ValueError(f"{USAGE}, got {model_uri!r}")
    ref = model_uri[len("models:/"):]
    if "@" in ref:
        name, alias = ref.split("@", 1)
        version = None
    else:
        name, _, version = ref.partition("/")
        if not name or not version or "/" in version:
            raise ValueError(f"{USAGE}, got {model_uri!r}")
        if version != "latest" and not version.isdigit():
            raise ValueError(f"{USAGE}, got {model_uri!r} (version {version!r} is not a number)")
    client = MlflowClient()
    try:
        if version is None:
            version = client.get_model_version_by_alias(name, alias).version
        elif version == "latest":
            versions = model_versions(client, name)
            if not versions:
                raise ValueError(f"{model_uri}: registered model {name!r} has no versions in {_store()}")
            version = max(int(v.version) for v in versions)
        else:  # the registry's own spelling ("01" is version 1), and a version that is not there is named here
            version = client.get_model_version(name, version).version
    except MlflowException as e:  # not found: say in which store, the usual cause being the wrong one
        from mlflow.protos.databricks_pb2 import ErrorCode

        # e.error_code is the code's name; the constructor takes its number (else INTERNAL_ERROR, HTTP 500)
        raise MlflowException(f"{e.message.rstrip('.')} in {_store()}",
                              error_code=ErrorCode.Value(e.error_code)) from None
    version = str(version)
    mismatch = code_mismatch(f"models:/{name}/{version}", client.get_model_version(name, version).tags)
    if mismatch:
        print(mismatch, file=sys.stderr)
    loaded = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    scorer = loaded.unwrap_python_model().scorer
    scorer.precision = checked_precision(precision)
    return scorer, name, version


def _store() -> str:
    """The tracking URI in use, without a password it may carry (the message goes to logs)."""
    import mlflow

    from mmoe_rec.training.tracking import redacted

    return redacted(mlflow.get_tracking_uri())


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_output_is_not_an_input(inputs: str | os.PathLike | list, output: str | os.PathLike) -> None:
    """Refuse an `output` that is one of the input files, lies inside an input folder, or is a folder.

    The output is renamed into place at the end: onto an input file it would replace the raw table it was scored
    from, inside an input folder it would be read back as input by the next run, and onto a folder the rename
    would fail only after every row is scored.
    """
    if spelt_as_folder(output):
        raise ValueError(f"--output {output} is a folder: --output must be a file path, such as "
                         f"{Path(output) / 'scores.parquet'}")
    out = Path(output).expanduser().resolve()
    for item in [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs):
        src = Path(item).expanduser().resolve()
        if src.is_dir():
            if out == src or src in out.parents:
                raise ValueError(f"--output {output} is inside the input folder {item}: it would be read as input "
                                 f"by the next run; write the scores outside {item}")
        elif out == src or (out.exists() and src.exists() and os.path.samefile(out, src)):
            raise ValueError(f"--output {output} is the input file {item}: scoring would replace the raw table; "
                             f"choose another output path")
    if out.is_dir():
        raise ValueError(f"--output {output} is a directory: --output must be a file path, such as "
                         f"{Path(output) / 'scores.parquet'}")


def saved_reader(spec) -> ReaderSpec:
    """The CSV reader settings the spec was fitted with (a CSV to score is read as its training CSV was)."""
    saved = spec.transforms.get("reader") or {}
    known = {f.name for f in dataclasses.fields(ReaderSpec)}
    return ReaderSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in known})


def files_to_score(inputs: str | os.PathLike | list) -> list[str]:
    """The input files, one flat list (a folder and files together, each file once); none is an error."""
    files = expand_inputs(inputs)
    if not files:
        shown = inputs if isinstance(inputs, (str, os.PathLike)) else ", ".join(map(str, inputs))
        raise ValueError(f"no files to score in {shown} (a folder's names starting with . or _ are skipped)")
    return files


def score_parquet(scorer: Scorer, inputs: str | list[str], output: str | os.PathLike, model_name: str,
                  model_version: str, batch_rows: int = 65_536, overwrite: bool = True) -> int:
    """Stream `inputs` (raw Parquet or CSV files, read as `mmoe-rec features` reads them) through the model into
    one Parquet file at `output`. Returns the number of rows scored. Input files without rows give an output
    without rows (the columns and types as always). Without `overwrite` a file at `output` is never replaced, also
    one that another job wrote while this one scored (FileExistsError, this job's output not written)."""
    check_output_is_not_an_input(inputs, output)
    output = resolved_output(output)
    files = files_to_score(inputs)
    reader = saved_reader(scorer.spec)
    for path in files:  # before any row is scored: the format of every file, then its columns
        input_format(path)
    headers = {}  # one read of each file's footer or header line
    for path in files:
        headers[path] = header = file_header(path, reader)
        scorer.check_raw_columns(header.names, path, header.metadata)
    # each id column's output type from every file before anything is scored (the files' order does not decide
    # it): features.id_columns' lossless widening, or an error naming both files; a CSV column is text
    id_types = plan_id_types((path, headers[path].types(scorer.spec.id_columns)) for path in files)
    columns = compiled(scorer.spec).input_columns(with_labels=False)
    # ids exactly as written, where no feature reads the same column (its values must be read as at the fit)
    as_written = [c for c in scorer.spec.id_columns
                  if c not in {st["column"] for st in compiled(scorer.spec).features.values()}]
    tmp = temp_path(output, "tmp")
    if len(os.fsencode(tmp.name)) > 255:  # most file systems' limit: refused before a folder is made for it
        raise ValueError(f"--output {output}: the file name is too long (the temporary file beside it, {tmp.name[:20]}"
                         f"..., would have {len(os.fsencode(tmp.name))} bytes, more than 255)")
    made = missing_parents(output)  # removed again if scoring fails
    read = written = 0
    read_from = dict.fromkeys(files, 0)  # rows read per file
    writer = None
    pending: list[pa.Table] = []  # scored batches not written yet: small files' rows share a row group
    pending_rows = 0

    def write_pending() -> None:
        nonlocal writer, pending_rows
        if writer is None:
            writer = pq.ParquetWriter(tmp, pending[0].schema)
        writer.write_table(pa.concat_tables(pending))  # one row group
        pending.clear()
        pending_rows = 0

    def scored(table: pa.Table, path: str, row_offset: int) -> pa.Table:
        scores = scorer.score_table(table, source=path, row_offset=row_offset)
        scores = scores.append_column("model_name", pa.array([model_name] * scores.num_rows, pa.string()))
        scores = scores.append_column("model_version", pa.array([model_version] * scores.num_rows, pa.string()))
        scores = cast_ids(scores, id_types, path)
        # the same model version scores a little differently in bfloat16: the file says which it was
        return scores.replace_schema_metadata({PRECISION_KEY: scorer.precision})

    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp.touch()  # at once: a failing job removes a folder it made only while empty, not one this job writes into
        for path in files:
            # errors name the row inside the file, not the run (the batch's first row in the file comes with it)
            for first_row, record_batch in iter_batches(path, columns, reader, batch_rows, as_written=as_written):
                if record_batch.num_rows == 0:
                    continue
                read += record_batch.num_rows
                read_from[path] += record_batch.num_rows
                scores = scored(pa.Table.from_batches([record_batch]), path, first_row)
                pending.append(scores)
                pending_rows += scores.num_rows
                written += scores.num_rows
                if pending_rows >= batch_rows:
                    write_pending()
        if pending:
            write_pending()
        if writer is None:  # every file is empty: an empty output in the usual columns, not an error
            empty = pa.table({c: pa.array([], headers[files[0]].types([c])[c]) for c in columns})
            writer = pq.ParquetWriter(tmp, scored(empty, files[0], 0).schema)
        writer.close()
        writer = None
        # a Parquet file's footer says how many rows it has; a CSV file's rows are those read
        expected = sum(read_from[p] if headers[p].num_rows is None else headers[p].num_rows for p in files)
        if written != expected or read != expected:
            raise RuntimeError(f"scored {written} rows but the input has {expected}: output not written")
        with sigterm_held():  # the output complete and said so, or not written: no SIGTERM in between
            publish_file(tmp, output, overwrite=overwrite)
            job_outcome.done(f"wrote {output}")
    except BaseException:  # no partial output: the temporary file and the folders made for it go
        if writer is not None:
            writer.close()
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        remove_empty_folders(made)
        raise
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mmoe-rec score", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="models:/<name>@<alias>, models:/<name>/<version>, models:/<name>/latest, or a package folder")
    # extend: `--input a --input b` scores both (with nargs alone the last --input replaced the ones before)
    p.add_argument("--input", required=True, nargs="+", action="extend",
                   help="raw Parquet or CSV file(s) or a folder (several after one --input, or --input repeated)")
    p.add_argument("--output", required=True, help="score Parquet file to write (not one that exists, unless "
                                                    "--overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--batch-rows", type=int, default=65_536,
                   help="rows read and scored at a time (memory); the output's row groups hold as many or more "
                        "(the last one the rest)")
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    p.add_argument("--precision", choices=PRECISIONS, default="32",
                   help="32: float32 (default); bf16: the model under bfloat16 autocast, as bf16-mixed trains, faster "
                        "on CPUs with bfloat16 instructions (AMX, AVX512-BF16: 1.8x the rows/s on a Xeon 6), scores "
                        "within bfloat16 rounding of float32's")
    args = p.parse_args(argv)
    check_output_is_not_an_input(args.input, args.output)  # before loading or reading anything
    if args.batch_rows < 1:
        raise ValueError(f"--batch-rows must be >= 1, got {args.batch_rows}")
    # as `features` and `synth`: never replace data unasked (checked again as the file is put in place: a file that
    # another job wrote meanwhile stays)
    if Path(args.output).expanduser().exists() and not args.overwrite:
        raise FileExistsError(f"--output {args.output} exists: pass --overwrite to replace it")
    files_to_score(args.input)  # a file named twice, no such input, or none: refused before the model loads
    from mmoe_rec.training.tracking import configure_tracking

    configure_tracking(args.tracking_uri, setting="--tracking-uri")
    start = time.perf_counter()
    scorer, name, version = resolve_model(args.model, args.precision)
    if args.precision == "bf16" and not cpu_gemm.native_bf16():
        print("--precision bf16: this CPU has no bfloat16 instructions (AMX, AVX512-BF16); bfloat16 is emulated "
              "here and likely slower than float32", file=sys.stderr)
    rows = score_parquet(scorer, args.input, args.output, name, version, args.batch_rows, args.overwrite)
    secs = time.perf_counter() - start
    label = f"{name} v{version}" if version.isdigit() else f"{name} ({version})"  # package-<hash>: no "v"
    print(f"scored {rows} rows with {label} -> {args.output} ({rows / secs:,.0f} rows/s)", file=sys.stderr)
    return 0
