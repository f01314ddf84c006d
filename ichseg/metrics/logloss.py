"""Log losses: the RSNA 2019 weighted multilabel log loss and the multiclass log loss."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ichseg.metrics._base import check_multiclass, check_pair
from ichseg.volume import RSNA_WEIGHTS

LOG_LOSS_EPS = 1e-15
"""Probability clipping of the RSNA leaderboard (scikit-learn's historical default)."""


def rsna_weighted_log_loss(
    y_true: Any,
    y_prob: Any,
    weights: Sequence[float] = RSNA_WEIGHTS,
    eps: float = LOG_LOSS_EPS,
) -> float:
    """RSNA 2019 metric: per sample the weighted mean over classes of binary cross-entropy.

    ``mean_i( sum_c w_c * bce_ic / sum_c w_c )`` with probabilities clipped to
    ``[eps, 1 - eps]``. Unknown labels (NaN) drop out of both sums of their sample.

    Args:
        y_true: ``(N, K)`` labels: 0, 1 or NaN.
        y_prob: ``(N, K)`` probabilities.
        weights: ``K`` class weights (RSNA: 2 for ``any``, 1 for each subtype).
        eps: clipping that keeps a confident mistake finite.
    """
    t, p = check_pair(y_true, y_prob)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (t.shape[1],):
        raise ValueError(f"need {t.shape[1]} weights, got {w.shape}")
    if t.shape[0] == 0:
        return float("nan")
    p = np.clip(p, eps, 1.0 - eps)
    known = ~np.isnan(t)
    t0 = np.where(known, t, 0.0)
    bce = np.where(known, -(t0 * np.log(p) + (1.0 - t0) * np.log1p(-p)), 0.0)
    weight_sum = known @ w
    rows = weight_sum > 0
    if not rows.any():
        return float("nan")
    return float(np.mean((bce @ w)[rows] / weight_sum[rows]))


def multiclass_log_loss(y_true: Any, y_prob: Any, eps: float = LOG_LOSS_EPS) -> float:
    """Mean ``-log p(true class)`` with probabilities clipped to ``[eps, 1]``.

    Args:
        y_true: ``(N,)`` class indices.
        y_prob: ``(N, K)`` class probabilities (rows summing to one).
        eps: clipping that keeps a confident mistake finite.
    """
    y, p = check_multiclass(y_true, y_prob)
    if y.size == 0:
        return float("nan")
    return float(-np.mean(np.log(np.clip(p[np.arange(y.size), y], eps, 1.0))))
