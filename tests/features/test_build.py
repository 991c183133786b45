"""build.py machinery: the prefetch thread never outlives a failed consumer, random splits keyed by the file (not
its position), output files of at most --rows-per-file rows, and clear errors for a bad --output."""
from __future__ import annotations

import json
import shutil
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmoe_rec.features.build import _splitmix64, input_keys, main as features_main, prefetch

SPLITS = ("train", "valid", "test")


def _finishes(fn, seconds: float = 30.0) -> bool:
    """Run fn in a daemon thread: a regression that hangs fails the test instead of hanging the suite."""
    th = threading.Thread(target=fn, daemon=True)
    th.start()
    th.join(seconds)
    return not th.is_alive()


def _failing_reader():
    yield from range(3)
    raise OSError("reader failed")


@pytest.mark.parametrize("items", [
    lambda: iter(range(3)),   # reader ends up blocked on the end marker
    lambda: iter(range(6)),   # ... on an item
    _failing_reader,          # ... on handing over its own error
], ids=["end-marker", "item", "reader-error"])
def test_prefetch_returns_when_the_consumer_fails_with_a_full_queue(items):
    caught = []

    def consume():
        try:
            for item in prefetch(items(), depth=2):
                time.sleep(0.3)  # a slow transform: the reader fills the queue meanwhile
                raise ValueError(f"bad item {item}")
        except ValueError as e:
            caught.append(str(e))

    assert _finishes(consume), "prefetch hung after the consumer failed"
    assert caught == ["bad item 0"]


def test_prefetch_yields_in_order_and_reraises_reader_errors():
    got = []
    with pytest.raises(OSError, match="reader failed"):
        for item in prefetch(_failing_reader()):
            got.append(item)
    assert got == [0, 1, 2]


def test_features_cli_reports_a_bad_value_instead_of_hanging(tmp_path, capsys):
    # 3 batches: the reader has queued batches 1 and 2 and waits to hand over the end marker when the fit pass
    # fails on batch 0 (the reviewer's 150,000-row case, smaller)
    raw = tmp_path / "raw.csv"
    raw.write_text("x,y\n" + "".join(f"{'oops' if i == 2999 else i},{i % 2}\n" for i in range(9000)))
    schema = tmp_path / "s.yaml"
    schema.write_text("numeric: [{name: x}]\ntasks: [{name: y}]\n")
    rc = []
    argv = ["--schema", str(schema), "--input", f"train={raw}", "--output", str(tmp_path / "out"),
            "--batch-rows", "3000"]
    assert _finishes(lambda: rc.append(features_main(argv))), "mmoe-rec features hung on a bad value"
    assert rc == [1] and f"file {raw}, column 'x', row 2999 (0-based): expected a number, found 'oops'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _raw(path, first: int, n: int = 1000):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"rid": pa.array(np.arange(first, first + n)), "x": pa.array(np.arange(n, dtype=float)),
                             "y": pa.array(np.arange(n) % 2)}), path)


def _splits(out) -> dict[str, set[int]]:
    return {s: set(pq.read_table(out / s)["rid"].to_pylist()) for s in SPLITS}


def _features(tmp_path, out, *inputs, extra=()):
    schema = tmp_path / "s.yaml"
    schema.write_text("id_columns: [rid]\nnumeric: [{name: x}]\ntasks: [{name: y}]\n")
    argv = ["--schema", str(schema), "--output", str(out)] + [a for i in inputs for a in ("--input", str(i))]
    assert features_main(argv + ["--seed", "3"] + list(extra)) == 0
    return _splits(out)


def test_a_build_without_overwrite_never_replaces_an_output_another_job_finished_meanwhile(tmp_path, capsys,
                                                                                          monkeypatch):
    """Two builds into one missing folder, neither with --overwrite: both passed the empty-output check at their
    start; the one that finished last moved the other's complete output aside and deleted it, and both said
    `wrote` (a review). The final rename now refuses a folder that is not empty: the other job's output stays."""
    import mmoe_rec.features.build as feature_build

    monkeypatch.delenv("MMOE_REC_TRACEBACK", raising=False)
    _raw(tmp_path / "raw/a.parquet", 0)
    theirs, out = tmp_path / "theirs", tmp_path / "out"
    _features(tmp_path, theirs, tmp_path / "raw", extra=["--valid-fraction", "0.3"])
    their_manifest = (theirs / "manifest.json").read_text()
    real = feature_build.replace_dir

    def other_job_finishes_first(*args, **kwargs):
        shutil.copytree(theirs, out)  # the other job's complete build, renamed in after this job's checks
        return real(*args, **kwargs)

    monkeypatch.setattr(feature_build, "replace_dir", other_job_finishes_first)
    rc = features_main(["--schema", str(tmp_path / "s.yaml"), "--input", str(tmp_path / "raw"), "--output", str(out)])
    assert rc == 1 and "another job wrote this output while this one ran" in capsys.readouterr().err
    assert (out / "manifest.json").read_text() == their_manifest  # the other job's output, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw", "s.yaml", "theirs"]  # no temporary left


def test_adding_an_input_file_leaves_the_split_of_existing_rows_unchanged(tmp_path):
    fractions = ["--valid-fraction", "0.2", "--test-fraction", "0.2"]
    _raw(tmp_path / "raw/b.parquet", 0)
    before = _features(tmp_path, tmp_path / "o1", tmp_path / "raw", extra=fractions)
    _raw(tmp_path / "raw/a.parquet", 10_000)  # sorts first: used to take file index 0 from b.parquet
    after = _features(tmp_path, tmp_path / "o2", tmp_path / "raw", extra=fractions)
    assert {s: after[s] & set(range(1000)) for s in SPLITS} == before
    assert all(len(before[s]) > 100 for s in SPLITS)
    # and when the tree moves
    shutil.move(tmp_path / "raw", tmp_path / "moved")
    assert _features(tmp_path, tmp_path / "o3", tmp_path / "moved", extra=fractions) == after


def test_an_input_naming_one_file_keeps_the_split_of_the_positional_rule(tmp_path):
    # the earlier rule hashed (seed, file's position among the input's files, row): a single file was position 0.
    # The census split (valid+test=test.csv.xz) and the published results rest on it.
    _raw(tmp_path / "raw/b.parquet", 0)
    got = _features(tmp_path, tmp_path / "o", tmp_path / "raw/b.parquet",
                    extra=["--valid-fraction", "0.2", "--test-fraction", "0.2"])
    seed, rows = 3, np.arange(1000, dtype=np.uint64)
    key = _splitmix64(np.uint64(seed) << np.uint64(32) ^ np.uint64(0)) ^ rows
    u = (_splitmix64(key) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    which = np.searchsorted(np.cumsum([0.6, 0.2, 0.2])[:-1], u, side="right")
    assert got == {s: set(np.nonzero(which == i)[0].tolist()) for i, s in enumerate(SPLITS)}


def test_prefixed_random_input_is_keyed_by_file_too(tmp_path):
    _raw(tmp_path / "raw/test.csv.parquet", 0)
    _raw(tmp_path / "raw/extra.parquet", 5000)
    one = _features(tmp_path, tmp_path / "o1", f"valid+test={tmp_path / 'raw/test.csv.parquet'}",
                    f"train={tmp_path / 'raw/extra.parquet'}")
    two = _features(tmp_path, tmp_path / "o2", f"train={tmp_path / 'raw/extra.parquet'}",
                    f"valid+test={tmp_path / 'raw/test.csv.parquet'}")
    assert one == two and len(one["valid"]) + len(one["test"]) == 1000 and abs(len(one["valid"]) - 500) < 80


def test_input_keys_are_paths_relative_to_the_input(tmp_path):
    for rel in ("day=1/part-0.parquet", "day=2/part-0.parquet"):
        _raw(tmp_path / "raw" / rel, 0, n=3)
    files = sorted(str(p) for p in (tmp_path / "raw").rglob("*.parquet"))
    assert input_keys(str(tmp_path / "raw/*/part-*.parquet"), files) == ("day=1/part-0.parquet",
                                                                         "day=2/part-0.parquet")
    assert input_keys(files[0], files[:1]) == ("",)  # an input naming one file: the file itself
    assert input_keys(str(tmp_path / "raw/day=1"), files[:1]) == ("part-0.parquet",)


def test_rows_per_file_is_never_exceeded(tmp_path):
    raw = tmp_path / "raw.csv"
    raw.write_text("x,y\n" + "".join(f"{i},{i % 2}\n" for i in range(10_000)))
    schema = tmp_path / "s.yaml"
    schema.write_text("numeric: [{name: x}]\ntasks: [{name: y}]\n")
    out = tmp_path / "out"
    assert features_main(["--schema", str(schema), "--input", f"train={raw}", "--output", str(out),
                          "--rows-per-file", "3000", "--row-group-rows", "2000", "--batch-rows", "1500"]) == 0
    files = sorted((out / "train").glob("*.parquet"))
    assert [pq.ParquetFile(f).metadata.num_rows for f in files] == [3000, 3000, 3000, 1000]
    groups = [pq.ParquetFile(f).metadata.row_group(i).num_rows for f in files
              for i in range(pq.ParquetFile(f).metadata.num_row_groups)]
    assert groups == [2000, 1000] * 3 + [1000]
    x = pq.read_table(out / "train")["x"].to_numpy()
    assert len(x) == 10_000 and np.all(np.diff(x) > 0)  # every row once, in order


def test_output_naming_an_existing_file_is_a_clear_error(tmp_path, capsys):
    raw = tmp_path / "raw.csv"
    raw.write_text("x,y\n1,0\n2,1\n")
    schema = tmp_path / "s.yaml"
    schema.write_text("numeric: [{name: x}]\ntasks: [{name: y}]\n")
    for extra in ([], ["--overwrite"]):
        assert features_main(["--schema", str(schema), "--input", f"train={raw}", "--output", str(raw)] + extra) == 1
        assert f"{raw}: output exists and is not a directory" in capsys.readouterr().err
    assert raw.read_text() == "x,y\n1,0\n2,1\n"


@pytest.mark.parametrize("seed", ["-1", str(2 ** 32), str(2 ** 32 + 3)])
def test_a_seed_outside_32_bits_is_refused(tmp_path, capsys, seed):
    # the split keys take 32 bits of the seed: --seed 2**32 + 3 made the split of --seed 3 (and -1 that of 2**32 - 1)
    _raw(tmp_path / "raw.parquet", 0)
    schema = tmp_path / "s.yaml"
    schema.write_text("id_columns: [rid]\nnumeric: [{name: x}]\ntasks: [{name: y}]\n")
    argv = ["--schema", str(schema), "--input", str(tmp_path / "raw.parquet"), "--output", str(tmp_path / "out")]
    assert features_main(argv + ["--seed", seed]) == 1
    assert f"--seed must be in [0, 2**32), got {seed}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# Gaps a mutation review found (2026-12-07): the fit pass of a random split sees the train rows only (every test
# fitted on train= files, where no mask applies); the files of a folder split independently
def _build_random(tmp_path, files: dict[str, int], seed=3):
    raw = tmp_path / "raw"
    raw.mkdir()
    first = 0
    for name, n in files.items():
        rid = np.arange(first, first + n)
        pq.write_table(pa.table({
            "rid": rid, "x": rid.astype(float), "c": [f"v{i}" for i in rid],
            "m": pa.array([[int(i)] for i in rid], pa.list_(pa.int64())), "y": rid % 2}), raw / name)
        first += 100_000
    schema = tmp_path / "s.yaml"
    schema.write_text("id_columns: [rid]\nnumeric: [{name: x}]\n"
                      "categorical: [{name: c}, {name: m, multi_valued: true}]\ntasks: [{name: y}]\n")
    out = tmp_path / "out"
    assert features_main(["--schema", str(schema), "--input", str(raw), "--output", str(out), "--seed", str(seed),
                          "--valid-fraction", "0.3", "--test-fraction", "0.3"]) == 0
    return out


def test_fit_sees_only_the_train_rows_of_a_randomly_split_input(tmp_path):
    out = _build_random(tmp_path, {"a.parquet": 1000})
    spec = json.loads((out / "spec.json").read_text())["transforms"]
    train = pq.read_table(out / "train")["rid"].to_numpy()
    assert 300 < len(train) < 500
    assert spec["train_rows"] == len(train)
    f = spec["features"]
    assert f["x"]["mean"] == pytest.approx(train.mean()) and f["x"]["std"] == pytest.approx(train.std())
    assert sorted(f["c"]["values"]) == sorted(f"v{i}" for i in train)
    assert sorted(f["m"]["values"]) == sorted(train.tolist())


def test_files_of_a_folder_split_independently(tmp_path):
    out = _build_random(tmp_path, {"a.parquet": 1000, "b.parquet": 1000})
    train = pq.read_table(out / "train")["rid"].to_numpy()
    pos_a = set(train[train < 100_000].tolist())
    pos_b = {i - 100_000 for i in train[train >= 100_000].tolist()}
    assert pos_a != pos_b  # same rows positions would go to the same split in every file
