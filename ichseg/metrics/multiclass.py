"""Multiclass (mutually exclusive classes) metrics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ichseg.metrics._base import check_multiclass, divide, nanmean
from ichseg.metrics.auroc import auroc
from ichseg.metrics.logloss import multiclass_log_loss


def multiclass_confusion(y_true: Any, y_pred: Any, num_classes: int) -> np.ndarray:
    """``(K, K)`` counts, rows = truth, columns = prediction.

    Args:
        y_true: ``(N,)`` class indices.
        y_pred: ``(N,)`` predicted class indices.
        num_classes: ``K``.
    """
    flat = np.asarray(y_true, np.int64) * num_classes + np.asarray(y_pred, np.int64)
    return np.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def multiclass_metrics(
    y_true: Any, y_prob: Any, class_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Accuracy, one-vs-rest AUROC, confusion matrix, per-class precision/recall/F1, log loss.

    Args:
        y_true: ``(N,)`` class indices.
        y_prob: ``(N, K)`` class probabilities; the prediction is the argmax.
        class_names: ``K`` names (default ``"0"``, ``"1"``, ...).

    Returns:
        Numpy-valued dict; :func:`ichseg.metrics.evaluation.evaluate_multiclass` adds CIs.
    """
    y, p = check_multiclass(y_true, y_prob)
    k = p.shape[1]
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for {k} columns")
    onehot = np.eye(k)[y]
    cm = multiclass_confusion(y, p.argmax(1), k)
    tp = np.diag(cm)
    aucs = auroc(onehot, p)
    return {
        "class_names": names,
        "accuracy": float(tp.sum() / max(cm.sum(), 1)),
        "macro_auroc": nanmean(aucs),
        "log_loss": multiclass_log_loss(y, p),
        "auroc": aucs,
        "precision": divide(tp, cm.sum(0)),
        "recall": divide(tp, cm.sum(1)),
        "f1": divide(2 * tp, cm.sum(0) + cm.sum(1)),
        "support": cm.sum(1),
        "confusion": cm,
    }
