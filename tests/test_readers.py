"""Reader rules for bad input: what is refused, dropped, assumed (and flagged), or left out.

Each test builds a tiny phantom series (32x32x4, tests/corpus.py) and damages it like a real
archive would.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from corpus import (
    GOOD_SEED,
    ODD_SEED,
    SLICES,
    _delete,
    _set,
    corrupt_jpeg_ls,
    edit,
    edit_all,
    odd_nifti,
    odd_series,
    rescale_missing_hu_values,
    series_uid,
    write_good,
)
from typer.testing import CliRunner

from ichseg.cli import app
from ichseg.errors import InputError
from ichseg.io.dicom import UnusableSeries, discover_series, read_dicom, read_series
from ichseg.io.loader import index_input, load_volumes
from ichseg.io.nifti import read_nifti
from ichseg.io.walk import list_files


def _read_one(folder: Path):
    volumes, skipped = read_dicom(folder)
    assert len(volumes) == 1, skipped
    return volumes[0], skipped


@pytest.fixture
def clean(tmp_path: Path):
    """The odd series read as written: the reference HU and affine."""
    volume, _ = _read_one(Path(odd_series(tmp_path / "clean")[0]).parent)
    return volume


# --- 1. RescaleSlope / RescaleIntercept ---------------------------------------------------------


def test_rescale_missing_on_raw_values_refuses_the_series(tmp_path: Path):
    files = odd_series(tmp_path)
    edit_all(files, _delete("RescaleIntercept", "RescaleSlope"))
    edit_all(files, _set(PixelRepresentation=0))  # the tester's unsigned raw layout
    volumes, skipped = read_dicom(tmp_path)
    assert volumes == []
    ((path, reason),) = skipped
    assert path == str(tmp_path / "odd")
    assert "RescaleIntercept missing" in reason and "unsigned" in reason
    assert "do not look like HU" in reason and "\n" not in reason


def test_rescale_missing_on_hu_values_is_accepted_and_flagged(tmp_path: Path, clean, caplog):
    rescale_missing_hu_values(tmp_path)
    with caplog.at_level(logging.WARNING):
        volume, _ = _read_one(tmp_path / "odd")
    np.testing.assert_array_equal(volume.hu, clean.hu)
    assert volume.quality_flags == ["rescale_assumed"]
    assert any("taken as HU" in w for w in volume.warnings)
    assert any("taken as HU" in r.getMessage() for r in caplog.records)  # loud, not only listed


@pytest.mark.parametrize("slope", [0, "NaN"])
def test_rescale_slope_zero_or_not_finite_is_refused(tmp_path: Path, slope):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns when writing "NaN" as DS
        edit_all(odd_series(tmp_path), _set(RescaleSlope=slope))
    volumes, skipped = read_dicom(tmp_path)
    assert volumes == [] and len(skipped) == 1
    assert "none of its 4 slice(s)" in skipped[0][1] and "RescaleSlope" in skipped[0][1]


def test_rescale_slope_missing_alone_assumes_one(tmp_path: Path, clean):
    edit_all(odd_series(tmp_path), _delete("RescaleSlope"))
    volume, _ = _read_one(tmp_path / "odd")
    np.testing.assert_array_equal(volume.hu, clean.hu)
    assert volume.quality_flags == ["rescale_assumed"]


# --- 2. ImageOrientationPatient and PixelSpacing ---------------------------------------------


def test_non_orthonormal_orientation_is_refused_not_a_tilt(tmp_path: Path):
    edit_all(odd_series(tmp_path), _set(ImageOrientationPatient=[1, 0, 0, 0.6, 0.8, 0.3]))
    volumes, skipped = read_dicom(tmp_path)
    assert volumes == []
    assert "not two unit vectors" in skipped[0][1] and "tilt" not in skipped[0][1]


def test_zero_orientation_is_refused_without_numpy_warnings(tmp_path: Path):
    edit_all(odd_series(tmp_path), _set(ImageOrientationPatient=[0, 0, 0, 0, 0, 0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(UnusableSeries, match=r"0\\0\\0\\0\\0\\0 is not two unit"):
            read_series(discover_series(tmp_path).series[0])


def test_rounded_orientation_is_accepted_and_orthonormalised(tmp_path: Path, clean):
    iop = [0.999999, 0.000012, -0.000003, -0.000011, 0.999998, 0.000004]
    edit_all(odd_series(tmp_path), _set(ImageOrientationPatient=iop))
    volume, _ = _read_one(tmp_path / "odd")
    directions = volume.affine[:3, :2] / np.linalg.norm(volume.affine[:3, :2], axis=0)
    assert abs(float(np.dot(directions[:, 0], directions[:, 1]))) < 1e-12
    np.testing.assert_allclose(volume.spacing, clean.spacing, rtol=1e-6)
    assert volume.warnings == [] and volume.quality_flags == []


@pytest.mark.parametrize("spacing", [[0, 0], [-0.5, 0.5], ["NaN", 0.5]])
def test_bad_pixel_spacing_is_refused(tmp_path: Path, spacing):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        edit_all(odd_series(tmp_path), _set(PixelSpacing=spacing))
    volumes, skipped = read_dicom(tmp_path)
    assert volumes == [] and "is not two positive finite numbers" in skipped[0][1]


# --- 3. NIfTI affines ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "reason"),
    [
        ([[0.0] * 4] * 3, "zero voxel size along x, y, z"),
        ([[1.0, 1.0, 0, 0], [0, 0.0001, 0, 0], [0, 0, 5.0, 0]], "singular"),
        ([[1.0, 0, 0, 0], [0, np.nan, 0, 0], [0, 0, 5.0, 0]], "NaN or Inf"),
    ],
)
def test_nifti_degenerate_affine_is_refused(tmp_path: Path, rows, reason):
    def sform(header) -> None:
        header["srow_x"], header["srow_y"], header["srow_z"] = rows
        header["sform_code"], header["qform_code"] = 1, 0

    path = odd_nifti(tmp_path / "ct.nii.gz", header_edit=sform)
    with pytest.raises(InputError, match=reason) as error:
        read_nifti(path)
    assert error.value.path == str(path)


def test_nifti_without_sform_and_zero_pixdim_is_refused(tmp_path: Path):
    def change(header) -> None:
        header["sform_code"], header["qform_code"] = 0, 0

    path = odd_nifti(tmp_path / "ct.nii", header_edit=change)
    data = bytearray(path.read_bytes())
    data[80:92] = struct.pack("<3f", 0.0, 0.0, 0.0)  # pixdim[1:4]; nibabel would not write 0
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"pixdim \(0, 0, 0\) is not a voxel size"):
        read_nifti(path)


# --- 6. one undecodable slice drops only itself -------------------------------------------------


def test_undecodable_slice_is_dropped_and_the_gap_reported(tmp_path: Path, clean):
    files = odd_series(tmp_path)
    files[1].write_bytes(files[1].read_bytes()[:-100])  # truncated pixel data
    volume, skipped = _read_one(tmp_path / "odd")
    assert skipped == []
    assert volume.num_slices == SLICES - 1
    ((path, reason),) = volume.dropped
    assert path == str(files[1]) and "less than expected" in reason
    assert {"slices_dropped", "slice_gap"} <= set(volume.quality_flags)
    assert any(w.startswith("1 missing slice(s) at step 5.00 mm") for w in volume.warnings)
    np.testing.assert_array_equal(volume.hu, clean.hu[[0, 2, 3]])
    np.testing.assert_allclose(volume.spacing, clean.spacing)  # the step stays 5 mm


def test_series_without_any_usable_slice_names_its_folder(tmp_path: Path):
    files = odd_series(tmp_path)
    for path in files:
        path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UnusableSeries) as error:
        read_series(discover_series(tmp_path).series[0])
    assert error.value.path == str(tmp_path / "odd")
    assert sorted(p for p, _ in error.value.dropped) == sorted(str(p) for p in files)


def test_a_duplicate_file_stands_in_for_an_undecodable_one(tmp_path: Path, clean):
    files = odd_series(tmp_path)
    copy = files[1].with_name("CT0002_copy.dcm")
    copy.write_bytes(files[1].read_bytes())
    files[1].write_bytes(files[1].read_bytes()[:-100])
    volume, _ = _read_one(tmp_path / "odd")
    np.testing.assert_array_equal(volume.hu, clean.hu)
    assert [p for p, _ in volume.dropped] == [str(files[1])]
    assert "slice_gap" not in volume.quality_flags

    edit(copy, _set(SOPInstanceUID="1.2.3.4"))  # a clean duplicate is dropped, named as such
    files[1].write_bytes(files[2].read_bytes())
    edit(files[1], _set(ImagePositionPatient=pydicom.dcmread(copy).ImagePositionPatient))
    volume, _ = _read_one(tmp_path / "odd")
    ((path, reason),) = volume.dropped
    assert path == str(copy) and reason == "duplicate slice position -6.75 mm (same as CT0002.dcm)"


# --- 7. symlinks ----------------------------------------------------------------------------


def test_symlink_loops_and_broken_links_do_not_abort(tmp_path: Path):
    write_good(tmp_path)
    odd_nifti(tmp_path / "nifti" / "scan.nii.gz")
    os.symlink("..", tmp_path / "good" / "up")
    os.symlink("..", tmp_path / "nifti" / "up")
    os.symlink("self", tmp_path / "self")
    os.symlink("missing.nii.gz", tmp_path / "nifti" / "gone.nii.gz")
    listing = list_files(tmp_path)
    assert len(listing.files) == SLICES + 1  # every file once, however many paths lead to it
    index = index_input(tmp_path)
    assert len(index.dicom_series) == 1 and index.nifti_files == [tmp_path / "nifti/scan.nii.gz"]
    reasons = dict(index.skipped)
    assert "Too many levels of symbolic links" in reasons[str(tmp_path / "self")]
    assert "No such file" in reasons[str(tmp_path / "nifti" / "gone.nii.gz")]


def test_directory_symlink_is_followed_once(tmp_path: Path):
    files = odd_series(tmp_path / "data")
    os.symlink(tmp_path / "data", tmp_path / "link")
    os.symlink(files[0], tmp_path / "data" / "again.dcm")
    volume, skipped = _read_one(tmp_path)
    assert skipped == [] and volume.num_slices == SLICES and volume.dropped == []


# --- 9. corrupt JPEG-LS -----------------------------------------------------------------------


def test_corrupt_jpeg_ls_slice_gives_a_whole_reason_and_no_traceback(tmp_path: Path, caplog):
    corrupt_jpeg_ls(tmp_path)
    with caplog.at_level(logging.WARNING):
        volume, _ = _read_one(tmp_path / "odd")
    ((path, reason),) = volume.dropped
    assert reason.startswith("cannot decode pixel data (JPEG-LS Lossless)")
    assert "pyjpegls:" in reason and "pylibjpeg:" in reason  # every decoder's message, one line
    assert "\n" not in reason
    assert not [r for r in caplog.records if r.exc_info]  # pydicom logged no traceback
    result = CliRunner().invoke(app, ["inspect", str(tmp_path)])
    assert result.exit_code == 3 and "Traceback" not in result.output
    assert f"dropped {path}: {reason}" in result.output


# --- 10. impossible pixel matrices ---------------------------------------------------------------


def test_huge_matrix_is_refused_before_allocating(tmp_path: Path):
    edit_all(odd_series(tmp_path), _set(Rows=40000, Columns=40000))
    volumes, skipped = read_dicom(tmp_path)
    assert volumes == []
    assert "40000x40000 pixels, above the limit" in skipped[0][1]


def test_size_limits_come_from_the_environment(tmp_path: Path, monkeypatch):
    odd_series(tmp_path)
    monkeypatch.setenv("ICHSEG_MAX_SLICE_PIXELS", "1000")
    volumes, skipped = read_dicom(tmp_path)
    assert volumes == [] and "32x32 pixels, above the limit of 1000" in skipped[0][1]
    monkeypatch.delenv("ICHSEG_MAX_SLICE_PIXELS")
    monkeypatch.setenv("ICHSEG_MAX_VOLUME_BYTES", str(3 * 32 * 32 * 4))
    volumes, skipped = read_dicom(tmp_path)
    assert volumes == [] and "ICHSEG_MAX_VOLUME_BYTES" in skipped[0][1]
    assert skipped[0][0] == str(tmp_path / "odd")


# --- 13. DICOMDIR and other non-image objects -----------------------------------------------


def test_dicomdir_is_left_out_quietly_and_its_images_read(tmp_path: Path):
    from corpus import dicomdir_media_set

    dicomdir_media_set(tmp_path)
    index = index_input(tmp_path)
    assert index.skipped == []
    assert [Path(p).name for p, _ in index.ignored] == ["DICOMDIR"]
    volumes, skipped = load_volumes(tmp_path)
    assert skipped == [] and len(volumes) == 1 and volumes[0].num_slices == SLICES


# --- 8. segment names every skipped file ---------------------------------------------------------


def test_segment_lists_skipped_files_and_dropped_slices(tmp_path: Path):
    root = tmp_path / "input"
    write_good(root)
    files = odd_series(root)
    files[1].write_bytes(files[1].read_bytes()[:-100])
    (root / "notes.dcm").write_text("not DICOM")
    result = CliRunner().invoke(
        app, ["segment", str(root), str(tmp_path / "out"), "--method", "classical", "--quiet"]
    )
    assert result.exit_code == 3, result.output
    assert f"skipped {root / 'notes.dcm'}: not a DICOM file" in result.output
    rows = json.loads((tmp_path / "out" / "summary.json").read_text())
    skipped = {r["input"]: r for r in rows if r["status"] == "skipped"}
    assert set(skipped) == {str(root / "notes.dcm"), str(files[1])}
    assert "less than expected" in skipped[str(files[1])]["error"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 2
    odd = next(r for r in ok if r["series_uid"] == series_uid(ODD_SEED))
    assert odd["num_slices"] == SLICES - 1 and "slices_dropped" in odd["quality_flags"]
    header = (tmp_path / "out" / "summary.csv").read_text().splitlines()[0]
    assert "quality_flags" in header.split(",")


# --- patient ids ---------------------------------------------------------------------------------


def test_missing_patient_id_falls_back_to_the_study_explicitly(tmp_path: Path):
    files = odd_series(tmp_path)
    edit_all(files, _delete("PatientID"))
    volume, _ = _read_one(tmp_path)
    study = pydicom.dcmread(files[0]).StudyInstanceUID
    assert volume.patient_id == study
    assert volume.quality_flags == ["patient_id_fallback"]
    assert any("StudyInstanceUID" in w and "patient-level split" in w for w in volume.warnings)
    edit_all(files, _delete("StudyInstanceUID"))
    volume, _ = _read_one(tmp_path)
    assert volume.patient_id == series_uid(ODD_SEED)
    assert any("SeriesInstanceUID" in w for w in volume.warnings)


def test_nifti_patient_id_from_argument_sidecar_or_stem(tmp_path: Path):
    path = odd_nifti(tmp_path / "scan01.nii.gz")
    stem = read_nifti(path)
    assert stem.patient_id == "scan01" and stem.quality_flags == ["patient_id_fallback"]
    assert any("file stem 'scan01'" in w for w in stem.warnings)
    given = read_nifti(path, patient_id="P9")
    assert given.patient_id == "P9" and given.quality_flags == [] and given.warnings == []
    (tmp_path / "scan01.json").write_text(
        json.dumps({"PatientID": "P7", "StudyInstanceUID": "1.2.3", "SliceThickness": 5})
    )
    sidecar = read_nifti(path)
    assert (sidecar.patient_id, sidecar.study_uid) == ("P7", "1.2.3")
    assert sidecar.quality_flags == []
    (tmp_path / "scan01.json").write_text(json.dumps({"PatientID": ["P7"]}))
    with pytest.raises(InputError, match="PatientID must be a non-empty string") as error:
        read_nifti(path)
    assert error.value.path == str(tmp_path / "scan01.json")


# --- inspect: each file and series on its own ------------------------------------------------


def test_inspect_shows_quality_flags_and_survives_a_reader_failure(tmp_path: Path, monkeypatch):
    write_good(tmp_path)
    edit_all(odd_series(tmp_path), _delete("PixelSpacing"))
    runner = CliRunner()
    result = runner.invoke(app, ["inspect", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "quality flags: pixel_spacing_assumed" in result.output

    from ichseg.io import loader

    real = loader.read_series

    def flaky(series):
        if series.series_uid == series_uid(GOOD_SEED):
            raise RuntimeError("decoder crashed")
        return real(series)

    monkeypatch.setattr(loader, "read_series", flaky)
    result = runner.invoke(app, ["inspect", str(tmp_path)])
    assert result.exit_code == 3 and "Traceback" not in result.output
    assert f"skipped {tmp_path / 'good'}: unexpected RuntimeError" in result.output
    assert "1 volume(s), 1 skipped" in result.output


def test_tilted_nifti_positions_match_the_dicom_reader(tmp_path):
    """Slice positions run along the slice normal for NIfTI as for DICOM (not the sheared axis)."""
    from ichseg.io.dicom import read_dicom
    from ichseg.io.nifti import read_nifti
    from ichseg.phantom import PhantomConfig, Quirks, write_dataset

    write_dataset(
        tmp_path,
        studies=1,
        seed=3,
        config=PhantomConfig(size=32, num_slices=5),
        quirks=Quirks(gantry_tilt_deg=20.0),
    )
    (dicom,), _ = read_dicom(tmp_path / "dicom")
    nifti = read_nifti(next((tmp_path / "nifti").glob("*_ct.nii.gz")))
    np.testing.assert_allclose(
        np.diff(nifti.slice_positions), np.diff(dicom.slice_positions), atol=1e-3
    )
