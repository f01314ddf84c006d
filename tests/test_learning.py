"""The classifier learns: trained on phantom studies, it ranks held-out patients' slices well.

A trainer that runs but does not learn passes every other test; this one fails on it. It trains
a small ResNet-18 on classically masked 96-pixel slices of 120 phantom studies (patient-level
split, bleeds of realistic size and HU) and scores the test patients once, with probabilities
calibrated on the validation patients.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

LEARNING_CONFIG = {
    "name": "learning",
    "data": {
        "phantom": {"studies": 120, "seed": 300, "size": 128, "slices": 20},
        "image_size": 96,
        "split": {"val_fraction": 0.2, "test_fraction": 0.25},
    },
    "model": {"name": "resnet18"},
    "masking": {"enabled": True, "method": "classical", "background": "air", "dilation_mm": 2.0},
    "train": {
        "epochs": 8,
        "batch_size": 32,
        "warmup_epochs": 0,
        "early_stopping_patience": None,
    },
    "eval": {"n_boot": 200},
}


@pytest.mark.slow
def test_a_small_classifier_learns_on_held_out_phantom_patients(tmp_path: Path) -> None:
    from ichseg.config import load_config
    from ichseg.engine.train import train

    data = LEARNING_CONFIG["data"] | {"cache_dir": str(tmp_path / "cache")}
    config = load_config(extra=LEARNING_CONFIG | {"data": data})
    train(config, tmp_path / "run", progress=False)

    metrics = json.loads((tmp_path / "run" / "eval" / "test" / "metrics.json").read_text())
    assert metrics["split"] == "test"
    assert metrics["auroc_any"] >= 0.9, metrics["per_class"]["any"]
    assert metrics["series_auroc_any"] >= 0.9
    # Temperatures fitted on the validation patients carry over to the test patients.
    slices = metrics["calibration"]["slices"]
    assert slices["after"]["mean_ece"] < slices["before"]["mean_ece"]
    assert slices["mean_ece_change"]["value"] < 0
