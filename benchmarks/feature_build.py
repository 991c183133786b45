"""Feature-build benchmark: generate N synthetic rec rows (in chunks), fit + transform, print rows/s and RSS.

    python benchmarks/feature_build.py [--rows 5000000] [--workdir DIR]

Prints the fit pass and the transform pass separately (each streams every row once), peak RSS of this process,
and RSS sampled when the transform pass has done 1M rows and at its end: RSS should not grow with rows.
Also the transform pass's CPU seconds (all threads): on a shared machine its wall time depends on the other
jobs, its CPU time much less, so compare CPU time between runs.
Target (issue 3): >= 500k rows/s, peak RSS < 1.5 GB on the 2-core machine. Not a test.
"""
from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq

from _args import at_least
from mmoe_rec.data.synthetic import RecSynthetic, write_parquet
from mmoe_rec.features import build as build_mod
from mmoe_rec.features.schema import load_schema

ROOT = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=at_least(1), default=5_000_000)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="feature_bench_"))
    raw, out = work / "raw", work / "features"
    t = time.perf_counter()
    write_parquet(RecSynthetic(relatedness=0.5, seed=0).tables(args.rows, chunk_rows=250_000), raw,
                  overwrite=True)  # a reused --workdir
    print(f"generated {args.rows:,} raw rows in {time.perf_counter() - t:.1f}s; RSS {rss_mb():.0f} MB")

    # sample RSS while the transform pass runs: at ~1M rows written and at the end
    marks: dict[str, float] = {}
    writer_rows = {"n": 0}
    orig_write = build_mod.SplitWriter.write

    def counting_write(self, table):
        orig_write(self, table)
        writer_rows["n"] += table.num_rows
        if "1M" not in marks and writer_rows["n"] >= 1_000_000:
            marks["1M"] = rss_mb()

    build_mod.SplitWriter.write = counting_write
    orig_compiled = build_mod.compiled
    cpu = {}

    def timed_compiled(spec):  # the transform pass starts by compiling the fitted spec
        cpu["transform_start"] = time.process_time()
        return orig_compiled(spec)

    build_mod.compiled = timed_compiled
    peak = {"mb": 0.0}
    stop = threading.Event()

    def sampler():
        while not stop.is_set():
            peak["mb"] = max(peak["mb"], rss_mb())
            time.sleep(0.05)

    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    schema = load_schema(ROOT / "configs/features/synthetic_rec.yaml")
    sources = [build_mod.parse_input(str(raw), None, 0.1, 0.1)]
    logs = []
    t0 = time.perf_counter()
    build_mod.build(schema, sources, out, seed=0, overwrite=True, log=logs.append)
    total = time.perf_counter() - t0
    cpu_transform = time.process_time() - cpu["transform_start"]
    marks["end"] = rss_mb()
    stop.set()
    th.join()
    import json
    man = json.loads((out / "manifest.json").read_text())
    t_fit = man["seconds"]["fit"]
    n_out = sum(pq.ParquetFile(p).metadata.num_rows for p in out.rglob("*.parquet"))
    assert n_out == args.rows, (n_out, args.rows)
    print(f"fit pass:        {t_fit:6.1f}s  {args.rows / t_fit:12,.0f} rows/s")
    print(f"transform pass:  {total - t_fit:6.1f}s  {args.rows / (total - t_fit):12,.0f} rows/s  (read, transform, write)")
    print(f"transform pass CPU (all threads): {cpu_transform:.1f}s, {cpu_transform / args.rows * 1e6:.2f}s per 1M rows")
    print(f"fit + transform: {total:6.1f}s  {args.rows / total:12,.0f} rows/s")
    at_1m = f"{marks['1M']:.0f} MB" if "1M" in marks else "- (fewer than 1M rows)"
    print(f"RSS after 1M transformed rows: {at_1m}; at the end: {marks['end']:.0f} MB")
    print(f"peak RSS (sampled): {peak['mb']:.0f} MB; ru_maxrss: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    if not args.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
