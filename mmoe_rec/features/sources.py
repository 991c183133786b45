"""Raw inputs: resolve files / directories / globs, and stream them as record batches in bounded memory.

CSV (optionally .gz / .bz2 / .xz compressed; .tsv tab-separated) is read with pyarrow's streaming reader, every
needed column as a string (the feature code converts and checks types itself, so an error can name the row; a
row with the wrong number of fields is named too). Parquet is read row group by row group with
``ParquetFile.iter_batches``, a column chunk 1 MiB at a time. Each batch comes with its first row's index in the
file, so errors can name the file row. With ``reader.strip_whitespace`` CSV fields are trimmed, and a field
that is one of ``reader.null_values`` once trimmed (" ?") is null. A needed column named twice in a file, or a
CSV header that differs from the schema's ``reader.column_names``, is an error naming the file.
"""
from __future__ import annotations

import bisect
import contextlib
import csv
import dataclasses
import functools
import glob
import io
import itertools
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
from mmoe_rec.features.errors import FeatureDataError, check_columns
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
    passed over would lose its rows unseen. A leading '~' is the home folder (a quoted argument, a YAML value)."""
    spec = os.path.expanduser(spec)
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
# Parquet column chunks are read this much at a time: unbuffered, Arrow loads a row group's chunks whole
# (pandas / pyarrow write up to 1,048,576 rows in one row group: tens of MB per column)
PARQUET_BUFFER_BYTES = 1 << 20


@contextlib.contextmanager
def _arrow_csv_source(path: str, delimiter: str) -> Iterator[tuple[pa.NativeFile, "_QuoteTracker | None"]]:
    """(a stream of the file that Arrow reads with its own reader, no Python in its threads; the file's quotes
    tracked (_QuoteTracker), or None where not tracked on the way). An .xz file (Arrow has no xz codec) is
    decompressed into a temporary file first, tracked as it is written, and deleted after: read through Python's
    lzma, Arrow's read-ahead thread could still be inside Python's read when the interpreter shut down, which
    aborted the process, even after a complete read."""
    if not path.lower().endswith(".xz"):
        with _open_csv_stream(path) as stream:
            yield stream, None
        return
    with tempfile.NamedTemporaryFile(prefix="mmoe-rec-", suffix=".csv") as plain:
        tracker = _QuoteTracker(delimiter)
        with lzma.open(path, "rb") as f:
            while block := f.read(1 << 24):
                tracker.feed(block)
                plain.write(block)
        plain.flush()
        with pa.input_stream(plain.name) as stream:
            yield stream, tracker


def _csv_reader(path: str, reader: ReaderSpec, include: list[str] | None, stream: pa.NativeFile,
                nulls_by_arrow: bool = True):
    """A quoted field may hold line breaks (RFC 4180): Arrow is told so, or it cuts its blocks at the last line end
    and refuses a file whose block ends fall inside such a field ("CSV parser got out of sync with chunker").
    nulls_by_arrow=False: no field is read as null (the caller matches reader.null_values column by column)."""
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
        strings_can_be_null=nulls_by_arrow,
        null_values=list(reader.null_values),
    )
    return pacsv.open_csv(stream, read_options=read, parse_options=parse, convert_options=convert)


_UTF8_BOM = b"\xef\xbb\xbf"


def _record_end(body: bytes | bytearray, specials: re.Pattern, start: int,
                resume: tuple[int, bool, bool] | None = None) -> tuple[int, tuple[int, bool, bool] | None]:
    """(index of the line end that closes the CSV record starting at `start` in `body`, None), or (-1, where the
    scan stopped) if it is not in `body` yet: pass that back as `resume` once `body` holds more (from the same
    record start), and nothing is scanned twice. A line end inside a quoted field ('"' at a field's start, '""' a
    quote inside it) does not close the record; a quote elsewhere in a field is a plain character, as in Arrow's
    reader and Python's csv module. `specials` matches the delimiter and the line-end bytes."""
    offset, quoted, field_start = resume or (0, False, True)
    i, n = start + offset, len(body)
    while i < n:
        if quoted:
            j = body.find(b'"', i)
            if j < 0 or j + 1 >= n:  # no close yet, or cannot tell '""' from a close yet
                i = n if j < 0 else j
                break
            if body[j + 1] == 0x22:
                i = j + 2
            else:
                quoted, field_start, i = False, False, j + 1
            continue
        if field_start and body[i] == 0x22:
            quoted, field_start, i = True, False, i + 1
            continue
        m = specials.search(body, i)
        if m is None:
            i, field_start = n, False
            break
        k = m.start()
        if body[k] in (0x0A, 0x0D):
            return k, None
        i, field_start = k + 1, True
    return -1, (i - start, quoted, field_start)


def _first_record(path: str, delimiter: str, header: bool = True) -> bytes | None:
    """The file's first CSV record (the first non-empty line, and the lines a quoted field spans), without its
    line end; None if the file has none. Read in Python, never with Arrow's streaming CSV reader: that one starts
    a read-ahead thread over the (lzma) Python file object, which could still be running at interpreter exit,
    right after an error message about this header, and abort the process ("terminate called without an active
    exception", exit 134)."""
    return next(_csv_records(path, delimiter, block_bytes=1 << 16, header=header), None)


def _split_fields(text: str, delimiter: str) -> list[str]:
    """One CSV record's fields ('"' quotes, a doubled quote inside), as Arrow's reader splits them."""
    if len(text) >= csv.field_size_limit():  # 128 KiB by default: a longer field raised csv.Error
        csv.field_size_limit(len(text) + 1)
    return next(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quotechar='"', doublequote=True,
                           strict=False), [])


def _header_names(path: str, reader: ReaderSpec) -> list[str]:
    """The column names Arrow's CSV reader gives the file (as _csv_reader opens it without column_names): the
    first record's fields ('"' quotes, doubled quote inside), or f0, f1, ... for as many fields without a header."""
    delimiter = _delimiter(path, reader)
    if len(delimiter) != 1:
        raise FeatureDataError(f"reader.delimiter must be one character, got {delimiter!r}", file=path)
    line = _first_record(path, delimiter, reader.header)
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


def _open_parquet(path: str, **kwargs) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path, buffer_size=PARQUET_BUFFER_BYTES, **kwargs)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        raise FeatureDataError(f"unreadable Parquet file ({e})", file=path) from None


@dataclasses.dataclass(frozen=True)
class FileHeader:
    """What one input file says about itself without a row read: its columns, its Arrow schema metadata, its
    number of rows (the footer's), and the Arrow type each column arrives with from iter_batches. A CSV file has
    no metadata, no footer to count its rows (None for both) and text in every column."""
    names: list[str]
    metadata: dict[bytes, bytes] | None
    schema: pa.Schema | None  # None for a CSV file
    num_rows: int | None

    def types(self, columns: list[str]) -> dict[str, pa.DataType]:
        """Arrow type of each of `columns` the file has (a missing one is left out: iter_batches reports it)."""
        return _arrow_types(self.schema, columns)


def _arrow_types(schema: pa.Schema | None, columns: list[str]) -> dict[str, pa.DataType]:
    """`columns`' types in a Parquet file's schema, or, for a CSV file (None), text for every one."""
    return {c: pa.string() for c in columns} if schema is None else schema_types(schema, columns)


def file_header(path: str, reader: ReaderSpec) -> FileHeader:
    """One input file's FileHeader, from one read of its footer (Parquet) or its header line (CSV)."""
    if input_format(path) == "csv":
        return FileHeader(csv_columns(path, reader), None, None, None)
    parquet = _open_parquet(path)
    schema = parquet.schema_arrow
    return FileHeader(schema.names, schema.metadata, schema, parquet.metadata.num_rows)


def _parquet_batches(path: str, pf: pq.ParquetFile, columns: list[str], batch_rows: int,
                     as_dict: list[str]) -> Iterator[pa.RecordBatch]:
    """The file's batches in order, the `as_dict` columns dictionary-encoded while their dictionaries hold at most
    `batch_rows` values. Arrow gives each batch of a row group the row group's dictionary so far (all of the
    dictionary page, then what plain pages after a writer's fallback added), not the batch's own values: a column of
    a distinct string per row in one large row group gave every batch that many values, which
    CompiledSpec._dictionary_ids hashed per batch (a 4M-row one-row-group file: 42 s and 1.3 GB, against 5 s and
    0.36 GB decoded). The batch whose dictionary outgrows `batch_rows` is decoded, and the file is read again from
    the next row, that column decoded: Arrow's dictionary reader is dropped before it holds more (a low-cardinality
    column, the usual categorical one, keeps its dictionary however large the row group)."""
    meta = pf.metadata
    starts = list(itertools.accumulate((meta.row_group(i).num_rows for i in range(meta.num_row_groups)), initial=0))
    at = 0  # rows yielded
    while at < meta.num_rows:
        reader = _open_parquet(path, read_dictionary=as_dict, metadata=meta) if as_dict else pf
        first = bisect.bisect_right(starts, at) - 1  # the row group holding row `at`
        skip = at - starts[first]  # its rows already yielded
        large: list[str] = []
        for b in reader.iter_batches(batch_size=batch_rows, columns=columns,
                                     row_groups=range(first, meta.num_row_groups)):
            if skip:
                b, skip = b.slice(min(skip, b.num_rows)), max(skip - b.num_rows, 0)
                if not b.num_rows:
                    continue
            large = [c for c in as_dict if len(b.column(c).dictionary) > batch_rows]
            if large:
                b = pa.RecordBatch.from_arrays([a.dictionary_decode() if name in large else a
                                                for name, a in zip(b.schema.names, b.columns)], names=b.schema.names)
            yield b
            at += b.num_rows
            if large:
                as_dict = [c for c in as_dict if c not in large]
                break
        else:
            return


def iter_batches(path: str, columns: list[str], reader: ReaderSpec | None = None,
                 batch_rows: int = 65_536, dictionary: Iterable[str] = (),
                 as_written: Iterable[str] = (), quote_scans: dict | None = None
                 ) -> Iterator[tuple[int, pa.RecordBatch]]:
    """Yield (first row in file, batch of `columns`) for one input file. Missing columns, unreadable or
    truncated files and empty files raise FeatureDataError naming the file (and column).

    Parquet string columns named in `dictionary` arrive dictionary-encoded (as stored: no strings decoded) while
    their dictionaries hold at most `batch_rows` values, then decoded, like the other columns (_parquet_batches). CSV
    columns named in `as_written` (id columns) are read as written: not trimmed, no field a null value (an id
    " 42 " or "NA" came out "42" and null, which joins no row back, from a CSV but not from a Parquet file).
    `quote_scans`: a dict the caller keeps over its reads of the same files (a build's two passes): a CSV file's
    quote scan is made once."""
    reader = reader or ReaderSpec()
    fmt = input_format(path)
    have: list[str] = []
    csv_batches = None
    scan: _QuoteScan | None = None
    verbatim: set[str] = set()
    sources = contextlib.ExitStack()
    try:
        if fmt == "parquet":
            pf = _open_parquet(path)
            have = pf.schema_arrow.names
            check_columns(have, columns, path, holder="the file")
            as_dict = [c for c in dict.fromkeys(dictionary)
                       if c in columns and pf.schema_arrow.field(c).type == pa.string()]
            batches = _parquet_batches(path, pf, list(dict.fromkeys(columns)), batch_rows, as_dict)
            strip = False
        else:
            have = csv_columns(path, reader)
            check_columns(have, columns, path, holder="the file")
            # quotes not tracked on the way (all but .xz) are tracked in a second pass, in a thread beside the
            # read: cheap for plain files; a .gz / .bz2 file is decompressed again, on the other core
            delimiter = _delimiter(path, reader)
            stream, tracker = sources.enter_context(_arrow_csv_source(path, delimiter))
            if tracker is None:  # beside the read (see _QuoteScan)
                scan = _QuoteScan(path, delimiter, quote_scans)
                sources.callback(scan.close)
            verbatim = set(as_written) & set(columns)
            batches = csv_batches = _csv_reader(path, reader, list(dict.fromkeys(columns)), stream,
                                                nulls_by_arrow=not verbatim)
            strip = reader.strip_whitespace
            nulls = pa.array(list(reader.null_values), pa.string())
        row = 0
        for b in batches:
            if verbatim:  # Arrow read no field as null: the other columns' null values matched here, as it would
                b = pa.RecordBatch.from_arrays([a if name in verbatim else _strip(a, nulls, trim=strip, as_written=True)
                                                for name, a in zip(b.schema.names, b.columns)], names=b.schema.names)
            elif strip:
                b = pa.RecordBatch.from_arrays([_strip(a, nulls) for a in b.columns], names=b.schema.names)
            for start in range(0, b.num_rows, batch_rows):
                part = b.slice(start, batch_rows) if b.num_rows > batch_rows else b
                yield row + start, part
            row += b.num_rows
        if fmt == "csv":
            tracker = scan.result() if tracker is None else tracker
            if tracker.unclosed():  # the last row read holds the rest of the file
                raise _unclosed_quote_error(path, row - 1 if row else None, tracker.open_lines())
            if tracker.lost_newline is not None:
                raise _lost_newline_error(path, reader, tracker.lost_newline)
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
            raise FeatureDataError(f"a CSV record longer than {CSV_BLOCK_BYTES >> 20} MiB (Arrow's read block) "
                                   f"({msg.splitlines()[0]})", file=path) from None
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


@functools.cache
def arrow_drops_quoted_newline() -> bool:
    """Whether this pyarrow's CSV reader loses the '\\n' of a CRLF inside a quoted field when the '\\r' is the last
    byte of one of its read blocks (apache/arrow#51368, open in pyarrow 22: a '\\n' after a block that ends on '\\r'
    is skipped as the rest of a line end, quoted or not). A 64-byte probe, once a process."""
    head = b"a,b\n"
    block = 64
    data = head + b'"' + b"x" * (block - len(head) - 2) + b'\r\nz",1\n'  # its '\r' is the block's last byte
    table = pacsv.read_csv(io.BytesIO(data), read_options=pacsv.ReadOptions(block_size=block, use_threads=False),
                           parse_options=pacsv.ParseOptions(newlines_in_values=True),
                           convert_options=pacsv.ConvertOptions(column_types={"a": pa.string()}))
    return not table.column("a")[0].as_py().endswith("\r\nz")


def _lost_newline_error(path: str, reader: ReaderSpec, offset: int) -> FeatureDataError:
    """The error for a file where Arrow's reader would change a quoted value (arrow_drops_quoted_newline), naming
    the row that holds it: the file is read again up to there (error path), its records counted."""
    tracker = _QuoteTracker(_delimiter(path, reader), count_records=True)
    with _open_csv_stream(path) as f:
        while tracker._offset <= offset and (block := f.read(min(1 << 24, offset + 1 - tracker._offset))):
            tracker.feed(bytes(block))
    row = tracker.open_record - (1 if reader.header else 0)
    return FeatureDataError(f"a quoted field holds a CRLF line break whose '\\r' ends one of the CSV reader's "
                            f"{CSV_BLOCK_BYTES >> 20} MiB read blocks (byte {offset:,} of the file): pyarrow "
                            f"{pa.__version__} drops the '\\n' there (apache/arrow#51368) and would read the value "
                            "changed; save the file with LF line breaks inside quoted fields, or as Parquet",
                            file=path, row=row if row >= 0 else None)


class _QuoteTracker:
    """Whether CSV bytes, fed block by block, end inside a quoted field, read as Arrow's reader reads them: a '"'
    at a field's start opens one, '""' inside it is a quote, a lone '"' closes it; a '"' elsewhere is a plain
    character (`12"`). Arrow reads an open field to the end of the file as one value, the rows after it inside it,
    without an error. Exact, where a count of '"' was not: one plain quote beside an unclosed one made it even.
    Each byte is looked at once, by C code (bytes.find), but for one step of Python per '"'. With `count_records`,
    also the number of records (non-empty lines outside quoted fields, the header included) before the last
    opening quote: for the error path."""

    def __init__(self, delimiter: str, count_records: bool = False) -> None:
        self._starts = {ord(delimiter), 0x0A, 0x0D}  # a '"' after one of these opens a quoted field
        starts = b"[" + re.escape(delimiter.encode("latin-1")) + rb"\r\n]"
        # a quoted field that closes in the block (the byte after its close in it too: '""' is not cut in two)
        closed = rb'(?<=' + starts + rb')"[^"]*+(?:""[^"]*+)*+"(?=[^"])'
        self._closed = re.compile(closed)
        # from a position outside quoted fields, in C: plain bytes, quoted fields that close, plain quotes (not at a
        # field's start); it stops at a '"' that opens a field not closed in the block (or closed on its last byte)
        self._run = re.compile(rb'[^"]*+(?:(?:' + closed + rb'|(?<!' + starts + rb')")[^"]*+)*+')
        self._before = 0x0A  # the byte before the next block's first (the file's start is a line start)
        self._quoted = False
        self._pending = False  # a block ended on '"' inside a quoted field: '""' or a close, told by the next byte
        self._first, self._head = True, b""
        self.lines = 0  # line breaks since the last opening quote
        self._count = count_records
        self.records = 0  # records ended before the current position (with count_records)
        self.open_record = 0  # the record the last opening quote is in
        self._offset = 0  # bytes fed so far
        self._check_block_ends = arrow_drops_quoted_newline()
        self._quoted_cr: int | None = None  # offset of a quoted '\r' ending the last block at a read block's end
        self.lost_newline: int | None = None  # see feed()

    def feed(self, block: bytes) -> None:
        """The next bytes of the file. Where Arrow's reader loses a quoted CRLF's '\\n' at the end of one of its
        read blocks (arrow_drops_quoted_newline), the first such place is kept in `lost_newline` (a file offset)."""
        start = self._offset
        self._offset += len(block)
        if self._quoted_cr is not None and block:  # the last block ended on a quoted '\r' at a read block's end
            if block[0] == 0x0A and self.lost_newline is None:
                self.lost_newline = self._quoted_cr
            self._quoted_cr = None
        if not self._check_block_ends or self.lost_newline is not None:
            self._feed(block)
            return
        cut = 0
        # Arrow's read blocks end at bytes B-1, 2B-1, ... of the (decompressed) file: check a '\r' there (rare)
        for p in range((start // CSV_BLOCK_BYTES + 1) * CSV_BLOCK_BYTES - 1, self._offset, CSV_BLOCK_BYTES):
            if block[p - start] != 0x0D:
                continue
            self._feed(block[cut:p - start + 1])  # up to that '\r': is it inside a quoted field?
            cut = p - start + 1
            if self._quoted:  # (not a pending '"': this piece ends on '\r')
                if cut == len(block):
                    self._quoted_cr = p
                elif block[cut] == 0x0A:
                    self.lost_newline = p
                    break
        self._feed(block[cut:] if cut else block)

    def _feed(self, block: bytes) -> None:
        i, bom = 0, False
        if self._first:  # Arrow skips a UTF-8 BOM: told once 3 bytes are in (or the bytes end)
            block = self._head + block
            if len(block) < len(_UTF8_BOM) and _UTF8_BOM.startswith(block):
                self._head = block
                return
            self._first, self._head = False, b""
            if block.startswith(_UTF8_BOM):
                i, bom = len(_UTF8_BOM), True
        buf, n = block, len(block)
        low = i  # buf[j - 1] is the byte before j only from here on
        if self._pending and n:
            self._pending = False
            if buf[0] == 0x22:  # '""': a quote inside the field
                i = low = 1
            else:
                self._quoted = False
                self._before = 0x22
        while i < n:
            if self._quoted:
                j = buf.find(b'"', i)
                end = n if j < 0 else j
                self.lines += buf.count(b"\n", i, end) or buf.count(b"\r", i, end)
                if j < 0 or j + 1 == n:
                    self._pending = j >= 0
                    i = n
                    break
                if buf[j + 1] == 0x22:
                    i = j + 2
                else:
                    self._quoted = False
                    i = j + 1
                continue
            before = buf[i - 1] if i > low else self._before
            if i == low and buf[i] == 0x22 and before in self._starts:
                j = i  # opens a field; the byte before it is the last block's, which the regex cannot see
            else:
                j = self._run.match(buf, i).end()
                if self._count and j > i:  # the closed fields' line breaks end no record
                    self.records += _record_ends(self._closed.sub(b"_", bytes([before]) + buf[i:j])[1:], before)
                if j >= n:
                    break
            self._quoted, self.lines, self.open_record = True, 0, self.records
            i = j + 1
        if n > (len(_UTF8_BOM) if bom else 0):  # a BOM is no byte before the next
            self._before = buf[-1]

    def unclosed(self) -> bool:
        """At the end of the bytes: whether a quoted field is still open (a last lone '"' closed it)."""
        if self._head:  # the file is 1-2 bytes, the start of a BOM: not one
            head, self._head, self._first = self._head, b"", False
            self.feed(head)
        return self._quoted and not self._pending

    def open_lines(self) -> int:
        """The lines the open field spans (an unclosed() one): its line breaks, and the last line if it has no
        line end."""
        return self.lines + (self._before not in (0x0A, 0x0D))


_LINE_BREAK_RUNS = re.compile(rb"[\r\n]+")


def _record_ends(segment: bytes, before: int) -> int:
    """Records that end in `segment` (bytes outside quoted fields; `before` the byte before it): each run of line
    breaks ends one, but a run that goes on from before it (or that starts the file: empty lines)."""
    _, runs = _LINE_BREAK_RUNS.subn(b"", segment)
    if runs and segment[0] in (0x0A, 0x0D) and before in (0x0A, 0x0D):
        runs -= 1
    return runs


def file_identity(path: str, ctime: bool = True) -> tuple[int, ...] | None:
    """What tells that a file still holds the bytes it held, without reading them: device, inode, size, modification
    and status-change times (the ctime: no tool sets it back). None where the file cannot be stat'ed. Without
    `ctime` (a long job's files, which a chmod, a hard-link backup or an atime change must not stop: they change the
    ctime alone) another file put under the name still differs, by its inode, size or mtime."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) + ((st.st_ctime_ns,) if ctime else ())


class _QuoteScan:
    """A _QuoteTracker fed the file in a thread of its own, beside Arrow's read of the same file (decompression
    releases the GIL: a .gz / .bz2 file's second decompression overlaps the read instead of following it), or the
    scan of the same unchanged file made before and kept in `scans` (one build's: it reads each file twice).
    `result()` waits for it; `close()` stops and joins it, so that no thread of ours still reads when the caller has
    gone (or the interpreter exits)."""

    def __init__(self, path: str, delimiter: str, scans: dict | None = None) -> None:
        self._stop = threading.Event()
        self._tracker = _QuoteTracker(delimiter)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._scans = scans
        self._key: tuple | None = None
        if scans is not None:
            identity = file_identity(path)  # the same file, unchanged, the same delimiter
            if identity is not None:
                self._key = (os.path.realpath(path), *identity, delimiter)
            if self._key in scans:
                self._tracker = scans[self._key]
                return
        self._thread = threading.Thread(target=self._run, args=(path,), name="mmoe-rec-quote-scan", daemon=True)
        self._thread.start()

    def _run(self, path: str) -> None:
        try:
            _feed_file(self._tracker, path, self._stop)
        except BaseException as e:  # noqa: BLE001 - handed to the caller by result()
            self._error = e

    def result(self) -> _QuoteTracker:
        if self._thread is not None:
            self._thread.join()
            if self._error is not None:
                raise self._error
            self._tracker.unclosed()  # complete (a 1-2 byte file's head)
            if self._key is not None:
                self._scans[self._key] = self._tracker
        return self._tracker

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _feed_file(tracker: _QuoteTracker, path: str, stop: threading.Event | None = None) -> None:
    """The file's bytes (decompressed) into `tracker`, in blocks; stops early once `stop` is set."""
    with _open_csv_stream(path) as f:
        while block := f.read(1 << 24):
            if stop is not None and stop.is_set():
                return
            tracker.feed(bytes(block))


def _unclosed_quote_error(path: str, row: int | None, lines: int) -> FeatureDataError:
    where = "in this row" if row is not None else "in the header"
    return FeatureDataError(f"a quoted field opens {where} and never closes (an unmatched '\"'): the CSV reader "
                            f"reads the rest of the file, {lines} line{'' if lines == 1 else 's'}, as its value",
                            file=path, row=row)


def _refuse_unclosed_quote(path: str, reader: ReaderSpec) -> None:
    """Raise, naming its row, where a quoted field opens that never closes. Where Arrow failed on a record longer
    than its read block, which such a field makes: the file is read once more, in Python (linear, C-speed scans)."""
    tracker = _QuoteTracker(_delimiter(path, reader), count_records=True)
    _feed_file(tracker, path)
    if tracker.unclosed():
        header = 1 if reader.header else 0
        row = tracker.open_record - header
        raise _unclosed_quote_error(path, row if row >= 0 else None, tracker.open_lines())


def _csv_records(path: str, delimiter: str, block_bytes: int = 1 << 20, header: bool = False) -> Iterator[bytes]:
    """The file's CSV records as bytes, a UTF-8 BOM and empty lines skipped (as Arrow skips them), a quoted
    field's line ends kept inside its record; the header, if any, is the first. Read in Python: for the header and
    for error messages. A record longer than Arrow's reader takes (two read blocks) is an error: it is not held
    whole (an unclosed quote near the top would make it the whole file)."""
    specials = re.compile(b"[" + re.escape(delimiter.encode("latin-1")) + rb"\r\n]")
    with _open_csv_stream(path) as f:
        buf, pos, first, resume, index = bytearray(), 0, True, None, 0
        while True:
            block = f.read(block_bytes)
            del buf[:pos]  # the records before are yielded: only the current one's bytes stay
            pos = 0
            buf += block
            if first and (len(buf) >= len(_UTF8_BOM) or not block):
                first = False
                if buf.startswith(_UTF8_BOM):
                    pos = len(_UTF8_BOM)
            while pos < len(buf):
                if resume is None:
                    if buf[pos] in (0x0A, 0x0D):  # an empty line, or the \n of a \r\n
                        pos += 1
                        continue
                    newline = buf.find(b"\n", pos)
                    carriage = buf.find(b"\r", pos, newline if newline >= 0 else len(buf))
                    newline = carriage if carriage >= 0 else newline  # \r alone, or the \r of \r\n
                    if newline >= 0 and buf.find(b'"', pos, newline) < 0:
                        yield bytes(buf[pos:newline])  # no quote before the line end: the record is the line
                        index += 1
                        pos = newline + 1
                        continue
                end, resume = _record_end(buf, specials, pos, resume)
                if end < 0:
                    break
                yield bytes(buf[pos:end])
                index += 1
                pos = end + 1
            if not block:
                if pos < len(buf):
                    yield bytes(buf[pos:])
                return
            if len(buf) - pos > 2 * CSV_BLOCK_BYTES:  # Arrow reads a record over one block end, never two
                row = index - 1 if header else index
                raise FeatureDataError(f"{'this row' if row >= 0 else 'the header'} is longer than "
                                       f"{2 * CSV_BLOCK_BYTES:,} bytes, the most Arrow's CSV reader takes (a quoted "
                                       "field that does not close?)", file=path, row=row if row >= 0 else None)


def _first_non_utf8_row(path: str, reader: ReaderSpec, column: int) -> int | None:
    """The data row (0-based, header not counted) of the first record whose field `column` (the file's column
    index, as Arrow names it) is not UTF-8 text, or None. Other columns may hold any bytes: they are not read."""
    delimiter = _delimiter(path, reader)
    records = _csv_records(path, delimiter, header=reader.header)
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


def _strip(a: pa.Array, nulls: pa.Array, trim: bool = True, as_written: bool = False) -> pa.Array:
    """A string column trimmed (`trim`); a value that is a null value once trimmed (" ?") is null, as "?" is, and
    with `as_written` (Arrow matched no null value) one that is a null value as written."""
    if not pa.types.is_string(a.type):
        return a
    if as_written and len(nulls):
        is_null = pc.is_in(a, value_set=nulls)
        if pc.any(is_null).as_py():
            a = if_else(is_null, pa.scalar(None, pa.string()), a)
    if not trim:
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
    records = _csv_records(path, delimiter, header=reader.header)
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
