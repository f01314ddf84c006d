"""Evaluation metrics as pure functions over numpy arrays, with honest uncertainty.

Conventions: multilabel ``y_true``/``y_prob`` are ``(N, K)`` with columns in ``SUBTYPES`` order;
a class is predicted positive when ``prob >= threshold``. Metrics that are undefined on the data
(AUROC of a class with one label value, sensitivity without positives, ...) are NaN, never an
exception; the ``evaluate_*`` dicts turn NaN into ``None`` so that they are strict JSON.

Point estimates of AUROC/AP use torchmetrics; the bootstrap uses :func:`fast_auroc`, a rank
formula that gives the same value, because 1000 resamples through torchmetrics are too slow.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from scipy import stats
from torchmetrics.functional.classification import binary_auroc, binary_average_precision

from ichseg.volume import SUBTYPES

RSNA_WEIGHTS: tuple[float, ...] = (2.0, 1.0, 1.0, 1.0, 1.0, 1.0)
"""RSNA 2019 class weights for ``SUBTYPES``: ``any`` counts twice."""


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _as_2d(array: Any, dtype: Any = np.float64) -> np.ndarray:
    out = np.asarray(array, dtype=dtype)
    return out[:, None] if out.ndim == 1 else out


def _check_pair(y_true: Any, y_prob: Any) -> tuple[np.ndarray, np.ndarray]:
    t = _as_2d(y_true)
    p = _as_2d(y_prob)
    if t.shape != p.shape or t.ndim != 2:
        raise ValueError(f"y_true {t.shape} and y_prob {p.shape} must both be (N, K)")
    if not np.isin(t, (0.0, 1.0)).all():
        raise ValueError("y_true must contain only 0 and 1")
    if not np.isfinite(p).all():
        raise ValueError("y_prob must be finite")
    return t, p


def _div(num: Any, den: Any) -> np.ndarray:
    """Elementwise ``num / den`` with NaN where ``den == 0``."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def nanmean(values: Any) -> float:
    """Mean over the non-NaN entries; NaN (without a warning) when there are none.

    Args:
        values: numbers, possibly NaN.
    """
    arr = np.asarray(values, dtype=np.float64)
    finite = arr[~np.isnan(arr)]
    return float(finite.mean()) if finite.size else math.nan


def _single_valued(column: np.ndarray) -> bool:
    return column.size == 0 or column.min() == column.max()


# ---------------------------------------------------------------------------------------------
# Probabilistic scores
# ---------------------------------------------------------------------------------------------


def rsna_weighted_log_loss(
    y_true: Any,
    y_prob: Any,
    weights: Sequence[float] = RSNA_WEIGHTS,
    eps: float = 1e-7,
) -> float:
    """RSNA 2019 metric: per sample the weighted mean over classes of binary cross-entropy.

    ``mean_i( sum_c w_c * bce_ic / sum_c w_c )`` with probabilities clipped to ``[eps, 1 - eps]``.

    Args:
        y_true: ``(N, K)`` 0/1 labels.
        y_prob: ``(N, K)`` probabilities.
        weights: ``K`` class weights (RSNA: 2 for ``any``, 1 for each subtype).
        eps: clipping that keeps a confident mistake finite.
    """
    t, p = _check_pair(y_true, y_prob)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (t.shape[1],):
        raise ValueError(f"need {t.shape[1]} weights, got {w.shape}")
    p = np.clip(p, eps, 1.0 - eps)
    bce = -(t * np.log(p) + (1.0 - t) * np.log1p(-p))
    return float(np.mean(bce @ w / w.sum()))


def _per_column(metric, y_true: Any, y_prob: Any) -> np.ndarray:
    """``metric(scores, labels)`` per column; NaN where a column has a single label value."""
    t, p = _check_pair(y_true, y_prob)
    out = np.full(t.shape[1], np.nan)
    for k in range(t.shape[1]):
        if not _single_valued(t[:, k]):
            out[k] = float(metric(torch.from_numpy(p[:, k]), torch.from_numpy(t[:, k]).long()))
    return out


def per_class_auroc(y_true: Any, y_prob: Any) -> np.ndarray:
    """AUROC per column (torchmetrics ``binary_auroc``); NaN where a column has one label value.

    Args:
        y_true: ``(N, K)`` or ``(N,)`` 0/1 labels.
        y_prob: matching scores.
    """
    return _per_column(binary_auroc, y_true, y_prob)


def per_class_average_precision(y_true: Any, y_prob: Any) -> np.ndarray:
    """Average precision per column (torchmetrics); NaN where a column has one label value.

    Args:
        y_true: ``(N, K)`` or ``(N,)`` 0/1 labels.
        y_prob: matching scores.
    """
    return _per_column(binary_average_precision, y_true, y_prob)


def fast_auroc(y_true: Any, y_score: Any) -> np.ndarray:
    """AUROC per column from the Mann-Whitney rank sum (ties count one half).

    Equals :func:`per_class_auroc` and is vectorised over columns; used inside the bootstrap.

    Args:
        y_true: ``(N, K)`` or ``(N,)`` 0/1 labels.
        y_score: matching scores.

    Returns:
        ``(K,)`` AUROCs, NaN where a column has one label value.
    """
    t = _as_2d(y_true)
    s = _as_2d(y_score)
    ranks = stats.rankdata(s, axis=0)  # average ranks over ties
    n_pos = t.sum(axis=0)
    n_neg = t.shape[0] - n_pos
    rank_sum = (ranks * t).sum(axis=0)
    return _div(rank_sum - n_pos * (n_pos + 1) / 2.0, n_pos * n_neg)


def roc_curve(y_true: Any, y_score: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points of one class, from the strictest threshold down.

    Args:
        y_true: ``(N,)`` 0/1 labels.
        y_score: ``(N,)`` scores.

    Returns:
        ``(fpr, tpr, thresholds)``; the first point is ``(0, 0)`` at threshold ``inf``.
    """
    t = np.asarray(y_true, dtype=np.float64).ravel()
    s = np.asarray(y_score, dtype=np.float64).ravel()
    tp, fp, thr = _cumulative_counts(t, s)
    return (
        np.r_[0.0, _div(fp, t.size - t.sum())],
        np.r_[0.0, _div(tp, t.sum())],
        np.r_[np.inf, thr],
    )


def _cumulative_counts(t: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


# ---------------------------------------------------------------------------------------------
# Thresholded metrics
# ---------------------------------------------------------------------------------------------


def choose_thresholds(y_true: Any, y_prob: Any, rule: str = "youden") -> np.ndarray:
    """Per-class operating thresholds, to be chosen on validation data and reused on test data.

    Args:
        y_true: ``(N, K)`` 0/1 labels.
        y_prob: ``(N, K)`` probabilities.
        rule: ``"youden"`` (max sensitivity + specificity - 1) or ``"f1"`` (max F1).

    Returns:
        ``(K,)`` thresholds (predict positive when ``prob >= threshold``); 0.5 for a class with
        one label value, where no rule is defined.
    """
    if rule not in ("youden", "f1"):
        raise ValueError(f"unknown threshold rule {rule!r}; valid: youden, f1")
    t, p = _check_pair(y_true, y_prob)
    out = np.full(t.shape[1], 0.5)
    for k in range(t.shape[1]):
        if _single_valued(t[:, k]):
            continue
        tp, fp, thr = _cumulative_counts(t[:, k], p[:, k])
        pos = t[:, k].sum()
        neg = t.shape[0] - pos
        if rule == "youden":
            score = tp / pos - fp / neg
        else:
            score = 2.0 * tp / (2.0 * tp + fp + (pos - tp))
        out[k] = thr[int(np.argmax(score))]  # first maximum = the strictest such threshold
    return out


def confusion_matrices(y_true: Any, y_pred: Any) -> np.ndarray:
    """One 2x2 matrix per class, ``[[tn, fp], [fn, tp]]`` (rows: truth, columns: prediction).

    Args:
        y_true: ``(N, K)`` 0/1 labels.
        y_pred: ``(N, K)`` 0/1 predictions.

    Returns:
        ``(K, 2, 2)`` integer counts.
    """
    t = _as_2d(y_true).astype(bool)
    y = _as_2d(y_pred).astype(bool)
    tp = (t & y).sum(0)
    fp = (~t & y).sum(0)
    fn = (t & ~y).sum(0)
    tn = (~t & ~y).sum(0)
    return np.stack([np.stack([tn, fp], -1), np.stack([fn, tp], -1)], 1).astype(np.int64)


def threshold_metrics(y_true: Any, y_prob: Any, thresholds: Any) -> dict[str, np.ndarray]:
    """Sensitivity, specificity, precision, F1 and accuracy per class at given thresholds.

    Args:
        y_true: ``(N, K)`` 0/1 labels.
        y_prob: ``(N, K)`` probabilities.
        thresholds: scalar or ``(K,)``; positive when ``prob >= threshold``.

    Returns:
        Arrays of shape ``(K,)`` (NaN where undefined) and ``confusion`` ``(K, 2, 2)``.
    """
    t, p = _check_pair(y_true, y_prob)
    thr = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (t.shape[1],))
    cm = confusion_matrices(t, p >= thr)
    tn, fp, fn, tp = cm[:, 0, 0], cm[:, 0, 1], cm[:, 1, 0], cm[:, 1, 1]
    return {
        "threshold": thr.copy(),
        "sensitivity": _div(tp, tp + fn),
        "specificity": _div(tn, tn + fp),
        "precision": _div(tp, tp + fp),
        "f1": _div(2 * tp, 2 * tp + fp + fn),
        "accuracy": _div(tp + tn, cm.sum(axis=(1, 2))),
        "confusion": cm,
    }


def classification_report(
    y_true: Any, y_prob: Any, thresholds: Any, class_names: Sequence[str] = SUBTYPES
) -> dict[str, dict[str, float | int | None]]:
    """Per-class precision/recall/specificity/F1/accuracy/support plus their macro average.

    Args:
        y_true: ``(N, K)`` 0/1 labels.
        y_prob: ``(N, K)`` probabilities.
        thresholds: scalar or ``(K,)`` thresholds.
        class_names: ``K`` names.
    """
    m = threshold_metrics(y_true, y_prob, thresholds)
    support = _as_2d(y_true).sum(0).astype(int)
    keys = ("precision", "sensitivity", "specificity", "f1", "accuracy")
    report: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(class_names):
        row = {("recall" if key == "sensitivity" else key): float(m[key][k]) for key in keys}
        report[name] = {**row, "threshold": float(m["threshold"][k]), "support": int(support[k])}
    macro = {("recall" if key == "sensitivity" else key): nanmean(m[key]) for key in keys}
    report["macro avg"] = {**macro, "support": int(support.sum())}
    return to_jsonable(report)


# ---------------------------------------------------------------------------------------------
# Series level
# ---------------------------------------------------------------------------------------------


def aggregate_by_series(
    y_true: Any, y_prob: Any, series_ids: Any, reduce: str = "max"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Collapse slices to series: labels by max, probabilities by ``reduce``.

    Args:
        y_true: ``(N, K)`` slice labels.
        y_prob: ``(N, K)`` slice probabilities.
        series_ids: ``(N,)`` series of each slice.
        reduce: ``"max"`` (a series is positive when any slice is) or ``"mean"``.

    Returns:
        ``(ids, y_true_series, y_prob_series)`` with series in sorted id order.
    """
    t, p = _as_2d(y_true), _as_2d(y_prob)
    ids = np.asarray(series_ids)
    if ids.shape != (t.shape[0],):
        raise ValueError(f"series_ids needs one entry per row, got {ids.shape} for {t.shape[0]}")
    uniq, inverse = np.unique(ids, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    starts = np.r_[0, np.cumsum(np.bincount(inverse))[:-1]]
    t_series = np.maximum.reduceat(t[order], starts, axis=0)
    if reduce == "max":
        p_series = np.maximum.reduceat(p[order], starts, axis=0)
    elif reduce == "mean":
        p_series = np.add.reduceat(p[order], starts, axis=0) / np.bincount(inverse)[:, None]
    else:
        raise ValueError(f"unknown reduce {reduce!r}; valid: max, mean")
    return uniq, t_series, p_series


def series_auroc(
    y_true: Any, y_prob: Any, series_ids: Any, any_index: int | None = 0
) -> dict[str, float]:
    """Series-level AUROC after max-aggregation of slices.

    Args:
        y_true: ``(N, K)`` slice labels.
        y_prob: ``(N, K)`` slice probabilities.
        series_ids: ``(N,)`` series of each slice.
        any_index: column of ``any`` (None when there is none).

    Returns:
        ``{"auroc_any", "macro_auroc", "n_series"}`` (AUROCs NaN where undefined).
    """
    ids, t, p = aggregate_by_series(y_true, y_prob, series_ids, reduce="max")
    aucs = per_class_auroc(t, p)
    return {
        "auroc_any": float(aucs[any_index]) if any_index is not None else math.nan,
        "macro_auroc": nanmean(aucs),
        "n_series": int(ids.size),
    }


# ---------------------------------------------------------------------------------------------
# Multiclass
# ---------------------------------------------------------------------------------------------


def _check_multiclass(y_true: Any, y_prob: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(y_prob, dtype=np.float64)
    if p.ndim != 2 or y.shape != (p.shape[0],):
        raise ValueError(f"y_true {y.shape} must be (N,) and y_prob {p.shape} (N, K)")
    if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"y_true must hold integer classes in [0, {p.shape[1]})")
    if not np.isfinite(p).all():
        raise ValueError("y_prob must be finite")
    return y.astype(np.int64), p


def multiclass_log_loss(y_true: Any, y_prob: Any, eps: float = 1e-7) -> float:
    """Mean ``-log p(true class)`` with probabilities clipped to ``[eps, 1]``.

    Args:
        y_true: ``(N,)`` class indices.
        y_prob: ``(N, K)`` class probabilities (rows summing to one).
        eps: clipping that keeps a confident mistake finite.
    """
    y, p = _check_multiclass(y_true, y_prob)
    return float(-np.mean(np.log(np.clip(p[np.arange(y.size), y], eps, 1.0))))


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
        Numpy-valued dict; :func:`evaluate_multiclass` adds CIs and makes it JSON.
    """
    y, p = _check_multiclass(y_true, y_prob)
    k = p.shape[1]
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for {k} columns")
    onehot = np.eye(k)[y]
    cm = multiclass_confusion(y, p.argmax(1), k)
    tp = np.diag(cm)
    aucs = per_class_auroc(onehot, p)
    return {
        "class_names": names,
        "accuracy": float(tp.sum() / max(cm.sum(), 1)),
        "macro_auroc": nanmean(aucs),
        "log_loss": multiclass_log_loss(y, p),
        "auroc": aucs,
        "precision": _div(tp, cm.sum(0)),
        "recall": _div(tp, cm.sum(1)),
        "f1": _div(2 * tp, cm.sum(0) + cm.sum(1)),
        "support": cm.sum(1),
        "confusion": cm,
    }


# ---------------------------------------------------------------------------------------------
# Uncertainty
# ---------------------------------------------------------------------------------------------


def _resample_indices(
    rng: np.random.Generator, n: int, groups: np.ndarray | None
) -> Callable[[], np.ndarray]:
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
) -> np.ndarray:
    """Metric values over bootstrap resamples, NaN resamples dropped.

    Args:
        fn: ``fn(y_true, y_prob) -> float`` on row subsets.
        y_true: labels, rows = samples.
        y_prob: predictions, rows = samples.
        groups: ``(N,)`` cluster of each row (patient/study); whole clusters are resampled
            with replacement, because slices of one patient are correlated. None: rows.
        n_boot: number of resamples.
        seed: random seed.
    """
    t = np.asarray(y_true)
    p = np.asarray(y_prob)
    if t.shape[0] != p.shape[0]:
        raise ValueError("y_true and y_prob need the same number of rows")
    g = None if groups is None else np.asarray(groups)
    if g is not None and g.shape != (t.shape[0],):
        raise ValueError(f"groups needs one entry per row, got {g.shape} for {t.shape[0]}")
    draw = _resample_indices(np.random.default_rng(seed), t.shape[0], g)
    values = np.empty(n_boot)
    for i in range(n_boot):
        idx = draw()
        values[i] = fn(t[idx], p[idx])
    return values[~np.isnan(values)]


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
    values = bootstrap_distribution(fn, y_true, y_prob, groups=groups, n_boot=n_boot, seed=seed)
    if values.size == 0:
        return math.nan, math.nan
    low, high = np.percentile(values, [100.0 * alpha / 2.0, 100.0 * (1.0 - alpha / 2.0)])
    return float(low), float(high)


def mean_ci(values: Sequence[float], alpha: float = 0.05) -> tuple[float, float, float]:
    """Mean and Student-t ``1 - alpha`` interval, e.g. of a metric over training seeds.

    ``mean +- t_{1-alpha/2, n-1} * sd / sqrt(n)``. A NaN value propagates, so a failed seed shows.

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
    half = float(stats.t.ppf(1.0 - alpha / 2.0, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return mean, mean - half, mean + half


# ---------------------------------------------------------------------------------------------
# Full evaluations
# ---------------------------------------------------------------------------------------------


def to_jsonable(obj: Any) -> Any:
    """Plain Python types; NaN and infinities become None (strict JSON has neither).

    Args:
        obj: nested dicts/lists/tuples of numbers, numpy scalars and arrays.
    """
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.bool_ | bool):
        return bool(obj)
    if isinstance(obj, np.integer | int):
        return int(obj)
    if isinstance(obj, np.floating | float):
        return float(obj) if math.isfinite(obj) else None
    return obj


def _bootstrap_setup(
    n: int, groups: Any, series_ids: Any
) -> tuple[np.ndarray | None, dict[str, Any]]:
    if groups is not None:
        g, unit = np.asarray(groups), "group"
    elif series_ids is not None:
        # Slices of a series are correlated; resampling them one by one would understate spread.
        g, unit = np.asarray(series_ids), "series"
    else:
        g, unit = None, "row"
    n_units = n if g is None else int(np.unique(g).size)
    return g, {"unit": unit, "n_units": n_units}


def evaluate_multilabel(
    y_true: Any,
    y_prob: Any,
    *,
    class_names: Sequence[str] = SUBTYPES,
    groups: Any = None,
    series_ids: Any = None,
    thresholds: Any = None,
    weights: Sequence[float] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """All multilabel (RSNA-style) metrics with bootstrap CIs, as a JSON-serialisable dict.

    Args:
        y_true: ``(N, K)`` 0/1 slice labels.
        y_prob: ``(N, K)`` slice probabilities.
        class_names: ``K`` names; the column named ``any`` gives ``auroc_any`` and ``accuracy``.
        groups: ``(N,)`` patient/study ids for the cluster bootstrap (default: ``series_ids``,
            else rows).
        series_ids: ``(N,)`` series ids for series-level AUROC (max over slices).
        thresholds: ``(K,)`` thresholds chosen on validation data (:func:`choose_thresholds`);
            None uses 0.5, never thresholds tuned on the data being evaluated.
        weights: log-loss class weights; default 2 for ``any`` and 1 for the others.
        n_boot: bootstrap resamples (0 skips the CIs).
        seed: bootstrap seed.
        alpha: 0.05 for 95 % intervals.

    Returns:
        ``per_class`` {name: {auroc, ap, sensitivity, specificity, precision, f1, accuracy,
        threshold, n_positive, confusion}}, ``macro_auroc``, ``macro_ap``, ``auroc_any``,
        ``weighted_log_loss``, ``accuracy``, ``series_auroc_any``, ``series_macro_auroc``,
        ``ci`` {auroc_any, macro_auroc, weighted_log_loss: [low, high]}, and bookkeeping.
        Undefined values are None.
    """
    t, p = _check_pair(y_true, y_prob)
    names = list(class_names)
    if len(names) != t.shape[1]:
        raise ValueError(f"{len(names)} class names for {t.shape[1]} columns")
    a = names.index("any") if "any" in names else None
    w = np.asarray(
        weights if weights is not None else [2.0 if n == "any" else 1.0 for n in names], float
    )
    threshold_source = "given" if thresholds is not None else "default 0.5"
    thr = np.broadcast_to(
        np.asarray(0.5 if thresholds is None else thresholds, float), (t.shape[1],)
    )

    aucs = per_class_auroc(t, p)
    aps = per_class_average_precision(t, p)
    at = threshold_metrics(t, p, thr)
    per_class = {}
    for k, name in enumerate(names):
        per_class[name] = {
            "auroc": aucs[k],
            "ap": aps[k],
            **{
                key: at[key][k]
                for key in ("sensitivity", "specificity", "precision", "f1", "accuracy")
            },
            "threshold": thr[k],
            "n_positive": int(t[:, k].sum()),
            "confusion": at["confusion"][k],
        }

    result: dict[str, Any] = {
        "task": "multilabel",
        "class_names": names,
        "n": int(t.shape[0]),
        "per_class": per_class,
        "macro_auroc": nanmean(aucs),
        "macro_ap": nanmean(aps),
        "auroc_any": aucs[a] if a is not None else math.nan,
        "weighted_log_loss": rsna_weighted_log_loss(t, p, w),
        "accuracy": at["accuracy"][a] if a is not None else math.nan,
        "thresholds": thr,
        "threshold_source": threshold_source,
        "series_auroc_any": math.nan,
        "series_macro_auroc": math.nan,
        "n_series": None,
    }
    if series_ids is not None:
        s = series_auroc(t, p, series_ids, any_index=a)
        result.update(
            series_auroc_any=s["auroc_any"],
            series_macro_auroc=s["macro_auroc"],
            n_series=s["n_series"],
        )

    g, boot = _bootstrap_setup(t.shape[0], groups, series_ids)
    fns: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
        "macro_auroc": lambda yt, yp: nanmean(fast_auroc(yt, yp)),
        "weighted_log_loss": lambda yt, yp: rsna_weighted_log_loss(yt, yp, w),
    }
    if a is not None:
        fns["auroc_any"] = lambda yt, yp: float(fast_auroc(yt[:, a], yp[:, a])[0])
    result["ci"] = {
        key: (bootstrap_ci(fn, t, p, groups=g, n_boot=n_boot, seed=seed, alpha=alpha))
        if n_boot > 0
        else (math.nan, math.nan)
        for key, fn in fns.items()
    }
    result["bootstrap"] = {**boot, "n_boot": int(n_boot), "alpha": alpha, "seed": seed}
    return to_jsonable(result)


def evaluate_multiclass(
    y_true: Any,
    y_prob: Any,
    class_names: Sequence[str],
    *,
    groups: Any = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Multiclass metrics with bootstrap CIs, as a JSON-serialisable dict.

    Args:
        y_true: ``(N,)`` class indices.
        y_prob: ``(N, K)`` class probabilities.
        class_names: ``K`` names.
        groups: ``(N,)`` patient/study ids for the cluster bootstrap; None resamples rows.
        n_boot: bootstrap resamples (0 skips the CIs).
        seed: bootstrap seed.
        alpha: 0.05 for 95 % intervals.

    Returns:
        ``accuracy``, ``macro_auroc``, ``log_loss``, ``per_class`` {name: {auroc, precision,
        recall, f1, support}}, ``confusion`` (KxK, rows = truth), ``ci`` {accuracy,
        macro_auroc, log_loss: [low, high]}. Undefined values are None.
    """
    y, p = _check_multiclass(y_true, y_prob)
    m = multiclass_metrics(y, p, class_names)
    k = p.shape[1]
    per_class = {
        name: {
            "auroc": m["auroc"][i],
            "precision": m["precision"][i],
            "recall": m["recall"][i],
            "f1": m["f1"][i],
            "support": int(m["support"][i]),
        }
        for i, name in enumerate(m["class_names"])
    }
    result: dict[str, Any] = {
        "task": "multiclass",
        "class_names": m["class_names"],
        "n": int(y.size),
        "accuracy": m["accuracy"],
        "macro_auroc": m["macro_auroc"],
        "log_loss": m["log_loss"],
        "macro_f1": nanmean(m["f1"]),
        "per_class": per_class,
        "confusion": m["confusion"],
    }
    g, boot = _bootstrap_setup(y.size, groups, None)
    eye = np.eye(k)
    fns: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
        "accuracy": lambda yt, yp: float(np.mean(yp.argmax(1) == yt)),
        "macro_auroc": lambda yt, yp: nanmean(fast_auroc(eye[yt], yp)),
        "log_loss": lambda yt, yp: multiclass_log_loss(yt, yp),
    }
    result["ci"] = {
        key: (bootstrap_ci(fn, y, p, groups=g, n_boot=n_boot, seed=seed, alpha=alpha))
        if n_boot > 0
        else (math.nan, math.nan)
        for key, fn in fns.items()
    }
    result["bootstrap"] = {**boot, "n_boot": int(n_boot), "alpha": alpha, "seed": seed}
    return to_jsonable(result)
