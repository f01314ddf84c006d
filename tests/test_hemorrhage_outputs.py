"""``predict`` and ``segment`` end to end: volumes in ml, DICOM SEG, SR and Secondary Capture.

The phantom study is written as axial, column-flipped, gantry-tilted and missing-slice DICOM
series. Whatever the series, the masks the commands write as NIfTI and as DICOM SEG must lie on
the source grid: the NIfTI affine puts each voxel at its DICOM pixel's patient position, every
SEG frame sits on its source slice and holds the NIfTI's mask, and the masks match the phantom's
truth carried onto that grid (better than the truth mirrored left-right).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import HEMORRHAGE_SEED, HEMORRHAGE_STUDY
from test_dicom_outputs import affine_errors_mm, flip_columns, seg_label_map
from typer.testing import CliRunner

from ichseg.cli import app
from ichseg.io.dicom import read_dicom
from ichseg.io.dicom_seg import read_dicom_seg_as_volume_masks
from ichseg.io.dicom_sources import read_source_headers
from ichseg.io.dicom_sr import read_structured_report
from ichseg.metrics.overlap import dice
from ichseg.phantom import PhantomConfig, Quirks, generate_study, study_uids
from ichseg.phantom.writers import write_dicom_series
from ichseg.segmentation.hemorrhage import VOLUME_COLUMNS, hemorrhage_volumes
from ichseg.volume import SUBTYPES, CTVolume

runner = CliRunner()
VARIANTS = ("axial", "flipped", "tilted", "missing_slice")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def study():
    return generate_study(HEMORRHAGE_SEED, PhantomConfig(**HEMORRHAGE_STUDY))


@pytest.fixture(scope="module")
def series(tmp_path_factory, study) -> dict[str, Path]:
    """One folder per variant, each holding only that series."""
    root = tmp_path_factory.mktemp("variants")
    write_dicom_series(study, root / "axial")
    flip_columns(root / "axial", root / "flipped")
    write_dicom_series(study, root / "tilted", Quirks(gantry_tilt_deg=15.0))
    write_dicom_series(study, root / "missing_slice", Quirks(missing_slice=True))
    return {variant: root / variant for variant in VARIANTS}


def truth_on(volume: CTVolume, study, variant: str) -> tuple[np.ndarray, np.ndarray]:
    """The phantom's intracranial mask and label map in the volume's slice order and columns."""
    sops = study_uids(study).sops
    order = [sops.index(uid) for uid in volume.sop_uids]
    mask, labels = study.intracranial_mask[order], study.hemorrhage[order]
    if variant == "flipped":
        mask, labels = mask[:, :, ::-1], labels[:, :, ::-1]
    return mask, labels


def nifti_array(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(path)
    return np.asarray(image.dataobj).transpose(2, 1, 0), np.asarray(image.affine)


def check_on_source_grid(
    volume: CTVolume,
    variant: str,
    study,
    mask_path: Path,
    labels_path: Path,
    seg_path: Path,
) -> tuple[np.ndarray, np.ndarray]:
    """Every geometry check of one series' NIfTI masks and SEG; returns (mask, labels)."""
    mask, affine = nifti_array(mask_path)
    labels, labels_affine = nifti_array(labels_path)
    assert mask.shape == labels.shape == volume.shape
    np.testing.assert_allclose(labels_affine, affine, atol=1e-6)
    errors = affine_errors_mm(volume, volume.slice_paths, affine)
    if variant == "missing_slice":
        # One affine cannot hold a gap: exact up to it, one step off beyond (the SEG is exact).
        gap = int(np.argmax(np.diff(volume.slice_positions))) + 1
        assert errors[:gap].max() < 1e-3
    else:
        assert errors.max() < 1e-3, errors

    segments = read_dicom_seg_as_volume_masks(seg_path, volume)
    np.testing.assert_array_equal(segments.pop("Intracranial space"), mask)
    np.testing.assert_array_equal(seg_label_map(segments), labels)
    seg = pydicom.dcmread(seg_path)
    position_of = {
        str(h.SOPInstanceUID): np.array(h.ImagePositionPatient, dtype=float)
        for h in read_source_headers(volume, volume.slice_paths)
    }
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        plane = np.array(frame.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        np.testing.assert_allclose(plane, position_of[str(source)], atol=1e-3)

    true_mask, true_labels = truth_on(volume, study, variant)
    assert dice(mask, true_mask) >= 0.9
    assert dice(mask, true_mask) > dice(mask, true_mask[:, :, ::-1])
    blood, true_blood = labels > 0, true_labels > 0
    assert dice(blood, true_blood) >= 0.5
    assert dice(blood, true_blood) > dice(blood, true_blood[:, :, ::-1]) + 0.2
    return mask, labels


@pytest.mark.parametrize("variant", VARIANTS)
def test_segment_writes_masks_and_seg_on_the_source_grid(
    variant, series, study, hemorrhage_checkpoint, tmp_path
):
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "segment",
            str(series[variant]),
            str(out),
            "--hemorrhage-model",
            str(hemorrhage_checkpoint),
            "--output-format",
            "both",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    (row,) = read_csv(out / "summary.csv")
    assert row["status"] == "ok"
    (volume,), _ = read_dicom(series[variant])
    _, labels = check_on_source_grid(
        volume,
        variant,
        study,
        out / row["mask"],
        out / row["hemorrhage"],
        out / row["seg"],
    )
    expected = hemorrhage_volumes(labels, volume)
    assert {k: float(row[k]) for k in VOLUME_COLUMNS} == expected
    assert expected["volume_ml_total"] > 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_predict_writes_masks_seg_and_report_on_the_source_grid(
    variant, series, study, trained_run, hemorrhage_checkpoint, tmp_path
):
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "predict",
            str(trained_run),
            str(series[variant]),
            str(out),
            "--hemorrhage-segmenter",
            str(hemorrhage_checkpoint),
            "--output-format",
            "both",
            "--sr",
            "--no-gradcam",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    (row,) = read_csv(out / "series.csv")
    (volume,), _ = read_dicom(series[variant])
    _, labels = check_on_source_grid(
        volume,
        variant,
        study,
        out / row["mask"],
        out / row["hemorrhage_mask"],
        out / row["seg"],
    )
    assert {k: float(row[k]) for k in VOLUME_COLUMNS} == hemorrhage_volumes(labels, volume)

    # The report holds exactly the numbers of series.csv.
    report = read_structured_report(out / row["sr"])
    assert report["probabilities"] == {name: float(row[name]) for name in SUBTYPES}
    assert report["findings"] == {name: int(row[f"label_{name}"]) for name in SUBTYPES}
    chosen = json.loads((trained_run / "thresholds.json").read_text())["series"]
    assert report["thresholds"] == {
        name: round(float(chosen[name]), 6) for name in SUBTYPES if chosen.get(name) is not None
    }
    volumes = {name: float(row[f"volume_ml_{name}"]) for name in SUBTYPES[1:]}
    volumes["total"] = float(row["volume_ml_total"])
    assert report["volumes_ml"] == volumes
    assert report["abc2_ml"] == float(row["abc2_ml_intraparenchymal"])
    assert report["model_name"].startswith("ichseg ") and "+" in report["model_version"]
    assert sorted(report["referenced_sop_uids"]) == sorted(volume.sop_uids)
    assert report["study_uid"] == volume.study_uid


def test_hemorrhage_segmenter_leaves_the_probabilities_alone(
    trained_run, hemorrhage_checkpoint, phantom_dir, tmp_path
):
    plain, with_blood = tmp_path / "plain", tmp_path / "blood"
    common = ["--no-gradcam", "--quiet"]
    source = str(phantom_dir / "dicom")
    assert (
        runner.invoke(app, ["predict", str(trained_run), source, str(plain), *common]).exit_code
        == 0
    )
    result = runner.invoke(
        app,
        [
            "predict",
            str(trained_run),
            source,
            str(with_blood),
            "--hemorrhage-segmenter",
            str(hemorrhage_checkpoint),
            *common,
        ],
    )
    assert result.exit_code == 0, result.output
    assert read_csv(plain / "predictions.csv") == read_csv(with_blood / "predictions.csv")
    before, after = read_csv(plain / "series.csv"), read_csv(with_blood / "series.csv")
    assert [{k: r[k] for k in before[0]} for r in after] == before
    assert set(VOLUME_COLUMNS) <= set(after[0]) and not set(VOLUME_COLUMNS) & set(before[0])
    for row in after:
        assert (with_blood / row["hemorrhage_mask"]).is_file()


def test_a_run_carries_its_hemorrhage_segmenter(
    trained_run, hemorrhage_checkpoint, phantom_dir, tmp_path
):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    shutil.copy(hemorrhage_checkpoint, run / "hemorrhage_segmenter.pt")
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["predict", str(run), str(phantom_dir / "dicom"), str(out), "--no-gradcam", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    assert all(row["volume_ml_total"] != "" for row in read_csv(out / "series.csv"))


def test_an_intracranial_checkpoint_is_refused_as_hemorrhage_segmenter(
    trained_run, segmenter_checkpoint, phantom_dir, tmp_path
):
    result = runner.invoke(
        app,
        [
            "predict",
            str(trained_run),
            str(phantom_dir / "dicom"),
            str(tmp_path / "out"),
            "--hemorrhage-segmenter",
            str(segmenter_checkpoint),
            "--quiet",
        ],
    )
    assert result.exit_code == 2
    assert "not a hemorrhage segmenter" in result.output
    bad = runner.invoke(
        app,
        [
            "predict",
            str(trained_run),
            str(phantom_dir / "dicom"),
            str(tmp_path / "o2"),
            "--output-format",
            "dicom",
        ],
    )
    assert bad.exit_code == 2 and "output format" in bad.output


def test_dicom_outputs_of_nifti_inputs_are_noted(
    trained_run, hemorrhage_checkpoint, phantom_dir, tmp_path
):
    source = tmp_path / "nifti"
    source.mkdir()
    for path in sorted((phantom_dir / "nifti").glob("*_ct.nii.gz")):
        shutil.copy(path, source / path.name)
    out = tmp_path / "predicted"
    result = runner.invoke(
        app,
        [
            "predict",
            str(trained_run),
            str(source),
            str(out),
            "--hemorrhage-segmenter",
            str(hemorrhage_checkpoint),
            "--output-format",
            "dicom-seg",
            "--sr",
            "--no-gradcam",
            "--quiet",
        ],
    )
    assert result.exit_code == 3, result.output  # partial: asked-for outputs are missing
    notes = read_csv(out / "skipped.csv")
    assert len(notes) == 2
    assert all("SEG, SR not written" in n["reason"] and "DICOM" in n["reason"] for n in notes)
    for row in read_csv(out / "series.csv"):
        assert row["seg"] == "" and row["sr"] == ""
        assert (out / row["mask"]).is_file() and (out / row["hemorrhage_mask"]).is_file()
    assert not (out / "seg").exists() and not (out / "sr").exists()

    segmented = tmp_path / "segmented"
    result = runner.invoke(
        app, ["segment", str(source), str(segmented), "--output-format", "dicom-seg", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    assert "DICOM SEG not written" in result.output
    for row in read_csv(segmented / "summary.csv"):
        assert row["seg"] == "" and "DICOM SEG not written" in row["warnings"]
        assert (segmented / row["mask"]).is_file()


def test_dicom_seg_only_writes_no_nifti_for_dicom_inputs(series, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["segment", str(series["axial"]), str(out), "--output-format", "dicom-seg", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    (row,) = read_csv(out / "summary.csv")
    assert row["mask"] == "" and row["image"] == "" and row["seg"].endswith("_seg.dcm")
    assert not list(out.glob("*.nii.gz"))
    (volume,), _ = read_dicom(series["axial"])
    masks = read_dicom_seg_as_volume_masks(out / row["seg"], volume)
    assert list(masks) == ["Intracranial space"] and masks["Intracranial space"].any()


def test_gradcam_as_secondary_capture(trained_run, series, tmp_path):
    from ichseg.engine.checkpoint import Thresholds
    from ichseg.inference import load_predictor, predict

    predictor = load_predictor(trained_run, device="cpu")
    zero = dict.fromkeys(predictor.class_names, 0.0)  # every series positive
    predictor.thresholds = Thresholds(zero, zero)
    out = tmp_path / "out"
    predict(
        trained_run,
        series["tilted"],
        out,
        gradcam_slices=2,
        gradcam_format="both",
        progress=False,
        predictor=predictor,
    )
    (row,) = read_csv(out / "series.csv")
    paths = row["gradcam"].split(";")
    assert sorted(Path(p).suffix for p in paths) == [".dcm", ".dcm", ".png", ".png"]
    (volume,), _ = read_dicom(series["tilted"])
    captures = [pydicom.dcmread(out / p) for p in paths if p.endswith(".dcm")]
    assert len({c.SeriesInstanceUID for c in captures}) == 1
    for capture in captures:
        assert capture.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
        assert capture.StudyInstanceUID == volume.study_uid
        source = str(capture.SourceImageSequence[0].ReferencedSOPInstanceUID)
        z = volume.sop_uids.index(source)
        assert capture.pixel_array.shape == (*volume.shape[1:], 3)
        assert f"_z{z:03d}.dcm" in capture.filename


def test_slice_paths_follow_the_slice_order(series, phantom_dir):
    (volume,), _ = read_dicom(series["flipped"])
    assert len(volume.slice_paths) == volume.num_slices
    for path, uid in zip(volume.slice_paths, volume.sop_uids, strict=True):
        assert str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) == uid
    from ichseg.io.nifti import read_nifti

    nifti = read_nifti(sorted((phantom_dir / "nifti").glob("*_ct.nii.gz"))[0])
    assert nifti.slice_paths == []
    with pytest.raises(ValueError, match="slice_paths"):
        CTVolume(
            hu=np.zeros((2, 4, 4), np.float32),
            affine=np.eye(4),
            source="x",
            series_uid="x",
            slice_positions=np.arange(2.0),
            slice_paths=["only-one.dcm"],
        )


def test_report_of_a_label_without_threshold(series, tmp_path):
    from ichseg.io.dicom_sr import SeriesFindings, write_structured_report

    (volume,), _ = read_dicom(series["axial"])
    probabilities = dict.fromkeys(SUBTYPES, 0.9)
    thresholds = dict.fromkeys(SUBTYPES, 0.5) | {"epidural": float("inf")}
    path = write_structured_report(
        volume,
        volume.slice_paths,
        SeriesFindings(probabilities, thresholds),
        tmp_path / "sr.dcm",
        model_name="m",
        model_version="1",
    )
    report = read_structured_report(path)
    assert "epidural" not in report["thresholds"] and len(report["thresholds"]) == 5
    assert report["findings"]["epidural"] == 0 and report["findings"]["any"] == 1


def test_an_output_that_cannot_be_written_costs_only_that_output(
    trained_run, phantom_dir, tmp_path
):
    """A series whose files lack a frame of reference gets no DICOM SEG (highdicom refuses it),
    but keeps its probabilities, and the other series are untouched: exit 3, reason listed."""
    source = tmp_path / "dicom"
    studies = sorted(p for p in (phantom_dir / "dicom").iterdir() if p.is_dir())[:2]
    for study_dir in studies:
        shutil.copytree(study_dir, source / study_dir.name)
    broken = source / studies[0].name
    for path in sorted(broken.glob("*.dcm")):
        dataset = pydicom.dcmread(path)
        del dataset.FrameOfReferenceUID
        dataset.save_as(path)
    out = tmp_path / "predicted"
    result = runner.invoke(
        app,
        [
            "predict",
            str(trained_run),
            str(source),
            str(out),
            "--output-format",
            "dicom-seg",
            "--no-gradcam",
            "--quiet",
        ],
    )
    assert result.exit_code == 3, result.output
    rows = {Path(r["source"]).name: r for r in read_csv(out / "series.csv")}
    assert set(rows) == {s.name for s in studies}
    assert rows[studies[1].name]["seg"] and (out / rows[studies[1].name]["seg"]).is_file()
    assert not rows[studies[0].name].get("seg")
    assert rows[studies[0].name]["label_any"] in ("0", "1")
    reasons = [r["reason"] for r in read_csv(out / "skipped.csv")]
    assert len(reasons) == 1 and reasons[0].startswith("masks: ValueError")
    assert len(read_csv(out / "predictions.csv")) == sum(
        len(list(s.glob("*.dcm"))) for s in studies
    )
