"""Shared array checks and JSON conversion for the metric modules.

Conventions: multilabel ``y_true``/``y_prob`` are ``(N, K)``; ``y_true`` holds 0, 1 or NaN, where
NaN means the label is unknown (for example a subtype of an image labelled only "hemorrhage")
and that cell is left out of every metric of its column.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def as_2d(array: Any, dtype: Any = np.float64) -> np.ndarray:
    """``(N,)`` -> ``(N, 1)``; ``(N, K)`` unchanged."""
    out = np.asarray(array, dtype=dtype)
    return out[:, None] if out.ndim == 1 else out


def check_pair(y_true: Any, y_prob: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate labels (0, 1 or NaN for unknown) against finite predictions of the same shape."""
    t = as_2d(y_true)
    p = as_2d(y_prob)
    if t.shape != p.shape or t.ndim != 2:
        raise ValueError(f"y_true {t.shape} and y_prob {p.shape} must both be (N, K)")
    known = ~np.isnan(t)
    if not np.isin(t[known], (0.0, 1.0)).all():
        raise ValueError("y_true must contain only 0, 1 or NaN (unknown)")
    if not np.isfinite(p).all():
        raise ValueError("y_prob must be finite")
    return t, p


def check_multiclass(y_true: Any, y_prob: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``(N,)`` integer classes against ``(N, K)`` finite probabilities."""
    y = np.asarray(y_true)
    p = np.asarray(y_prob, dtype=np.float64)
    if p.ndim != 2 or y.shape != (p.shape[0],):
        raise ValueError(f"y_true {y.shape} must be (N,) and y_prob {p.shape} (N, K)")
    if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"y_true must hold integer classes in [0, {p.shape[1]})")
    if not np.isfinite(p).all():
        raise ValueError("y_prob must be finite")
    return y.astype(np.int64), p


def divide(num: Any, den: Any) -> np.ndarray:
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


def has_both_labels(column: np.ndarray) -> bool:
    """Whether a label column (NaN = unknown) holds at least one 0 and one 1."""
    known = column[~np.isnan(column)]
    return known.size > 0 and known.min() != known.max()


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
