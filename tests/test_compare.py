"""DeLong tests against definitions and simulations; paired, cluster and seed bootstraps."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from ichseg.metrics.compare import (
    delong_auc,
    delong_covariance,
    delong_test,
    paired_bootstrap,
    paired_seed_patient_bootstrap,
    seed_patient_bootstrap,
)


def _rank_auc(y: np.ndarray, s: np.ndarray) -> float:
    """Mann-Whitney AUROC (ties count one half); NaN with a single label value."""
    m = int(y.sum())
    n = y.size - m
    if m == 0 or n == 0:
        return math.nan
    ranks = stats.rankdata(s)
    return float((ranks[y == 1].sum() - m * (m + 1) / 2.0) / (m * n))


def _binormal(rng: np.random.Generator, n: int, shift: float = 1.0, rate: float = 0.4):
    y = (rng.random(n) < rate).astype(float)
    return y, shift * y + rng.normal(size=n)


def _delong_reference(y: np.ndarray, scores: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """DeLong et al. (1988) straight from the definition, with explicit loops."""
    pos = [i for i in range(y.size) if y[i] == 1]
    neg = [j for j in range(y.size) if y[j] == 0]
    m, n = len(pos), len(neg)

    def psi(x: float, z: float) -> float:
        return 1.0 if x > z else 0.5 if x == z else 0.0

    v10 = [[sum(psi(s[i], s[j]) for j in neg) / n for i in pos] for s in scores]
    v01 = [[sum(psi(s[i], s[j]) for i in pos) / m for j in neg] for s in scores]
    aucs = np.array([sum(row) / m for row in v10])
    k = len(scores)
    cov = np.zeros((k, k))
    for r in range(k):
        for c in range(k):
            s10 = sum((v10[r][i] - aucs[r]) * (v10[c][i] - aucs[c]) for i in range(m)) / (m - 1)
            s01 = sum((v01[r][j] - aucs[r]) * (v01[c][j] - aucs[c]) for j in range(n)) / (n - 1)
            cov[r, c] = s10 / m + s01 / n
    return aucs, cov


# ---------------------------------------------------------------------------------------------
# DeLong
# ---------------------------------------------------------------------------------------------


def test_delong_auc_equals_mann_whitney_with_ties() -> None:
    rng = np.random.default_rng(0)
    y, s = _binormal(rng, 150)
    s = np.round(s, 1)  # many ties
    result = delong_auc(y, s)
    u = stats.mannwhitneyu(s[y == 1], s[y == 0]).statistic
    assert result.auc == pytest.approx(u / (y.sum() * (1 - y).sum()), abs=1e-12)
    assert result.auc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert result.n_positive == int(y.sum()) and result.n_negative == int((1 - y).sum())


def test_delong_variance_of_a_hand_computed_example() -> None:
    # Positives 0.9, 0.4; negatives 0.5, 0.1. psi: 0.9 beats both, 0.4 beats only 0.1.
    # V10 = [1, 1/2], V01 = [1/2, 1], AUC = 3/4, S10 = S01 = 2 * (1/4)^2 / 1 = 1/8,
    # var = S10 / 2 + S01 / 2 = 1/8.
    result = delong_auc([1, 1, 0, 0], [0.9, 0.4, 0.5, 0.1], alpha=0.05)
    assert result.auc == pytest.approx(0.75)
    assert result.variance == pytest.approx(0.125)
    assert result.se == pytest.approx(math.sqrt(0.125))
    assert result.ci_low == pytest.approx(0.75 - 1.959964 * math.sqrt(0.125), abs=1e-6)
    assert result.ci_high == 1.0  # Wald interval clipped to the AUROC's range


def test_delong_covariance_matches_loop_reference() -> None:
    rng = np.random.default_rng(1)
    y, a = _binormal(rng, 40)
    b = 0.5 * a + rng.normal(size=40)
    a, b = np.round(a, 1), np.round(b, 1)  # ties in and across classes
    aucs, cov = delong_covariance(y, np.stack([a, b]))
    ref_aucs, ref_cov = _delong_reference(y, [a, b])
    np.testing.assert_allclose(aucs, ref_aucs, atol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, atol=1e-12)
    result = delong_test(y, a, b)
    ref_se = math.sqrt(ref_cov[0, 0] + ref_cov[1, 1] - 2 * ref_cov[0, 1])
    assert result.delta == pytest.approx(ref_aucs[1] - ref_aucs[0])
    assert result.se == pytest.approx(ref_se)
    assert result.z == pytest.approx(result.delta / ref_se)
    assert result.p_value == pytest.approx(2 * stats.norm.sf(abs(result.delta / ref_se)))


def test_delong_variance_agrees_with_bootstrap() -> None:
    rng = np.random.default_rng(2)
    y, a = _binormal(rng, 300)
    b = a + 0.8 * rng.normal(size=300)  # correlated with a, lower AUROC
    aucs, cov = delong_covariance(y, np.stack([a, b]))
    boot = np.empty((2000, 2))
    for i in range(boot.shape[0]):
        idx = rng.integers(0, y.size, y.size)
        boot[i] = _rank_auc(y[idx], a[idx]), _rank_auc(y[idx], b[idx])
    assert cov[0, 0] == pytest.approx(boot[:, 0].var(ddof=1), rel=0.2)
    assert cov[1, 1] == pytest.approx(boot[:, 1].var(ddof=1), rel=0.2)
    delta_var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    assert delta_var == pytest.approx(np.var(boot[:, 1] - boot[:, 0], ddof=1), rel=0.2)


def test_delong_p_values_are_roughly_uniform_under_the_null() -> None:
    rng = np.random.default_rng(3)
    p_values = []
    for _ in range(300):
        y = (rng.random(120) < 0.4).astype(float)
        latent = y + rng.normal(size=120)
        # Two equally good, correlated models: same latent signal, independent noise.
        a = latent + 0.7 * rng.normal(size=120)
        b = latent + 0.7 * rng.normal(size=120)
        p_values.append(delong_test(y, a, b).p_value)
    p = np.array(p_values)
    assert 0.02 <= np.mean(p < 0.05) <= 0.09
    assert 0.4 <= np.mean(p < 0.5) <= 0.6


def test_delong_detects_a_real_difference() -> None:
    rng = np.random.default_rng(4)
    y, latent = _binormal(rng, 400, shift=1.5)
    result = delong_test(y, latent + 2.0 * rng.normal(size=400), latent)
    assert result.auc_b > result.auc_a
    assert result.p_value < 1e-3
    assert 0 < result.ci_low < result.delta < result.ci_high


def test_delong_degenerate_data_gives_nan_not_an_exception() -> None:
    no_pos = delong_test([0, 0, 0], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1])
    assert math.isnan(no_pos.auc_a) and math.isnan(no_pos.p_value) and math.isnan(no_pos.se)
    one_pos = delong_auc([1, 0, 0], [0.9, 0.2, 0.3])
    assert one_pos.auc == 1.0 and math.isnan(one_pos.variance) and math.isnan(one_pos.ci_low)
    json.dumps(no_pos.to_dict(), allow_nan=False)  # NaN became None


def test_delong_identical_scores_and_perfect_models() -> None:
    y = np.array([1, 1, 0, 0, 1, 0])
    s = np.array([0.8, 0.6, 0.3, 0.6, 0.9, 0.1])
    same = delong_test(y, s, s)
    assert same.delta == 0.0 and same.se == 0.0 and same.p_value == 1.0
    assert same.ci_low == same.ci_high == 0.0
    perfect = delong_test(y, y + 0.1, 2 * y)
    assert perfect.auc_a == perfect.auc_b == 1.0 and perfect.p_value == 1.0


def test_delong_rejects_wrong_shapes_and_labels() -> None:
    with pytest.raises(ValueError, match="must match"):
        delong_test([0, 1, 1], [0.1, 0.2, 0.3], [0.1, 0.2])
    with pytest.raises(ValueError, match="0 and 1"):
        delong_auc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"\(N,\)"):
        delong_auc([[0, 1]], [[0.1, 0.2]])
    with pytest.raises(ValueError, match="alpha"):
        delong_auc([0, 1], [0.1, 0.2], alpha=1.5)


# ---------------------------------------------------------------------------------------------
# Paired bootstrap
# ---------------------------------------------------------------------------------------------


def test_paired_bootstrap_of_identical_models_is_zero() -> None:
    rng = np.random.default_rng(5)
    y, s = _binormal(rng, 80)
    groups = np.repeat(np.arange(40), 2)
    result = paired_bootstrap(_rank_auc, y, s, s.copy(), groups, n_boot=200)
    assert result.delta == 0.0
    assert result.ci_low == 0.0 == result.ci_high
    assert result.p_value == 1.0
    assert result.n_units == 40 and result.n_boot == 200


def test_paired_bootstrap_agrees_with_delong_on_independent_rows() -> None:
    rng = np.random.default_rng(6)
    y, latent = _binormal(rng, 300)
    a = latent + 1.5 * rng.normal(size=300)
    boot = paired_bootstrap(_rank_auc, y, a, latent, None, n_boot=2000, seed=1)
    delong = delong_test(y, a, latent)
    assert boot.delta == pytest.approx(delong.delta, abs=1e-12)
    assert boot.estimate_a == pytest.approx(delong.auc_a)
    assert boot.ci_low == pytest.approx(delong.ci_low, abs=0.02)
    assert boot.ci_high == pytest.approx(delong.ci_high, abs=0.02)
    assert boot.p_value < 0.05 and delong.p_value < 0.05
    assert boot.n_valid == 2000
    swapped = paired_bootstrap(_rank_auc, y, latent, a, None, n_boot=2000, seed=1)
    assert swapped.delta == -boot.delta and swapped.p_value == pytest.approx(boot.p_value, abs=0.01)


def test_paired_bootstrap_resamples_whole_patients() -> None:
    rng = np.random.default_rng(7)
    y, a = _binormal(rng, 40)
    b = a + rng.normal(size=40)
    # Ten identical slices per patient: as many rows as 400 patients, the information of 40.
    y10, a10, b10 = (np.repeat(v, 10) for v in (y, a, b))
    groups = np.repeat(np.arange(40), 10)
    with_groups = paired_bootstrap(_rank_auc, y10, a10, b10, groups, n_boot=500)
    rows = paired_bootstrap(_rank_auc, y10, a10, b10, None, n_boot=500)
    patients = paired_bootstrap(_rank_auc, y, a, b, None, n_boot=500)
    width = lambda r: r.ci_high - r.ci_low  # noqa: E731
    assert with_groups.n_units == 40 and rows.n_units == 400
    assert width(with_groups) > 2.0 * width(rows)
    assert width(with_groups) == pytest.approx(width(patients), rel=0.25)


def test_paired_bootstrap_drops_and_counts_undefined_resamples() -> None:
    y = np.array([1.0, 0, 0, 0, 0, 0, 0, 0])
    a = np.linspace(0.1, 0.8, 8)
    b = a[::-1].copy()
    result = paired_bootstrap(_rank_auc, y, a, b, None, n_boot=300)
    # A resample holds the single positive with probability 1 - (7/8)^8, about 0.66.
    assert 150 < result.n_valid < 250
    assert result.delta == pytest.approx(1.0)  # b ranks the positive first, a last

    def raising(yt: np.ndarray, yp: np.ndarray) -> float:
        if yt.min() == yt.max():
            raise ValueError("only one class present")
        return _rank_auc(yt, yp)

    # A metric that raises ValueError where undefined loses the same resamples, silently.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        raised = paired_bootstrap(raising, y, a, b, None, n_boot=300)
    assert raised.n_valid == result.n_valid and raised.ci_low == pytest.approx(result.ci_low)
    none_valid = paired_bootstrap(_rank_auc, np.zeros(8), a, b, None, n_boot=50)
    assert none_valid.n_valid == 0 and math.isnan(none_valid.ci_low)
    assert math.isnan(none_valid.p_value)


def test_paired_bootstrap_accepts_multilabel_arrays_and_checks_shapes() -> None:
    rng = np.random.default_rng(8)
    y = (rng.random((60, 3)) < 0.4).astype(float)
    a = y + rng.normal(size=(60, 3))
    b = y + 0.3 * rng.normal(size=(60, 3))

    def macro_auc(yt: np.ndarray, yp: np.ndarray) -> float:
        return float(np.mean([_rank_auc(yt[:, k], yp[:, k]) for k in range(yt.shape[1])]))

    result = paired_bootstrap(macro_auc, y, a, b, np.arange(60) // 2, n_boot=200)
    assert result.delta > 0 and result.ci_low > 0 and result.n_units == 30
    with pytest.raises(ValueError, match="shapes differ"):
        paired_bootstrap(macro_auc, y, a, b[:, :2], None)
    with pytest.raises(ValueError, match="rows"):
        paired_bootstrap(macro_auc, y, a[:50], b[:50], None)
    with pytest.raises(ValueError, match="groups"):
        paired_bootstrap(macro_auc, y, a, b, np.arange(59))


# ---------------------------------------------------------------------------------------------
# Seeds and patients
# ---------------------------------------------------------------------------------------------


def _mean_prob(yt: np.ndarray, yp: np.ndarray) -> float:
    return float(np.mean(yp))


def test_seed_patient_bootstrap_of_seed_only_variation() -> None:
    # Each seed predicts a constant: patients do not matter, only which seeds are drawn.
    probs = [np.full(20, c) for c in (0.0, 1.0, 2.0)]
    result = seed_patient_bootstrap(_mean_prob, np.zeros(20), probs, None, n_boot=2000)
    assert result.mean == 1.0 and result.per_seed == (0.0, 1.0, 2.0)
    # P(all three draws are seed 0) = 1/27 > 2.5 %, so the percentiles are the extremes.
    assert (result.ci_low, result.ci_high) == (0.0, 2.0)


def test_seed_patient_interval_is_wider_than_the_seed_t_interval() -> None:
    rng = np.random.default_rng(9)
    patients = 30
    y = np.repeat((rng.random(patients) < 0.5).astype(float), 4)
    groups = np.repeat(np.arange(patients), 4)
    latent = y + rng.normal(size=y.size)
    # Three seeds that barely differ: the seed t-interval sees almost no uncertainty, though
    # 30 test patients leave the AUROC uncertain by several points.
    probs = [latent + 0.05 * rng.normal(size=y.size) for _ in range(3)]
    result = seed_patient_bootstrap(_rank_auc, y, probs, groups, n_boot=500, seed=2)
    per_seed = np.array([_rank_auc(y, p) for p in probs])
    half = stats.t.ppf(0.975, 2) * per_seed.std(ddof=1) / math.sqrt(3)
    assert result.mean == pytest.approx(per_seed.mean())
    assert result.ci_low < result.mean < result.ci_high
    assert result.ci_high - result.ci_low > 3.0 * (2.0 * half)
    assert result.n_valid == 500 and result.n_units == patients


def test_seed_patient_bootstrap_nan_seed_shows_and_checks_inputs() -> None:
    y = np.array([1.0, 0, 1, 0])
    probs = [np.array([0.9, 0.1, 0.8, 0.3]), np.array([0.2, 0.4, 0.9, 0.1])]

    def fragile(yt: np.ndarray, yp: np.ndarray) -> float:
        return math.nan if yp[0] == 0.2 else _rank_auc(yt, yp)

    result = seed_patient_bootstrap(fragile, y, probs, None, n_boot=100)
    assert math.isnan(result.mean)
    json.dumps(result.to_dict(), allow_nan=False)
    with pytest.raises(ValueError, match="at least one seed"):
        seed_patient_bootstrap(_rank_auc, y, [], None)
    with pytest.raises(ValueError, match="n_boot"):
        seed_patient_bootstrap(_rank_auc, y, probs, None, n_boot=0)


def test_paired_seed_patient_bootstrap_shares_the_patient_resample() -> None:
    rng = np.random.default_rng(10)
    y, s = _binormal(rng, 60)
    groups = np.arange(60) // 3
    # One seed per rung, identical predictions: any difference would come from unpaired patients.
    same = paired_seed_patient_bootstrap(_rank_auc, y, [s], [s.copy()], groups, n_boot=300)
    assert (same.delta, same.ci_low, same.ci_high, same.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_paired_seed_patient_bootstrap_finds_a_better_rung() -> None:
    rng = np.random.default_rng(11)
    patients = 60
    y = np.repeat((rng.random(patients) < 0.5).astype(float), 3)
    groups = np.repeat(np.arange(patients), 3)
    latent = 1.5 * y + rng.normal(size=y.size)
    rung_a = [latent + 1.5 * rng.normal(size=y.size) for _ in range(3)]
    rung_b = [latent + 0.2 * rng.normal(size=y.size) for _ in range(4)]
    result = paired_seed_patient_bootstrap(_rank_auc, y, rung_a, rung_b, groups, n_boot=400)
    assert result.estimate_a == pytest.approx(np.mean([_rank_auc(y, p) for p in rung_a]))
    assert result.estimate_b == pytest.approx(np.mean([_rank_auc(y, p) for p in rung_b]))
    assert result.delta == pytest.approx(result.estimate_b - result.estimate_a)
    assert 0 < result.ci_low < result.delta < result.ci_high
    assert result.p_value < 0.01
    # Equal rungs with independent seed draws: an interval around zero, not a point.
    null = paired_seed_patient_bootstrap(_rank_auc, y, rung_a, rung_a, groups, n_boot=400)
    assert null.delta == 0.0 and null.ci_low < 0 < null.ci_high and null.p_value > 0.2
