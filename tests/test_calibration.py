"""Calibration: measures against hand computations, temperature recovery, isotonic round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import special
from sklearn.isotonic import IsotonicRegression

from ichseg.metrics.calibration import (
    TEMPERATURE_BOUNDS,
    Calibrator,
    brier_score,
    expected_calibration_error,
    fit_temperature_multiclass,
    fit_temperature_multilabel,
    per_class_log_loss,
    reliability_curve,
    reliability_figure,
)


def _miscalibrated_multilabel(n: int, temperatures: tuple[float, ...], seed: int):
    """Labels drawn from sigmoid(z); the model reports logits z * T (overconfident for T > 1)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, size=(n, len(temperatures)))
    y = (rng.random(z.shape) < special.expit(z)).astype(float)
    return y, z * np.asarray(temperatures)


# ---------------------------------------------------------------------------------------------
# Measures
# ---------------------------------------------------------------------------------------------


def test_ece_and_reliability_curve_of_a_hand_computed_example() -> None:
    # Two bins, [0, 0.5) and [0.5, 1]: the low bin holds 0.1 (y=0) and 0.2 (y=1): mean 0.15,
    # observed 0.5; the high bin holds 0.5 (y=1), 0.9 (y=1), 1.0 (y=0): mean 0.8, observed 2/3.
    # ECE = 2/5 * 0.35 + 3/5 * (0.8 - 2/3) = 0.14 + 0.08 = 0.22. The NaN label is ignored.
    y = np.array([0, 1, 1, 1, 0, np.nan])
    p = np.array([0.1, 0.2, 0.5, 0.9, 1.0, 0.3])
    assert expected_calibration_error(y, p, n_bins=2) == pytest.approx([0.22])
    curve = reliability_curve(y, p, n_bins=2)
    np.testing.assert_allclose(curve.centers, [0.25, 0.75])
    np.testing.assert_array_equal(curve.counts, [[2, 3]])
    np.testing.assert_allclose(curve.mean_predicted, [[0.15, 0.8]])
    np.testing.assert_allclose(curve.observed, [[0.5, 2 / 3]])
    # Brier: (0.01 + 0.64 + 0.25 + 0.01 + 1.0) / 5.
    assert brier_score(y, p) == pytest.approx([1.91 / 5])


def test_measures_per_class_and_for_class_indices() -> None:
    y = np.array([[1, 0], [0, np.nan], [1, np.nan]])
    p = np.array([[0.8, 0.3], [0.4, 0.9], [0.6, 0.5]])
    np.testing.assert_allclose(brier_score(y, p), [(0.04 + 0.16 + 0.16) / 3, 0.09])
    log_loss = per_class_log_loss(y, p)
    assert log_loss[1] == pytest.approx(-np.log(0.7))
    assert np.isnan(brier_score([[np.nan]], [[0.5]])[0])
    assert np.isnan(expected_calibration_error([[np.nan]], [[0.5]])[0])
    # (N,) class indices with (N, K) probabilities are scored one-vs-rest.
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    onehot = np.array([[1.0, 0, 0], [0, 0, 1.0]])
    np.testing.assert_allclose(brier_score([0, 2], probs), brier_score(onehot, probs))
    with pytest.raises(ValueError, match="integers"):
        brier_score([0, 3], probs)
    with pytest.raises(ValueError, match="0, 1 or NaN"):
        brier_score([[0.5, 1, 0]], [[0.5, 0.5, 0.5]])
    with pytest.raises(ValueError, match="does not match"):
        brier_score(onehot[:, :2], probs)


def test_perfectly_calibrated_probabilities_have_small_ece() -> None:
    rng = np.random.default_rng(0)
    p = rng.random((50_000, 2))
    y = (rng.random(p.shape) < p).astype(float)
    assert expected_calibration_error(y, p).max() < 0.01
    overconfident = special.expit(3 * special.logit(p))
    assert expected_calibration_error(y, overconfident).min() > 0.08


# ---------------------------------------------------------------------------------------------
# Temperature scaling
# ---------------------------------------------------------------------------------------------


def test_temperature_scaling_recovers_known_temperatures() -> None:
    true_t = (2.0, 0.5, 1.0)
    y_val, z_val = _miscalibrated_multilabel(20_000, true_t, seed=1)
    fitted = fit_temperature_multilabel(z_val, y_val)
    np.testing.assert_allclose(fitted, true_t, rtol=0.06)

    y_test, z_test = _miscalibrated_multilabel(20_000, true_t, seed=2)
    raw = special.expit(z_test)
    calibrator = Calibrator.fit_logits(y_val, z_val, method="temperature")
    assert calibrator.temperatures == pytest.approx(tuple(fitted))
    calibrated = calibrator.apply(raw)
    nll_before, nll_after = per_class_log_loss(y_test, raw), per_class_log_loss(y_test, calibrated)
    ece_before = expected_calibration_error(y_test, raw)
    ece_after = expected_calibration_error(y_test, calibrated)
    assert (nll_after[:2] < nll_before[:2] - 0.01).all()  # the two miscalibrated classes
    assert (ece_after[:2] < 0.5 * ece_before[:2]).all()
    assert nll_after[2] == pytest.approx(nll_before[2], abs=2e-3)  # T = 1 stays as it was
    # Fitting from probabilities (logits recovered by clipped logit) gives the same map.
    from_probs = Calibrator.fit(y_val, special.expit(z_val), method="temperature")
    assert from_probs.temperatures == pytest.approx(calibrator.temperatures, rel=1e-3)


def test_multiclass_temperature_is_recovered() -> None:
    rng = np.random.default_rng(3)
    z = rng.normal(0.0, 1.5, size=(20_000, 4))
    probs_true = special.softmax(z, axis=1)
    y = (rng.random((z.shape[0], 1)) > np.cumsum(probs_true, axis=1)).sum(axis=1)
    assert fit_temperature_multiclass(2.0 * z, y) == pytest.approx(2.0, rel=0.05)
    calibrator = Calibrator.fit(y, special.softmax(2.0 * z, axis=1), task="multiclass")
    assert calibrator.temperatures[0] == pytest.approx(2.0, rel=0.05)
    out = calibrator.apply(special.softmax(2.0 * z, axis=1))
    np.testing.assert_allclose(out.sum(axis=1), 1.0)
    exact = special.softmax(2.0 * z / calibrator.temperatures[0], 1)
    # Equal to rescaling the logits, except where a probability was clipped at EPS = 1e-7.
    unclipped = special.softmax(2.0 * z, axis=1).min(axis=1) > 1e-7
    assert unclipped.mean() > 0.9
    np.testing.assert_allclose(out[unclipped], exact[unclipped], rtol=1e-9)
    np.testing.assert_allclose(out, exact, atol=1e-3)
    assert fit_temperature_multiclass(z, np.zeros(z.shape[0])) == 1.0  # one class only
    y_nan = y.astype(float)
    y_nan[:5000] = np.nan
    assert fit_temperature_multiclass(2.0 * z, y_nan) == pytest.approx(
        fit_temperature_multiclass(2.0 * z[5000:], y[5000:])
    )


def test_constant_label_column_keeps_temperature_one() -> None:
    y, z = _miscalibrated_multilabel(2000, (2.0, 2.0, 2.0), seed=4)
    y[:, 1] = 1.0  # every study positive
    y[:, 2] = np.nan  # no labels at all
    fitted = fit_temperature_multilabel(z, y)
    assert fitted[1] == 1.0 and fitted[2] == 1.0
    assert fitted[0] == pytest.approx(2.0, rel=0.15)


def test_temperature_is_bounded_for_an_uninformative_class() -> None:
    rng = np.random.default_rng(5)
    y = (rng.random(5000) < 0.3).astype(float)
    noise = rng.normal(0.0, 3.0, 5000)  # confident logits unrelated to the label
    fitted = fit_temperature_multilabel(noise, y)
    assert fitted.shape == (1,)
    assert fitted[0] == pytest.approx(TEMPERATURE_BOUNDS[1], rel=1e-3)


def test_nan_labels_are_ignored_when_fitting() -> None:
    y, z = _miscalibrated_multilabel(6000, (2.0, 0.7), seed=6)
    y_nan = y.copy()
    rng = np.random.default_rng(7)
    y_nan[rng.random(y.shape) < 0.3] = np.nan
    fitted = fit_temperature_multilabel(z, y_nan)
    for k in range(2):
        known = ~np.isnan(y_nan[:, k])
        alone = fit_temperature_multilabel(z[known, k], y_nan[known, k])
        assert fitted[k] == pytest.approx(alone[0], rel=1e-6)
    iso = Calibrator.fit_logits(y_nan, z, method="isotonic")
    iso_known = Calibrator.fit_logits(y[known, 1], z[known, 1], method="isotonic")
    assert iso.isotonic[1] == iso_known.isotonic[0]


# ---------------------------------------------------------------------------------------------
# Isotonic and the Calibrator
# ---------------------------------------------------------------------------------------------


def test_isotonic_is_monotone_matches_sklearn_and_round_trips() -> None:
    y, z = _miscalibrated_multilabel(3000, (2.5, 0.6), seed=8)
    p = special.expit(z)
    calibrator = Calibrator.fit(y, p, method="isotonic")
    grid = np.linspace(0, 1, 1001)
    out = calibrator.apply(np.column_stack([grid, grid]))
    assert (np.diff(out, axis=0) >= 0).all()
    assert out.min() >= 0 and out.max() <= 1
    reference = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(p[:, 0], y[:, 0])
    np.testing.assert_allclose(out[:, 0], reference.predict(grid), atol=1e-12)

    rebuilt = Calibrator.from_dict(json.loads(json.dumps(calibrator.to_dict())))
    assert rebuilt == calibrator
    np.testing.assert_array_equal(rebuilt.apply(p), calibrator.apply(p))
    y_test, z_test = _miscalibrated_multilabel(3000, (2.5, 0.6), seed=9)
    p_test = special.expit(z_test)
    assert (
        expected_calibration_error(y_test, calibrator.apply(p_test))
        < expected_calibration_error(y_test, p_test)
    ).all()


def test_isotonic_constant_column_is_the_identity_and_multiclass_rows_sum_to_one() -> None:
    rng = np.random.default_rng(10)
    p = rng.random((200, 2))
    y = (rng.random((200, 2)) < p).astype(float)
    y[:, 1] = 0.0
    calibrator = Calibrator.fit(y, p, method="isotonic")
    np.testing.assert_array_equal(calibrator.apply(p)[:, 1], p[:, 1])
    probs = special.softmax(rng.normal(size=(300, 3)) * 3, axis=1)
    labels = probs.argmax(axis=1)
    multi = Calibrator.fit(labels, probs, method="isotonic", task="multiclass")
    np.testing.assert_allclose(multi.apply(probs).sum(axis=1), 1.0)


def test_calibrator_temperature_round_trip_identity_and_validation() -> None:
    y, z = _miscalibrated_multilabel(2000, (1.8,), seed=11)
    calibrator = Calibrator.fit_logits(y[:, 0], z[:, 0], method="temperature")
    data = json.loads(json.dumps(calibrator.to_dict()))
    assert data["method"] == "temperature" and len(data["temperatures"]) == 1
    rebuilt = Calibrator.from_dict(data)
    p = special.expit(z[:, 0])
    np.testing.assert_array_equal(rebuilt.apply(p), calibrator.apply(p))
    assert calibrator.apply(p).shape == p.shape
    np.testing.assert_allclose(
        calibrator.apply(p), special.expit(z[:, 0] / rebuilt.temperatures[0])
    )

    none = Calibrator.fit(y, p[:, None], method="none")
    np.testing.assert_array_equal(none.apply(p[:, None]), p[:, None])
    assert Calibrator.identity(3) == Calibrator.from_dict(Calibrator.identity(3).to_dict())
    with pytest.raises(ValueError, match="unknown calibration method"):
        Calibrator.fit(y, p[:, None], method="platt")
    with pytest.raises(ValueError, match="expected"):
        calibrator.apply(np.ones((4, 2)))
    with pytest.raises(ValueError, match="temperatures"):
        Calibrator.from_dict({**data, "temperatures": [1.0, 2.0]})
    with pytest.raises(ValueError, match="malformed"):
        Calibrator.from_dict({"method": "none"})


def test_reliability_figure_draws_every_class(tmp_path) -> None:
    from ichseg.fileio import save_figure

    y, z = _miscalibrated_multilabel(2000, (2.0, 0.5, 1.0, 1.5), seed=12)
    p = special.expit(z)
    after = Calibrator.fit(y, p).apply(p)
    fig = reliability_figure(
        reliability_curve(y, p), reliability_curve(y, after), ["any", "edh", "sdh", "sah"]
    )
    assert len(fig.axes) == 4
    # Per panel: the diagonal, the before curve, the after curve.
    assert [len(ax.lines) for ax in fig.axes] == [3, 3, 3, 3]
    assert fig.axes[1].get_title().startswith("edh")
    out = save_figure(fig, tmp_path / "reliability.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="class names"):
        reliability_figure(reliability_curve(y, p), None, ["any"])
