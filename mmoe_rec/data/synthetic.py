"""Built-in synthetic data: the MMoE paper's two-task regression generator and a recommender-shaped one.

``mmoe``: Ma et al., KDD 2018, section 3.2. Two orthogonal unit vectors u1, u2 in R^d; w1 = c·u1,
w2 = c·(p·u1 + sqrt(1 − p²)·u2); x ~ N(0, I_d);
y_t = w_tᵀx + Σ_{i=1..m} sin(α_i·w_tᵀx + β_i) + ε_t, α_i, β_i ~ N(0, 1) drawn once and shared by both tasks.
The paper's constants: d = 100, c = 1, m = 10. Its noise is written N(0, 0.01); public re-implementations use a
standard deviation of 0.01, as here (``--noise-std``). p is the Pearson correlation of the two linear parts
w_tᵀx; the sine terms make the label correlation a monotone but not identical function of p on [0, 1] (the
paper's range). For p < 0 the sines' even parts keep a positive covariance, so the label correlation depends on
the drawn α, β and can even be positive (p = −1 gave −0.99 to +0.80 across seeds, 100k rows each).

``rec``: impressions (user, item) with Zipf-skewed popularity for both, item tags (list column), user interests
("a|b|c" string column), device, numeric context (price, hour, position, user_age with ~10 % missing) and
binary tasks (click, conversion, ...). Each task's logit is bias + scale · (sqrt(r)·s_shared + sqrt(1 − r)·s_task)
+ a task-specific context effect, where s_shared and s_task are user–item affinities from independent latent
vectors (unit variance), so ``relatedness`` r in [0, 1] moves the tasks' label correlation from ~0 upwards.

Both write raw Parquet matching configs/features/synthetic_{mmoe,rec}.yaml, in chunks (bounded memory) and in
files of at most ``--rows-per-file`` rows. Rows are drawn in blocks of BLOCK_ROWS (the last one holds what is
left), block b from its own generator seeded (seed, 1, b), so that the data depends only on the seed and
``--rows``, not on ``--chunk-rows`` or ``--rows-per-file``. BLOCK_ROWS is the chunk size every command used by
default before 2026-12-06, when each chunk had its own generator: data made then with the default chunk size
(the README's synthetic experiments) is made again the same.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmoe_rec.output_dir import (missing_parents, output_dir_problem, remove_empty_folders, replace_dir,
                                 resolved_output, temp_path)

BLOCK_ROWS = 262_144  # rows per seeded generator: a constant, so the data does not depend on the chunk size


def _chunks(block: Callable[[int, int], pa.Table], rows: int, chunk_rows: int) -> Iterator[pa.Table]:
    """Rows [0, rows) in tables of `chunk_rows`, cut from the blocks `block(b, n)` of BLOCK_ROWS rows each (n: the
    block's rows, fewer in the last one)."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    drawn, table = -1, None  # one block kept: consecutive chunks share at most their boundary block
    for start in range(0, rows, chunk_rows):
        end, parts = min(start + chunk_rows, rows), []
        for b in range(start // BLOCK_ROWS, (end - 1) // BLOCK_ROWS + 1):
            if b != drawn:
                drawn, table = b, block(b, min(BLOCK_ROWS, rows - b * BLOCK_ROWS))
            lo, hi = max(start, b * BLOCK_ROWS), min(end, (b + 1) * BLOCK_ROWS)
            parts.append(table.slice(lo - b * BLOCK_ROWS, hi - lo))
        yield pa.concat_tables(parts)


# ---------------------------------------------------------------------------------------------- MMoE paper


@dataclasses.dataclass
class MMoESynthetic:
    """The paper's generator with its random constants fixed by `seed`."""

    p: float
    d: int = 100
    c: float = 1.0
    m: int = 10
    noise_std: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if not -1.0 <= self.p <= 1.0:
            raise ValueError(f"p must be in [-1, 1], got {self.p}")
        if self.d < 2:
            raise ValueError(f"--d must be at least 2 (two orthogonal unit vectors are needed), got {self.d}")
        if not math.isfinite(self.c):
            raise ValueError(f"--c must be a finite number, got {self.c}")
        if self.m < 0:
            raise ValueError(f"--m must be at least 0, got {self.m}")
        if not (math.isfinite(self.noise_std) and self.noise_std >= 0):
            raise ValueError(f"--noise-std must be a finite number >= 0, got {self.noise_std}")
        if self.seed < 0:
            raise ValueError(f"--seed must be at least 0, got {self.seed}")
        rng = np.random.default_rng([self.seed, 0])
        q, _ = np.linalg.qr(rng.normal(size=(self.d, 2)))  # two orthonormal columns
        u1, u2 = q[:, 0], q[:, 1]
        self.w1 = self.c * u1
        self.w2 = self.c * (self.p * u1 + np.sqrt(1.0 - self.p ** 2) * u2)
        self.alpha = rng.normal(size=self.m)
        self.beta = rng.normal(size=self.m)

    def sample(self, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """x (n, d), y1, y2 (n,) and the linear parts lin1, lin2 (n,)."""
        x = rng.normal(size=(n, self.d))
        lin1, lin2 = x @ self.w1, x @ self.w2  # (n,)
        sin1 = np.sin(np.outer(lin1, self.alpha) + self.beta).sum(axis=1)  # (n, m) -> (n,)
        sin2 = np.sin(np.outer(lin2, self.alpha) + self.beta).sum(axis=1)
        y1 = lin1 + sin1 + rng.normal(scale=self.noise_std, size=n)
        y2 = lin2 + sin2 + rng.normal(scale=self.noise_std, size=n)
        return {"x": x, "y1": y1, "y2": y2, "lin1": lin1, "lin2": lin2}

    def block(self, b: int, n: int) -> pa.Table:
        """Rows [b·BLOCK_ROWS, b·BLOCK_ROWS + n) as the raw table."""
        s = self.sample(n, np.random.default_rng([self.seed, 1, b]))
        cols = {"row_id": pa.array(np.arange(b * BLOCK_ROWS, b * BLOCK_ROWS + n, dtype=np.int64))}
        x = s["x"].astype(np.float32)
        for j in range(self.d):
            cols[f"x{j}"] = pa.array(x[:, j])
        cols["y1"] = pa.array(s["y1"].astype(np.float32))
        cols["y2"] = pa.array(s["y2"].astype(np.float32))
        return pa.table(cols)

    def tables(self, rows: int, chunk_rows: int = 262_144) -> Iterator[pa.Table]:
        return _chunks(self.block, rows, chunk_rows)


# ---------------------------------------------------------------------------------------------- recommender

DEVICES = ["android", "ios", "web", "tv"]
DEVICE_P = [0.5, 0.3, 0.15, 0.05]
INTERESTS = ["sports", "music", "news", "tech", "travel", "food", "fashion", "games", "movies", "finance"]
TASK_BIAS = {"click": -1.8, "conversion": -3.0}
REC_COLUMNS = ("row_id", "user_id", "item_id", "tags", "interests", "device", "price", "hour", "position", "user_age")


def _zipf_probs(n: int, exponent: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** exponent
    return w / w.sum()


@dataclasses.dataclass
class RecSynthetic:
    """A fixed world of users and items (from `seed`); `tables()` draws impressions from it in chunks."""

    relatedness: float = 0.5
    num_users: int = 100_000
    num_items: int = 20_000
    num_tags: int = 500
    zipf: float = 1.1
    tasks: tuple[str, ...] = ("click", "conversion")
    latent_dim: int = 8
    scale: float = 1.5
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.relatedness <= 1.0:
            raise ValueError(f"relatedness must be in [0, 1], got {self.relatedness}")
        for flag, count in (("--users", self.num_users), ("--items", self.num_items), ("--tags", self.num_tags)):
            if count < 1:  # an empty world failed on an IndexError
                raise ValueError(f"{flag} must be at least 1, got {count}")
        if not (math.isfinite(self.zipf) and self.zipf >= 0):  # NaN made every row one user and one item
            raise ValueError(f"--zipf must be a finite number >= 0, got {self.zipf}")
        if self.seed < 0:
            raise ValueError(f"--seed must be at least 0, got {self.seed}")
        if len(self.tasks) < 2:
            raise ValueError("the recommender generator needs at least two tasks")
        _check_task_names(self.tasks)
        rng = np.random.default_rng([self.seed, 0])
        k = self.latent_dim
        # popularity rank -> id, so that ids do not sort by popularity
        self.user_ids = rng.permutation(self.num_users).astype(np.int64) + 1
        self.item_ids = rng.permutation(self.num_items).astype(np.int64) + 1
        self.user_cdf = np.cumsum(_zipf_probs(self.num_users, self.zipf))
        self.item_cdf = np.cumsum(_zipf_probs(self.num_items, self.zipf))
        # latent vectors (by popularity rank): one shared pair, one pair per task
        self.u_shared, self.v_shared = rng.normal(size=(self.num_users, k)), rng.normal(size=(self.num_items, k))
        self.u_task = {t: rng.normal(size=(self.num_users, k)) for t in self.tasks}
        self.v_task = {t: rng.normal(size=(self.num_items, k)) for t in self.tasks}
        self.task_bias = {t: TASK_BIAS.get(t, -2.5) for t in self.tasks}
        # item attributes: 1-3 tags (Zipf over tags), a price level
        n_tags = rng.integers(1, 4, self.num_items)
        self.tag_offsets = np.concatenate([[0], np.cumsum(n_tags)]).astype(np.int64)
        tag_cdf = np.cumsum(_zipf_probs(self.num_tags, 1.0))
        self.tag_values = np.searchsorted(tag_cdf, rng.random(self.tag_offsets[-1]) * tag_cdf[-1]).astype(np.int64)
        self.item_price = np.exp(rng.normal(3.0, 1.0, self.num_items))
        # user attributes: interests as "a|b|c" (0-3 of them), age
        n_int = rng.integers(0, 4, self.num_users)
        picks = [rng.choice(len(INTERESTS), size=j, replace=False) for j in n_int]
        self.user_interests = pa.array(["|".join(INTERESTS[i] for i in p) for p in picks], pa.string())
        self.user_age = np.clip(rng.normal(38, 12, self.num_users), 16, 90).round()

    def _draw(self, cdf: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        return np.minimum(np.searchsorted(cdf, rng.random(n) * cdf[-1]), len(cdf) - 1)

    def sample(self, n: int, rng: np.random.Generator, first_row: int = 0) -> pa.Table:
        u = self._draw(self.user_cdf, n, rng)  # popularity ranks, (n,)
        i = self._draw(self.item_cdf, n, rng)
        k = np.sqrt(self.latent_dim)
        s_shared = (self.u_shared[u] * self.v_shared[i]).sum(1) / k  # (n,) unit variance
        position = rng.geometric(0.3, n).astype(np.float64)
        hour = rng.integers(0, 24, n).astype(np.float64)
        price = self.item_price[i] * np.exp(rng.normal(0, 0.1, n))
        context = {  # task-specific context effects, so that r = 0 leaves the tasks nearly unrelated
            0: -0.25 * (position - 1),
            1: -0.4 * (np.log(price) - 3.0),
        }
        labels = {}
        r = self.relatedness
        for j, t in enumerate(self.tasks):
            s_task = (self.u_task[t][u] * self.v_task[t][i]).sum(1) / k
            logit = self.task_bias[t] + self.scale * (np.sqrt(r) * s_shared + np.sqrt(1 - r) * s_task)
            logit = logit + context.get(j, 0.0)
            labels[t] = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int8)
        lengths = np.diff(self.tag_offsets)[i]
        out_offsets = np.concatenate([[0], np.cumsum(lengths)])
        gather = np.repeat(self.tag_offsets[i] - out_offsets[:-1], lengths) + np.arange(out_offsets[-1])
        tags = pa.ListArray.from_arrays(pa.array(out_offsets.astype(np.int32)), pa.array(self.tag_values[gather]))
        age = self.user_age[u]
        age_missing = rng.random(n) < 0.1
        cols = {
            "row_id": pa.array(np.arange(first_row, first_row + n, dtype=np.int64)),
            "user_id": pa.array(self.user_ids[u]),
            "item_id": pa.array(self.item_ids[i]),
            "tags": tags,
            "interests": self.user_interests.take(pa.array(u)),
            "device": pa.array(np.asarray(DEVICES)[self._draw(np.cumsum(DEVICE_P), n, rng)]),
            "price": pa.array(price),
            "hour": pa.array(hour),
            "position": pa.array(position),
            "user_age": pa.array(age, mask=age_missing),
        }
        cols.update({t: pa.array(v) for t, v in labels.items()})
        return pa.table(cols)

    def block(self, b: int, n: int) -> pa.Table:
        """Rows [b·BLOCK_ROWS, b·BLOCK_ROWS + n)."""
        return self.sample(n, np.random.default_rng([self.seed, 1, b]), first_row=b * BLOCK_ROWS)

    def tables(self, rows: int, chunk_rows: int = 262_144) -> Iterator[pa.Table]:
        return _chunks(self.block, rows, chunk_rows)


def _check_task_names(tasks: tuple[str, ...]) -> None:
    """A task's label column must not replace a feature column or another task's labels."""
    seen: set[str] = set()
    for t in tasks:
        if not t or t != t.strip():  # "click,,conversion", "click, conversion"
            raise ValueError(f"task name {t!r} is empty or padded with spaces (--tasks is comma-separated, no spaces)")
        if t in REC_COLUMNS:
            raise ValueError(f"task name {t!r} collides with the generated column {t!r}; "
                             f"the generated columns are {', '.join(REC_COLUMNS)}")
        if t in seen:
            raise ValueError(f"task name {t!r} is given twice")
        seen.add(t)


# ---------------------------------------------------------------------------------------------- writing


def check_output(output: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse an output that is a file, or a non-empty directory unless `overwrite`: never delete data unasked."""
    problem = output_dir_problem(resolved_output(output), overwrite)
    if problem:
        raise FileExistsError(f"{problem}: {output}")


def write_parquet(tables: Iterator[pa.Table], output: str | os.PathLike, rows_per_file: int = 1_048_576,
                  row_group_rows: int = 65_536, overwrite: bool = False) -> list[Path]:
    """Write a stream of tables as output/part-NNNNN.parquet; temporary directory renamed when complete.
    An existing non-empty output is an error (FileExistsError) unless `overwrite`; then it is replaced only
    once the new one is complete."""
    output = resolved_output(output)
    check_output(output, overwrite)
    tmp = temp_path(output, "tmp")
    made = missing_parents(tmp)  # removed again if the write fails
    tmp.mkdir(parents=True)
    try:
        writer, n_files = None, 0
        for k, t in _file_pieces(tables, rows_per_file):
            if k == n_files:  # the first piece of file k
                if writer is not None:
                    writer.close()
                writer = pq.ParquetWriter(tmp / f"part-{k:05d}.parquet", t.schema)
                n_files += 1
            writer.write_table(t, row_group_size=row_group_rows)
        if writer is not None:
            writer.close()
        replace_dir(tmp, output, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_empty_folders(made)
        raise
    return sorted(output.glob("part-*.parquet"))


def _file_pieces(tables: Iterator[pa.Table], rows_per_file: int) -> Iterator[tuple[int, pa.Table]]:
    """(file index, rows) with every table cut where a file of `rows_per_file` rows ends."""
    if rows_per_file < 1:
        raise ValueError(f"rows_per_file must be at least 1, got {rows_per_file}")
    written = 0
    for t in tables:
        while t.num_rows:
            piece = t.slice(0, rows_per_file - written % rows_per_file)
            yield written // rows_per_file, piece
            written += piece.num_rows
            t = t.slice(piece.num_rows)


def _check_counts(args: argparse.Namespace) -> None:
    """Zero rows would write an empty data set and report success; zero-sized chunks or files never finish."""
    for flag in ("rows", "chunk_rows", "rows_per_file"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmoe-rec synth", description="Generate built-in synthetic raw data (Parquet).")
    sub = p.add_subparsers(dest="kind", required=True)
    defaults = argparse.ArgumentDefaultsHelpFormatter  # each option's default in --help
    m = sub.add_parser("mmoe", formatter_class=defaults,
                       help="the MMoE paper's two regression tasks (schema configs/features/synthetic_mmoe.yaml)")
    m.add_argument("--p", type=float, default=0.5, help="correlation of the tasks' linear parts, in [-1, 1] (the label "
                   "correlation follows it on [0, 1] only; module doc)")
    m.add_argument("--d", type=int, default=100, help="input dimension (paper: 100)")
    m.add_argument("--c", type=float, default=1.0, help="scale of the weight vectors (paper: 1)")
    m.add_argument("--m", type=int, default=10, help="number of sine terms (paper: 10)")
    m.add_argument("--noise-std", type=float, default=0.01, help="label noise standard deviation")
    r = sub.add_parser("rec", help="recommender impressions with binary tasks (configs/features/synthetic_rec.yaml)",
                       formatter_class=defaults)
    r.add_argument("--relatedness", type=float, default=0.5, help="task relatedness r in [0, 1]")
    r.add_argument("--users", type=int, default=100_000, help="distinct user ids")
    r.add_argument("--items", type=int, default=20_000, help="distinct item ids")
    r.add_argument("--tags", type=int, default=500, help="distinct tags (a multi-valued feature)")
    r.add_argument("--zipf", type=float, default=1.1, help="popularity exponent of users and items")
    r.add_argument("--tasks", default="click,conversion", help="comma-separated binary task names (>= 2)")
    for s in (m, r):
        s.add_argument("--rows", type=int, default=100_000, help="rows to generate")
        s.add_argument("--output", required=True, help="output directory (part-*.parquet)")
        s.add_argument("--seed", type=int, default=0, help="the data is a function of it (and the other settings)")
        s.add_argument("--chunk-rows", type=int, default=262_144,
                       help=f"rows generated and written at a time (memory: at least {BLOCK_ROWS}); "
                            "the data does not depend on it")
        s.add_argument("--rows-per-file", type=int, default=1_048_576, help="most rows in one output file")
        s.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        _check_counts(args)
        if args.kind == "mmoe":
            gen = MMoESynthetic(p=args.p, d=args.d, c=args.c, m=args.m, noise_std=args.noise_std, seed=args.seed)
        else:
            gen = RecSynthetic(relatedness=args.relatedness, num_users=args.users, num_items=args.items,
                               num_tags=args.tags, zipf=args.zipf, tasks=tuple(args.tasks.split(",")), seed=args.seed)
    except ValueError as e:
        from mmoe_rec.cli import print_user_error

        print_user_error(e)
        return 2
    try:
        files = write_parquet(gen.tables(args.rows, args.chunk_rows), args.output, rows_per_file=args.rows_per_file,
                              overwrite=args.overwrite)
    except FileExistsError as e:
        from mmoe_rec.cli import print_user_error

        print_user_error(e)
        return 1
    print(f"wrote {args.rows} rows to {args.output} ({len(files)} files)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
