"""The ablation runner: rungs x seeds on one split, nested intervals, paired comparisons."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from ichseg.cli import app
from ichseg.config import load_config
from ichseg.engine.ablation import analyse, format_comparisons, resolve_rung, run_ablation
from ichseg.errors import ConfigError
from ichseg.volume import SUBTYPES


def _rung(tmp_path: Path, name: str, model: str, masked: bool = False) -> Path:
    config = {
        "name": name,
        "data": {
            "phantom": {"studies": 8, "size": 64, "slices": 6},
            "image_size": 64,
            "split": {"val_fraction": 0.25, "test_fraction": 0.25},
        },
        "model": {"name": model},
        "train": {"epochs": 1, "batch_size": 16},
        "eval": {"n_boot": 20},
        "masking": {"enabled": masked, "method": "unet"},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _fake_run(folder: Path, labels: np.ndarray, probs: np.ndarray, patients: list[str]) -> Path:
    """A run folder holding only what the ladder reads: test predictions and metrics."""
    out = folder / "eval" / "test"
    out.mkdir(parents=True)
    with open(out / "predictions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["patient_id", "series_uid", "sop_uid", "slice_index", *SUBTYPES]
            + [f"true_{n}" for n in SUBTYPES]
        )
        for i, (p, y) in enumerate(zip(probs, labels, strict=True)):
            patient = patients[i]
            writer.writerow([patient, f"s-{patient}", f"sop{i}", i, *p, *y.astype(int)])
    (out / "metrics.json").write_text(json.dumps({"label_level": "slice"}))
    return folder


def _synthetic_ladder(tmp_path: Path, positives: bool = True, n_patients: int = 30):
    rng = np.random.default_rng(0)
    patients = [f"p{i // 4}" for i in range(4 * n_patients)]
    n = len(patients)
    labels = np.zeros((n, 6))
    if positives:
        labels[:, 0] = rng.random(n) < 0.4
        labels[:, 5] = labels[:, 0] * (rng.random(n) < 0.5)
    config = load_config(extra={"name": "x"})
    runs = []
    for rung, signal in (("weak", 0.2), ("strong", 3.0)):
        for seed in range(3):
            noise = rng.normal(size=(n, 6))
            probs = 1 / (1 + np.exp(-(signal * (2 * labels - 1) + noise)))
            folder = _fake_run(tmp_path / rung / f"seed{seed}", labels, probs, patients)
            runs.append({"rung": rung, "seed": seed, "dir": folder, "config": config})
    return runs


def test_nested_intervals_and_paired_difference(tmp_path: Path):
    report = analyse(_synthetic_ladder(tmp_path), n_boot=200)
    weak, strong = report["table"]
    for row in (weak, strong):
        assert row["auroc_any_ci_low"] <= row["auroc_any_mean"] <= row["auroc_any_ci_high"]
        assert row["test_patients"] == 30
    assert strong["auroc_any_mean"] > 0.9 > weak["auroc_any_mean"]
    # The better rung is better on the same patients: the paired interval excludes zero.
    assert strong["delta_auroc_any_ci_low"] > 0
    assert strong["delta_weighted_log_loss_ci_high"] < 0
    assert strong["delta_auroc_any_p"] < 0.05
    assert strong["delong_series_auroc_any_p"] < 0.05
    assert "Δ auroc_any" in format_comparisons(report["table"])


def test_identical_rungs_differ_by_nothing(tmp_path: Path):
    runs = _synthetic_ladder(tmp_path)
    same = [dict(r, rung="copy") for r in runs[:3]]
    report = analyse(runs[:3] + same, n_boot=100)
    copy = report["table"][1]
    assert copy["delta_auroc_any"] == pytest.approx(0.0)
    assert copy["delta_auroc_any_ci_low"] <= 0 <= copy["delta_auroc_any_ci_high"]


def test_test_split_without_positives_does_not_crash(tmp_path: Path):
    report = analyse(_synthetic_ladder(tmp_path, positives=False), n_boot=50)
    row = report["table"][0]
    assert row["auroc_any_mean"] is None  # undefined, reported as n/a, not a crash
    assert report["macro_classes"] == []


def test_ladder_with_masked_rung(tmp_path: Path, segmenter_checkpoint: Path):
    rungs = [_rung(tmp_path, "r1", "resnet18"), _rung(tmp_path, "r2", "resnet18", masked=True)]
    result = run_ablation(
        rungs,
        tmp_path / "out",
        seeds=3,
        segmenter=segmenter_checkpoint,
        cache_root=tmp_path / "cache",
        progress=False,
    )
    with open(result.csv_path) as handle:
        rows = list(csv.DictReader(handle))
    assert [r["rung"] for r in rows] == ["r1", "r2"]
    assert [r["masked"] for r in rows] == ["False", "True"]
    assert all(r["seeds"] == "3" for r in rows)
    for column in (
        "auroc_any_mean",
        "auroc_any_ci_low",
        "weighted_log_loss_ci_high",
        "delta_auroc_any",
        "delta_auroc_any_ci_low",
        "delta_series_auroc_any_p",
        "delong_series_auroc_any_p",
    ):
        assert column in rows[1]
    # Every run of every rung was tested on the same patients.
    splits = {
        json.dumps(json.loads((tmp_path / "out" / r / s / "splits.json").read_text()))
        for r in ("r1", "r2")
        for s in ("seed0", "seed1", "seed2")
    }
    assert len(splits) == 1
    assert result.markdown_path.read_text().startswith("# Ablation ladder")
    assert result.plot_path.stat().st_size > 0
    # The masked rung's runs carry the segmenter that masked them.
    run = tmp_path / "out" / "r2" / "seed0"
    assert (run / "segmenter.pt").read_bytes() == segmenter_checkpoint.read_bytes()
    assert json.loads((run / "preprocessing.json").read_text())["masking"]["segmenter_sha1"]
    # Finished runs of the same config are reused: a second call gives the same table.
    again = run_ablation(
        rungs,
        tmp_path / "out",
        seeds=3,
        segmenter=segmenter_checkpoint,
        cache_root=tmp_path / "cache",
        progress=False,
    )
    assert again.table == result.table


def test_reusing_a_run_of_another_config_is_refused(tmp_path: Path):
    rung = _rung(tmp_path, "r1", "resnet18")
    run = tmp_path / "out" / "r1" / "seed0"
    run.mkdir(parents=True)
    other = load_config(rung, ["train.lr=0.5"])
    from ichseg.config import save_config

    save_config(other, run / "config.yaml")
    with pytest.raises(ConfigError, match="another config.*train.lr"):
        run_ablation([rung], tmp_path / "out", seeds=1, cache_root=tmp_path / "c", progress=False)


def test_masked_rung_without_segmenter_fails_with_one_line(tmp_path: Path):
    rung = _rung(tmp_path, "m", "resnet18", masked=True)
    result = CliRunner().invoke(
        app, ["ablate", str(rung), "--out", str(tmp_path / "o"), "--seeds", "1", "--quiet"]
    )
    assert result.exit_code == 2
    assert "needs masking.checkpoint or --segmenter" in result.output


def test_packaged_ladder_resolves_with_quick_profile():
    rung = resolve_rung("ablation/04_seresnet50_unet.yaml", profile="quick")
    assert rung.masking.enabled
    # 64-px slices spend their pixels on the head (rungs 01-03) or the intracranial box (04).
    assert rung.data.image_size == 64 and rung.masking.crop
    first = resolve_rung("ablation/01_vgg16.yaml", profile="quick")
    assert first.data.head_crop and not first.masking.enabled
    assert resolve_rung("ablation/01_vgg16.yaml").data.head_crop is False
    with pytest.raises(ConfigError, match="unknown profile"):
        resolve_rung("ablation/01_vgg16.yaml", profile="fast")


def test_perfect_rungs_get_score_intervals_and_a_marked_cell(tmp_path: Path):
    from ichseg.engine.ablation_analysis import (
        SCORE_NOTE,
        format_table,
        plot_ablation,
        write_ablation_markdown,
    )
    from ichseg.metrics.auroc import auroc_score_interval

    rng = np.random.default_rng(0)
    patients = [f"p{i // 4}" for i in range(120)]
    labels = np.zeros((120, 6))
    labels[::4, 0] = labels[::4, 5] = 1  # one positive slice in each patient's four
    config = load_config(extra={"name": "x"})
    runs = [
        {
            "rung": rung,
            "seed": seed,
            "config": config,
            "dir": _fake_run(tmp_path / rung / f"s{seed}", labels, probs(), patients),
        }
        for rung, probs in (
            ("weak", lambda: rng.random((120, 6))),
            ("perfect", lambda: 0.1 + 0.8 * labels),
        )
        for seed in range(3)
    ]
    report = analyse(runs, n_boot=100)
    weak, best = report["table"]

    assert best["auroc_any_mean"] == 1.0 and best["auroc_any_ci_method"] == "score"
    # Every patient has positive and negative slices, none negative ones only: 30 on each side.
    expected = auroc_score_interval(1.0, 30, 30)
    assert (best["auroc_any_ci_low"], best["auroc_any_ci_high"]) == pytest.approx(expected)
    assert "auroc_any_ci_method" not in weak
    assert weak["auroc_any_ci_low"] < weak["auroc_any_mean"] < weak["auroc_any_ci_high"]
    table = format_table(report["table"])
    assert f"1.000 [{expected[0]:.3f}, 1.000] †" in table and table.endswith(SCORE_NOTE)
    text = write_ablation_markdown(report, tmp_path / "ablation.md").read_text()
    assert text.count(SCORE_NOTE) == 2  # under the headline table and the per-class one
    assert f"\n\n{SCORE_NOTE}" in text  # after a blank line: not a row of the table
    assert plot_ablation(report, tmp_path / "ablation.png").stat().st_size > 0
