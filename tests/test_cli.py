"""Command line through typer's CliRunner: help, phantom, segment, train-segmenter."""

import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml
from typer.testing import CliRunner

from ichseg.cli import app

runner = CliRunner()


def test_help_is_instant_and_lists_commands():
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "ichseg", "--help"], capture_output=True, text=True, check=True
    )
    assert time.perf_counter() - started < 10
    for command in (
        "inspect",
        "phantom",
        "segment",
        "train",
        "evaluate",
        "ablate",
        "predict",
        "demo",
        "bundle",
    ):
        assert command in done.stdout
    heavy = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, ichseg.cli; print(any(m in sys.modules for m in "
            "('torch', 'pydicom', 'monai', 'nibabel')))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert heavy.stdout.strip() == "False"


def test_phantom_command_writes_studies(tmp_path: Path):
    result = runner.invoke(
        app,
        [
            "phantom",
            str(tmp_path / "ph"),
            "--studies",
            "2",
            "--size",
            "64",
            "--slices",
            "6",
            "--seed",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = (tmp_path / "ph" / "manifest.csv").read_text().strip().splitlines()
    assert len(rows) == 3
    assert len(list((tmp_path / "ph" / "dicom").rglob("*.dcm"))) == 12


def test_segment_classical_masks_overlay_their_images(phantom_dir: Path, tmp_path: Path):
    out = tmp_path / "seg"
    result = runner.invoke(app, ["segment", str(phantom_dir / "dicom"), str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    masks = sorted(out.glob("*_mask.nii.gz"))
    assert len(masks) == 2
    for mask_path in masks:
        image = nib.load(str(mask_path).replace("_mask.nii.gz", "_image.nii.gz"))
        mask = nib.load(mask_path)
        assert mask.shape == image.shape
        np.testing.assert_allclose(mask.affine, image.affine)
    assert (out / "summary.csv").exists()


def test_segment_unet_without_model_is_one_line(phantom_dir: Path, tmp_path: Path):
    result = runner.invoke(
        app, ["segment", str(phantom_dir), str(tmp_path / "o"), "--method", "unet"]
    )
    assert result.exit_code == 2
    assert result.output.strip() == "error: --method unet needs --model CHECKPOINT"


def test_train_segmenter_from_yaml(tmp_path: Path):
    config = tmp_path / "seg.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {"phantom": {"studies": 3, "size": 64, "slices": 6}},
                "model": {
                    "image_size": 64,
                    "channels": [8, 16],
                    "strides": [2],
                    "epochs": 1,
                    "batch_size": 8,
                },
            }
        )
    )
    result = runner.invoke(
        app, ["train-segmenter", str(tmp_path / "run"), "--config", str(config), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "best.pt").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {sorce: phantom}\n")
    result = runner.invoke(app, ["train-segmenter", str(tmp_path / "r2"), "--config", str(bad)])
    assert result.exit_code == 2 and "data.sorce" in result.output
    bad.write_text("model: {epoks: 3}\n")
    result = runner.invoke(app, ["train-segmenter", str(tmp_path / "r3"), "--config", str(bad)])
    assert result.exit_code == 2 and "model.epoks" in result.output


def test_evaluate_val_is_labelled_and_keeps_the_test_report(trained_run: Path, tmp_path: Path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    test_report = (run / "eval" / "test" / "metrics.json").read_bytes()
    result = runner.invoke(app, ["evaluate", str(run), "--split", "val"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("val: ")
    assert (run / "eval" / "val" / "metrics.json").exists()
    assert (run / "eval" / "test" / "metrics.json").read_bytes() == test_report
    assert "validation split" in (run / "eval" / "val" / "report.md").read_text()


def test_train_refuses_a_run_folder_of_another_config(trained_run: Path, tmp_path: Path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    config = tmp_path / "c.yaml"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["train"]["lr"] = 0.123
    config.write_text(yaml.safe_dump(saved))
    for extra in ([], ["--resume"]):
        result = runner.invoke(app, ["train", str(run), "--config", str(config), *extra])
        assert result.exit_code == 2, result.output
        assert "another config" in result.output and "train.lr" in result.output


def test_empty_config_and_file_as_output_fail_at_once(tmp_path: Path, trained_run: Path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    result = runner.invoke(app, ["train", str(tmp_path / "run"), "--config", str(empty)])
    assert result.exit_code == 2 and "config file is empty" in result.output
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    for command in (
        ["train", str(a_file)],
        ["predict", str(trained_run), str(tmp_path), str(a_file)],
    ):
        result = runner.invoke(app, command)
        assert result.exit_code == 2, command
        assert "exists and is not a folder" in result.output
        assert "Traceback" not in result.output
