"""Metrics against hand computations, bootstrap behaviour, JSON output and report files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ichseg.engine.report import write_report
from ichseg.metrics import (
    LOG_LOSS_EPS,
    aggregate_by_series,
    aggregate_probabilities,
    auroc,
    average_precision,
    bootstrap_ci,
    bootstrap_distribution,
    choose_thresholds,
    classification_report,
    evaluate_multiclass,
    evaluate_multilabel,
    mean_ci,
    multiclass_log_loss,
    nanmean,
    roc_curve,
    rsna_weighted_log_loss,
    threshold_metrics,
)
from ichseg.volume import SUBTYPES


def _toy(n: int, seed: int = 0, rate: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 6)) < rate).astype(float)
    y[:, 0] = y[:, 1:].max(1)
    p = np.clip(0.35 * y + 0.65 * rng.random((n, 6)), 0, 1)
    return y, p


def test_weighted_log_loss_by_hand() -> None:
    y = [[1, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]]
    p = [[0.9, 0.1, 0.2, 0.1, 0.1, 0.6], [0.2, 0.1, 0.1, 0.1, 0.1, 0.3]]
    ln = math.log
    first = (2 * -ln(0.9) - ln(0.9) - ln(0.8) - ln(0.9) - ln(0.9) - ln(0.6)) / 7
    second = (2 * -ln(0.8) - 4 * ln(0.9) - ln(0.7)) / 7
    assert rsna_weighted_log_loss(y, p) == pytest.approx((first + second) / 2, rel=1e-9)
    # A certain mistake is clipped at the leaderboard's 1e-15, not infinite.
    assert LOG_LOSS_EPS == 1e-15
    clipped = rsna_weighted_log_loss([[1, 0, 0, 0, 0, 0]], [[0, 0, 0, 0, 0, 0]])
    assert clipped == pytest.approx((2 * -ln(1e-15) - 5 * ln(1 - 1e-15)) / 7)


def test_unknown_labels_leave_the_loss_and_the_auroc() -> None:
    nan = math.nan
    y = np.array([[1, nan], [0, 0], [1, 1], [0, nan]])
    p = np.array([[0.9, 0.99], [0.2, 0.4], [0.7, 0.6], [0.1, 0.01]])
    ln = math.log
    first = (2 * -ln(0.9)) / 2  # only `any` is known in row 0
    second = (2 * -ln(0.8) - ln(0.6)) / 3
    third = (2 * -ln(0.7) - ln(0.6)) / 3
    fourth = (2 * -ln(0.9)) / 2
    got = rsna_weighted_log_loss(y, p, weights=[2, 1])
    assert got == pytest.approx((first + second + third + fourth) / 4)
    # Column 1 has one known negative and one known positive: AUROC 1 on those rows only.
    assert auroc(y, p).tolist() == pytest.approx([1.0, 1.0])


def test_auroc_perfect_inverse_and_single_class() -> None:
    y = np.array([[0, 1, 0], [0, 1, 1], [1, 1, 0], [1, 1, 1]], float)
    p = np.array([[0.1, 0.2, 0.9], [0.2, 0.3, 0.1], [0.8, 0.4, 0.8], [0.9, 0.5, 0.2]])
    auc = auroc(y, p)
    assert auc[0] == pytest.approx(1.0)
    assert math.isnan(auc[1])  # column 1 is all positive
    assert auc[2] == pytest.approx(0.0)
    ap = average_precision(y, p)
    assert ap[0] == pytest.approx(1.0) and math.isnan(ap[1])
    assert nanmean(auc) == pytest.approx(0.5)
    assert math.isnan(nanmean([math.nan, math.nan]))


def test_auroc_matches_torchmetrics_with_ties() -> None:
    import torch
    from torchmetrics.functional.classification import binary_auroc

    y, p = _toy(300, seed=1)
    p = np.round(p, 1)  # many ties
    y[:, 3] = 0  # one class without positives
    expected = [
        math.nan
        if y[:, k].min() == y[:, k].max()
        else float(binary_auroc(torch.from_numpy(p[:, k]), torch.from_numpy(y[:, k]).long()))
        for k in range(6)
    ]
    np.testing.assert_allclose(auroc(y, p), expected, atol=1e-6)


def test_roc_curve_endpoints() -> None:
    fpr, tpr, thr = roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.isinf(thr[0]) and np.all(np.diff(thr) < 0)


def test_youden_thresholds_on_separable_data() -> None:
    y = np.array([[0], [0], [0], [1], [1]], float)
    p = np.array([[0.1], [0.2], [0.3], [0.6], [0.7]])
    thr = choose_thresholds(y, p, "youden")
    assert thr[0] == pytest.approx(0.6)
    m = threshold_metrics(y, p, thr)
    assert m["sensitivity"][0] == 1.0 and m["specificity"][0] == 1.0 and m["f1"][0] == 1.0
    assert choose_thresholds(y, p, "f1")[0] == pytest.approx(0.6)
    # No rule applies to a class with one label value: NaN, for the caller to handle visibly.
    assert math.isnan(choose_thresholds(np.zeros((3, 1)), np.ones((3, 1)))[0])
    with pytest.raises(ValueError):
        choose_thresholds(y, p, "accuracy")


def test_threshold_metrics_by_hand() -> None:
    y = np.array([[1], [1], [1], [0], [0], [0], [0]], float)
    p = np.array([[0.9], [0.6], [0.2], [0.7], [0.1], [0.3], [0.4]])
    m = threshold_metrics(y, p, 0.5)
    assert m["confusion"][0].tolist() == [[3, 1], [1, 2]]  # [[tn, fp], [fn, tp]]
    assert m["sensitivity"][0] == pytest.approx(2 / 3)
    assert m["specificity"][0] == pytest.approx(3 / 4)
    assert m["precision"][0] == pytest.approx(2 / 3)
    assert m["f1"][0] == pytest.approx(2 / 3)
    assert m["accuracy"][0] == pytest.approx(5 / 7)
    # No positives and nothing predicted: sensitivity, precision and F1 are undefined.
    empty = threshold_metrics(np.zeros((3, 1)), np.zeros((3, 1)), 0.5)
    assert math.isnan(empty["sensitivity"][0]) and math.isnan(empty["f1"][0])
    report = classification_report(y, p, [0.5], ["any"])
    assert report["any"]["recall"] == pytest.approx(2 / 3) and report["any"]["support"] == 3
    assert json.dumps(report, allow_nan=False)


def test_series_aggregation_by_max() -> None:
    y = np.array([[0, 0], [1, 1], [0, 0], [0, 0], [0, 1]], float)
    p = np.array([[0.1, 0.2], [0.3, 0.9], [0.2, 0.1], [0.05, 0.4], [0.6, 0.3]])
    ids, ys, ps = aggregate_by_series(y, p, ["b", "b", "a", "a", "c"])
    assert ids.tolist() == ["a", "b", "c"]
    assert ys.tolist() == [[0, 0], [1, 1], [0, 1]]
    np.testing.assert_allclose(ps, [[0.2, 0.4], [0.3, 0.9], [0.6, 0.3]])
    _, _, mean = aggregate_by_series(y, p, ["b", "b", "a", "a", "c"], rule="mean")
    np.testing.assert_allclose(mean[0], [0.125, 0.25])
    np.testing.assert_allclose(aggregate_probabilities(p[:2], "top1"), p[:2].max(0))
    # Unknown slice labels: known ones decide, an all-unknown series stays unknown.
    nan = math.nan
    _, ys, _ = aggregate_by_series(np.array([[nan], [0.0], [nan]]), np.zeros((3, 1)), [1, 1, 2])
    assert ys[0, 0] == 0 and math.isnan(ys[1, 0])


def _macro(yt: np.ndarray, yp: np.ndarray) -> float:
    return nanmean(auroc(yt, yp))


def test_bootstrap_ci_contains_estimate_and_shrinks() -> None:
    small_y, small_p = _toy(150, seed=2)
    big_y, big_p = _toy(1500, seed=2)
    lo_s, hi_s = bootstrap_ci(_macro, small_y, small_p, n_boot=200, seed=0)
    lo_b, hi_b = bootstrap_ci(_macro, big_y, big_p, n_boot=200, seed=0)
    assert lo_s <= _macro(small_y, small_p) <= hi_s
    assert lo_b <= _macro(big_y, big_p) <= hi_b
    assert hi_b - lo_b < hi_s - lo_s
    assert bootstrap_ci(_macro, small_y, small_p, n_boot=50, seed=3) == bootstrap_ci(
        _macro, small_y, small_p, n_boot=50, seed=3
    )


def test_group_bootstrap_resamples_whole_groups() -> None:
    groups = np.repeat(np.arange(10), [1, 2, 3, 4, 5, 1, 2, 3, 4, 5])
    ids = groups.astype(float)[:, None]

    def whole_groups(yt: np.ndarray, yp: np.ndarray) -> float:
        counts = np.bincount(yp[:, 0].astype(int), minlength=10)
        sizes = np.bincount(groups, minlength=10)
        return float(np.all(counts % sizes == 0))

    values, dropped = bootstrap_distribution(whole_groups, ids, ids, groups=groups, n_boot=100)
    assert values.size == 100 and dropped == 0 and np.all(values == 1.0)


def test_group_bootstrap_skips_nan_resamples() -> None:
    # All positives sit in group 0: resamples that miss it have no positives, AUROC NaN.
    groups = np.repeat(np.arange(5), 4)
    y = np.zeros((20, 1))
    y[:3, 0] = 1
    p = np.linspace(0, 1, 20)[:, None]
    values, dropped = bootstrap_distribution(_macro, y, p, groups=groups, n_boot=200, seed=0)
    # P(group 0 missing) = (4/5)^5 ~ 0.33, so about a third are skipped, and counted.
    assert 80 < values.size < 190 and values.size + dropped == 200
    low, high = bootstrap_ci(_macro, y, p, groups=groups, n_boot=200, seed=0)
    assert np.isfinite([low, high]).all() and low <= high
    # Row-level resampling almost never loses all three positives.
    rows, _ = bootstrap_distribution(_macro, y, p, n_boot=200, seed=0)
    assert rows.size > values.size


def test_mean_ci_by_hand() -> None:
    mean, low, high = mean_ci([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)  # t_{0.975, 2} * sd(=1) / sqrt(3)
    assert mean == pytest.approx(2.0)
    assert (low, high) == pytest.approx((2.0 - half, 2.0 + half))
    assert mean_ci([0.8], alpha=0.05)[0] == 0.8 and math.isnan(mean_ci([0.8])[1])


def test_evaluate_multilabel_is_strict_json() -> None:
    y, p = _toy(120, seed=4, rate=0.04)
    y[:, 1] = 0  # a subtype absent from the test set: undefined values must become None
    series = np.repeat(np.arange(30), 4)
    patients = np.repeat(np.arange(15), 8)
    val_y, val_p = _toy(120, seed=5)
    thr = choose_thresholds(val_y, val_p)
    result = evaluate_multilabel(
        y,
        p,
        class_names=SUBTYPES,
        groups=patients,
        series_ids=series,
        thresholds=np.nan_to_num(thr, nan=0.5),
        n_boot=100,
    )
    text = json.dumps(result, allow_nan=False)
    assert json.loads(text) == result
    assert list(result["per_class"]) == list(SUBTYPES)
    assert result["per_class"]["epidural"]["auroc"] is None
    assert "epidural" not in result["macro_classes"]  # the fixed set is reported
    assert result["per_class"]["any"]["confusion"][1][1] >= 0
    assert result["auroc_any"] == pytest.approx(result["per_class"]["any"]["auroc"])
    assert result["series_auroc_any"] is not None and result["n_series"] == 30
    assert result["bootstrap"]["unit"] == "patient" and result["bootstrap"]["n_units"] == 15
    assert result["threshold_source"] == "validation"
    for key in ("auroc_any", "macro_auroc", "weighted_log_loss", "series_auroc_any"):
        low, high = result["ci"][key]
        assert low <= result[key] <= high, key


def test_macro_auroc_never_averages_a_shrinking_class_set() -> None:
    # Subdural positives sit in one patient: resamples without it have no subdural AUROC.
    y, p = _toy(200, seed=8, rate=0.2)
    y[:, 5] = 0
    y[:5, 5] = 1
    patients = np.repeat(np.arange(40), 5)
    result = evaluate_multilabel(
        y, p, class_names=SUBTYPES, groups=patients, series_ids=patients, n_boot=200, seed=1
    )
    assert "subdural" in result["macro_classes"]
    dropped = result["bootstrap"]["dropped"]["macro_auroc"]
    # P(patient 0 missing) = (39/40)^40 ~ 0.36: those resamples are dropped and counted, not
    # averaged over five classes instead of six.
    assert 50 < dropped < 110


def test_scan_level_labels_report_series_metrics_only() -> None:
    y, p = _toy(80, seed=9, rate=0.3)
    series = np.repeat(np.arange(20), 4)
    y = np.repeat(y[::4], 4, axis=0)  # one label per scan, copied to its slices
    result = evaluate_multilabel(
        y,
        p,
        class_names=SUBTYPES,
        groups=series,
        series_ids=series,
        label_level="series",
        n_boot=20,
    )
    assert result["auroc_any"] is None and result["per_class"] is None
    assert result["series_auroc_any"] is not None and "series_auroc_any" in result["ci"]
    assert "auroc_any" not in result["ci"]


def test_evaluate_multiclass_is_strict_json() -> None:
    y = np.array([0, 0, 1, 1, 2, 2, 2, 0])
    p = np.array(
        [
            [0.8, 0.1, 0.1],
            [0.4, 0.5, 0.1],
            [0.1, 0.8, 0.1],
            [0.2, 0.7, 0.1],
            [0.1, 0.1, 0.8],
            [0.3, 0.3, 0.4],
            [0.5, 0.2, 0.3],
            [0.6, 0.2, 0.2],
        ]
    )
    result = evaluate_multiclass(y, p, ["none", "small", "large"], groups=np.arange(8), n_boot=50)
    assert json.loads(json.dumps(result, allow_nan=False)) == result
    assert result["accuracy"] == pytest.approx(6 / 8)
    assert result["confusion"] == [[2, 1, 0], [0, 2, 0], [1, 0, 2]]
    assert result["per_class"]["none"]["precision"] == pytest.approx(2 / 3)
    assert result["log_loss"] == pytest.approx(multiclass_log_loss(y, p))
    assert result["log_loss"] == pytest.approx(-np.mean(np.log(p[np.arange(8), y])))


def test_write_report_creates_files(tmp_path) -> None:
    y, p = _toy(60, seed=6)
    series = np.repeat(np.arange(15), 4)
    metrics = evaluate_multilabel(
        y, p, class_names=SUBTYPES, groups=series, series_ids=series, n_boot=20
    )
    paths = write_report(metrics, tmp_path / "ml", y, p, SUBTYPES, "multilabel")
    names = [path.name for path in paths]
    assert names == ["metrics.json", "report.md", "roc_curves.png", "confusion_matrices.png"]
    assert all(path.is_file() and path.stat().st_size > 0 for path in paths)
    assert json.loads(paths[0].read_text()) == metrics
    md = paths[1].read_text()
    assert "| class |" in md and "macro AUROC" in md and "intraventricular" in md
    assert "## Series" in md
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "ml").glob(".*.tmp"))

    yc = np.array([0, 1, 2, 1, 0, 2])
    pc = np.eye(3)[[0, 1, 1, 1, 0, 2]] * 0.7 + 0.1
    mc = evaluate_multiclass(yc, pc, ["a", "b", "c"], groups=np.arange(6), n_boot=20)
    paths = write_report(mc, tmp_path / "mc", yc, pc, ["a", "b", "c"], "multiclass")
    assert all(path.is_file() for path in paths)
    assert "log loss" in paths[1].read_text()


def _hanley_mcneil_variance(theta: float, m: int, n: int) -> float:
    """Hanley and McNeil's (1982) variance in its original Q1/Q2 form."""
    q1, q2 = theta / (2 - theta), 2 * theta**2 / (1 + theta)
    return (theta * (1 - theta) + (m - 1) * (q1 - theta**2) + (n - 1) * (q2 - theta**2)) / (m * n)


@pytest.mark.parametrize("value", [1.0, 0.97, 0.8, 0.5, 0.0])
def test_score_interval_solves_its_equation_at_both_limits(value: float) -> None:
    from scipy.stats import norm

    from ichseg.metrics.auroc import auroc_score_interval

    z = norm.ppf(0.975)
    low, high = auroc_score_interval(value, 20, 20)
    assert 0.0 <= low <= value <= high <= 1.0
    for limit in (low, high):
        if limit in (0.0, 1.0) and limit == value:
            continue  # the estimate itself on the bound
        # With equal groups the variance is Hanley and McNeil's own, independently written.
        distance = z * math.sqrt(_hanley_mcneil_variance(limit, 20, 20))
        assert abs(value - limit) == pytest.approx(distance, abs=1e-9)
    # Mirror image: the interval of 1 - AUROC is 1 minus this one's.
    mirror = auroc_score_interval(1.0 - value, 20, 20)
    assert mirror == pytest.approx((1.0 - high, 1.0 - low), abs=1e-9)


def test_score_interval_keeps_a_width_at_perfect_separation() -> None:
    from ichseg.metrics.auroc import auroc_score_interval

    low, high = auroc_score_interval(1.0, 28, 17)
    assert high == 1.0 and 0.88 < low < 0.93
    assert auroc_score_interval(1.0, 17, 28) == pytest.approx((low, high))
    # More cases, a narrower interval; no cases in a group, no interval.
    assert auroc_score_interval(1.0, 280, 170)[0] > low
    assert all(math.isnan(v) for v in auroc_score_interval(1.0, 0, 17))
    with pytest.raises(ValueError):
        auroc_score_interval(1.2, 5, 5)


def test_score_interval_covers_the_true_auroc() -> None:
    """Binormal scores with a true AUROC of 0.98 and 12 + 12 cases: about a third of the draws
    are perfectly separated, where a bootstrap interval is the point [1, 1] and misses 0.98, so
    its coverage could not exceed two thirds."""
    from scipy.stats import norm

    from ichseg.metrics.auroc import auroc_score_interval

    true_auroc, cases, draws = 0.98, 12, 400
    shift = math.sqrt(2) * norm.ppf(true_auroc)  # P(X_pos > X_neg) = true_auroc
    labels = np.r_[np.ones(cases), np.zeros(cases)]
    rng = np.random.default_rng(0)
    covered = perfect = 0
    for _ in range(draws):
        scores = np.r_[rng.normal(shift, 1, cases), rng.normal(0, 1, cases)]
        value = float(auroc(labels, scores)[0])
        perfect += value == 1.0
        low, high = auroc_score_interval(value, cases, cases)
        covered += low <= true_auroc <= high
    assert perfect > draws // 4
    assert 0.93 <= covered / draws <= 0.995


def test_interval_at_bound_counts_patients_and_keeps_the_bootstraps_width() -> None:
    from ichseg.metrics.auroc import auroc_interval_at_bound, auroc_score_interval

    labels = np.array([1, 1, 1, 0, 0, 0, np.nan, 0])
    patients = np.array(["a", "a", "b", "c", "c", "d", "e", "e"])
    # Inside (0, 1): the bootstrap interval stands.
    assert auroc_interval_at_bound(0.93, (0.85, 0.99), labels, patients) is None
    # Positive patients a, b; negative c, d, e (e's unknown row left out, its other row kept).
    score = auroc_score_interval(1.0, 2, 3)
    assert auroc_interval_at_bound(1.0, (1.0, 1.0), labels, patients) == score
    assert auroc_interval_at_bound(1.0, (1.0, 1.0), labels) == auroc_score_interval(1.0, 3, 4)
    # A union: the wider limit of the two on each side.
    assert auroc_interval_at_bound(0.99, (0.2, 1.0), labels, patients)[0] == 0.2
    # A patient with positive and negative rows counts as positive only...
    mixed = np.array(["a", "a", "b", "b", "c", "d", "e", "e"])
    assert auroc_interval_at_bound(1.0, (1.0, 1.0), labels, mixed) == auroc_score_interval(
        1.0, 2, 3
    )
    # ...unless every patient is: then those with a negative row are the negatives.
    everyone = np.array(["a", "a", "b", "a", "b", "c", "c", "c"])
    labels_everyone = np.array([1, 1, 1, 0, 0, 1, 0, 0])
    assert auroc_interval_at_bound(
        1.0, (1.0, 1.0), labels_everyone, everyone
    ) == auroc_score_interval(1.0, 3, 3)
    assert auroc_interval_at_bound(float("nan"), (1.0, 1.0), labels, patients) is None


def test_a_perfect_auroc_is_not_shown_as_surer_than_a_nearly_perfect_one() -> None:
    """One misordered pair drops the AUROC below 1, where the bootstrap interval alone is
    nearly as narrow as the point [1, 1]: the union keeps both about as wide."""
    rng = np.random.default_rng(2)
    patients = np.arange(45)
    y = np.zeros((45, 6))
    y[:28, 0] = 1.0
    p = np.clip(0.5 * y + 0.4 * rng.random((45, 6)), 0, 1)
    near = p.copy()
    near[28, 0] = p[:28, 0].min() + 1e-3  # one negative above the lowest positive
    perfect = evaluate_multilabel(
        y, p, class_names=SUBTYPES, groups=patients, series_ids=patients, n_boot=200
    )
    nearly = evaluate_multilabel(
        y, near, class_names=SUBTYPES, groups=patients, series_ids=patients, n_boot=200
    )
    assert perfect["auroc_any"] == 1.0 > nearly["auroc_any"] > 0.99
    assert "auroc_any" in nearly["bootstrap"]["score_intervals"]
    assert nearly["ci"]["auroc_any"][0] <= perfect["ci"]["auroc_any"][0] + 0.01


def test_evaluation_of_perfect_separation_gives_a_score_interval(tmp_path) -> None:
    rng = np.random.default_rng(1)
    patients = np.repeat(np.arange(30), 4)
    y = np.zeros((120, 6))
    y[patients < 12, 0] = 1.0
    y[patients < 12, 5] = 1.0
    p = np.clip(rng.random((120, 6)) * 0.4 + 0.6 * y, 0, 1)  # any: perfectly separated
    result = evaluate_multilabel(
        y, p, class_names=SUBTYPES, groups=patients, series_ids=patients, n_boot=100
    )
    assert result["auroc_any"] == 1.0 and result["series_auroc_any"] == 1.0
    assert sorted(result["bootstrap"]["score_intervals"]) == ["auroc_any", "series_auroc_any"]
    from ichseg.metrics.auroc import auroc_score_interval

    expected = auroc_score_interval(1.0, 12, 18)
    assert result["ci"]["series_auroc_any"] == pytest.approx(list(expected))
    assert result["ci"]["auroc_any"] == pytest.approx(list(expected))
    assert result["ci"]["auroc_any"][0] < 0.95
    # Weighted log loss is not an AUROC: still the bootstrap's interval.
    assert "weighted_log_loss" not in result["bootstrap"]["score_intervals"]
    report = write_report(result, tmp_path, y, p, SUBTYPES, "multilabel")[1].read_text()
    assert "series_auroc_any, auroc_any: the bootstrap interval reached 1" in report
    assert "Thresholds: 0.5, none chosen on validation data" in report
    assert json.loads((tmp_path / "metrics.json").read_text()) == result
