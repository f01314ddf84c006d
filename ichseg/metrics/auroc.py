"""AUROC, average precision and ROC curves, per class.

There is one AUROC in ichseg, :func:`auroc`: the Mann-Whitney rank formula (ties count one
half), vectorised over columns so the bootstrap can call it thousands of times. It equals
torchmetrics' ``binary_auroc`` (the tests check that); average precision comes from torchmetrics.
"""

from __future__ import annotations

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
