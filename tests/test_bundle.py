"""MONAI bundle export: layout, offline metadata verification, and ``monai.bundle run`` giving the
same predictions as ``ichseg predict`` on the bundle and on the run folder."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from ichseg import SUBTYPES
from ichseg.bundle import export_bundle, inference_config, metadata_schema
from ichseg.cli import app
from ichseg.errors import ConfigError, InputError

SUBPROCESS_TIMEOUT = 120
KEY_COLUMNS = ("source", "series_uid", "sop_uid", "slice_index", "z_mm")


@pytest.fixture(scope="module")
def bundle(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle of the tiny run, without a U-Net (classical intracranial mask)."""
    return export_bundle(trained_run, tmp_path_factory.mktemp("bundles") / "tiny_bundle")


@pytest.fixture(scope="module")
def bundle_with_segmenter(
    trained_run: Path, segmenter_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    return export_bundle(
        trained_run,
        tmp_path_factory.mktemp("bundles") / "seg_bundle",
        segmenter=segmenter_checkpoint,
        version="1.2.3",
        authors="Test Authors",
    )


def _monai(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        cwd=cwd,
        env=env,
    )


def _monai_run(
    bundle: Path, source: Path, out: Path, *overrides: str, cwd: Path
) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` of a bundle on ``source`` with Grad-CAM off."""
    return _monai(
        "run",
        "--config_file",
        bundle / "configs" / "inference.json",
        "--meta_file",
        bundle / "configs" / "metadata.json",
        "--bundle_root",
        bundle,
        "--dataset_dir",
        source,
        "--output_dir",
        out,
        "--gradcam",
        "False",
        *overrides,
        cwd=cwd,
    )


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _assert_same_predictions(a: Path, b: Path, classes: list[str]) -> None:
    for table, keys in (("predictions.csv", KEY_COLUMNS), ("series.csv", ("series_uid", "name"))):
        rows_a, rows_b = _read_csv(a / table), _read_csv(b / table)
        assert len(rows_a) == len(rows_b) > 0
        assert [[r[k] for k in keys] for r in rows_a] == [[r[k] for k in keys] for r in rows_b]
        probs_a = np.array([[float(r[c]) for c in classes] for r in rows_a])
        probs_b = np.array([[float(r[c]) for c in classes] for r in rows_b])
        np.testing.assert_allclose(probs_a, probs_b, atol=1e-5)
    series_a = json.loads((a / "series.json").read_text())
    series_b = json.loads((b / "series.json").read_text())
    assert [r["name"] for r in series_a] == [r["name"] for r in series_b]
    for row_a, row_b in zip(series_a, series_b, strict=True):
        assert {k: v for k, v in row_a.items() if k.startswith("label_")} == {
            k: v for k, v in row_b.items() if k.startswith("label_")
        }
        mask_a = np.asarray(nib.load(a / row_a["mask"]).dataobj)
        mask_b = np.asarray(nib.load(b / row_b["mask"]).dataobj)
        np.testing.assert_array_equal(mask_a, mask_b)


def test_bundle_layout(bundle: Path, trained_run: Path) -> None:
    import torch

    for relative in (
        "configs/metadata.json",
        "configs/metadata_schema.json",
        "configs/inference.json",
        "configs/logging.conf",
        "configs/ichseg_run.yaml",
        "models/classifier.pt",
        "models/thresholds.json",
        "docs/README.md",
        "LICENSE",
    ):
        assert (bundle / relative).is_file(), relative
    assert not (bundle / "models" / "segmenter.pt").exists()
    # No staging folder is left beside the bundle.
    assert sorted(p.name for p in bundle.parent.iterdir()) == [bundle.name]

    state = torch.load(bundle / "models" / "classifier.pt", weights_only=True)
    assert {"state_dict", "config"} <= set(state)
    assert state["config"]["name"] == "tiny"
    assert (bundle / "models" / "classifier.pt").read_bytes() == (
        trained_run / "best.pt"
    ).read_bytes()
    assert json.loads((bundle / "models" / "thresholds.json").read_text()) == json.loads(
        (trained_run / "thresholds.json").read_text()
    )

    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["version"] == "0.1.0" and meta["changelog"] == {"0.1.0": "initial export"}
    assert meta["schema"].startswith("https://")
    assert meta["required_packages_version"]["ichseg"]
    assert "not for clinical use" in meta["intended_use"]
    assert "phantom" in meta["intended_use"] and "phantom" in meta["data_source"]
    image = meta["network_data_format"]["inputs"]["image"]
    assert image["num_channels"] == 3 and image["spatial_shape"] == [64, 64]
    assert image["channel_def"]["0"] == "brain window 40/80"
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["num_channels"] == 6 and pred["channel_def"]["0"] == "any"
    assert meta["eval_metrics"]["split"] == "test"

    readme = (bundle / "docs" / "README.md").read_text()
    assert "python -m monai.bundle run" in readme and "ichseg predict B IN OUT" in readme
    assert "Apache License" in (bundle / "LICENSE").read_text()
    assert "run" in inference_config() and "initialize" in inference_config()


def test_verify_metadata_offline(bundle: Path, tmp_path: Path) -> None:
    pytest.importorskip("jsonschema")
    from monai.bundle import verify_metadata

    meta_file = bundle / "configs" / "metadata.json"
    schema_file = bundle / "configs" / "metadata_schema.json"

    result = _monai(
        "verify_metadata", "--meta_file", meta_file, "--filepath", schema_file, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "verified with no error" in result.stdout + result.stderr

    md5 = hashlib.md5(schema_file.read_bytes()).hexdigest()
    verify_metadata(meta_file=str(meta_file), filepath=str(schema_file), hash_val=md5)

    # The schema has teeth: a metadata file without a required field fails.
    broken = json.loads(meta_file.read_text())
    del broken["network_data_format"]["inputs"]["image"]["channel_def"]
    broken_file = tmp_path / "metadata.json"
    broken_file.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="channel_def"):
        verify_metadata(meta_file=str(broken_file), filepath=str(schema_file), hash_val=md5)


def test_schema_is_valid_draft7() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft7Validator.check_schema(metadata_schema())


def test_verify_net_in_out(bundle: Path, tmp_path: Path) -> None:
    result = _monai(
        "verify_net_in_out",
        "network_def",
        "--meta_file",
        bundle / "configs" / "metadata.json",
        "--config_file",
        bundle / "configs" / "inference.json",
        "--bundle_root",
        bundle,
        "--device",
        "cpu",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "verified with no error" in result.stdout + result.stderr


def test_monai_bundle_run_matches_ichseg_predict(
    bundle_with_segmenter: Path,
    trained_run: Path,
    segmenter_checkpoint: Path,
    phantom_dir: Path,
    tmp_path: Path,
) -> None:
    bundle = bundle_with_segmenter
    assert (bundle / "models" / "segmenter.pt").is_file()
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["version"] == "1.2.3" and "Test Authors" in meta["copyright"]
    source = (phantom_dir / "dicom").resolve()
    out_monai, out_bundle, out_run = tmp_path / "monai", tmp_path / "bundle", tmp_path / "run"

    result = _monai_run(bundle, source, out_monai, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runner = CliRunner()
    common = ["--quiet", "--no-gradcam"]
    cli = runner.invoke(app, ["predict", str(bundle), str(source), str(out_bundle), *common])
    assert cli.exit_code == 0, cli.output
    cli = runner.invoke(
        app,
        ["predict", str(trained_run), str(source), str(out_run), *common]
        + ["--segmenter", str(segmenter_checkpoint)],
    )
    assert cli.exit_code == 0, cli.output

    classes = list(meta["network_data_format"]["outputs"]["pred"]["channel_def"].values())
    for out in (out_monai, out_bundle, out_run):
        assert len(_read_csv(out / "predictions.csv")) == 16
        assert len(list((out / "masks").glob("*_mask.nii.gz"))) == 2
    _assert_same_predictions(out_monai, out_bundle, classes)
    _assert_same_predictions(out_monai, out_run, classes)


def test_bundle_without_segmenter_matches_run(
    bundle: Path, trained_run: Path, phantom_dir: Path, tmp_path: Path
) -> None:
    runner = CliRunner()
    source = phantom_dir / "dicom"
    for model, out in ((bundle, tmp_path / "bundle"), (trained_run, tmp_path / "run")):
        result = runner.invoke(
            app, ["predict", str(model), str(source), str(out), "--quiet", "--no-gradcam"]
        )
        assert result.exit_code == 0, result.output
    _assert_same_predictions(tmp_path / "bundle", tmp_path / "run", list(SUBTYPES))


def test_bundle_ships_a_hemorrhage_segmenter(
    trained_run: Path,
    segmenter_checkpoint: Path,
    hemorrhage_checkpoint: Path,
    phantom_dir: Path,
    tmp_path: Path,
) -> None:
    """The bundle carries the hemorrhage U-Net given at export and predicts volumes with it;
    an intracranial U-Net in its place is refused at export, naming the file."""
    from ichseg.engine.checkpoint import HEMORRHAGE_SEGMENTER_FILE

    runner = CliRunner()
    refused = runner.invoke(
        app,
        [
            "bundle",
            "export",
            str(trained_run),
            str(tmp_path / "wrong"),
            "--hemorrhage-segmenter",
            str(segmenter_checkpoint),
        ],
    )
    assert refused.exit_code == 2 and "not a hemorrhage segmenter" in refused.output
    assert not (tmp_path / "wrong").exists()

    bundle = tmp_path / "bundle"
    result = runner.invoke(
        app,
        [
            "bundle",
            "export",
            str(trained_run),
            str(bundle),
            "--hemorrhage-segmenter",
            str(hemorrhage_checkpoint),
        ],
    )
    assert result.exit_code == 0, result.output
    assert (bundle / "models" / HEMORRHAGE_SEGMENTER_FILE).read_bytes() == (
        hemorrhage_checkpoint.read_bytes()
    )
    out = tmp_path / "out"
    source = next(p for p in sorted((phantom_dir / "dicom").iterdir()) if p.is_dir())
    result = runner.invoke(
        app, ["predict", str(bundle), str(source), str(out), "--quiet", "--no-gradcam"]
    )
    assert result.exit_code == 0, result.output
    series = _read_csv(out / "series.csv")
    assert series[0]["hemorrhage_mask"] and float(series[0]["volume_ml_total"]) >= 0.0

    # MONAI's runner reaches the same outputs through inference.json's overrides.
    out_monai = tmp_path / "monai"
    result = _monai_run(
        bundle, source.resolve(), out_monai, "--sr", "True", "--output_format", "both", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    row = _read_csv(out_monai / "series.csv")[0]
    assert row["volume_ml_total"] == series[0]["volume_ml_total"]
    assert (out_monai / row["seg"]).is_file() and (out_monai / row["sr"]).is_file()


def test_unmasked_run_ships_no_segmenter_it_does_not_use(
    trained_run: Path, segmenter_checkpoint: Path, tmp_path: Path
) -> None:
    """A config naming a masking checkpoint without U-Net masking: predict on the run never
    uses it, so the bundle must not either (its masks would bound other volumes)."""
    from ichseg.engine.checkpoint import load_checkpoint, save_checkpoint

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("eval", "last.pt"))
    state = load_checkpoint(run / "best.pt")
    state["config"]["masking"] = {"enabled": False, "checkpoint": str(segmenter_checkpoint)}
    save_checkpoint(state, run / "best.pt")
    bundle = export_bundle(run, tmp_path / "bundle")
    assert not (bundle / "models" / "segmenter.pt").exists()


def test_overwrite(trained_run: Path, tmp_path: Path) -> None:
    target = tmp_path / "b"
    target.mkdir()  # an empty folder is fine
    export_bundle(trained_run, target, description="first")

    with pytest.raises(InputError, match="not empty") as error:
        export_bundle(trained_run, target, description="second")
    assert str(target) in str(error.value)
    meta = json.loads((target / "configs" / "metadata.json").read_text())
    assert meta["description"] == "first"

    (target / "stale.txt").write_text("from the old bundle")
    export_bundle(trained_run, target, description="second", overwrite=True)
    meta = json.loads((target / "configs" / "metadata.json").read_text())
    assert meta["description"] == "second"
    assert not (target / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_refuses_to_overwrite_the_run(trained_run: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="must not be or contain the run"):
        export_bundle(trained_run, trained_run, overwrite=True)
    with pytest.raises(InputError, match="must not be or contain the run"):
        export_bundle(trained_run, trained_run.parent, overwrite=True)
    assert (trained_run / "best.pt").is_file()


def test_bad_run_folders(tmp_path: Path, trained_run: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(InputError, match="no such run folder") as error:
        export_bundle(missing, tmp_path / "out")
    assert str(missing) in str(error.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no best.pt") as error:
        export_bundle(empty, tmp_path / "out")
    assert str(empty) in str(error.value)

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "best.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a readable PyTorch checkpoint"):
        export_bundle(junk, tmp_path / "out")

    # A run never evaluated has no validated thresholds: refused, never exported at 0.5.
    unevaluated = tmp_path / "unevaluated"
    unevaluated.mkdir()
    shutil.copyfile(trained_run / "best.pt", unevaluated / "best.pt")
    with pytest.raises(InputError, match="thresholds missing"):
        export_bundle(unevaluated, tmp_path / "out")

    with pytest.raises(ConfigError, match="version"):
        export_bundle(trained_run, tmp_path / "out", version="one")
    with pytest.raises(InputError, match="no such segmenter"):
        export_bundle(trained_run, tmp_path / "out", segmenter=tmp_path / "nope.pt")
    assert not (tmp_path / "out").exists()


def _masked_run(trained_run: Path, root: Path, checkpoint: Path | None) -> Path:
    """A run folder whose checkpoint says it was trained on U-Net-masked slices."""
    import torch

    state = torch.load(trained_run / "best.pt", weights_only=True)
    config = dict(state["config"])
    config["masking"] = dict(config["masking"], enabled=True, method="unet")
    config["masking"]["checkpoint"] = None if checkpoint is None else str(checkpoint)
    run = root / "masked_run"
    run.mkdir(parents=True)
    torch.save({"state_dict": state["state_dict"], "config": config}, run / "best.pt")
    shutil.copyfile(trained_run / "thresholds.json", run / "thresholds.json")
    return run


def test_masked_run_needs_its_segmenter(
    trained_run: Path, segmenter_checkpoint: Path, tmp_path: Path
) -> None:
    lost = _masked_run(trained_run, tmp_path / "a", tmp_path / "gone.pt")
    with pytest.raises(InputError, match="segmenter"):
        export_bundle(lost, tmp_path / "out_a")
    # An explicit segmenter rescues it.
    out = export_bundle(lost, tmp_path / "out_b", segmenter=segmenter_checkpoint)
    assert (out / "models" / "segmenter.pt").read_bytes() == segmenter_checkpoint.read_bytes()
    # The config's own checkpoint is shipped when it exists.
    found = _masked_run(trained_run, tmp_path / "c", segmenter_checkpoint)
    out = export_bundle(found, tmp_path / "out_c")
    assert (out / "models" / "segmenter.pt").read_bytes() == segmenter_checkpoint.read_bytes()
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    assert "masked" in meta["description"]
