"""Raw inputs: resolve files / directories / globs, and stream them as record batches in bounded memory.

CSV (optionally .gz / .bz2 / .xz compressed; .tsv tab-separated) is read with pyarrow's streaming reader, every
needed column as a string (the feature code converts and checks types itself, so an error can name the row; a
row with the wrong number of fields is named too). Parquet is read
row group by row group with ``ParquetFile.iter_batches``. Each batch comes with its first row's index in the
file, so errors can name the file row. With ``reader.strip_whitespace`` CSV fields are trimmed, and a field
that is one of ``reader.null_values`` once trimmed (" ?") is null. A needed column named twice in a file, or a
CSV header that differs from the schema's ``reader.column_names``, is an error naming the file.
"""
from __future__ import annotations

import contextlib
import csv
import glob
import io
import lzma
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from mmoe_rec.features.arrow_kernels import if_else
from mmoe_rec.features.errors import FeatureDataError, missing_columns_error
from mmoe_rec.features.id_columns import schema_types
from mmoe_rec.features.schema import ReaderSpec
from mmoe_rec.paths import folder_files, skipped_name

PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv", ".tsv", ".txt")
COMPRESSION_SUFFIXES = ("", ".gz", ".bz2", ".xz")


def input_format(path: str) -> str:
    name = path.lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if any(name.endswith(s + c) for s in CSV_SUFFIXES for c in COMPRESSION_SUFFIXES):
        return "csv"
    raise FeatureDataError("unknown input format (expected .parquet/.pq, or .csv/.tsv/.txt read as CSV, optionally "
                           ".gz/.bz2/.xz)", file=path)


def resolve_inputs(spec: str, exclude: str | os.PathLike | None = None) -> list[str]:
    """A file, a folder or a glob -> sorted list of files. A folder gives every file below it (recursively, as the
    scoring job reads one), a glob every file it matches and every file below a folder it matches; both pass over
    names that start with "." or "_" (`_SUCCESS`, `.crc`, `_tmp/`) below the input's root, and the folder `exclude`
    (the build's own output, when it lies inside an input folder). Any other file must be of a known format: one
    passed over would lose its rows unseen."""
    p = Path(spec)
    if p.is_dir():
        files = folder_files(spec, exclude)
    elif p.is_file():
        input_format(spec)
        files = [spec]
    else:
        root = glob_root(spec)
        found: list[str] = []
        for match in sorted(glob.glob(spec, recursive=True)):
            if os.path.isdir(match):
                found += folder_files(match, exclude)
            elif os.path.isfile(match):
                found.append(match)
        out = None if exclude is None else os.path.realpath(exclude)
        files = sorted(f for f in dict.fromkeys(found)
                       if not any(skipped_name(part) for part in Path(os.path.relpath(f, root)).parts)
                       and (out is None or not os.path.realpath(f).startswith(out + os.sep)))
    if not files:
        raise FeatureDataError("no input files found (file, directory or glob)", file=spec)
    for f in files:
        try:
            input_format(f)
        except FeatureDataError as e:
            built = next((d for d in Path(f).parents
                          if (d / "spec.json").is_file() and (d / "manifest.json").is_file()), None)
            where = (f"it is in {built}, a feature folder `mmoe-rec features` wrote inside --input {spec}: move that "
                     "folder out of the input" if built else
                     f"it is one of --input {spec}'s files: move it out, or name the data files by a glob")
            raise FeatureDataError(f"{e.reason}; {where}", file=f) from None
    return files


def glob_root(spec: str) -> Path:
    """A glob's leading folders before its first wildcard ("." if it starts with one)."""
    parts = Path(spec).parts
    fixed = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts) - 1)
    return Path(*parts[:fixed]) if fixed else Path(".")


def _open_csv_stream(path: str):
    if path.lower().endswith(".xz"):
        return lzma.open(path, "rb")  # Arrow has no xz codec; lzma streams it
    return pa.input_stream(path, compression="detect")


def _delimiter(path: str, reader: ReaderSpec) -> str:
    """The reader's delimiter, except that .tsv files (compressed or not) default to tabs."""
    name = path.lower()
    for c in COMPRESSION_SUFFIXES[1:]:
        name = name.removesuffix(c)
    return "\t" if name.endswith(".tsv") and reader.delimiter == "," else reader.delimiter


CSV_BLOCK_BYTES = 1 << 22  # Arrow's read block: CSV is parsed (and held) this much at a time


@contextlib.contextmanager
def _arrow_csv_source(path: str) -> Iterator[tuple[pa.NativeFile, int | None]]:
    """(a stream of the file that Arrow reads with its own reader, no Python in its threads; the number of '"' bytes
    in it, or None where not counted on the way). An .xz file (Arrow has no xz codec) is decompressed into a
    temporary file first, counted as it is written, and deleted after: read through Python's lzma, Arrow's
    read-ahead thread could still be inside Python's read when the interpreter shut down, which aborted the
    process, even after a complete read."""
    if not path.lower().endswith(".xz"):
        with _open_csv_stream(path) as stream:
            yield stream, None
        return
    with tempfile.NamedTemporaryFile(prefix="mmoe-rec-", suffix=".csv") as plain:
        quotes = 0
        with lzma.open(path, "rb") as f:
            while block := f.read(1 << 24):
                quotes += block.count(b'"')
                plain.write(block)
        plain.flush()
        with pa.input_stream(plain.name) as stream:
            yield stream, quotes


def _csv_reader(path: str, reader: ReaderSpec, include: list[str] | None, stream: pa.NativeFile):
    """A quoted field may hold line breaks (RFC 4180): Arrow is told so, or it cuts its blocks at the last line end
    and refuses a file whose block ends fall inside such a field ("CSV parser got out of sync with chunker")."""
    read = pacsv.ReadOptions(
        column_names=list(reader.column_names) if reader.column_names else None,
        skip_rows=1 if (reader.column_names and reader.header) else 0,
        autogenerate_column_names=not reader.header and not reader.column_names,
        block_size=CSV_BLOCK_BYTES,
    )
    parse = pacsv.ParseOptions(delimiter=_delimiter(path, reader), newlines_in_values=True)
    convert = pacsv.ConvertOptions(
        include_columns=include,
        column_types={c: pa.string() for c in include} if include else None,
        strings_can_be_null=True,
        null_values=list(reader.null_values),
    )
    return pacsv.open_csv(stream, read_options=read, parse_options=parse, convert_options=convert)


_UTF8_BOM = b"\xef\xbb\xbf"


def _record_end(body: bytes, delimiter: int, start: int = 0) -> int:
    """Index of the line end that closes the CSV record starting at `start` in `body`, or -1 if it is not in
    `body` yet. A line end inside a quoted field ('"' at a field's start, '""' a quote inside it) does not close
    the record; a quote elsewhere in a field is a plain character, as in Arrow's reader and Python's csv module."""
    quoted, field_start, i, n = False, True, start, len(body)
    while i < n:
        c = body[i]
        if quoted:
            if c == 0x22:  # '"': a doubled quote stays inside, a single one closes the field's quoting
                if i + 1 < n and body[i + 1] == 0x22:
                    i += 1
                elif i + 1 >= n:
                    return -1  # cannot tell yet
                else:
                    quoted = False
        elif c in (0x0A, 0x0D):
            return i
        elif c == 0x22 and field_start:
            quoted = True
        field_start = c == delimiter and not quoted
        i += 1
    return -1


def _first_record(path: str, delimiter: str) -> bytes | None:
    """The file's first CSV record (the first non-empty line, and the lines a quoted field spans), without its
    line end; None if the file has none. Read in Python, never with Arrow's streaming CSV reader: that one starts
    a read-ahead thread over the (lzma) Python file object, which could still be running at interpreter exit,
    right after an error message about this header, and abort the process ("terminate called without an active
    exception", exit 134)."""
    return next(_csv_records(path, delimiter, block_bytes=1 << 16), None)


def _split_fields(text: str, delimiter: str) -> list[str]:
    """One CSV record's fields ('"' quotes, a doubled quote inside), as Arrow's reader splits them."""
    return next(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quotechar='"', doublequote=True,
                           strict=False), [])


def _header_names(path: str, reader: ReaderSpec) -> list[str]:
    """The column names Arrow's CSV reader gives the file (as _csv_reader opens it without column_names): the
    first record's fields ('"' quotes, doubled quote inside), or f0, f1, ... for as many fields without a header."""
    delimiter = _delimiter(path, reader)
    if len(delimiter) != 1:
        raise FeatureDataError(f"reader.delimiter must be one character, got {delimiter!r}", file=path)
    line = _first_record(path, delimiter)
    if line is None:
        raise FeatureDataError("empty input file (no header, no rows)", file=path)
    if reader.header:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise FeatureDataError(f"the CSV file's header is not UTF-8 text ({e})", file=path) from None
    else:  # only the fields are counted: a data row may hold other bytes in columns the schema does not read
        text = line.decode("latin-1")
    fields = _split_fields(text, delimiter)
    return fields if reader.header else [f"f{i}" for i in range(len(fields))]


def csv_columns(path: str, reader: ReaderSpec) -> list[str]:
    """The file's column names: reader.column_names, which a header line must repeat, else the header's."""
    if not reader.column_names:
        return _header_names(path, reader)
    if reader.header:
        header = _header_names(path, reader)
        if header != list(reader.column_names):  # the names would be given to other columns
            raise FeatureDataError(f"the file's header {header} differs from the schema's reader.column_names "
                                   f"{list(reader.column_names)}", file=path)
    return list(reader.column_names)


def _open_parquet(path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        raise FeatureDataError(f"unreadable Parquet file ({e})", file=path) from None


def file_columns(path: str, reader: ReaderSpec) -> list[str]:
    """Every column of one input file, from its footer (Parquet) or its header (CSV), without reading rows."""
    if input_format(path) == "csv":
        return csv_columns(path, reader)
    return _open_parquet(path).schema_arrow.names


def column_types(path: str, columns: list[str]) -> dict[str, pa.DataType]:
    """Arrow type of each of `columns`, as iter_batches yields it, without reading rows. A CSV column is always a
    string (its file is not opened here); a column a Parquet file lacks is left out (iter_batches reports it)."""
    if input_format(path) == "csv":
        return {c: pa.string() for c in columns}
    return schema_types(_open_parquet(path).schema_arrow, columns)


def iter_batches(path: str, columns: list[str], reader: ReaderSpec | None = None,
                 batch_rows: int = 65_536, dictionary: Iterable[str] = ()) -> Iterator[tuple[int, pa.RecordBatch]]:
    """Yield (first row in file, batch of `columns`) for one input file. Missing columns, unreadable or
    truncated files and empty files raise FeatureDataError naming the file (and column).

    Parquet string columns named in `dictionary` arrive dictionary-encoded (as stored: no strings decoded)."""
    reader = reader or ReaderSpec()
    fmt = input_format(path)
    have: list[str] = []
    csv_batches = None
    counter: _QuoteCounter | None = None
    sources = contextlib.ExitStack()
    try:
        if fmt == "parquet":
            pf = _open_parquet(path)
            have = pf.schema_arrow.names
            _check_columns(path, have, columns)
            as_dict = [c for c in dict.fromkeys(dictionary)
                       if c in columns and pf.schema_arrow.field(c).type == pa.string()]
            if as_dict:
                pf = pq.ParquetFile(path, read_dictionary=as_dict)
            batches = pf.iter_batches(batch_size=batch_rows, columns=list(dict.fromkeys(columns)))
            strip = False
        else:
            have = csv_columns(path, reader)
            _check_columns(path, have, columns)
            # '"' not counted on the way (all but .xz) are counted in a second pass, in a thread beside the read:
            # cheap for plain files; a .gz / .bz2 file is decompressed again, on the other core
            stream, quotes = sources.enter_context(_arrow_csv_source(path))
            if quotes is None:  # counted beside the read (see _QuoteCounter)
                counter = _QuoteCounter(path)
                sources.callback(counter.close)
            batches = csv_batches = _csv_reader(path, reader, list(dict.fromkeys(columns)), stream)
            strip = reader.strip_whitespace
            nulls = pa.array(list(reader.null_values), pa.string())
        row = 0
        for b in batches:
            if strip:
                b = pa.RecordBatch.from_arrays([_strip(a, nulls) for a in b.columns], names=b.schema.names)
            for start in range(0, b.num_rows, batch_rows):
                part = b.slice(start, batch_rows) if b.num_rows > batch_rows else b
                yield row + start, part
            row += b.num_rows
        if fmt == "csv" and (counter.result() if quotes is None else quotes) % 2:
            _refuse_unclosed_quote(path, reader)  # an odd count: a quoted field may run to the end of the file
    except FeatureDataError:
        raise
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError, EOFError, lzma.LZMAError) as e:
        msg = str(e)
        if "Empty CSV file" in msg:
            raise FeatureDataError("empty input file (no header, no rows)", file=path) from None
        if fmt == "csv" and msg.startswith("CSV parse error"):
            bad = _bad_csv_row(path, reader)
            if bad is not None:
                raise FeatureDataError(bad[1], file=path, row=bad[0]) from None
            raise FeatureDataError(f"malformed CSV ({msg.splitlines()[0]})", file=path) from None
        if fmt == "csv" and "straddling object" in msg:  # a record longer than Arrow's block: a quote not closed?
            _refuse_unclosed_quote(path, reader)
            raise FeatureDataError(f"a CSV record longer than {CSV_BLOCK_BYTES >> 20} MiB (Arrow's read block) or a "
                                   f"quoted field that does not close ({msg.splitlines()[0]})", file=path) from None
        if fmt == "csv" and "invalid UTF8" in msg:  # Arrow names a column index and, not always, a line
            match = re.search(r"CSV column #(\d+)", msg)
            index = int(match.group(1)) if match else -1
            raise FeatureDataError("not UTF-8 text (CSV files are read as UTF-8: convert it, e.g. with iconv)",
                                   file=path, column=have[index] if 0 <= index < len(have) else None,
                                   row=_first_non_utf8_row(path, reader, index) if index >= 0 else None) from None
        raise FeatureDataError(f"unreadable or truncated {fmt} file ({msg.splitlines()[0] if msg else type(e).__name__})",
                               file=path) from None
    finally:
        if csv_batches is not None:
            csv_batches.close()
        sources.close()  # the stream, and an .xz file's decompressed copy (deleted)


def _quote_count(path: str, stop: threading.Event | None = None) -> int:
    """The number of '"' bytes in a CSV file (decompressed), read in blocks in the calling thread (-1 if `stop` was
    set before the end)."""
    count = 0
    with _open_csv_stream(path) as f:
        while block := f.read(1 << 24):
            if stop is not None and stop.is_set():
                return -1
            count += bytes(block).count(b'"')
    return count


class _QuoteCounter:
    """_quote_count in a thread of its own, beside Arrow's read of the same file (decompression releases the GIL:
    a .gz / .bz2 file's second decompression overlaps the read instead of following it). `result()` waits for it;
    `close()` stops and joins it, so that no thread of ours still reads when the caller has gone (or the
    interpreter exits)."""

    def __init__(self, path: str) -> None:
        self._stop = threading.Event()
        self._count: int | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(path,), name="mmoe-rec-quote-count", daemon=True)
        self._thread.start()

    def _run(self, path: str) -> None:
        try:
            self._count = _quote_count(path, self._stop)
        except BaseException as e:  # noqa: BLE001 - handed to the caller by result()
            self._error = e

    def result(self) -> int:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._count

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _refuse_unclosed_quote(path: str, reader: ReaderSpec) -> None:
    """Raise where a quoted field opens that never closes: Arrow reads it to the end of the file as one value, the
    rows after it inside it, without an error. Called when the file holds an odd number of '"'; a '"' inside an
    unquoted field (`a"b`) is a plain character and makes the count odd too (then every record closes and nothing
    is raised), and one such beside an unclosed quote makes the count even: that unclosed quote is not found.
    Only on that path: read in Python."""
    delimiter = ord(_delimiter(path, reader))
    last, index = b"", -1
    for index, record in enumerate(_csv_records(path, chr(delimiter))):
        last = record
    if index < 0 or _record_end(last + b"\n", delimiter) >= 0:
        return
    row = index - (1 if reader.header else 0)
    lines = len(last.splitlines())
    raise FeatureDataError(f"a quoted field opens in this row and never closes (an unmatched '\"'): the CSV reader "
                           f"reads the rest of the file, {lines} lines, as its value", file=path, row=row)


def _csv_records(path: str, delimiter: str, block_bytes: int = 1 << 20) -> Iterator[bytes]:
    """The file's CSV records as bytes, a UTF-8 BOM and empty lines skipped (as Arrow skips them), a quoted
    field's line ends kept inside its record; the header, if any, is the first. Read in Python: for the header and
    for error messages."""
    with _open_csv_stream(path) as f:
        buf, pos, first = b"", 0, True
        while True:
            block = f.read(block_bytes)
            buf = buf[pos:] + block
            pos = 0
            if first and (len(buf) >= len(_UTF8_BOM) or not block):
                first = False
                if buf.startswith(_UTF8_BOM):
                    pos = len(_UTF8_BOM)
            while pos < len(buf):
                if buf[pos] in (0x0A, 0x0D):  # an empty line, or the \n of a \r\n
                    pos += 1
                    continue
                newline = buf.find(b"\n", pos)
                carriage = buf.find(b"\r", pos, newline if newline >= 0 else len(buf))
                newline = carriage if carriage >= 0 else newline  # \r alone, or the \r of \r\n
                if newline >= 0 and buf.find(b'"', pos, newline) < 0:
                    end = newline  # no quote before the line end: the record is the line (the fast common case)
                else:
                    end = _record_end(buf, ord(delimiter), pos)
                if end < 0:
                    break
                yield buf[pos:end]
                pos = end + 1
            if not block:
                if pos < len(buf):
                    yield buf[pos:]
                return


def _first_non_utf8_row(path: str, reader: ReaderSpec, column: int) -> int | None:
    """The data row (0-based, header not counted) of the first record whose field `column` (the file's column
    index, as Arrow names it) is not UTF-8 text, or None. Other columns may hold any bytes: they are not read."""
    delimiter = _delimiter(path, reader)
    records = _csv_records(path, delimiter)
    if reader.header:
        next(records, None)
    for row, record in enumerate(records):
        try:
            record.decode("utf-8")
            continue  # the whole record is UTF-8 (the common case): no field to split
        except UnicodeDecodeError:
            pass
        # latin-1 maps every byte to one character: the fields split there and encode back to their bytes
        fields = _split_fields(record.decode("latin-1"), delimiter)
        if column < len(fields):
            try:
                fields[column].encode("latin-1").decode("utf-8")
            except UnicodeDecodeError:
                return row
    return None


def _strip(a: pa.Array, nulls: pa.Array) -> pa.Array:
    """A string column trimmed; a value that is a null value once trimmed (" ?") is null, as "?" is."""
    if not pa.types.is_string(a.type):
        return a
    a = pc.utf8_trim_whitespace(a)
    if len(nulls):
        is_null = pc.is_in(a, value_set=nulls)
        if pc.any(is_null).as_py():
            a = if_else(is_null, pa.scalar(None, pa.string()), a)
    return a


def _field_count(record: bytes, delimiter: str) -> int:
    if b'"' not in record:  # the common case: no quoted field, every delimiter splits
        return record.count(delimiter.encode("latin-1")) + 1
    return len(_split_fields(record.decode("latin-1"), delimiter))


def _bad_csv_row(path: str, reader: ReaderSpec) -> tuple[int, str] | None:
    """(data row, message) of the first record with another number of fields than the file's first record (or
    reader.column_names, without a header), as Arrow counts them; None if there is none. Only on the error path:
    read in Python (Arrow numbers the rows it rejects only through a Python callback from its own threads, which
    could abort the process at exit)."""
    delimiter = _delimiter(path, reader)
    records = _csv_records(path, delimiter)
    expected = len(reader.column_names) if reader.column_names else None
    if reader.header:
        first = next(records, None)
        if first is None:
            return None
        if not reader.column_names:
            expected = _field_count(first, delimiter)
    for row, record in enumerate(records):
        found = _field_count(record, delimiter)
        if expected is None:  # neither header nor names: the first row sets the count
            expected = found
        elif found != expected:
            text = record.decode("utf-8", errors="replace")
            text = text if len(text) <= 80 else text[:77] + "..."
            return row, f"malformed CSV row: expected {expected} fields, found {found} ({text!r})"
    return None


def _check_columns(path: str, have: list[str], needed: list[str]) -> None:
    missing = list(dict.fromkeys(c for c in needed if c not in set(have)))
    if missing:
        raise missing_columns_error(missing, have, path, holder="the file")
    twice = [c for c in dict.fromkeys(needed) if have.count(c) > 1]
    if twice:  # Arrow would silently take the first of them
        raise FeatureDataError(f"the file names this column twice (its columns are {have}): which one is meant is "
                               "unclear", file=path, column=twice[0])

