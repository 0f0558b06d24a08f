"""The estimators behind every number of the tables, on plain numpy arrays.

Kept apart from the tables so that each can be checked against scipy directly
(tests/test_stats.py) and so that the choices docs/statistics.md argues for live in one
place: a t interval (conditions have 10-20 prompts), Cohen's d / d_z with an exact
noncentral-t interval (the normal approximation is too narrow at that n), a percentile
bootstrap of a ratio of gaps (BCa is unstable near a zero denominator), Spearman with a
permutation p-value at small n (the t approximation gives p = 0 for 3 cells in order),
and Benjamini-Hochberg. Where scipy has the estimator it is scipy's.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import optimize, special, stats

SMALL_N_PERMUTATION = 10
"""Below this many cells a Spearman p-value comes from a permutation test: the t
approximation of `spearmanr` gives p = 0 for a perfect rank order of 3 cells."""


def mean_or_nan(values: np.ndarray) -> float:
    """The mean, NaN for no values (numpy would warn and return NaN anyway)."""
    return float(np.mean(values)) if len(values) else math.nan


def t_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided t interval of the mean (scipy.stats.t); NaN with fewer than two values."""
    n = len(values)
    if n < 2:
        return (math.nan, math.nan)
    mean = float(np.mean(values))
    sem = float(stats.sem(values))
    if sem == 0.0:
        return (mean, mean)
    low, high = stats.t.interval(confidence, n - 1, loc=mean, scale=sem)
    return (float(low), float(high))


# --- standardised mean differences --------------------------------------------------------


def cohens_d(a: np.ndarray, b: np.ndarray) -> float:
    """(mean_a - mean_b) / pooled sd; NaN when undefined (n < 2 or zero spread)."""
    n_a, n_b = len(a), len(b)
    if n_a < 2 or n_b < 2:
        return math.nan
    pooled = ((n_a - 1) * np.var(a, ddof=1) + (n_b - 1) * np.var(b, ddof=1)) / (n_a + n_b - 2)
    if pooled <= 0:
        return math.nan
    return float((np.mean(a) - np.mean(b)) / math.sqrt(pooled))


def d_z(a: np.ndarray, b: np.ndarray) -> float:
    """Mean of the paired differences over their sd; NaN when undefined."""
    diff = np.asarray(a, float) - np.asarray(b, float)
    if len(diff) < 2:
        return math.nan
    sd = np.std(diff, ddof=1)
    if sd <= 0:
        return math.nan
    return float(np.mean(diff) / sd)


def _ncp_for_cdf(t_obs: float, df: float, target: float) -> float:
    """The noncentrality at which P(T <= t_obs) = target (cdf falls as ncp grows)."""

    def gap(ncp: float) -> float:
        # scipy.special.nctdtr is the cdf behind scipy.stats.nct, without its per-call checks
        return float(special.nctdtr(df, ncp, t_obs)) - target

    width = max(5.0, abs(t_obs))
    for _ in range(40):
        low, high = t_obs - width, t_obs + width
        g_low, g_high = gap(low), gap(high)
        if np.isfinite(g_low) and np.isfinite(g_high) and g_low > 0 > g_high:
            return float(optimize.brentq(gap, low, high, xtol=1e-9))
        width *= 2.0
    return math.nan


def d_confidence_interval(
    d: float, n_a: int, n_b: int | None, confidence: float = 0.95
) -> tuple[float, float]:
    """Exact interval of a standardised mean difference by inverting the noncentral t.

    `n_b=None` means a paired design (d_z over `n_a` pairs, t = d_z * sqrt(n)); otherwise
    Cohen's d with pooled sd (t = d * sqrt(n_a n_b / (n_a + n_b)), df = n_a + n_b - 2).
    """
    if not np.isfinite(d):
        return (math.nan, math.nan)
    if n_b is None:
        scale, df = math.sqrt(n_a), n_a - 1
    else:
        scale, df = math.sqrt(n_a * n_b / (n_a + n_b)), n_a + n_b - 2
    if df < 1:
        return (math.nan, math.nan)
    t_obs = d * scale
    tail = (1.0 - confidence) / 2.0
    low = _ncp_for_cdf(t_obs, df, 1.0 - tail)
    high = _ncp_for_cdf(t_obs, df, tail)
    return (low / scale, high / scale)


# --- bootstrap of a ratio of gaps ---------------------------------------------------------


def _ratio_of_gaps(
    num_hi: np.ndarray, num_lo: np.ndarray, den_hi: np.ndarray, den_lo: np.ndarray, axis: int = -1
) -> np.ndarray:
    """(mean(num_hi) - mean(num_lo)) / (mean(den_hi) - mean(den_lo)), vectorised."""
    num = np.mean(num_hi, axis=axis) - np.mean(num_lo, axis=axis)
    den = np.mean(den_hi, axis=axis) - np.mean(den_lo, axis=axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        return num / den


def bootstrap_ratio(
    samples: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    *,
    seed: int,
    n_resamples: int,
    confidence: float,
) -> tuple[float, float]:
    """Percentile bootstrap interval of `_ratio_of_gaps` (scipy.stats.bootstrap, seeded).

    The samples are resampled independently (conditions hold different cells). Percentile
    rather than BCa: the ratio is unbounded near a zero denominator, where BCa's jackknife
    is unstable. Samples are passed unique (same array twice would be resampled twice).
    """
    unique: list[np.ndarray] = []
    index: list[int] = []
    for sample in samples:
        for i, seen in enumerate(unique):
            if seen is sample:
                index.append(i)
                break
        else:
            index.append(len(unique))
            unique.append(sample)

    def statistic(*data: np.ndarray, axis: int = -1) -> np.ndarray:
        picked = [data[i] for i in index]
        return _ratio_of_gaps(*picked, axis=axis)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", stats.DegenerateDataWarning)
        res = stats.bootstrap(
            tuple(unique), statistic, n_resamples=n_resamples, vectorized=True, paired=False,
            confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed),
        )
    for w in caught:
        if not issubclass(w.category, stats.DegenerateDataWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if any(issubclass(w.category, stats.DegenerateDataWarning) for w in caught):
        # Too few distinct values (or a zero denominator in resamples): no honest interval.
        return (math.nan, math.nan)
    ci = res.confidence_interval
    return (float(ci.low), float(ci.high))


def bootstrap_mean(
    values: np.ndarray, *, seed: int, n_resamples: int, confidence: float
) -> tuple[float, float]:
    """Percentile bootstrap interval of a mean (scipy.stats.bootstrap, seeded).

    For the per-layer profiles: a PR is bounded below by 1 and skewed, so a resampled
    interval rather than a t interval. NaN below two values (no spread to resample); a
    single repeated value gives the degenerate interval (v, v), as `t_interval` does.
    """
    data = np.asarray(values, float)
    if len(data) < 2:
        return (math.nan, math.nan)
    if np.ptp(data) == 0:
        return (float(data[0]), float(data[0]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", stats.DegenerateDataWarning)
        res = stats.bootstrap(
            (data,), np.mean, n_resamples=n_resamples, vectorized=True,
            confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed),
        )
    for w in caught:
        if not issubclass(w.category, stats.DegenerateDataWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if any(issubclass(w.category, stats.DegenerateDataWarning) for w in caught):
        return (math.nan, math.nan)
    ci = res.confidence_interval
    return (float(ci.low), float(ci.high))


# --- rank correlation ---------------------------------------------------------------------


def _rank_correlation(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman's rho along `axis` (Pearson of the ranks), vectorised for resampling."""
    rx = stats.rankdata(x, axis=axis)
    ry = stats.rankdata(y, axis=axis)
    rx = rx - rx.mean(axis=axis, keepdims=True)
    ry = ry - ry.mean(axis=axis, keepdims=True)
    num = (rx * ry).sum(axis=axis)
    den = np.sqrt((rx * rx).sum(axis=axis) * (ry * ry).sum(axis=axis))
    with np.errstate(divide="ignore", invalid="ignore"):
        return num / den


def spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, float, str]:
    """Spearman's rho, its p-value and a note (why NaN, or that p is a permutation p)."""
    if len(x) < 3:
        return (math.nan, math.nan, "fewer than 3 cells")
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return (math.nan, math.nan, "constant input")
    res = stats.spearmanr(x, y)
    if len(x) >= SMALL_N_PERMUTATION:
        return (float(res.statistic), float(res.pvalue), "")

    def statistic(xs: np.ndarray, axis: int = -1) -> np.ndarray:
        return _rank_correlation(xs, np.broadcast_to(y, xs.shape), axis=axis)

    # One sample permuted against fixed y: n! pairings, enumerated exactly for n <= 7.
    perm = stats.permutation_test(
        (x,), statistic, permutation_type="pairings", vectorized=True,
        n_resamples=9999, alternative="two-sided", rng=np.random.default_rng(0),
    )
    return (float(res.statistic), float(perm.pvalue), "permutation p-value (small n)")


# --- multiple comparisons -----------------------------------------------------------------


def fdr_adjust(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values; NaN p-values (no test) stay NaN, uncounted."""
    p = np.asarray(p, float)
    adjusted = np.full_like(p, np.nan)
    finite = np.isfinite(p)
    if finite.any():
        adjusted[finite] = stats.false_discovery_control(np.clip(p[finite], 0.0, 1.0),
                                                         method="bh")
    return adjusted
