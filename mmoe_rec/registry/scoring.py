"""Batch scoring job: raw Parquet in, score Parquet out, with a registered model.

Output columns: the spec's id columns passed through, `score_<task>` per task, `model_name`, `model_version`.
The output is written to a temporary file beside the target and renamed when complete; the row count out is
checked against the row count in. An output that is an input file, or lies inside an input folder, is refused
before anything is read. A bad value is reported at its file and its row inside that file.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from mmoe_rec.registry.scorer import Scorer


def resolve_model(model_uri: str) -> tuple[Scorer, str, str]:
    """Load `models:/name@alias`, `models:/name/version`, or a local package folder. Returns (scorer, name, version)."""
    if os.path.isdir(model_uri) and os.path.exists(os.path.join(model_uri, "model.json")):
        from mmoe_rec.registry.package import load_package

        model = load_package(model_uri)
        return Scorer(model), Path(model_uri).name, model.feature_spec.version
    import mlflow.pyfunc
    from mlflow import MlflowClient

    if not model_uri.startswith("models:/"):
        raise ValueError(f"--model must be models:/<name>@<alias>, models:/<name>/<version> or a package folder, got {model_uri!r}")
    ref = model_uri[len("models:/"):]
    client = MlflowClient()
    if "@" in ref:
        name, alias = ref.split("@", 1)
        version = client.get_model_version_by_alias(name, alias).version
    else:
        name, _, version = ref.partition("/")
    loaded = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    return loaded.unwrap_python_model().scorer, name, str(version)


def check_output_is_not_an_input(inputs: str | os.PathLike | list, output: str | os.PathLike) -> None:
    """Refuse an `output` that is one of the input files or lies inside an input folder.

    The output is renamed into place at the end: onto an input file it would replace the raw table it was scored
    from, and inside an input folder it would be read back as input by the next run.
    """
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


def _cast_like(scores: pa.Table, schema: pa.Schema, path: str) -> pa.Table:
    """The scores of a file whose id columns have other (compatible) types than the first file's, in the output's
    schema; an id type that cannot be cast is an error naming the file and the column."""
    for field in schema:
        have = scores.schema.field(field.name).type
        if have != field.type:
            try:
                column = scores.column(field.name).cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise ValueError(f"file {path}, column {field.name!r}: type {have} does not match {field.type} of "
                                 f"the files before it ({e})") from None
            scores = scores.set_column(scores.schema.get_field_index(field.name), field.name, column)
    return scores


def score_parquet(scorer: Scorer, inputs: str | list[str], output: str | os.PathLike, model_name: str,
                  model_version: str, batch_rows: int = 65_536) -> int:
    """Stream `inputs` through the model into one Parquet file at `output`. Returns the number of rows scored."""
    check_output_is_not_an_input(inputs, output)
    output = Path(output)
    dataset = ds.dataset(inputs, format="parquet")
    expected = dataset.count_rows()
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    output.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    writer = None
    try:
        for fragment in dataset.get_fragments():
            file_rows = 0  # rows of this file already read: errors name the row inside the file, not the run
            for record_batch in fragment.to_batches(batch_size=batch_rows):
                if record_batch.num_rows == 0:
                    continue
                table = pa.Table.from_batches([record_batch])
                scores = scorer.score_table(table, source=fragment.path, row_offset=file_rows)
                file_rows += table.num_rows
                scores = scores.append_column("model_name", pa.array([model_name] * scores.num_rows, pa.string()))
                scores = scores.append_column("model_version", pa.array([model_version] * scores.num_rows, pa.string()))
                if writer is None:
                    writer = pq.ParquetWriter(tmp, scores.schema)
                elif scores.schema != writer.schema:  # another file's id columns typed differently
                    scores = _cast_like(scores, writer.schema, fragment.path)
                writer.write_table(scores)
                written += scores.num_rows
        if writer is None:
            raise ValueError(f"{inputs}: no rows to score")
        writer.close()
        writer = None
        if written != expected:
            raise RuntimeError(f"scored {written} rows but the input has {expected}: output not written")
        os.replace(tmp, output)
    finally:
        if writer is not None:
            writer.close()
        if tmp.exists():
            tmp.unlink()
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mmoe-rec score", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="models:/<name>@<alias>, models:/<name>/<version>, or a package folder")
    p.add_argument("--input", required=True, nargs="+", help="raw Parquet file(s) or a folder")
    p.add_argument("--output", required=True, help="score Parquet file to write")
    p.add_argument("--batch-rows", type=int, default=65_536)
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    args = p.parse_args(argv)
    check_output_is_not_an_input(args.input, args.output)  # before loading or reading anything
    from mmoe_rec.training.tracking import configure_tracking

    configure_tracking(args.tracking_uri)
    start = time.perf_counter()
    scorer, name, version = resolve_model(args.model)
    inputs = args.input[0] if len(args.input) == 1 else args.input
    rows = score_parquet(scorer, inputs, args.output, name, version, args.batch_rows)
    secs = time.perf_counter() - start
    print(f"scored {rows} rows with {name} v{version} -> {args.output} ({rows / secs:,.0f} rows/s)", file=sys.stderr)
    return 0
