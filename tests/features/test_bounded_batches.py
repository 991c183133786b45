"""Bounded memory at scale, checked without measuring RSS: every stage sees at most `batch_rows` rows at a
time, also from a Parquet file that is one large row group (pandas / pyarrow write up to 1,048,576 rows in one),
and the rows come out each once, in order; a large row group is read a buffer at a time (Arrow's allocations)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmoe_rec.features import build
from mmoe_rec.features.build import main as features_main
from mmoe_rec.features.fit import SpecFitter
from mmoe_rec.features.sources import iter_batches
from mmoe_rec.features.transform import CompiledSpec

ROWS, BATCH = 4_000, 500


def _one_row_group(path, n=ROWS, dictionary_pagesize_limit=None):
    """n rows in ONE row group; `key` is a distinct string per row (a high-cardinality hashed id)."""
    t = pa.table({"rid": pa.array(np.arange(n)), "key": pa.array([f"k{i:07d}" for i in range(n)]),
                  "dev": pa.array(np.array(["ios", "android", "web"])[np.arange(n) % 3]),
                  "x": pa.array(np.arange(n, dtype=float)), "y": pa.array(np.arange(n) % 2)})
    kw = {} if dictionary_pagesize_limit is None else {"dictionary_pagesize_limit": dictionary_pagesize_limit}
    pq.write_table(t, path, row_group_size=n, **kw)
    assert pq.ParquetFile(path).metadata.num_row_groups == 1
    return path


def test_a_one_row_group_file_is_streamed_in_batches_of_at_most_batch_rows(tmp_path):
    path = _one_row_group(tmp_path / "one.parquet")
    got = list(iter_batches(str(path), ["rid", "key"], batch_rows=BATCH))
    assert [b.num_rows for _, b in got] == [BATCH] * (ROWS // BATCH)
    assert [o for o, _ in got] == list(range(0, ROWS, BATCH))
    assert np.concatenate([b.column("rid").to_numpy() for _, b in got]).tolist() == list(range(ROWS))


def test_dictionary_read_batches_hold_no_more_distinct_values_than_rows(tmp_path):
    """FAILS before sources._parquet_batches: Arrow's reader, asked for dictionary columns (the transform pass's
    read_dictionary), hands every batch of a row group the row group's dictionary (so far), so the batch of 500 rows
    carries up to 4,000 values, and CompiledSpec._dictionary_ids hashes / looks up all of them per batch: quadratic
    time and memory linear in the row group's distinct values (a 4M-row one-row-group file: 1.3 GB and 42 s,
    against 0.36 GB and 5 s read without dictionaries). A column whose dictionary outgrows a batch is now decoded."""
    for limit in (None, 1024):  # the dictionary page kept whole, and fallen back to plain pages part-way
        path = _one_row_group(tmp_path / f"one-{limit}.parquet", dictionary_pagesize_limit=limit)
        for _, b in iter_batches(str(path), ["key"], batch_rows=BATCH, dictionary=["key"]):
            col = b.column("key")
            held = len(col.dictionary) if pa.types.is_dictionary(col.type) else b.num_rows
            assert held <= b.num_rows, f"page limit {limit}: a batch of {b.num_rows} rows holds {held} values"


def _decoded(batches: list[pa.RecordBatch]) -> pa.Table:
    return pa.Table.from_batches([pa.RecordBatch.from_arrays(
        [a.dictionary_decode() if pa.types.is_dictionary(a.type) else a for a in b.columns], names=b.schema.names)
        for b in batches])


def test_a_low_cardinality_column_keeps_its_dictionary_in_a_row_group_larger_than_a_batch(tmp_path):
    """FAILS before sources._parquet_batches decided per column (a file whose row groups exceeded a batch was read
    all decoded): `dev` (3 values, the usual categorical column) stays dictionary-encoded, so _dictionary_ids
    computes 3 ids per batch (a pandas default file of 1M-row row groups: `features` took 1.9x as long decoded), while
    `key` (a distinct string per row) arrives decoded from the first batch."""
    path = _one_row_group(tmp_path / "one.parquet")
    got = [b for _, b in iter_batches(str(path), ["rid", "key", "dev"], batch_rows=BATCH, dictionary=["key", "dev"])]
    assert all(b.column("dev").type == pa.dictionary(pa.int32(), pa.string()) and len(b.column("dev").dictionary) == 3
               for b in got)
    assert all(b.column("key").type == pa.string() for b in got)
    assert _decoded(got).equals(pq.read_table(path, columns=["rid", "key", "dev"]))


def test_a_dictionary_that_outgrows_the_batch_part_way_is_decoded_from_there_every_row_once(tmp_path):
    """A writer that fell back to plain pages part-way: the dictionary grows batch by batch; from the batch where it
    holds more than a batch's rows the column is decoded, read again from the next row (not from the row group's
    start, nor skipping any), the other dictionary column still encoded."""
    path = _one_row_group(tmp_path / "one.parquet", dictionary_pagesize_limit=1024)
    got = list(iter_batches(str(path), ["rid", "key", "dev"], batch_rows=1500, dictionary=["key", "dev"]))
    types = [pa.types.is_dictionary(b.column("key").type) for _, b in got]
    assert types[0] and not types[-1], types  # encoded at first (1,024 values in the page), decoded once it outgrew
    assert all(len(b.column("key").dictionary) <= 1500 for _, b in got if pa.types.is_dictionary(b.column("key").type))
    assert all(pa.types.is_dictionary(b.column("dev").type) for _, b in got)
    assert [o for o, _ in got] == list(np.cumsum([0] + [b.num_rows for _, b in got])[:-1])
    assert _decoded([b for _, b in got]).equals(pq.read_table(path, columns=["rid", "key", "dev"]))


def test_features_fit_and_transform_see_at_most_batch_rows_at_a_time(tmp_path, monkeypatch):
    (tmp_path / "raw").mkdir()
    path = _one_row_group(tmp_path / "raw" / "one.parquet")
    schema = tmp_path / "s.yaml"
    schema.write_text("id_columns: [rid]\ncategorical: [{name: key, transform: hash, buckets: 1000}, {name: dev}]\n"
                      "numeric: [{name: x}]\ntasks: [{name: y}]\n")
    fit_sizes, transform_sizes = [], []
    update, transform = SpecFitter.update, CompiledSpec.transform
    monkeypatch.setattr(SpecFitter, "update",
                        lambda self, t, *a, **k: (fit_sizes.append(t.num_rows), update(self, t, *a, **k))[1])
    monkeypatch.setattr(CompiledSpec, "transform",
                        lambda self, t, *a, **k: (transform_sizes.append(t.num_rows), transform(self, t, *a, **k))[1])
    out = tmp_path / "out"
    assert features_main(["--schema", str(schema), "--input", str(path), "--output", str(out), "--valid-fraction",
                          "0.2", "--batch-rows", str(BATCH), "--row-group-rows", str(BATCH)]) == 0
    assert max(fit_sizes) <= BATCH and max(transform_sizes) == BATCH and sum(transform_sizes) == ROWS
    ids = {s: pq.read_table(out / s)["rid"].to_numpy() for s in build.SPLITS}
    for s, v in ids.items():
        assert (np.diff(v) > 0).all(), s  # each split in input order, no row twice
        for f in (out / s).glob("*.parquet"):
            assert all(pq.ParquetFile(f).metadata.row_group(i).num_rows <= BATCH
                       for i in range(pq.ParquetFile(f).metadata.num_row_groups))
    assert sorted(np.concatenate(list(ids.values())).tolist()) == list(range(ROWS))


def test_a_large_row_group_is_read_a_buffer_at_a_time_not_a_column_chunk_at_once(tmp_path):
    """FAILS before the ParquetFile buffer_size: Arrow held the whole compressed column chunk of the row group
    (here 16 MiB of random doubles; a 1M-row row group of a wide table: hundreds of MB) while its batches were read
    (17 MiB held before, 3 MiB with a 1 MiB buffer)."""
    path = tmp_path / "wide.parquet"
    pq.write_table(pa.table({"x": np.random.default_rng(0).random(1 << 21)}), path, row_group_size=1 << 21,
                   compression="none")
    base = pa.total_allocated_bytes()
    peak = max(pa.total_allocated_bytes() - base for _ in iter_batches(str(path), ["x"], batch_rows=BATCH))
    assert peak < 6 << 20, f"{peak >> 20} MiB held to read {BATCH}-row batches"


def test_dictionary_read_where_row_groups_fit_and_decoded_where_not_give_the_same_build(tmp_path, monkeypatch):
    """The dictionary fast path (ids of each distinct value once per batch) is kept for columns whose dictionaries
    fit in a batch, and a build from the decoded columns writes the same spec and tables."""
    (tmp_path / "raw").mkdir()
    path = _one_row_group(tmp_path / "raw" / "one.parquet")
    t = pq.read_table(path)
    tags = pa.array(["|".join(f"t{j}" for j in range(i % 4)) if i % 7 else None for i in range(ROWS)])
    pq.write_table(t.append_column("tags", tags), path, row_group_size=ROWS)
    schema = tmp_path / "s.yaml"
    schema.write_text("id_columns: [rid]\ncategorical: [{name: key, transform: hash, buckets: 1000}, {name: dev},\n"
                      "  {name: tags, multi_valued: true, delimiter: '|'}]\nnumeric: [{name: x}]\ntasks: [{name: y}]\n")
    fast = []
    dictionary_ids = CompiledSpec._dictionary_ids
    monkeypatch.setattr(CompiledSpec, "_dictionary_ids",
                        lambda self, name, *a: (fast.append(name), dictionary_ids(self, name, *a))[1])
    outs = {}
    for batch in (ROWS, BATCH):  # one batch holds the row group: dictionaries; smaller: `key` (4,000 values) decoded
        fast.clear()
        outs[batch] = out = tmp_path / f"out-{batch}"
        assert features_main(["--schema", str(schema), "--input", str(path), "--output", str(out), "--valid-fraction",
                              "0.2", "--test-fraction", "0.1", "--batch-rows", str(batch)]) == 0
        assert set(fast) == ({"key", "dev", "tags"} if batch == ROWS else {"dev", "tags"})
    assert (outs[ROWS] / "spec.json").read_text() == (outs[BATCH] / "spec.json").read_text()
    for s in build.SPLITS:
        a, b = pq.read_table(outs[ROWS] / s), pq.read_table(outs[BATCH] / s)
        assert a.num_rows and a.equals(b), s
