"""The ablation runner: rungs x seeds, aggregation with t-intervals, files written."""

import csv
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from ichseg.cli import app
from ichseg.engine.ablation import aggregate, format_table, resolve_rung, run_ablation
from ichseg.errors import ConfigError


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


def _runs(values):
    return [
        {
            "rung": "a",
            "model": "m",
            "masked": False,
            "metrics": {
                "auroc_any": v,
                "macro_auroc": v,
                "weighted_log_loss": 1 - v,
                "series_auroc_any": v,
            },
        }
        for v in values
    ]


def test_aggregate_mean_and_t_interval():
    (row,) = aggregate(_runs((0.6, 0.7, 0.8)))
    assert row["seeds"] == 3
    assert row["auroc_any_mean"] == pytest.approx(0.7)
    # t(0.975, 2) = 4.3027; sd = 0.1; half width = 4.3027 * 0.1 / sqrt(3)
    half = 4.302652729911275 * 0.1 / np.sqrt(3)
    assert row["auroc_any_ci_low"] == pytest.approx(0.7 - half)
    assert row["auroc_any_ci_high"] == pytest.approx(0.7 + half)
    assert "0.700 [" in format_table([row])


def test_aggregate_clips_intervals_to_the_metric_range():
    (row,) = aggregate(_runs((0.8, 0.9, 1.0)))
    assert row["auroc_any_ci_high"] == 1.0  # the t-interval alone would reach 1.148
    assert row["auroc_any_ci_low"] == pytest.approx(0.9 - 4.302652729911275 * 0.1 / np.sqrt(3))
    assert row["weighted_log_loss_ci_low"] == 0.0


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
    for column in ("auroc_any_mean", "auroc_any_ci_low", "weighted_log_loss_ci_high"):
        assert column in rows[0]
    for rung in ("r1", "r2"):
        seeds = sorted(p.name for p in (tmp_path / "out" / rung).iterdir())
        assert seeds == ["seed0", "seed1", "seed2"]
    assert result.markdown_path.read_text().startswith("# Ablation ladder")
    assert result.plot_path.stat().st_size > 0
    # The masked rung's runs record which segmenter masked them.
    saved = yaml.safe_load((tmp_path / "out" / "r2" / "seed0" / "config.yaml").read_text())
    assert saved["masking"]["enabled"] and saved["masking"]["checkpoint"]
    # Finished runs are reused: a second call trains nothing and gives the same table.
    again = run_ablation(
        rungs,
        tmp_path / "out",
        seeds=3,
        segmenter=segmenter_checkpoint,
        cache_root=tmp_path / "cache",
        progress=False,
    )
    assert again.table == result.table


def test_masked_rung_without_segmenter_fails_with_one_line(tmp_path: Path):
    rung = _rung(tmp_path, "m", "resnet18", masked=True)
    result = CliRunner().invoke(
        app, ["ablate", str(rung), "--out", str(tmp_path / "o"), "--seeds", "1", "--quiet"]
    )
    assert result.exit_code == 2
    assert "needs masking.checkpoint or --segmenter" in result.output


def test_packaged_ladder_resolves_with_quick_profile():
    rung = resolve_rung("ablation/04_seresnet50_unet.yaml", profile="quick")
    assert rung.data.image_size == 64 and rung.masking.enabled
    with pytest.raises(ConfigError, match="unknown profile"):
        resolve_rung("ablation/01_vgg16.yaml", profile="fast")
