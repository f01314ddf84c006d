"""``ichseg predict`` end to end on phantom DICOM and NIfTI folders, junk inputs and Grad-CAM."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from ichseg.cli import app
from ichseg.errors import ConfigError

runner = CliRunner()

NUM_STUDIES = 2
NUM_SLICES = 8


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _tree_digest(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` by relative path: proves the input was not touched."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _predict(*args: str | Path):
    return runner.invoke(app, ["predict", *map(str, args), "--quiet"])


def _check_tables(out: Path, num_series: int, num_slices: int) -> list[dict[str, str]]:
    """The three tables agree with each other and with the expected counts."""
    slices = _read_csv(out / "predictions.csv")
    series = _read_csv(out / "series.csv")
    assert len(slices) == num_slices
    assert len(series) == num_series
    assert len(json.loads((out / "series.json").read_text())) == num_series
    assert {r["series_uid"] for r in slices} == {r["series_uid"] for r in series}
    for row in series:
        own = [r for r in slices if r["series_uid"] == row["series_uid"]]
        assert len(own) == int(row["num_slices"])
        assert sorted(int(r["slice_index"]) for r in own) == list(range(len(own)))
        # The default series rule is the maximum over the series' slices.
        assert float(row["any"]) == pytest.approx(max(float(r["any"]) for r in own), abs=1e-6)
        assert 0.0 <= float(row["any"]) <= 1.0
        assert row["label_any"] in ("0", "1")
    return series


def test_predict_dicom_folder(trained_run: Path, phantom_dir: Path, tmp_path: Path) -> None:
    source = phantom_dir / "dicom"
    before = _tree_digest(source)
    out = tmp_path / "out"

    result = _predict(trained_run, source, out, "--no-gradcam")

    assert result.exit_code == 0, result.output
    total = len(list(source.rglob("*.dcm")))
    assert total == NUM_STUDIES * NUM_SLICES
    series = _check_tables(out, NUM_STUDIES, total)
    assert _read_csv(out / "skipped.csv") == []
    for row in series:
        mask = nib.load(out / row["mask"])
        # The phantom's NIfTI copy of the same study has the geometry the mask must share.
        reference = nib.load(phantom_dir / "nifti" / f"{Path(row['source']).name}_ct.nii.gz")
        assert mask.shape == reference.shape
        np.testing.assert_allclose(mask.affine, reference.affine, atol=1e-4)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    assert _tree_digest(source) == before
    assert "2 series, 16 slices" in result.output


@pytest.mark.parametrize("bf16_pays", [True, False])
def test_served_model_records_the_precision_it_runs_in(
    trained_run: Path, monkeypatch, bf16_pays: bool
) -> None:
    from ichseg.engine import predict
    from ichseg.inference.models import load_predictor

    monkeypatch.setattr(predict, "_bf16_autocast_pays", lambda device_type: bf16_pays)
    predictor = load_predictor(trained_run, device="cpu")
    assert predictor.config.train.amp  # the run asked for autocast; the machine decides
    assert predictor.describe()["compute_precision"] == ("bf16" if bf16_pays else "fp32")


def test_predict_nifti_folder(trained_run: Path, phantom_dir: Path, tmp_path: Path) -> None:
    # Only the CT volumes: the phantom's label maps are refused as masks (tested below).
    source = tmp_path / "nifti"
    source.mkdir()
    for path in sorted((phantom_dir / "nifti").glob("*_ct.nii.gz")):
        shutil.copy(path, source / path.name)
    before = _tree_digest(source)
    out = tmp_path / "out"

    result = _predict(trained_run, source, out, "--no-gradcam")

    assert result.exit_code == 0, result.output
    series = _check_tables(out, NUM_STUDIES, NUM_STUDIES * NUM_SLICES)
    for row in series:
        volume = nib.load(row["source"])
        mask = nib.load(out / row["mask"])
        assert mask.shape == volume.shape
        np.testing.assert_allclose(mask.affine, volume.affine, atol=1e-5)
    assert _tree_digest(source) == before


def _junk_folder(phantom_dir: Path, root: Path) -> tuple[Path, dict[str, str]]:
    """One good study plus a text file, a truncated DICOM, an MR slice and an empty folder."""
    import pydicom
    from pydicom.uid import generate_uid

    junk = root / "junk"
    studies = sorted(p for p in (phantom_dir / "dicom").iterdir() if p.is_dir())
    shutil.copytree(studies[0], junk / studies[0].name)
    (junk / "empty").mkdir()
    (junk / "notes.txt").write_text("not an image\n")
    donor = sorted(studies[1].glob("*.dcm"))
    (junk / "truncated.dcm").write_bytes(donor[0].read_bytes()[:200])
    mr = pydicom.dcmread(donor[1])
    mr.Modality = "MR"
    mr.SeriesInstanceUID = generate_uid()
    mr.SOPInstanceUID = generate_uid()
    mr.file_meta.MediaStorageSOPInstanceUID = mr.SOPInstanceUID
    mr.save_as(junk / "mr.dcm")
    return junk, {"notes.txt": "DICOM", "truncated.dcm": "", "mr.dcm": "MR"}


def test_predict_junk_folder_is_partial(
    trained_run: Path, phantom_dir: Path, tmp_path: Path
) -> None:
    junk, expected = _junk_folder(phantom_dir, tmp_path)
    before = _tree_digest(junk)
    out = tmp_path / "out"

    result = _predict(trained_run, junk, out, "--no-gradcam")

    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output
    assert "skipped" in result.stderr
    _check_tables(out, 1, NUM_SLICES)
    skipped = {Path(r["path"]).name: r["reason"] for r in _read_csv(out / "skipped.csv")}
    assert set(skipped) == set(expected)
    for name, hint in expected.items():
        assert skipped[name], f"{name} has no reason"
        assert hint in skipped[name], skipped[name]
    assert _tree_digest(junk) == before


def test_predict_only_junk_fails_cleanly(trained_run: Path, tmp_path: Path) -> None:
    source = tmp_path / "in"
    source.mkdir()
    (source / "notes.txt").write_text("nothing to see\n")

    result = _predict(trained_run, source, tmp_path / "out")

    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert result.output.startswith("error: ")


def test_output_inside_input_is_refused(
    trained_run: Path, phantom_dir: Path, tmp_path: Path
) -> None:
    source = tmp_path / "in"
    shutil.copytree(phantom_dir / "dicom", source)
    before = _tree_digest(source)

    result = _predict(trained_run, source, source / "out")

    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "inside the input" in lines[0]
    assert not (source / "out").exists()
    assert _tree_digest(source) == before


def test_missing_model_is_one_line(phantom_dir: Path, tmp_path: Path) -> None:
    result = _predict(tmp_path / "no-such-run", phantom_dir / "dicom", tmp_path / "out")

    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1
    assert "no-such-run" in result.output


def test_gradcam_written_for_positive_series(
    trained_run: Path, phantom_dir: Path, tmp_path: Path
) -> None:
    from PIL import Image

    from ichseg.engine.checkpoint import Thresholds
    from ichseg.inference import load_predictor, predict

    predictor = load_predictor(trained_run, device="cpu")
    # Zero thresholds make every series positive, whatever the tiny model learnt.
    zero = dict.fromkeys(predictor.class_names, 0.0)
    predictor.thresholds = Thresholds(zero, zero)
    out = tmp_path / "out"

    result = predict(
        trained_run,
        phantom_dir / "dicom",
        out,
        gradcam_slices=2,
        progress=False,
        predictor=predictor,
    )

    assert len(result.series_rows) == NUM_STUDIES
    for row in _read_csv(out / "series.csv"):
        assert row["label_any"] == "1"
        paths = row["gradcam"].split(";")
        assert len(paths) == 2
        for relative in paths:
            with Image.open(out / relative) as image:
                assert image.format == "PNG" and min(image.size) > 16
    assert len(list((out / "gradcam").glob("*.png"))) == 2 * NUM_STUDIES


def test_no_gradcam_for_negative_series(
    trained_run: Path, phantom_dir: Path, tmp_path: Path
) -> None:
    from ichseg.engine.checkpoint import Thresholds
    from ichseg.inference import load_predictor, predict

    predictor = load_predictor(trained_run, device="cpu")
    never = dict.fromkeys(predictor.class_names, 1.01)  # nothing is positive
    predictor.thresholds = Thresholds(never, never)
    out = tmp_path / "out"

    predict(trained_run, phantom_dir / "dicom", out, progress=False, predictor=predictor)

    rows = _read_csv(out / "series.csv")
    assert all(r["label_any"] == "0" and r["gradcam"] == "" for r in rows)
    assert not list(out.rglob("*.png"))


def test_aggregation_rules() -> None:
    from ichseg.metrics import aggregate_probabilities

    probabilities = np.array([[0.1, 0.9], [0.5, 0.2], [0.3, 0.4]])
    np.testing.assert_allclose(aggregate_probabilities(probabilities, "max"), [0.5, 0.9])
    np.testing.assert_allclose(aggregate_probabilities(probabilities, "mean"), [0.3, 0.5])
    np.testing.assert_allclose(aggregate_probabilities(probabilities, "top2"), [0.4, 0.65])
    for bad in ("median", "top0", "topx", "top"):
        with pytest.raises(ConfigError, match="unknown aggregation"):
            aggregate_probabilities(probabilities, bad)


def test_series_labels_use_series_thresholds(
    trained_run: Path, phantom_dir: Path, tmp_path: Path
) -> None:
    from ichseg.engine.checkpoint import Thresholds
    from ichseg.inference import load_predictor, predict

    predictor = load_predictor(trained_run, device="cpu")
    names = predictor.class_names
    # Every slice is positive at its threshold, no series at its own: a slice threshold
    # applied to the series maximum would call every series positive.
    predictor.thresholds = Thresholds(dict.fromkeys(names, 0.0), dict.fromkeys(names, 1.01))
    out = tmp_path / "out"
    predict(trained_run, phantom_dir / "dicom", out, progress=False, predictor=predictor)
    slices = _read_csv(out / "predictions.csv")
    assert all(r["label_any"] == "1" for r in slices)
    for row in _read_csv(out / "series.csv"):
        assert row["label_any"] == "0"
        own = [float(r["any"]) for r in slices if r["series_uid"] == row["series_uid"]]
        assert float(row["any"]) == pytest.approx(max(own), abs=1e-5)  # the run's rule: max


def test_a_multiclass_run_is_served_with_most_probable_class_labels(
    phantom_dir: Path, tmp_path: Path
) -> None:
    """Multiclass runs write a thresholds file without thresholds (rule argmax) and predict
    labels each slice with its most probable class and each series with every such class."""
    from conftest import TINY_CONFIG

    from ichseg.config import load_config
    from ichseg.engine.checkpoint import ARGMAX_RULE, load_thresholds
    from ichseg.engine.train import train

    data = TINY_CONFIG["data"] | {"cache_dir": str(tmp_path / "cache")}
    config = load_config(
        extra=TINY_CONFIG | {"data": data, "task": {"mode": "multiclass", "classes": None}}
    )
    run = tmp_path / "run"
    train(config, run, progress=False)
    names = config.task.class_names
    assert load_thresholds(run / "thresholds.json", names).rule == ARGMAX_RULE

    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["predict", str(run), str(phantom_dir / "dicom"), str(out), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    with open(out / "predictions.csv", newline="") as handle:
        slices = list(csv.DictReader(handle))
    with open(out / "series.csv", newline="") as handle:
        series = {row["source"]: row for row in csv.DictReader(handle)}
    found: dict[str, set[str]] = {}
    for row in slices:
        labels = [n for n in names if row[f"label_{n}"] == "1"]
        best = max(names, key=lambda n: float(row[n]))
        assert labels == [best]
        found.setdefault(row["source"], set()).add(best)
    for source, classes in found.items():
        assert {n for n in names if series[source][f"label_{n}"] == "1"} == classes


@pytest.mark.parametrize(("option", "expected"), [((), None), (("--batch-size", "3"), 3)])
def test_predict_batches_by_device_unless_told(
    trained_run: Path, phantom_dir: Path, tmp_path: Path, monkeypatch, option, expected
) -> None:
    # On CPU, batches of 8 keep SE-ResNet50's activations in cache (benchmarks/README.md).
    import torch

    from ichseg.inference.models import Predictor

    if expected is None:  # predict runs on CUDA where there is one
        expected = 32 if torch.cuda.is_available() else 8

    seen: list[int] = []
    score_volume = Predictor.score_volume

    def recording(self, volume, batch_size=32):
        seen.append(batch_size)
        return score_volume(self, volume, batch_size)

    monkeypatch.setattr(Predictor, "score_volume", recording)
    out = tmp_path / "out"
    result = _predict(trained_run, phantom_dir / "dicom", out, "--no-gradcam", *option)
    assert result.exit_code == 0, result.output
    assert seen and set(seen) == {expected}
