"""Operating thresholds (chosen on validation data) and the metrics they imply."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ichseg.metrics._base import as_2d, check_pair, divide, has_both_labels, nanmean, to_jsonable
from ichseg.metrics.auroc import cumulative_counts
from ichseg.options import look_up_option

THRESHOLD_RULES: tuple[str, ...] = ("youden", "f1")


def choose_thresholds(y_true: Any, y_prob: Any, rule: str = "youden") -> np.ndarray:
    """Per-class operating thresholds, to be chosen on validation data and reused on test data.

    Args:
        y_true: ``(N, K)`` labels: 0, 1 or NaN (unknown, left out).
        y_prob: ``(N, K)`` probabilities.
        rule: ``"youden"`` (max sensitivity + specificity - 1) or ``"f1"`` (max F1).

    Returns:
        ``(K,)`` thresholds (predict positive when ``prob >= threshold``); NaN for a class that
        lacks either label, where no rule is defined (callers decide what to do, visibly).
    """
    look_up_option("threshold rule", rule, THRESHOLD_RULES, ValueError)
    t, p = check_pair(y_true, y_prob)
    out = np.full(t.shape[1], np.nan)
    for k in range(t.shape[1]):
        if not has_both_labels(t[:, k]):
            continue
        known = ~np.isnan(t[:, k])
        tk, pk = t[known, k], p[known, k]
        tp, fp, thr = cumulative_counts(tk, pk)
        pos = tk.sum()
        neg = tk.size - pos
        if rule == "youden":
            score = tp / pos - fp / neg
        else:
            score = 2.0 * tp / (2.0 * tp + fp + (pos - tp))
        out[k] = thr[int(np.argmax(score))]  # first maximum = the strictest such threshold
    return out


def confusion_matrices(y_true: Any, y_pred: Any) -> np.ndarray:
    """One 2x2 matrix per class, ``[[tn, fp], [fn, tp]]`` (rows: truth); NaN labels left out.

    Args:
        y_true: ``(N, K)`` labels.
        y_pred: ``(N, K)`` 0/1 predictions.

    Returns:
        ``(K, 2, 2)`` integer counts.
    """
    t = as_2d(y_true)
    known = ~np.isnan(t)
    truth = np.where(known, t, 0).astype(bool)
    y = as_2d(y_pred).astype(bool)
    tp = (truth & y & known).sum(0)
    fp = (~truth & y & known).sum(0)
    fn = (truth & ~y & known).sum(0)
    tn = (~truth & ~y & known).sum(0)
    return np.stack([np.stack([tn, fp], -1), np.stack([fn, tp], -1)], 1).astype(np.int64)


def threshold_metrics(y_true: Any, y_prob: Any, thresholds: Any) -> dict[str, np.ndarray]:
    """Sensitivity, specificity, precision, F1 and accuracy per class at given thresholds.

    Args:
        y_true: ``(N, K)`` labels.
        y_prob: ``(N, K)`` probabilities.
        thresholds: scalar or ``(K,)``; positive when ``prob >= threshold``; a NaN threshold
            gives NaN metrics for its class.

    Returns:
        Arrays of shape ``(K,)`` (NaN where undefined) and ``confusion`` ``(K, 2, 2)``.
    """
    t, p = check_pair(y_true, y_prob)
    thr = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (t.shape[1],)).copy()
    undefined = np.isnan(thr)
    cm = confusion_matrices(t, p >= np.where(undefined, np.inf, thr))
    tn, fp, fn, tp = cm[:, 0, 0], cm[:, 0, 1], cm[:, 1, 0], cm[:, 1, 1]
    out = {
        "sensitivity": divide(tp, tp + fn),
        "specificity": divide(tn, tn + fp),
        "precision": divide(tp, tp + fp),
        "f1": divide(2 * tp, 2 * tp + fp + fn),
        "accuracy": divide(tp + tn, cm.sum(axis=(1, 2))),
    }
    for values in out.values():
        values[undefined] = np.nan
    return {"threshold": thr, **out, "confusion": cm}


def classification_report(
    y_true: Any, y_prob: Any, thresholds: Any, class_names: Sequence[str]
) -> dict[str, dict[str, float | int | None]]:
    """Per-class precision/recall/specificity/F1/accuracy/support plus their macro average.

    Args:
        y_true: ``(N, K)`` labels.
        y_prob: ``(N, K)`` probabilities.
        thresholds: scalar or ``(K,)`` thresholds.
        class_names: ``K`` names.
    """
    m = threshold_metrics(y_true, y_prob, thresholds)
    support = np.nansum(as_2d(y_true), axis=0).astype(int)
    keys = ("precision", "sensitivity", "specificity", "f1", "accuracy")
    report: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(class_names):
        row = {("recall" if key == "sensitivity" else key): float(m[key][k]) for key in keys}
        report[name] = {**row, "threshold": float(m["threshold"][k]), "support": int(support[k])}
    macro = {("recall" if key == "sensitivity" else key): nanmean(m[key]) for key in keys}
    report["macro avg"] = {**macro, "support": int(support.sum())}
    return to_jsonable(report)
