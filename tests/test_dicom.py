"""DICOM/NIfTI readers against phantom series with known HU and geometry."""

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from ichseg.cli import app
from ichseg.errors import InputError
from ichseg.io.dicom import read_dicom
from ichseg.io.loader import load_volumes
from ichseg.io.nifti import read_nifti
from ichseg.phantom import PhantomConfig, Quirks, generate_study, write_dataset

CONFIG = PhantomConfig(size=64, num_slices=10)
SEED = 11


def _write(tmp: Path, quirks: Quirks | None = None, seed: int = SEED) -> Path:
    write_dataset(tmp, studies=1, seed=seed, config=CONFIG, quirks=quirks)
    return tmp


def _one(path: Path):
    volumes, skipped = read_dicom(path)
    assert len(volumes) == 1, skipped
    return volumes[0]


def _nifti_ct(root: Path):
    return read_nifti(next((root / "nifti").glob("*_ct.nii.gz")))


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha1()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("plain"))


def test_tissue_hu_ranges_survive_dicom_round_trip(plain: Path):
    volume = _one(plain / "dicom")
    study = generate_study(SEED * 1_000_000, CONFIG)
    hu = volume.hu
    np.testing.assert_allclose(hu, np.rint(study.hu), atol=1.0)
    inside = study.intracranial_mask.astype(bool)
    assert 0 <= np.median(hu[inside]) <= 50
    assert np.median(hu[hu > 300]) > 400
    assert abs(np.median(hu[:, :3, :3]) + 1000) < 30  # corner air
    if study.hemorrhage.any():
        assert 50 <= np.median(hu[study.hemorrhage > 0]) <= 90


def test_dicom_and_nifti_agree_voxel_for_voxel(plain: Path):
    dicom, nifti = _one(plain / "dicom"), _nifti_ct(plain)
    assert dicom.shape == nifti.shape
    assert np.abs(dicom.hu - nifti.hu).max() <= 1.0
    np.testing.assert_allclose(dicom.affine, nifti.affine, atol=1e-3)
    assert dicom.warnings == []


def test_independent_reading_with_plain_pydicom_and_nibabel(plain: Path):
    datasets = [pydicom.dcmread(p) for p in (plain / "dicom").rglob("*.dcm")]
    normal = np.cross(
        np.array(datasets[0].ImageOrientationPatient[:3], float),
        np.array(datasets[0].ImageOrientationPatient[3:], float),
    )
    datasets.sort(key=lambda d: float(np.dot(np.array(d.ImagePositionPatient, float), normal)))
    plain_hu = np.stack(
        [d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in datasets]
    )
    ours = _one(plain / "dicom")
    np.testing.assert_allclose(ours.hu, plain_hu, atol=1e-4)
    image = nib.load(next((plain / "nifti").glob("*_ct.nii.gz")))
    np.testing.assert_allclose(ours.hu, np.asarray(image.dataobj).transpose(2, 1, 0), atol=1.0)
    assert nib.aff2axcodes(image.affine) == nib.aff2axcodes(ours.affine)
    # LPS position of voxel (x=3, y=5, z=2) from the DICOM header, in RAS through our affine
    d = datasets[2]
    row, col = (
        np.array(d.ImageOrientationPatient[:3], float),
        np.array(d.ImageOrientationPatient[3:], float),
    )
    lps = (
        np.array(d.ImagePositionPatient, float)
        + 3 * float(d.PixelSpacing[1]) * row
        + 5 * float(d.PixelSpacing[0]) * col
    )
    ras = ours.affine @ np.array([3, 5, 2, 1.0])
    np.testing.assert_allclose(ras[:3], lps * np.array([-1, -1, 1]), atol=1e-3)


def test_sorting_ignores_file_names_and_instance_numbers(tmp_path: Path, plain: Path):
    shuffled = _one(_write(tmp_path, Quirks(shuffle_names=True)) / "dicom")
    reference = _one(plain / "dicom")
    np.testing.assert_array_equal(shuffled.hu, reference.hu)
    assert np.all(np.diff(shuffled.slice_positions) > 0)
    numbers = shuffled.instance_numbers
    assert numbers != sorted(numbers)  # InstanceNumber disagrees with position


def test_rsna_12bit_fix_restores_hu(tmp_path: Path, plain: Path):
    root = _write(tmp_path, Quirks(rsna_12bit=True))
    first = pydicom.dcmread(next((root / "dicom").rglob("*.dcm")))
    assert first.BitsStored == 12 and first.PixelRepresentation == 0
    volume = _one(root / "dicom")
    assert any("12-bit" in w and "10 slice" in w for w in volume.warnings)
    reference = np.clip(_one(plain / "dicom").hu, -1000, 3095)
    np.testing.assert_allclose(volume.hu, reference, atol=1.0)


def test_gantry_tilt_warning_with_angle(tmp_path: Path):
    volume = _one(_write(tmp_path, Quirks(gantry_tilt_deg=15.0)) / "dicom")
    tilt = [w for w in volume.warnings if "gantry tilt" in w]
    assert tilt and "15.0 degrees" in tilt[0]
    nifti = _nifti_ct(tmp_path)
    np.testing.assert_allclose(volume.affine, nifti.affine, atol=1e-3)


def test_missing_slice_warning_counts_the_gap(tmp_path: Path):
    volume = _one(_write(tmp_path, Quirks(missing_slice=True)) / "dicom")
    assert volume.num_slices == CONFIG.num_slices - 1
    missing = [w for w in volume.warnings if "missing slice" in w]
    assert missing and missing[0].startswith("1 missing slice(s) at step 5.00 mm")


@pytest.mark.parametrize("syntax", ["jpeg2000", "rle"])
def test_compressed_series_decode_to_same_hu(tmp_path: Path, plain: Path, syntax: str):
    volume = _one(_write(tmp_path, Quirks(transfer_syntax=syntax)) / "dicom")
    np.testing.assert_array_equal(volume.hu, _one(plain / "dicom").hu)
    assert any("compressed transfer syntax" in w for w in volume.warnings)


def test_bad_slices_are_dropped_naming_the_file(tmp_path: Path):
    root = _write(tmp_path)
    files = sorted((root / "dicom").rglob("*.dcm"))
    odd = pydicom.dcmread(files[3])
    odd.Rows, odd.Columns = 32, 32
    odd.PixelData = np.zeros((32, 32), np.int16).tobytes()
    odd.save_as(files[3])
    scout = pydicom.dcmread(files[5])
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.save_as(files[5])
    mr = pydicom.dcmread(files[6])
    mr.Modality = "MR"
    mr.save_as(files[6])
    volumes, skipped = read_dicom(root / "dicom")
    assert volumes[0].num_slices == CONFIG.num_slices - 3
    assert any(files[3].name in w and "differs" in w for w in volumes[0].warnings)
    reasons = dict(skipped)
    assert "localizer" in reasons[str(files[5])]
    assert "MR is not CT" in reasons[str(files[6])]


def test_nifti_refuses_4d_and_nonfinite(tmp_path: Path):
    four_d = tmp_path / "four.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3, 2), np.float32), np.eye(4)), four_d)
    with pytest.raises(InputError, match="expected a 3D volume"):
        read_nifti(four_d)
    nan = tmp_path / "nan.nii.gz"
    data = np.zeros((4, 4, 3), np.float32)
    data[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), nan)
    with pytest.raises(InputError, match="NaN or Inf"):
        read_nifti(nan)
    volumes, skipped = load_volumes(tmp_path)
    assert volumes == [] and len(skipped) == 2


def test_inspect_json_and_errors(plain: Path, tmp_path: Path):
    before = _tree_digest(plain)
    runner = CliRunner()
    result = runner.invoke(app, ["inspect", str(plain / "dicom"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    (entry,) = report["volumes"]
    assert entry["num_slices"] == CONFIG.num_slices and entry["shape"][1:] == [64, 64]
    assert entry["spacing_mm"][0] == pytest.approx(5.0)
    text = runner.invoke(app, ["inspect", str(plain)])
    assert text.exit_code == 3  # CSVs and label maps beside the scans are listed as skipped
    assert "skipped" in text.output and "HU min/median/max" in text.output
    assert _tree_digest(plain) == before

    empty = tmp_path / "empty"
    empty.mkdir()
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.txt").write_text("hello")
    for bad in (empty, junk, tmp_path / "missing"):
        result = runner.invoke(app, ["inspect", str(bad)])
        assert result.exit_code == 2
        assert result.output.startswith("error: ") and str(bad) in result.output
        assert "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1
