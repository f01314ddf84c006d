"""Full evaluations: every metric of a split with patient-level bootstrap intervals, as JSON.

Label granularity decides the headline: with slice labels (RSNA, CT-ICH, phantom) slice and
series metrics are both reported; with scan-level labels copied to every slice (CQ500 reads)
slice metrics would score the copy, so only series metrics are reported.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ichseg.metrics._base import check_multiclass, check_pair, has_both_labels, nanmean, to_jsonable
from ichseg.metrics.auroc import auroc, auroc_interval_at_bound, average_precision
from ichseg.metrics.bootstrap import bootstrap_distribution, percentile_interval
from ichseg.metrics.logloss import multiclass_log_loss, rsna_weighted_log_loss
from ichseg.metrics.multiclass import multiclass_metrics
from ichseg.metrics.series import aggregate_by_series
from ichseg.metrics.thresholds import threshold_metrics
from ichseg.options import look_up_option

LABEL_LEVELS: tuple[str, ...] = ("slice", "series")


def _macro(aucs: np.ndarray, columns: list[int]) -> float:
    """Mean AUROC over a fixed class set; NaN when any of them is undefined (never a subset)."""
    if not columns:
        return math.nan
    values = aucs[columns]
    return math.nan if np.isnan(values).any() else float(values.mean())


def _level_metrics(
    t: np.ndarray,
    p: np.ndarray,
    names: list[str],
    thresholds: np.ndarray,
    weights: np.ndarray,
    macro_columns: list[int],
) -> dict[str, Any]:
    aucs = auroc(t, p)
    aps = average_precision(t, p)
    at = threshold_metrics(t, p, thresholds)
    a = names.index("any") if "any" in names else None
    per_class = {}
    for k, name in enumerate(names):
        known = ~np.isnan(t[:, k])
        per_class[name] = {
            "auroc": aucs[k],
            "ap": aps[k],
            **{
                key: at[key][k]
                for key in ("sensitivity", "specificity", "precision", "f1", "accuracy")
            },
            "threshold": at["threshold"][k],
            "n_positive": int(np.nansum(t[:, k])),
            "n_known": int(known.sum()),
            "confusion": at["confusion"][k],
        }
    return {
        "n": int(t.shape[0]),
        "per_class": per_class,
        "auroc_any": aucs[a] if a is not None else math.nan,
        "macro_auroc": _macro(aucs, macro_columns),
        "macro_ap": nanmean(aps[macro_columns]) if macro_columns else math.nan,
        "weighted_log_loss": rsna_weighted_log_loss(t, p, weights),
        "accuracy": at["accuracy"][a] if a is not None else math.nan,
    }


def _interval_fns(
    names: list[str], weights: np.ndarray, macro_columns: list[int]
) -> dict[str, Callable[[np.ndarray, np.ndarray], float]]:
    fns: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
        "macro_auroc": lambda yt, yp: _macro(auroc(yt, yp), macro_columns),
        "weighted_log_loss": lambda yt, yp: rsna_weighted_log_loss(yt, yp, weights),
    }
    if "any" in names:
        a = names.index("any")
        fns["auroc_any"] = lambda yt, yp: float(auroc(yt[:, a], yp[:, a])[0])
    return fns


def evaluate_multilabel(
    y_true: Any,
    y_prob: Any,
    *,
    class_names: Sequence[str],
    groups: Any,
    series_ids: Any,
    thresholds: Any = None,
    series_thresholds: Any = None,
    aggregation: str = "max",
    label_level: str = "slice",
    weights: Sequence[float] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """All multilabel (RSNA-style) metrics with patient-level bootstrap CIs, as a JSON dict.

    Args:
        y_true: ``(N, K)`` slice labels (0, 1, NaN = unknown).
        y_prob: ``(N, K)`` slice probabilities.
        class_names: ``K`` names; the column named ``any`` gives the ``*_auroc_any`` keys.
        groups: ``(N,)`` patient ids: the bootstrap resamples patients, never slices.
        series_ids: ``(N,)`` series ids for the series-level metrics.
        thresholds: ``(K,)`` slice thresholds chosen on validation data; None uses 0.5.
        series_thresholds: ``(K,)`` thresholds for the aggregated series probabilities, chosen
            on validation series; None uses 0.5.
        aggregation: series rule (``max``, ``mean``, ``topK``).
        label_level: ``"slice"`` or ``"series"`` (scan-level labels copied to slices: slice
            metrics are not reported).
        weights: log-loss class weights; default 2 for ``any`` and 1 for the others.
        n_boot: bootstrap resamples (0 skips the CIs).
        seed: bootstrap seed.
        alpha: 0.05 for 95 % intervals.

    Returns:
        Slice keys ``auroc_any``, ``macro_auroc``, ``weighted_log_loss``, ``accuracy``,
        ``per_class`` (None at series label level), the same with a ``series_`` prefix,
        ``macro_classes`` (the fixed class set of every macro average), ``ci`` with
        ``[low, high]`` per key, and ``bootstrap`` bookkeeping (resamples dropped per key).
    """
    look_up_option("label level", label_level, LABEL_LEVELS, ValueError)
    t, p = check_pair(y_true, y_prob)
    names = list(class_names)
    if len(names) != t.shape[1]:
        raise ValueError(f"{len(names)} class names for {t.shape[1]} columns")
    g = np.asarray(groups)
    s = np.asarray(series_ids)
    if g.shape != (t.shape[0],) or s.shape != (t.shape[0],):
        raise ValueError("groups and series_ids need one entry per row")
    w = np.asarray(
        weights if weights is not None else [2.0 if n == "any" else 1.0 for n in names], float
    )

    def _thresholds(values: Any) -> np.ndarray:
        return np.broadcast_to(
            np.asarray(0.5 if values is None else values, float), (t.shape[1],)
        ).copy()

    ids, ts, ps = aggregate_by_series(t, p, s, aggregation)
    first_row = {sid: i for i, sid in reversed(list(enumerate(s)))}
    series_groups = np.asarray([g[first_row[sid]] for sid in ids])
    level_t = t if label_level == "slice" else ts
    macro_columns = [k for k in range(len(names)) if has_both_labels(level_t[:, k])]

    result: dict[str, Any] = {
        "task": "multilabel",
        "class_names": names,
        "label_level": label_level,
        "aggregation": aggregation,
        "n_slices": int(t.shape[0]),
        "n_series": int(ids.size),
        "n_patients": int(np.unique(g).size),
        "macro_classes": [names[k] for k in macro_columns],
        "threshold_source": "validation" if thresholds is not None else "default 0.5",
    }
    series = _level_metrics(ts, ps, names, _thresholds(series_thresholds), w, macro_columns)
    for key, value in series.items():
        result[f"series_{key}"] = value
    result["series_thresholds"] = _thresholds(series_thresholds)
    if label_level == "slice":
        result.update(_level_metrics(t, p, names, _thresholds(thresholds), w, macro_columns))
        result["thresholds"] = _thresholds(thresholds)
    else:
        for key in ("per_class", "auroc_any", "macro_auroc", "macro_ap", "weighted_log_loss"):
            result[key] = None
        result["accuracy"] = None
        result["thresholds"] = None

    fns = _interval_fns(names, w, macro_columns)
    targets = [("series_", ts, ps, series_groups)]
    if label_level == "slice":
        targets.append(("", t, p, g))
    auroc_columns = {"auroc_any": names.index("any")} if "any" in names else {}
    result["ci"], result["bootstrap"] = _intervals(
        targets, fns, g, n_boot, seed, alpha, auroc_columns
    )
    return to_jsonable(result)


def _intervals(
    targets: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
    fns: dict[str, Callable[[np.ndarray, np.ndarray], float]],
    patients: np.ndarray,
    n_boot: int,
    seed: int,
    alpha: float,
    auroc_columns: dict[str, int] | None = None,
) -> tuple[dict[str, tuple[float, float]], dict[str, Any]]:
    """Patient-bootstrap intervals of every metric on every (prefix, labels, preds, groups).

    The AUROCs of ``auroc_columns`` (key -> label column) whose interval reaches 0 or 1 get its
    union with the score interval (:func:`~ichseg.metrics.auroc.auroc_interval_at_bound`),
    listed under ``score_intervals`` in the bookkeeping.
    """
    ci: dict[str, tuple[float, float]] = {}
    dropped: dict[str, int] = {}
    score_intervals: list[str] = []
    if n_boot > 0:
        for prefix, yt, yp, groups in targets:
            for key, fn in fns.items():
                values, bad = bootstrap_distribution(fn, yt, yp, groups, n_boot, seed)
                ci[prefix + key] = percentile_interval(values, alpha)
                dropped[prefix + key] = bad
                if key in (auroc_columns or {}):
                    column = yt[:, auroc_columns[key]]
                    at_bound = auroc_interval_at_bound(
                        fn(yt, yp), ci[prefix + key], column, groups, alpha
                    )
                    if at_bound is not None:
                        ci[prefix + key] = at_bound
                        score_intervals.append(prefix + key)
    bookkeeping = {
        "unit": "patient",
        "n_units": int(np.unique(patients).size),
        "n_boot": int(n_boot),
        "dropped": dropped,
        "alpha": alpha,
        "seed": seed,
        "score_intervals": score_intervals,
    }
    return ci, bookkeeping


def evaluate_multiclass(
    y_true: Any,
    y_prob: Any,
    class_names: Sequence[str],
    *,
    groups: Any,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Multiclass metrics with patient-level bootstrap CIs, as a JSON-serialisable dict.

    Args:
        y_true: ``(N,)`` class indices.
        y_prob: ``(N, K)`` class probabilities.
        class_names: ``K`` names.
        groups: ``(N,)`` patient ids for the cluster bootstrap.
        n_boot: bootstrap resamples (0 skips the CIs).
        seed: bootstrap seed.
        alpha: 0.05 for 95 % intervals.

    Returns:
        ``accuracy``, ``macro_auroc``, ``log_loss``, ``per_class`` {name: {auroc, precision,
        recall, f1, support}}, ``confusion`` (KxK, rows = truth), ``ci`` {accuracy,
        macro_auroc, log_loss: [low, high]}. Undefined values are None.
    """
    y, p = check_multiclass(y_true, y_prob)
    m = multiclass_metrics(y, p, class_names)
    k = p.shape[1]
    g = np.asarray(groups)
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
    present = [i for i in range(k) if m["support"][i] > 0]
    result: dict[str, Any] = {
        "task": "multiclass",
        "class_names": m["class_names"],
        "n_slices": int(y.size),
        "n_patients": int(np.unique(g).size),
        "accuracy": m["accuracy"],
        "macro_auroc": _macro(np.asarray(m["auroc"]), present),
        "macro_classes": [m["class_names"][i] for i in present],
        "log_loss": m["log_loss"],
        "macro_f1": nanmean(m["f1"]),
        "per_class": per_class,
        "confusion": m["confusion"],
    }
    eye = np.eye(k)
    fns: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
        "accuracy": lambda yt, yp: float(np.mean(yp.argmax(1) == yt)),
        "macro_auroc": lambda yt, yp: _macro(auroc(eye[yt], yp), present),
        "log_loss": lambda yt, yp: multiclass_log_loss(yt, yp),
    }
    result["ci"], result["bootstrap"] = _intervals([("", y, p, g)], fns, g, n_boot, seed, alpha)
    return to_jsonable(result)
