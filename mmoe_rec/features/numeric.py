"""Numeric columns: streaming train statistics and the transforms standardize / log1p / bucketize / none.

Statistics come from one streaming pass: count, mean and M2 of fixed blocks of STATS_BLOCK values merged in row
order (Chan et al.), so they do not depend on how rows are batched, not even in the last bit (the spec's
version hashes them: `--batch-rows` must not change it), and a bounded uniform sample for quantiles
(median imputation, bucketize boundaries). The sample is a "bottom-k" reservoir: every value gets a seeded
uniform random key and the k values with the smallest keys are kept, which is a uniform sample without
replacement of all values seen, mergeable batch by batch with numpy. With k = 65,536 a quantile's rank error
is about 1/sqrt(k) ~ 0.4 %; exact when the train split has fewer than k non-missing values.

``log1p`` is signed, sign(x) * log1p(|x|), so negative values do not become NaN; it is then standardized.
Missing values (null, NaN) take the imputed value (on the transformed scale: mean -> 0 after standardizing)
and set the dense ``<name>_missing`` indicator; inf and overflowing numbers never get here (columns.numeric_column
rejects them, naming the row). Finite values so large that the train mean or std overflows (|x| near 1e308)
are an error naming the column, and a transformed value beyond float32's range (3.4e38) one naming the row.
``bucketize`` gives sparse ids: 0 = missing, 1..B+1 buckets;
with ``zero_bucket`` the value 0 gets an id of its own and the quantiles are those of the non-zero values (for
columns that are mostly 0, such as money amounts, whose quantiles over all rows would all be 0).
"""
from __future__ import annotations

import math
import zlib

import numpy as np
import pyarrow as pa

from mmoe_rec.features.errors import FeatureDataError
from mmoe_rec.features.schema import NumericSpec

FLOAT32_MAX = float(np.finfo(np.float32).max)
RESERVOIR_SIZE = 65_536
STATS_BLOCK = 4_096  # values per block of the mean / M2 merge; a batch's remainder waits for the next batch
_COMPARE_MAX_BOUNDARIES = 16  # bucketize by comparisons up to this many boundaries


def signed_log1p(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


def to_float32(v: np.ndarray, column: str, what: str = "value") -> np.ndarray:
    """v as float32; a value beyond float32's range is an error naming its row (astype would make it inf)."""
    bad = np.abs(v) > FLOAT32_MAX
    if bad.any():
        row = int(np.argmax(bad))
        raise FeatureDataError(f"{what} {v[row].item()!r} does not fit a float32 (|x| <= {FLOAT32_MAX:.4g})",
                               column=column, row=row)
    return v.astype(np.float32)


class NumericStats:
    """Streaming statistics of one numeric column (values already on the transform's scale)."""

    def __init__(self, name: str, reservoir_size: int = RESERVOIR_SIZE) -> None:
        self.missing = 0
        self._merged = (0, 0.0, 0.0)  # count, mean, M2 of the full blocks so far
        self._pending = np.empty(0)  # values after the last full block (< STATS_BLOCK)
        self.k = reservoir_size
        self._rng = np.random.default_rng(zlib.crc32(name.encode()))
        self._keys = np.empty(0)
        self._sample = np.empty(0)
        self.lo, self.hi = math.inf, -math.inf  # exact: a constant column is told by them, not by a rounded std

    def update(self, x: np.ndarray, missing: np.ndarray) -> None:
        """x: (n,) float64 with anything at `missing` ignored."""
        self.missing += int(missing.sum())
        v = x[~missing]
        n = v.size
        if n == 0:
            return
        self.lo, self.hi = min(self.lo, float(v.min())), max(self.hi, float(v.max()))
        values = np.concatenate([self._pending, v]) if self._pending.size else v
        full = values.size - values.size % STATS_BLOCK
        if full:
            blocks = values[:full].reshape(-1, STATS_BLOCK)  # (m, STATS_BLOCK)
            with np.errstate(over="ignore", invalid="ignore"):  # huge values: fit_numeric names the column
                means = blocks.mean(axis=1)
                m2s = ((blocks - means[:, None]) ** 2).sum(axis=1)
            for bmean, bm2 in zip(means.tolist(), m2s.tolist()):
                self._merged = _merge(self._merged, STATS_BLOCK, bmean, bm2)
        self._pending = values[full:].copy()
        keys = np.concatenate([self._keys, self._rng.random(n)])
        sample = np.concatenate([self._sample, v])
        if keys.size > self.k:
            keep = np.argpartition(keys, self.k)[: self.k]
            keys, sample = keys[keep], sample[keep]
        self._keys, self._sample = keys, sample

    def _totals(self) -> tuple[int, float, float]:
        """(count, mean, M2) of every value so far: the full blocks, then the pending values as one block."""
        if not self._pending.size:
            return self._merged
        v = self._pending
        with np.errstate(over="ignore", invalid="ignore"):
            bmean = float(v.mean())
            return _merge(self._merged, v.size, bmean, float(((v - bmean) ** 2).sum()))

    @property
    def count(self) -> int:
        return self._totals()[0]

    @property
    def mean(self) -> float:
        return self._totals()[1]

    @property
    def std(self) -> float:
        count, _, m2 = self._totals()
        return float(np.sqrt(m2 / count)) if count else 0.0

    def quantiles(self, qs: np.ndarray, nonzero: bool = False) -> np.ndarray:
        """Quantiles of the sampled values (nonzero: of the non-zero ones only); zeros if there are none."""
        sample = self._sample[self._sample != 0] if nonzero else self._sample
        return np.quantile(np.sort(sample), qs) if sample.size else np.zeros(len(qs))


def _merge(acc: tuple[int, float, float], n: int, bmean: float, bm2: float) -> tuple[int, float, float]:
    """(count, mean, M2) of acc's values and n more with mean bmean and M2 bm2 (Chan et al.)."""
    count, mean, m2 = acc
    tot = count + n
    delta = bmean - mean  # Python floats: an overflow gives inf / NaN (fit_numeric refuses them), no exception
    return tot, mean + delta * n / tot, m2 + bm2 + delta * delta * count * n / tot


def column_values(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(values float64 with 0 at missing, missing mask) from a numeric Arrow array."""
    x = arr.to_numpy(zero_copy_only=False)
    x = np.asarray(x, dtype=np.float64)  # nulls arrive as NaN
    missing = np.isnan(x)
    if missing.any():
        x = np.where(missing, 0.0, x)
    return x, missing


def prepare(cfg_transform: str, x: np.ndarray) -> np.ndarray:
    return signed_log1p(x) if cfg_transform == "log1p" else x


def fit_numeric(cfg: NumericSpec, stats: NumericStats) -> dict:
    """Fitted state of one numeric feature (JSON-able), from its train statistics."""
    state: dict = {"kind": "numeric", "column": cfg.column, "transform": cfg.transform,
                   "train_count": stats.count, "train_missing": stats.missing}
    if cfg.transform == "bucketize":
        qs = np.linspace(0, 1, cfg.buckets + 1)[1:-1]
        if cfg.zero_bucket:  # quantiles of the non-zero values; boundaries at 0 and just above give 0 its own id
            b = stats.quantiles(qs, nonzero=True)
            b = np.concatenate([b[b != 0], [0.0, np.nextafter(0.0, 1.0)]])
        else:
            b = stats.quantiles(qs)
        _require_finite(cfg, "bucket boundaries", b)
        state["boundaries"] = [float(v) for v in np.unique(b)]
        state["num_embeddings"] = len(state["boundaries"]) + 2
        return state
    # every train value the same: the streamed mean of a non-whole value (12345.67) rounds, and its std (~4e-12)
    # passed the guard below, scaling valid values 12345.68 to 3e9; taken exactly: 0, unit scale
    constant = stats.count > 0 and stats.lo == stats.hi
    if cfg.transform == "none":
        mean, std = 0.0, 1.0
    elif constant:
        mean, std = stats.lo, 1.0
    else:
        mean, std = stats.mean, stats.std
        _require_finite(cfg, "mean", mean)
        _require_finite(cfg, "standard deviation", std)
        std = std if std > 1e-12 else 1.0  # a constant column stays 0, never inf
    if cfg.impute == "mean":
        impute = stats.lo if constant else stats.mean
    elif cfg.impute == "median":
        impute = float(stats.quantiles(np.array([0.5]))[0])
    elif cfg.impute == "zero":
        impute = 0.0
    else:
        impute = float(prepare(cfg.transform, np.array([float(cfg.impute)]))[0])
    _require_finite(cfg, "imputed value", impute)
    indicator = stats.missing > 0 if cfg.missing_indicator == "auto" else bool(cfg.missing_indicator)
    state.update(mean=float(mean), std=float(std), impute=float(impute), indicator=bool(indicator))
    return state


def _require_finite(cfg: NumericSpec, what: str, v) -> None:
    if not np.isfinite(v).all():
        raise FeatureDataError(f"the train {what} ({cfg.transform}) is not finite: the values are too large "
                               "(|x| near 1e308 overflows float64 arithmetic)", column=cfg.column)


def apply_numeric(state: dict, x: np.ndarray, missing: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Bucketize: (int64 ids, None). Otherwise: (float32 value, float32 missing indicator or None)."""
    if state["transform"] == "bucketize":
        bounds = np.asarray(state["boundaries"], np.float64)
        if len(bounds) <= _COMPARE_MAX_BOUNDARIES:
            # id - 1 = boundaries <= x (searchsorted side="right" on x without NaN: missing x are 0 here);
            # two vectorized passes per boundary beat a binary search per value
            ids = np.ones(len(x), np.int64)
            for b in bounds:
                ids += x >= b
        else:
            ids = np.searchsorted(bounds, x, side="right").astype(np.int64) + 1
        ids[missing] = 0
        return ids, None
    v = prepare(state["transform"], x)
    if missing.any():
        v = np.where(missing, state["impute"], v)
    v = to_float32((v - state["mean"]) / state["std"], state.get("column"), "transformed value")
    ind = missing.astype(np.float32) if state["indicator"] else None
    return v, ind
