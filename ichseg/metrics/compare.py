"""Comparing models honestly: DeLong tests of AUROCs and patient- and seed-level bootstraps.

Two rungs of the ablation ladder are evaluated on the same test patients, so their metrics are
correlated; comparing two independent intervals wastes that pairing and is too conservative,
while a Student-t interval over a handful of training seeds ignores that the test patients are a
sample too. The functions here answer "is rung B better than rung A, and by how much?" with
both sources of uncertainty.

- :func:`delong_test` / :func:`delong_auc`: the analytic DeLong (1988) variance of one AUROC
  or of the difference of two AUROCs on the same cases, computed with the midrank algorithm of
  Sun & Xu (2014) in ``O(N log N)``. Rows are treated as independent cases: aggregate slices to
  one row per patient (or series) first, or use a bootstrap with ``groups``.
- :func:`paired_bootstrap`: any metric, whole patients resampled, the same resample for both
  models.
- :func:`seed_patient_bootstrap` / :func:`paired_seed_patient_bootstrap`: several training seeds
  per rung; resamples both the test patients and the seeds.

Conventions: ``metric(y_true, y_prob) -> float`` is called on row subsets, so ``y_true`` and the
predictions may be ``(N,)`` or ``(N, K)`` (or anything whose first axis is the rows) as long as
the metric understands them. A metric that is undefined on a resample (it returns NaN or raises
``ValueError``, e.g. for a resample with one class) makes that resample invalid: it is dropped and
counted, never an exception. Wrong shapes are a ``ValueError``. Intervals are percentile
intervals; all results are frozen dataclasses whose ``to_dict()`` is strict JSON (NaN -> None).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import stats

from ichseg.options import look_up_option

Metric = Callable[[Any, Any], float]
"""``metric(y_true_rows, y_prob_rows) -> float``; NaN when undefined on those rows."""


def _json_value(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_json_value(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class _JsonResult:
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict; NaN and infinities become None."""
        return {key: _json_value(value) for key, value in asdict(self).items()}


# ---------------------------------------------------------------------------------------------
# DeLong
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AUCInterval(_JsonResult):
    """One AUROC with its DeLong variance and Wald interval (clipped to ``[0, 1]``)."""

    auc: float
    variance: float
    se: float
    ci_low: float
    ci_high: float
    alpha: float
    n_positive: int
    n_negative: int


@dataclass(frozen=True)
class DeLongResult(_JsonResult):
    """Paired DeLong test of ``auc_b - auc_a`` on the same cases.

    ``ci_low``/``ci_high`` is the Wald ``1 - alpha`` interval of ``delta`` (clipped to
    ``[-1, 1]``); ``p_value`` is two-sided.
    """

    auc_a: float
    auc_b: float
    delta: float
    se: float
    z: float
    p_value: float
    ci_low: float
    ci_high: float
    alpha: float
    n_positive: int
    n_negative: int


def _binary_labels(y_true: npt.ArrayLike) -> np.ndarray:
    y = np.asarray(y_true, dtype=np.float64)
    if y.ndim != 1:
        raise ValueError(f"y_true must be (N,) for an AUROC, got shape {y.shape}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("y_true must contain only 0 and 1")
    return y.astype(bool)


def _score_rows(scores: npt.ArrayLike, n: int) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 1:
        s = s[None, :]
    if s.ndim != 2 or s.shape[1] != n:
        raise ValueError(f"scores must be (N,) or (n_models, N) with N = {n}, got {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    return s


def delong_covariance(
    y_true: npt.ArrayLike, scores: npt.ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs of several scores on the same cases and their DeLong covariance matrix.

    With ``m`` positives and ``n`` negatives, the placement value of positive ``i`` is
    ``V10_i = mean_j psi(x_i, y_j)`` over negatives ``j`` and that of negative ``j`` is
    ``V01_j = mean_i psi(x_i, y_j)``, where ``psi(x, y) = 1`` if ``x > y``, ``1/2`` on a tie,
    else 0. The AUROC is the mean of either, and ``Cov = S10 / m + S01 / n`` with ``S10``,
    ``S01`` the sample covariances (``ddof=1``) of the placement values across models. Sun & Xu
    (2014) obtain all placement values from midranks: ``V10_i = (rank of x_i among all cases -
    rank among positives) / n``, which is what this function does.

    Args:
        y_true: ``(N,)`` 0/1 labels.
        scores: ``(N,)`` for one model or ``(n_models, N)``, higher = more likely positive.

    Returns:
        ``(aucs, cov)`` of shapes ``(n_models,)`` and ``(n_models, n_models)``. Without
        positives or negatives everything is NaN; with a single positive (negative) the
        covariance is NaN because ``S10`` (``S01``) cannot be estimated.
    """
    y = _binary_labels(y_true)
    s = _score_rows(scores, y.size)
    k = s.shape[0]
    m = int(y.sum())
    n = y.size - m
    if m == 0 or n == 0:
        return np.full(k, math.nan), np.full((k, k), math.nan)
    pos, neg = s[:, y], s[:, ~y]
    rank_all = stats.rankdata(np.concatenate([pos, neg], axis=1), axis=1)  # midranks
    rank_pos = rank_all[:, :m]
    v10 = (rank_pos - stats.rankdata(pos, axis=1)) / n
    v01 = 1.0 - (rank_all[:, m:] - stats.rankdata(neg, axis=1)) / m
    aucs = (rank_pos.sum(axis=1) - m * (m + 1) / 2.0) / (m * n)
    if m < 2 or n < 2:
        return aucs, np.full((k, k), math.nan)
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return aucs, cov


def _z_crit(alpha: float) -> float:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return float(stats.norm.ppf(1.0 - alpha / 2.0))


def delong_auc(y_true: npt.ArrayLike, score: npt.ArrayLike, alpha: float = 0.05) -> AUCInterval:
    """One AUROC with its DeLong variance and ``1 - alpha`` Wald interval.

    Args:
        y_true: ``(N,)`` 0/1 labels, one row per independent case.
        score: ``(N,)`` scores.
        alpha: 0.05 for a 95 % interval.

    Returns:
        :class:`AUCInterval`; NaN fields where undefined (see :func:`delong_covariance`).
    """
    z_crit = _z_crit(alpha)
    y = _binary_labels(y_true)
    aucs, cov = delong_covariance(y, score)
    auc, var = float(aucs[0]), float(cov[0, 0])
    se = math.sqrt(var) if var >= 0 else math.nan
    return AUCInterval(
        auc=auc,
        variance=var,
        se=se,
        ci_low=max(0.0, auc - z_crit * se) if math.isfinite(se) else math.nan,
        ci_high=min(1.0, auc + z_crit * se) if math.isfinite(se) else math.nan,
        alpha=alpha,
        n_positive=int(y.sum()),
        n_negative=int((~y).sum()),
    )


def delong_test(
    y_true: npt.ArrayLike, score_a: npt.ArrayLike, score_b: npt.ArrayLike, alpha: float = 0.05
) -> DeLongResult:
    """Paired DeLong test of two correlated AUROCs on the same cases.

    ``delta = auc_b - auc_a``, ``se = sqrt(var_a + var_b - 2 cov_ab)``, ``z = delta / se`` and
    ``p = 2 (1 - Phi(|z|))``. When ``se`` is 0 (e.g. identical scores, or both models separate
    the classes perfectly) and ``delta`` is 0, ``z = 0`` and ``p = 1``: there is no difference
    to test; with ``se = 0`` and ``delta != 0``, ``z = +-inf`` and ``p = 0``.

    Args:
        y_true: ``(N,)`` 0/1 labels, one row per independent case (patient or series).
        score_a: ``(N,)`` scores of the reference model.
        score_b: ``(N,)`` scores of the compared model.
        alpha: 0.05 for a 95 % interval of ``delta``.

    Returns:
        :class:`DeLongResult`; NaN fields where undefined.
    """
    z_crit = _z_crit(alpha)
    y = _binary_labels(y_true)
    a = np.asarray(score_a, dtype=np.float64)
    b = np.asarray(score_b, dtype=np.float64)
    if a.shape != y.shape or b.shape != y.shape:
        raise ValueError(f"score_a {a.shape} and score_b {b.shape} must match y_true {y.shape}")
    aucs, cov = delong_covariance(y, np.stack([a, b]))
    delta = float(aucs[1] - aucs[0])
    var = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    # Rounding can leave a tiny negative variance for (nearly) identical scores.
    se = math.sqrt(max(var, 0.0)) if math.isfinite(var) else math.nan
    if not math.isfinite(se) or math.isnan(delta):
        z = p = low = high = math.nan
    else:
        if se > 0.0:
            z = delta / se
        else:
            z = 0.0 if delta == 0.0 else math.copysign(math.inf, delta)
        p = float(2.0 * stats.norm.sf(abs(z)))
        low, high = max(-1.0, delta - z_crit * se), min(1.0, delta + z_crit * se)
    return DeLongResult(
        auc_a=float(aucs[0]),
        auc_b=float(aucs[1]),
        delta=delta,
        se=se,
        z=z,
        p_value=p,
        ci_low=low,
        ci_high=high,
        alpha=alpha,
        n_positive=int(y.sum()),
        n_negative=int((~y).sum()),
    )


# ---------------------------------------------------------------------------------------------
# Bootstraps
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BootstrapComparison(_JsonResult):
    """``delta = estimate_b - estimate_a`` with a percentile interval and a bootstrap p-value.

    ``n_valid`` of ``n_boot`` resamples gave a value; ``n_units`` patients (or rows) were
    resampled. With seeds, the estimates are means over seeds.
    """

    estimate_a: float
    estimate_b: float
    delta: float
    ci_low: float
    ci_high: float
    p_value: float
    n_valid: int
    n_boot: int
    n_units: int
    alpha: float


@dataclass(frozen=True)
class SeedPatientInterval(_JsonResult):
    """Mean of a metric over training seeds with an interval over seeds and test patients."""

    mean: float
    ci_low: float
    ci_high: float
    per_seed: tuple[float, ...]
    n_valid: int
    n_boot: int
    n_units: int
    alpha: float


class _ClusterSampler:
    """Draws row indices of a resample of whole clusters (patients) with replacement."""

    def __init__(self, n_rows: int, groups: npt.ArrayLike | None) -> None:
        if groups is None:
            self._members = None
            self.n_units = n_rows
            return
        g = np.asarray(groups)
        if g.shape != (n_rows,):
            raise ValueError(f"groups needs one entry per row ({n_rows}), got shape {g.shape}")
        _, inverse = np.unique(g, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        boundaries = np.cumsum(np.bincount(inverse))[:-1]
        self._members = np.split(order, boundaries)
        self.n_units = len(self._members)

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        picked = rng.integers(0, self.n_units, size=self.n_units)
        if self._members is None:
            return picked
        return np.concatenate([self._members[i] for i in picked])


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence warnings inside resample loops.

    Undefined resamples are counted in ``n_valid``; a metric's warning for each of them would
    bury the log. The full-data evaluation runs outside, so its warnings still show.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _metric_or_nan(metric: Metric, y: Any, p: Any) -> float:
    try:
        return float(metric(y, p))
    except ValueError:
        # Many metrics raise ValueError where undefined (e.g. one class present in a resample).
        return math.nan


def _rows(array: npt.ArrayLike, name: str) -> np.ndarray:
    out = np.asarray(array)
    if out.ndim == 0:
        raise ValueError(f"{name} must have one row per case, got a scalar")
    return out


def _check_predictions(y: np.ndarray, predictions: Sequence[np.ndarray], name: str) -> None:
    for p in predictions:
        if p.shape[0] != y.shape[0]:
            raise ValueError(f"{name} has {p.shape[0]} rows but y_true has {y.shape[0]}")
        if p.shape != predictions[0].shape:
            raise ValueError(
                f"{name}: prediction shapes differ ({p.shape} vs {predictions[0].shape})"
            )


def _seed_list(probs_per_seed: Sequence[npt.ArrayLike], name: str) -> list[np.ndarray]:
    seeds = [_rows(p, name) for p in probs_per_seed]
    if not seeds:
        raise ValueError(f"{name} needs the predictions of at least one seed")
    return seeds


def _percentile_ci(values: np.ndarray, alpha: float) -> tuple[float, float]:
    if values.size == 0:
        return math.nan, math.nan
    low, high = np.percentile(values, [100.0 * alpha / 2.0, 100.0 * (1.0 - alpha / 2.0)])
    return float(low), float(high)


def _bootstrap_p(deltas: np.ndarray) -> float:
    """Two-sided p of ``delta = 0``: the smallest alpha whose percentile interval excludes 0.

    ``2 (1 + min(#{d <= 0}, #{d >= 0})) / (n + 1)``, capped at 1; the ``+ 1`` keeps it above
    zero, since ``n`` resamples cannot resolve a p-value below about ``2 / n``.
    """
    if deltas.size == 0:
        return math.nan
    tail = min(int((deltas <= 0).sum()), int((deltas >= 0).sum()))
    return min(1.0, 2.0 * (1 + tail) / (deltas.size + 1))


INTERVALS = ("percentile", "basic")
"""Bootstrap intervals: ``percentile`` (the resampled deltas' quantiles) and ``basic`` (those
reflected about the full-data delta, ``2 delta - d``: corrects a metric whose resamples are
biased, e.g. the expected calibration error, which duplicated patients inflate)."""


def _comparison(
    estimate_a: float,
    estimate_b: float,
    deltas: np.ndarray,
    n_units: int,
    alpha: float,
    interval: str = "percentile",
) -> BootstrapComparison:
    """Summarise resampled deltas (NaN = invalid resample) around the full-data estimates."""
    if interval == "basic":
        deltas = 2.0 * (estimate_b - estimate_a) - deltas
    valid = deltas[~np.isnan(deltas)]
    low, high = _percentile_ci(valid, alpha)
    return BootstrapComparison(
        estimate_a=estimate_a,
        estimate_b=estimate_b,
        delta=estimate_b - estimate_a,
        ci_low=low,
        ci_high=high,
        p_value=_bootstrap_p(valid),
        n_valid=int(valid.size),
        n_boot=int(deltas.size),
        n_units=n_units,
        alpha=alpha,
    )


def _check_boot(n_boot: int, alpha: float) -> None:
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    _z_crit(alpha)


def paired_bootstrap(
    metric: Metric,
    y_true: npt.ArrayLike,
    prob_a: npt.ArrayLike,
    prob_b: npt.ArrayLike,
    groups: npt.ArrayLike | None,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
    interval: str = "percentile",
) -> BootstrapComparison:
    """Paired cluster bootstrap of ``metric(b) - metric(a)`` on the same test cases.

    Each resample draws whole groups (patients) with replacement, since slices of one patient
    are correlated, and evaluates both models on the same rows, so the pairing cancels the
    case-mix variation the two models share.

    Args:
        metric: ``metric(y_true, y_prob) -> float`` (NaN where undefined).
        y_true: labels, first axis = rows (``(N,)`` or ``(N, K)``).
        prob_a: predictions of the reference model, rows aligned with ``y_true``.
        prob_b: predictions of the compared model, same shape as ``prob_a``.
        groups: ``(N,)`` patient of each row; None resamples rows (only right when rows are
            independent).
        n_boot: number of resamples.
        seed: random seed.
        alpha: 0.05 for a 95 % interval.
        interval: ``"percentile"`` or ``"basic"`` (:data:`INTERVALS`); the p-value is taken
            from the same (reflected, for ``basic``) deltas.

    Returns:
        :class:`BootstrapComparison` with ``delta`` on the full data, the interval of the
        resampled deltas, and the p-value of :func:`_bootstrap_p`. A resample where either
        metric is undefined is dropped (``n_valid`` counts the others).
    """
    _check_boot(n_boot, alpha)
    look_up_option("bootstrap interval", interval, INTERVALS, ValueError)
    y = _rows(y_true, "y_true")
    a, b = _rows(prob_a, "prob_a"), _rows(prob_b, "prob_b")
    _check_predictions(y, [a, b], "prob_a/prob_b")
    sampler = _ClusterSampler(y.shape[0], groups)
    estimate_a, estimate_b = float(metric(y, a)), float(metric(y, b))
    rng = np.random.default_rng(seed)
    deltas = np.empty(n_boot)
    with _quiet():
        for i in range(n_boot):
            rows = sampler.draw(rng)
            yr = y[rows]
            deltas[i] = _metric_or_nan(metric, yr, b[rows]) - _metric_or_nan(metric, yr, a[rows])
    return _comparison(estimate_a, estimate_b, deltas, sampler.n_units, alpha, interval)


def _seed_mean(
    metric: Metric, y: np.ndarray, seeds: list[np.ndarray], rows: np.ndarray, picked: np.ndarray
) -> float:
    """Mean over the drawn seeds (with multiplicity) of the metric on the drawn rows."""
    drawn, counts = np.unique(picked, return_counts=True)
    y_rows = y[rows]
    total = 0.0
    for s, count in zip(drawn, counts, strict=True):
        value = _metric_or_nan(metric, y_rows, seeds[s][rows])
        if math.isnan(value):
            return math.nan
        total += count * value
    return total / picked.size


def seed_patient_bootstrap(
    metric: Metric,
    y_true: npt.ArrayLike,
    probs_per_seed: Sequence[npt.ArrayLike],
    groups: npt.ArrayLike | None,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> SeedPatientInterval:
    """Interval of a ladder cell (one rung, several training seeds) over seeds and test patients.

    The quantity of interest is the metric a rung's recipe achieves on average over training
    randomness, on the population the test patients come from. Its estimate, the mean over ``S``
    seeds of the metric on the test set, varies for two reasons: another set of seeds would give
    other models (seed variance), and another sample of test patients would give other values
    (test-sampling variance, the larger one on small test sets). A Student-t interval over seeds
    sees only the first: every seed is scored on the same patients. Each resample here draws the
    patients (whole clusters) with replacement and, independently, ``S`` seeds with
    replacement, and records the mean over the drawn seeds of the metric on the drawn patients,
    so both sources enter the spread. Seeds and patients are crossed (every seed scores every
    patient), and no bootstrap of a crossed design is exact (McCullagh 2000): resampling both
    factors counts the seed x patient interaction about three times instead of once, which errs
    wide, while resampling ``S`` seeds shrinks their variance by ``(S - 1) / S``, which errs
    narrow when ``S`` is small.

    Not covered: the variance from the choice of training and validation patients (the split is
    fixed; a new training sample would give other models), shifts between this data and other
    sites or scanners, label noise, and selection effects of having chosen hyperparameters or
    the reported rung after looking at results. With few seeds (3 give 10 distinct seed
    multisets) the seed part of the interval is coarse.

    Args:
        metric: ``metric(y_true, y_prob) -> float`` (NaN where undefined).
        y_true: labels, first axis = rows.
        probs_per_seed: one prediction array per training seed, all on the same rows.
        groups: ``(N,)`` patient of each row; None resamples rows.
        n_boot: number of resamples.
        seed: random seed of the bootstrap.
        alpha: 0.05 for a 95 % interval.

    Returns:
        :class:`SeedPatientInterval`: ``mean`` over seeds on the full data (NaN when a seed's
        metric is, so a failed seed shows), ``per_seed`` values, the percentile interval and
        the number of valid resamples (a resample with any undefined metric is dropped).
    """
    _check_boot(n_boot, alpha)
    y = _rows(y_true, "y_true")
    seeds = _seed_list(probs_per_seed, "probs_per_seed")
    _check_predictions(y, seeds, "probs_per_seed")
    sampler = _ClusterSampler(y.shape[0], groups)
    per_seed = tuple(float(metric(y, p)) for p in seeds)
    rng = np.random.default_rng(seed)
    values = np.empty(n_boot)
    with _quiet():
        for i in range(n_boot):
            rows = sampler.draw(rng)
            picked = rng.integers(0, len(seeds), size=len(seeds))
            values[i] = _seed_mean(metric, y, seeds, rows, picked)
    values = values[~np.isnan(values)]
    low, high = _percentile_ci(values, alpha)
    return SeedPatientInterval(
        mean=float(np.mean(per_seed)),
        ci_low=low,
        ci_high=high,
        per_seed=per_seed,
        n_valid=int(values.size),
        n_boot=n_boot,
        n_units=sampler.n_units,
        alpha=alpha,
    )


def paired_seed_patient_bootstrap(
    metric: Metric,
    y_true: npt.ArrayLike,
    probs_a_per_seed: Sequence[npt.ArrayLike],
    probs_b_per_seed: Sequence[npt.ArrayLike],
    groups: npt.ArrayLike | None,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> BootstrapComparison:
    """Difference of two rungs' seed-mean metrics, resampling test patients and seeds.

    Each resample draws one set of patients shared by both rungs (the pairing) and draws the
    seeds of each rung independently: seed ``k`` of rung A and seed ``k`` of rung B are
    different models, not a pair. The statistic is ``mean_B - mean_A`` of the seed means on the
    drawn patients. What this covers and what it does not is as in
    :func:`seed_patient_bootstrap`.

    Args:
        metric: ``metric(y_true, y_prob) -> float`` (NaN where undefined).
        y_true: labels, first axis = rows.
        probs_a_per_seed: predictions of the reference rung, one array per seed.
        probs_b_per_seed: predictions of the compared rung, one array per seed (the number of
            seeds may differ from rung A's).
        groups: ``(N,)`` patient of each row; None resamples rows.
        n_boot: number of resamples.
        seed: random seed of the bootstrap.
        alpha: 0.05 for a 95 % interval.

    Returns:
        :class:`BootstrapComparison` whose estimates are means over seeds on the full data.
    """
    _check_boot(n_boot, alpha)
    y = _rows(y_true, "y_true")
    seeds_a = _seed_list(probs_a_per_seed, "probs_a_per_seed")
    seeds_b = _seed_list(probs_b_per_seed, "probs_b_per_seed")
    _check_predictions(y, seeds_a + seeds_b, "probs_a_per_seed/probs_b_per_seed")
    sampler = _ClusterSampler(y.shape[0], groups)
    estimate_a = float(np.mean([float(metric(y, p)) for p in seeds_a]))
    estimate_b = float(np.mean([float(metric(y, p)) for p in seeds_b]))
    rng = np.random.default_rng(seed)
    deltas = np.empty(n_boot)
    with _quiet():
        for i in range(n_boot):
            rows = sampler.draw(rng)
            picked_a = rng.integers(0, len(seeds_a), size=len(seeds_a))
            picked_b = rng.integers(0, len(seeds_b), size=len(seeds_b))
            deltas[i] = _seed_mean(metric, y, seeds_b, rows, picked_b) - _seed_mean(
                metric, y, seeds_a, rows, picked_a
            )
    return _comparison(estimate_a, estimate_b, deltas, sampler.n_units, alpha)
