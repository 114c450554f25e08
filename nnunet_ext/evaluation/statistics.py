"""Paired comparison of a method with a baseline on the same test cases and repeats.

Shapes: per-case metric values are float arrays of shape (R, C): R repeats (training runs with seed
K = 0..R−1, each with its own labeled subset) × C test cases, in the same order for both methods, so that
entry (k, c) of the method and of the baseline share the case, the repeat index and the labeled subset.
Differences are method − baseline, shape (R, C).

NaN: a pair where either value is NaN (nnU-Net's empty-mask convention gives NaN when a case's reference
and prediction are both empty, and HD95 NaN when one of them is) is left out of every statistic; the
number of pairs used is reported.

Mean difference: the mean over the non-NaN pairs, every (repeat, case) pair weighted equally.

Bootstrap (crossed, percentile): each of ``n_resamples`` resamples draws C case indices and, independently,
R repeat indices with replacement and takes the mean over the non-NaN pairs of the resampled R × C grid
(repeat k* × case c*; a pair drawn twice counts twice). The interval is the (α/2, 1 − α/2) percentiles
(``numpy.percentile``, linear interpolation) of the resample means, α = 1 − confidence. Resampling both
axes lets the interval cover the spread between test cases and between training runs. The generator is
``numpy.random.default_rng(seed)``; case indices are drawn first, as one (n_resamples, C) array, so that
with R = 1 the interval is exactly the ordinary case bootstrap with the same seed. A resample that holds
no non-NaN pair has no mean and is left out.

Minimum: an interval needs at least ``MIN_CASES`` distinct test cases with a non-NaN pair (and so at least as
many pairs); below that :func:`compare` gives the mean difference and no interval (``low``, ``high`` NaN,
``too_few_cases``). The percentile bootstrap of a mean is too narrow at few cases: over one case its interval has
zero width. ``MIN_CASES`` is the smallest n from which the 95 % interval covered the true mean in at least 90 % of
simulated data sets of normal differences and 85 % of skewed (centred exponential) ones, at that n and at every
larger n tested up to 40 (``benchmarks/bootstrap_coverage.py``; table and reasons in docs/study.md). With one
repeat the interval covers the spread between test cases only, not that between training runs.

Wilcoxon: two-sided signed-rank test (``scipy.stats.wilcoxon``, zero differences dropped, exact
distribution for small samples) of the per-case differences averaged over the repeats. The pairs of one
case in different repeats are not independent (same image, same difficulty), so the test takes one value
per case. No non-zero difference gives p = 1 (no evidence of a difference), no case gives NaN.

Many comparisons: :func:`holm` adjusts the p values of one family of comparisons (Holm's step-down method,
which controls the chance of any false rejection in the family at α); :func:`holm_family` takes as the family
the comparisons that have enough cases for an interval. :func:`starred` marks a comparison whose interval
excludes 0 and whose adjusted p is below ``ALPHA``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

N_RESAMPLES = 10000
CONFIDENCE = 0.95
SEED = 0
ALPHA = 0.05
MIN_CASES = 10
COLLAPSE_RATIO = 0.5  # a repeat below half of the baseline's Dice on the same seed is flagged (worst_repeat_ratio)


@dataclass(frozen=True)
class PairedComparison:
    """Mean difference (method − baseline), its bootstrap interval, pair and case counts, Wilcoxon p."""

    mean: float
    low: float
    high: float
    n_pairs: int
    n_cases: int
    p_value: float
    min_cases: int = MIN_CASES

    @property
    def too_few_cases(self) -> bool:
        """Whether the pairs cover some test cases but fewer than ``min_cases``, so no interval is given."""
        return 0 < self.n_cases < self.min_cases

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely above or below 0 (False for a NaN interval)."""
        return self.low > 0 or self.high < 0


def paired_differences(method: ArrayLike, baseline: ArrayLike) -> np.ndarray:
    """Return method − baseline for two (R, C) arrays of per-case values."""
    method, baseline = np.asarray(method, dtype=float), np.asarray(baseline, dtype=float)
    if method.ndim != 2 or method.shape != baseline.shape:
        raise ValueError(f"method and baseline need the same (repeats, cases) shape, got {method.shape} "
                         f"and {baseline.shape}")
    return method - baseline


def case_means(differences: ArrayLike) -> np.ndarray:
    """Return the mean over repeats of each case's non-NaN differences, shape (C,); NaN where none."""
    differences = np.asarray(differences, dtype=float)
    valid = ~np.isnan(differences)
    count = valid.sum(axis=0)
    total = np.where(valid, differences, 0.0).sum(axis=0)
    return np.divide(total, count, out=np.full(count.shape, math.nan), where=count > 0)


def bootstrap_ci(differences: ArrayLike, n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE,
                 seed: int = SEED) -> tuple[float, float]:
    """Return the crossed percentile bootstrap interval of the mean of (R, C) differences (NaN if none)."""
    differences = np.asarray(differences, dtype=float)
    repeats, cases = differences.shape
    valid = ~np.isnan(differences)
    if not valid.any():
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    case_counts = _draw_counts(rng, n_resamples, cases)
    repeat_counts = _draw_counts(rng, n_resamples, repeats)
    # a resample's sum over its grid is Σ_k Σ_c n_k m_c d_kc, with n, m how often repeat k, case c were drawn
    total = ((repeat_counts @ np.where(valid, differences, 0.0)) * case_counts).sum(axis=1)
    count = ((repeat_counts @ valid.astype(float)) * case_counts).sum(axis=1)
    means = total[count > 0] / count[count > 0]
    alpha = 1.0 - confidence
    low, high = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def _draw_counts(rng: np.random.Generator, n_resamples: int, size: int) -> np.ndarray:
    """Draw ``size`` indices with replacement per resample; return how often each was drawn, (n_resamples, size)."""
    indices = rng.integers(0, size, size=(n_resamples, size))
    flat = (indices + size * np.arange(n_resamples)[:, None]).ravel()
    return np.bincount(flat, minlength=n_resamples * size).reshape(n_resamples, size).astype(float)


def wilcoxon_p(differences: ArrayLike) -> float:
    """Return the two-sided Wilcoxon signed-rank p of the per-case mean differences of (R, C) differences."""
    per_case = case_means(differences)
    per_case = per_case[~np.isnan(per_case)]
    if per_case.size == 0:
        return math.nan
    if not per_case.any():
        return 1.0
    return float(stats.wilcoxon(per_case).pvalue)


def compare(method: ArrayLike, baseline: ArrayLike, n_resamples: int = N_RESAMPLES,
            confidence: float = CONFIDENCE, seed: int = SEED, min_cases: int = MIN_CASES) -> PairedComparison:
    """Compare two (R, C) arrays of per-case values pair by pair; no interval below ``min_cases`` test cases."""
    if min_cases < 1:
        raise ValueError(f"min_cases must be at least 1, got {min_cases}")
    differences = paired_differences(method, baseline)
    valid = ~np.isnan(differences)
    mean = float(differences[valid].mean()) if valid.any() else math.nan
    n_cases = int(valid.any(axis=0).sum())
    enough = n_cases >= min_cases
    low, high = bootstrap_ci(differences, n_resamples, confidence, seed) if enough else (math.nan, math.nan)
    return PairedComparison(mean, low, high, int(valid.sum()), n_cases, wilcoxon_p(differences), min_cases)


def worst_repeat_ratio(method: ArrayLike, baseline: ArrayLike) -> tuple[float, int]:
    """(ratio, repeat) of the repeat whose mean over the paired cases is lowest relative to the baseline's mean on
    the same repeat and cases (``mean(method) / mean(baseline)``; two (R, C) arrays, NaN where absent). A repeat
    without pairs, or whose baseline mean is 0, has no ratio; (NaN, -1) when none has. Below 0.5: a repeat in
    which the method lost more than half of what the baseline reached on the same seed (a collapse, not noise)."""
    method, baseline = np.asarray(method, dtype=float), np.asarray(baseline, dtype=float)
    paired_differences(method, baseline)  # checks the shapes
    worst = (math.nan, -1)
    for repeat, (m, b) in enumerate(zip(method, baseline, strict=True)):
        both = ~np.isnan(m) & ~np.isnan(b)
        if both.any() and b[both].mean() > 0:
            ratio = float(m[both].mean() / b[both].mean())
            if math.isnan(worst[0]) or ratio < worst[0]:
                worst = (ratio, repeat)
    return worst


def holm(p_values: ArrayLike) -> np.ndarray:
    """Return Holm's step-down adjusted p values; NaN entries stay NaN and are not counted as comparisons."""
    p_values = np.asarray(p_values, dtype=float)
    if p_values.ndim != 1:
        raise ValueError(f"p_values must be a flat list, got shape {p_values.shape}")
    if np.any((p_values < 0) | (p_values > 1)):
        raise ValueError(f"p_values must lie in [0, 1], got {p_values[(p_values < 0) | (p_values > 1)].tolist()}")
    tested = np.flatnonzero(~np.isnan(p_values))
    order = tested[np.argsort(p_values[tested], kind="stable")]
    # the i-th smallest of m p values is multiplied by m − i (i from 0); adjusted values never decrease
    steps = (order.size - np.arange(order.size)) * p_values[order]
    adjusted = np.full(p_values.shape, math.nan)
    adjusted[order] = np.minimum(np.maximum.accumulate(steps), 1.0)
    return adjusted


def holm_family(results: Sequence[PairedComparison]) -> np.ndarray:
    """Return the Holm-adjusted Wilcoxon p of each comparison over those with enough cases (NaN for the others)."""
    return holm([math.nan if r.too_few_cases else r.p_value for r in results])


def starred(result: PairedComparison, adjusted_p: float, alpha: float = ALPHA) -> bool:
    """Whether a comparison earns a star: its interval excludes 0 and its adjusted p is below ``alpha``."""
    return result.excludes_zero and adjusted_p < alpha


def mean_and_std(values: ArrayLike) -> tuple[float, float, int]:
    """Return mean, sample std (ddof=1; NaN for fewer than 2) and count of the non-NaN values."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    mean = float(values.mean()) if values.size else math.nan
    std = float(values.std(ddof=1)) if values.size > 1 else math.nan
    return mean, std, int(values.size)
