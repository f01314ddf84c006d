"""From slices to series: one aggregation rule for evaluation and prediction."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from ichseg.errors import ConfigError
from ichseg.metrics._base import as_2d

AGGREGATION_RULES = "max, mean, topK (mean of the K highest slices, K >= 1, e.g. top3)"


def check_aggregation(rule: str) -> str:
    """``rule`` if it is a valid series aggregation rule.

    Raises:
        ConfigError: an unknown rule, naming the valid ones.
    """
    if rule in ("max", "mean"):
        return rule
    match = re.fullmatch(r"top(\d+)", rule)
    if match and int(match.group(1)) >= 1:
        return rule
    raise ConfigError(f"unknown aggregation {rule!r}; valid: {AGGREGATION_RULES}")


def aggregate_probabilities(probabilities: Any, rule: str = "max") -> np.ndarray:
    """One probability vector for a series from its slices ``(Z, K)``.

    Args:
        probabilities: slice probabilities of one series.
        rule: ``max``, ``mean`` or ``topK`` (mean of the K highest per class).
    """
    p = as_2d(probabilities)
    rule = check_aggregation(rule)
    if rule == "max":
        return p.max(axis=0)
    if rule == "mean":
        return p.mean(axis=0)
    top = np.sort(p, axis=0)[-int(rule[3:]) :]
    return top.mean(axis=0)


def aggregate_by_series(
    y_true: Any, y_prob: Any, series_ids: Any, rule: str = "max"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Collapse slices to series: labels by max (NaN-aware), probabilities by ``rule``.

    Args:
        y_true: ``(N, K)`` slice labels (0, 1 or NaN).
        y_prob: ``(N, K)`` slice probabilities.
        series_ids: ``(N,)`` series of each slice.
        rule: see :func:`aggregate_probabilities`.

    Returns:
        ``(ids, y_true_series, y_prob_series)`` with series in sorted id order; a series label
        is 1 when any slice is 1, else 0 when any slice is known, else NaN.
    """
    t, p = as_2d(y_true), as_2d(y_prob)
    ids = np.asarray(series_ids)
    if ids.shape != (t.shape[0],):
        raise ValueError(f"series_ids needs one entry per row, got {ids.shape} for {t.shape[0]}")
    check_aggregation(rule)
    uniq, inverse = np.unique(ids, return_inverse=True)
    t_series = np.full((uniq.size, t.shape[1]), np.nan)
    p_series = np.empty((uniq.size, p.shape[1]))
    order = np.argsort(inverse, kind="stable")
    bounds = np.r_[0, np.cumsum(np.bincount(inverse, minlength=uniq.size))]
    for i in range(uniq.size):
        rows = order[bounds[i] : bounds[i + 1]]
        block = t[rows]
        known = ~np.isnan(block)
        any_known = known.any(axis=0)
        t_series[i, any_known] = np.nanmax(block[:, any_known], axis=0)
        p_series[i] = aggregate_probabilities(p[rows], rule)
    return uniq, t_series, p_series
