"""AUROC, average precision and ROC curves, per class.

There is one AUROC in ichseg, :func:`auroc`: the Mann-Whitney rank formula (ties count one
half), vectorised over columns so the bootstrap can call it thousands of times. It equals
torchmetrics' ``binary_auroc`` (the tests check that); average precision comes from torchmetrics.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ichseg.metrics._base import as_2d, check_pair, divide, has_both_labels


def auroc(y_true: Any, y_score: Any) -> np.ndarray:
    """AUROC per column; NaN where a column lacks either label. NaN labels are left out.

    Args:
        y_true: ``(N, K)`` or ``(N,)`` labels: 0, 1 or NaN (unknown).
        y_score: matching scores.

    Returns:
        ``(K,)`` AUROCs.
    """
    t = as_2d(y_true)
    s = as_2d(y_score)
    if t.shape != s.shape:
        raise ValueError(f"y_true {t.shape} and y_score {s.shape} differ in shape")
    unknown = np.isnan(t)
    if not unknown.any():
        return _rank_auroc(t, s)
    out = np.full(t.shape[1], np.nan)
    for k in range(t.shape[1]):
        known = ~unknown[:, k]
        out[k] = _rank_auroc(t[known, k : k + 1], s[known, k : k + 1])[0]
    return out


def _rank_auroc(t: np.ndarray, s: np.ndarray) -> np.ndarray:
    if t.shape[0] == 0:
        return np.full(t.shape[1], np.nan)
    from scipy.stats import rankdata  # here: scipy.stats takes ~1 s to import

    ranks = rankdata(s, axis=0)  # average ranks over ties
    n_pos = t.sum(axis=0)
    n_neg = t.shape[0] - n_pos
    rank_sum = (ranks * t).sum(axis=0)
    return divide(rank_sum - n_pos * (n_pos + 1) / 2.0, n_pos * n_neg)


def average_precision(y_true: Any, y_prob: Any) -> np.ndarray:
    """Average precision per column (torchmetrics); NaN where a column lacks either label.

    Args:
        y_true: ``(N, K)`` or ``(N,)`` labels: 0, 1 or NaN (unknown).
        y_prob: matching scores.
    """
    import torch
    from torchmetrics.functional.classification import binary_average_precision

    t, p = check_pair(y_true, y_prob)
    out = np.full(t.shape[1], np.nan)
    for k in range(t.shape[1]):
        known = ~np.isnan(t[:, k])
        if has_both_labels(t[:, k]):
            scores = torch.from_numpy(p[known, k])
            out[k] = float(binary_average_precision(scores, torch.from_numpy(t[known, k]).long()))
    return out


def cumulative_counts(t: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TP and FP counts at each distinct score used as threshold (``>=``), descending."""
    order = np.argsort(-s, kind="mergesort")
    s_sorted, t_sorted = s[order], t[order]
    tp = np.cumsum(t_sorted)
    fp = np.cumsum(1.0 - t_sorted)
    # Only the last position of each run of equal scores is a reachable operating point.
    last = (
        np.r_[np.nonzero(np.diff(s_sorted))[0], s_sorted.size - 1] if s.size else np.array([], int)
    )
    return tp[last], fp[last], s_sorted[last]


def roc_curve(y_true: Any, y_score: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points of one class, from the strictest threshold down; NaN labels left out.

    Args:
        y_true: ``(N,)`` labels.
        y_score: ``(N,)`` scores.

    Returns:
        ``(fpr, tpr, thresholds)``; the first point is ``(0, 0)`` at threshold ``inf``.
    """
    t = np.asarray(y_true, dtype=np.float64).ravel()
    s = np.asarray(y_score, dtype=np.float64).ravel()
    known = ~np.isnan(t)
    t, s = t[known], s[known]
    tp, fp, thr = cumulative_counts(t, s)
    return (
        np.r_[0.0, divide(fp, t.size - t.sum())],
        np.r_[0.0, divide(tp, t.sum())],
        np.r_[np.inf, thr],
    )


SCORE_INTERVAL = "score"
"""The ``ci_method`` of an AUROC interval widened by :func:`auroc_interval_at_bound`."""


def score_mark(method: str | None) -> str:
    """``" †"`` after an interval widened by the score interval (``method`` is
    :data:`SCORE_INTERVAL`), else nothing: the mark of tables and figures."""
    return " †" if method == SCORE_INTERVAL else ""


def auroc_score_interval(
    value: float, n_positive: int, n_negative: int, alpha: float = 0.05
) -> tuple[float, float]:
    """A ``1 - alpha`` interval for an AUROC that stays honest at 0 and 1.

    The score-type interval of Newcombe (Statistics in Medicine 25:559-573, 2006): the AUROCs
    ``theta`` with ``|value - theta| <= z * sqrt(V(theta))``, where ``V`` is Hanley and
    McNeil's variance written in ``theta`` alone, with the two group sizes replaced by their
    mean ``N = (n_positive + n_negative) / 2``::

        V(theta) = theta (1 - theta) / (n_pos n_neg)
                   * (1 + (N - 1) (1 - theta) / (2 - theta) + (N - 1) theta / (1 + theta))

    Because ``V`` is evaluated at the bound and not at the estimate, the interval keeps a width
    where the estimate is 0 or 1, at which a bootstrap or a Wald interval collapses to a point
    (every resample of a perfectly separated set is perfectly separated). It assumes
    independent cases: pass counts of independent units (patients or series).

    Args:
        value: the AUROC.
        n_positive: independent positive cases.
        n_negative: independent negative cases.
        alpha: 0.05 for a 95 % interval.

    Returns:
        ``(low, high)``; NaNs when ``value`` is NaN or a group is empty.
    """
    from scipy.optimize import brentq
    from scipy.stats import norm

    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha lies between 0 and 1, got {alpha}")
    value = float(value)  # a numpy float32 1.0 would stay 1.0 below, bracketing no root
    if not math.isfinite(value) or n_positive < 1 or n_negative < 1:
        return math.nan, math.nan
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"an AUROC lies in [0, 1], got {value}")
    z = float(norm.ppf(1.0 - alpha / 2.0))
    mean_size = (n_positive + n_negative) / 2.0

    def beyond(theta: float) -> float:
        """How far ``theta`` lies outside the acceptance region (negative: inside)."""
        variance = (
            theta
            * (1.0 - theta)
            / (n_positive * n_negative)
            * (
                1.0
                + (mean_size - 1.0) * (1.0 - theta) / (2.0 - theta)
                + (mean_size - 1.0) * theta / (1.0 + theta)
            )
        )
        return abs(value - theta) - z * math.sqrt(variance)

    # beyond() is negative at the estimate and just inside it (the variance there is positive,
    # and at 0 or 1 its square root falls more slowly than the distance), and positive at a
    # bound far enough away, where the limit is the root between them.
    tiny = 1e-12
    inside = min(max(value, tiny), 1.0 - tiny)
    low = 0.0 if beyond(0.0) <= 0.0 else brentq(beyond, 0.0, inside)
    high = 1.0 if beyond(1.0) <= 0.0 else brentq(beyond, inside, 1.0)
    return float(low), float(high)


def auroc_interval_at_bound(
    value: float,
    bootstrap: tuple[float, float],
    labels: Any,
    groups: Any = None,
    alpha: float = 0.05,
) -> tuple[float, float] | None:
    """Where a bootstrap interval of an AUROC reaches 0 or 1: its union with the score interval
    (:func:`auroc_score_interval`); None where it does not (the bootstrap interval stands).

    Near the bounds a percentile bootstrap is unreliable: a perfectly separated test set stays
    so in every resample, so its interval is the point ``[1, 1]``, and one a pair short of it
    gets an interval nearly as narrow. The union keeps the bootstrap's account of clustering
    and adds the score interval's width, so that a perfect AUROC is not shown as more certain
    than a nearly perfect one.

    The score interval counts independent units: patients (``groups``) with a positive row, and
    patients with negative rows only; where every patient has a positive row, those with a
    negative row. Without ``groups``, rows.

    Args:
        value: the AUROC (NaN: no interval).
        bootstrap: its bootstrap ``(low, high)``.
        labels: ``(N,)`` 0/1 labels (NaN: unknown, left out).
        groups: ``(N,)`` patient of each row, or None.
        alpha: 0.05 for a 95 % interval.
    """
    low, high = (float(b) for b in bootstrap)
    value = float(value)
    if not (math.isfinite(value) and math.isfinite(low) and math.isfinite(high)):
        return None
    if 0.0 < low and high < 1.0:
        return None
    y = np.asarray(labels, dtype=np.float64).ravel()
    known = ~np.isnan(y)
    units = np.arange(y.size) if groups is None else np.asarray(groups).ravel()
    positive = np.unique(units[known & (y == 1)])
    with_negative = np.unique(units[known & (y == 0)])
    negative_only = np.setdiff1d(with_negative, positive)
    negatives = negative_only.size if negative_only.size else with_negative.size
    score_low, score_high = auroc_score_interval(value, positive.size, negatives, alpha)
    if not math.isfinite(score_low):
        return None
    return min(low, score_low), max(high, score_high)
