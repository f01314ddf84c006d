"""Subgroup analysis: banding, per-group AUROC and patient-bootstrap CIs, report and plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from ichseg.metrics import auroc, bootstrap_ci
from ichseg.metrics.subgroups import (
    ONE_CLASS,
    TOO_SMALL,
    UNKNOWN,
    binary_any,
    subgroup_analysis,
    subgroup_labels,
)


def test_bands_and_labels() -> None:
    ages = [12.0, 39.9, 40.0, 64.9, 65.0, 90.0, None, float("nan")]
    assert subgroup_labels("age", ages) == [
        "<40",
        "<40",
        "40-64",
        "40-64",
        ">=65",
        ">=65",
        UNKNOWN,
        UNKNOWN,
    ]
    assert subgroup_labels("slice_thickness", [0.625, 2.0, 2.5, 5.0, None]) == [
        "<2 mm",
        "2-4 mm",
        "2-4 mm",
        ">=4 mm",
        UNKNOWN,
    ]
    assert subgroup_labels("kvp", [120.0, 100.0, None]) == ["120", "100", UNKNOWN]
    assert subgroup_labels("manufacturer", ["GE", "", None]) == ["GE", UNKNOWN, UNKNOWN]
    with pytest.raises(ValueError):
        subgroup_labels("shoe_size", [1.0])


def _data(seed: int = 0, patients: int = 40, slices: int = 5):
    """Slices of patients with a score that separates well for sex F and not at all for M."""
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"P{i:03d}" for i in range(patients)], slices)
    series = np.char.add(groups, "-s")
    sex = np.repeat(rng.choice(["F", "M"], size=patients), slices)
    y = rng.integers(0, 2, size=groups.size).astype(float)
    score = np.where(sex == "F", y + rng.normal(0, 0.3, y.size), rng.random(y.size))
    return y, score, groups, series, sex


def test_group_figures_equal_the_metrics_on_the_group_alone() -> None:
    y, score, groups, series, sex = _data()
    result = subgroup_analysis(
        y, score, groups, {"sex": list(sex)}, series_ids=series, n_boot=200, seed=3, threshold=0.5
    )
    overall = result["overall"]
    assert overall["auroc"] == pytest.approx(float(auroc(y, score)[0]))
    assert overall["n_patients"] == 40 and overall["n_slices"] == 200
    by_group = {entry["group"]: entry for entry in result["variables"]["sex"]}
    assert set(by_group) == {"F", "M"}
    assert sum(entry["n_patients"] for entry in by_group.values()) == 40
    for name, entry in by_group.items():
        rows = sex == name
        assert entry["status"] == "ok"
        assert entry["n_slices"] == rows.sum()
        assert entry["auroc"] == pytest.approx(float(auroc(y[rows], score[rows])[0]))
        expected = bootstrap_ci(
            lambda t, p: float(auroc(t, p)[0]), y[rows], score[rows], groups[rows], 200, 3
        )
        assert entry["ci"] == pytest.approx(list(expected))
        truth, called = y[rows] > 0.5, score[rows] >= 0.5
        assert entry["sensitivity"] == pytest.approx((called & truth).sum() / truth.sum())
        assert entry["specificity"] == pytest.approx((~called & ~truth).sum() / (~truth).sum())
        assert entry["ci"][0] <= entry["auroc"] <= entry["ci"][1]
        assert "series" in entry  # slice labels with series ids: both levels
    assert by_group["F"]["auroc"] > 0.9 > 0.7 > by_group["M"]["auroc"]
    json.dumps(result, allow_nan=False)


def test_small_and_one_class_groups_get_no_figures() -> None:
    y, score, groups, _, _ = _data(patients=12, slices=2)
    site = np.where(np.isin(groups, ["P000", "P001"]), "tiny", "big")
    y[site == "tiny"] = 0.0
    result = subgroup_analysis(
        y, score, groups, {"site": list(site)}, min_patients=2, n_boot=50, seed=0
    )
    entries = {e["group"]: e for e in result["variables"]["site"]}
    assert [e["group"] for e in result["variables"]["site"]] == ["big", "tiny"]  # by size
    assert entries["tiny"]["status"] == ONE_CLASS and entries["tiny"]["auroc"] is None
    result = subgroup_analysis(
        y, score, groups, {"site": list(site)}, min_patients=3, n_boot=50, seed=0
    )
    tiny = {e["group"]: e for e in result["variables"]["site"]}["tiny"]
    assert tiny["status"] == TOO_SMALL and tiny["n_patients"] == 2
    assert "auroc" not in tiny and "ci" not in tiny


def test_series_level_labels_score_series() -> None:
    rng = np.random.default_rng(1)
    groups = np.repeat([f"P{i}" for i in range(30)], 4)
    series = groups.copy()
    label = np.repeat(rng.integers(0, 2, 30), 4).astype(float)
    score = label * 0.5 + rng.random(label.size)
    band = np.repeat(np.where(np.arange(30) < 15, 30.0, 70.0), 4)
    result = subgroup_analysis(
        label,
        score,
        groups,
        {"age": subgroup_labels("age", list(band))},
        series_ids=series,
        label_level="series",
        min_patients=1,
        n_boot=50,
    )
    assert result["level"] == "series"
    young = result["variables"]["age"][0]
    assert young["group"] == "<40" and young["n_series"] == 15
    rows = band < 40
    series_score = score[rows].reshape(15, 4).max(axis=1)
    series_label = label[rows].reshape(15, 4)[:, 0]
    assert young["auroc"] == pytest.approx(float(auroc(series_label, series_score)[0]))
    assert "series" not in young  # the headline already is the series level


def test_binary_any_for_both_task_modes() -> None:
    truth = np.array([[1, 0], [0, 0]], dtype=float)
    prob = np.array([[0.9, 0.1], [0.2, 0.3]])
    y, s = binary_any(truth, prob, "multilabel", ["any", "epidural"])
    assert y.tolist() == [1, 0] and s.tolist() == [0.9, 0.2]
    y, s = binary_any(
        np.array([0, 2]),
        np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]),
        "multiclass",
        ["normal", "a", "b"],
    )
    assert y.tolist() == [0, 1] and s == pytest.approx([0.3, 0.9])


def test_inputs_are_checked() -> None:
    with pytest.raises(ValueError):
        subgroup_analysis([0, 1], [0.1, 0.2], ["a"], {})
    with pytest.raises(ValueError):
        subgroup_analysis([0, 1], [0.1, 0.2], ["a", "b"], {"sex": ["M"]})
    with pytest.raises(ValueError):
        subgroup_analysis([0, 1], [0.1, 0.2], ["a", "b"], {}, label_level="series")


def test_report_section_and_forest_plot(tmp_path: Path) -> None:
    from PIL import Image

    from ichseg.engine.report import write_subgroups

    y, score, groups, series, sex = _data()
    age = subgroup_labels("age", list(np.where(sex == "F", 30.0, 70.0)))
    result = subgroup_analysis(
        y,
        score,
        groups,
        {"sex": list(sex), "age": age},
        series_ids=series,
        min_patients=5,
        n_boot=50,
    )
    paths, markdown = write_subgroups(result, tmp_path)
    assert [p.name for p in paths] == ["subgroups.json", "subgroups.png"]
    assert json.loads(paths[0].read_text()) == result
    with Image.open(paths[1]) as image:
        assert image.size[0] > 300 and image.size[1] > 150
    assert "## Subgroups" in markdown and "### sex" in markdown and "### age" in markdown
    for entry in result["variables"]["sex"]:
        low, high = entry["ci"]
        assert f"{entry['auroc']:.3f} [{low:.3f}, {high:.3f}]" in markdown


def test_evaluate_writes_subgroups_of_the_phantom(trained_run: Path) -> None:
    """The run fixture's test report lists each subgroup; attributes match the phantom's."""
    import csv

    from ichseg.engine.cache import build_slices
    from ichseg.engine.evaluate import load_run, split_rows, split_subgroups
    from ichseg.engine.sources import PhantomSource

    out = trained_run / "eval" / "test"
    result = json.loads((out / "subgroups.json").read_text())
    assert (out / "subgroups.png").is_file()
    report = (out / "report.md").read_text()
    assert "## Subgroups" in report
    assert set(result["variables"]) == {"age", "sex", "manufacturer", "kernel", "slice_thickness"}
    # Two test patients are fewer than the default minimum of ten: listed, without figures.
    for entries in result["variables"].values():
        assert entries and all(e["status"] == TOO_SMALL and "auroc" not in e for e in entries)
        assert all(f"| {e['group']} |" in report for e in entries)

    config, _ = load_run(trained_run)
    slices = build_slices(config, progress=False)
    rows = split_rows(trained_run, slices)
    idx = np.concatenate([rows["val"], rows["test"]])
    rng = np.random.default_rng(0)
    prob = rng.random((idx.size, 6))
    config = config.model_copy(
        update={"eval": config.eval.model_copy(update={"subgroup_min_patients": 1})}
    )
    found = split_subgroups(config, slices, idx, slices.labels[idx], prob, None)
    folder = PhantomSource(config.data, Path(config.data.cache_dir))._folder()
    with open(folder / "manifest.csv", newline="") as handle:
        manifest = {row["patient_id"]: row for row in csv.DictReader(handle)}
    patients = sorted(set(slices.groups[idx]))
    expected: dict[str, int] = {}
    for patient in patients:
        expected[manifest[patient]["manufacturer"]] = (
            expected.get(manifest[patient]["manufacturer"], 0) + 1
        )
    counted = {e["group"]: e["n_patients"] for e in found["variables"]["manufacturer"]}
    assert counted == expected
    for entry in found["variables"]["manufacturer"]:
        assert entry["status"] in ("ok", ONE_CLASS)
        if entry["status"] == "ok":
            assert 0.0 <= entry["auroc"] <= 1.0 and not math.isnan(entry["ci"][0])


def test_unknown_subgroup_variable_is_a_config_error() -> None:
    from ichseg.config import load_config
    from ichseg.errors import ConfigError

    with pytest.raises(ConfigError) as exc:
        load_config(extra={"eval": {"subgroups": ["age", "shoe_size"]}})
    assert "eval.subgroups" in str(exc.value) and "shoe_size" in str(exc.value)
    config = load_config(extra={"eval": {"subgroups": ["kvp", "site", "kvp"]}})
    assert config.eval.subgroups == ["kvp", "site"]


def test_a_perfectly_separated_group_gets_a_score_interval() -> None:
    from ichseg.engine.report import subgroup_markdown
    from ichseg.metrics.auroc import auroc_score_interval

    y, score, groups, series, sex = _data(seed=4)
    score = np.where(sex == "F", y, score)  # F: perfectly separated; M: chance
    result = subgroup_analysis(y, score, groups, {"sex": list(sex)}, n_boot=100, seed=0)

    by_group = {entry["group"]: entry for entry in result["variables"]["sex"]}
    female, male = by_group["F"], by_group["M"]
    assert female["auroc"] == 1.0 and female["ci_method"] == "score"
    rows = sex == "F"
    positive = set(groups[rows & (y == 1)])
    with_negative = set(groups[rows & (y == 0)])
    # Patients with negative slices only, or (none here: five random slices each) all with one.
    negatives = len(with_negative - positive) or len(with_negative)
    expected = auroc_score_interval(1.0, len(positive), negatives)
    assert female["ci"] == pytest.approx(list(expected)) and expected[0] < 0.95
    assert male["ci_method"] == "bootstrap" and male["ci"][0] < male["auroc"] < male["ci"][1]
    text = subgroup_markdown(result)
    assert f"{female['auroc']:.3f} [{expected[0]:.3f}, 1.000] †" in text
    from ichseg.engine.report import forest_figure

    axis = forest_figure(result).axes[0]
    marked = [label.get_text() for label in axis.get_yticklabels() if "†" in label.get_text()]
    assert marked == [f"sex: F (n={female['n_patients']}) †"]
    assert "score interval" in axis.get_xlabel()
