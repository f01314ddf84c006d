"""A run's calibration: fitted on validation, thresholds on calibrated probabilities, applied by
predict, carried with the thresholds, refused when it does not match them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ichseg.cli import app
from ichseg.config import load_config
from ichseg.errors import InputError

runner = CliRunner()


def _overconfident(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels drawn from true probabilities, and probabilities three times too confident."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, size=(n, 6))
    labels = (rng.random((n, 6)) < 1 / (1 + np.exp(-z))).astype(np.float64)
    labels[rng.random((n, 6)) < 0.05] = np.nan  # unknown labels are left out
    return labels, 1 / (1 + np.exp(-3 * z)), np.array([f"s{i // 8}" for i in range(n)])


def test_temperature_scaling_lowers_held_out_ece() -> None:
    from ichseg.engine.calibrate import (
        CalibrationEvidence,
        calibration_summary,
        fit_run_calibration,
    )

    config = load_config()
    labels, prob, series = _overconfident(4000, 1)
    calibration = fit_run_calibration(config, labels, prob, series, "slice")
    assert calibration.method == "temperature" and calibration.level == "slice"
    temperatures = np.array(calibration.calibrator.temperatures)
    np.testing.assert_allclose(temperatures, 3.0, rtol=0.15)
    held_labels, held_prob, held_series = _overconfident(3000, 2)
    evidence = CalibrationEvidence(
        held_labels,
        held_prob,
        calibration.apply(held_prob),
        held_series,
        config.task.class_names,
        "multilabel",
        "max",
        "slice",
    )
    summary = calibration_summary(calibration, evidence)
    before, after = summary["slices"]["before"], summary["slices"]["after"]
    assert after["mean_ece"] < before["mean_ece"] / 2
    assert after["mean_brier"] < before["mean_brier"]
    assert set(summary["series"]) == {"aggregation", "before", "after", "mean_ece_change"}
    # Without patients there is no interval, only the paired change itself.
    change = summary["slices"]["mean_ece_change"]
    assert change["value"] == pytest.approx(after["mean_ece"] - before["mean_ece"])
    assert change["ci_low"] is None and change["resampled"] is None
    # Temperature scaling never reorders a class: the calibrated ranking is the same.
    calibrated = calibration.apply(held_prob)
    assert (np.argsort(calibrated[:, 0]) == np.argsort(held_prob[:, 0])).mean() > 0.99


def test_ece_change_interval_resamples_patients_and_pairs_the_two_ece() -> None:
    from ichseg.engine.calibrate import calibration_markdown, mean_ece_change

    labels, prob, _ = _overconfident(2400, 4)
    patients = np.repeat(np.arange(60), 40)
    fixed = 1 / (1 + np.exp(-np.log(prob / (1 - prob)) / 3))  # the true probabilities
    change = mean_ece_change(labels, prob, fixed, patients, n_boot=300)
    assert change["ci_low"] < change["ci_high"] < 0
    assert change["interval"] == "basic bootstrap" and change["n_valid"] == 300
    # ECE is biased upwards on resamples (duplicated patients), more so after calibration, so
    # the resampled changes sit above the estimate; the basic interval reflects them about it.
    from ichseg.engine.calibrate import _mean_ece
    from ichseg.metrics.compare import paired_bootstrap

    percentile = paired_bootstrap(_mean_ece, labels, prob, fixed, patients, 300, 0)
    assert percentile.ci_low > change["value"]  # the plain percentile interval misses it
    assert change["ci_low"] == pytest.approx(2 * change["value"] - percentile.ci_high)
    assert change["ci_high"] == pytest.approx(2 * change["value"] - percentile.ci_low)
    assert change["resampled"] == "patients" and change["n_boot"] == 300
    # The same probabilities before and after: exactly no change on every resample.
    same = mean_ece_change(labels, prob, prob, patients, n_boot=50)
    assert same["value"] == same["ci_low"] == same["ci_high"] == 0.0
    summary = {
        "method": "temperature",
        "fitted_on": "validation split",
        "level": "slice",
        "tta": "none",
        "note": None,
        "ece_bins": 15,
        "scored_split": "test",
        "slices": {
            "before": {"brier": {}, "ece": {}, "mean_brier": 0.1, "mean_ece": 0.2},
            "after": {"brier": {}, "ece": {}, "mean_brier": 0.1, "mean_ece": 0.1},
            "mean_ece_change": change,
        },
    }
    text = calibration_markdown(summary, [])
    assert f"{change['value']:+.4f}, 95 % CI [{change['ci_low']:+.4f}" in text
    assert "(basic bootstrap interval, 300 of 300 resamples of the test patients" in text
    assert "In-sample" not in text
    assert "In-sample" in calibration_markdown(summary | {"scored_split": "val"}, [])


def test_scan_level_labels_are_calibrated_on_series_maxima() -> None:
    from ichseg.engine.calibrate import fit_run_calibration

    labels, prob, series = _overconfident(800, 3)
    calibration = fit_run_calibration(load_config(), labels, prob, series, "series")
    assert calibration.level == "series" and "100 series" in calibration.fitted_on
    mean = load_config(overrides=["eval.aggregation=mean"])
    skipped = fit_run_calibration(mean, labels, prob, series, "series")
    assert skipped.method == "none" and "only with max" in skipped.note
    none = fit_run_calibration(
        load_config(overrides=["eval.calibration=none"]), labels, prob, series, "slice"
    )
    np.testing.assert_array_equal(none.apply(prob), prob.astype(np.float32))


def test_thresholds_are_chosen_on_calibrated_validation_probabilities(trained_run: Path):
    from ichseg.engine.cache import build_slices
    from ichseg.engine.calibrate import load_calibration
    from ichseg.engine.checkpoint import load_thresholds
    from ichseg.engine.evaluate import (
        choose_run_thresholds,
        load_run,
        predict_rows,
        run_preprocessor,
        split_rows,
    )

    config, model = load_run(trained_run)
    slices = build_slices(config, run_preprocessor(trained_run, config), progress=False)
    rows = split_rows(trained_run, slices)["val"]
    names = config.task.class_names
    calibration = load_calibration(trained_run / "calibration.json", names, "multilabel")
    assert calibration.method == "temperature"
    raw = predict_rows(model, slices, rows, config)
    expected = choose_run_thresholds(config, slices, rows, calibration.apply(raw))
    saved = load_thresholds(trained_run / "thresholds.json", names)
    assert saved.calibration == "temperature"
    for name in names:
        want = expected.slice[name]
        assert saved.slice[name] == pytest.approx(np.inf if want is None else want)
    text = json.loads((trained_run / "thresholds.json").read_text())
    assert text["probabilities"].startswith("calibrated (temperature")
    report = (trained_run / "eval" / "test" / "report.md").read_text()
    assert "## Calibration" in report and "ECE before" in report
    assert (trained_run / "eval" / "test" / "reliability_series.png").stat().st_size > 0


def test_predict_applies_the_calibration(trained_run: Path, phantom_dir: Path, tmp_path: Path):
    from ichseg.inference import load_predictor, predict, predict_volume
    from ichseg.io.nifti import read_nifti

    predictor = load_predictor(trained_run, device="cpu")
    path = sorted((phantom_dir / "nifti").glob("*_ct.nii.gz"))[0]
    raw = predict_volume(predictor, read_nifti(path)).probabilities
    result = predict(trained_run, path, tmp_path / "out", progress=False, gradcam=False)
    written = np.array([[r[n] for n in predictor.class_names] for r in result.slice_rows])
    np.testing.assert_allclose(written, predictor.calibration.apply(raw), atol=2e-6)
    assert not np.allclose(written, raw, atol=1e-4)  # the fitted temperatures are not 1
    info = json.loads((tmp_path / "out" / "predict_info.json").read_text())
    assert info["models"][0]["calibration"]["method"] == "temperature"


def test_calibration_file_must_match_the_thresholds(trained_run: Path, tmp_path: Path):
    from ichseg.inference import load_predictor

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("eval", "last.pt"))
    fitted = load_predictor(run, device="cpu").calibration.calibrator
    (run / "calibration.json").unlink()
    # The thresholds carry the calibration they were chosen with.
    assert load_predictor(run, device="cpu").calibration.calibrator == fitted
    data = json.loads((trained_run / "calibration.json").read_text())
    data["calibrator"]["temperatures"] = [1.0] * 6
    (run / "calibration.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match="does not match the thresholds"):
        load_predictor(run, device="cpu")
    (run / "calibration.json").write_text("{not json")
    with pytest.raises(InputError, match="not a valid calibration file"):
        load_predictor(run, device="cpu")


def test_isotonic_calibration_from_the_config(trained_run: Path, tmp_path: Path):
    from ichseg.engine.checkpoint import load_checkpoint, save_checkpoint

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("eval", "last.pt"))
    state = load_checkpoint(run / "best.pt")
    state["config"]["eval"]["calibration"] = "isotonic"
    save_checkpoint(state, run / "best.pt")
    result = runner.invoke(app, ["evaluate", str(run), "--split", "val"])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "calibration.json").read_text())["method"] == "isotonic"
    assert json.loads((run / "thresholds.json").read_text())["calibration"] == "isotonic"
    metrics = json.loads((run / "eval" / "val" / "metrics.json").read_text())
    before = metrics["calibration"]["slices"]["before"]["mean_ece"]
    after = metrics["calibration"]["slices"]["after"]["mean_ece"]
    # On the data it was fitted on, an isotonic map cannot be less calibrated than the input.
    assert after <= before + 1e-9
