"""Subgroup analysis: AUROC (any) with patient-bootstrap intervals per age band, sex, scanner.

A model that is good on average can fail on a group: older patients with atrophy, one vendor's
reconstruction kernel, thin slices. Each subgroup is scored on its own rows with the same
thresholds as the whole split (chosen on validation), and its interval resamples the
subgroup's patients. Groups with fewer patients than a minimum are listed as too small without
figures, since a bootstrap over a handful of patients gives intervals that look precise and
are not. Intervals are per group, with no correction for the number of groups compared.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ichseg.metrics._base import has_both_labels, to_jsonable
from ichseg.metrics.auroc import SCORE_INTERVAL, auroc, auroc_interval_at_bound
from ichseg.metrics.bootstrap import bootstrap_distribution, percentile_interval
from ichseg.metrics.series import aggregate_by_series

UNKNOWN = "unknown"
TOO_SMALL = "too small"
ONE_CLASS = "one class only"
OK = "ok"

AGE_BANDS: tuple[float, ...] = (40.0, 65.0)
"""Age band edges in years: <40, 40-64, >=65."""
THICKNESS_BANDS_MM: tuple[float, ...] = (2.0, 4.0)
"""Slice thickness band edges in mm: thin (<2), medium (2 to <4), thick (>=4, e.g. 5 mm)."""

SUBGROUP_ATTRIBUTES: dict[str, str] = {
    "age": "age",
    "sex": "sex",
    "manufacturer": "manufacturer",
    "model": "model",
    "site": "site",
    "kernel": "kernel",
    "slice_thickness": "slice_thickness",
    "kvp": "kvp",
}
"""Subgroup variable -> the scan attribute (``ichseg.io.attributes.FIELDS``) it is read from."""


def _band_names(edges: Sequence[float], unit: str) -> list[str]:
    def fmt(v: float) -> str:
        return f"{v:g}"

    names = [f"<{fmt(edges[0])}{unit}"]
    names += [f"{fmt(a)}-{fmt(b)}{unit}" for a, b in zip(edges[:-1], edges[1:], strict=True)]
    return names + [f">={fmt(edges[-1])}{unit}"]


def _age_names(edges: Sequence[float]) -> list[str]:
    # Whole years read naturally as closed ranges: 40-64 rather than 40-65.
    names = [f"<{edges[0]:g}"]
    names += [f"{a:g}-{b - 1:g}" for a, b in zip(edges[:-1], edges[1:], strict=True)]
    return names + [f">={edges[-1]:g}"]


def band(values: Sequence[Any], edges: Sequence[float], names: Sequence[str]) -> list[str]:
    """The band of each number (``edges[i-1] <= v < edges[i]``); None or NaN is unknown.

    Args:
        values: numbers or None.
        edges: increasing band edges.
        names: ``len(edges) + 1`` band names.
    """
    out = []
    for value in values:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            out.append(UNKNOWN)
        else:
            out.append(names[int(np.searchsorted(edges, float(value), side="right"))])
    return out


def band_order(name: str) -> list[str] | None:
    """The fixed order of a banded variable's groups (None: ordered by size)."""
    if name == "age":
        return _age_names(AGE_BANDS)
    if name == "slice_thickness":
        return _band_names(THICKNESS_BANDS_MM, " mm")
    return None


def subgroup_labels(name: str, values: Sequence[Any]) -> list[str]:
    """The subgroup of each row for variable ``name`` from its scan attribute values.

    Age and slice thickness are banded (:data:`AGE_BANDS`, :data:`THICKNESS_BANDS_MM`), kVp is
    its value, the others are their text; missing values are ``"unknown"``.

    Args:
        name: a key of :data:`SUBGROUP_ATTRIBUTES`.
        values: the attribute per row (None when missing).
    """
    if name == "age":
        return band(values, AGE_BANDS, _age_names(AGE_BANDS))
    if name == "slice_thickness":
        return band(values, THICKNESS_BANDS_MM, _band_names(THICKNESS_BANDS_MM, " mm"))
    if name not in SUBGROUP_ATTRIBUTES:
        raise ValueError(f"unknown subgroup variable {name!r}; known: {list(SUBGROUP_ATTRIBUTES)}")
    out = []
    for value in values:
        if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
            out.append(UNKNOWN)
        elif isinstance(value, float):
            out.append(f"{value:g}")
        else:
            out.append(str(value))
    return out


def _auroc_fn(yt: np.ndarray, yp: np.ndarray) -> float:
    return float(auroc(yt, yp)[0])


def _rates(t: np.ndarray, p: np.ndarray, threshold: float | None) -> tuple[float, float]:
    if threshold is None or not math.isfinite(threshold):
        return math.nan, math.nan
    known = ~np.isnan(t)
    truth, called = t[known] > 0.5, p[known] >= threshold
    pos, neg = truth.sum(), (~truth).sum()
    sensitivity = float((called & truth).sum() / pos) if pos else math.nan
    specificity = float((~called & ~truth).sum() / neg) if neg else math.nan
    return sensitivity, specificity


def _scored(
    t: np.ndarray,
    p: np.ndarray,
    g: np.ndarray,
    threshold: float | None,
    n_boot: int,
    seed: int,
    alpha: float,
) -> dict[str, Any]:
    """AUROC with its patient-bootstrap interval, and sensitivity/specificity at a threshold."""
    value = _auroc_fn(t, p) if has_both_labels(t) else math.nan
    ci: tuple[float, float] = (math.nan, math.nan)
    dropped = 0
    if n_boot > 0 and math.isfinite(value):
        values, dropped = bootstrap_distribution(_auroc_fn, t, p, g, n_boot, seed)
        ci = percentile_interval(values, alpha)
    # A small group is often perfectly separated, where every resample gives the same value.
    at_bound = auroc_interval_at_bound(value, ci, t, g, alpha) if n_boot > 0 else None
    sensitivity, specificity = _rates(t, p, threshold)
    return {
        "auroc": value,
        "ci": list(ci if at_bound is None else at_bound),
        "ci_method": "bootstrap" if at_bound is None else SCORE_INTERVAL,
        "dropped": dropped,
        "sensitivity": sensitivity,
        "specificity": specificity,
    }


def _group_entry(
    rows: np.ndarray,
    t: np.ndarray,
    p: np.ndarray,
    g: np.ndarray,
    s: np.ndarray | None,
    settings: dict[str, Any],
) -> dict[str, Any]:
    """Counts and, for a group that is large enough, its figures at both levels."""
    tt, pp, gg = t[rows], p[rows], g[rows]
    entry: dict[str, Any] = {
        "n_patients": int(np.unique(gg).size),
        "n_positive_patients": int(np.unique(gg[tt > 0.5]).size),
        "n_slices": int(rows.size),
        "n_positive_slices": int(np.nansum(tt)),
    }
    series_data = None
    if s is not None:
        ids, ts, ps = aggregate_by_series(
            tt[:, None], pp[:, None], s[rows], settings["aggregation"]
        )
        first = {sid: i for i, sid in reversed(list(enumerate(s[rows])))}
        series_data = (ts[:, 0], ps[:, 0], np.asarray([gg[first[sid]] for sid in ids]))
        entry["n_series"] = int(ids.size)
    if entry["n_patients"] < settings["min_patients"]:
        entry["status"] = TOO_SMALL
        return entry
    boot = (settings["n_boot"], settings["seed"], settings["alpha"])
    levels: dict[str, dict[str, Any]] = {}
    if settings["label_level"] == "slice":
        levels["slice"] = _scored(tt, pp, gg, settings["threshold"], *boot)
    if series_data is not None:
        levels["series"] = _scored(*series_data, settings["series_threshold"], *boot)
    headline = levels[settings["level"]]
    entry["status"] = OK if math.isfinite(headline["auroc"]) else ONE_CLASS
    entry.update(headline)
    if settings["level"] == "slice" and "series" in levels:
        entry["series"] = levels["series"]
    return entry


def _ordered(name: str, labels: list[str], counts: dict[str, int]) -> list[str]:
    present = list(dict.fromkeys(labels))
    fixed = band_order(name)
    if fixed is not None:
        ordered = [b for b in fixed if b in present]
    else:
        ordered = sorted((b for b in present if b != UNKNOWN), key=lambda b: (-counts[b], b))
    return ordered + ([UNKNOWN] if UNKNOWN in present else [])


def subgroup_analysis(
    y_true: Any,
    y_score: Any,
    groups: Any,
    subgroups: Mapping[str, Sequence[str]],
    *,
    series_ids: Any = None,
    label_level: str = "slice",
    aggregation: str = "max",
    threshold: float | None = None,
    series_threshold: float | None = None,
    min_patients: int = 10,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """AUROC of one binary target (hemorrhage: any) per subgroup, with patient-bootstrap CIs.

    Args:
        y_true: ``(N,)`` labels per slice (0, 1, NaN unknown).
        y_score: ``(N,)`` scores per slice.
        groups: ``(N,)`` patient ids: intervals resample patients, and group sizes count them.
        subgroups: variable name -> ``(N,)`` subgroup label per row (see
            :func:`subgroup_labels`); a patient may fall in several groups of one variable.
        series_ids: ``(N,)`` series ids; adds series-level figures (scores aggregated with
            ``aggregation``).
        label_level: ``"slice"``: the headline AUROC is per slice; ``"series"`` (scan-level
            labels copied to slices): per series.
        aggregation: series rule (``max``, ``mean``, ``topK``).
        threshold: slice threshold (chosen on validation) for sensitivity and specificity.
        series_threshold: the same for series.
        min_patients: groups with fewer patients are listed as too small, without figures.
        n_boot: bootstrap resamples per group (0: no intervals).
        seed: bootstrap seed (the same for every group).
        alpha: 0.05 for 95 % intervals.

    Returns:
        JSON-ready dict: ``level``, ``min_patients``, ``overall`` (the whole split, the forest
        plot's reference) and ``variables``: name -> list of groups, each with ``group``,
        ``status`` (ok, too small, one class only), counts, ``auroc``, ``ci``, ``sensitivity``,
        ``specificity`` and, with slice labels and series ids, ``series`` figures.
    """
    t = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_score, dtype=np.float64).ravel()
    g = np.asarray(groups).astype(str)
    s = None if series_ids is None else np.asarray(series_ids).astype(str)
    if p.shape != t.shape or g.shape != t.shape or (s is not None and s.shape != t.shape):
        raise ValueError("y_true, y_score, groups and series_ids need one entry per row")
    if label_level not in ("slice", "series"):
        raise ValueError(f"label_level must be slice or series, got {label_level!r}")
    if label_level == "series" and s is None:
        raise ValueError("series-level labels need series_ids")
    if min_patients < 1:
        raise ValueError("min_patients must be at least 1")
    settings = {
        "level": label_level,
        "label_level": label_level,
        "aggregation": aggregation,
        "threshold": threshold,
        "series_threshold": series_threshold,
        "min_patients": min_patients,
        "n_boot": n_boot,
        "seed": seed,
        "alpha": alpha,
    }
    every = np.arange(t.size)
    overall = _group_entry(every, t, p, g, s, settings | {"min_patients": 1})
    variables: dict[str, list[dict[str, Any]]] = {}
    for name, labels in subgroups.items():
        labels = [str(label) for label in labels]
        if len(labels) != t.size:
            raise ValueError(f"subgroup variable {name!r} needs one label per row")
        array = np.asarray(labels)
        rows_of = {label: np.flatnonzero(array == label) for label in set(labels)}
        counts = {label: int(np.unique(g[rows]).size) for label, rows in rows_of.items()}
        variables[name] = [
            {"group": label, **_group_entry(rows_of[label], t, p, g, s, settings)}
            for label in _ordered(name, labels, counts)
        ]
    result = {
        "target": "any",
        "metric": "auroc",
        "level": label_level,
        "aggregation": aggregation,
        "min_patients": min_patients,
        "bootstrap": {"unit": "patient", "n_boot": n_boot, "seed": seed, "alpha": alpha},
        "overall": overall,
        "variables": variables,
    }
    return to_jsonable(result)


def binary_any(
    truth: np.ndarray, prob: np.ndarray, mode: str, class_names: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Hemorrhage (any) labels and scores from a task's truth and probabilities.

    Multilabel: the ``any`` column. Multiclass: any class but class 0 (``normal``), scored as
    ``1 - p(normal)``, as validation during training does.

    Args:
        truth: ``(N, K)`` labels or ``(N,)`` class indices.
        prob: ``(N, K)`` probabilities.
        mode: ``"multilabel"`` or ``"multiclass"``.
        class_names: the task's class names.
    """
    if mode == "multilabel":
        k = list(class_names).index("any")
        return np.asarray(truth, dtype=np.float64)[:, k], np.asarray(prob)[:, k]
    return (np.asarray(truth) > 0).astype(np.float64), 1.0 - np.asarray(prob)[:, 0]
