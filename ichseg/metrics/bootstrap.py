"""Bootstrap intervals that resample patients, not slices, and the Student-t interval."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def cluster_resampler(
    rng: np.random.Generator, n: int, groups: np.ndarray | None
) -> Callable[[], np.ndarray]:
    """A function drawing one bootstrap sample of row indices: whole groups with replacement.

    Args:
        rng: random generator.
        n: number of rows.
        groups: ``(n,)`` cluster of each row (patient); None resamples rows.
    """
    if groups is None:
        return lambda: rng.integers(0, n, size=n)
    _, inverse = np.unique(groups, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    sizes = np.bincount(inverse)
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    n_groups = sizes.size

    def draw() -> np.ndarray:
        picked = rng.integers(0, n_groups, size=n_groups)
        counts = sizes[picked]
        # Expand each picked group into its member rows without a Python loop.
        offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        return order[np.repeat(starts[picked], counts) + offsets]

    return draw


def bootstrap_distribution(
    fn: Callable[[np.ndarray, np.ndarray], float],
    y_true: Any,
    y_prob: Any,
    groups: Any = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[np.ndarray, int]:
    """Metric values over bootstrap resamples, and how many resamples gave no value.

    Args:
        fn: ``fn(y_true, y_prob) -> float`` on row subsets (NaN when undefined).
        y_true: labels, rows = samples.
        y_prob: predictions, rows = samples.
        groups: ``(N,)`` cluster of each row (patient/study); whole clusters are resampled
            with replacement, because slices of one patient are correlated. None: rows.
        n_boot: number of resamples.
        seed: random seed.

    Returns:
        The finite values, and the number of resamples dropped because ``fn`` was NaN.
    """
    t = np.asarray(y_true)
    p = np.asarray(y_prob)
    if t.shape[0] != p.shape[0]:
        raise ValueError("y_true and y_prob need the same number of rows")
    g = None if groups is None else np.asarray(groups)
    if g is not None and g.shape != (t.shape[0],):
        raise ValueError(f"groups needs one entry per row, got {g.shape} for {t.shape[0]}")
    draw = cluster_resampler(np.random.default_rng(seed), t.shape[0], g)
    values = np.empty(n_boot)
    for i in range(n_boot):
        idx = draw()
        values[i] = fn(t[idx], p[idx])
    finite = values[~np.isnan(values)]
    return finite, int(n_boot - finite.size)


def bootstrap_ci(
    fn: Callable[[np.ndarray, np.ndarray], float],
    y_true: Any,
    y_prob: Any,
    groups: Any = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile bootstrap ``1 - alpha`` interval of ``fn``; cluster bootstrap with ``groups``.

    Args:
        fn: ``fn(y_true, y_prob) -> float``; resamples where it is NaN are skipped.
        y_true: labels, rows = samples.
        y_prob: predictions, rows = samples.
        groups: ``(N,)`` patient/study of each row, resampled as units; None resamples rows.
        n_boot: number of resamples.
        seed: random seed.
        alpha: 0.05 for a 95 % interval.

    Returns:
        ``(low, high)``; NaNs when no resample gave a value.
    """
    values, _ = bootstrap_distribution(fn, y_true, y_prob, groups=groups, n_boot=n_boot, seed=seed)
    return percentile_interval(values, alpha)


def percentile_interval(values: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    """The ``alpha/2`` and ``1 - alpha/2`` percentiles; NaNs for an empty array."""
    if values.size == 0:
        return math.nan, math.nan
    low, high = np.percentile(values, [100.0 * alpha / 2.0, 100.0 * (1.0 - alpha / 2.0)])
    return float(low), float(high)


def mean_ci(values: Sequence[float], alpha: float = 0.05) -> tuple[float, float, float]:
    """Mean and Student-t ``1 - alpha`` interval, e.g. of a metric over training seeds.

    ``mean +- t_{1-alpha/2, n-1} * sd / sqrt(n)``. A NaN value propagates, so a failed seed shows.
    This covers seed-to-seed variation only, not the sampling of test patients.

    Args:
        values: one value per seed (at least 2 for an interval).
        alpha: 0.05 for a 95 % interval.

    Returns:
        ``(mean, low, high)``; low/high NaN for fewer than two values.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(v.mean())
    if v.size < 2:
        return mean, math.nan, math.nan
    from scipy import stats  # here: scipy.stats takes ~1 s to import

    half = float(stats.t.ppf(1.0 - alpha / 2.0, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return mean, mean - half, mean + half
