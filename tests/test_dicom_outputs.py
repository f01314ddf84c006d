"""DICOM SEG, SR and Secondary Capture outputs, and the geometry of masks written as NIfTI/SEG.

The phantom's hemorrhage label map is known voxel for voxel, so a mask written for a series read
back from disk must land on the same voxels and the same patient positions whatever the series'
orientation, slice order, gantry tilt or missing slices.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from ichseg.errors import InputError
from ichseg.io.dicom import read_dicom
from ichseg.io.dicom_sc import orientation_letters, write_secondary_capture
from ichseg.io.dicom_seg import (
    SEGMENT_CODES,
    read_dicom_seg_as_volume_masks,
    segments_from_label_map,
    write_dicom_seg,
)
from ichseg.io.dicom_sources import read_source_headers, source_files_for_volume
from ichseg.io.dicom_sr import SeriesFindings, read_structured_report, write_structured_report
from ichseg.phantom import PhantomConfig, PhantomStudy, Quirks, generate_study, study_uids
from ichseg.phantom.writers import write_dicom_series
from ichseg.volume import HEMORRHAGE_CODES, SUBTYPES, CTVolume
from ichseg.volumetry import largest_component_abc2, volumes_by_label

CONFIG = PhantomConfig(size=48, num_slices=8, negative_fraction=0.0, max_bleeds=3)
SEED = 27  # epidural and intraparenchymal bleeds, and two slices without blood
LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


def flip_columns(folder: Path, out: Path) -> None:
    """Rewrite a series with the row direction reversed (IOP -1,0,0,0,1,0), same anatomy.

    Column c now holds what column (n - 1 - c) held, and ImagePositionPatient moves to the old
    last column, so every voxel keeps its patient position. The slice normal turns to -z, so
    the reader stacks the slices from head to feet.
    """
    out.mkdir(parents=True)
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        stored = ds.pixel_array[:, ::-1]
        ds.PixelData = np.ascontiguousarray(stored).tobytes()
        position = [float(v) for v in ds.ImagePositionPatient]
        position[0] += (int(ds.Columns) - 1) * float(ds.PixelSpacing[1])
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
        ds.ImageOrientationPatient = ["-1", "0", "0", "0", "1", "0"]
        ds.save_as(out / path.name, enforce_file_format=True)


@pytest.fixture(scope="module")
def study() -> PhantomStudy:
    study = generate_study(SEED, CONFIG)
    per_slice = study.hemorrhage.reshape(CONFIG.num_slices, -1).any(axis=1)
    assert per_slice.any() and not per_slice.all()
    return study


VARIANTS = ("axial", "flipped", "tilted", "missing_slice")


@pytest.fixture(scope="module")
def series(tmp_path_factory, study: PhantomStudy) -> dict[str, tuple[Path, np.ndarray]]:
    """Folder of each variant and the phantom label map as stored in its pixel grid."""
    root = tmp_path_factory.mktemp("outputs")
    write_dicom_series(study, root / "axial")
    flip_columns(root / "axial", root / "flipped")
    write_dicom_series(study, root / "tilted", Quirks(gantry_tilt_deg=15.0))
    write_dicom_series(study, root / "missing_slice", Quirks(missing_slice=True))
    labels = study.hemorrhage
    return {
        "axial": (root / "axial", labels),
        "flipped": (root / "flipped", labels[:, :, ::-1]),
        "tilted": (root / "tilted", labels),
        "missing_slice": (root / "missing_slice", labels),
    }


def read_variant(series, study, variant: str) -> tuple[CTVolume, list[Path], np.ndarray]:
    """The volume, its source files, and the known label map in the volume's slice order."""
    folder, labels = series[variant]
    (volume,), skipped = read_dicom(folder)
    assert skipped == []
    files = source_files_for_volume(volume, folder)
    sops = study_uids(study).sops
    on_volume = np.stack([labels[sops.index(uid)] for uid in volume.sop_uids])
    return volume, files, on_volume


def seg_label_map(masks: dict[str, np.ndarray]) -> np.ndarray:
    code_of = {SEGMENT_CODES[name].label: code for code, name in HEMORRHAGE_CODES.items()}
    shape = next(iter(masks.values())).shape
    labels = np.zeros(shape, np.uint8)
    for label, mask in masks.items():
        assert not (labels[mask > 0]).any(), "segments overlap"
        labels[mask > 0] = code_of[label]
    return labels


def voxel_to_patient_ras(header: pydicom.Dataset, column: int, row: int) -> np.ndarray:
    """RAS position of a pixel centre from the DICOM header alone."""
    iop = np.array(header.ImageOrientationPatient, dtype=float)
    row_spacing, column_spacing = (float(v) for v in header.PixelSpacing)
    lps = (
        np.array(header.ImagePositionPatient, dtype=float)
        + column * column_spacing * iop[:3]
        + row * row_spacing * iop[3:]
    )
    return lps * LPS_TO_RAS


def affine_errors_mm(volume: CTVolume, files: list[Path], affine: np.ndarray) -> np.ndarray:
    """Per slice, the largest distance between the affine's and the header's pixel centres."""
    _, rows, columns = volume.shape
    corners = [(0, 0), (columns - 1, 0), (0, rows - 1), (columns - 1, rows - 1), (17, 29)]
    errors = []
    for k, path in enumerate(files):
        header = pydicom.dcmread(path, stop_before_pixels=True)
        errors.append(
            max(
                np.linalg.norm((affine @ [c, r, k, 1.0])[:3] - voxel_to_patient_ras(header, c, r))
                for c, r in corners
            )
        )
    return np.array(errors)


@pytest.mark.parametrize("variant", VARIANTS)
def test_nifti_and_seg_of_the_known_labels_agree_voxel_for_voxel(
    tmp_path: Path, series, study, variant: str
):
    volume, files, labels = read_variant(series, study, variant)
    assert labels.any()
    if variant == "flipped":
        assert np.all(np.diff(volume.slice_positions) > 0)
        assert volume.affine[2, 2] < 0  # slices run from head to feet
    if variant == "tilted":
        assert any("gantry tilt 15.0" in w for w in volume.warnings)
    if variant == "missing_slice":
        assert volume.num_slices == CONFIG.num_slices - 1

    nifti_path = tmp_path / "labels.nii.gz"
    nib.save(volume.to_nifti(labels, dtype=np.uint8), nifti_path)
    image = nib.load(nifti_path)
    from_nifti = np.asarray(image.dataobj).transpose(2, 1, 0)
    np.testing.assert_array_equal(from_nifti, labels)

    seg_path = write_dicom_seg(volume, segments_from_label_map(labels), files, tmp_path / "s.dcm")
    masks = read_dicom_seg_as_volume_masks(seg_path, volume)
    np.testing.assert_array_equal(seg_label_map(masks), from_nifti)

    # Every source instance is referenced, including slices without any blood.
    seg = pydicom.dcmread(seg_path)
    (referenced_series,) = seg.ReferencedSeriesSequence
    assert referenced_series.SeriesInstanceUID == volume.series_uid
    referenced = [
        str(i.ReferencedSOPInstanceUID) for i in referenced_series.ReferencedInstanceSequence
    ]
    assert sorted(referenced) == sorted(volume.sop_uids)
    empty_slices = [uid for uid, s in zip(volume.sop_uids, labels, strict=True) if not s.any()]
    assert empty_slices and set(empty_slices) <= set(referenced)

    # Each SEG frame sits where its source slice sits.
    position_of = {
        str(h.SOPInstanceUID): np.array(h.ImagePositionPatient, dtype=float)
        for h in read_source_headers(volume, files)
    }
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        plane = np.array(frame.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        np.testing.assert_allclose(plane, position_of[str(source)], atol=1e-3)


@pytest.mark.parametrize("variant", ["axial", "flipped", "tilted"])
def test_nifti_affine_maps_voxel_centres_to_the_dicom_positions(
    tmp_path: Path, series, study, variant: str
):
    volume, files, labels = read_variant(series, study, variant)
    path = tmp_path / "labels.nii.gz"
    nib.save(volume.to_nifti(labels, dtype=np.uint8), path)
    errors = affine_errors_mm(volume, files, nib.load(path).affine)
    assert errors.max() < 1e-3, errors


def test_nifti_affine_of_a_series_with_a_gap_is_exact_up_to_the_gap(tmp_path, series, study):
    volume, files, labels = read_variant(series, study, "missing_slice")
    path = tmp_path / "labels.nii.gz"
    nib.save(volume.to_nifti(labels, dtype=np.uint8), path)
    errors = affine_errors_mm(volume, files, nib.load(path).affine)
    gap = int(np.argmax(np.diff(volume.slice_positions))) + 1
    assert errors[:gap].max() < 1e-3
    # One affine cannot hold a gap: beyond it the NIfTI is one slice step off, which the reader
    # reports as a warning; the SEG keeps each frame's own position (tested above).
    np.testing.assert_allclose(errors[gap:], CONFIG.slice_thickness_mm, atol=1e-3)
    assert any("missing slice" in w for w in volume.warnings)


def test_seg_segments_are_coded(tmp_path: Path, series, study):
    volume, files, labels = read_variant(series, study, "axial")
    segments = segments_from_label_map(labels, study.intracranial_mask)
    assert list(segments) == ["intracranial", "epidural", "intraparenchymal"]
    path = write_dicom_seg(
        volume,
        segments,
        files,
        tmp_path / "out" / "seg.dcm",
        series_description="test SEG",
        manufacturer_model_name="model-x",
        software_version="9.9",
    )
    assert [p.name for p in path.parent.iterdir()] == ["seg.dcm"]  # no temporary left
    seg = hd.seg.segread(path)
    assert seg.SeriesDescription == "test SEG" and seg.SoftwareVersions == "9.9"
    assert seg.StudyInstanceUID == volume.study_uid and seg.PatientID == volume.patient_id
    descriptions = {d.SegmentLabel: d for d in seg.SegmentSequence}
    assert list(descriptions) == [
        "Intracranial space",
        "Epidural hemorrhage",
        "Intraparenchymal hemorrhage",
    ]
    cranial = descriptions["Intracranial space"]
    assert cranial.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
    assert cranial.SegmentedPropertyTypeCodeSequence[0].CodeValue == "1101003"
    epidural = descriptions["Epidural hemorrhage"]
    assert epidural.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert epidural.SegmentedPropertyTypeCodeSequence[0].CodeValue == "50960005"
    region = epidural.AnatomicRegionSequence[0]
    assert (region.CodeValue, region.CodingSchemeDesignator) == ("18545000", "SCT")
    assert region.AnatomicRegionModifierSequence[0].CodeValue == "261074009"
    assert descriptions["Intraparenchymal hemorrhage"].AnatomicRegionSequence[0].CodeValue == (
        "12738006"
    )
    algorithm = epidural.SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("model-x", "9.9")
    masks = read_dicom_seg_as_volume_masks(path, volume)
    np.testing.assert_array_equal(masks["Intracranial space"], segments["intracranial"])


def test_seg_refuses_bad_input_and_keeps_existing_output(tmp_path: Path, series, study):
    volume, files, labels = read_variant(series, study, "axial")
    segments = segments_from_label_map(labels)
    out = tmp_path / "seg.dcm"
    out.write_bytes(b"previous")
    with pytest.raises(ValueError, match="unknown segment name"):
        write_dicom_seg(volume, {"hematoma": labels > 0}, files, out)
    with pytest.raises(ValueError, match="shape"):
        write_dicom_seg(volume, {"epidural": labels[1:] > 0}, files, out)
    with pytest.raises(InputError, match="SOPInstanceUID differs from slice 0"):
        write_dicom_seg(volume, segments, files[::-1], out)
    with pytest.raises(InputError, match="source file"):
        write_dicom_seg(volume, segments, files[:-1], out)
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.dcm"]


def test_seg_of_another_series_is_refused(tmp_path: Path, series, study):
    axial, axial_files, labels = read_variant(series, study, "axial")
    other = generate_study(SEED + 1, CONFIG)
    write_dicom_series(other, tmp_path / "other")
    (volume,), _ = read_dicom(tmp_path / "other")
    seg_path = write_dicom_seg(
        axial, segments_from_label_map(labels), axial_files, tmp_path / "s.dcm"
    )
    with pytest.raises(InputError, match="not slices of"):
        read_dicom_seg_as_volume_masks(seg_path, volume)


FINDINGS_PROBABILITIES = dict(
    zip(SUBTYPES, [0.9123456789, 0.0123, 0.7, 0.499999, 0.2, 0.55], strict=True)
)
FINDINGS_THRESHOLDS = dict(zip(SUBTYPES, [0.5, 0.3, 0.41, 0.5, 0.25, 0.55], strict=True))


def test_structured_report_round_trip(tmp_path: Path, series, study):
    volume, files, labels = read_variant(series, study, "tilted")
    volumes = volumes_by_label(labels, volume)
    findings = SeriesFindings(
        FINDINGS_PROBABILITIES,
        FINDINGS_THRESHOLDS,
        volumes,
        abc2_ml=largest_component_abc2(labels, volume),
    )
    assert findings.positive == {
        "any": 1,
        "epidural": 0,
        "intraparenchymal": 1,
        "intraventricular": 0,
        "subarachnoid": 0,
        "subdural": 1,
    }
    path = write_structured_report(
        volume, files, findings, tmp_path / "sr.dcm", model_name="resnet18", model_version="1.2"
    )
    report = read_structured_report(path)
    assert report["probabilities"] == {k: round(v, 6) for k, v in FINDINGS_PROBABILITIES.items()}
    assert report["thresholds"] == FINDINGS_THRESHOLDS
    assert report["findings"] == findings.positive
    assert report["volumes_ml"] == {k: round(v, 3) for k, v in volumes.items()}
    assert report["volumes_ml"]["intraparenchymal"] > 0
    assert report["abc2_ml"] == round(findings.abc2_ml, 3) and report["abc2_ml"] > 0
    assert (report["model_name"], report["model_version"]) == ("resnet18", "1.2")
    assert report["study_uid"] == volume.study_uid
    assert sorted(report["referenced_sop_uids"]) == sorted(volume.sop_uids)

    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert ds.PatientID == volume.patient_id


def test_structured_report_without_volumes_and_bad_findings(tmp_path: Path, series, study):
    volume, files, _ = read_variant(series, study, "axial")
    findings = SeriesFindings(FINDINGS_PROBABILITIES, FINDINGS_THRESHOLDS)
    report = read_structured_report(
        write_structured_report(
            volume, files, findings, tmp_path / "sr.dcm", model_name="m", model_version="1"
        )
    )
    assert report["volumes_ml"] == {} and report["abc2_ml"] is None
    with pytest.raises(ValueError, match="lack"):
        SeriesFindings({"any": 0.5}, FINDINGS_THRESHOLDS)
    with pytest.raises(ValueError, match="unknown labels"):
        SeriesFindings(FINDINGS_PROBABILITIES, FINDINGS_THRESHOLDS, {"hematoma": 1.0})
    with pytest.raises(InputError, match="Measurement Report"):
        read_structured_report(files[0])


def test_secondary_capture_joins_the_source_study(tmp_path: Path, series, study):
    volume, files, _ = read_variant(series, study, "flipped")
    rows, columns = volume.shape[1:]
    image = np.random.default_rng(0).integers(0, 256, (2 * rows, 2 * columns, 3), dtype=np.uint8)
    path = write_secondary_capture(image, files[3], tmp_path / "sc.dcm")
    ds = pydicom.dcmread(path)
    source = pydicom.dcmread(files[3], stop_before_pixels=True)
    assert ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert (ds.PatientID, ds.StudyInstanceUID) == (source.PatientID, source.StudyInstanceUID)
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert list(ds.PatientOrientation) == ["R", "P"]  # the flipped rows run to the right
    np.testing.assert_allclose(
        [float(v) for v in ds.PixelSpacing], [float(v) / 2 for v in source.PixelSpacing]
    )
    np.testing.assert_array_equal(ds.pixel_array, image)
    with pytest.raises(ValueError, match="uint8"):
        write_secondary_capture(image.astype(np.float32), files[3], tmp_path / "bad.dcm")
    with pytest.raises(InputError, match="not a readable DICOM"):
        write_secondary_capture(image, tmp_path / "missing.dcm", tmp_path / "bad.dcm")
    assert not (tmp_path / "bad.dcm").exists()


def test_orientation_letters():
    assert orientation_letters([1, 0, 0]) == "L"
    assert orientation_letters([0, -1, 0]) == "A"
    assert orientation_letters([0, 0.2588, -0.9659]) == "FP"
