"""Calibrated probabilities: temperature scaling, isotonic regression, and how to measure them.

A classifier that ranks well (high AUROC) can still say 0.95 where the observed frequency is
0.7; a clinician reading the probability needs the two to agree. Calibration maps are fitted on
validation data and applied unchanged to test data.

- Multilabel sigmoid outputs (one column per class): one temperature per class,
  ``p' = sigmoid(logit(p) / T_k)``, or an isotonic (monotone, piecewise-linear) map per class.
- Multiclass softmax outputs: one temperature for all classes, ``p' = softmax(log(p) / T)``
  (``log p`` equals the logits up to a per-row constant, which softmax ignores), or isotonic
  one-vs-rest per class followed by renormalising each row.

Temperature scaling divides logits by ``T``, so it never changes the ranking (AUROC) within a
class; isotonic regression may merge nearby scores into ties. Labels may be NaN (unknown): those
entries are ignored when fitting and when measuring. A :class:`Calibrator` stores its parameters
as plain numbers (``to_dict``/``from_dict``), so it can sit in a JSON file next to a checkpoint.

Conventions of the measures: ``y_true`` is ``(N, K)`` 0/1/NaN labels with ``y_prob`` ``(N, K)``,
or ``(N,)`` labels with ``(N,)`` probabilities (one class), or ``(N,)`` class indices with
``(N, K)`` probabilities (multiclass, measured one-vs-rest per class). Results are per class,
``(K,)``, NaN for a class without labels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import optimize, special

from ichseg.options import look_up_option

METHODS = ("none", "temperature", "isotonic")
TASKS = ("multilabel", "multiclass")
TEMPERATURE_BOUNDS = (0.05, 20.0)
"""Fitted temperatures stay in this range; an uninformative class would otherwise run off to
infinity (every probability at the base rate would need ``T = inf``)."""
EPS = 1e-7
"""Probabilities are clipped to ``[EPS, 1 - EPS]`` before taking logits (``|logit| <= 16.1``)."""


# ---------------------------------------------------------------------------------------------
# Input handling
# ---------------------------------------------------------------------------------------------


def logit(probabilities: npt.ArrayLike, eps: float = EPS) -> np.ndarray:
    """``log(p / (1 - p))`` with ``p`` clipped to ``[eps, 1 - eps]`` so it stays finite.

    Args:
        probabilities: any shape.
        eps: clipping.
    """
    p = np.clip(np.asarray(probabilities, dtype=np.float64), eps, 1.0 - eps)
    return special.logit(p)


def _as_columns(array: npt.ArrayLike, name: str) -> np.ndarray:
    out = np.asarray(array, dtype=np.float64)
    if out.ndim == 1:
        out = out[:, None]
    if out.ndim != 2:
        raise ValueError(f"{name} must be (N,) or (N, K), got shape {out.shape}")
    return out


def _binary_or_nan(t: np.ndarray) -> np.ndarray:
    if not (np.isnan(t) | np.isin(t, (0.0, 1.0))).all():
        raise ValueError("labels must be 0, 1 or NaN (unknown)")
    return t


def _class_indices(y_true: npt.ArrayLike, n_classes: int) -> np.ndarray:
    """``(N,)`` class indices as floats, NaN = unknown; checked against ``n_classes``."""
    y = np.asarray(y_true, dtype=np.float64)
    if y.ndim != 1:
        raise ValueError(f"multiclass labels must be (N,) class indices, got shape {y.shape}")
    known = y[~np.isnan(y)]
    if known.size and (
        (known != np.round(known)).any() or known.min() < 0 or known.max() >= n_classes
    ):
        raise ValueError(f"multiclass labels must be integers in [0, {n_classes}) or NaN")
    return y


def _one_hot(y: np.ndarray, n_classes: int) -> np.ndarray:
    out = np.full((y.size, n_classes), np.nan)
    known = ~np.isnan(y)
    out[known] = np.eye(n_classes)[y[known].astype(np.int64)]
    return out


def _labels_and_probs(y_true: npt.ArrayLike, y_prob: npt.ArrayLike) -> tuple[np.ndarray, ...]:
    """``(N, K)`` labels (0/1/NaN) and probabilities from the accepted input layouts."""
    p = _as_columns(y_prob, "y_prob")
    y = np.asarray(y_true, dtype=np.float64)
    if y.ndim == 1 and p.shape[1] > 1:
        t = _one_hot(_class_indices(y, p.shape[1]), p.shape[1])
    else:
        t = _binary_or_nan(_as_columns(y, "y_true"))
    if t.shape != p.shape:
        raise ValueError(f"y_true {np.shape(y_true)} does not match y_prob {np.shape(y_prob)}")
    return t, p


# ---------------------------------------------------------------------------------------------
# Fitting
# ---------------------------------------------------------------------------------------------


def _bounded_temperature(loss: Any, bounds: tuple[float, float]) -> float:
    # The loss is convex in 1/T, hence unimodal in log T: bounded Brent finds the minimum.
    low, high = bounds
    if not 0.0 < low < 1.0 < high:
        raise ValueError(f"temperature bounds must satisfy 0 < low < 1 < high, got {bounds}")
    result = optimize.minimize_scalar(
        lambda log_t: loss(math.exp(log_t)),
        bounds=(math.log(low), math.log(high)),
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(math.exp(result.x))


def fit_temperature_multilabel(
    logits: npt.ArrayLike,
    y_true: npt.ArrayLike,
    bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
) -> np.ndarray:
    """One temperature per class minimising the binary cross-entropy of ``sigmoid(z / T)``.

    Args:
        logits: ``(N, K)`` or ``(N,)`` validation logits.
        y_true: matching 0/1 labels; NaN entries are ignored.
        bounds: ``(low, high)`` range of the temperatures.

    Returns:
        ``(K,)`` temperatures; exactly 1 for a class whose known labels all have one value (or
        that has none, or whose logits are all 0), where the loss has no interior minimum.
    """
    z = _as_columns(logits, "logits")
    t = _binary_or_nan(_as_columns(y_true, "y_true"))
    if z.shape != t.shape:
        raise ValueError(f"logits {z.shape} and y_true {t.shape} must have the same shape")
    if not np.isfinite(z).all():
        raise ValueError("logits must be finite")
    temperatures = np.ones(z.shape[1])
    for k in range(z.shape[1]):
        known = ~np.isnan(t[:, k])
        zk, yk = z[known, k], t[known, k]
        if yk.size == 0 or yk.min() == yk.max() or not zk.any():
            continue

        def bce(temperature: float, zk: np.ndarray = zk, yk: np.ndarray = yk) -> float:
            scaled = zk / temperature
            return float(np.mean(np.logaddexp(0.0, scaled) - yk * scaled))

        temperatures[k] = _bounded_temperature(bce, bounds)
    return temperatures


def fit_temperature_multiclass(
    logits: npt.ArrayLike,
    y_true: npt.ArrayLike,
    bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
) -> float:
    """One temperature for softmax logits, minimising the cross-entropy of ``softmax(z / T)``.

    Args:
        logits: ``(N, K)`` validation logits.
        y_true: ``(N,)`` class indices; NaN rows are ignored.
        bounds: ``(low, high)`` range of the temperature.

    Returns:
        The temperature; exactly 1 when the known labels hold fewer than two classes.
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"multiclass logits must be (N, K), got shape {z.shape}")
    y = _class_indices(y_true, z.shape[1])
    if y.shape != (z.shape[0],):
        raise ValueError(f"y_true {y.shape} needs one class index per row of logits {z.shape}")
    if not np.isfinite(z).all():
        raise ValueError("logits must be finite")
    known = ~np.isnan(y)
    zk, yk = z[known], y[known].astype(np.int64)
    if np.unique(yk).size < 2:
        return 1.0
    true_logit = zk[np.arange(yk.size), yk]

    def cross_entropy(temperature: float) -> float:
        return float(
            np.mean(special.logsumexp(zk / temperature, axis=1) - true_logit / temperature)
        )

    return _bounded_temperature(cross_entropy, bounds)


_IDENTITY_MAP = ((0.0, 1.0), (0.0, 1.0))


def fit_isotonic(
    y_true: npt.ArrayLike, y_prob: npt.ArrayLike
) -> list[tuple[tuple[float, ...], tuple[float, ...]]]:
    """Isotonic regression of labels on probabilities, per class (one-vs-rest for multiclass).

    Uses scikit-learn's ``IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip")`` and keeps
    only its thresholds: the fitted map is ``np.interp(p, X, Y)``, linear between thresholds
    and constant beyond them.

    Args:
        y_true: labels in a layout of the module docstring; NaN entries are ignored.
        y_prob: ``(N, K)`` or ``(N,)`` validation probabilities.

    Returns:
        Per class ``(X, Y)`` threshold tuples; the identity ``((0, 1), (0, 1))`` for a class
        whose known labels all have one value, which would otherwise map every input to it.
    """
    from sklearn.isotonic import IsotonicRegression

    t, p = _labels_and_probs(y_true, y_prob)
    maps: list[tuple[tuple[float, ...], tuple[float, ...]]] = []
    for k in range(t.shape[1]):
        known = ~np.isnan(t[:, k])
        yk = t[known, k]
        if yk.size == 0 or yk.min() == yk.max():
            maps.append(_IDENTITY_MAP)
            continue
        model = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip")
        model.fit(p[known, k], yk)
        maps.append(
            (tuple(map(float, model.X_thresholds_)), tuple(map(float, model.y_thresholds_)))
        )
    return maps


# ---------------------------------------------------------------------------------------------
# Calibrator
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibrator:
    """A fitted calibration map from probabilities to probabilities.

    Attributes:
        method: ``"none"``, ``"temperature"`` or ``"isotonic"``.
        task: ``"multilabel"`` (independent sigmoid columns) or ``"multiclass"`` (softmax rows).
        n_classes: number of columns ``K``.
        temperatures: ``K`` per-class temperatures (multilabel) or one (multiclass); only for
            ``method="temperature"``.
        isotonic: per class ``(X, Y)`` thresholds of the isotonic map; only for
            ``method="isotonic"``.
        eps: probability clipping before logits.
    """

    method: str
    task: str
    n_classes: int
    temperatures: tuple[float, ...] = ()
    isotonic: tuple[tuple[tuple[float, ...], tuple[float, ...]], ...] = ()
    eps: float = EPS

    def __post_init__(self) -> None:
        look_up_option("calibration method", self.method, METHODS, ValueError)
        look_up_option("task", self.task, TASKS, ValueError)
        if self.n_classes < 1:
            raise ValueError(f"n_classes must be at least 1, got {self.n_classes}")
        if not 0.0 < self.eps < 0.5:
            raise ValueError(f"eps must be in (0, 0.5), got {self.eps}")
        want_t = (1 if self.task == "multiclass" else self.n_classes) * (
            self.method == "temperature"
        )
        if len(self.temperatures) != want_t:
            raise ValueError(f"{self.method} needs {want_t} temperatures for {self.task}")
        if not all(math.isfinite(t) and t > 0 for t in self.temperatures):
            raise ValueError("temperatures must be positive and finite")
        want_maps = self.n_classes * (self.method == "isotonic")
        if len(self.isotonic) != want_maps:
            raise ValueError(f"{self.method} needs {want_maps} isotonic maps")
        for x, y in self.isotonic:
            if len(x) != len(y) or not x or np.any(np.diff(x) < 0):
                raise ValueError("isotonic thresholds must be equal-length, non-empty, sorted X")

    @classmethod
    def identity(cls, n_classes: int, task: str = "multilabel") -> Calibrator:
        """The ``"none"`` calibrator: ``apply`` returns its input.

        Args:
            n_classes: number of columns.
            task: ``"multilabel"`` or ``"multiclass"``.
        """
        return cls(method="none", task=task, n_classes=n_classes)

    @classmethod
    def fit(
        cls,
        y_true: npt.ArrayLike,
        probabilities: npt.ArrayLike,
        method: str = "temperature",
        task: str = "multilabel",
        bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
        eps: float = EPS,
    ) -> Calibrator:
        """Fit on validation probabilities (logits are recovered by clipped ``logit``/``log``).

        Args:
            y_true: multilabel ``(N, K)`` 0/1/NaN labels; multiclass ``(N,)`` class indices
                (NaN = unknown).
            probabilities: ``(N, K)`` validation probabilities (``(N,)`` for one class).
            method: ``"none"``, ``"temperature"`` or ``"isotonic"``.
            task: ``"multilabel"`` or ``"multiclass"``.
            bounds: temperature range.
            eps: probability clipping.
        """
        p = _as_columns(probabilities, "probabilities")
        return cls.fit_logits(y_true, _to_logits(p, task, eps), method, task, bounds, eps)

    @classmethod
    def fit_logits(
        cls,
        y_true: npt.ArrayLike,
        logits: npt.ArrayLike,
        method: str = "temperature",
        task: str = "multilabel",
        bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
        eps: float = EPS,
    ) -> Calibrator:
        """Fit on validation logits (more exact than probabilities for confident outputs).

        Args:
            y_true: as in :meth:`fit`.
            logits: ``(N, K)`` validation logits (``(N,)`` for one class).
            method: ``"none"``, ``"temperature"`` or ``"isotonic"``.
            task: ``"multilabel"`` or ``"multiclass"``.
            bounds: temperature range.
            eps: probability clipping used later by :meth:`apply`.
        """
        look_up_option("calibration method", method, METHODS, ValueError)
        look_up_option("task", task, TASKS, ValueError)
        z = _as_columns(logits, "logits")
        k = z.shape[1]
        if method == "none":
            return cls(method=method, task=task, n_classes=k, eps=eps)
        if method == "temperature":
            if task == "multiclass":
                temps: tuple[float, ...] = (fit_temperature_multiclass(z, y_true, bounds),)
            else:
                temps = tuple(map(float, fit_temperature_multilabel(z, y_true, bounds)))
            return cls(method=method, task=task, n_classes=k, temperatures=temps, eps=eps)
        probs = _from_logits(z, task)
        if task == "multilabel":
            t = np.asarray(y_true, dtype=np.float64)
            y_true = t[:, None] if t.ndim == 1 else t  # (N,) labels of a single class
        maps = tuple(fit_isotonic(y_true, probs))
        return cls(method=method, task=task, n_classes=k, isotonic=maps, eps=eps)

    def apply(self, probabilities: npt.ArrayLike) -> np.ndarray:
        """Calibrated probabilities, same shape as the input.

        Args:
            probabilities: ``(N, K)`` (or ``(N,)`` when ``n_classes`` is 1) probabilities.
        """
        p = np.asarray(probabilities, dtype=np.float64)
        cols = p[:, None] if p.ndim == 1 else p
        if cols.ndim != 2 or cols.shape[1] != self.n_classes:
            raise ValueError(f"expected (N, {self.n_classes}) probabilities, got shape {p.shape}")
        if self.method == "none":
            out = cols.copy()
        elif self.method == "temperature":
            z = _to_logits(cols, self.task, self.eps)
            out = _from_logits(z / np.asarray(self.temperatures), self.task)
        else:
            out = np.column_stack(
                [np.interp(cols[:, k], x, y) for k, (x, y) in enumerate(self.isotonic)]
            )
            if self.task == "multiclass":
                out = _normalise_rows(out)
        return out.reshape(p.shape)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable parameters (:meth:`from_dict` rebuilds the same map)."""
        return {
            "method": self.method,
            "task": self.task,
            "n_classes": self.n_classes,
            "temperatures": list(self.temperatures),
            "isotonic": [{"x": list(x), "y": list(y)} for x, y in self.isotonic],
            "eps": self.eps,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibrator:
        """Rebuild a calibrator from :meth:`to_dict` output.

        Args:
            data: the dict; a missing or malformed field is a ``ValueError``.
        """
        try:
            return cls(
                method=str(data["method"]),
                task=str(data["task"]),
                n_classes=int(data["n_classes"]),
                temperatures=tuple(float(t) for t in data.get("temperatures", [])),
                isotonic=tuple(
                    (tuple(map(float, m["x"])), tuple(map(float, m["y"])))
                    for m in data.get("isotonic", [])
                ),
                eps=float(data.get("eps", EPS)),
            )
        except (KeyError, TypeError) as err:
            raise ValueError(f"malformed calibrator: {err!r}") from err


def _to_logits(p: np.ndarray, task: str, eps: float) -> np.ndarray:
    if task == "multiclass":
        return np.log(np.clip(p, eps, 1.0))
    return logit(p, eps)


def _from_logits(z: np.ndarray, task: str) -> np.ndarray:
    if task == "multiclass":
        return special.softmax(z, axis=1)
    return special.expit(z)


def _normalise_rows(p: np.ndarray) -> np.ndarray:
    total = p.sum(axis=1, keepdims=True)
    # A row every class map sends to 0 carries no information: spread it evenly.
    uniform = np.full_like(p, 1.0 / p.shape[1])
    return np.divide(p, total, out=uniform, where=total > 0)


# ---------------------------------------------------------------------------------------------
# Measures
# ---------------------------------------------------------------------------------------------


def _masked_mean(values: np.ndarray, known: np.ndarray) -> np.ndarray:
    count = known.sum(axis=0)
    total = np.where(known, values, 0.0).sum(axis=0)
    out = np.full(values.shape[1], np.nan)
    np.divide(total, count, out=out, where=count > 0)
    return out


def brier_score(y_true: npt.ArrayLike, y_prob: npt.ArrayLike) -> np.ndarray:
    """Mean squared difference between probability and label, per class (lower is better).

    Args:
        y_true: labels (layouts in the module docstring); NaN entries are ignored.
        y_prob: probabilities.

    Returns:
        ``(K,)``; NaN for a class without known labels. For multiclass input the sum over
        classes is the usual multiclass Brier score.
    """
    t, p = _labels_and_probs(y_true, y_prob)
    known = ~np.isnan(t)
    return _masked_mean((p - np.nan_to_num(t)) ** 2, known)


def per_class_log_loss(
    y_true: npt.ArrayLike, y_prob: npt.ArrayLike, eps: float = EPS
) -> np.ndarray:
    """Binary cross-entropy per class with probabilities clipped to ``[eps, 1 - eps]``.

    Args:
        y_true: labels (layouts in the module docstring); NaN entries are ignored.
        y_prob: probabilities.
        eps: clipping that keeps a confident mistake finite.

    Returns:
        ``(K,)``; NaN for a class without known labels.
    """
    t, p = _labels_and_probs(y_true, y_prob)
    known = ~np.isnan(t)
    p = np.clip(p, eps, 1.0 - eps)
    y = np.nan_to_num(t)
    return _masked_mean(-(y * np.log(p) + (1.0 - y) * np.log1p(-p)), known)


@dataclass(frozen=True, eq=False)
class ReliabilityCurve:
    """Binned predicted probability against observed frequency, per class.

    Attributes:
        centers: ``(B,)`` bin centres; bin ``b`` is ``[b/B, (b+1)/B)``, the last one closed.
        mean_predicted: ``(K, B)`` mean probability in each bin (NaN where empty).
        observed: ``(K, B)`` fraction of positive labels in each bin (NaN where empty).
        counts: ``(K, B)`` number of known labels in each bin.
    """

    centers: np.ndarray
    mean_predicted: np.ndarray
    observed: np.ndarray
    counts: np.ndarray

    def ece(self) -> np.ndarray:
        """``(K,)`` expected calibration error of these bins (see
        :func:`expected_calibration_error`); NaN for a class without labels."""
        total = self.counts.sum(axis=1)
        gaps = np.where(self.counts > 0, np.abs(self.observed - self.mean_predicted), 0.0)
        out = np.full(self.counts.shape[0], np.nan)
        np.divide((self.counts * gaps).sum(axis=1), total, out=out, where=total > 0)
        return out


def reliability_curve(
    y_true: npt.ArrayLike, y_prob: npt.ArrayLike, n_bins: int = 15
) -> ReliabilityCurve:
    """Reliability diagram data with ``n_bins`` equal-width bins on ``[0, 1]``, per class.

    Args:
        y_true: labels (layouts in the module docstring); NaN entries are ignored.
        y_prob: probabilities (values outside ``[0, 1]`` fall in the end bins).
        n_bins: number of bins.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    t, p = _labels_and_probs(y_true, y_prob)
    k = t.shape[1]
    bins = np.clip(np.floor(p * n_bins), 0, n_bins - 1).astype(np.int64)
    counts = np.zeros((k, n_bins), dtype=np.int64)
    sum_p = np.zeros((k, n_bins))
    sum_y = np.zeros((k, n_bins))
    for c in range(k):
        known = ~np.isnan(t[:, c])
        counts[c] = np.bincount(bins[known, c], minlength=n_bins)
        sum_p[c] = np.bincount(bins[known, c], weights=p[known, c], minlength=n_bins)
        sum_y[c] = np.bincount(bins[known, c], weights=t[known, c], minlength=n_bins)
    mean_predicted = np.full((k, n_bins), np.nan)
    observed = np.full((k, n_bins), np.nan)
    np.divide(sum_p, counts, out=mean_predicted, where=counts > 0)
    np.divide(sum_y, counts, out=observed, where=counts > 0)
    centers = (np.arange(n_bins) + 0.5) / n_bins
    return ReliabilityCurve(centers, mean_predicted, observed, counts)


def expected_calibration_error(
    y_true: npt.ArrayLike, y_prob: npt.ArrayLike, n_bins: int = 15
) -> np.ndarray:
    """Expected calibration error per class, with equal-width bins.

    ``ECE_k = sum_b (n_kb / n_k) |o_kb - p_kb|`` over the ``n_bins`` bins ``[b/B, (b+1)/B)`` (the
    last closed at 1), where ``n_kb`` is the number of known labels of class ``k`` whose
    probability falls in bin ``b``, ``o_kb`` their fraction of positives and ``p_kb`` their mean
    probability; empty bins contribute nothing. 0 is perfect; the value depends on ``n_bins``
    and is biased upwards on small samples, so compare ECEs at equal bins and sample sizes.

    Args:
        y_true: labels (layouts in the module docstring); NaN entries are ignored.
        y_prob: probabilities.
        n_bins: number of equal-width bins.

    Returns:
        ``(K,)``; NaN for a class without known labels.
    """
    return reliability_curve(y_true, y_prob, n_bins).ece()


def reliability_figure(
    before: ReliabilityCurve,
    after: ReliabilityCurve | None = None,
    class_names: Sequence[str] | None = None,
) -> Any:
    """Per-class reliability diagrams, before and (optionally) after calibration.

    Args:
        before: :func:`reliability_curve` of the uncalibrated probabilities.
        after: the same for the calibrated probabilities, or None.
        class_names: ``K`` names (default ``"0"``, ``"1"``, ...).

    Returns:
        A ``matplotlib.figure.Figure`` with an Agg canvas (no pyplot state); save it with
        ``ichseg.fileio.save_figure`` or ``figure.savefig``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k = before.counts.shape[0]
    if after is not None and after.counts.shape != before.counts.shape:
        raise ValueError("before and after curves need the same classes and bins")
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for {k} classes")
    ncols = min(k, 3)
    nrows = math.ceil(k / ncols)
    fig = Figure(figsize=(3.4 * ncols, 3.4 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    curves = [("before", before, "tab:red")]
    if after is not None:
        curves.append(("after", after, "tab:blue"))
    for c, name in enumerate(names):
        ax = fig.add_subplot(nrows, ncols, c + 1)
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
        for label, curve, color in curves:
            filled = curve.counts[c] > 0
            ece = curve.ece()[c]
            ax.plot(
                curve.mean_predicted[c, filled],
                curve.observed[c, filled],
                marker="o",
                markersize=3,
                color=color,
                label=f"{label} (ECE {ece:.3f})" if math.isfinite(ece) else f"{label} (no labels)",
            )
        ax.set(
            xlim=(-0.02, 1.02),
            ylim=(-0.02, 1.02),
            xlabel="mean predicted",
            ylabel="observed frequency",
        )
        ax.set_title(f"{name} (n={int(before.counts[c].sum())})", fontsize="medium")
        ax.legend(loc="upper left", fontsize="small")
    return fig
