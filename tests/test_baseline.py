"""Metadata-only baseline: chance on the phantom, the shortcut found when metadata leak."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from typer.testing import CliRunner

from ichseg.cli import app
from ichseg.engine.baseline import (
    CATEGORICAL_FEATURES,
    NUMERIC_FEATURES,
    fit_forest,
    metadata_baseline,
    predict_forest,
)


def test_forest_collapses_rows_and_predicts_every_class() -> None:
    rng = np.random.default_rng(0)
    # 60 series of 5 slices each: the slices of a series share their features.
    series = np.column_stack([rng.random(60), rng.normal(size=60)])
    series[::7, 1] = np.nan  # missing values are allowed
    x = np.repeat(series, 5, axis=0)
    y = (x[:, 0] > 0.5).astype(np.int64)
    forest = fit_forest(x, y, {"max_depth": 3}, n_estimators=30, seed=0)
    assert forest.n_features_in_ == 2
    prob = predict_forest(forest, x, 2)
    assert prob.shape == (300, 2) and np.allclose(prob.sum(axis=1), 1.0)
    far = np.abs(x[:, 0] - 0.5) > 0.1
    assert prob[far & (y == 1), 1].min() > 0.7 and prob[far & (y == 0), 1].max() < 0.3
    # One label only: the prevalence, for every row and in every column asked for.
    constant = fit_forest(x, np.zeros(300, np.int64), {}, n_estimators=5, seed=0)
    np.testing.assert_allclose(predict_forest(constant, x[:4], 3), [[1.0, 0.0, 0.0]] * 4)


def _phantom_config(tmp_path: Path, studies: int) -> dict:
    return {
        "name": "metadata",
        "data": {
            "phantom": {"studies": studies, "size": 32, "slices": 2},
            "image_size": 16,
            "cache_dir": str(tmp_path / "cache"),
            "workers": 0,
            "split": {"val_fraction": 0.25, "test_fraction": 0.4},
        },
        "eval": {"n_boot": 300},
    }


def test_phantom_metadata_carry_no_signal(tmp_path: Path) -> None:
    """The phantom draws scanners apart from the anatomy: the forest must be at chance."""
    from ichseg.config import load_config

    config = load_config(extra=_phantom_config(tmp_path, studies=90))
    result = metadata_baseline(config, tmp_path / "out", n_estimators=25, progress=False)
    metrics = result.metrics
    used = set(result.record["features_used"])
    assert {"age", "sex", "manufacturer", "kernel", "kvp"} <= used
    assert {"slice_thickness", "pixel_spacing", "rows"} <= set(result.record["features_constant"])
    for key in ("auroc_any", "series_auroc_any"):
        low, high = metrics["ci"][key]
        assert low < 0.5 < high, (key, metrics[key], low, high)
        assert abs(metrics[key] - 0.5) < 0.2
    out = tmp_path / "out"
    for name in ("metrics.json", "report.md", "roc_curves.png", "baseline.json", "splits.json"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "## Metadata-only baseline" in report and "Left out because" in report
    record = json.loads((out / "baseline.json").read_text())
    assert record["chosen"]["val_loss"] == min(r["val_loss"] for r in record["grid"])
    splits = json.loads((out / "splits.json").read_text())
    assert not set(splits["train"]) & set(splits["test"])
    assert len(splits["test"]) == metrics["n_patients"]


def _leaky_images(tmp_path: Path, patients: int = 40) -> tuple[Path, Path]:
    """Noise pictures whose site, in a demographics CSV, gives their label away."""
    rng = np.random.default_rng(1)
    root = tmp_path / "images"
    root.mkdir()
    rows, people = ["image,label,patient_id"], ["patient_id,site,age,sex"]
    for i in range(patients):
        label = "hemorrhage" if i % 2 else "normal"
        for k in range(2):
            name = f"p{i:02d}_{k}.png"
            pixels = rng.integers(0, 256, size=(16, 16), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name)
            rows.append(f"{name},{label},P{i:02d}")
        people.append(f"P{i:02d},{'A' if i % 2 else 'B'},{rng.integers(20, 90)},{'MF'[i % 3 % 2]}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    demographics = tmp_path / "demographics.csv"
    demographics.write_text("\n".join(people) + "\n")
    return root, demographics


def test_a_leaking_site_is_found(tmp_path: Path) -> None:
    root, demographics = _leaky_images(tmp_path)
    config_path = tmp_path / "leaky.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "data": {
                    "source": "images",
                    "root": str(root),
                    "labels": str(root / "labels.csv"),
                    "demographics": str(demographics),
                    "image_size": 16,
                    "cache_dir": str(tmp_path / "cache"),
                    "workers": 0,
                    "split": {"test_fraction": 0.3},
                },
                "eval": {"n_boot": 100},
            }
        )
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        ["baseline-metadata", "--config", str(config_path), "--out", str(out), "--trees", "20"],
    )
    assert result.exit_code == 0, result.output
    assert "features that vary: age, sex, site" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["auroc_any"] > 0.95 and metrics["ci"]["auroc_any"][0] > 0.5
    record = json.loads((out / "baseline.json").read_text())
    assert next(iter(record["importances"])).startswith("site=")


def test_baseline_reuses_a_runs_splits(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["baseline-metadata", "--run", str(trained_run), "--out", str(out), "--trees", "5"]
    )
    assert result.exit_code == 0, result.output
    run_splits = json.loads((trained_run / "splits.json").read_text())
    assert json.loads((out / "splits.json").read_text()) == run_splits
    record = json.loads((out / "baseline.json").read_text())
    assert record["splits_from"] == str(trained_run / "splits.json")
    assert not list(trained_run.glob("baseline*"))  # nothing written into the run


def test_baseline_needs_a_config_or_a_run(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["baseline-metadata", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--config or --run" in result.output
    assert not (tmp_path / "o").exists()


def test_features_are_scan_attributes() -> None:
    from ichseg.io.attributes import FIELDS

    features = [*NUMERIC_FEATURES, *CATEGORICAL_FEATURES]
    assert set(features) <= set(FIELDS) and len(set(features)) == len(features)
